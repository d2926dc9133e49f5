"""Types shared by the scorers: the result of scoring one document, regimes, errors."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.scoring.protocol import Teacher as Teacher  # defined there; kept importable here


class Regime(enum.IntEnum):
    """Which algorithm produced a target row (stored per row in the shards)."""

    EXACT = 0  # subset-exact scorer: the row is the exact induced distribution
    LOSSLESS = 1  # general scorer, enumeration finished (exact up to recorded leftover)
    APPROXIMATE = 2  # general scorer, pruned enumeration; unaccounted mass recorded


class SubsetRegimeError(ValueError):
    """The tokenizer pair is not a truncated-merge (subset) pair; the message says why."""


@dataclass
class ScoredDocument:
    """Targets for one document.

    Row convention: ``L = len(student_ids)``; there are ``L + 1`` rows and row ``i``
    is ``P_S(next student token | student_ids[:i])``. Row ``i`` is therefore the target
    for the student's logits at the position of token ``i - 1`` (row 0 is the
    distribution of the first token, after the start of text). Row ``L`` is the
    distribution after the whole text; its end-of-text mass sits on the student's EOS id.

    All log-probabilities are natural logs of the normalised student distribution at
    temperature 1 of the teacher's logits (or the teacher's configured temperature).
    """

    text: str  # the text as scored (after the tokenizer's normalizer)
    student_ids: np.ndarray  # [L] int64, the student tokenizer's own encoding
    teacher_ids: np.ndarray  # [M] int64, the teacher's canonical encoding
    topk_ids: np.ndarray | None  # [L+1, k] int64 (top_k given), sorted by prob desc
    topk_logprobs: np.ndarray | None  # [L+1, k] float32/64
    logprobs: np.ndarray | None  # [L+1, V_student] float64 (top_k=None), -inf = impossible
    tail_mass: np.ndarray  # [L+1] probability outside the stored top-k (0 for dense rows)
    target_logprobs: np.ndarray  # [L+1] log P of the actual next student token (row L: EOS)
    unmapped_mass: np.ndarray  # [L+1] share of teacher mass on specials the student lacks
    unaccounted_mass: np.ndarray  # [L+1] mass the scorer could not place (0 when exact)
    # [L+1] share of the mass reaching row i that the teacher put on non-canonical teacher
    # sequences (dropped: the scorer assumes canonical encodings). Row log-probs telescope
    # to the teacher's log-likelihood of the canonical encoding up to sum(log(1 - this)).
    noncanonical_mass: np.ndarray
    regime: np.ndarray  # [L+1] uint8 `Regime` codes
    prefix_logprob: np.ndarray  # [L+1] log P_T(student_ids[:i] is a prefix)
    stats: dict[str, Any] = field(default_factory=dict)
    # [L+1] general scorer, approx mode: share of the mass reaching row i that was not
    # enumerated but placed by an estimate (or spread by renormalisation); the rows sum
    # to 1 and ``unaccounted_mass`` is 0. 0 where nothing was estimated; None for
    # scorers that estimate nothing.
    estimated_mass: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return len(self.student_ids) + 1

    def row_distribution(self, i: int) -> dict[int, float]:
        """Row ``i`` as {student id: probability} (top-k or dense)."""
        if self.logprobs is not None:
            row = self.logprobs[i]
            nz = np.nonzero(np.isfinite(row))[0]
            return {int(j): float(np.exp(row[j])) for j in nz}
        assert self.topk_ids is not None and self.topk_logprobs is not None
        return {
            int(j): float(np.exp(lp))
            for j, lp in zip(self.topk_ids[i], self.topk_logprobs[i], strict=True)
            if np.isfinite(lp)
        }
