"""`pipeline.loss.alm_loss` (Approximate Likelihood Matching on aligned chunks),
`pipeline.loss.byte_head_loss` (byte-level distillation) and `pipeline.heads.ByteHead`
against float64 brute force written with explicit Python loops and `math`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.heads import ByteHead
from pipeline.loss import (
    ALM_DISTANCES,
    IGNORE_INDEX,
    alm_chunk_distance,
    alm_loss,
    alm_student_chunk_logprobs,
    byte_head_loss,
)

# ---------------------------------------------------------------------------- brute force


def log_softmax_row(row: list[float], temperature: float) -> list[float]:
    z = [x / temperature for x in row]
    hi = max(z)
    lse = hi + math.log(sum(math.exp(x - hi) for x in z))
    return [x - lse for x in z]


def ref_distance(s: float, t: float, distance: str, tau: float, eps: float) -> float:
    """One chunk's distance in float64 from the Bernoulli definitions, written out."""
    t = min(max(t, -1.0e4), 0.0)
    s = min(s, 0.0)
    if distance == "abs":
        return abs(t - s)
    if distance == "binary_kl_temp_limit":
        a, b = t - eps, s - eps
        return (a - b) - a * (math.log(-a) - math.log(-b))
    a, b = t / tau - eps, s / tau - eps
    p, q = math.exp(a), math.exp(b)
    one_p, one_q = -math.expm1(a), -math.expm1(b)  # 1 - p, 1 - q
    if distance == "abs_exp":
        return abs(p - q)
    if distance == "binary_ce":
        return -(p * math.log(q) + one_p * math.log(one_q))
    if distance == "binary_kl":
        return p * (math.log(p) - math.log(q)) + one_p * (math.log(one_p) - math.log(one_q))
    assert distance == "reverse_binary_kl"
    return q * (math.log(q) - math.log(p)) + one_q * (math.log(one_q) - math.log(one_p))


def ref_alm(logits, labels, chunk, t_logp, c_mask, *, temperature, tau, distance, eps):
    """The ALM loss by loops: per chunk, sum the student's token log-probs, then the
    distance; mean over counted chunks (chunks with no labelled token do not count)."""
    z = logits.detach().double().tolist()
    labels, chunk = labels.tolist(), chunk.tolist()
    t_logp, c_mask = t_logp.double().tolist(), c_mask.tolist()
    total, n = 0.0, 0
    for b in range(len(labels)):
        for c in range(len(t_logp[b])):
            if not c_mask[b][c]:
                continue
            s, n_tok = 0.0, 0
            for t in range(len(labels[b])):
                if chunk[b][t] == c and labels[b][t] != IGNORE_INDEX:
                    s += log_softmax_row(z[b][t], temperature)[labels[b][t]]
                    n_tok += 1
            if n_tok == 0:
                continue
            total += ref_distance(s, t_logp[b][c], distance, tau, eps)
            n += 1
    return total / max(n, 1), n


def alm_case(seed: int, dtype=torch.float64):
    """B=2, L=7, V=11; chunks of 1-3 tokens incl. single-token chunks, a chunk the student
    and teacher give probability ~1, -100 labels, positions outside every chunk, masked
    chunks (one with a NaN teacher value) and a counted chunk with no labelled token."""
    g = torch.Generator().manual_seed(seed)
    B, L, V, C = 2, 7, 11, 5
    logits = torch.randn(B, L, V, generator=g, dtype=dtype) * 2.0
    labels = torch.randint(0, V, (B, L), generator=g)
    # row 0: chunks [0], [1, 2], [3], [4, 5, 6]  (chunk 4 counted but has no tokens)
    # row 1: position 0 in no chunk, [1, 2, 3], [4], -100 at 5, [6]
    chunk = torch.tensor([[0, 1, 1, 2, 3, 3, 3], [-1, 0, 0, 0, 1, 2, 3]])
    labels[1, 5] = IGNORE_INDEX
    labels[1, 0] = IGNORE_INDEX
    # a near-certain single-token chunk: the label's logit far above the rest
    logits[0, 0, labels[0, 0]] = 40.0
    t_logp = -torch.rand(B, C, generator=g, dtype=torch.float32) * 6.0
    t_logp[0, 0] = -1e-7  # the teacher is near-certain of it too
    mask = torch.ones(B, C, dtype=torch.bool)
    mask[0, 2] = False
    mask[1, 4] = False
    t_logp[1, 4] = float("nan")  # a masked chunk's value is never read
    batch = {
        "alm_labels": labels,
        "alm_chunk": chunk,
        "alm_chunk_logprob": t_logp,
        "alm_chunk_mask": mask,
    }
    return logits, batch


# ---------------------------------------------------------------------------- ALM


@pytest.mark.parametrize("distance", ALM_DISTANCES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature,tau", [(1.0, 100.0), (2.0, 1.0), (0.7, 7.5)])
def test_alm_matches_float64_bruteforce(distance, seed, temperature, tau):
    logits, batch = alm_case(seed)
    got = alm_loss(logits, batch, temperature=temperature, binarization_temp=tau, distance=distance)
    want, n = ref_alm(
        logits,
        batch["alm_labels"],
        batch["alm_chunk"],
        batch["alm_chunk_logprob"],
        batch["alm_chunk_mask"],
        temperature=temperature,
        tau=tau,
        distance=distance,
        eps=1e-6,
    )
    assert n == 6  # 4 + 4 chunks, minus 2 masked, minus the counted one with no tokens
    assert got.dtype == torch.float64
    assert math.isfinite(want)
    assert got.item() == pytest.approx(want, abs=1e-10, rel=1e-10)


def test_alm_student_chunk_logprobs_and_reductions():
    logits, batch = alm_case(3)
    lp, n_tok = alm_student_chunk_logprobs(
        logits, batch["alm_labels"], batch["alm_chunk"], 5, temperature=1.0
    )
    assert n_tok.tolist() == [[1, 2, 1, 3, 0], [3, 1, 0, 1, 0]]
    lsm = torch.log_softmax(logits, -1)
    lab = batch["alm_labels"]
    assert lp[0, 1].item() == pytest.approx(
        (lsm[0, 1, lab[0, 1]] + lsm[0, 2, lab[0, 2]]).item(), abs=1e-12
    )
    assert lp[0, 4].item() == 0.0 and lp[1, 2].item() == 0.0  # no tokens
    per = alm_loss(logits, batch, reduction="none")
    assert per.shape == (2, 5)
    counted = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 0, 1, 0]], dtype=torch.bool)
    assert bool((per[~counted] == 0).all()) and bool((per[counted] > 0).all())
    total = alm_loss(logits, batch, reduction="sum")
    assert total.item() == pytest.approx(per.sum().item(), abs=1e-12)
    assert alm_loss(logits, batch).item() == pytest.approx(total.item() / 6, abs=1e-12)


@pytest.mark.parametrize("distance", ALM_DISTANCES)
def test_alm_gradcheck(distance):
    logits, batch = alm_case(4)
    # keep "abs"/"abs_exp" away from their kink: teacher and student differ on every chunk
    logits = logits.clone().requires_grad_(True)

    def f(x):
        return alm_loss(
            x, batch, temperature=1.3, binarization_temp=3.0, distance=distance
        ) + alm_loss(x, batch, temperature=1.0, binarization_temp=100.0, distance=distance)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-6, rtol=1e-5)
    logits.grad = None
    f(logits).backward()
    g = logits.grad
    assert g is not None and bool(torch.isfinite(g).all())
    # positions outside every counted chunk get no gradient: row 1, position 0 (no chunk),
    # position 5 (-100) and position 6 (chunk 3 of row 1 is counted: it does get one)
    assert bool((g[1, 0] == 0).all()) and bool((g[1, 5] == 0).all())
    assert bool((g[0, 3] == 0).all())  # row 0, chunk 2 is masked
    assert bool((g[1, 6] != 0).any())


COUNTED = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 0, 1, 0]], dtype=torch.bool)  # alm_case


def binary_entropy(chunk_logp: torch.Tensor, tau: float) -> torch.Tensor:
    a = chunk_logp.double() / tau - 1e-6
    return -(a.exp() * a + (-torch.expm1(a)) * torch.log(-torch.expm1(a)))


@pytest.mark.parametrize("distance", ALM_DISTANCES)
def test_alm_at_its_minimum_when_the_student_matches_the_teacher(distance):
    tau = 4.0
    logits, batch = alm_case(5)
    lp, _ = alm_student_chunk_logprobs(logits, batch["alm_labels"], batch["alm_chunk"], 5)
    matched = dict(batch, alm_chunk_logprob=lp.detach())
    x = logits.clone().requires_grad_(True)
    loss = alm_loss(x, matched, binarization_temp=tau, distance=distance)
    loss.backward()
    assert x.grad is not None
    if distance == "binary_ce":
        # a cross-entropy's minimum is the teacher's (binary) entropy
        want = binary_entropy(lp[COUNTED], tau).mean().item()
        assert loss.item() == pytest.approx(want, abs=1e-12)
    else:
        assert abs(loss.item()) < 1e-12
    assert float(x.grad.abs().max()) < 1e-9  # a stationary point (|x|' = 0 at 0 in torch)

    # the teacher half a nat less likely on every chunk: above the minimum, with gradient
    off = dict(matched, alm_chunk_logprob=lp.detach() - 0.5)
    y = logits.clone().requires_grad_(True)
    loss_off = alm_loss(y, off, binarization_temp=tau, distance=distance)
    loss_off.backward()
    assert y.grad is not None and float(y.grad.abs().max()) > 1e-4
    excess = loss_off.item()
    if distance == "binary_ce":
        excess -= binary_entropy(lp[COUNTED] - 0.5, tau).mean().item()
    assert excess > 1e-3


@pytest.mark.parametrize("distance", ALM_DISTANCES)
def test_alm_distance_is_stable_from_near_certain_to_tiny_chunks(distance):
    """float32 against float64 for chunk log-likelihoods from -1e-8 to -200 and tau 1
    and 100, with finite gradients at both ends (p -> 1 and p -> 0)."""
    grid = torch.tensor([-1e-8, -1e-6, -1e-3, -0.1, -1.0, -5.0, -30.0, -90.0, -200.0])
    s32 = grid.repeat_interleave(len(grid)).clone().requires_grad_(True)
    t32 = grid.repeat(len(grid))
    for tau in (1.0, 100.0):
        d32 = alm_chunk_distance(s32, t32, distance=distance, binarization_temp=tau)
        (g,) = torch.autograd.grad(d32.sum(), s32)
        assert bool(torch.isfinite(d32).all()) and bool(torch.isfinite(g).all())
        want = torch.tensor(
            [
                ref_distance(s, t, distance, tau, 1e-6)
                for s, t in zip(s32.tolist(), t32.tolist(), strict=True)
            ],
            dtype=torch.float64,
        )
        assert bool(torch.isfinite(want).all())
        # float32 rounding of the inputs (rel 6e-8) and of the terms, relative to their size
        scale = 1.0 + want.abs() + s32.detach().double().abs() / tau
        assert float(((d32.detach().double() - want).abs() / scale).max()) < 1e-6, (distance, tau)
        if distance != "binary_ce":  # divergences and distances: >= 0
            assert bool((d32 >= -1e-6).all()), (distance, tau)


def test_alm_low_precision_logits_and_bad_options():
    logits, batch = alm_case(6)
    full = alm_loss(logits.float(), batch)
    half = alm_loss(logits.bfloat16(), batch)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05)
    with pytest.raises(ValueError, match="distance"):
        alm_loss(logits, batch, distance="renyi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="binarization_temp"):
        alm_loss(logits, batch, binarization_temp=0.0)
    bad = dict(batch, alm_chunk=batch["alm_chunk"].masked_fill(batch["alm_chunk"] == 3, 5))
    with pytest.raises(ValueError, match="chunks"):
        alm_loss(logits, bad)
    bad = dict(batch, alm_labels=batch["alm_labels"].masked_fill(batch["alm_labels"] >= 0, 11))
    with pytest.raises(ValueError, match="alm_labels"):
        alm_loss(logits, bad)
    none = dict(batch, alm_chunk_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert alm_loss(logits, none).item() == 0.0


# ---------------------------------------------------------------------------- byte head

VB = 260  # 256 bytes + end-of-text + 3 specials


def byte_case(seed: int, k: int = 4, dtype=torch.float64):
    """B=2, L=3, m=3, V_b=260: teacher rows from random dense distributions kept as top-k
    + tail; some rows with fewer than k symbols (id -1 / -inf padding), one row with no
    stored symbol at all (all mass in the tail), a zero tail, and masked targets."""
    rng = np.random.default_rng(seed)
    B, L, m = 2, 3, 3
    w = np.exp(rng.normal(0.0, 2.0, size=(B, L, m, VB)))
    w[0, 1, 0, 3:] = 0.0  # only 3 symbols have mass: the 4th entry is missing, tail 0
    p = w / w.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1)[..., :k]
    with np.errstate(divide="ignore"):
        lp = np.log(np.take_along_axis(p, order, -1))
    ids = order.copy()
    tail = np.clip(1.0 - np.exp(lp).sum(-1), 0.0, None)
    lp[0, 1, 0, 3], ids[0, 1, 0, 3] = -np.inf, -1
    tail[0, 1, 0] = 0.0
    lp[1, 0, 2, 2:], ids[1, 0, 2, 2:] = -np.inf, -1  # two missing entries
    tail[1, 0, 2] = 1.0 - np.exp(lp[1, 0, 2, :2]).sum()
    lp[1, 2, 1, :], ids[1, 2, 1, :] = -np.inf, -1  # nothing stored: all mass in the tail
    tail[1, 2, 1] = 1.0
    mask = np.ones((B, L, m), bool)
    mask[0, 2, :] = False
    mask[1, 1, 2] = False
    logits = torch.from_numpy(rng.normal(0.0, 2.0, size=(B, L, m, VB))).to(dtype)
    batch = {
        "byte_ids": torch.from_numpy(ids.astype(np.int64)),
        "byte_logprobs": torch.from_numpy(lp.astype(np.float32)),
        "byte_tail": torch.from_numpy(tail.astype(np.float32)),
        "byte_mask": torch.from_numpy(mask),
        "byte_next": torch.from_numpy(rng.integers(0, 257, size=(B, L, m))),
    }
    return logits, batch, p


def ref_byte(logits, batch, *, kind, temperature) -> tuple[float, int]:
    """Loops over (b, t, j) and the k + 1 bins; full softmax in float64."""
    z = logits.detach().double().numpy()
    ids, lp = batch["byte_ids"].numpy(), batch["byte_logprobs"].double().numpy()
    tail, mask = batch["byte_tail"].double().numpy(), batch["byte_mask"].numpy()
    total, n = 0.0, 0
    B, L, m, k = ids.shape
    for b in range(B):
        for t in range(L):
            for j in range(m):
                if not mask[b, t, j]:
                    continue
                logq = log_softmax_row(list(z[b, t, j]), temperature)
                term, in_topk = 0.0, 0.0
                for i in range(k):
                    if ids[b, t, j, i] < 0 or not math.isfinite(lp[b, t, j, i]):
                        continue
                    pj, lq = math.exp(lp[b, t, j, i]), logq[ids[b, t, j, i]]
                    in_topk += math.exp(lq)
                    term += pj * ((lp[b, t, j, i] if kind == "kl" else 0.0) - lq)
                pt = max(tail[b, t, j], 0.0)
                q_tail = max(1.0 - in_topk, 1.2e-7)
                if pt > 0:
                    term += pt * ((math.log(pt) if kind == "kl" else 0.0) - math.log(q_tail))
                total += term * temperature**2
                n += 1
    return total / max(n, 1), n


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("seed", [0, 1])
def test_byte_head_loss_matches_float64_bruteforce(kind, temperature, seed):
    logits, batch, _ = byte_case(seed)
    got = byte_head_loss(logits, batch, kind=kind, temperature=temperature)
    want, n = ref_byte(logits, batch, kind=kind, temperature=temperature)
    assert n == 2 * 3 * 3 - 3 - 1
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, abs=1e-10, rel=1e-10)
    per = byte_head_loss(logits, batch, kind=kind, temperature=temperature, reduction="none")
    assert per.shape == (2, 3, 3)
    assert bool((per[~batch["byte_mask"]] == 0).all())
    assert per.sum().item() == pytest.approx(got.item() * n, abs=1e-10)


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_byte_head_loss_gradcheck(kind):
    logits, batch, _ = byte_case(2)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda y: byte_head_loss(y, batch, kind=kind, temperature=1.3),
        (x,),
        eps=1e-6,
        atol=1e-7,
        rtol=1e-5,
        fast_mode=True,  # random projections: 4680 inputs would take ~10 s the slow way
    )
    byte_head_loss(x, batch, kind=kind).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert bool((x.grad[~batch["byte_mask"]] == 0).all())  # masked targets: no gradient
    # every counted target passes a gradient except (1, 2, 1), whose teacher row is all
    # tail: the student's tail is then 1 whatever its logits, and the loss there is 0
    live = batch["byte_mask"].clone()
    live[1, 2, 1] = False
    assert bool((x.grad[live].abs().sum(-1) > 0).all())
    assert bool((x.grad[1, 2, 1] == 0).all())


def test_byte_head_kl_is_zero_for_the_teachers_distribution_and_positive_otherwise():
    logits, batch, p = byte_case(3)
    exact = torch.from_numpy(np.log(np.maximum(p, 1e-300)))
    for dtype, tol in ((torch.float64, 2e-6), (torch.float32, 1e-5)):
        # float32-stored teacher log-probs bound the float64 agreement at ~1e-7 per bin
        at_teacher = byte_head_loss(exact.to(dtype), batch)
        assert abs(at_teacher.item()) < tol, dtype
    other = byte_head_loss(logits, batch)
    assert other.item() > 0.5
    ce = byte_head_loss(exact, batch, kind="ce")
    assert ce.item() > 0.1  # the teacher's entropy over the bins, not 0


def test_byte_head_loss_rejects_bad_inputs():
    logits, batch, _ = byte_case(4)
    with pytest.raises(ValueError, match="257"):
        byte_head_loss(logits[..., :256], batch)
    bad_ids = batch["byte_ids"].clone()
    bad_ids[0, 0, 0, 0] = VB
    with pytest.raises(ValueError, match="stored target id"):
        byte_head_loss(logits, dict(batch, byte_ids=bad_ids))
    # an id of -1 is missing even where its log-prob is finite
    neg = batch["byte_ids"].clone()
    neg[0, 0, 0, 0] = -1
    lp = batch["byte_logprobs"].clone()
    lp[0, 0, 0, 0] = -math.inf
    a = byte_head_loss(logits, dict(batch, byte_ids=neg))
    b = byte_head_loss(logits, dict(batch, byte_ids=neg, byte_logprobs=lp))
    assert a.item() == b.item()
    with pytest.raises(ValueError, match="byte_mask"):
        byte_head_loss(logits, dict(batch, byte_mask=batch["byte_mask"][:, :, :2]))
    none = dict(batch, byte_mask=torch.zeros_like(batch["byte_mask"]))
    assert byte_head_loss(logits, none).item() == 0.0


# ---------------------------------------------------------------------------- ByteHead


def test_byte_head_shapes_and_padding():
    torch.manual_seed(0)
    head = ByteHead(hidden_size=16, m=4, vocab=259, byte_dim=8, state_dim=12)
    hidden = torch.randn(2, 5, 16)
    nxt = torch.randint(0, 259, (2, 5, 4))
    nxt[1, 3, 1:] = -1
    out = head(hidden, nxt)
    assert out.shape == (2, 5, 4, 259) and bool(torch.isfinite(out).all())
    assert head(hidden.bfloat16(), nxt).dtype == torch.float32  # parameters' dtype
    with pytest.raises(ValueError, match="byte_next"):
        head(hidden, nxt[..., :3])
    with pytest.raises(ValueError, match="vocab"):
        head(hidden, nxt.masked_fill(nxt == nxt[0, 0, 0], 259))
    # trains end to end with byte_head_loss
    _, batch, _ = byte_case(0)
    h2 = ByteHead(hidden_size=16, m=3, vocab=VB, byte_dim=8)
    loss = byte_head_loss(h2(torch.randn(2, 3, 16), batch["byte_next"]), batch)
    loss.backward()
    assert h2.init_state.weight.grad is not None
    assert float(h2.init_state.weight.grad.abs().sum()) > 0


def test_byte_head_is_causal_over_offsets():
    """Offset j's logits depend on the hidden state and on byte_next[..., :j] only."""
    torch.manual_seed(1)
    m = 5
    head = ByteHead(hidden_size=10, m=m, vocab=257, byte_dim=6).double()
    hidden = torch.randn(2, 3, 10, dtype=torch.float64)
    nxt = torch.randint(0, 257, (2, 3, m))
    base = head(hidden, nxt)
    for j in range(m):
        changed = nxt.clone()
        changed[..., j:] = torch.randint(0, 257, changed[..., j:].shape)
        changed[0, 0, j:] = -1  # a padding input counts as a change too
        out = head(hidden, changed)
        assert torch.equal(out[..., : j + 1, :], base[..., : j + 1, :]), j
        if j + 1 < m:  # and the byte at offset j does reach offset j + 1
            assert not torch.allclose(out[..., j + 1, :], base[..., j + 1, :])
    other = head(hidden + 0.1, nxt)
    assert not torch.allclose(other[..., 0, :], base[..., 0, :])  # offset 0 sees the hidden
    # positions are independent of one another
    moved = hidden.clone()
    moved[:, 1] += 1.0
    out = head(moved, nxt)
    assert torch.equal(out[:, 0], base[:, 0]) and torch.equal(out[:, 2], base[:, 2])
