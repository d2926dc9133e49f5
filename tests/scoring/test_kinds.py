"""The target kinds (`pipeline.scoring.kinds`): byte rows and teacher tokens against the
enumerated truth, the three views of one likelihood, and the cost of sharing a forward.

Tiny worlds (alphabet a, b, space, 1; a perfect teacher over all strings up to length
5, as in test_subset_bruteforce.py): the byte rows must equal the enumerated next-byte
distribution induced by the teacher, and the teacher-token log-probs the teacher's own
canonical-path log-probs. A random float64 model on real-looking text (whitespace runs,
digits, multi-byte characters, an added token): the student rows, the byte rows and the
teacher tokens telescope to the same log-likelihood as an independent causal forward.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import UnscorableTextError
from pipeline.scoring.kinds import BYTE_EOS, TargetKinds, check_kinds
from pipeline.scoring.subset import SubsetExactScorer
from pipeline.tokenization import truncate_merges
from tests.scoring.float64_teacher import FLOAT64_TOL, Float64Teacher
from tests.tiny_assets import (
    EOS,
    PerfectTeacher,
    encode,
    hf_tokenizer,
    string_distribution,
    student_truth,
    tiny_causal_lm,
    tiny_teacher_tokenizer,
    trained_byte_bpe,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def world(request):
    dist = string_distribution(5, seed=0)
    tok = tiny_teacher_tokenizer(request.param)
    return tok, dist, PerfectTeacher(tok, dist)


def test_byte_rows_and_teacher_tokens_equal_the_enumerated_truth(world):
    tok, dist, teacher = world
    kinds = TargetKinds(tok, ["bytes", "teacher"])
    byte_student = truncate_merges(tok, 0)
    truth = student_truth(byte_student, dist)  # P(next byte symbol | byte prefix)
    vb = byte_student.get_vocab_size(with_added_tokens=True)
    symbol = kinds.byte_symbol
    eos_t = tok.token_to_id(EOS)
    docs = list(dist)
    results = kinds.score(teacher, docs, top_k=None, byte_top_k=vb)
    worst_row = worst_tok = 0.0
    rows = 0
    for text, r in zip(docs, results, strict=True):
        raw = text.encode()
        b = r.bytes
        # one row per byte and one for end of text; symbols are the text's bytes
        np.testing.assert_array_equal(b.row_start, np.arange(len(raw) + 1))
        np.testing.assert_array_equal(b.symbols, list(raw))
        ids = encode(byte_student, text)
        for i in range(len(ids) + 1):
            want = truth.dist(ids[:i])
            assert want is not None
            got = np.zeros(vb)
            lp = b.scored.topk_logprobs[i]
            fin = np.isfinite(lp)
            # stored ids are symbols: map the truth's byte-student ids to symbols
            got_by_symbol = dict(
                zip(b.scored.topk_ids[i][fin].tolist(), np.exp(lp[fin]), strict=True)
            )
            for sid in range(vb):
                got[sid] = got_by_symbol.get(int(symbol[sid]), 0.0)
            worst_row = max(worst_row, float(np.abs(got - want).max()))
            rows += 1
        assert b.scored.topk_ids[len(ids)][0] == BYTE_EOS or len(ids) < 5
        # teacher tokens: the canonical encoding, the teacher's log-probs along it
        t = r.teacher
        canon = list(encode(tok, text))
        np.testing.assert_array_equal(t.ids, canon)
        np.testing.assert_array_equal(
            t.byte_end, np.cumsum([len(tok.decode([c])) for c in canon]) if canon else []
        )
        seq = [*canon, eos_t]
        for j, c in enumerate(seq):
            p = teacher.table.dist(seq[:j])
            worst_tok = max(worst_tok, abs(float(t.logprob[j]) - math.log(p[c])))
    assert rows > 1000
    assert worst_row < 1e-9, worst_row
    assert worst_tok < 1e-9, worst_tok


TEXTS = [
    "Tab\tand  two  spaces 12  34\n\n  x",
    "café naïve 中文 😀 done.  ",
    "It's 2024-11-22; the price is $1,234.56.",
    f"a{EOS}b c",  # an added token inside the text: one symbol of the byte rows
    "",
]


@pytest.fixture(scope="module")
def random_world():
    tok = trained_byte_bpe(400)
    model = tiny_causal_lm(tok.get_vocab_size(with_added_tokens=True), arch="llama", seed=5)
    teacher = Float64Teacher(model, hf_tokenizer(tok), device="cpu", max_batch_tokens=1024)
    return tok, teacher


def test_three_views_of_one_likelihood_agree(random_world):
    tok, teacher = random_world
    student = SubsetExactScorer(tok, truncate_merges(tok, 60))
    kinds = TargetKinds(tok, ["student", "bytes", "teacher"], student)
    eos = kinds.teacher_eos
    results = kinds.score(teacher, TEXTS, top_k=16, byte_top_k=8)
    tols: list[float] = []
    gaps: list[float] = []  # raw byte-row sum minus the log-likelihood
    for text, r in zip(TEXTS, results, strict=True):
        seq = [*r.teacher.ids.tolist(), eos]
        (tf,) = teacher.teacher_forcing_logprobs([seq])
        ref = float(tf.double().sum())
        s, b = r.student, r.bytes.scored
        # Rounding of two float64 forwards (FLOAT64_TOL per term), plus the resolution of
        # log(1 - noncanonical) when a row's non-canonical share is near 1: a random model
        # puts up to 0.998 and more of a byte row's mass there (SmolLM2: 2e-4 per row on
        # average), and 1 - nc is then known only to eps / (1 - nc) relative.
        resolution = sum(
            float(np.sum(4e-16 / np.maximum(1.0 - x.noncanonical_mass, 1e-300))) for x in (s, b)
        )
        tol = FLOAT64_TOL * len(seq) * 4 + resolution
        views = {
            "teacher": r.teacher.total,
            "student": float(
                s.target_logprobs.sum()
                + np.log1p(-s.noncanonical_mass).sum()
                + np.log1p(-s.unmapped_mass).sum()
            ),
            "bytes": float(
                b.target_logprobs.sum()
                + np.log1p(-b.noncanonical_mass).sum()
                + np.log1p(-b.unmapped_mass).sum()
            ),
        }
        for name, v in views.items():
            assert abs(v - ref) < tol, (text, name, v, ref, tol)
        # the same forward's log-likelihood: the byte scorer's own canonical path sum
        assert abs(b.stats["teacher_logprob"] - views["teacher"]) < FLOAT64_TOL * len(seq)
        tols.append(tol)
        gaps.append(float(b.target_logprobs.sum()) - ref)
        # the added token is one byte row, and rows sum to one with their tail
        assert len(r.bytes.row_start) == len(r.bytes.symbols) + 1
        if EOS in text:  # the end-of-text token inside a text: symbol BYTE_EOS, one row
            assert list(r.bytes.symbols).count(BYTE_EOS) == 1
            assert len(r.bytes.row_start) == len(text.encode()) - len(EOS) + 2
        np.testing.assert_allclose(np.exp(b.topk_logprobs).sum(1) + b.tail_mass, 1.0, atol=1e-9)
        assert r.bytes.row_start[-1] == len(text.encode())
    assert sorted(tols)[len(tols) // 2] < 1e-6, tols  # the bound is tight for most texts
    # a random model puts mass on non-canonical sequences: the correction is not vacuous
    assert max(gaps) > 0.1, gaps


def test_kinds_share_one_forward(random_world):
    tok, _ = random_world
    student = SubsetExactScorer(tok, truncate_merges(tok, 60))
    text = TEXTS[0] + " " + TEXTS[2]

    def nodes(kinds, s=None):
        tk = TargetKinds(tok, kinds, s)
        p = tk.prepare(text)
        return len(p.tree[0]), len(p.teacher_ids) + 1

    t_nodes, canon = nodes(["teacher"])
    assert t_nodes == canon  # the canonical path (start + tokens) and nothing else
    s_nodes, _ = nodes(["student"], student)
    assert nodes(["student", "teacher"], student)[0] == s_nodes  # teacher adds nothing
    b_nodes, _ = nodes(["bytes"])
    all_nodes, _ = nodes(["student", "bytes", "teacher"], student)
    assert max(s_nodes, b_nodes) <= all_nodes < s_nodes + b_nodes  # shared path, merged


def test_kind_selection_and_refusals(random_world):
    tok, _ = random_world
    assert check_kinds(["teacher", "student", "teacher"]) == ("student", "teacher")
    with pytest.raises(ValueError, match="at least one"):
        check_kinds([])
    with pytest.raises(ValueError, match="unknown target kind"):
        check_kinds(["logits"])
    with pytest.raises(ValueError, match="student scorer is needed"):
        TargetKinds(tok, ["student"])
    # bytes the teacher has no symbol for: refused as a bad record
    narrow = tiny_teacher_tokenizer("qwen2")
    with pytest.raises(UnscorableTextError):
        TargetKinds(narrow, ["teacher"]).prepare("abc")
