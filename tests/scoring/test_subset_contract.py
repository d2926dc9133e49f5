"""Pairs the subset scorer must refuse, and inputs it must handle deliberately."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.scoring import SubsetExactScorer, SubsetRegimeError
from pipeline.tokenization import (
    TokenizerError,
    UnscorableTextError,
    build_byte_level_bpe,
    truncate_merges,
)
from tests.tiny_assets import (
    EOS,
    PerfectTeacher,
    string_distribution,
    tiny_pair,
    tiny_teacher_tokenizer,
)


def _bpe(merges, pattern="qwen2", normalizer=None, base=("a", "b", "c", "Ġ", "1")):
    from pipeline.tokenization import QWEN2_PATTERN

    vocab = {s: i for i, s in enumerate(base)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return build_byte_level_bpe(
        vocab,
        merges,
        pattern=QWEN2_PATTERN if pattern == "qwen2" else None,
        normalizer=normalizer,
        added_tokens=[EOS],
    )


def test_any_subset_of_tokens_is_not_enough():
    """scoring.md §2: teacher merges [(a,b),(b,c)], student keeps only (b,c)."""
    teacher = _bpe([("a", "b"), ("b", "c")])
    student = _bpe([("b", "c")])
    with pytest.raises(SubsetRegimeError, match="not a prefix"):
        SubsetExactScorer(teacher, student)


def test_different_pre_tokenizer_is_refused_with_reason():
    teacher = _bpe([("a", "b")], pattern="qwen2")
    student = _bpe([("a", "b")], pattern="gpt2")
    with pytest.raises(SubsetRegimeError, match="pre_tokenizer differs"):
        SubsetExactScorer(teacher, student)


def test_different_normalizer_is_refused_with_reason():
    teacher = _bpe([("a", "b")], normalizer="NFC")
    student = _bpe([("a", "b")], normalizer=None)
    with pytest.raises(SubsetRegimeError, match="normalizer differs"):
        SubsetExactScorer(teacher, student)


def test_student_vocab_with_extra_tokens_is_refused():
    teacher = _bpe([("a", "b"), ("b", "c")])
    student = _bpe([("a", "b")], base=("a", "b", "c", "Ġ", "1", "x"))
    with pytest.raises(SubsetRegimeError, match="base symbols"):
        SubsetExactScorer(teacher, student)


def test_student_lacking_an_added_token_in_the_text_is_refused():
    T = tiny_teacher_tokenizer()
    S = truncate_merges(T, 3)
    T.add_special_tokens(["<|sep|>"])
    scorer = SubsetExactScorer(T, S)
    with pytest.raises(TokenizerError, match="does not have"):
        scorer.prepare("ab<|sep|>a")


def test_text_that_does_not_survive_encode_decode_is_refused():
    T, S = tiny_pair(2)
    with pytest.raises(UnscorableTextError, match="does not survive"):
        SubsetExactScorer(T, S).prepare("ab z")  # 'z' has no symbol in the tiny vocab


def test_missing_eos_is_a_clear_error():
    T = _bpe([("a", "b")])
    no_specials = build_byte_level_bpe(
        {"a": 0, "b": 1, "c": 2, "Ġ": 3, "1": 4, "ab": 5}, [("a", "b")]
    )
    with pytest.raises(TokenizerError, match="student has no token"):
        SubsetExactScorer(T, no_specials)
    with pytest.raises(TokenizerError, match="teacher has no end-of-text token"):
        SubsetExactScorer(no_specials, no_specials)
    # an explicit eos_token that both have is accepted
    SubsetExactScorer(T, T, eos_token=EOS)


def test_row_convention_and_shapes():
    dist = string_distribution(5, seed=0)
    T, S = tiny_pair(4)
    teacher = PerfectTeacher(T, dist)
    (r,) = SubsetExactScorer(T, S).score(teacher, ["ab 1"], top_k=2)
    L = len(r.student_ids)
    assert r.topk_ids.shape == r.topk_logprobs.shape == (L + 1, 2)
    for arr in (r.tail_mass, r.target_logprobs, r.unmapped_mass, r.unaccounted_mass, r.regime):
        assert arr.shape == (L + 1,)
    # target_logprobs[i] is the log-prob of student_ids[i] in row i; row L of EOS
    (dense,) = SubsetExactScorer(T, S).score(teacher, ["ab 1"], top_k=None)
    nxt = [*r.student_ids, S.token_to_id(EOS)]
    np.testing.assert_allclose(dense.target_logprobs, dense.logprobs[np.arange(L + 1), nxt])
    np.testing.assert_allclose(r.target_logprobs, dense.target_logprobs)
    assert r.regime.tolist() == [0] * (L + 1)


def test_top_k_larger_than_vocab_and_invalid_top_k():
    dist = string_distribution(5, seed=0)
    T, S = tiny_pair(0)
    teacher = PerfectTeacher(T, dist)
    scorer = SubsetExactScorer(T, S)
    (r,) = scorer.score(teacher, ["a"], top_k=10_000)
    assert r.topk_ids.shape[1] == S.get_vocab_size(with_added_tokens=True)
    with pytest.raises(ValueError):
        scorer.score(teacher, ["a"], top_k=0)
