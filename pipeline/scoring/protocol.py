"""The scorer interface: what the job (`pipeline.generate`), the audit's live re-score and
the benchmarks call on a scorer, and what a scorer calls on its teacher.

Two scorers implement `Scorer`: `pipeline.scoring.subset.SubsetExactScorer` (exact, for a
student that is the teacher's BPE with a truncated merge list) and
`pipeline.scoring.general.GeneralScorer` (any student). `pipeline.scoring.factory` picks
one for a job config (`choose_scorer`) and builds it (`make_scorer`); nothing outside
``pipeline/scoring`` needs to know which one it holds.

A text is scored in two steps, so that the job can refuse a bad record (and size its
batches) before any teacher call:

1. ``prepared = scorer.prepare(text)``: tokenizer work only. Raises
   `pipeline.tokenization.UnscorableTextError` (a bad record) for a text the scorer
   cannot score; ``prepared.student_ids`` is the student's encoding, so the rows a job
   wants (``L + 1`` of them) are known here.
2. ``scorer.score_prepared(teacher, prepared_list, top_k, rows=masks)``: one
   `ScoredDocument` per prepared text. ``rows`` (optional, per text a boolean mask over
   its ``L + 1`` rows) says which rows the caller will keep; a scorer may compute only
   those (the general scorer does: its cost is per row; the rows left out come back
   empty, all unaccounted) or all of them (the subset scorer: its rows come from one
   forward anyway).

Module layout: this file imports nothing from the scorers (they import it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from pipeline.scoring.common import ScoredDocument
    from pipeline.tokenization import ByteLevelBPE


@runtime_checkable
class Teacher(Protocol):
    """Anything that gives next-token log-probabilities after teacher-token contexts.

    ``next_token_logprobs(contexts)`` returns an array ``[len(contexts), V]`` of
    natural-log probabilities (V >= the teacher tokenizer's size incl. specials; extra
    columns are padding and are ignored). A context is a sequence of teacher token ids;
    the empty context means "start of text".

    Teachers may also be a `TreeTeacher` (`pipeline.teacher.HFTeacher` is one), which the
    scorers prefer: one forward over a prefix tree instead of one per context. A scorer
    reads the `TreeTeacher` members it finds and falls back to these defaults for the
    ones it does not: ``max_batch_tokens`` 1024, ``start_ids`` one token.
    """

    def next_token_logprobs(self, contexts: Sequence[Sequence[int]]) -> Any: ...


@runtime_checkable
class TreeTeacher(Teacher, Protocol):
    """A teacher with a tree forward and the limits the scorers and the job size their
    work by (`pipeline.teacher.HFTeacher`)."""

    @property
    def start_ids(self) -> Sequence[int]:
        """Token ids the teacher puts before every context ("start of text")."""
        ...

    @property
    def max_batch_tokens(self) -> int:
        """Tree nodes (start tokens and padding included) of one forward pass."""
        ...

    @property
    def max_positions(self) -> int:
        """The longest context (position ids) the model takes."""
        ...

    @property
    def vocab_size(self) -> int:
        """Ids of the teacher tokenizer (columns of the log-probs that count)."""
        ...

    def tree_logprobs(self, trees: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Sequence[Any]:
        """For each tree (tokens, parents; node 0 the start of text, its token ignored),
        the log-probs ``[num_nodes, >= vocab_size]`` after every node (torch tensors)."""
        ...


@runtime_checkable
class StudentView(Protocol):
    """The student tokenizer as a scorer sees it, for the job and the audit: the
    student's ids of a text, the bytes of ids, and what a shard's provenance records.

    `pipeline.scoring.subset.SubsetStudent` (byte-level BPE) and
    `pipeline.scoring.general.StudentView` (any supported student, which has more: the
    decision rule of the general scorer) implement it."""

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the student tokenizer's JSON: ``student_tokenizer_sha256``."""
        ...

    @property
    def size(self) -> int:
        """Student ids, added tokens included (the width of a dense row)."""
        ...

    @property
    def eos_id(self) -> int:
        """The student id that row ``L`` (end of text) puts the end-of-text mass on."""
        ...

    def encode(self, text: str) -> Sequence[int]:
        """The student's ids of a complete text (no special tokens added)."""
        ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The text bytes ``ids`` stand for, such that ``encode`` of the decoded text gives
        ``ids`` back for any ids a scorer produced; `UnscorableTextError` for an id that
        stands for no bytes (an unknown token)."""
        ...

    def token_repr(self, i: int) -> str:
        """A readable rendering of one token (for print-outs and audits)."""
        ...

    def row_offsets(self, text: str, ids: Sequence[int]) -> np.ndarray:
        """``[L + 1]`` int64: the character offset in ``text`` where what row ``i``
        predicts starts (token ``i``; row ``L``: ``len(text)``), for ``ids`` the
        student's encoding of ``text``."""
        ...


@runtime_checkable
class Prepared(Protocol):
    """A text after `Scorer.prepare` (tokenizer work done, no teacher call yet)."""

    @property
    def student_ids(self) -> Sequence[int]:
        """The student's encoding of the text (``L`` ids: the document has ``L + 1`` rows)."""
        ...


P = TypeVar("P", bound=Prepared)


@runtime_checkable
class Scorer(Protocol[P]):
    """A cross-tokenizer scorer (see the module docstring). ``P`` is its prepared-text
    type; code that holds "some scorer" uses ``Scorer[Any]``."""

    @property
    def name(self) -> str:
        """The scorer as provenance records it (``scorer``): "subset-exact", "general-fast"."""
        ...

    @property
    def params(self) -> dict[str, Any]:
        """The settings that change its targets (provenance ``scorer_params``)."""
        ...

    @property
    def T(self) -> ByteLevelBPE:
        """The teacher tokenizer (normalizer, pre-tokens, added tokens: what chunking reads)."""
        ...

    @property
    def student(self) -> StudentView:
        """The student tokenizer (`StudentView`)."""
        ...

    def prepare(self, text: str) -> P:
        """Tokenizer phase of one text; `UnscorableTextError` for a text it cannot score."""
        ...

    def tree_tokens(self, prepared: P) -> int | None:
        """Teacher tokens (start tokens not counted) of the context tree this text is
        scored in, which must fit one forward pass (``max_batch_tokens``); None when the
        scorer builds its own contexts and splits them to fit."""
        ...

    def context_nodes(self, prepared: P) -> int:
        """An estimate of the teacher context nodes scoring this text costs (the job
        batches texts by it)."""
        ...

    def score_prepared(
        self,
        teacher: Teacher,
        prepared: Sequence[P],
        top_k: int | None = 64,
        *,
        rows: Sequence[np.ndarray | None] | None = None,
    ) -> list[ScoredDocument]:
        """Rows of the prepared texts (``top_k=None``: dense rows); ``rows``: see the
        module docstring."""
        ...

    def score(
        self,
        teacher: Teacher,
        texts: Sequence[str],
        top_k: int | None = 64,
        *,
        rows: Sequence[np.ndarray | None] | None = None,
    ) -> list[ScoredDocument]:
        """`prepare` and `score_prepared` in one call."""
        ...
