"""Cross-tokenizer scorers: pure maths over tokenizers and teacher log-probs (no Ray)."""

from pipeline.scoring.common import Regime, ScoredDocument, SubsetRegimeError, Teacher
from pipeline.scoring.general import GeneralScorer
from pipeline.scoring.subset import PreparedDocument, SubsetExactScorer

__all__ = [
    "GeneralScorer",
    "PreparedDocument",
    "Regime",
    "ScoredDocument",
    "SubsetExactScorer",
    "SubsetRegimeError",
    "Teacher",
]
