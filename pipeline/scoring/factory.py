"""Which scorer a job uses, and building it: the only place outside the scorers that
knows the two kinds ("subset", "general"). Tokenizers only, no model weights.

- `choose_scorer(cfg, t_tok, s_tok)`: ``(kind, why)`` for ``scoring.scorer`` and a
  tokenizer pair (`ConfigError` when the pair does not suit the scorer asked for);
- `make_scorer(kind, t_tok, s_tok, cfg)`: the `pipeline.scoring.protocol.Scorer`;
- `scorer_label(kind)`, `cost_warning(kind, cfg)`: what the driver logs about it (for
  approx mode: the measured error and cost at the chosen setting).
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
    "of each row unaccounted in bounded mode (stored per row as unaccounted_mass): "
    "measured with SmolLM2 at beam 16, min_prob 1e-3, 37-68x the time and 0.34-0.37 of "
    "the mass per row, and 16-19 of 44-69 rows give the actual next token probability 0 "
    "(jobs/bench/README.md); mode approx places that mass (the default)"
)

# What `jobs/bench/general.py` measured for approx mode (SmolLM2 teacher, Qwen2.5, Llama-3
# and a SentencePiece-style BPE student, 2 GSM8K texts and 2 paragraphs of Python's docs of
# 80 bytes each, teacher positions counted with HFTeacher's document forward;
# jobs/bench/README.md), by (beam, min_prob, budget): the log line at job start. Other
# settings: not measured.
APPROX_MEASURED: dict[tuple[int, float, int | None], str] = {
    (64, 0.02, None): (
        "rigorous all-row TV lower bound 0.0044-0.0093, TV to a generous reference "
        "0.003-0.031 on the rows it leaves within 0.05 of the truth (0.031: Llama-3's "
        "3-digit number tokens), the actual next token never 0, |sum log q(gold) - "
        "teacher log-likelihood| <= 0.08 nats per token on GSM8K (up to 0.42 for the "
        "SentencePiece student on Python docs), 11-21 teacher positions per student "
        "token, 13-27x the subset-exact scorer's time"
    ),
    (64, 0.03, None): (
        "rigorous all-row TV lower bound 0.0057-0.0116, TV to a generous reference "
        "0.003-0.034 on the rows it leaves within 0.05 of the truth, the actual next "
        "token never 0, 9-18 teacher positions per student token, 10-21x the "
        "subset-exact scorer's time"
    ),
    (64, 0.05, None): (
        "rigorous all-row TV lower bound 0.0084-0.021, TV to a generous reference "
        "0.004-0.044 on the rows it leaves within 0.05 of the truth, the actual next "
        "token never 0, 7-14 teacher positions per student token, 8-17x the "
        "subset-exact scorer's time"
    ),
    (6, 5e-3, None): (
        "rigorous all-row TV lower bound 0.0042-0.0083, TV to a generous reference "
        "0.003-0.034 on the rows it leaves within 0.05 of the truth (0.034: Llama-3's "
        "3-digit number tokens), the actual next token never 0, |sum log q(gold) - "
        "teacher log-likelihood| <= 0.05 nats per token on GSM8K (up to 0.44 for the "
        "SentencePiece student on Python docs), estimated mass 0.43-0.68 per row, 17-27 "
        "teacher positions per student token, 17-36x the subset-exact scorer's time"
    ),
    (16, 1e-3, None): (
        "rigorous all-row TV lower bound 0.0011-0.0039, TV to a generous reference "
        "0.003-0.027 on the rows it leaves within 0.05 of the truth, the actual next "
        "token never 0, calibration within 0.03 nats per token on GSM8K (up to 0.45 for "
        "the SentencePiece student on Python docs), estimated mass 0.33-0.60 per row, "
        "42-74 teacher positions per student token, 42-87x the subset-exact scorer's time"
    ),
    (4, 1e-2, None): (
        "rigorous all-row TV lower bound 0.0062-0.041, TV to a generous reference "
        "0.003-0.041 on the rows it leaves within 0.05 of the truth, the actual next "
        "token never 0, estimated mass 0.49-0.72 per row, 13-20 teacher positions per "
        "student token, 12-22x the subset-exact scorer's time"
    ),
    (16, 5e-3, 6): (
        "for Qwen2.5 (digits split one by one): rigorous all-row TV lower bound "
        "0.0072-0.015, TV to a generous reference 0.016 on the rows it leaves within "
        "0.05 of the truth, 8 teacher positions per student token; for students with "
        "multi-digit number tokens (Llama-3, the SentencePiece one) 0.021-0.034 and "
        "0.019-0.050; the actual next token never 0; 8-15x the subset-exact scorer's time"
    ),
}


def _setting(beam: int, min_prob: float, budget: int | None, sep: str = " ") -> str:
    """``beam B{sep}min_prob P`` (and ``{sep}budget N`` when there is one)."""
    out = f"beam {beam}{sep}min_prob {min_prob:g}"
    return out if budget is None else f"{out}{sep}budget {budget}"


def approx_expectation(cfg: JobConfig) -> str:
    """The measured error and cost of approx mode at the config's setting."""
    g = cfg.scoring.general
    got = APPROX_MEASURED.get((g.beam, g.min_prob, g.budget))
    where = f"general scorer, approx mode, {_setting(g.beam, g.min_prob, g.budget, ', ')}"
    if got is None:
        return (
            f"{where}: error and cost not measured at this setting (measured settings: "
            + "; ".join(_setting(*key) for key in APPROX_MEASURED)
            + "; jobs/bench/README.md)"
        )
    return f"{where}: measured {got} (SmolLM2 teacher, jobs/bench/README.md)"


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
    if kind != "general":
        return None
    mode = cfg.scoring.general.mode
    if mode in ("fast", "bounded"):
        return COST_WARNING
    if mode == "approx":
        return approx_expectation(cfg)
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
        if g.mode != "lossless":
            left = "estimated" if g.mode == "approx" else "unaccounted"
            raise ConfigError(
                f"the general scorer cannot use this student in {g.mode} mode: {why}; "
                f"rows would be left wholly {left} (scoring.general.mode=lossless is "
                "exact but exponential in the document length)"
            )
        log.warning("general scorer, lossless mode: %s; cost grows exponentially", why)
    return "general", (
        f"{g.mode} mode, {g.walk} walk, student decision rule {student.decision_rule}; "
        f"{reason or 'scoring.scorer=general'}"
    )
