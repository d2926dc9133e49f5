"""Cross-tokenizer scorers: pure maths over tokenizers and teacher log-probs (no Ray).

The scorers import torch; they are loaded on first use (``from pipeline.scoring import
SubsetExactScorer`` works as before), so that importing `pipeline.scoring.common` (the
`ScoredDocument` the shard writer stores), and through it `pipeline.shards` and
`pipeline.audit`, does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.scoring.common import Regime, ScoredDocument, SubsetRegimeError, Teacher

if TYPE_CHECKING:
    from pipeline.scoring.general import GeneralScorer
    from pipeline.scoring.subset import PreparedDocument, SubsetExactScorer

# name -> the module that defines it (imported on first access)
_LAZY = {
    "GeneralPrepared": "pipeline.scoring.general",
    "GeneralScorer": "pipeline.scoring.general",
    "PreparedDocument": "pipeline.scoring.subset",
    "SubsetExactScorer": "pipeline.scoring.subset",
    "SubsetStudent": "pipeline.scoring.subset",
    "Prepared": "pipeline.scoring.protocol",
    "Scorer": "pipeline.scoring.protocol",
    "TreeTeacher": "pipeline.scoring.protocol",
    "choose_scorer": "pipeline.scoring.factory",
    "make_scorer": "pipeline.scoring.factory",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "GeneralPrepared",
    "GeneralScorer",
    "Prepared",
    "PreparedDocument",
    "Regime",
    "ScoredDocument",
    "Scorer",
    "SubsetExactScorer",
    "SubsetRegimeError",
    "SubsetStudent",
    "Teacher",
    "TreeTeacher",
    "choose_scorer",
    "make_scorer",
]
