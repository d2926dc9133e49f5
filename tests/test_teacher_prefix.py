"""HFTeacher.prefix_tree_logprobs: a prefix's keys/values computed once and reused; the
log-probs equal those of the explicit contexts (one tree forward, `next_token_logprobs`)
and of the tree fallback of `pipeline.scoring.trees.prefix_tree_logprobs`.

float32: rows compared where the reference log-prob is > -20, within 1e-4 (a cached
and a tree-packed forward add the same terms in different orders; `tests.test_teacher`
measured up to 1.6e-5 between such forwards). float64 (`Float64Teacher`): `FLOAT64_TOL`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from pipeline.scoring import trees as scoring_trees
from pipeline.scoring.trees import PrefixTree
from pipeline.teacher import HFTeacher
from tests.scoring.float64_teacher import FLOAT64_TOL, Float64Teacher
from tests.tiny_assets import hf_tokenizer, tiny_causal_lm, tiny_teacher_tokenizer

F32_TOL = 1e-4


def _make(arch: str, dtype: str = "float32", max_batch_tokens: int = 1024) -> HFTeacher:
    tok = hf_tokenizer(tiny_teacher_tokenizer())
    # 40 logits for 17 ids: padding columns must be dropped
    model = tiny_causal_lm(len(tok), arch=arch, seed=1, logits=40)
    if dtype == "float64":
        return Float64Teacher(model, tok, device="cpu", max_batch_tokens=max_batch_tokens)
    return HFTeacher(model, tok, device="cpu", max_batch_tokens=max_batch_tokens)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def teacher(arch):
    return _make(arch)


@pytest.fixture(scope="module")
def teacher64(arch):
    return _make(arch, "float64")


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TreeOnly:
    """The teacher without `prefix_tree_logprobs`: `scoring.trees` takes its fallback."""

    def __init__(self, teacher: HFTeacher) -> None:
        self.t = teacher

    def tree_logprobs(self, trees):
        return self.t.tree_logprobs(trees)

    def next_token_logprobs(self, contexts):
        return self.t.next_token_logprobs(contexts)


def _contexts(it: PrefixTree) -> list[list[int]]:
    """The explicit context of every row of an item (points, then nodes)."""
    out = [list(it.prefix[:p]) for p in it.points]
    node: list[list[int]] = []
    for v, par in enumerate(it.parents):
        ctx = list(it.prefix[: it.attach[v]]) if par < 0 else list(node[par])
        node.append([*ctx, int(it.tokens[v])])
    return out + node


def _explicit(teacher: HFTeacher, items: Sequence[PrefixTree]) -> list[torch.Tensor]:
    return [teacher.next_token_logprobs(_contexts(it)) for it in items]


def _item(
    rng: np.random.Generator, P: int, n_points: int, n_nodes: int, vocab: int = 16
) -> PrefixTree:
    prefix = tuple(int(x) for x in rng.integers(0, vocab, P))
    points = sorted({0, P, *(int(x) for x in rng.integers(0, P + 1, n_points))})
    tokens, parents, attach = [], [], []
    for v in range(n_nodes):
        tokens.append(int(rng.integers(0, vocab)))
        if v == 0 or rng.random() < 0.35:  # a new root, at 0, P or anywhere
            parents.append(-1)
            attach.append(int(rng.choice([0, P, int(rng.integers(0, P + 1))])))
        else:
            parents.append(int(rng.integers(max(0, v - 6), v)))  # multi-level subtrees
            attach.append(int(rng.integers(0, P + 1)))  # ignored for a node with a parent
    return PrefixTree(prefix, tuple(points), tuple(tokens), tuple(parents), tuple(attach))


def _items(seed: int) -> list[PrefixTree]:
    rng = np.random.default_rng(seed)
    items = [
        _item(rng, P, n_points, n_nodes)
        for P, n_points, n_nodes in [(0, 1, 3), (1, 2, 4), (7, 3, 0), (40, 6, 25), (90, 10, 40)]
    ]
    # the same prefix again in the same call (a hit), other points and nodes
    again = _item(rng, 40, 3, 12)
    items.append(
        PrefixTree(items[3].prefix, again.points, again.tokens, again.parents, again.attach)
    )
    return items


def _worst(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], floor: float = -20.0) -> float:
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        keep = r > floor
        diff = (g.double() - r.double())[keep].abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


# ------------------------------------------------------------------ equality
def test_native_equals_explicit_contexts_and_fallback(teacher, torch_threads):
    teacher.clear_prefix_cache()
    items = _items(0)
    got = teacher.prefix_tree_logprobs(items)
    assert all(g.dtype == torch.float32 and g.device == teacher.device for g in got)
    assert [g.shape[0] for g in got] == [it.rows for it in items]
    assert teacher.prefix_cache_misses >= 5
    ref = _explicit(teacher, items)
    fallback = scoring_trees.prefix_tree_logprobs(TreeOnly(teacher), items)
    assert _worst(got, ref) < F32_TOL
    assert _worst(got, fallback) < F32_TOL
    assert _worst(teacher._prefix_tree_fallback(items), ref) < F32_TOL
    # again: every prefix cached now (points forwarded again as one-token nodes)
    hits = teacher.prefix_cache_hits
    again = teacher.prefix_tree_logprobs(items)
    assert teacher.prefix_cache_hits == hits + len(items)
    assert _worst(again, ref) < F32_TOL


def test_native_equals_explicit_contexts_float64(teacher64, torch_threads):
    teacher = teacher64
    teacher.clear_prefix_cache()
    items = _items(1)
    ref = _explicit(teacher, items)
    first = teacher.prefix_tree_logprobs(items)  # misses (and one hit)
    second = teacher.prefix_tree_logprobs(items)  # hits
    assert first[0].dtype == torch.float64
    assert _worst(first, ref, floor=-np.inf) < FLOAT64_TOL
    assert _worst(second, ref, floor=-np.inf) < FLOAT64_TOL


# ------------------------------------------------------------------ cache reuse
def test_second_call_forwards_only_new_nodes(teacher):
    teacher.clear_prefix_cache()
    rng = np.random.default_rng(2)
    S = len(teacher.start_ids)
    P = 60
    canon = PrefixTree(tuple(int(x) for x in rng.integers(0, 16, P)), tuple(range(P + 1)))
    f0, m0, h0 = teacher.forwarded_tokens, teacher.prefix_cache_misses, teacher.prefix_cache_hits
    (lp_canon,) = teacher.prefix_tree_logprobs([canon])
    assert teacher.forwarded_tokens - f0 == S + P  # the canonical forward: once, causal
    assert (teacher.prefix_cache_misses, teacher.prefix_cache_hits) == (m0 + 1, h0)
    assert teacher.prefix_cache_stats()["entries"] == 1

    nodes = _item(rng, P, 0, 25)
    item = PrefixTree(canon.prefix, (), nodes.tokens, nodes.parents, nodes.attach)
    f1 = teacher.forwarded_tokens
    (a,) = teacher.prefix_tree_logprobs([item])
    assert teacher.forwarded_tokens - f1 == 25  # only the new nodes, no padding
    assert teacher.prefix_cache_hits == h0 + 1
    (b,) = teacher.prefix_tree_logprobs([item])
    assert torch.equal(a, b)  # the kept keys/values were not changed by the node forward
    assert teacher.prefix_cache_hits == h0 + 2
    assert _worst([a], _explicit(teacher, [item])) < F32_TOL

    # points on a cached prefix: one new position each, the canonical rows again
    some = (0, 1, 30, P)
    f2 = teacher.forwarded_tokens
    (c,) = teacher.prefix_tree_logprobs([PrefixTree(canon.prefix, some)])
    assert teacher.forwarded_tokens - f2 == len(some)
    assert _worst([c], [lp_canon[list(some)]]) < F32_TOL

    # a fresh cache: the prefix is forwarded again, the nodes give the same numbers
    teacher.clear_prefix_cache()
    f3 = teacher.forwarded_tokens
    (d,) = teacher.prefix_tree_logprobs([item])
    assert teacher.forwarded_tokens - f3 == S + P + 25
    assert torch.equal(a, d)


def test_mask_is_applied(teacher):
    """The same token attached at p=1 and at p=P: different distributions, each the
    explicit context's (a mask that was ignored would let both see the whole prefix)."""
    teacher.clear_prefix_cache()
    rng = np.random.default_rng(3)
    P = 20
    prefix = tuple(int(x) for x in rng.integers(0, 16, P))
    x = 5
    item = PrefixTree(prefix, (1, P), (x, x, 7, 7), (-1, -1, 0, 1), (1, P, 0, 0))
    for _ in range(2):  # miss, then hit
        (lp,) = teacher.prefix_tree_logprobs([item])
        assert float((lp[2] - lp[3]).abs().max()) > 1e-2
        assert float((lp[4] - lp[5]).abs().max()) > 1e-2
        ref = teacher.next_token_logprobs(
            [
                prefix[:1],
                prefix,
                [*prefix[:1], x],
                [*prefix, x],
                [*prefix[:1], x, 7],
                [*prefix, x, 7],
            ]
        )
        assert _worst([lp], [ref]) < F32_TOL
    assert teacher.prefix_cache_hits >= 1


# ------------------------------------------------------------------ budget, chunks, limits
def test_eviction_by_bytes(arch):
    teacher = _make(arch)
    rng = np.random.default_rng(4)
    a, b = (PrefixTree(tuple(int(x) for x in rng.integers(0, 16, 30)), (0, 30)) for _ in range(2))
    teacher.prefix_tree_logprobs([a])
    one = teacher.prefix_cache_stats()["bytes"]
    assert one > 0
    teacher.prefix_tree_logprobs([b, a])  # room for both: a is a hit
    assert (teacher.prefix_cache_misses, teacher.prefix_cache_hits) == (2, 1)
    assert teacher.prefix_cache_stats()["bytes"] == 2 * one

    teacher.clear_prefix_cache()
    assert teacher.prefix_cache_stats()["entries"] == 0
    teacher.prefix_cache_bytes = one + one // 2  # room for one prefix
    ref = _explicit(teacher, [a, b])
    got = teacher.prefix_tree_logprobs([a, b, a, b])  # each evicts the other
    assert (teacher.prefix_cache_misses, teacher.prefix_cache_hits) == (6, 1)
    assert teacher.prefix_cache_stats()["entries"] == 1
    assert teacher.prefix_cache_stats()["bytes"] == one
    assert _worst(got, ref + ref) < F32_TOL

    teacher.clear_prefix_cache()
    teacher.prefix_cache_bytes = one - 1  # too big to keep: computed, not kept
    got = teacher.prefix_tree_logprobs([a, a])
    assert teacher.prefix_cache_misses == 8
    assert teacher.prefix_cache_stats()["entries"] == 0
    assert _worst(got, ref[:1] * 2) < F32_TOL


def test_chunked_prefix_and_nodes(arch, teacher, one_thread):
    small = _make(arch, max_batch_tokens=16)
    rng = np.random.default_rng(5)
    P = 50
    nodes = _item(rng, P, 0, 40)  # subtrees of up to a few nodes, 40 nodes in all
    item = PrefixTree(
        nodes.prefix, (0, 7, 15, 16, 17, 33, P), nodes.tokens, nodes.parents, nodes.attach
    )
    ref = _explicit(teacher, [item])  # same weights, one forward
    f0 = small.forwarded_tokens
    got = small.prefix_tree_logprobs([item])  # prefix in 4 forwards, nodes in 3 or more
    assert small.forwarded_tokens - f0 == len(small.start_ids) + P + 40
    assert _worst(got, ref) < F32_TOL
    again = small.prefix_tree_logprobs([item])  # 7 points + 40 nodes in chunks of 16
    assert small.forwarded_tokens - f0 == len(small.start_ids) + P + 40 + 47
    assert _worst(again, ref) < F32_TOL
    # a subtree over the limit is a clear error
    chain = PrefixTree(nodes.prefix, (), (1,) * 17, (-1, *range(16)), (3,) * 17)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        small.prefix_tree_logprobs([chain])


def test_context_over_max_positions_raises(arch):
    teacher = _make(arch)
    teacher.max_positions = 40
    S = len(teacher.start_ids)
    ok = PrefixTree((1,) * (40 - S), (0,), (2,), (-1,), (30,))
    teacher.prefix_tree_logprobs([ok])
    with pytest.raises(ValueError, match="positions"):  # the prefix
        teacher.prefix_tree_logprobs([PrefixTree((1,) * (41 - S), (0,))])
    with pytest.raises(ValueError, match="positions"):  # a node at the end of the prefix
        teacher.prefix_tree_logprobs([PrefixTree(ok.prefix, (), (2,), (-1,), (40 - S,))])
    with pytest.raises(ValueError, match="positions"):  # a deep node
        teacher.prefix_tree_logprobs(
            [PrefixTree(ok.prefix, (), (2,) * 12, (-1, *range(11)), (30,) * 12)]
        )


def test_models_without_a_kv_cache_take_the_tree_forward(teacher):
    """A teacher whose model is no `PreTrainedModel` (e.g. a simulated forward) gets
    `tree_logprobs` over the explicit prefix trees."""
    t = _make("llama")
    t._prefix_cache_ok = False
    items = _items(6)
    f0 = t.forwarded_tokens
    got = t.prefix_tree_logprobs(items)
    assert t.prefix_cache_misses == t.prefix_cache_hits == 0
    assert t.forwarded_tokens > f0
    assert _worst(got, _explicit(t, items)) < F32_TOL
