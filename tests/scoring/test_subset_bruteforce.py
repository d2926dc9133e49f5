"""Brute force (scoring.md §4): the subset-exact scorer against the enumerated truth.

Tiny byte-level BPE tokenizers (alphabet a, b, space, 1; GPT-2 regex with look-ahead
and Qwen2 regex; 12 merges) and a perfect teacher over ALL strings up to length 5.
Every truncation of the merge list is a student. Every row of every document must equal
the enumerated induced distribution within 1e-9 (float64).

Tiers: the sweeps over truncations are parametrized per truncation; a representative few
run by default (`QUICK_TRUNCATIONS`, `QUICK_CONTRACTION_TRUNCATIONS`), the rest are marked
``slow`` (``pytest -m "not slow"`` skips them; the plain ``pytest`` runs every one, the
same assertions as the single sweep they were before).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from pipeline.scoring import SubsetExactScorer
from pipeline.scoring.reference import SequentialSubsetScorer
from pipeline.tokenization import build_byte_level_bpe, truncate_merges
from tests.tiny_assets import (
    EOS,
    MERGES,
    PATTERNS,
    PerfectTeacher,
    all_strings,
    string_distribution,
    student_truth,
    tiny_pair,
    tiny_teacher_tokenizer,
)

TOL = 1e-9

# One torch thread (as in test_general_bruteforce.py): the tensors are tiny. Scoring one
# truncation took 1.3-1.5 s with 1 or 2 threads on idle 2 cores, but with one other busy
# process on them 6-7 s with 2 threads and 1.6-2.0 s with 1.
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Truncations run in the quick tier (the others are `slow`): 0 = bytes only; 1 = "ĠĠ"
# without "ĠĠĠ" (whitespace runs); 3 = "Ġa" without "Ġab" (the look-ahead probe trap of
# `test_without_probes_the_whitespace_trap_is_caught`); 9 = "Ġ1" (space + digit) without
# "Ġaba"/"ĠĠa"; 12 = student = teacher.
QUICK_TRUNCATIONS = (0, 1, 3, 9, len(MERGES))


def _tiered(values, quick):
    """``values`` as pytest params, all but ``quick`` marked slow."""
    return [v if v in quick else pytest.param(v, marks=pytest.mark.slow) for v in values]


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def world(request):
    pattern = request.param
    dist = string_distribution(5, seed=0)
    teacher = PerfectTeacher(tiny_teacher_tokenizer(pattern), dist)
    return pattern, dist, teacher


def _max_row_error(results, truth) -> float:
    worst = 0.0
    for r in results:
        ids = list(r.student_ids)
        for i in range(len(ids) + 1):
            want = truth.dist(ids[:i])
            assert want is not None, "document outside the support"
            worst = max(worst, float(np.abs(np.exp(r.logprobs[i]) - want).max()))
    return worst


@pytest.mark.parametrize("n", _tiered(range(len(MERGES) + 1), QUICK_TRUNCATIONS))
def test_every_row_equals_enumerated_truth(world, n):
    pattern, dist, teacher = world
    T, S = tiny_pair(n, pattern)
    scorer = SubsetExactScorer(T, S)
    docs = list(dist)
    results = scorer.score(teacher, docs, top_k=None)
    assert len(results) == len(docs)
    assert _max_row_error(results, student_truth(S, dist)) < TOL
    for r in results:
        # rows sum to 1; the perfect teacher has no non-canonical mass
        assert np.allclose(np.exp(r.logprobs).sum(1), 1.0, atol=TOL)
        assert np.all(r.noncanonical_mass < TOL)
        # telescoping: sum of row log-probs through EOS = log P_T(canonical + EOS)
        ctx = list(r.teacher_ids)
        want = sum(
            teacher.next_token_logprobs([ctx[:k]])[0][t]
            for k, t in enumerate([*ctx, T.token_to_id(EOS)])
        )
        assert abs(r.target_logprobs.sum() - want) < 1e-9


def test_without_probes_the_whitespace_trap_is_caught(world):
    """The check has teeth: ignoring the look-ahead alternative breaks rows."""
    pattern, dist, teacher = world
    T, S = tiny_pair(3, pattern)
    results = SubsetExactScorer(T, S, probes=("",)).score(teacher, list(dist), top_k=None)
    assert _max_row_error(results, student_truth(S, dist)) > 0.1


@pytest.mark.parametrize("n", [0, 5, len(MERGES)])
def test_sequential_reference_equals_truth_and_fast_scorer(world, n):
    pattern, dist, teacher = world
    T, S = tiny_pair(n, pattern)
    docs = list(dist)[::7]
    ref = SequentialSubsetScorer(T, S).score(teacher, docs, top_k=None)
    fast = SubsetExactScorer(T, S).score(teacher, docs, top_k=None)
    assert _max_row_error(ref, student_truth(S, dist)) < TOL
    for a, b in zip(ref, fast, strict=True):
        np.testing.assert_array_equal(a.student_ids, b.student_ids)
        np.testing.assert_allclose(np.exp(a.logprobs), np.exp(b.logprobs), atol=TOL)


def test_student_equal_teacher_reproduces_teacher_softmax(world):
    pattern, _dist, teacher = world
    T, S = tiny_pair(len(MERGES), pattern)
    scorer = SubsetExactScorer(T, S)
    for r in scorer.score(teacher, ["ab  1", "  ", "1a b1"], top_k=None):
        np.testing.assert_array_equal(r.student_ids, r.teacher_ids)
        for i in range(len(r.student_ids) + 1):
            want = np.exp(teacher.next_token_logprobs([list(r.teacher_ids[:i])])[0])
            np.testing.assert_allclose(np.exp(r.logprobs[i]), want, atol=TOL)


def test_topk_rows_match_dense_rows(world):
    pattern, _dist, teacher = world
    T, S = tiny_pair(4, pattern)
    scorer = SubsetExactScorer(T, S)
    docs = ["ab 1 ", "11  b", ""]  # inside the support (length <= 5)
    dense = scorer.score(teacher, docs, top_k=None)
    sparse = scorer.score(teacher, docs, top_k=3)
    for d, s in zip(dense, sparse, strict=True):
        assert s.topk_ids.shape == (len(d.student_ids) + 1, 3)
        want = np.take_along_axis(d.logprobs, s.topk_ids, axis=1)
        np.testing.assert_allclose(s.topk_logprobs, want, atol=1e-12)
        # the top-k are the k largest, in descending order
        assert np.all(np.isfinite(s.topk_logprobs[:, 0]))
        assert np.all(np.diff(np.nan_to_num(s.topk_logprobs, neginf=-1e300), axis=1) <= 1e-15)
        kth = np.sort(d.logprobs, axis=1)[:, -3]
        np.testing.assert_allclose(s.topk_logprobs[:, -1], kth, atol=1e-12)
        np.testing.assert_allclose(s.tail_mass, 1 - np.exp(s.topk_logprobs).sum(1), atol=1e-12)


def test_special_tokens_inside_text_are_atomic_and_exact():
    """Texts with an added token in them: rows after it restart from one exact cover."""
    sep = "<|sep|>"
    from tests.tiny_assets import PrefixTable, encode

    T = tiny_teacher_tokenizer("qwen2")
    T.add_special_tokens([sep])
    from pipeline.tokenization import truncate_merges

    S = truncate_merges(T, 2)
    strings = all_strings(4, ("a", " ", "1", sep))
    rng = np.random.default_rng(1)
    w = np.exp(rng.normal(0, 1.5, len(strings)))
    dist = dict(zip(strings, (w / w.sum()).tolist(), strict=True))
    teacher = PerfectTeacher(T, dist)
    truth: PrefixTable = student_truth(S, dist)
    docs = [s for s in strings if sep in s][::5]
    results = SubsetExactScorer(T, S).score(teacher, docs, top_k=None)
    for doc, r in zip(docs, results, strict=True):
        assert list(r.student_ids) == list(encode(S, doc))
        for i in range(len(r.student_ids) + 1):
            np.testing.assert_allclose(
                np.exp(r.logprobs[i]), truth.dist(list(r.student_ids[:i])), atol=TOL
            )


def test_whitespace_only_and_empty_texts():
    dist = string_distribution(5, seed=3)
    T, S = tiny_pair(1, "qwen2")
    teacher = PerfectTeacher(T, dist)
    truth = student_truth(S, dist)
    for text in ["", " ", "    ", " 1 "]:
        (r,) = SubsetExactScorer(T, S).score(teacher, [text], top_k=None)
        assert r.logprobs.shape[0] == len(r.student_ids) + 1
        for i in range(len(r.student_ids) + 1):
            np.testing.assert_allclose(
                np.exp(r.logprobs[i]), truth.dist(list(r.student_ids[:i])), atol=TOL
            )


CONTRACTION_MERGES = (("'", "l"), ("l", "l"), ("Ġ", "x"), ("x", "'l"))
# Quick tier: 0 (bytes only; the sequential reference is checked too) and 2 ("'l" and "ll"
# but neither "x'l" nor "'ll": GPT-2's ``x'l`` -> ``x'll`` trap). 1, 3, 4 are `slow`.
QUICK_CONTRACTION_TRUNCATIONS = (0, 2)


@functools.cache
def _contraction_world(pattern: str):
    """Alphabet x ' l space, a vocab with "'l" and "ll" but no "'ll"; a perfect teacher
    over all strings up to length 5."""
    base = ("x", "'", "l", "Ġ")
    vocab = {s: i for i, s in enumerate(base)}
    for a, b in CONTRACTION_MERGES:
        vocab.setdefault(a + b, len(vocab))
    T = build_byte_level_bpe(
        vocab, CONTRACTION_MERGES, pattern=PATTERNS[pattern], added_tokens=[EOS]
    )
    strings = all_strings(5, ("x", "'", "l", " "))
    rng = np.random.default_rng(1)
    w = np.exp(rng.normal(0.0, 1.5, size=len(strings)))
    dist = dict(zip(strings, (w / w.sum()).tolist(), strict=True))
    return T, dist, PerfectTeacher(T, dist)


@pytest.mark.parametrize(
    "n", _tiered(range(len(CONTRACTION_MERGES) + 1), QUICK_CONTRACTION_TRUNCATIONS)
)
@pytest.mark.parametrize("pattern", ["gpt2", "qwen2"])
def test_contractions_move_earlier_boundaries(pattern, n):
    """An apostrophe's pre-token depends on up to two characters after it (GPT-2:
    ``x'l`` -> ``x ' l`` but ``x'll`` -> ``x 'll``), so a row ending after ``x'l`` must
    see teacher covers that start before the last pre-token. Alphabet x ' l space, a
    vocab with "'l" and "ll" but no "'ll"; every truncation is a student."""
    T, dist, teacher = _contraction_world(pattern)
    short = [d for d in dist if len(d) <= 4]
    S = truncate_merges(T, n)
    truth = student_truth(S, dist)
    results = SubsetExactScorer(T, S).score(teacher, list(dist), top_k=None)
    assert _max_row_error(results, truth) < TOL, n
    if n in (0, len(CONTRACTION_MERGES)):  # the reference's own probes see contractions too
        ref = SequentialSubsetScorer(T, S).score(teacher, short, top_k=None)
        assert _max_row_error(ref, truth) < TOL, n
