"""The token walk's cost controls (issue 17): teacher contexts hang off the document's
forward (`pipeline.scoring.trees.PrefixTree`), a per-row ``budget`` of expanded nodes,
and approx mode's token-by-token placement of a dropped trie branch. Checked against the
brute-force worlds' enumerated truth and a real (random) teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.scoring import GeneralScorer
from pipeline.scoring.factory import make_scorer
from pipeline.scoring.general import SPLIT_TOKENS
from pipeline.scoring.trees import PrefixTree, prefix_tree_logprobs
from tests.scoring.float64_teacher import FLOAT64_TOL
from tests.scoring.general_assets import STUDENTS, other_byte_bpe
from tests.scoring.test_general_bruteforce import DOCS, TOL, World, _rows, _world
from tests.scoring.test_general_local import LONG_TEXTS
from tests.tiny_assets import (
    string_distribution,
    student_truth,
    tiny_teacher_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world() -> World:
    return _world(tiny_teacher_tokenizer("qwen2"), string_distribution(5, seed=0))


class _NoPrefix:
    """The same teacher without its native prefix forward (the tree fallback)."""

    def __init__(self, teacher):
        self._t = teacher
        self.start_ids = teacher.start_ids
        self.max_batch_tokens = teacher.max_batch_tokens

    def next_token_logprobs(self, contexts):
        return self._t.next_token_logprobs(contexts)

    def tree_logprobs(self, trees):
        return self._t.tree_logprobs(trees)


@pytest.mark.parametrize("name", ["bpe-gpt2", "bpe-llama3", "sp-metaspace-first"])
@pytest.mark.parametrize("budget", [0, 1, 3])
def test_budget_keeps_the_contracts(world, name, budget):
    """With a budget, approx rows still sum to 1, keep the gold token, equal the truth
    where nothing was estimated and stay within their estimated mass of it; bounded rows
    stay rigorous lower bounds (``row <= truth <= row + unaccounted``)."""
    S = STUDENTS[name]()
    truth = student_truth(S, world.dist)
    kw = dict(max_depth=8, beam=4, min_prob=0.005, byte_model=world.bytes, budget=budget)
    approx = GeneralScorer(world.T, S, "approx", **kw)
    bounded = GeneralScorer(world.T, S, "bounded", **kw)
    assert approx.params["budget"] == budget
    for r, b in zip(
        approx.score(world.teacher, DOCS[::2], top_k=None),
        bounded.score(world.teacher, DOCS[::2], top_k=None),
        strict=True,
    ):
        rows, brows = _rows(r), _rows(b)
        np.testing.assert_allclose(rows.sum(1), 1.0, atol=TOL)
        assert np.all(np.isfinite(r.target_logprobs)), r.text
        for i in range(len(r.student_ids) + 1):
            want = truth.dist(list(r.student_ids[:i]))
            tv = 0.5 * float(np.abs(rows[i] - want).sum())
            assert tv <= r.estimated_mass[i] + TOL, (r.text, i, tv)
            if r.estimated_mass[i] == 0.0:
                np.testing.assert_allclose(rows[i], want, atol=TOL)
            assert np.all(brows[i] <= want + TOL)
            assert np.all(want <= brows[i] + b.unaccounted_mass[i] + TOL)


def test_budget_caps_expansions(random_teacher):
    """Fewer nodes expanded and fewer teacher positions as the budget shrinks; every
    row's expansions off the document's own path stay within it."""
    tok, teacher = random_teacher
    S = other_byte_bpe("qwen2")
    texts = [x[:40] for x in LONG_TEXTS[:2]]
    got = {}
    for budget in (None, 4, 1, 0):
        sc = GeneralScorer(tok, S, "approx", max_depth=6, beam=8, min_prob=1e-3, budget=budget)
        docs = sc.score(teacher, texts, top_k=None)
        assert all(np.all(np.isfinite(d.target_logprobs)) for d in docs)
        got[budget] = sc.last_stats
    exp = [got[b]["rows_expanded"] for b in (None, 4, 1, 0)]
    pos = [got[b]["teacher_contexts"] for b in (None, 4, 1, 0)]
    assert exp == sorted(exp, reverse=True) and exp[0] > exp[-1], exp
    assert pos == sorted(pos, reverse=True) and pos[0] > pos[-1], pos
    with pytest.raises(ValueError, match="budget"):
        GeneralScorer(tok, S, "approx", budget=-1)
    with pytest.raises(ValueError, match="budget"):
        GeneralScorer(tok, S, "bounded", walk="bytes", budget=2)


def test_document_forward_gives_the_same_rows(random_teacher):
    """A teacher with a native prefix forward (contexts hang off the document's kept
    keys and values) and the same teacher through the tree fallback give the same rows;
    the native one forwards fewer positions."""
    tok, teacher = random_teacher
    S = other_byte_bpe("llama3")
    texts = [x[:48] for x in LONG_TEXTS[:2]]
    out, pos = {}, {}
    for mode in ("approx", "bounded"):
        for name, t in (("native", teacher), ("fallback", _NoPrefix(teacher))):
            sc = GeneralScorer(tok, S, mode, max_depth=6, beam=4, min_prob=0.01)
            out[mode, name] = sc.score(t, texts, top_k=None)
            pos[mode, name] = sc.last_stats["teacher_contexts"]
        for a, b in zip(out[mode, "native"], out[mode, "fallback"], strict=True):
            np.testing.assert_allclose(np.exp(a.logprobs), np.exp(b.logprobs), atol=FLOAT64_TOL)
            np.testing.assert_allclose(a.prefix_logprob, b.prefix_logprob, atol=1e-8)
            np.testing.assert_allclose(a.estimated_mass, b.estimated_mass, atol=FLOAT64_TOL)
        assert pos[mode, "native"] < pos[mode, "fallback"], pos


def test_prefix_tree_fallback_contexts(random_teacher):
    """`prefix_tree_logprobs`' fallback: points and nodes get the log-probs after their
    explicit contexts; bad items are refused."""
    _, teacher = random_teacher
    plain = _NoPrefix(teacher)
    D = (5, 9, 17, 33, 65)
    item = PrefixTree(D, (0, 3, 5), (7, 8, 40, 41), (-1, 0, -1, 2), (2, 0, 5, 0))
    stats: dict[str, int] = {}
    (lp,) = prefix_tree_logprobs(plain, [item], stats)
    ctx = [(), D[:3], D, (*D[:2], 7), (*D[:2], 7, 8), (*D, 40), (*D, 40, 41)]
    want = torch.as_tensor(np.asarray(teacher.next_token_logprobs(ctx)))
    np.testing.assert_allclose(lp.double().numpy(), want.double().numpy(), atol=1e-9)
    assert stats["positions"] > 0
    for bad in (
        dict(points=(6,)),
        dict(tokens=(1,), parents=(0,), attach=(0,)),
        dict(tokens=(1,), parents=(-1,), attach=(9,)),
        dict(tokens=(1, 2), parents=(-1,), attach=(0, 0)),
    ):
        with pytest.raises(ValueError):
            PrefixTree(D, **bad)


def test_dropped_branch_placed_token_by_token(world):
    """A dropped trie branch is placed token by token: each of its heavy tokens at its
    own word end, the rest of the branch at the heaviest's (not all of it there)."""
    S = STUDENTS["bpe-gpt2"]()
    sc = GeneralScorer(world.T, S, "approx", max_depth=8, beam=1, min_prob=0.1)
    job = sc._new_job(())
    job.local = [(0, 0)]
    keys = sc.trie.keys
    lo, hi = sc.trie.range(b" ")
    assert hi - lo > 2
    pt = np.zeros(len(keys))
    pt[lo:hi] = np.linspace(1.0, 2.0, hi - lo)
    pt /= pt.sum()
    sc._estimate_range(job, b"a", pt, lo, hi, 1.0, 1.0, 1e-9, 0)
    np.testing.assert_allclose(job.placed + job.remainder, 1.0, atol=1e-12)
    want: dict[int, float] = {}
    assert hi - lo <= SPLIT_TOKENS  # each token at its own word end
    for t in range(lo, hi):
        ids = sc.S.encode((b"a" + keys[t]).decode("utf-8"))
        want[ids[0]] = want.get(ids[0], 0.0) + float(pt[t])
    for g, m in want.items():
        assert job.mass.get(g, 0.0) == pytest.approx(m, abs=1e-12)


def test_job_config_budget():
    """``scoring.general.budget`` reaches the scorer; it needs the token walk."""
    cfg = load_config(None, ["scoring.general.budget=6", "scoring.general.min_prob=0.005"])
    assert cfg.scoring.general.budget == 6
    sc = make_scorer("general", tiny_teacher_tokenizer("qwen2"), STUDENTS["bpe-gpt2"](), cfg)
    assert sc.params["budget"] == 6 and sc.params["min_prob"] == 0.005
    with pytest.raises(ConfigError, match="budget"):
        load_config(
            None,
            [
                "scoring.general.budget=6",
                "scoring.general.walk=bytes",
                "scoring.general.mode=bounded",
            ],
        )


def test_documents_alternate_order_when_the_cache_holds_one(random_teacher):
    """With room for one document's keys/values, the walk still reuses them: levels take
    the documents in alternating order, so each level starts with the last document of
    the previous one (a fixed order would miss every time); rows are unchanged."""
    tok, teacher = random_teacher
    S = other_byte_bpe("qwen2")
    texts = [LONG_TEXTS[0][:40], LONG_TEXTS[1][:40]]
    sc = GeneralScorer(tok, S, "approx", max_depth=6, beam=4, min_prob=0.01)
    teacher.clear_prefix_cache()
    roomy = sc.score(teacher, texts, top_k=None)
    one = max(teacher.prefix_cache_stats()["bytes"] // 2 + 1, 1)
    old = teacher.prefix_cache_bytes
    try:
        teacher.prefix_cache_bytes = one + one // 2  # one document fits, not two
        teacher.clear_prefix_cache()
        teacher.prefix_cache_hits = teacher.prefix_cache_misses = 0
        tight = sc.score(teacher, texts, top_k=None)
        stats = teacher.prefix_cache_stats()
    finally:
        teacher.prefix_cache_bytes = old
        teacher.clear_prefix_cache()
    assert stats["entries"] == 1
    assert stats["hits"] >= 2 and stats["misses"] >= 3, stats
    for a, b in zip(roomy, tight, strict=True):
        np.testing.assert_allclose(np.exp(a.logprobs), np.exp(b.logprobs), atol=FLOAT64_TOL)
