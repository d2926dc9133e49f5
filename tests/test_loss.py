"""`pipeline.loss` against brute force: a dense teacher distribution is sparsified to
top-k + tail the way the scorer and the shard writer store it, and the loss is compared
with the student's full softmax collapsed onto the same bins in numpy float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.loss import IGNORE_INDEX, collapse_student, log1mexp, sparse_kd, sparse_kd_loss
from schemas.targets import decode_topk_logprobs, encode_topk_logprobs

V = 11


def dense_teacher(rng: np.random.Generator, shape: tuple[int, ...], v: int = V, support=None):
    """Random distributions [*shape, v]; with ``support`` only that many ids per row
    have mass (the rest exactly 0)."""
    w = np.exp(rng.normal(0.0, 1.5, size=(*shape, v)))
    if support is not None:
        keep = np.argsort(rng.random((*shape, v)), axis=-1) < support
        w = np.where(keep, w, 0.0)
    return w / w.sum(-1, keepdims=True)


def sparsify(p: np.ndarray, k: int, quantise: bool = True):
    """Dense p [..., v] -> (topk_ids int32, topk_logprobs float32, tail_mass float32) as
    stored: `torch.topk` of the log-probs (the scorer), tail = 1 - sum of the kept
    probabilities clamped at 0, rows padded to k with id 0 / -inf when v < k (the shard
    writer), log-probs through the uint16 quantisation (the schema)."""
    with np.errstate(divide="ignore"):
        logp = torch.from_numpy(np.log(p))
    k_eff = min(k, p.shape[-1])
    vals, idx = torch.topk(logp, k_eff, dim=-1)
    tail = (1.0 - vals.exp().sum(-1)).clamp_min(0.0).numpy()
    ids, lp = idx.numpy(), vals.numpy()
    if k_eff < k:
        pad = (*ids.shape[:-1], k - k_eff)
        ids = np.concatenate([ids, np.zeros(pad, ids.dtype)], -1)
        lp = np.concatenate([lp, np.full(pad, -np.inf)], -1)
    if quantise:
        lp = decode_topk_logprobs(encode_topk_logprobs(lp))
    return (
        torch.from_numpy(ids.astype(np.int32)),
        torch.from_numpy(lp.astype(np.float32)),
        torch.from_numpy(tail.astype(np.float32)),
    )


def reference(logits, ids, lp, tail, mask=None, temperature=1.0, kind="kl") -> float:
    """The loss by brute force in float64: full softmax, bins summed explicitly."""
    z = logits.detach().double().numpy() / temperature
    q = np.exp(z - z.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    ids, lp, tail = ids.numpy(), lp.double().numpy(), tail.double().numpy()
    mask = np.ones(tail.shape, bool) if mask is None else mask.numpy()
    total, n = 0.0, 0
    for pos in zip(*np.nonzero(mask), strict=True):
        present = np.isfinite(lp[pos])
        kept = ids[pos][present]
        p_bins = np.append(np.exp(lp[pos][present]), tail[pos])
        outside = np.ones(q.shape[-1], bool)
        outside[kept] = False
        # k = V leaves no ids outside: the student's tail is 0 and the teacher's is
        # rounding noise (~1e-16); the loss floors the student's tail, so does this
        q_bins = np.append(q[pos][kept], max(q[pos][outside].sum(), 1e-30))
        nz = p_bins > 0
        if kind == "kl":
            val = np.sum(p_bins[nz] * (np.log(p_bins[nz]) - np.log(q_bins[nz])))
        else:
            val = -np.sum(p_bins[nz] * np.log(q_bins[nz]))
        total += val * temperature**2
        n += 1
    return total / max(n, 1)


def make_batch(seed: int, B=3, T=5, k=4, v=V, support=None, quantise=True, vocab_pad=0):
    rng = np.random.default_rng(seed)
    p = dense_teacher(rng, (B, T), v, support)
    ids, lp, tail = sparsify(p, k, quantise)
    mask = torch.from_numpy(rng.random((B, T)) < 0.8)
    mask[0, 0] = True
    labels = torch.from_numpy(rng.integers(0, v, (B, T)))
    labels[~mask] = IGNORE_INDEX
    batch = {
        "topk_ids": ids,
        "topk_logprobs": lp,
        "tail_mass": tail,
        "loss_mask": mask,
        "labels": labels,
    }
    logits = torch.from_numpy(rng.normal(0.0, 2.0, (B, T, v + vocab_pad)).astype(np.float32))
    return p, batch, logits


def _args(batch):
    return batch["topk_ids"], batch["topk_logprobs"], batch["tail_mass"], batch["loss_mask"]


# ---------------------------------------------------------------- against brute force
@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize(
    ("k", "support", "vocab_pad"),
    [(1, None, 0), (4, None, 0), (4, 3, 0), (V, None, 0), (V + 3, None, 0), (4, 2, 5)],
)
def test_matches_dense_bruteforce(kind, temperature, k, support, vocab_pad):
    """Top-k (incl. k = 1, k = V, k > V with padded rows, rows with fewer than k ids of
    mass, padded student logits) at several temperatures, quantised as stored."""
    _, batch, logits = make_batch(7, k=k, support=support, vocab_pad=vocab_pad)
    got = sparse_kd_loss(logits, batch, temperature=temperature, kind=kind)
    want = reference(logits, *_args(batch), temperature=temperature, kind=kind)
    assert got.dtype == torch.float32
    assert abs(got.item() - want) < 1e-5 * max(1.0, abs(want)), (got.item(), want)


def test_reductions_agree_with_per_position_reference():
    _, batch, logits = make_batch(3, k=3)
    per = sparse_kd_loss(logits, batch, reduction="none")
    mask = batch["loss_mask"]
    assert per.shape == mask.shape
    assert torch.all(per[~mask] == 0)
    for b, t in zip(*torch.nonzero(mask, as_tuple=True), strict=True):
        one = {key: v[b : b + 1, t : t + 1] for key, v in batch.items()}
        want = reference(logits[b : b + 1, t : t + 1], *_args(one))
        assert abs(per[b, t].item() - want) < 1e-5
    total = sparse_kd_loss(logits, batch, reduction="sum")
    mean = sparse_kd_loss(logits, batch)
    assert torch.allclose(total, per.sum())
    assert torch.allclose(mean, per.sum() / mask.sum())


# ---------------------------------------------------------------- KL properties
def test_kl_is_zero_when_the_student_matches_the_bins():
    """k < V: the student puts the teacher's top-k probabilities on the stored ids and
    spreads the tail over the rest (its collapsed distribution is the teacher's bins),
    however it spreads it."""
    rng = np.random.default_rng(1)
    p = dense_teacher(rng, (2, 6))
    k = 4
    ids, lp, tail = sparsify(p, k, quantise=False)
    other = np.log(rng.dirichlet(np.ones(V - k), size=(2, 6)))
    logits = torch.empty(2, 6, V, dtype=torch.float64)
    for b in range(2):
        for t in range(6):
            rest = [j for j in range(V) if j not in set(ids[b, t].tolist())]
            logits[b, t, ids[b, t].long()] = lp[b, t].double()
            logits[b, t, rest] = torch.from_numpy(np.log(tail[b, t].item()) + other[b, t])
    kl = sparse_kd(logits.float(), ids, lp, tail, reduction="none")
    assert kl.abs().max().item() < 1e-5
    # and not zero for a student that does not match
    assert sparse_kd(logits.float() + torch.randn(2, 6, V), ids, lp, tail).item() > 1e-3


def test_kl_with_k_equal_v_is_the_full_kl():
    rng = np.random.default_rng(2)
    p = dense_teacher(rng, (3, 4))
    ids, lp, tail = sparsify(p, V, quantise=False)
    assert torch.all(tail < 1e-6)
    # student = teacher: zero
    same = sparse_kd(torch.from_numpy(np.log(p)).float(), ids, lp, tail)
    assert abs(same.item()) < 1e-5
    # random student: the dense KL(p || softmax(z))
    z = torch.randn(3, 4, V, dtype=torch.float64)
    logq = torch.log_softmax(z, -1).numpy()
    want = np.sum(p * (np.log(p) - logq), -1).mean()
    assert abs(sparse_kd(z.float(), ids, lp, tail).item() - want) < 1e-5


@pytest.mark.parametrize("seed", range(20))
def test_kl_is_nonnegative_on_random_inputs(seed):
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(1, V + 2))
    support = None if seed % 3 else int(rng.integers(1, V))
    _, batch, logits = make_batch(seed, k=k, support=support, quantise=False)
    logits = logits * float(rng.uniform(0.1, 10.0))
    temperature = float(rng.choice([0.5, 1.0, 3.0]))
    per = sparse_kd_loss(logits, batch, temperature=temperature, reduction="none")
    assert per.min().item() >= -1e-6
    # ce = kl + the teacher's entropy over the bins >= kl
    ce = sparse_kd_loss(logits, batch, temperature=temperature, kind="ce", reduction="none")
    assert torch.all(ce >= per - 1e-6)


# ---------------------------------------------------------------- gradients
def _grad(logits, batch, **kw):
    x = logits.clone().requires_grad_(True)
    loss = sparse_kd_loss(x, batch, **kw)
    loss.backward()
    assert x.grad is not None
    return loss, x.grad


def test_gradients_finite_when_the_tail_is_zero():
    """k = V and rows whose support is exactly the top-k: tail_mass is 0."""
    for k, support in ((V, None), (4, 4)):
        _, batch, logits = make_batch(5, k=k, support=support, quantise=False)
        assert torch.all(batch["tail_mass"] < 1e-6)
        loss, grad = _grad(logits, batch, kind="kl")
        assert torch.isfinite(loss)
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


@pytest.mark.parametrize("scale", [20.0, 200.0])
def test_gradients_finite_when_the_student_puts_all_mass_on_the_topk(scale):
    """The student's tail probability underflows (scale 200: to exactly 0 in float32);
    the teacher's tail is not 0, so the loss is large and must still train."""
    _, batch, logits = make_batch(6, k=3)
    assert torch.all(batch["tail_mass"] > 0.01)
    hot = torch.full_like(logits, -scale)
    hot.scatter_(-1, batch["topk_ids"].long(), scale)
    for kind in ("kl", "ce"):
        loss, grad = _grad(hot, batch, kind=kind)
        assert torch.isfinite(loss) and loss.item() > 1.0
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0
    # a gradient step moves mass back into the tail
    _, grad = _grad(hot, batch)
    after = sparse_kd_loss(hot - 0.5 * grad / grad.abs().max(), batch)
    assert after.item() < sparse_kd_loss(hot, batch).item()


def test_gradient_is_correct_gradcheck():
    _, batch, logits = make_batch(8, B=2, T=3, k=3, support=5)
    x = logits.double().requires_grad_(True)
    for kind in ("kl", "ce"):
        assert torch.autograd.gradcheck(
            lambda z, kind=kind: sparse_kd_loss(
                z, batch, temperature=1.5, kind=kind, ce_weight=0.2
            ),
            (x,),
        )


def test_log1mexp_is_accurate_and_has_finite_gradients():
    x = torch.tensor([-1e-7, -1e-3, -0.5, -0.7, -1.0, -30.0, -200.0], dtype=torch.float64)
    x.requires_grad_(True)
    y = log1mexp(x)
    mpmath = pytest.importorskip("mpmath")  # installed with torch (sympy)
    with mpmath.workdps(120):  # 1 - exp(-200) needs ~90 digits
        want = [float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()]
    assert np.allclose(y.detach().numpy(), want, rtol=1e-12, atol=0)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- masks and padding
def test_masked_positions_do_not_change_the_loss():
    _, batch, logits = make_batch(9, k=4)
    mask = batch["loss_mask"]
    assert (~mask).any()
    other = logits.clone()
    other[~mask] = torch.randn_like(other[~mask]) * 50.0
    for kw in ({"kind": "kl"}, {"kind": "ce"}, {"ce_weight": 0.5}):
        assert torch.equal(sparse_kd_loss(logits, batch, **kw), sparse_kd_loss(other, batch, **kw))
    # while changing an unmasked position does change it
    b, t = mask.nonzero()[0].tolist()
    other[b, t] += torch.randn(V) * 5
    assert sparse_kd_loss(other, batch).item() != sparse_kd_loss(logits, batch).item()
    # the gradient at masked positions is zero
    _, grad = _grad(logits, batch, ce_weight=0.3)
    assert torch.all(grad[~mask] == 0)


def test_all_masked_gives_zero_not_nan():
    _, batch, logits = make_batch(10)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    loss, grad = _grad(logits, batch, ce_weight=0.5)
    assert loss.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("pad_with_zero", [False, True])
@pytest.mark.parametrize("zero_in_support", [False, True])
def test_missing_entries_are_ignored(zero_in_support, pad_with_zero):
    """Rows with fewer than k ids of mass end in -inf entries (ids as `torch.topk`
    leaves them, or id 0 as the writer pads): the loss equals that of the same rows cut
    to their present entries, whether or not id 0 is itself a stored id (else it would
    be counted twice), and the student's mass at a padded id 0 that the teacher does
    not list stays in the tail bin."""
    rng = np.random.default_rng(11)
    support, k = 3, 6
    p = dense_teacher(rng, (2, 4), support=support)
    if zero_in_support:
        p[..., 0] += 0.5
    else:
        p[..., 0] = 0.0
    p /= p.sum(-1, keepdims=True)
    ids, lp, tail = sparsify(p, k)
    present = torch.isfinite(lp)
    n_present = int(present.sum(-1).max())
    assert n_present < k and (~present).any()
    if pad_with_zero:
        ids[~present] = 0
    logits = torch.randn(2, 4, V)
    logits[..., 0] += 3.0  # the student likes id 0: double counting would show
    padded = sparse_kd(logits, ids, lp, tail)
    cut = sparse_kd(logits, ids[..., :n_present], lp[..., :n_present], tail)
    assert torch.allclose(padded, cut, atol=1e-6)
    assert abs(padded.item() - reference(logits, ids, lp, tail)) < 1e-5
    # the collapsed student distribution sums to 1 over the present bins + tail
    logq_k, logq_tail = collapse_student(logits, ids, present)
    total = torch.where(present, logq_k.exp(), 0).sum(-1) + logq_tail.exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)


def test_student_vocab_padding_and_too_small_vocab():
    _, batch, logits = make_batch(12, k=5)
    base = sparse_kd_loss(logits, batch)
    # padding rows of the embedding that the student never predicts (-inf) change nothing
    padded = torch.cat([logits, torch.full((*logits.shape[:2], 7), -torch.inf)], -1)
    assert torch.allclose(sparse_kd_loss(padded, batch), base, atol=1e-6)
    # a vocab smaller than the largest stored id is an error that says so
    hi = int(batch["topk_ids"].max())
    with pytest.raises(ValueError, match="student vocab is smaller"):
        sparse_kd_loss(logits[..., :hi], batch)


# ---------------------------------------------------------------- CE mixing, dtype, temperature
def test_ce_weight_one_is_plain_cross_entropy():
    _, batch, logits = make_batch(13)
    labels = batch["labels"]
    assert (labels == IGNORE_INDEX).any()
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(sparse_kd_loss(logits, batch, ce_weight=1.0), want, atol=1e-6)
    # a mix is the weighted sum of the two terms
    kd = sparse_kd_loss(logits, batch)
    mixed = sparse_kd_loss(logits, batch, ce_weight=0.25)
    assert torch.allclose(mixed, 0.75 * kd + 0.25 * want, atol=1e-6)
    with pytest.raises(ValueError):
        sparse_kd_loss(logits, batch, ce_weight=1.5)


def test_half_precision_logits_are_computed_in_float32():
    _, batch, logits = make_batch(14, k=4)
    half = (logits * 4).to(torch.bfloat16)
    got = sparse_kd_loss(half, batch, ce_weight=0.1)
    assert got.dtype == torch.float32
    want = sparse_kd_loss(half.float(), batch, ce_weight=0.1)
    assert torch.equal(got, want)
    x = half.clone().requires_grad_(True)
    sparse_kd_loss(x, batch).backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad.float()).all()


def test_temperature_scales_student_logits_and_multiplies_by_t_squared():
    _, batch, logits = make_batch(15, k=4)
    for tau in (0.5, 2.0, 4.0):
        for kind in ("kl", "ce"):
            at_tau = sparse_kd_loss(logits, batch, temperature=tau, kind=kind)
            pre = sparse_kd_loss(logits / tau, batch, temperature=1.0, kind=kind)
            assert torch.allclose(at_tau, tau**2 * pre, rtol=1e-5)
        # the hard-label term ignores the temperature
        ce = [sparse_kd_loss(logits, batch, temperature=t, ce_weight=1.0) for t in (1.0, tau)]
        assert torch.equal(ce[0], ce[1])
    with pytest.raises(ValueError):
        sparse_kd_loss(logits, batch, temperature=0.0)


def test_shape_mismatch_raises():
    _, batch, logits = make_batch(16)
    with pytest.raises(ValueError, match="shapes disagree"):
        sparse_kd_loss(logits[:, :-1], batch)
