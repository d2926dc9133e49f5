"""Which scorer a job uses, and building it: the only place outside the scorers that
knows the two kinds ("subset", "general"). Tokenizers only, no model weights.

- `choose_scorer(cfg, t_tok, s_tok)`: ``(kind, why)`` for ``scoring.scorer`` and a
  tokenizer pair (`ConfigError` when the pair does not suit the scorer asked for);
- `make_scorer(kind, t_tok, s_tok, cfg)`: the `pipeline.scoring.protocol.Scorer`;
- `scorer_label(kind)`, `cost_warning(kind, cfg)`: what the driver logs about it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import JobConfig
    from pipeline.scoring.protocol import Scorer

log = logging.getLogger("pipeline.generate")  # where the job has always logged the choice

KINDS = ("subset", "general")

_LABELS = {"subset": "subset-exact", "general": "general"}

COST_WARNING = (
    "the general scorer is far costlier than the subset-exact one and leaves part "
    "of each row unaccounted (stored per row as unaccounted_mass): measured with "
    "SmolLM2 at the default setting, 26-45x the time and 0.33-0.37 of the mass "
    "per row (README, general scorer table); a student that is the teacher's BPE "
    "with a truncated merge list is scored exactly at about 1x"
)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"scorer kind must be one of {KINDS}, not {kind!r}")


def scorer_label(kind: str) -> str:
    """The scorer's name in the driver's log: "subset-exact" or "general"."""
    _check_kind(kind)
    return _LABELS[kind]


def cost_warning(kind: str, cfg: JobConfig) -> str | None:
    """What the driver warns about before a run with this scorer, or None."""
    _check_kind(kind)
    if kind == "general" and cfg.scoring.general.mode == "fast":
        return COST_WARNING
    return None


def make_scorer(kind: str, t_tok: Any, s_tok: Any, cfg: JobConfig) -> Scorer[Any]:
    """The scorer of ``kind`` (from `choose_scorer`) for a job config."""
    _check_kind(kind)
    if kind == "subset":
        from pipeline.scoring.subset import SubsetExactScorer

        return SubsetExactScorer(t_tok, s_tok)
    from pipeline.scoring.general import GeneralScorer

    return GeneralScorer(t_tok, s_tok, **cfg.scoring.general.model_dump())


def choose_scorer(cfg: JobConfig, t_tok: Any, s_tok: Any) -> tuple[str, str]:
    """("subset" | "general", why) for a tokenizer pair and ``scoring.scorer``; raises
    `ConfigError` when the subset scorer is asked for and the pair does not qualify, or
    when the general scorer cannot handle the student."""
    from pipeline.config import ConfigError
    from pipeline.scoring.subset_pair import check_subset_pair
    from pipeline.tokenization import ByteLevelBPE, TokenizerError

    want = cfg.scoring.scorer
    reason = ""
    if want in ("auto", "subset"):
        try:
            check_subset_pair(ByteLevelBPE(t_tok, "teacher"), ByteLevelBPE(s_tok, "student"))
            return "subset", "the student is the teacher's BPE with a truncated merge list: exact"
        except (TokenizerError, ValueError) as err:
            if want == "subset":
                raise ConfigError(str(err)) from err
            reason = f"not a truncated-merge pair: {err}"
    from pipeline.scoring.general import GeneralScorer

    g = cfg.scoring.general
    try:  # tokenizers only: validates the student and its end-of-text token
        student = GeneralScorer(t_tok, s_tok, **g.model_dump()).S
    except (TokenizerError, ValueError) as err:
        raise ConfigError(f"the general scorer cannot use this pair: {err}") from err
    if student.rule == "none":
        why = (
            "no pre-token boundary of the student tokenizer is stable (no pre-tokenizer "
            "with a vocabulary piece that holds a space after another character, or a "
            "pre-tokenizer regex the general scorer does not know), so each row is "
            "decided only at the end of the text"
        )
        if g.mode == "fast":
            raise ConfigError(
                f"the general scorer cannot use this student in fast mode: {why}; rows "
                "would be left wholly unaccounted (scoring.general.mode=lossless is exact "
                "but exponential in the document length)"
            )
        log.warning("general scorer, lossless mode: %s; cost grows exponentially", why)
    return "general", (
        f"{g.mode} mode, {g.walk} walk, student decision rule {student.decision_rule}; "
        f"{reason or 'scoring.scorer=general'}"
    )
