"""Brute force (scoring.md §4): the subset-exact scorer against the enumerated truth.

Tiny byte-level BPE tokenizers (alphabet a, b, space, 1; GPT-2 regex with look-ahead
and Qwen2 regex; 12 merges) and a perfect teacher over ALL strings up to length 5.
Every truncation of the merge list is a student. Every row of every document must equal
the enumerated induced distribution within 1e-9 (float64).
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.scoring import SubsetExactScorer
from pipeline.scoring.reference import SequentialSubsetScorer
from pipeline.tokenization import truncate_merges
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


@pytest.mark.parametrize("n", range(len(MERGES) + 1))
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


@pytest.mark.parametrize("pattern", ["gpt2", "qwen2"])
def test_contractions_move_earlier_boundaries(pattern):
    """An apostrophe's pre-token depends on up to two characters after it (GPT-2:
    ``x'l`` -> ``x ' l`` but ``x'll`` -> ``x 'll``), so a row ending after ``x'l`` must
    see teacher covers that start before the last pre-token. Alphabet x ' l space, a
    vocab with "'l" and "ll" but no "'ll"; every truncation is a student."""
    from pipeline.tokenization import build_byte_level_bpe

    base = ("x", "'", "l", "Ġ")
    merges = (("'", "l"), ("l", "l"), ("Ġ", "x"), ("x", "'l"))
    vocab = {s: i for i, s in enumerate(base)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    T = build_byte_level_bpe(vocab, merges, pattern=PATTERNS[pattern], added_tokens=[EOS])
    strings = all_strings(5, ("x", "'", "l", " "))
    rng = np.random.default_rng(1)
    w = np.exp(rng.normal(0.0, 1.5, size=len(strings)))
    dist = dict(zip(strings, (w / w.sum()).tolist(), strict=True))
    teacher = PerfectTeacher(T, dist)
    short = [d for d in dist if len(d) <= 4]
    for n in range(len(merges) + 1):
        S = truncate_merges(T, n)
        truth = student_truth(S, dist)
        results = SubsetExactScorer(T, S).score(teacher, list(dist), top_k=None)
        assert _max_row_error(results, truth) < TOL, n
        if n in (0, len(merges)):  # the reference's own probes see contractions too
            ref = SequentialSubsetScorer(T, S).score(teacher, short, top_k=None)
            assert _max_row_error(ref, truth) < TOL, n
