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
from pipeline.scoring.trees import _batches, merge_context_trees, teacher_tree_logprobs
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
) -> Iterator[list[tuple[torch.Tensor, list[tuple[int, list[int]]]]]]:
    """The teacher calls of `score_prepared_shared` / `dense_rows_shared`: the
    documents' trees merged (`merge_context_trees`) within ``max_tree_nodes``, sent in
    calls of at most ``max_batch_nodes`` nodes. Yields per call, per tree, its log-probs
    and its documents as (index, tree node of each local node); fills ``stats``
    (``teacher_contexts``, ``teacher_calls``, ``trees``)."""
    mbt = int(getattr(teacher, "max_batch_tokens", 1024))
    n_start = len(getattr(teacher, "start_ids", [0]))
    cap = max_tree_nodes or max(2, mbt - n_start + 1)
    budget = max_batch_nodes or 4 * mbt
    trees, where = merge_context_trees(prepared, cap)
    docs_of: list[list[tuple[int, list[int]]]] = [[] for _ in trees]
    for i, (k, nodes) in enumerate(where):
        docs_of[k].append((i, nodes))
    stats.update(teacher_contexts=0, teacher_calls=0, trees=len(trees))
    for batch in _batches([len(t[0]) for t in trees], budget):
        logps = teacher_tree_logprobs(teacher, [trees[k] for k in batch])
        stats["teacher_contexts"] += sum(len(trees[k][0]) for k in batch)
        stats["teacher_calls"] += 1
        yield [(lp, docs_of[k]) for k, lp in zip(batch, logps, strict=True)]
        del logps


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
        max_block_bytes: memory budget of one block of rows in the row phase.

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
        max_block_bytes: int = 256 * 2**20,
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
        return PreparedDocument(
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
            logps = teacher_tree_logprobs(teacher, [prepared[b].tree() for b in batch])
            for b, lp in zip(batch, logps, strict=True):
                out[b] = self._rows(prepared[b], lp[len(prepared[b].context) :], top_k)
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
        for call in _shared_calls(teacher, prepared, max_tree_nodes, max_batch_nodes, stats):
            for lp, docs in call:
                for i, nodes in docs:
                    idx = torch.as_tensor(nodes, device=lp.device)
                    out[i] = self._rows(prepared[i], lp[idx], top_k)
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
        for call in _shared_calls(teacher, prepared, max_tree_nodes, max_batch_nodes, stats):
            offsets = np.cumsum([0, *(len(lp) for lp, _ in call)])
            lp_all = (
                torch.cat([torch.as_tensor(lp) for lp, _ in call]) if len(call) > 1 else call[0][0]
            )
            items = [
                (i, offsets[b] + np.asarray(nodes, dtype=np.int64))
                for b, (_, docs) in enumerate(call)
                for i, nodes in docs
            ]
            got = self._dense_rows(
                torch.as_tensor(lp_all),
                [(prepared[i], nodes, list(wanted[i])) for i, nodes in items],
            )
            for (i, _), (pr, un) in zip(items, got, strict=True):
                probs[i], unmapped[i] = pr, un
            del lp_all
        return probs, unmapped, stats

    def _dense_rows(
        self, logp: torch.Tensor, items: Sequence[tuple[PreparedDocument, np.ndarray, list[int]]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Row phase of `dense_rows_shared` for documents whose tree nodes are rows of
        ``logp`` (``items``: document, node of each local node, wanted rows)."""
        device = logp.device
        adt = self.accum_dtype
        tz = self._tensors(device)
        vt = self.T.size
        if logp.shape[1] < vt:
            raise ValueError(f"teacher returned {logp.shape[1]} columns, tokenizer has {vt} ids")
        logp = logp[:, :vt]
        expo, norm, lse = normalized_exp(logp, adt)
        # path log-weights per document (relative to its local root), as in `_rows`
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
            rows_t = torch.as_tensor(rows, device=device)
            cov_t = torch.as_tensor(cov, device=device)
            tnode_t = torch.as_tensor(tnode, device=device)
            spec_t = torch.as_tensor(spec, dtype=torch.bool, device=device)
            lw = torch.as_tensor(lws, dtype=adt, device=device)
            _, w = _cover_weights(rows_t, lw, n_out)
            for r0, r1, logJ, share, _ in self._row_blocks(
                n_out, rows_t, cov_t, tnode_t, spec_t, w, expo, norm, tz
            ):
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
        """The entries of the row phase (`_rows`, `_dense_rows`) from the exact covers at
        student positions ``first..last``: every cover ``e`` at position ``j`` adds to rows
        ``i = j, j + 1, ...`` through the decomposition-trie node ``q`` of
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

    def _rows(self, doc: PreparedDocument, logp: torch.Tensor, top_k: int | None) -> ScoredDocument:
        """Row phase for one document given teacher log-probs [num_nodes, V_T] per node."""
        device = logp.device
        adt = self.accum_dtype
        tz = self._tensors(device)
        vt = self.T.size
        if logp.shape[1] < vt:
            raise ValueError(f"teacher returned {logp.shape[1]} columns, tokenizer has {vt} ids")
        logp = logp[:, :vt]
        S = doc.student_ids
        L = len(S)
        n = doc.num_nodes
        tokens = torch.as_tensor(doc.tokens, device=device)
        parents = torch.as_tensor(doc.parents, device=device)
        # path log-weights w_E = log P_T(E): parents precede children, so one pass.
        # Renormalise every context in the accumulation dtype: a float32 log-softmax over
        # 50k-150k ids sums to 1 only within ~1e-5, which would bias every row.
        expo, norm, lse = normalized_exp(logp, adt)
        step = torch.zeros(n, dtype=adt, device=device)
        if n > 1:
            step[1:] = logp[parents[1:], tokens[1:]].to(adt) - lse[parents[1:]]
        logw_np = _path_sums(doc.parents, step.cpu().numpy()[1:])

        rows, cov, tnode, spec = [], [], [], []
        for i, q, e, sp in self._cover_walks(doc, 0, L):
            rows.append(i)
            cov.append(e)
            tnode.append(q)
            spec.append(sp)
        rows_t = torch.as_tensor(rows, device=device)
        cov_t = torch.as_tensor(cov, device=device)
        tnode_t = torch.as_tensor(tnode, device=device)
        spec_t = torch.as_tensor(spec, dtype=torch.bool, device=device)
        logw = torch.as_tensor(logw_np, dtype=adt, device=device)
        shift, w = _cover_weights(rows_t, logw[cov_t], L + 1)

        vs = self.S.size
        k_eff = None if top_k is None else min(top_k, vs)
        res_ids = torch.empty((L + 1, k_eff or 0), dtype=torch.int64, device=device)
        res_lp = torch.empty((L + 1, k_eff or 0), dtype=adt, device=device)
        dense = torch.empty((L + 1, vs), dtype=adt, device=device) if top_k is None else None
        tail = torch.zeros(L + 1, dtype=adt, device=device)
        unmapped = torch.zeros(L + 1, dtype=adt, device=device)
        total = torch.zeros(L + 1, dtype=adt, device=device)
        target = torch.empty(L + 1, dtype=adt, device=device)
        next_ids = torch.as_tensor([*S, self.student_eos], device=device)

        for r0, r1, logJ, share, tot in self._row_blocks(
            L + 1, rows_t, cov_t, tnode_t, spec_t, w, expo, norm, tz
        ):
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
        # Mass that reached row i but sits on teacher sequences that are not a prefix of any
        # canonical encoding (dropped invalid exact covers): 1 - carried / incoming.
        noncanon = torch.zeros(L + 1, dtype=adt, device=device)
        if L:
            incoming = prefix_lp[:-1] + torch.log1p(-unmapped[:-1]) + target[:-1]
            noncanon[1:] = (-torch.expm1(prefix_lp[1:] - incoming)).clamp_min(0.0)
        return ScoredDocument(
            text=doc.text,
            student_ids=np.asarray(S, dtype=np.int64),
            teacher_ids=np.asarray(doc.teacher_ids, dtype=np.int64),
            topk_ids=None if top_k is None else res_ids.cpu().numpy(),
            topk_logprobs=None if top_k is None else res_lp.cpu().numpy(),
            logprobs=None if dense is None else dense.cpu().numpy(),
            tail_mass=tail.cpu().numpy(),
            target_logprobs=target.cpu().numpy(),
            unmapped_mass=unmapped.cpu().numpy(),
            unaccounted_mass=np.zeros(L + 1),
            noncanonical_mass=noncanon.cpu().numpy(),
            regime=np.full(L + 1, int(Regime.EXACT), dtype=np.uint8),
            prefix_logprob=prefix_lp.cpu().numpy(),
            stats={
                # log P_T(canonical encoding + EOS), from the same forward as the rows
                "teacher_logprob": float(
                    logw_np[len(doc.teacher_ids)]
                    + float(
                        logp[len(doc.teacher_ids), self.teacher_eos].to(adt)
                        - lse[len(doc.teacher_ids)]
                    )
                ),
                "teacher_nodes": n,
                "canonical_tokens": len(doc.teacher_ids),
                "exact_covers": sum(len(c) for c in doc.covers),
                **doc.stats,
            },
        )

    def _row_blocks(
        self,
        n_rows: int,
        rows_t: torch.Tensor,
        cov_t: torch.Tensor,
        tnode_t: torch.Tensor,
        spec_t: torch.Tensor,
        w: torch.Tensor,
        expo: torch.Tensor,
        norm: torch.Tensor,
        tz: dict[str, torch.Tensor],
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Rows ``0..n_rows-1`` from their (row, cover node, trie node, special, weight)
        entries, in blocks bounded by the memory of the cumulative sums they need:
        yields ``(r0, r1, log-probs [r1-r0, V_S], unmapped share, total mass)`` (rows
        without entries: all ``-inf``, share 0, total 0)."""
        adt, device, vs = w.dtype, w.device, self.S.size
        vb = len(self.perm)
        per_cover = (vb + 1 + max(vs, vb)) * 8
        rows_per_block = max(1, self.max_block_bytes // (per_cover * 3))
        order = torch.argsort(rows_t, stable=True)
        rows_sorted = rows_t[order]
        for r0 in range(0, n_rows, rows_per_block):
            r1 = min(n_rows, r0 + rows_per_block)
            a = int(torch.searchsorted(rows_sorted, r0))
            b = int(torch.searchsorted(rows_sorted, r1))
            sel = order[a:b]
            J = torch.zeros((r1 - r0, vs), dtype=adt, device=device)
            un = torch.zeros(r1 - r0, dtype=adt, device=device)
            if b > a:
                self._accumulate(
                    J,
                    un,
                    expo,
                    norm,
                    rows_t[sel] - r0,
                    cov_t[sel],
                    tnode_t[sel],
                    spec_t[sel],
                    w[sel],
                    tz,
                )
            J.clamp_min_(0.0)  # cumsum differences can be -1e-17 instead of 0
            mapped = J.sum(1)
            tot = mapped + un
            share = torch.where(tot > 0, un / tot, torch.zeros_like(tot))
            logJ = torch.log(J) - torch.log(mapped)[:, None]
            logJ = torch.where((mapped > 0)[:, None], logJ, torch.full_like(logJ, -math.inf))
            yield r0, r1, logJ, share, tot

    def _accumulate(
        self,
        J: torch.Tensor,
        un: torch.Tensor,
        expo: torch.Tensor,
        norm: torch.Tensor,
        rows: torch.Tensor,
        cov: torch.Tensor,
        tnode: torch.Tensor,
        spec: torch.Tensor,
        w: torch.Tensor,
        tz: dict[str, torch.Tensor],
        max_elems: int = 1 << 22,
    ) -> None:
        """Add every (row, cover, trie node) triple's mass to the rows ``J`` in place.

        A triple adds ``w * p_T(t | cover)`` for every teacher token ``t`` in the trie
        node's range to the column of ``t``'s next student token ``d(t)[depth]``. Sums
        are sums of positive terms (index_add), never differences of cumulative sums,
        so tiny probabilities keep their relative precision. Special tokens (EOS
        included) take mass only from triples flagged ``spec``: the exact cover that is
        the canonical encoding of the prefix as a complete text.
        """
        adt = J.dtype
        vs = J.shape[1]
        ucov, inv = torch.unique(cov, return_inverse=True)
        # p_T(t | cover) = expo[cover, t] / norm[cover]; never materialised in full
        nxt = tz["next_tok"]  # [V_b, K+1] student token after `depth` ones; -1 = none
        at_root = tnode == 0
        if bool(at_root.any()):
            r, ci, wr = rows[at_root], inv[at_root], w[at_root]
            uroot, rinv = torch.unique(ci, return_inverse=True)
            # mass per first student token: bucket sums in the teacher's dtype, then
            # columns in adt (specials land in a spare column and are dropped)
            nodes = ucov[uroot]
            buckets = torch.zeros(
                (len(uroot), len(tz["bucket_col"])), dtype=expo.dtype, device=J.device
            )
            buckets.index_add_(1, tz["bucket_by_id"], expo[nodes])
            first = torch.zeros((len(uroot), vs + 1), dtype=adt, device=J.device)
            first.index_add_(1, tz["bucket_col"], buckets.to(adt))
            first = first[:, :vs] / norm[nodes, None]
            J.index_add_(0, r, wr[:, None] * first[rinv])
            sp = spec[at_root]
            r, ci, wr = r[sp], ci[sp], wr[sp]
            if len(tz["special_t"]):
                J.index_put_(
                    (
                        r[:, None].expand(-1, len(tz["special_s"])),
                        tz["special_s"].expand(len(r), -1),
                    ),
                    wr[:, None]
                    * expo[ucov[ci][:, None], tz["special_t"]].to(adt)
                    / norm[ucov[ci], None],
                    accumulate=True,
                )
            if len(tz["unmapped_t"]):
                un.index_add_(
                    0,
                    r,
                    wr * expo[ucov[ci][:, None], tz["unmapped_t"]].to(adt).sum(1) / norm[ucov[ci]],
                )
        pend = torch.nonzero(~at_root).squeeze(1)
        if len(pend) == 0:
            return
        q = tnode[pend]
        lo, hi, depth = tz["lo"][q], tz["hi"][q], tz["depth"][q]
        sizes = hi - lo
        ends = torch.cumsum(sizes, 0)
        # chunks of triples whose flattened ranges stay within max_elems
        start = 0
        while start < len(pend):
            limit = (ends[start - 1] if start else 0) + max_elems
            stop = max(start + 1, int(torch.searchsorted(ends, limit, right=True)))
            sl = slice(start, stop)
            cnt = sizes[sl]
            rep = torch.repeat_interleave(torch.arange(stop - start, device=J.device), cnt)
            offs = torch.cumsum(cnt, 0) - cnt
            pos = lo[sl][rep] + (torch.arange(len(rep), device=J.device) - offs[rep])
            col = nxt[pos, depth[sl][rep]]
            keep = (
                col >= 0
            )  # the node's own token (if any) ends here: an exact cover, not a next token
            node = cov[pend[sl]][rep]
            vals = w[pend[sl]][rep] * expo[node, tz["perm"][pos]].to(adt) / norm[node]
            J.index_put_((rows[pend[sl]][rep][keep], col[keep]), vals[keep], accumulate=True)
            start = stop


def normalized_exp(
    x: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows of log-probabilities ``x``: ``(exp(x - m), row sums, logsumexp)``.

    ``expo / norm`` is each row renormalised to sum to 1 (a float32 log-softmax over
    10^5 ids may drift by ~1e-5, which would bias every row). ``m`` is 0 for proper
    log-probabilities and the row max otherwise (e.g. raw logits).
    """
    expo = torch.exp(x)
    norm = expo.sum(dim=1).to(dtype)  # cascade summation: ~1e-7 relative in float32
    if bool(torch.all(torch.isfinite(norm) & (norm > 0))):
        return expo, norm, torch.log(norm)
    m = x.max(dim=1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    expo = torch.exp(x - m)
    norm = expo.sum(dim=1).to(dtype)
    return expo, norm, torch.log(norm) + m.squeeze(1).to(dtype)
