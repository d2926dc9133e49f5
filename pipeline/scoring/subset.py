"""Subset-exact scorer: exact student targets when the student is the teacher's BPE with a
truncated merge list (``../shared/spec/scoring.md`` §2).

Three phases per batch of documents:

1. Tokenizer phase (`prepare`, pure Python, no model): canonical teacher and student
   encodings, the R1 check, and for every student position ``i`` the VALID exact covers
   (teacher token sequences ``E`` with ``D(E) = s_1..s_i`` that are a prefix of some
   canonical encoding). They are found locally: the teacher encoding of the text since
   the last stable pre-token boundary, plus probe continuations where trailing
   whitespace (regex look-ahead), an apostrophe near the end (a contraction may still
   complete: `CONTRACTIONS`) or a split UTF-8 character lets a later character change
   the split. All covers of a document form a prefix tree of teacher contexts.
2. Teacher phase: one batched forward over the prefix trees of many documents (tree
   attention mask) gives ``p_T(. | E)`` for every tree node; path sums give the cover
   weights ``w_E = P_T(E)``.
3. Row phase (torch, on the teacher's device, float64 accumulation): for row ``i`` and
   every exact cover ``E`` at position ``j <= i`` whose decomposition trie node
   ``s_{j+1..i}`` still has children, add ``w_E`` times the mass of each child, read as
   differences of a cumulative sum of ``p_T(. | E)`` over the teacher vocab sorted by
   decomposition (every trie node is a contiguous range). Specials (EOS included)
   follow only the exact cover that is the canonical encoding of the prefix as a
   complete text. No Python loop touches the vocabulary.

Local texts. ``prepare(text, context=ids)`` covers only ``text`` and hangs its tree under
the teacher context ``ids`` (the canonical encoding of the text before it, ending at a
boundary the caller vouches for); `score_prepared_shared` and `dense_rows_shared` merge
the trees of many such texts (nodes deduplicated by (parent, token), split to fit the
teacher) and run one teacher call over them. The general scorer's byte model uses this
to compute next-byte rows from the last safe boundary instead of the start of the text.

Modules: the pair check (`check_subset_pair`) and the teacher tokens' student encodings
(`_decompositions`) are in `pipeline.scoring.subset_pair`; the prefix-tree utilities
both scorers use (`merge_context_trees`, `teacher_tree_logprobs`) in
`pipeline.scoring.trees`; the exact covers of each student position (the tokenizer
phase) in `pipeline.scoring.covers`. Their names stay importable from here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.scoring.common import Regime, ScoredDocument, SubsetRegimeError
from pipeline.scoring.covers import (  # the tokenizer phase: exact covers
    DEFAULT_PROBES,
    Segment,
)
from pipeline.scoring.protocol import Teacher
from pipeline.scoring.subset_pair import _decompositions, check_subset_pair
from pipeline.scoring.trees import (
    _batches,
    merge_context_trees,
    teacher_tree_batches,
    teacher_tree_logprobs,  # noqa: F401  (importable from here, see above)
)
from pipeline.scoring.unicode import char_of_bytes
from pipeline.tokenization import (
    ByteLevelBPE,
    TokenizerError,
    UnscorableTextError,
    UnscorableTokenizationError,
    load_tokenizer,
)

# Teacher ids summed together in the teacher's dtype before float64 accumulation.
BUCKET = 64

# Memory of one block of rows of the row phase (`SubsetExactScorer._block_bytes`): on the
# CPU larger blocks are slower (caches); on a GPU they cut the kernel launches per row
# (Qwen2 vocab, `jobs/bench/rowphase.py`: 3.1 ops per student token at 256 MiB, 0.89 at
# 1 GiB).
BLOCK_BYTES_CPU = 256 * 2**20
BLOCK_BYTES_MAX = 2**30

# Texts the pair check encodes with both tokenizers (R1) at construction.
R1_PROBE_TEXTS: tuple[str, ...] = (
    "Hello world! It's 2024-11-22; the price is $1,234.56.",
    "a  1\n\n  x\t\ty   \n",
    "  leading and trailing   ",
    "Café naïve e\u0301 résumé",
    "中文测试，你好世界。日本語のテキスト",
    "emoji 😀👍🏽 done",
    "def f(x):\n    return x**2  # comment\n",
    "I'll we've they're DON'T",
    "1234567890 12 345",
)


@dataclass
class RowPlan:
    """The host side of one document's row phase (`SubsetExactScorer.row_plan`): its
    entries (row, cover node, decomposition-trie node, takes the specials), sorted by
    row, from the exact covers alone; no teacher output is needed to build it."""

    n_rows: int  # L + 1
    rows: np.ndarray  # int64, sorted
    cov: np.ndarray  # local tree node of the cover
    tnode: np.ndarray  # trie node of the student tokens since the cover
    spec: np.ndarray  # bool
    next_ids: np.ndarray  # the actual next student token of every row (EOS last)
    depth: int  # of the local tree


@dataclass
class PreparedDocument:
    """Output of the tokenizer phase for one document."""

    text: str
    teacher_ids: list[int]
    student_ids: list[int]
    covers: list[list[int]]  # per student position 0..L: tree node indices of valid exact covers
    # per position: the node of the canonical encoding of the prefix as a COMPLETE text
    # (the only cover a special token or EOS may follow), or -1 inside a character
    complete: list[int]
    tokens: list[int]  # tree node tokens; node 0 is the start of text (token -1)
    parents: list[int]  # tree node parents (-1 for node 0)
    stats: dict[str, Any] = field(default_factory=dict)
    # canonical teacher ids of the text before ``text`` (see `SubsetExactScorer.prepare`);
    # node 0 is then the end of this context, not the start of text
    context: list[int] = field(default_factory=list)
    # the row phase's host side, built by `prepare`
    plan: RowPlan | None = field(default=None, compare=False, repr=False)

    @property
    def num_nodes(self) -> int:
        """Nodes of the local tree (node 0 included, the context path not)."""
        return len(self.tokens)

    @property
    def tree_size(self) -> int:
        """Nodes of the teacher tree: start of text, context path, local nodes."""
        return len(self.context) + len(self.tokens)

    def tree(self) -> tuple[list[int], list[int]]:
        """(tokens, parents) of the teacher tree: the context path, then the local nodes
        under its last node (local node ``v`` is tree node ``v + len(context)``)."""
        c = len(self.context)
        if not c:
            return self.tokens, self.parents
        tokens = [-1, *self.context, *self.tokens[1:]]
        parents = [-1, *range(c), *(p + c for p in self.parents[1:])]
        return tokens, parents


def _cover_weights(
    rows_t: torch.Tensor, lw: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row shift (the largest cover log-weight of the row) and the entries' weights
    relative to it, so the heaviest cover of every row weighs 1 (no underflow)."""
    shift = torch.full((n_rows,), -math.inf, dtype=lw.dtype, device=lw.device)
    shift.scatter_reduce_(0, rows_t, lw, reduce="amax")
    return shift, torch.exp(lw - shift[rows_t])


def vocab_columns(logp: torch.Tensor, size: int) -> torch.Tensor:
    """The teacher's log-probs cut to its tokenizer's ``size`` ids (a model may have
    padding logits); `ValueError` when it returned fewer."""
    if logp.shape[1] < size:
        raise ValueError(f"teacher returned {logp.shape[1]} columns, tokenizer has {size} ids")
    return logp[:, :size]


def _path_sums_device(parent: torch.Tensor, step: torch.Tensor, depth: int) -> torch.Tensor:
    """`_path_sums` on the device by pointer jumping (``parent``: a root is its own
    parent, with step 0; ``depth``: the deepest node's depth): ceil(log2(depth))
    rounds of gathers, no host loop and no wait."""
    val, anc = step, parent
    hops = 1
    while hops < depth:
        val = val + val[anc]
        anc = anc[anc]
        hops *= 2
    return val


def _path_sums(parents: Sequence[int], steps: np.ndarray) -> np.ndarray:
    """Per tree node, the sum of ``steps`` along its path from node 0 (``steps[v - 1]``:
    the log-prob of node ``v``'s token after its parent; parents precede children)."""
    out = np.zeros(len(parents), dtype=np.float64)
    for v in range(1, len(parents)):
        out[v] = out[parents[v]] + steps[v - 1]
    return out


def _shared_calls(
    teacher: Teacher,
    prepared: Sequence[PreparedDocument],
    max_tree_nodes: int | None,
    max_batch_nodes: int | None,
    stats: dict[str, int],
) -> Iterator[tuple[torch.Tensor, list[tuple[int, np.ndarray]]]]:
    """The teacher forwards of `score_prepared_shared` / `dense_rows_shared`: the
    documents' trees merged (`merge_context_trees`) within ``max_tree_nodes``, sent in
    calls of at most ``max_batch_nodes`` nodes. Yields per forward its log-probs and
    its documents as (index, the log-prob row of each local node); fills ``stats``
    (``teacher_contexts``, ``teacher_calls``, ``trees``)."""
    mbt = int(getattr(teacher, "max_batch_tokens", 1024))
    n_start = len(getattr(teacher, "start_ids", [0]))
    cap = max_tree_nodes or max(2, mbt - n_start + 1)
    budget = max_batch_nodes or 4 * mbt
    trees, where = merge_context_trees(prepared, cap)
    docs_of: list[list[tuple[int, np.ndarray]]] = [[] for _ in trees]
    for i, (k, nodes) in enumerate(where):
        docs_of[k].append((i, np.asarray(nodes, dtype=np.int64)))
    stats.update(teacher_contexts=0, teacher_calls=0, trees=len(trees))
    for batch in _batches([len(t[0]) for t in trees], budget):
        stats["teacher_contexts"] += sum(len(trees[k][0]) for k in batch)
        stats["teacher_calls"] += 1
        for lp, first in teacher_tree_batches(teacher, [trees[k] for k in batch]):
            yield lp, [(i, first[t] + nodes) for t in first for i, nodes in docs_of[batch[t]]]
            del lp


class _Tree:
    """Prefix tree of teacher contexts: canonical path first, then branches."""

    def __init__(self, canonical: list[int]) -> None:
        self.canonical = canonical
        self.tokens = [-1, *canonical]
        self.parents = [-1, *range(len(canonical))]
        self.branch: dict[tuple[int, int], int] = {}  # (parent node, token) -> node

    def node(self, m: int, suffix: Sequence[int]) -> int:
        """Node of the context canonical[:m] + suffix."""
        k = 0
        canon = self.canonical
        while k < len(suffix) and m < len(canon) and canon[m] == suffix[k]:
            m += 1
            k += 1
        node = m
        for t in suffix[k:]:
            key = (node, int(t))
            nxt = self.branch.get(key)
            if nxt is None:
                nxt = len(self.tokens)
                self.tokens.append(int(t))
                self.parents.append(node)
                self.branch[key] = nxt
            node = nxt
        return node


class SubsetStudent:
    """The student of a subset pair (a byte-level BPE) as the job and the audit see it:
    `pipeline.scoring.protocol.StudentView` over its `ByteLevelBPE` (``bpe``)."""

    def __init__(self, bpe: ByteLevelBPE, eos_id: int) -> None:
        self.bpe = bpe
        self.eos_id = eos_id

    @property
    def fingerprint(self) -> str:
        return self.bpe.fingerprint

    @property
    def size(self) -> int:
        return self.bpe.size

    def encode(self, text: str) -> list[int]:
        return list(self.bpe.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        missing = [int(i) for i in ids if int(i) not in self.bpe.token_bytes]
        if missing:
            raise UnscorableTextError(f"student ids that stand for no bytes: {missing[:5]}")
        return self.bpe.decode_bytes([int(i) for i in ids])

    def token_repr(self, i: int) -> str:
        return self.bpe.token_repr(i)

    def row_offsets(self, text: str, ids: Sequence[int]) -> np.ndarray:
        """Char offset of each token's first byte (a byte-level token may start inside a
        character: the offset of that character), then ``len(text)``."""
        nbytes = np.cumsum([0, *(len(self.bpe.token_bytes[int(t)]) for t in ids)])
        # the character holding each byte (a token may start mid-character)
        char_of = char_of_bytes(text)
        return np.asarray(char_of[np.minimum(nbytes, len(char_of) - 1)], dtype=np.int64)


class _Upload:
    """Host index arrays of a row phase, sent to the device in ONE copy (pinned and
    asynchronous on CUDA): `add` returns a handle, `send` the device buffer, `get` a
    view of it."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.size = 0

    def add(self, a: np.ndarray | Sequence[int]) -> tuple[int, int]:
        arr = np.asarray(a, dtype=np.int64).reshape(-1)
        self.parts.append(arr)
        self.size += len(arr)
        return self.size - len(arr), self.size

    def send(self, device: torch.device) -> torch.Tensor:
        host = torch.from_numpy(np.concatenate(self.parts) if self.parts else np.zeros(0, np.int64))
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)


@dataclass
class _RootPlan:
    """Entries of a block at the trie root (see `_accumulate`): their rows, the unique
    cover nodes and each entry's index into them, the weights' indices; the same for
    the entries that also take the specials."""

    rows: tuple[int, int]
    nodes: tuple[int, int]
    inv: tuple[int, int]
    widx: tuple[int, int]
    spec_rows: tuple[int, int]
    spec_nodes: tuple[int, int]
    spec_widx: tuple[int, int]
    n_spec: int


@dataclass
class _ChunkPlan:
    """Entries below the trie root whose teacher-token ranges, flattened, hold
    ``total`` elements."""

    rows: tuple[int, int]
    nodes: tuple[int, int]
    lo: tuple[int, int]
    sizes: tuple[int, int]
    depth: tuple[int, int]
    widx: tuple[int, int]
    n: int
    total: int


@dataclass
class _BlockPlan:
    r0: int
    r1: int
    root: _RootPlan | None
    chunks: list[_ChunkPlan]


class SubsetExactScorer:
    """Exact student targets for a student whose merges are a prefix of the teacher's.

    Args:
        teacher_tokenizer: the teacher's tokenizer (`tokenizers.Tokenizer`, HF fast
            tokenizer, tokenizer.json path, HF directory or hub id).
        student_tokenizer: the student's tokenizer, same accepted forms.
        eos_token: content of the teacher's end-of-text token whose mass goes to the
            student's token of the same content in every row (row ``L`` is where it
            matters). Default: the first of ``DOC_END_TOKENS`` the teacher has.
        probes: continuation characters used to find exact covers at trailing whitespace.
        accum_dtype: dtype of the row accumulation (float64 keeps tiny probabilities
            exact to ~1e-16 absolute).
        max_block_bytes: memory budget of one block of rows in the row phase; None
            (default): 256 MiB on the CPU; elsewhere an eighth of the forward's
            log-probs within 256 MiB..1 GiB (fewer, larger blocks: fewer kernel
            launches per row, and within what the forward's logits held before).

    Special tokens in a text (e.g. ``<|im_start|>`` from a chat template) are parsed as
    the added tokens they name, as both tokenizers do, and scored as atomic symbols: a
    special follows only an exact cover, and the cover set collapses to one element
    after it. An added token the student lacks is refused. Empty texts give one row
    (the distribution of the first token). Texts that do not survive the teacher's
    encode/decode (bytes without a symbol in its vocab) raise `UnscorableTextError`.
    """

    regime = Regime.EXACT

    def __init__(
        self,
        teacher_tokenizer: Any,
        student_tokenizer: Any,
        *,
        eos_token: str | None = None,
        probes: Sequence[str] = DEFAULT_PROBES,
        accum_dtype: torch.dtype = torch.float64,
        max_block_bytes: int | None = None,
    ) -> None:
        self.T = ByteLevelBPE(load_tokenizer(teacher_tokenizer), "teacher")
        self.S = ByteLevelBPE(load_tokenizer(student_tokenizer), "student")
        self.probes = tuple(dict.fromkeys(probes))
        self.accum_dtype = accum_dtype
        self.max_block_bytes = max_block_bytes
        check_subset_pair(self.T, self.S)
        self.decomp = _decompositions(self.T, self.S)
        self.max_depth = max(len(d) for d in self.decomp.values())
        self._build_trie()
        self._map_specials(eos_token)
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}
        bad = [t for t in R1_PROBE_TEXTS if self._r1_mismatch(t) is not None]
        if bad:
            raise SubsetRegimeError(
                "R1 fails (student encoding != unmerged teacher encoding) on "
                + "; ".join(f"{t!r}: {self._r1_mismatch(t)}" for t in bad[:3])
            )

    # ------------------------------------------------------------------ the Scorer interface
    # (`pipeline.scoring.protocol.Scorer`; `prepare`, `score` and `score_prepared` below)
    name = "subset-exact"

    @property
    def params(self) -> dict[str, Any]:
        """Settings that change the targets: none (they are exact)."""
        return {}

    @functools.cached_property
    def student(self) -> SubsetStudent:
        """The student tokenizer (`pipeline.scoring.protocol.StudentView`)."""
        return SubsetStudent(self.S, self.student_eos)

    def tree_tokens(self, prepared: PreparedDocument) -> int:
        """Teacher tokens of the text's context tree (context path included), start
        tokens not counted: one forward row must hold them all."""
        return prepared.tree_size - 1

    def context_nodes(self, prepared: PreparedDocument) -> int:
        return prepared.tree_size

    # ------------------------------------------------------------------ construction
    def _build_trie(self) -> None:
        """Teacher BPE vocab sorted by decomposition; every trie node is a range."""
        ids = sorted(self.decomp, key=lambda t: self.decomp[t])
        self.perm = np.asarray(ids, dtype=np.int64)
        seqs = [self.decomp[t] for t in ids]
        n = len(seqs)
        lo, hi, clo, chi, dep = [0], [n], [0], [0], [0]
        child: dict[tuple[int, int], int] = {}
        prev = [0] * n
        for k in range(1, self.max_depth + 1):
            cur = [-1] * n
            last: tuple[int, int] | None = None
            nid = -1
            for pos in range(n):
                s = seqs[pos]
                if len(s) < k:
                    continue
                key = (prev[pos], s[k - 1])
                if key != last:
                    nid = len(lo)
                    parent = key[0]
                    lo.append(pos)
                    hi.append(pos + 1)
                    dep.append(k)
                    clo.append(0)
                    chi.append(0)
                    if chi[parent] == 0:
                        clo[parent] = nid
                    chi[parent] = nid + 1
                    child[key] = nid
                    last = key
                else:
                    hi[nid] = pos + 1
                cur[pos] = nid
            prev = cur
        self.trie_child = child
        self.trie = {
            "lo": np.asarray(lo, np.int64),
            "hi": np.asarray(hi, np.int64),
            "clo": np.asarray(clo, np.int64),
            "chi": np.asarray(chi, np.int64),
            "depth": np.asarray(dep, np.int64),
        }
        # next_tok[pos, k]: the (k+1)-th student token of the pos-th sorted teacher token
        nxt = np.full((n, self.max_depth + 1), -1, np.int64)
        for pos, sq in enumerate(seqs):
            nxt[pos, : len(sq)] = sq
        self.trie["next_tok"] = nxt
        # Buckets of at most BUCKET teacher ids sharing their first student token: the
        # mass per first token is summed per bucket in the teacher's dtype (short sums
        # stay exact to ~1e-7 in float32), then per column in float64.
        bucket_by_id = np.zeros(self.T.size, np.int64)
        bucket_col: list[int] = []
        pos = 0
        while pos < n:
            a = nxt[pos, 0]
            end = pos
            while end < n and nxt[end, 0] == a and end - pos < BUCKET:
                end += 1
            bucket_by_id[self.perm[pos:end]] = len(bucket_col)
            bucket_col.append(int(a))
            pos = end
        spare = len(bucket_col)
        bucket_by_id[sorted(self.T.added_ids)] = spare  # specials: handled separately
        bucket_col.append(self.S.size)
        self.trie["bucket_by_id"] = bucket_by_id
        self.trie["bucket_col"] = np.asarray(bucket_col, np.int64)

    def _map_specials(self, eos_token: str | None) -> None:
        s_by_content = self.S.added_by_content
        t2s = self.T.added_map(s_by_content)
        unmapped = [t for t in sorted(self.T.added_ids) if t not in t2s]
        eos_token = self.T.end_of_text(eos_token)
        if eos_token not in s_by_content:
            raise TokenizerError(
                f"the student has no token {eos_token!r} to carry end-of-text mass"
            )
        self.eos_token = eos_token
        self.teacher_eos = self.T.added_by_content[eos_token]
        self.student_eos = s_by_content[eos_token]
        self.special_t = np.asarray(list(t2s), np.int64)
        self.special_s = np.asarray(list(t2s.values()), np.int64)
        self.unmapped_t = np.asarray(unmapped, np.int64)
        self.t2s_special = t2s

    def _tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        cache = self._device_cache.get(device)
        if cache is None:
            cache = {k: torch.as_tensor(v, device=device) for k, v in self.trie.items()}
            cache["perm"] = torch.as_tensor(self.perm, device=device)
            cache["special_t"] = torch.as_tensor(self.special_t, device=device)
            cache["special_s"] = torch.as_tensor(self.special_s, device=device)
            cache["unmapped_t"] = torch.as_tensor(self.unmapped_t, device=device)
            self._device_cache[device] = cache
        return cache

    def _decompose(self, ids: Iterable[int]) -> list[int]:
        out: list[int] = []
        for t in ids:
            if t in self.t2s_special:
                out.append(self.t2s_special[t])
            elif t in self.decomp:
                out.extend(self.decomp[t])
            else:
                raise UnscorableTokenizationError(
                    f"the text contains the teacher's added token {self.T.token_repr(t)!r}, "
                    "which the student tokenizer does not have"
                )
        return out

    def _r1_mismatch(self, text: str) -> str | None:
        t = self.T.tokenizer.encode(text, add_special_tokens=False).ids
        s = self.S.tokenizer.encode(text, add_special_tokens=False).ids
        d = self._decompose(t)
        if d == s:
            return None
        k = next(
            (i for i, (a, b) in enumerate(zip(d, s, strict=False)) if a != b), min(len(d), len(s))
        )
        return (
            f"at student position {k}: unmerged teacher gives "
            f"{[self.S.token_repr(x) for x in d[k : k + 3]]}, student gives "
            f"{[self.S.token_repr(x) for x in s[k : k + 3]]}"
        )

    # ------------------------------------------------------------------ tokenizer phase
    def prepare(self, text: str, context: Sequence[int] | None = None) -> PreparedDocument:
        """Tokenizer phase for one text: encodings, R1 check, exact covers, context tree.

        ``context``: canonical teacher ids of text that precedes ``text`` (default: none,
        ``text`` starts the document). Only ``text`` is tokenised and covered; the
        teacher sees ``context + cover`` and the rows are conditioned on the context
        (``P_T(context)`` cancels in every row). The caller vouches that the context
        text ends at a boundary that the whole text's teacher encoding keeps (a
        teacher pre-token start not preceded by whitespace, or an added token), so
        that every valid exact cover of a local prefix starts with ``context``. Row
        ``k`` then equals row ``i0 + k`` of the whole text (``i0`` = student tokens of
        the context text) except for covers from before the boundary whose last
        token would cross it: rows with no such cover are identical (see
        `pipeline.scoring.general.ByteModel`). ``teacher_ids``, ``student_ids`` and
        the ``teacher_logprob`` stat are those of the local text.
        """
        ctx = [int(t) for t in context] if context is not None else []
        bad = [t for t in ctx if not 0 <= t < self.T.size]
        if bad:
            raise ValueError(f"context ids outside the teacher vocab: {bad[:5]}")
        norm = self.T.normalize(text)
        parts = self.T.split_added(norm)
        student_ids = self.S.tokenizer.encode(text, add_special_tokens=False).ids
        canonical: list[int] = []
        seg_t: list[list[int] | None] = []
        for part in parts:
            if isinstance(part, int):
                canonical.append(part)
                seg_t.append(None)
            else:
                ids = self.T.encode_exact(part)
                canonical.extend(ids)
                seg_t.append(ids)
        hf_ids = self.T.tokenizer.encode(text, add_special_tokens=False).ids
        if hf_ids != canonical:
            raise UnscorableTokenizationError(
                "internal segmentation differs from the teacher tokenizer's own encoding "
                "(unsupported added-token options such as lstrip/rstrip?)"
            )
        if self._decompose(canonical) != student_ids:
            raise UnscorableTextError(f"R1 fails on this text: {self._r1_mismatch(text)}")

        tree = _Tree(canonical)
        covers: list[list[int]] = [[0]]  # position 0: start of text
        complete: list[int] = [0]
        m0 = 0  # teacher tokens before the current part
        i0 = 0  # student tokens before the current part
        n_alt = 0
        for part, tids in zip(parts, seg_t, strict=True):
            if tids is None:  # an added token: atomic, frontier collapses after it
                m0 += 1
                i0 += 1
                covers.append([tree.node(m0, ())])
                complete.append(covers[-1][0])
                continue
            assert isinstance(part, str)
            n_s = len(self._decompose(tids))
            seg = Segment(self, part, tids, student_ids[i0 : i0 + n_s])
            for k in range(1, n_s + 1):
                cands = seg.exact_covers(k)
                if len(cands) > 1:
                    n_alt += len(cands) - 1
                nodes = [tree.node(m0 + m, suf) for m, suf, _ in cands]
                covers.append(nodes)
                complete.append(next((v for v, c in zip(nodes, cands, strict=True) if c[2]), -1))
            m0 += len(tids)
            i0 += n_s
        assert i0 == len(student_ids) and m0 == len(canonical)
        doc = PreparedDocument(
            text=norm,
            teacher_ids=canonical,
            student_ids=list(student_ids),
            covers=covers,
            complete=complete,
            tokens=tree.tokens,
            parents=tree.parents,
            stats={"alt_covers": n_alt},
            context=ctx,
        )
        self.row_plan(doc)
        return doc

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        teacher: Teacher,
        texts: Sequence[str],
        top_k: int | None = 64,
        max_batch_nodes: int | None = None,
        *,
        rows: Sequence[np.ndarray | None] | None = None,
    ) -> list[ScoredDocument]:
        """Score ``texts``; see `ScoredDocument` for the row convention.

        ``top_k=None`` returns dense rows over the whole student vocab (specials
        included). Documents are grouped so that one teacher call sees at most
        ``max_batch_nodes`` tree nodes (default: 4x the teacher's ``max_batch_tokens``;
        the teacher returns log-probs for all of them at once, so this bounds memory).
        ``rows`` (the `Scorer` interface's row masks) is ignored: every row comes from
        the same forward, so all are computed.
        """
        if top_k is not None and top_k < 1:
            raise ValueError("top_k must be >= 1 or None")
        prepared = [self.prepare(t) for t in texts]
        return self.score_prepared(teacher, prepared, top_k, max_batch_nodes)

    def score_prepared(
        self,
        teacher: Teacher,
        prepared: Sequence[PreparedDocument],
        top_k: int | None = 64,
        max_batch_nodes: int | None = None,
        *,
        rows: Sequence[np.ndarray | None] | None = None,
    ) -> list[ScoredDocument]:
        """Teacher and row phases of `prepare`d documents (``rows``: ignored, see
        `score`)."""
        # Several forward batches per teacher call let the teacher pack trees tightly.
        budget = max_batch_nodes or 4 * int(getattr(teacher, "max_batch_tokens", 1024))
        out: list[ScoredDocument | None] = [None] * len(prepared)
        for batch in _batches([p.tree_size for p in prepared], budget):
            trees = [prepared[b].tree() for b in batch]
            for lp, first in teacher_tree_batches(teacher, trees):
                docs = [batch[t] for t in first]
                items = [
                    (
                        prepared[b],
                        first[t] + len(prepared[b].context) + np.arange(prepared[b].num_nodes),
                    )
                    for t, b in zip(first, docs, strict=True)
                ]
                for b, r in zip(docs, self.rows_batch(lp, items, top_k).result(), strict=True):
                    out[b] = r
                del lp  # this forward's log-probs go before the next forward
        return [o for o in out if o is not None]

    def score_prepared_shared(
        self,
        teacher: Teacher,
        prepared: Sequence[PreparedDocument],
        top_k: int | None = 64,
        max_tree_nodes: int | None = None,
        max_batch_nodes: int | None = None,
    ) -> tuple[list[ScoredDocument], dict[str, int]]:
        """Like `score_prepared`, for many documents that share teacher contexts (e.g.
        local texts after a common context): their trees are merged into as few prefix
        trees as fit, nodes deduplicated by (parent, token), so a context is evaluated
        once per tree, not once per document.

        ``max_tree_nodes`` bounds one merged tree (default: what the teacher's
        ``max_batch_tokens`` holds after its start tokens; a document whose own tree is
        larger gets a tree alone, which the teacher may refuse). Trees are sent in
        teacher calls of at most ``max_batch_nodes`` nodes (default: 4x
        ``max_batch_tokens``; log-probs of a whole call are held at once). Returns the
        documents (input order) and the counters ``teacher_contexts`` (tree nodes sent,
        roots included), ``teacher_calls`` and ``trees``.
        """
        out: list[ScoredDocument | None] = [None] * len(prepared)
        stats: dict[str, int] = {}
        for lp, docs in _shared_calls(teacher, prepared, max_tree_nodes, max_batch_nodes, stats):
            items = [(prepared[i], nodes) for i, nodes in docs]
            for (i, _), r in zip(docs, self.rows_batch(lp, items, top_k).result(), strict=True):
                out[i] = r
            del lp
        return [o for o in out if o is not None], stats

    def dense_rows_shared(
        self,
        teacher: Teacher,
        prepared: Sequence[PreparedDocument],
        wanted: Sequence[Sequence[int]],
        max_tree_nodes: int | None = None,
        max_batch_nodes: int | None = None,
    ) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
        """Selected dense rows of many documents that share teacher contexts.

        For document ``d``, rows ``wanted[d]`` (student positions) are computed as in
        `score_prepared` with ``top_k=None`` (same covers, weights and sums), but the
        documents' trees are merged (`merge_context_trees`) and the rows of all
        documents of one teacher call are accumulated together, so a tree node shared
        by several documents costs one vocabulary pass, and rows nobody wants cost
        nothing. Returns, per document, the probabilities ``[len(wanted[d]), V_S]``
        (``exp(logprobs) * (1 - unmapped)``: a row sums to 1 minus its mass on teacher
        specials the student lacks), that unmapped share ``[len(wanted[d])]``, and the
        counters of `score_prepared_shared`.
        """
        probs: list[np.ndarray] = [np.zeros((0, self.S.size))] * len(prepared)
        unmapped: list[np.ndarray] = [np.zeros(0)] * len(prepared)
        stats: dict[str, int] = {}
        for lp, docs in _shared_calls(teacher, prepared, max_tree_nodes, max_batch_nodes, stats):
            got = self._dense_rows(lp, [(prepared[i], nodes, list(wanted[i])) for i, nodes in docs])
            for (i, _), (pr, un) in zip(docs, got, strict=True):
                probs[i], unmapped[i] = pr, un
            del lp
        return probs, unmapped, stats

    def _dense_rows(
        self, logp: torch.Tensor, items: Sequence[tuple[PreparedDocument, np.ndarray, list[int]]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Row phase of `dense_rows_shared` for documents whose tree nodes are rows of
        ``logp`` (``items``: document, node of each local node, wanted rows)."""
        device = logp.device
        adt = self.accum_dtype
        tz = self._tensors(device)
        logp = vocab_columns(logp, self.T.size)
        rn = row_norms(logp, adt)
        lse = rn.lse
        # path log-weights per document (relative to its local root), as in `rows_batch`
        gpar: list[int] = []
        gtok: list[int] = []
        spans: list[tuple[int, int]] = []
        for doc, nodes, _ in items:
            start = len(gpar)
            gpar.extend(nodes[doc.parents[1:]].tolist())
            gtok.extend(doc.tokens[1:])
            spans.append((start, len(gpar)))
        step_np = np.zeros(0)
        if gpar:
            par_t = torch.as_tensor(gpar, device=device)
            tok_t = torch.as_tensor(gtok, device=device)
            step_np = (logp[par_t, tok_t].to(adt) - lse[par_t]).cpu().numpy()
        rows, cov, tnode, spec, lws = [], [], [], [], []
        n_out = 0
        out_rows: list[int] = []
        for (doc, nodes, want), (s0, s1) in zip(items, spans, strict=True):
            logw = _path_sums(doc.parents, step_np[s0:s1])
            slot = {r: n_out + k for k, r in enumerate(want)}
            out_rows.append(n_out)
            n_out += len(want)
            if not want:
                continue
            # a walk from j reaches rows j .. j + max_depth at most
            for i, q, e, sp in self._cover_walks(
                doc, max(0, min(want) - self.max_depth), max(want)
            ):
                o = slot.get(i)
                if o is not None:
                    rows.append(o)
                    cov.append(int(nodes[e]))
                    tnode.append(q)
                    spec.append(sp)
                    lws.append(logw[e])
        out_rows.append(n_out)
        vs = self.S.size
        probs = torch.zeros((n_out, vs), dtype=adt, device=device)
        unm = torch.zeros(n_out, dtype=adt, device=device)
        if rows:
            order = np.argsort(np.asarray(rows), kind="stable")
            rows_np = np.asarray(rows, np.int64)[order]
            lw = torch.as_tensor(np.asarray(lws)[order], dtype=adt, device=device)
            _, w = _cover_weights(torch.as_tensor(rows_np, device=device), lw, n_out)
            entries = (
                rows_np,
                np.asarray(cov, np.int64)[order],
                np.asarray(tnode, np.int64)[order],
                np.asarray(spec, bool)[order],
            )
            blocks, up = self._block_plans(n_out, *entries, block_bytes=self._block_bytes(logp))
            for r0, r1, logJ, share, _ in self._row_blocks(blocks, up.send(device), w, rn, tz):
                probs[r0:r1] = torch.exp(logJ) * (1.0 - share)[:, None]
                unm[r0:r1] = share
        probs_np, unm_np = probs.cpu().numpy(), unm.cpu().numpy()
        return [
            (probs_np[out_rows[k] : out_rows[k + 1]], unm_np[out_rows[k] : out_rows[k + 1]])
            for k in range(len(items))
        ]

    def _cover_walks(
        self, doc: PreparedDocument, first: int, last: int
    ) -> Iterator[tuple[int, int, int, bool]]:
        """The entries of the row phase (`rows_batch`, `_dense_rows`) from the exact covers
        at student positions ``first..last``: every cover ``e`` at position ``j`` adds to
        rows ``i = j, j + 1, ...`` through the decomposition-trie node ``q`` of
        ``s_{j+1..i}``, while that node still has children. Yields ``(i, q, e, special)``
        (``special``: the row's specials and EOS follow this cover: ``q`` is the root and
        ``e`` the canonical encoding of the prefix as a complete text), anchors in order."""
        S = doc.student_ids
        L = len(S)
        child = self.trie_child
        chi, clo = self.trie["chi"], self.trie["clo"]
        for j in range(first, last + 1):
            covers = doc.covers[j]
            if not covers:
                continue
            complete = doc.complete[j]
            q = 0
            i = j
            while True:
                for e in covers:
                    yield i, q, e, q == 0 and e == complete
                if i == L:
                    break
                q = child.get((q, S[i]), -1)
                if q < 0 or chi[q] == clo[q]:
                    break
                i += 1

    # ------------------------------------------------------------------ row phase
    def row_plan(self, doc: PreparedDocument) -> RowPlan:
        """The host side of the document's row phase (`RowPlan`), from the tokenizer
        phase alone; `prepare` computes it (so a producer thread or worker process does
        this work ahead of the teacher), cached on the document."""
        if doc.plan is not None:
            return doc.plan
        L = len(doc.student_ids)
        walks = np.asarray(list(self._cover_walks(doc, 0, L)), dtype=np.int64).reshape(-1, 4)
        walks = walks[np.argsort(walks[:, 0], kind="stable")]
        depth = [0] * doc.num_nodes
        for v in range(1, doc.num_nodes):
            depth[v] = depth[doc.parents[v]] + 1
        doc.plan = RowPlan(
            n_rows=L + 1,
            rows=walks[:, 0].copy(),
            cov=walks[:, 2].copy(),
            tnode=walks[:, 1].copy(),
            spec=walks[:, 3].astype(bool),
            next_ids=np.asarray([*doc.student_ids, self.student_eos], dtype=np.int64),
            depth=max(depth),
        )
        return doc.plan

    def _block_bytes(self, logp: torch.Tensor) -> int:
        """Memory of one block of rows (see ``max_block_bytes``)."""
        if self.max_block_bytes is not None:
            return self.max_block_bytes
        if logp.device.type == "cpu":
            return BLOCK_BYTES_CPU
        lp_bytes = logp.shape[0] * logp.shape[1] * logp.element_size()
        return max(BLOCK_BYTES_CPU, min(BLOCK_BYTES_MAX, lp_bytes // 8))

    def rows_batch(
        self,
        logp: torch.Tensor,
        items: Sequence[tuple[PreparedDocument, np.ndarray]],
        top_k: int | None,
        norms: RowNorms | None = None,
    ) -> PendingRows:
        """Row phase of many documents whose teacher log-probs are rows of one tensor
        ``logp`` [nodes, V_T] (``items``: each document with the ``logp`` row of each of
        its local nodes; documents may share nodes).

        Every index array is built on the host first (from the documents' `RowPlan`s)
        and sent in one copy; the device then runs the whole batch (path sums, cover
        weights, blocks of rows, top-k) without waiting for the host: no host-device
        synchronisation until `PendingRows.result` copies the outputs back (one wait per
        batch, not per block or per document; on CUDA the copies are asynchronous, so
        the caller may queue the next forward first). ``norms``: `row_norms` of
        ``logp`` when the caller has them (several row phases over one forward)."""
        device = logp.device
        adt = self.accum_dtype
        tz = self._tensors(device)
        logp = vocab_columns(logp, self.T.size)
        plans = [self.row_plan(d) for d, _ in items]
        # ---- host: the batch's local nodes (concatenated) and entries
        n_nodes = np.asarray([d.num_nodes for d, _ in items], np.int64)
        node_off = np.concatenate([[0], np.cumsum(n_nodes)])
        n_rows = np.asarray([p.n_rows for p in plans], np.int64)
        row_off = np.concatenate([[0], np.cumsum(n_rows)])
        R = int(row_off[-1])
        up = _Upload()
        g_node = np.concatenate([np.asarray(nodes, np.int64) for _, nodes in items])
        par = np.concatenate(
            [
                np.where(np.arange(d.num_nodes) == 0, 0, np.asarray(d.parents, np.int64))
                + node_off[k]
                for k, (d, _) in enumerate(items)
            ]
        )
        tok = np.concatenate([np.maximum(np.asarray(d.tokens, np.int64), 0) for d, _ in items])
        e_rows = np.concatenate([p.rows + row_off[k] for k, p in enumerate(plans)])
        e_local = np.concatenate([p.cov + node_off[k] for k, p in enumerate(plans)])
        e_cov = g_node[e_local]
        e_tnode = np.concatenate([p.tnode for p in plans])
        e_spec = np.concatenate([p.spec for p in plans])
        first_row = np.zeros(R, bool)
        first_row[row_off[:-1]] = True
        # the canonical encoding's end (the teacher log-likelihood of the text + EOS)
        canon_local = np.asarray([len(d.teacher_ids) for d, _ in items], np.int64) + node_off[:-1]
        h = {
            "g_node": up.add(g_node),
            "par": up.add(par),
            "tok": up.add(tok),
            "rows": up.add(e_rows),
            "local": up.add(e_local),
            "next": up.add(np.concatenate([p.next_ids for p in plans])),
            "first": up.add(first_row),
            "canon": up.add(canon_local),
        }
        blocks, _ = self._block_plans(
            R, e_rows, e_cov, e_tnode, e_spec, up, block_bytes=self._block_bytes(logp)
        )
        depth = max((p.depth for p in plans), default=0)
        # ---- device: no host synchronisation from here on
        dev = up.send(device)

        def get(name: str) -> torch.Tensor:
            a, b = h[name]
            return dev[a:b]

        rn = norms if norms is not None else row_norms(logp, adt)
        lse = rn.lse
        g, p_local = get("g_node"), get("par")
        is_root = p_local == torch.arange(len(g_node), device=device)
        step = logp[g[p_local], get("tok")].to(adt) - lse[g[p_local]]
        step = torch.where(is_root, torch.zeros_like(step), step)
        logw = _path_sums_device(p_local, step, depth)
        rows_t = get("rows")
        shift, w = _cover_weights(rows_t, logw[get("local")], R)
        vs = self.S.size
        k_eff = None if top_k is None else min(top_k, vs)
        res_ids = torch.empty((R, k_eff or 0), dtype=torch.int64, device=device)
        res_lp = torch.empty((R, k_eff or 0), dtype=adt, device=device)
        dense = torch.empty((R, vs), dtype=adt, device=device) if top_k is None else None
        cols = torch.zeros((R, 6), dtype=adt, device=device)  # see `PendingRows`
        tail, unmapped, total, target = cols[:, 0], cols[:, 1], cols[:, 2], cols[:, 3]
        next_ids = get("next")
        for r0, r1, logJ, share, tot in self._row_blocks(blocks, dev, w, rn, tz):
            total[r0:r1] = tot
            unmapped[r0:r1] = share
            target[r0:r1] = logJ.gather(1, next_ids[r0:r1, None]).squeeze(1)
            if dense is not None:
                dense[r0:r1] = logJ
            else:
                assert k_eff is not None
                vals, idx = torch.topk(logJ, k_eff, dim=1)
                res_ids[r0:r1] = idx
                res_lp[r0:r1] = vals
                tail[r0:r1] = (1.0 - torch.exp(vals).sum(1)).clamp_min(0.0)
        prefix_lp = shift + torch.log(total)
        cols[:, 4] = prefix_lp
        # Mass that reached row i but sits on teacher sequences that are not a prefix of
        # any canonical encoding (dropped invalid exact covers): 1 - carried / incoming.
        if R > 1:
            incoming = prefix_lp[:-1] + torch.log1p(-unmapped[:-1]) + target[:-1]
            nc = (-torch.expm1(prefix_lp[1:] - incoming)).clamp_min(0.0)
            cols[1:, 5] = torch.where(get("first")[1:].bool(), torch.zeros_like(nc), nc)
        canon = get("canon")
        teacher_lp = logw[canon] + (logp[g[canon], self.teacher_eos].to(adt) - lse[g[canon]])
        return PendingRows(
            [d for d, _ in items],
            row_off,
            top_k,
            {"ids": res_ids, "lp": res_lp, "cols": cols, "teacher": teacher_lp, "dense": dense},
        )

    def _rows(self, doc: PreparedDocument, logp: torch.Tensor, top_k: int | None) -> ScoredDocument:
        """Row phase for one document given teacher log-probs [num_nodes, V_T] per node."""
        nodes = np.arange(doc.num_nodes, dtype=np.int64)
        (out,) = self.rows_batch(logp, [(doc, nodes)], top_k).result()
        return out

    def _block_plans(
        self,
        n_rows: int,
        rows: np.ndarray,
        cov: np.ndarray,
        tnode: np.ndarray,
        spec: np.ndarray,
        up: _Upload | None = None,
        max_elems: int = 1 << 22,
        block_bytes: int | None = None,
    ) -> tuple[list[_BlockPlan], _Upload]:
        """Host plan of the row blocks of entries sorted by row (``rows``; ``cov``: the
        ``logp`` row of the cover; ``tnode``: the trie node; ``spec``: takes the
        specials): blocks bounded by the memory of their rows, and within a block the
        root entries (unique cover nodes) and chunks of the other entries whose
        flattened teacher-token ranges stay within ``max_elems``. Index arrays go to
        ``up``; entry ``e``'s weight is ``w[e]``. ``block_bytes``: `_block_bytes`."""
        up = up or _Upload()
        vs, vb = self.S.size, len(self.perm)
        per_cover = (vb + 1 + max(vs, vb)) * 8
        rows_per_block = max(1, (block_bytes or BLOCK_BYTES_CPU) // (per_cover * 3))
        lo_all, hi_all, dep_all = self.trie["lo"], self.trie["hi"], self.trie["depth"]
        out: list[_BlockPlan] = []
        for r0 in range(0, n_rows, rows_per_block):
            r1 = min(n_rows, r0 + rows_per_block)
            a, b = (int(x) for x in np.searchsorted(rows, [r0, r1]))
            blk = _BlockPlan(r0, r1, None, [])
            out.append(blk)
            if b == a:
                continue
            r, c, q, s = rows[a:b] - r0, cov[a:b], tnode[a:b], spec[a:b]
            root = np.flatnonzero(q == 0)
            if len(root):
                nodes, inv = np.unique(c[root], return_inverse=True)
                sp = root[s[root]]
                blk.root = _RootPlan(
                    up.add(r[root]),
                    up.add(nodes),
                    up.add(inv),
                    up.add(root + a),
                    up.add(r[sp]),
                    up.add(c[sp]),
                    up.add(sp + a),
                    len(sp),
                )
            pend = np.flatnonzero(q != 0)
            if not len(pend):
                continue
            qp = q[pend]
            lo, sizes = lo_all[qp], hi_all[qp] - lo_all[qp]
            ends = np.cumsum(sizes)
            start = 0
            while start < len(pend):
                limit = (ends[start - 1] if start else 0) + max_elems
                stop = max(start + 1, int(np.searchsorted(ends, limit, side="right")))
                sl = pend[start:stop]
                blk.chunks.append(
                    _ChunkPlan(
                        up.add(r[sl]),
                        up.add(c[sl]),
                        up.add(lo[start:stop]),
                        up.add(sizes[start:stop]),
                        up.add(dep_all[qp[start:stop]]),
                        up.add(sl + a),
                        stop - start,
                        int(sizes[start:stop].sum()),
                    )
                )
                start = stop
        return out, up

    def _row_blocks(
        self,
        blocks: Sequence[_BlockPlan],
        dev: torch.Tensor,
        w: torch.Tensor,
        rn: RowNorms,
        tz: dict[str, torch.Tensor],
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The rows of `_block_plans`' blocks (index arrays in ``dev``, the sent
        `_Upload`): yields ``(r0, r1, log-probs [r1-r0, V_S], unmapped share, total
        mass)`` (rows without entries: all ``-inf``, share 0, total 0). Device work only."""
        adt, device, vs = w.dtype, w.device, self.S.size
        for blk in blocks:
            n = blk.r1 - blk.r0
            J = torch.zeros((n, vs), dtype=adt, device=device)
            un = torch.zeros(n, dtype=adt, device=device)
            self._accumulate(J, un, rn, blk, dev, w, tz)
            J.clamp_min_(0.0)  # cumsum differences can be -1e-17 instead of 0
            mapped = J.sum(1)
            tot = mapped + un
            share = torch.where(tot > 0, un / tot, torch.zeros_like(tot))
            logJ = torch.log(J) - torch.log(mapped)[:, None]
            logJ = torch.where((mapped > 0)[:, None], logJ, torch.full_like(logJ, -math.inf))
            yield blk.r0, blk.r1, logJ, share, tot

    def _accumulate(
        self,
        J: torch.Tensor,
        un: torch.Tensor,
        rn: RowNorms,
        blk: _BlockPlan,
        dev: torch.Tensor,
        w: torch.Tensor,
        tz: dict[str, torch.Tensor],
    ) -> None:
        """Add every (row, cover, trie node) entry's mass of the block to its rows ``J``
        in place.

        An entry adds ``w * p_T(t | cover)`` for every teacher token ``t`` in the trie
        node's range to the column of ``t``'s next student token ``d(t)[depth]``. Sums
        are sums of positive terms (index_add), never differences of cumulative sums,
        so tiny probabilities keep their relative precision. Special tokens (EOS
        included) take mass only from entries flagged special: the exact cover that is
        the canonical encoding of the prefix as a complete text. Every size is known
        on the host (`_block_plans`): nothing here waits for the device.
        """

        def get(span: tuple[int, int]) -> torch.Tensor:
            return dev[span[0] : span[1]]

        adt = J.dtype
        vs = J.shape[1]
        norm = rn.norm
        nxt = tz["next_tok"]  # [V_b, K+1] student token after `depth` ones; -1 = none
        rt = blk.root
        if rt is not None:
            r, nodes, wr = get(rt.rows), get(rt.nodes), w[get(rt.widx)]
            # p_T(t | cover) = rn.expo(cover, t) / norm[cover]; mass per first student
            # token: bucket sums in the teacher's dtype, then columns in adt (specials
            # land in a spare column and are dropped)
            buckets = torch.zeros(
                (len(nodes), len(tz["bucket_col"])), dtype=rn.logp.dtype, device=J.device
            )
            buckets.index_add_(1, tz["bucket_by_id"], rn.expo(nodes))
            first = torch.zeros((len(nodes), vs + 1), dtype=adt, device=J.device)
            first.index_add_(1, tz["bucket_col"], buckets.to(adt))
            first = first[:, :vs] / norm[nodes, None]
            J.index_add_(0, r, wr[:, None] * first[get(rt.inv)])
            if rt.n_spec:
                r, c, wr = get(rt.spec_rows), get(rt.spec_nodes), w[get(rt.spec_widx)]
                if len(self.special_t):
                    J.index_put_(
                        (
                            r[:, None].expand(-1, len(self.special_s)),
                            tz["special_s"].expand(len(r), -1),
                        ),
                        wr[:, None] * rn.expo(c[:, None], tz["special_t"]).to(adt) / norm[c, None],
                        accumulate=True,
                    )
                if len(self.unmapped_t):
                    un.index_add_(
                        0, r, wr * rn.expo(c[:, None], tz["unmapped_t"]).to(adt).sum(1) / norm[c]
                    )
        for ch in blk.chunks:
            cnt = get(ch.sizes)
            rep = torch.repeat_interleave(
                torch.arange(ch.n, device=J.device), cnt, output_size=ch.total
            )
            offs = torch.cumsum(cnt, 0) - cnt
            pos = get(ch.lo)[rep] + (torch.arange(ch.total, device=J.device) - offs[rep])
            col = nxt[pos, get(ch.depth)[rep]]
            # -1: the node's own token ends here (an exact cover, not a next token);
            # its term is added as 0 to column 0 rather than filtered (no host wait)
            keep = col >= 0
            node = get(ch.nodes)[rep]
            vals = w[get(ch.widx)][rep] * rn.expo(node, tz["perm"][pos]).to(adt) / norm[node]
            J.index_put_(
                (get(ch.rows)[rep], col.clamp_min(0)),
                torch.where(keep, vals, torch.zeros_like(vals)),
                accumulate=True,
            )


class HostCopy:
    """Device tensors copied to the host without waiting for them: on CUDA into pinned
    memory, asynchronously, with an event that `get` waits on (once); elsewhere the
    tensors themselves."""

    def __init__(self, dev: dict[str, torch.Tensor | None]) -> None:
        cuda = any(t is not None and t.device.type == "cuda" for t in dev.values())
        self._host: dict[str, torch.Tensor | None] = {}
        for k, t in dev.items():
            if t is not None and cuda:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                buf.copy_(t, non_blocking=True)
                t = buf
            self._host[k] = t
        self._event: Any = None
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def get(self) -> dict[str, np.ndarray | None]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return {k: (None if t is None else t.numpy()) for k, t in self._host.items()}


class PendingRows:
    """The outputs of `SubsetExactScorer.rows_batch` while the device computes them;
    `result` waits (once) and returns the `ScoredDocument`s in input order."""

    def __init__(
        self,
        docs: list[PreparedDocument],
        row_off: np.ndarray,
        top_k: int | None,
        dev: dict[str, torch.Tensor | None],
    ) -> None:
        self.docs, self.row_off, self.top_k = docs, row_off, top_k
        self._copy = HostCopy(dev)

    def result(self) -> list[ScoredDocument]:
        h = self._copy.get()
        cols = h["cols"]
        assert cols is not None and h["teacher"] is not None
        out = []
        for k, doc in enumerate(self.docs):
            a, b = int(self.row_off[k]), int(self.row_off[k + 1])
            L = b - a - 1
            sl = slice(a, b)
            out.append(
                ScoredDocument(
                    text=doc.text,
                    student_ids=np.asarray(doc.student_ids, dtype=np.int64),
                    teacher_ids=np.asarray(doc.teacher_ids, dtype=np.int64),
                    topk_ids=None if self.top_k is None else h["ids"][sl],  # type: ignore[index]
                    topk_logprobs=None if self.top_k is None else h["lp"][sl],  # type: ignore[index]
                    logprobs=None if h["dense"] is None else h["dense"][sl],
                    tail_mass=cols[sl, 0].copy(),
                    target_logprobs=cols[sl, 3].copy(),
                    unmapped_mass=cols[sl, 1].copy(),
                    unaccounted_mass=np.zeros(L + 1),
                    noncanonical_mass=cols[sl, 5].copy(),
                    regime=np.full(L + 1, int(Regime.EXACT), dtype=np.uint8),
                    prefix_logprob=cols[sl, 4].copy(),
                    stats={
                        # log P_T(canonical encoding + EOS), from the same forward as the rows
                        "teacher_logprob": float(h["teacher"][k]),
                        "teacher_nodes": doc.num_nodes,
                        "canonical_tokens": len(doc.teacher_ids),
                        "exact_covers": sum(len(c) for c in doc.covers),
                        **doc.stats,
                    },
                )
            )
        return out


@dataclass
class RowNorms:
    """Teacher rows renormalised: ``p_T(t | v) = exp(logp[v, t] - shift[v]) / norm[v]``
    (`expo` gives the numerators of any gathered entries; ``lse = log(norm) + shift``).
    ``table``: all numerators at once ([nodes, V], as much memory as ``logp``), kept
    on the CPU where memory is plentiful and an exp costs more than the memory;
    elsewhere each gather takes its own exp."""

    logp: torch.Tensor
    shift: torch.Tensor  # logp's dtype, [nodes]
    norm: torch.Tensor  # accumulation dtype, [nodes]
    lse: torch.Tensor
    table: torch.Tensor | None = None

    def expo(self, nodes: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """``exp(logp - shift)`` at rows ``nodes`` (all columns) or at ``(nodes, cols)``
        (broadcast)."""
        if self.table is not None:
            return self.table[nodes] if cols is None else self.table[nodes, cols]
        if cols is None:
            return torch.sub(self.logp[nodes], self.shift[nodes, None]).exp_()
        return torch.sub(self.logp[nodes, cols], self.shift[nodes]).exp_()


def row_norms(
    x: torch.Tensor,
    dtype: torch.dtype,
    *,
    table: bool | None = None,
    slice_bytes: int = 64 * 2**20,
) -> RowNorms:
    """`RowNorms` of rows of log-probabilities ``x`` [nodes, V].

    Each row is renormalised to sum to 1 (a float32 log-softmax over 10^5 ids may drift
    by ~1e-5, which would bias every row). The shift is 0 for a row of proper
    log-probabilities (its max in (-80, 0]: the sum can neither overflow nor underflow;
    then the numerators are ``exp(x)`` bit for bit) and the row max otherwise (e.g. raw
    logits), decided per row on the device (no host synchronisation). ``table``: keep
    all numerators (default: on the CPU); otherwise the exps are summed in slices of at
    most ``slice_bytes`` and never held for all rows.
    """
    n, v = x.shape
    keep = table if table is not None else x.device.type == "cpu"
    if keep and x.device.type == "cpu":  # waiting costs nothing here: skip the max pass
        e = torch.exp(x)
        norm = e.sum(1).to(dtype)
        if bool(torch.all(torch.isfinite(norm) & (norm > 0))):
            return RowNorms(x, x.new_zeros(n), norm, torch.log(norm), e)
    m = x.max(dim=1).values if n else x.new_zeros(0)
    proper = (m <= 0) & (m > -80)
    m = torch.where(proper | ~torch.isfinite(m), torch.zeros_like(m), m)
    if keep:
        e = torch.sub(x, m[:, None]).exp_()
        norm = e.sum(1).to(dtype)  # cascade summation: ~1e-7 relative in float32
        return RowNorms(x, m, norm, torch.log(norm) + m.to(dtype), e)
    norm = torch.empty(n, dtype=dtype, device=x.device)
    step = max(1, slice_bytes // (4 * max(v, 1)))
    for a in range(0, n, step):
        e = torch.sub(x[a : a + step], m[a : a + step, None]).exp_()
        norm[a : a + step] = e.sum(1)
    return RowNorms(x, m, norm, torch.log(norm) + m.to(dtype))
