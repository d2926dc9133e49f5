"""The real Qwen2 tokenizer and its truncated-merge students (``../shared/data``; skipped
when absent), with a small seeded Qwen2-architecture model as teacher, in float64: the
tests compare forwards of the same contexts packed differently (the scorer's trees,
chains, a plain causal forward), which in float32 differ by machine- and
thread-dependent rounding (see `tests.scoring.float64_teacher`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from pipeline.scoring import SubsetExactScorer
from pipeline.tokenization import ByteLevelBPE, truncate_merges
from tests.scoring.float64_teacher import FLOAT64_TOL, Float64Teacher
from tests.tiny_assets import hf_tokenizer, tiny_causal_lm

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def qwen2(shared_data) -> Tokenizer:
    """The full Qwen2 tokenizer: the shared vocab/merges with the components and added
    tokens of the shared students (which were made from it)."""
    spec = json.loads((shared_data / "qwen2-subsets" / "8000" / "tokenizer.json").read_text())
    vocab = json.loads((shared_data / "qwen2-tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    lines = (
        (shared_data / "qwen2-tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    )
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [
        ln.split(" ", 1) for ln in lines if ln and not ln.startswith("#version")
    ]
    for k, a in enumerate(spec["added_tokens"]):
        a["id"] = len(vocab) + k
    return Tokenizer.from_str(json.dumps(spec))


def _student(shared_data, qwen2, which):
    if isinstance(which, str):
        return Tokenizer.from_file(str(shared_data / "qwen2-subsets" / which / "tokenizer.json"))
    return truncate_merges(qwen2, which)


@pytest.mark.parametrize("which", ["8000", "32000", 0, 1000])
def test_r1_r2_hold_on_gsm8k(shared_data, qwen2, gsm8k_texts, which):
    student = _student(shared_data, qwen2, which)
    scorer = SubsetExactScorer(qwen2, student)  # checks the pair and R1 on probe texts
    S = ByteLevelBPE(student)
    # R2: every teacher token unmerges into student tokens that spell it, and the
    # student's own BPE of the token's bytes gives exactly that decomposition.
    T = scorer.T
    mismatches = 0
    for t, d in scorer.decomp.items():
        assert b"".join(S.token_bytes[x] for x in d) == T.token_bytes[t]
        mismatches += S.bpe(T.id_to_str[t]) != list(d)
    assert mismatches == 0
    # R1 on real text, and the cover search runs on it
    for text in gsm8k_texts[:300]:
        assert scorer._r1_mismatch(text) is None
    for text in gsm8k_texts[:20]:
        doc = scorer.prepare(text)
        # every prefix ending on a character boundary has its canonical encoding as an
        # exact cover (inside a character there may be none: all mass is pending)
        prefix = b""
        for i, c in enumerate(doc.covers):
            if i:
                prefix += S.token_bytes[doc.student_ids[i - 1]]
            try:
                prefix.decode("utf-8")
            except UnicodeDecodeError:
                continue
            assert c, (i, prefix[-20:])


@pytest.fixture(scope="module")
def random_qwen2_teacher(qwen2):
    tok = hf_tokenizer(qwen2)
    model = tiny_causal_lm(
        len(tok), arch="qwen2", seed=0, logits=len(tok) + 271
    )  # padded logits, as in Qwen2.5
    return Float64Teacher(model, tok, device="cpu", max_batch_tokens=4096)


def test_student_equal_teacher_reproduces_teacher_softmax(qwen2, gsm8k_texts, random_qwen2_teacher):
    teacher = random_qwen2_teacher
    scorer = SubsetExactScorer(qwen2, qwen2)
    texts = [gsm8k_texts[0][:200], "Tab\tand  two  spaces 12  34\n\n中文 😀 e\u0301"]
    for r in scorer.score(teacher, texts, top_k=None):
        np.testing.assert_array_equal(r.student_ids, r.teacher_ids)
        ctxs = [list(r.teacher_ids[:i]) for i in range(len(r.teacher_ids) + 1)]
        want = teacher.next_token_logprobs(ctxs).double().numpy()
        want -= np.log(np.exp(want).sum(1, keepdims=True))
        # rounding between the two forwards: 7e-15 measured; the rows also leave out the
        # mass of non-canonical covers (r.noncanonical_mass, 1.4e-11 in one row here)
        np.testing.assert_allclose(np.exp(r.logprobs), np.exp(want), atol=FLOAT64_TOL)


@pytest.mark.parametrize("which", ["8000", 0])
def test_telescoping_with_a_random_qwen2_model(
    shared_data, qwen2, gsm8k_texts, random_qwen2_teacher, which
):
    teacher = random_qwen2_teacher
    scorer = SubsetExactScorer(qwen2, _student(shared_data, qwen2, which))
    texts = [gsm8k_texts[i] for i in range(3)] + ["a  1 x\u00a0\u00a0y 中文 \n\n  "]
    for r in scorer.score(teacher, texts, top_k=64):
        seq = [*r.teacher_ids, scorer.teacher_eos]
        lp = teacher.next_token_logprobs([seq[:k] for k in range(len(seq))]).double()
        lp = lp - torch.logsumexp(lp, 1, keepdim=True)
        loglik = float(lp[torch.arange(len(seq)), torch.as_tensor(seq)].sum())
        # Sums of len(seq) log-probs from different forwards: FLOAT64_TOL per term
        # (measured differences below 1.3e-11 in all; up to 2.5e-5 with float32 weights).
        tol = FLOAT64_TOL * len(seq)
        # the same likelihood from a plain causal forward (other attention kernel path)
        (tf,) = teacher.teacher_forcing_logprobs([seq])
        assert abs(float(tf.double().sum()) - loglik) < tol
        rows = float(r.target_logprobs.sum())
        assert np.allclose(np.exp(r.topk_logprobs).sum(1) + r.tail_mass, 1.0, atol=1e-9)
        # Rows telescope to the canonical log-likelihood once the measured non-canonical
        # mass (teacher mass on non-canonical teacher sequences) is accounted for.
        corrected = rows + np.log1p(-r.noncanonical_mass).sum() + np.log1p(-r.unmapped_mass).sum()
        # exact given the teacher's outputs (up to their rounding); an independent chain
        # forward agrees up to rounding
        assert abs(corrected - r.stats["teacher_logprob"]) < tol, (corrected, r.stats)
        assert abs(corrected - loglik) < tol, (corrected, loglik)
        print(
            "raw telescoping gap",
            which,
            rows - loglik,
            "max non-canonical",
            r.noncanonical_mass.max(),
        )
        assert -tol < rows - loglik < 0.05 * len(r.student_ids)
