"""The teacher's exact next-byte distributions (`ByteModel`), which the general
scorer's byte walk (``walk="bytes"``, the reference walk) enumerates continuations with;
see `pipeline.scoring.general` for the walk. Rows come from the subset-exact scorer with
the teacher's own byte base as student (``truncate_merges(T, 0)``), computed locally
from the last boundary no teacher token crosses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.scoring.common import ScoredDocument
from pipeline.scoring.protocol import Teacher
from pipeline.scoring.student_view import KNOWN_PATTERNS, _flatten, _utf8_split
from pipeline.scoring.subset import PreparedDocument, SubsetExactScorer
from pipeline.scoring.unicode import _codepoint_range, completion_representatives
from pipeline.tokenization import (
    ByteLevelBPE,
    TokenizerError,
    UnscorableTextError,
    load_tokenizer,
    truncate_merges,
)

# Columns of a byte-model row: bytes 0..255, end of text, teacher specials other than
# end of text (mass the student cannot see).
EOS_COL = 256
UNMAPPED_COL = 257
ROW_WIDTH = 258


def _completions(p: bytes) -> Iterator[str]:
    """Valid texts whose UTF-8 starts with ``p`` (``p`` itself when it is valid):
    one character per regex class first, then other completing characters."""
    split = _utf8_split(p)
    if split is None:
        return
    text, partial = split
    if not partial:
        yield text
        return
    reps = completion_representatives(partial)
    yield from (text + ch for ch in reps)
    rng = _codepoint_range(partial)
    if rng is not None:
        for cp in range(rng[0], min(rng[1], rng[0] + 512) + 1):
            ch = chr(cp)
            if ch not in reps and not 0xD800 <= cp <= 0xDFFF:
                yield text + ch


class ByteModel:
    """The teacher's exact next-byte distributions, cached by byte prefix.

    ``row(prefix)`` is a float64 array ``[258]``: P(next byte = b | the text starts
    with ``prefix``) for b in 0..255, then P(the text ends here), then the mass on
    teacher specials other than end of text. It sums to 1 (to 0 for a prefix the
    teacher never produces). Rows depend on the teacher: `reset` between teachers.

    Local rows (``local=True``). The row after a prefix ``y`` of a text ``t`` is the
    subset scorer's row at byte ``len(y)`` of ``t``. It is computed from the LAST byte
    boundary ``b < len(y)`` of ``t`` such that (`local_boundary`):

    - ``b`` starts a teacher pre-token of ``t`` and the character before it is not
      whitespace. With the GPT-2 / Qwen2 / Llama-3 regexes (no look-behind; the only
      look-ahead is ``\\s+(?!\\S)``, which needs whitespace before ``b``), the pieces
      of ``t`` are then those of ``t[:b]`` followed by those of ``t[b:]``: the
      canonical encoding of ``t`` is ``canonical(t[:b]) + canonical(t[b:])``, and
      every exact cover the scorer keeps at a byte ``>= b`` is ``canonical(t[:b])``
      followed by a cover of the local text (its windows start at or after ``b``);
    - no teacher token crosses ``b``: for no ``j < b`` is ``t[j:b+1]`` a proper prefix
      of a teacher token's bytes. So no cover from before ``b`` reaches a row
      ``> b``, not even a non-canonical one (which carries mass with a real teacher).

    Rows at bytes ``b + 1 .. len(t)`` are then computed from ``t[b:]`` with
    ``canonical(t[:b])`` as teacher context (`SubsetExactScorer.prepare` with
    ``context``): the same covers, the same teacher contexts, weights differing only by
    the common factor ``P_T(canonical(t[:b]))``, which the row normalisation cancels.
    No look-ahead past ``b`` is needed because the rows are those of the concrete
    text ``t``, exactly as the whole-text path computes them. ``b = 0`` (empty context)
    is the whole-text path; it is used when the teacher's pre-tokenizer is not one of
    those layouts (or the text holds an added token, or normalization is not stable
    on the local text). All local texts of one `ensure` call go to the teacher as merged
    prefix trees (`SubsetExactScorer.score_prepared_shared`): one teacher call per
    enumeration level while it fits ``max_batch_nodes``.

    Args:
        teacher_tokenizer: the teacher's byte-level BPE (any form `load_tokenizer` takes).
        eos_token: content of the teacher's end-of-text token (default: the first of
            ``DOC_END_TOKENS`` it has).
        local: compute rows from the last local boundary (False: from the start of
            the text, the reference path).
        max_tree_nodes, max_batch_nodes: see `SubsetExactScorer.score_prepared_shared`.
    """

    def __init__(
        self,
        teacher_tokenizer: Any,
        eos_token: str | None = None,
        *,
        local: bool = True,
        max_tree_nodes: int | None = None,
        max_batch_nodes: int | None = None,
    ) -> None:
        tok = load_tokenizer(teacher_tokenizer)
        model = json.loads(tok.to_str()).get("model") or {}
        if not model.get("vocab"):
            raise TokenizerError("teacher tokenizer has an empty vocabulary")
        self.scorer = SubsetExactScorer(tok, truncate_merges(tok, 0), eos_token=eos_token)
        self.eos_token = self.scorer.eos_token
        self.max_tree_nodes = max_tree_nodes
        self.max_batch_nodes = max_batch_nodes
        S = self.scorer.S
        col = np.full(S.size, UNMAPPED_COL, dtype=np.int64)
        for i in range(S.size):
            if i == self.scorer.student_eos:
                col[i] = EOS_COL
            elif i not in S.added_ids:
                b = S.token_bytes.get(i)
                if b is None or len(b) != 1:
                    raise TokenizerError(f"teacher byte symbol id {i} is not one byte: {b!r}")
                col[i] = b[0]
        # [V_bytes, 258] 0/1 matrix: byte-student columns -> byte-model columns
        self._to_row = np.zeros((S.size, ROW_WIDTH))
        self._to_row[np.arange(S.size), col] = 1.0
        T = self.scorer.T
        self.local = local and _local_pretokenizer(T)
        # proper prefixes of teacher token bytes (the crossing test of `local_boundary`)
        self._proper: set[bytes] = set()
        self._max_token = 1
        if self.local:
            for t in self.scorer.decomp:
                tb = T.token_bytes[t]
                self._max_token = max(self._max_token, len(tb))
                self._proper.update(tb[:k] for k in range(1, len(tb)))
        self.reset()

    def reset(self) -> None:
        """Forget cached rows and counters."""
        self.rows: dict[bytes, np.ndarray] = {}
        self.stats = {
            "texts_scored": 0,
            "teacher_contexts": 0,
            "batches": 0,
            "local_texts": 0,  # texts scored after a non-empty context
            "local_bytes": 0,  # bytes of the texts scored (local part only)
        }
        self._contexts: dict[bytes, list[int]] = {}
        self._teacher: Any = None

    def bind(self, teacher: Teacher) -> None:
        """Use ``teacher`` from now on; cached rows survive only for the same object."""
        if teacher is not self._teacher:
            self.reset()
            self._teacher = teacher

    def prepare_texts(self, teacher: Teacher, texts: Sequence[str]) -> list[PreparedDocument]:
        """Tokenizer phase of whole texts (raises `UnscorableTextError` for a text the
        teacher cannot encode); makes the rows of all their prefixes available."""
        prepared = [self.scorer.prepare(t) for t in texts]
        todo = {p.text: p for p in prepared if p.text.encode("utf-8") not in self.rows}
        if todo:
            self._score(teacher, list(todo.values()))
        return prepared

    def ensure(self, teacher: Teacher, prefixes: Iterable[bytes], closed: bool = False) -> None:
        """Make ``row(p)`` available for every ``p`` (one batched teacher call while the
        trees fit ``max_batch_nodes``). ``closed``: also for every prefix of every ``p``
        (what `log_prefix` needs)."""
        want = set(prefixes)
        if closed:
            want = {p[:j] for p in want for j in range(len(p) + 1)}
        missing = sorted(p for p in want if p not in self.rows)
        if not missing:
            return
        if not self.local:
            self._ensure_whole(teacher, missing)
            return
        # In sorted order, a prefix of another missing prefix is a prefix of the next one:
        # the text chosen for the longest serves the shorter ones down to its boundary.
        jobs: list[tuple[bytes, int, PreparedDocument]] = []  # (text bytes, boundary, doc)
        for p in reversed(missing):
            if jobs:
                tb, b, _ = jobs[-1]
                if tb.startswith(p) and len(p) >= b + (b > 0):
                    continue
            jobs.append(self._local_job(p))
        self._score_local(teacher, jobs)

    def _ensure_whole(self, teacher: Teacher, missing: list[bytes]) -> None:
        """The reference path: every row from a text scored from its start, one tree per
        text (`SubsetExactScorer.score_prepared`)."""
        prepared: dict[str, PreparedDocument] = {}
        for k, p in enumerate(missing):
            # In sorted order, a prefix of another missing prefix is a prefix of the next one,
            # whose text gives its row too.
            if k + 1 < len(missing) and missing[k + 1].startswith(p):
                continue
            for text in _completions(p):
                if text in prepared:
                    break
                try:
                    prep = self.scorer.prepare(text)
                except UnscorableTextError:
                    continue
                if prep.text.encode("utf-8").startswith(p):  # normalization kept the bytes
                    prepared[text] = prep
                    break
            else:
                raise UnscorableTextError(
                    f"no text the teacher can encode starts with the bytes {p[-12:]!r} "
                    "(needed for a next-byte distribution)"
                )
        if prepared:
            self._score(teacher, list(prepared.values()))

    def _local_job(self, p: bytes) -> tuple[bytes, int, PreparedDocument]:
        """A text starting with ``p``, its local boundary ``b < len(p)`` (0: none) and
        the prepared local text (``b``: onwards, with the context before it)."""
        for text in _completions(p):
            norm = self.scorer.T.normalize(text)
            tb = norm.encode("utf-8")
            if not tb.startswith(p):  # normalization changed the bytes
                continue
            b = self.local_boundary(norm, len(p) - 1)
            try:
                if b > 0:
                    local = tb[b:].decode("utf-8")
                    prep = self.scorer.prepare(local, context=self._context(tb[:b]))
                    if prep.text == local:
                        return tb, b, prep
                return tb, 0, self.scorer.prepare(text)
            except UnscorableTextError:
                continue
        raise UnscorableTextError(
            f"no text the teacher can encode starts with the bytes {p[-12:]!r} "
            "(needed for a next-byte distribution)"
        )

    def _context(self, head: bytes) -> list[int]:
        """Canonical teacher ids of the text ``head`` (cached)."""
        ids = self._contexts.get(head)
        if ids is None:
            ids = self.scorer.T.encode_exact(head.decode("utf-8"))
            self._contexts[head] = ids
        return ids

    def local_boundary(self, text: str, limit: int) -> int:
        """The largest byte offset ``b <= limit`` of ``text`` (normalized) from which rows
        past ``b`` can be computed locally (see the class docstring); 0 if none."""
        if not self.local or limit < 1:
            return 0
        T = self.scorer.T
        if T.added and len(T.split_added(text)) != 1:
            return 0
        tb = text.encode("utf-8")
        starts = [0]
        for piece in T.pretokenize(text):
            starts.append(starts[-1] + len(piece))  # byte-level pieces: 1 char per byte
        for b in reversed(starts[:-1]):
            if b > limit:
                continue
            if b == 0:
                break
            k = b - 1
            while k > 0 and tb[k] & 0xC0 == 0x80:
                k -= 1
            if tb[k:b].decode("utf-8").isspace():
                continue
            if any(
                tb[j : b + 1] in self._proper for j in range(max(0, b + 2 - self._max_token), b)
            ):
                continue
            return b
        return 0

    def row(self, prefix: bytes) -> np.ndarray:
        return self.rows[prefix]

    def log_prefix(self, prefix: bytes) -> float:
        """log P(the text starts with ``prefix``); the rows of its prefixes must be cached
        (`ensure` with ``closed=True``)."""
        total = 0.0
        for j in range(len(prefix)):
            p = float(self.rows[prefix[:j]][prefix[j]])
            if p <= 0.0:
                return -math.inf
            total += math.log(p)
        return total

    def _byte_rows(self, doc: ScoredDocument) -> np.ndarray:
        assert doc.logprobs is not None
        probs = np.exp(doc.logprobs) * (1.0 - doc.unmapped_mass)[:, None]
        rows = probs @ self._to_row
        rows[:, UNMAPPED_COL] += doc.unmapped_mass
        return rows

    def _score(self, teacher: Teacher, prepared: list[PreparedDocument]) -> list[ScoredDocument]:
        self.stats["texts_scored"] += len(prepared)
        self.stats["teacher_contexts"] += sum(p.tree_size for p in prepared)
        self.stats["batches"] += 1
        self.stats["local_bytes"] += sum(len(p.text.encode("utf-8")) for p in prepared)
        docs = self.scorer.score_prepared(teacher, prepared, top_k=None)
        for doc in docs:
            b = doc.text.encode("utf-8")
            assert len(doc.student_ids) == len(b)
            rows = self._byte_rows(doc)
            # The cache stays prefix-closed: stop at the first prefix already cached.
            for j in range(len(b), -1, -1):
                if b[:j] in self.rows:
                    break
                self.rows[b[:j]] = rows[j]
        return docs

    def _score_local(
        self, teacher: Teacher, jobs: list[tuple[bytes, int, PreparedDocument]]
    ) -> None:
        # rows at bytes b+1.. of each text (all of them for b = 0), each computed once
        claimed: set[bytes] = set()
        wanted: list[list[int]] = []
        for tb, b, _ in jobs:
            want = []
            for j in range(b + (b > 0), len(tb) + 1):
                if tb[:j] not in self.rows and tb[:j] not in claimed:
                    claimed.add(tb[:j])
                    want.append(j - b)
            wanted.append(want)
        probs, unmapped, st = self.scorer.dense_rows_shared(
            teacher,
            [prep for _, _, prep in jobs],
            wanted,
            max_tree_nodes=self.max_tree_nodes,
            max_batch_nodes=self.max_batch_nodes,
        )
        self.stats["texts_scored"] += len(jobs)
        self.stats["teacher_contexts"] += st["teacher_contexts"]
        self.stats["batches"] += st["teacher_calls"]
        self.stats["local_texts"] += sum(b > 0 for _, b, _ in jobs)
        for (tb, b, prep), want, pr, un in zip(jobs, wanted, probs, unmapped, strict=True):
            self.stats["local_bytes"] += len(tb) - b
            assert len(prep.student_ids) == len(tb) - b
            rows = pr @ self._to_row
            rows[:, UNMAPPED_COL] += un
            for k, j in enumerate(want):
                self.rows[tb[: b + j]] = rows[k]


def _local_pretokenizer(T: ByteLevelBPE) -> bool:
    """Whether the teacher's pre-tokenizer splits a text at a pre-token start that
    follows a non-whitespace character into the pieces of the two parts (see
    `ByteModel`): ByteLevel with its GPT-2 regex, or Split with a known regex followed
    by ByteLevel without regex, no prefix space either way."""
    steps = _flatten(T.component("pre_tokenizer"), "pretokenizers")
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"]:
        bl = steps[0]
        return bool(bl.get("use_regex", True)) and not bl.get("add_prefix_space")
    if kinds == ["Split", "ByteLevel"]:
        split, bl = steps
        pattern = (split.get("pattern") or {}).get("Regex")
        return (
            pattern in KNOWN_PATTERNS
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
            and not bl.get("use_regex")
            and not bl.get("add_prefix_space")
        )
    return False
