"""The general scorer's approx mode against the enumerated truth of the brute-force worlds
(`tests.scoring.test_general_bruteforce`): rows sum to 1, the document's own next token
never gets probability 0, rows where nothing was estimated equal the truth, and the
estimated mass bounds the error (the enumerated part of a row is a bounded row, so
``TV(row, truth) <= estimated_mass``). Also: ``bounded`` is today's ``fast``.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.scoring import GeneralScorer, Regime
from tests.scoring.float64_teacher import FLOAT64_TOL
from tests.scoring.general_assets import STUDENTS, other_byte_bpe
from tests.scoring.test_general_bruteforce import DOCS, SEP, TOL, World, _rows, _world
from tests.scoring.test_general_local import LONG_TEXTS
from tests.tiny_assets import (
    all_strings,
    string_distribution,
    student_truth,
    tiny_teacher_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world() -> World:
    """The brute-force tests' world (their ``world`` fixture)."""
    return _world(tiny_teacher_tokenizer("qwen2"), string_distribution(5, seed=0))


# pruning settings from harsh to none: (min_prob, beam)
SETTINGS = [(0.3, 1), (0.05, 2), (0.005, 4), (0.0, 10**9)]
# a byte-level BPE of each regex, SentencePiece layouts (legacy: every row needs the end
# of text; Metaspace "first": two roots per row), the byte student
APPROX_STUDENTS = ["bpe-gpt2", "bpe-qwen2", "bpe-llama3", "sp-legacy", "sp-metaspace-first"]
APPROX_STUDENTS += ["sp-llama2", "bytes"]


def _approx(world, S, min_prob: float, beam: int, docs=DOCS):
    sc = GeneralScorer(
        world.T, S, "approx", max_depth=8, beam=beam, min_prob=min_prob, byte_model=world.bytes
    )
    return sc, sc.score(world.teacher, docs, top_k=None)


@pytest.mark.parametrize("name", APPROX_STUDENTS)
def test_approx_rows_against_truth(world, name):
    S = STUDENTS[name]()
    truth = student_truth(S, world.dist)
    docs = DOCS[::2]
    estimated_rows = exact_rows = 0
    for min_prob, beam in SETTINGS:
        sc, results = _approx(world, S, min_prob, beam, docs)
        assert sc.name == "general-approx" and sc.params["mode"] == "approx"
        for r in results:
            rows = _rows(r)
            est = r.estimated_mass
            assert est is not None and est.shape == (len(r.student_ids) + 1,)
            np.testing.assert_allclose(rows.sum(1), 1.0, atol=TOL)
            assert np.all(r.unaccounted_mass == 0.0)
            assert np.all(r.regime == Regime.APPROXIMATE)
            assert np.all((est >= 0.0) & (est <= 1.0))
            # the gold (actual next) token is never estimated away
            assert np.all(np.isfinite(r.target_logprobs)), (r.text, r.target_logprobs)
            for i in range(len(r.student_ids) + 1):
                want = truth.dist(list(r.student_ids[:i]))
                assert want is not None
                if est[i] == 0.0:
                    exact_rows += 1
                    np.testing.assert_allclose(rows[i], want, atol=TOL)
                else:
                    estimated_rows += 1
                    # the enumerated part is a rigorous bounded row: the error is at
                    # most the estimated mass
                    tv = 0.5 * float(np.abs(rows[i] - want).sum())
                    assert tv <= est[i] + TOL, (r.text, i, tv, est[i])
        if min_prob == 0.0:  # nothing pruned: every row enumerated, equal to the truth
            assert all(np.all(r.estimated_mass == 0.0) for r in results)
    assert exact_rows > 0
    if name != "bytes":  # a byte student decides after one byte: nothing to prune
        assert estimated_rows > 0


def test_gold_token_kept_where_bounded_loses_it(world):
    """At a harsh setting the bounded rows put 0 on the document's own next token in
    some rows; approx rows never do, and beat them against the truth."""
    S = STUDENTS["sp-legacy"]()  # no pre-tokenizer: every row needs the end of text
    truth = student_truth(S, world.dist)
    kw = dict(max_depth=8, beam=1, min_prob=0.3, byte_model=world.bytes)
    bounded = GeneralScorer(world.T, S, "bounded", **kw).score(world.teacher, DOCS, top_k=None)
    approx = GeneralScorer(world.T, S, "approx", **kw).score(world.teacher, DOCS, top_k=None)
    lost = sum(int(np.sum(~np.isfinite(r.target_logprobs))) for r in bounded)
    assert lost > 0
    assert all(np.all(np.isfinite(r.target_logprobs)) for r in approx)
    tv_b, tv_a = [], []
    for b, a in zip(bounded, approx, strict=True):
        np.testing.assert_array_equal(a.student_ids, b.student_ids)
        for i in range(len(a.student_ids) + 1):
            want = truth.dist(list(a.student_ids[:i]))
            rb = _renormalised(_rows(b))[i]  # bounded, renormalised
            tv_b.append(0.5 * float(np.abs(rb - want).sum()))
            tv_a.append(0.5 * float(np.abs(_rows(a)[i] - want).sum()))
    assert np.mean(tv_a) < np.mean(tv_b), (np.mean(tv_a), np.mean(tv_b))


def test_bounded_is_the_old_fast_mode(world):
    """``fast`` is a deprecated alias of ``bounded``: the same rows, bit for bit; the
    name and params keep the spelling given (manifests written before stay valid)."""
    S = STUDENTS["sp-metaspace-first"]()
    out = {}
    for mode in ("fast", "bounded"):
        sc = GeneralScorer(
            world.T, S, mode, max_depth=8, beam=2, min_prob=0.02, byte_model=world.bytes
        )
        out[mode] = sc.score(world.teacher, DOCS[::3], top_k=None)
        assert sc.name == f"general-{mode}" and sc.params["mode"] == mode
        assert sc.kind == "bounded" and sc.regime == Regime.APPROXIMATE
    for a, b in zip(out["fast"], out["bounded"], strict=True):
        for f in ("logprobs", "target_logprobs", "unaccounted_mass", "unmapped_mass"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
        np.testing.assert_array_equal(a.regime, b.regime)
        np.testing.assert_array_equal(a.prefix_logprob, b.prefix_logprob)
        np.testing.assert_array_equal(a.noncanonical_mass, b.noncanonical_mass)
        assert np.all(a.estimated_mass == 0.0)
    assert any(r.unaccounted_mass.max() > 0 for r in out["bounded"])


@pytest.mark.parametrize("name", ["bpe-gpt2", "sp-metaspace-never"])
def test_approx_texts_with_added_tokens(name):
    """Texts holding an added token both tokenizers have (`test_general_bruteforce`'s
    sep world): rows after it continue from the teacher's ids up to it (the frame);
    approx rows sum to 1, keep the gold token, and equal the truth where nothing was
    estimated."""
    T = tiny_teacher_tokenizer("qwen2")
    T.add_special_tokens([SEP])
    short = all_strings(2)
    strings = list(dict.fromkeys([*all_strings(3), *(a + SEP + b for a in short for b in short)]))
    w = np.exp(np.random.default_rng(11).normal(0.0, 1.5, len(strings)))
    sep = _world(T, dict(zip(strings, (w / w.sum()).tolist(), strict=True)))
    S = STUDENTS[name]()
    S.add_special_tokens([SEP])
    truth = student_truth(S, sep.dist)
    docs = [SEP, "a" + SEP, SEP + "1", "ab" + SEP + " a", "1 " + SEP + "b"]
    docs += [s for s in sep.dist if SEP in s][::5]
    sc = GeneralScorer(sep.T, S, "approx", max_depth=8, beam=1, min_prob=0.05)
    estimated = 0
    for r in sc.score(sep.teacher, docs, top_k=None):
        rows = _rows(r)
        np.testing.assert_allclose(rows.sum(1), 1.0, atol=TOL)
        assert np.all(np.isfinite(r.target_logprobs)), r.text
        for i in range(len(r.student_ids) + 1):
            want = truth.dist(list(r.student_ids[:i]))
            tv = 0.5 * float(np.abs(rows[i] - want).sum())
            assert tv <= r.estimated_mass[i] + TOL, (r.text, i)
            estimated += int(r.estimated_mass[i] > 0.0)
    assert estimated > 0


def test_approx_rows_do_not_depend_on_the_batch(world):
    """A row's protected path is its own document's: the same document scored alone or
    among others that share its prefixes gets the same rows."""
    S = STUDENTS["bpe-gpt2"]()
    sc = GeneralScorer(world.T, S, "approx", max_depth=8, beam=1, min_prob=0.1)
    docs = ["ab a", "ab 1", "ab  b", "a", "ab a1"]
    together = sc.score(world.teacher, docs, top_k=None)
    for d, t in zip(docs, together, strict=True):
        (alone,) = sc.score(world.teacher, [d], top_k=None)
        np.testing.assert_allclose(np.exp(alone.logprobs), np.exp(t.logprobs), atol=1e-12)
        np.testing.assert_allclose(alone.estimated_mass, t.estimated_mass, atol=1e-12)


def test_approx_topk_and_errors(world):
    S = STUDENTS["bpe-qwen2"]()
    sc = GeneralScorer(world.T, S, "approx", max_depth=8, beam=2, min_prob=0.05)
    docs = ["ab 1 ", "11  b", "", " a", "a b a"]
    dense = sc.score(world.teacher, docs, top_k=None)
    sparse = sc.score(world.teacher, docs, top_k=3)
    for d, s in zip(dense, sparse, strict=True):
        total = np.exp(s.topk_logprobs).sum(1) + s.tail_mass + s.unaccounted_mass
        np.testing.assert_allclose(total, 1.0, atol=1e-12)
        np.testing.assert_array_equal(s.estimated_mass, d.estimated_mass)
        np.testing.assert_allclose(s.target_logprobs, d.target_logprobs)
    assert "max_estimated" in dense[0].stats
    with pytest.raises(ValueError, match="walk='tokens'"):
        GeneralScorer(world.T, S, "approx", walk="bytes")
    with pytest.raises(ValueError, match="mode"):
        GeneralScorer(world.T, S, "greedy")


def test_random_teacher_approx_against_a_generous_reference(random_teacher):
    """A real (random) teacher. A generous bounded run is a rigorous lower bound on the
    truth (``ref <= truth``), so ``sum_g max(0, ref(g) - row(g))`` is a lower bound on
    an approx row's TV to the truth, which its estimated mass bounds from above. Approx
    rows sum to 1, keep the gold token, and are closer to the reference than the
    renormalised bounded rows of the same setting."""
    tok, teacher = random_teacher
    texts = [x[:40] for x in LONG_TEXTS]
    S = other_byte_bpe("qwen2")
    small = dict(max_depth=6, beam=2, min_prob=0.05)
    ref = GeneralScorer(tok, S, "bounded", max_depth=6, beam=32, min_prob=1e-4)
    approx = GeneralScorer(tok, S, "approx", **small)
    bounded = GeneralScorer(tok, S, "bounded", **small)
    out = {}
    for name, sc in (("ref", ref), ("approx", approx), ("bounded", bounded)):
        out[name] = sc.score(teacher, texts, top_k=None)
    tv_a, tv_b = [], []
    for r, a, b in zip(out["ref"], out["approx"], out["bounded"], strict=True):
        np.testing.assert_array_equal(r.student_ids, a.student_ids)
        pr, pa, pb = _rows(r), _rows(a), _rows(b)
        np.testing.assert_allclose(pa.sum(1), 1.0, atol=1e-9)
        assert np.all(np.isfinite(a.target_logprobs))
        assert np.all((a.estimated_mass >= 0.0) & (a.estimated_mass <= 1.0))
        assert np.all(a.unaccounted_mass == 0.0)
        lower = np.clip(pr - pa, 0.0, None).sum(1)
        assert np.all(lower <= a.estimated_mass + FLOAT64_TOL), (lower, a.estimated_mass)
        near = r.unaccounted_mass <= 0.05  # the reference is within 0.05 of the truth
        rn, bn = _renormalised(pr), _renormalised(pb)
        tv_a.extend(0.5 * np.abs(pa - rn).sum(1)[near])
        tv_b.extend(0.5 * np.abs(bn - rn).sum(1)[near])
    assert len(tv_a) > 10
    assert np.mean(tv_a) < np.mean(tv_b), (np.mean(tv_a), np.mean(tv_b))


def _renormalised(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to sum 1 (an all-zero row stays 0)."""
    s = rows.sum(1, keepdims=True)
    return rows / np.where(s > 0.0, s, 1.0)
