"""Target kinds from one teacher pass: student rows, next-byte rows, teacher-token log-probs.

A run asks for any non-empty subset of `KINDS` (``scoring.targets``):

- ``student``: rows over a student tokenizer's vocabulary (`pipeline.scoring.subset` or
  `pipeline.scoring.general`);
- ``bytes``: the teacher's exact next-byte distribution at every byte of the text (and
  end of text): the subset-exact scorer with the teacher's own byte symbols as student
  (the teacher's BPE cut to 0 merges), symbols renamed to byte values (`ByteRows`);
- ``teacher``: the teacher's log-prob of every token of its canonical encoding (and of
  its end-of-text token after it), with each token's byte end (`TeacherTokens`), for
  ALM-style losses and any student tokenizer chosen later.

One forward. Every kind's teacher contexts are prefixes of the canonical teacher
encoding plus branches: the subset-exact trees (student and byte) are prefix trees whose
canonical path is nodes ``0..m``, and the teacher kind needs that path only. The trees of
one text are merged into one prefix tree (nodes deduplicated by (parent, token),
`pipeline.scoring.trees.merge_context_trees`) and the texts of a batch go through the
teacher in one call, so asking for more kinds costs only the branches the other kinds
add (``teacher`` adds nothing to a subset-exact ``student`` or ``bytes`` run). The
general scorer builds its own contexts: with it, the ``bytes`` and ``teacher`` kinds
are one more tree forward per batch (measured in `jobs/bench/kinds.py`).

Telescoping (all kinds, per sequence): ``sum(target log-probs) + sum(log1p(-noncanonical))
+ sum(log1p(-unmapped))`` of the student rows and of the byte rows, and the sum of the
teacher-token log-probs, each equal the teacher's log-likelihood of its canonical
encoding followed by end-of-text (``stats["teacher_logprob"]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.errors import UnscorableTextError
from pipeline.scoring.common import ScoredDocument
from pipeline.scoring.protocol import Scorer, Teacher
from pipeline.scoring.subset import HostCopy, RowNorms, row_norms, vocab_columns
from pipeline.scoring.trees import _batches, merge_context_trees, teacher_tree_batches
from pipeline.tokenization import ByteLevelBPE, load_tokenizer, truncate_merges

KINDS = ("student", "bytes", "teacher")

BYTE_EOS = 256  # the byte rows' end-of-text symbol; 257 + j: the j-th of `byte_specials`

# Teacher nodes per teacher call, in units of ``max_batch_tokens``: the log-probs of one
# call ([nodes, V] float32) are held until its rows are computed, so 1 keeps the device
# memory at one forward batch's (the teacher's `estimate_forward_bytes`), not four.
CALL_FORWARDS = 1


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """``kinds`` in `KINDS` order, duplicates dropped; `ValueError` when empty or unknown."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown target kind(s) {bad}: choose from {list(KINDS)}")
    out = tuple(k for k in KINDS if k in kinds)
    if not out:
        raise ValueError(f"ask for at least one target kind of {list(KINDS)}")
    return out


@dataclass
class TeacherTokens:
    """The ``teacher`` kind of one text: its canonical teacher encoding with log-probs."""

    ids: np.ndarray  # [m] int64 canonical teacher ids (added tokens included)
    logprob: np.ndarray  # [m + 1] float64: log P(ids[j] | ids[:j]); [m]: end of text
    byte_end: np.ndarray  # [m] int64 byte end of each token in the UTF-8 text

    @property
    def total(self) -> float:
        """log P_T(canonical encoding + end of text)."""
        return float(self.logprob.sum())


@dataclass
class ByteRows:
    """The ``bytes`` kind of one text: ``R = bytes + 1`` rows (an added token in the text
    is one symbol of several bytes, so fewer rows then). Row ``r`` is the teacher's
    next-symbol distribution for the symbol starting at byte ``row_start[r]`` given the
    bytes before it; the last row starts at ``len(text)`` and predicts end of text.
    Symbols: 0..255 byte values, `BYTE_EOS`, ``257 + j`` the added token
    ``byte_specials[j]``."""

    row_start: np.ndarray  # [R] int64 byte offset of the symbol each row predicts
    symbols: np.ndarray  # [R - 1] int64 the text's symbols (what rows 0..R-2 predict)
    scored: ScoredDocument  # rows in the byte student's ids (topk_ids mapped to symbols)


@dataclass
class KindsPrepared:
    """A text after the tokenizer phase of every requested kind."""

    text: str  # normalised, as scored
    teacher_ids: list[int]
    student: Any | None  # the student scorer's prepared text
    bytes: Any | None  # the byte scorer's `PreparedDocument`
    tree: tuple[list[int], list[int]] | None = None  # merged (tokens, parents)
    maps: dict[str, list[int]] = field(default_factory=dict)  # kind -> tree node per local node

    @property
    def student_ids(self) -> list[int]:
        return list(self.student.student_ids) if self.student is not None else []


@dataclass
class KindsResult:
    text: str
    student: ScoredDocument | None
    bytes: ByteRows | None
    teacher: TeacherTokens | None
    stats: dict[str, Any] = field(default_factory=dict)


class PendingKinds:
    """`TargetKinds.launch`'s results while the device computes them: `result` waits
    (once per forward) and returns them in input order."""

    def __init__(self, out: list[KindsResult], finishers: list[Callable[[], None]]) -> None:
        self._out = out
        self._finishers = finishers

    def result(self) -> list[KindsResult]:
        while self._finishers:
            self._finishers.pop(0)()
        return self._out


@dataclass
class _Path:
    """The canonical path alone as a `TeacherTree` (node ``j`` = ``ids[:j]``)."""

    ids: list[int]
    context: tuple[int, ...] = ()

    @property
    def tokens(self) -> list[int]:
        return [-1, *self.ids]

    @property
    def parents(self) -> list[int]:
        return [-1, *range(len(self.ids))]

    @property
    def num_nodes(self) -> int:
        return len(self.ids) + 1


class TargetKinds:
    """The requested target kinds of a job, scored from shared teacher forwards.

    Args:
        teacher_tokenizer: any form `load_tokenizer` accepts.
        kinds: a subset of `KINDS`.
        student_scorer: the student scorer (a `Scorer`), required with ``student``.
    """

    def __init__(
        self,
        teacher_tokenizer: Any,
        kinds: Sequence[str],
        student_scorer: Scorer[Any] | None = None,
    ) -> None:
        self.kinds = check_kinds(kinds)
        if ("student" in self.kinds) != (student_scorer is not None):
            raise ValueError("a student scorer is needed exactly when 'student' is asked for")
        self.student_scorer = student_scorer
        t_tok = load_tokenizer(teacher_tokenizer)
        self.T: ByteLevelBPE = (
            student_scorer.T if student_scorer else ByteLevelBPE(t_tok, "teacher")
        )
        # the subset scorer's trees can be shared; the general scorer makes its own
        self.shares_trees = student_scorer is not None and hasattr(student_scorer, "rows_batch")
        self.teacher_eos = self.T.added_by_content[self.T.end_of_text()]
        self.byte_scorer: Any = None
        if "bytes" in self.kinds:
            from pipeline.scoring.subset import SubsetExactScorer

            self.byte_scorer = SubsetExactScorer(t_tok, truncate_merges(t_tok, 0))
            self._byte_symbol_table()

    # ------------------------------------------------------------------ byte symbols
    def _byte_symbol_table(self) -> None:
        """Byte student id -> symbol (byte value, `BYTE_EOS`, 257 + j)."""
        S = self.byte_scorer.S
        eos = self.byte_scorer.student_eos
        specials = [a.content for a in sorted(S.added, key=lambda a: a.id) if a.id != eos]
        self.byte_specials: list[str] = specials
        table = np.full(S.size, -1, dtype=np.int64)
        for i, b in S.token_bytes.items():
            if i == eos:
                table[i] = BYTE_EOS
            elif i in S.added_ids:
                table[i] = 257 + specials.index(S.token_bytes[i].decode("utf-8"))
            else:
                if len(b) != 1:
                    raise AssertionError(f"byte student token {i} is {b!r}, not one byte")
                table[i] = b[0]
        self.byte_symbol = table

    @property
    def byte_vocab_size(self) -> int:
        """Symbols of the byte rows: 256 bytes, end of text, the added tokens."""
        return 257 + len(getattr(self, "byte_specials", []))

    # ------------------------------------------------------------------ scorer-like interface
    @property
    def student(self) -> Any:
        return self.student_scorer.student if self.student_scorer is not None else None

    def prepare(self, text: str) -> KindsPrepared:
        """Tokenizer phase of every kind, and the merged context tree of the shared ones.
        `UnscorableTextError` when any kind cannot score the text."""
        s_prep = self.student_scorer.prepare(text) if self.student_scorer is not None else None
        b_prep = self.byte_scorer.prepare(text) if self.byte_scorer is not None else None
        norm = self.T.normalize(text)
        ids = self.T.tokenizer.encode(norm, add_special_tokens=False).ids
        # (the byte and subset scorers check this themselves)
        unchecked = b_prep is None and (s_prep is None or not self.shares_trees)
        if unchecked and self.T.decode_bytes(ids) != norm.encode("utf-8"):
            raise UnscorableTextError(
                "the text does not survive the teacher's encode/decode (bytes it has no symbol for)"
            )
        prep = KindsPrepared(norm, list(ids), s_prep, b_prep)
        docs: dict[str, Any] = {}
        if s_prep is not None and self.shares_trees:
            docs["student"] = s_prep
        if b_prep is not None:
            docs["bytes"] = b_prep
        if "teacher" in self.kinds and not docs:
            docs["teacher"] = _Path(prep.teacher_ids)
        if docs:
            trees, where = merge_context_trees(list(docs.values()), max_nodes=1 << 62)
            assert len(trees) == 1
            prep.tree = trees[0]
            prep.maps = {k: w[1] for k, w in zip(docs, where, strict=True)}
            # the canonical path: local nodes 0..m of any of the trees (they all start
            # with it: `pipeline.scoring.subset._Tree`)
            first = next(iter(prep.maps.values()))
            prep.maps["path"] = first[: len(prep.teacher_ids) + 1]
        return prep

    def tree_tokens(self, prepared: KindsPrepared) -> int | None:
        """Teacher tokens of the merged tree (must fit one forward row), or the student
        scorer's own answer when it builds its own contexts."""
        own = None
        if prepared.student is not None and not self.shares_trees:
            assert self.student_scorer is not None
            own = self.student_scorer.tree_tokens(prepared.student)
        if prepared.tree is None:
            return own
        return max(own or 0, len(prepared.tree[0]) - 1)

    def context_nodes(self, prepared: KindsPrepared) -> int:
        n = len(prepared.tree[0]) if prepared.tree is not None else 0
        if prepared.student is not None and not self.shares_trees:
            assert self.student_scorer is not None
            n += self.student_scorer.context_nodes(prepared.student)
        return n

    # ------------------------------------------------------------------ scoring
    def score_prepared(
        self,
        teacher: Teacher,
        prepared: Sequence[KindsPrepared],
        top_k: int | None = 64,
        *,
        byte_top_k: int | None = 8,
        rows: Sequence[np.ndarray | None] | None = None,
        max_batch_nodes: int | None = None,
    ) -> list[KindsResult]:
        """Every requested kind of the prepared texts (``rows``: the student rows to
        keep, passed to a student scorer that computes only those)."""
        return self.launch(
            teacher,
            prepared,
            top_k,
            byte_top_k=byte_top_k,
            rows=rows,
            max_batch_nodes=max_batch_nodes,
        ).result()

    def launch(
        self,
        teacher: Teacher,
        prepared: Sequence[KindsPrepared],
        top_k: int | None = 64,
        *,
        byte_top_k: int | None = 8,
        rows: Sequence[np.ndarray | None] | None = None,
        max_batch_nodes: int | None = None,
    ) -> PendingKinds:
        """`score_prepared` without waiting for the device: the teacher forwards and the
        row phases are queued (on CUDA they run asynchronously) and `PendingKinds.result`
        waits for them, so a caller can queue the next batch before it reads these
        results. (A general student scorer is synchronous: its rows are ready here.)"""
        out = [KindsResult(p.text, None, None, None) for p in prepared]
        if self.student_scorer is not None and not self.shares_trees:
            students = self.student_scorer.score_prepared(
                teacher, [p.student for p in prepared], top_k, rows=rows
            )
            for o, s in zip(out, students, strict=True):
                o.student = s
        for p, o in zip(prepared, out, strict=True):
            o.stats["canonical_tokens"] = len(p.teacher_ids)
        finishers: list[Callable[[], None]] = []
        have = [i for i, p in enumerate(prepared) if p.tree is not None]
        budget = max_batch_nodes or CALL_FORWARDS * int(getattr(teacher, "max_batch_tokens", 1024))
        for batch in _batches([len(prepared[i].tree[0]) for i in have], budget):  # type: ignore[index]
            idx = [have[b] for b in batch]
            trees = [prepared[i].tree for i in idx]
            for lp, first in teacher_tree_batches(teacher, trees):  # type: ignore[arg-type]
                docs = [(idx[t], row) for t, row in first.items()]
                finishers.append(self._launch_forward(prepared, out, docs, lp, top_k, byte_top_k))
                del lp  # queued on the device: the next forward may reuse its memory
        return PendingKinds(out, finishers)

    def _launch_forward(
        self,
        prepared: Sequence[KindsPrepared],
        out: list[KindsResult],
        docs: list[tuple[int, int]],
        lp: torch.Tensor,
        top_k: int | None,
        byte_top_k: int | None,
    ) -> Callable[[], None]:
        """The kinds' row phases of one forward's log-probs (``docs``: text index, first
        row of its tree), queued; the returned function waits and fills ``out``."""
        lp = vocab_columns(lp, self.T.size)
        norms = row_norms(lp, torch.float64)  # shared by the kinds' row phases
        rows_of: dict[str, tuple[list[tuple[int, int]], Any]] = {}
        for kind, scorer, k in (
            ("student", self.student_scorer, top_k),
            ("bytes", self.byte_scorer, byte_top_k),
        ):
            mine = [(i, row) for i, row in docs if kind in prepared[i].maps]
            if mine:
                items = [
                    (getattr(prepared[i], kind), row + np.asarray(prepared[i].maps[kind]))
                    for i, row in mine
                ]
                rows_of[kind] = (mine, scorer.rows_batch(lp, items, k, norms))  # type: ignore[union-attr]
        tokens = (
            self._teacher_tokens(docs, prepared, lp, norms) if "teacher" in self.kinds else None
        )

        def finish() -> None:
            for kind, (mine, pending) in rows_of.items():
                for (i, _), r in zip(mine, pending.result(), strict=True):
                    if kind == "student":
                        out[i].student = r
                    else:
                        out[i].bytes = self._byte_rows(prepared[i], r)
            if tokens is not None:
                for (i, _), t in zip(docs, tokens(), strict=True):
                    out[i].teacher = t
            for i, _ in docs:
                out[i].stats["tree_nodes"] = len(prepared[i].tree[0])  # type: ignore[index]

        return finish

    def _teacher_tokens(
        self,
        docs: list[tuple[int, int]],
        prepared: Sequence[KindsPrepared],
        lp: torch.Tensor,
        norms: RowNorms,
    ) -> Callable[[], list[TeacherTokens]]:
        """Log-probs along the canonical paths of ``docs`` (index, first row of its tree
        in ``lp``), each context renormalised in float64 (``norms``), gathered for all of
        them on the device; the returned function waits and splits them."""
        rows = np.concatenate(
            [row + np.asarray(prepared[i].maps["path"], np.int64) for i, row in docs]
        )
        nxt = np.concatenate(
            [np.asarray([*prepared[i].teacher_ids, self.teacher_eos], np.int64) for i, _ in docs]
        )
        rows_t = torch.as_tensor(rows, device=lp.device)
        nxt_t = torch.as_tensor(nxt, device=lp.device)
        dev = lp[rows_t, nxt_t].to(torch.float64) - norms.lse[rows_t]
        copy = HostCopy({"logprob": dev})

        def result() -> list[TeacherTokens]:
            logprob = copy.get()["logprob"]
            assert logprob is not None
            out, a = [], 0
            for i, _ in docs:
                ids = prepared[i].teacher_ids
                lengths = [len(self.T.token_bytes[t]) for t in ids]
                out.append(
                    TeacherTokens(
                        ids=np.asarray(ids, dtype=np.int64),
                        logprob=logprob[a : a + len(ids) + 1].copy(),
                        byte_end=np.cumsum(lengths, dtype=np.int64),
                    )
                )
                a += len(ids) + 1
            return out

        return result

    def _byte_rows(self, p: KindsPrepared, scored: ScoredDocument) -> ByteRows:
        table = self.byte_symbol
        sym = table[np.asarray(scored.student_ids, dtype=np.int64)]
        S = self.byte_scorer.S
        lengths = [len(S.token_bytes[int(t)]) for t in scored.student_ids]
        start = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=start[1:])
        if scored.topk_ids is not None:
            scored.topk_ids = table[scored.topk_ids]
        return ByteRows(row_start=start, symbols=sym, scored=scored)

    def score(
        self,
        teacher: Teacher,
        texts: Sequence[str],
        top_k: int | None = 64,
        *,
        byte_top_k: int | None = 8,
    ) -> list[KindsResult]:
        return self.score_prepared(
            teacher, [self.prepare(t) for t in texts], top_k, byte_top_k=byte_top_k
        )
