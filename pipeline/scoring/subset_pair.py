"""Whether a tokenizer pair is a truncated-merge (subset) pair, the subset-exact scorer's
regime (`check_subset_pair`), and the student encoding of every teacher token
(`_decompositions`, R2 of ``../shared/spec/scoring.md``)."""

from __future__ import annotations

from typing import Any

from pipeline.scoring.common import SubsetRegimeError
from pipeline.tokenization import ByteLevelBPE


def _canon(component: Any) -> Any:
    """A tokenizer.json component without keys that do not change ids (offset trimming)."""
    if isinstance(component, dict):
        return {k: _canon(v) for k, v in component.items() if k != "trim_offsets"}
    if isinstance(component, list):
        return [_canon(v) for v in component]
    return component


def check_subset_pair(T: ByteLevelBPE, S: ByteLevelBPE) -> None:
    """Raise `SubsetRegimeError` naming every way the pair is not a truncated-merge pair."""
    problems = []
    for key in ("normalizer", "pre_tokenizer"):
        if _canon(T.component(key)) != _canon(S.component(key)):
            problems.append(
                f"{key} differs: teacher {T.component(key)!r} vs student {S.component(key)!r}"
            )
    for opt in (
        "dropout",
        "byte_fallback",
        "continuing_subword_prefix",
        "end_of_word_suffix",
        "ignore_merges",
    ):
        for tk in (T, S):
            if tk.model_spec.get(opt):
                problems.append(f"{tk.name} BPE has {opt}={tk.model_spec.get(opt)!r} (unsupported)")
    n = len(S.merges)
    if n > len(T.merges) or S.merges != T.merges[:n]:
        k = next(
            (i for i, (a, b) in enumerate(zip(S.merges, T.merges, strict=False)) if a != b),
            min(n, len(T.merges)),
        )
        detail = (
            f"student merge {k} is {S.merges[k]!r}, teacher merge {k} is {T.merges[k]!r}"
            if k < n and k < len(T.merges)
            else f"student has {n} merges, teacher {len(T.merges)}"
        )
        problems.append(f"student merges are not a prefix of the teacher's: {detail}")
    else:
        products = {a + b for a, b in T.merges}
        base = {s for s, i in T.vocab.items() if s not in products and i not in T.added_ids}
        expected = base | {a + b for a, b in T.merges[:n]}
        got = {s for s, i in S.vocab.items() if i not in S.added_ids}
        if got != expected:
            extra, missing = sorted(got - expected)[:5], sorted(expected - got)[:5]
            problems.append(
                "student vocab is not the teacher's base symbols + first "
                f"{n} merge products (extra {extra}, missing {missing})"
            )
    if problems:
        raise SubsetRegimeError(
            "not a truncated-merge (subset) tokenizer pair:\n  - "
            + "\n  - ".join(problems)
            + "\nUse the general scorer for unrelated tokenizers."
        )


def _decompositions(T: ByteLevelBPE, S: ByteLevelBPE) -> dict[int, tuple[int, ...]]:
    """R2: d(t) for every teacher BPE token, as student ids."""
    svocab = S.vocab
    d: dict[str, tuple[int, ...]] = {}
    for s in T.vocab:
        if s in svocab and T.vocab[s] not in T.added_ids:
            d[s] = (svocab[s],)
    for a, b in T.merges:
        prod = a + b
        if prod not in d and a in d and b in d:
            d[prod] = d[a] + d[b]
    out: dict[int, tuple[int, ...]] = {}
    for s, i in T.vocab.items():
        if i in T.added_ids:
            continue
        if s in d:
            out[i] = d[s]
        else:  # a vocab entry no merge produces: its student encoding is the best we know
            out[i] = tuple(S.bpe(s))
    return out
