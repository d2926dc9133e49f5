"""A reference sparse distillation loss for the targets `pipeline.reader` streams.

    from pipeline.loss import sparse_kd_loss

    logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = sparse_kd_loss(logits, batch, kind="kl", ce_weight=0.1)

**Bins.** A stored row is the teacher's next-token distribution over the student vocab,
kept as its top-k ids with natural-log probabilities plus the mass outside them. The
loss compares teacher and student on the same ``k + 1`` bins:

- teacher: ``p_j = exp(topk_logprobs[j])`` for the ``k`` stored ids, and
  ``p_tail = tail_mass``. Entries with log-prob ``-inf`` are missing (the row has fewer
  than ``k`` ids with mass, or the student vocab is smaller than ``k``): probability 0,
  and their padded id (0) is ignored on the student side. The stored log-probs are
  quantised (error <= 0.0009 nats), so the bins sum to 1 only to within ~0.1%; they
  are used as stored, not renormalised.
- student: ``log q = log_softmax(logits / temperature)`` over the whole vocab, gathered
  at the ``k`` ids; the tail bin gets ``log(1 - sum_j q_j)``, computed as
  ``log1mexp(logsumexp_j log q_j)`` and clamped so it never reaches ``log 0`` (a tail
  probability below ~1e-7 is not resolvable in float32 and counts as 1e-7; the
  tail term then passes no gradient, the top-k terms still do).

``kind="kl"``: ``KL(p || q) = sum p (log p - log q)`` over the bins (``0 log 0 = 0``);
``kind="ce"``: ``-sum p log q`` (the same gradient; the value is offset by the teacher's
entropy over the bins). Positions where ``loss_mask`` is False do not count; the mean
is over target positions.

**Alignment.** ``batch`` row ``t`` is already the target for the logits at position
``t`` (see `pipeline.reader`): do not shift. Only ``student_logits[..., :V]`` matter and
``V`` may exceed the tokenizer's vocab (padded embedding tables); a stored id ``>= V``
raises `ValueError`.

**Temperature.** The stored targets are the teacher's distribution at the teacher
temperature the run recorded (``provenance["temperature"]``, the job's
``teacher.temperature``; 1.0 by default); the loss cannot re-temper them, because the
logits are gone. ``temperature`` divides the STUDENT logits only, and the KD term is
multiplied by ``temperature ** 2`` (Hinton et al., 2015) so its gradient scale does not
shrink with the temperature. For matched-temperature distillation at ``tau``, generate
the targets with ``teacher.temperature=tau`` and train with ``temperature=tau``; the
default (1.0 and 1.0) is plain distillation.

**Hard labels.** ``ce_weight`` mixes in cross-entropy on ``batch["labels"]`` (ignore
index -100) at temperature 1: ``loss = (1 - ce_weight) * kd + ce_weight * ce``.

Half-precision logits (bf16/fp16) are upcast: everything is computed in float32 (or
float64 if the logits are float64).

**Targets for any student tokenizer.** Two more losses live here; see their docstrings:

- `alm_loss` (with `alm_chunk_distance` and `alm_student_chunk_logprobs`): Approximate
  Likelihood Matching (Minixhofer, Vulic & Ponti, 2025; tokenkit's ``compute_alm_loss``):
  the student's log-likelihood of each aligned chunk of text is matched to the teacher's
  through a binarised divergence at a binarisation temperature.
- `byte_head_loss`: the ``k + 1``-bin loss above (`sparse_kd`, unchanged) applied to a
  byte-level head's predictions (`pipeline.heads.ByteHead`) of the next ``m`` bytes after
  every student token, against the teacher's next-byte distributions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
Kind = Literal["kl", "ce"]
Reduction = Literal["mean", "sum", "none"]

# The student's tail probability is floored here: float32 log-probs near 0 carry an
# absolute error of ~1e-7, so smaller tails are rounding noise.
_MIN_TAIL = 1.2e-7


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012). Both
    branches get safe inputs so neither produces inf/NaN gradients through `where`."""
    ln2 = -math.log(2.0)
    near = x > ln2
    a = torch.where(near, x, torch.full_like(x, ln2))  # near 0: log(-expm1(x))
    b = torch.where(near, torch.full_like(x, ln2), x)  # far below: log1p(-exp(x))
    return torch.where(near, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def _check_options(temperature: float, kind: str, reduction: str) -> None:
    if kind not in ("kl", "ce"):
        raise ValueError(f"kind must be 'kl' or 'ce', not {kind!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, not {temperature}")


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def collapse_student(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    present: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-probabilities on the ``k + 1`` bins of the targets.

    Args:
        student_logits: [..., V] logits (any float dtype; computed in float32+).
        topk_ids: [..., k] integer student ids (any int dtype), all ``< V``.
        present: [..., k] bool, False for missing target entries.
        temperature: the logits are divided by it before the softmax.

    Returns:
        ``(logq_k [..., k], logq_tail [...])``: log-probs of the stored ids (0 where an
        entry is missing, so that a 0-probability teacher entry contributes 0 without
        NaN gradients) and of everything else.
    """
    logits = student_logits.to(_compute_dtype(student_logits))
    logq = torch.log_softmax(logits / temperature, dim=-1)
    gathered = logq.gather(-1, topk_ids.long())
    neg_inf = torch.full_like(gathered, -math.inf)
    in_topk = torch.logsumexp(torch.where(present, gathered, neg_inf), dim=-1)  # log sum_j q_j
    # clamp: sum_j q_j rounds to 1 when the student puts ~all mass on the top-k
    in_topk = in_topk.clamp(max=math.log1p(-_MIN_TAIL))
    logq_tail = log1mexp(in_topk)
    return torch.where(present, gathered, torch.zeros_like(gathered)), logq_tail


def sparse_kd(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    kind: Kind = "kl",
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """The KD term alone (already multiplied by ``temperature ** 2``), tensors explicit.

    Args:
        student_logits: [B, T, V] (or any [..., V]).
        topk_ids: [B, T, k] stored student ids (int32 from the reader is fine).
        topk_logprobs: [B, T, k] natural-log teacher probabilities, ``-inf`` = missing.
        tail_mass: [B, T] teacher probability outside the stored ids.
        loss_mask: [B, T] bool, positions that count (default: all).
        temperature: divides the student logits; see the module docstring.
        kind: ``"kl"`` (KL(teacher || student) over the bins) or ``"ce"``.
        reduction: ``"mean"`` over counted positions (0 when there are none),
            ``"sum"``, or ``"none"`` (per position [B, T], 0 where not counted).
    """
    _check_options(temperature, kind, reduction)
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"shapes disagree: student_logits {tuple(student_logits.shape)}, topk_ids "
            f"{tuple(topk_ids.shape)}, topk_logprobs {tuple(topk_logprobs.shape)}"
        )
    dev = student_logits.device
    dtype = _compute_dtype(student_logits)
    topk_ids = topk_ids.to(dev, non_blocking=True).long()
    lp_t = topk_logprobs.to(dev, dtype, non_blocking=True)
    tail_t = tail_mass.to(dev, dtype, non_blocking=True).clamp_min(0.0)
    present = torch.isfinite(lp_t)
    vocab = student_logits.shape[-1]
    if present.any():
        hi = int(torch.where(present, topk_ids, torch.zeros_like(topk_ids)).max())
        if hi >= vocab:
            raise ValueError(
                f"a stored target id is {hi} but the student logits have only {vocab} "
                "entries: the student vocab is smaller than the run's student tokenizer "
                "(check provenance['student_vocab_size'])"
            )

    logq_k, logq_tail = collapse_student(student_logits, topk_ids, present, temperature=temperature)
    p_k = torch.where(present, lp_t.exp(), torch.zeros_like(lp_t))
    cross = -(p_k * logq_k).sum(-1) - tail_t * logq_tail  # -sum p log q
    per_pos = cross
    if kind == "kl":
        # sum p log p with 0 log 0 = 0 (the teacher side carries no gradient)
        neg_entropy = torch.where(present, p_k * lp_t, torch.zeros_like(lp_t)).sum(-1)
        neg_entropy = neg_entropy + torch.xlogy(tail_t, tail_t)
        per_pos = cross + neg_entropy
    per_pos = per_pos * (temperature**2)

    if loss_mask is None:
        mask = torch.ones(per_pos.shape, dtype=torch.bool, device=dev)
    else:
        mask = loss_mask.to(dev, non_blocking=True).bool()
    per_pos = torch.where(mask, per_pos, torch.zeros_like(per_pos))
    if reduction == "none":
        return per_pos
    total = per_pos.sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp_min(1)


def sparse_kd_loss(
    student_logits: torch.Tensor,
    batch: Mapping[str, Any],
    *,
    temperature: float = 1.0,
    kind: Kind = "kl",
    ce_weight: float = 0.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """``(1 - ce_weight) * KD + ce_weight * CE`` on a `pipeline.reader` batch.

    Args:
        student_logits: [B, T, V] logits at the batch's positions (no shift).
        batch: a reader batch (``topk_ids``, ``topk_logprobs``, ``tail_mass``,
            ``loss_mask``; ``labels`` when ``ce_weight > 0``), on any device.
        temperature: divides the student logits in the KD term, which is scaled by
            ``temperature ** 2``; CE uses the raw logits. See the module docstring.
        kind: ``"kl"`` or ``"ce"`` for the KD term.
        ce_weight: weight of cross-entropy on ``labels`` (ignore index -100), in [0, 1].
        reduction: ``"mean"`` (KD over ``loss_mask`` positions, CE over labelled ones),
            ``"sum"``, or ``"none"`` ([B, T], 0 at positions that do not count).
    """
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], not {ce_weight}")
    _check_options(temperature, kind, reduction)
    if ce_weight < 1.0:
        kd = sparse_kd(
            student_logits,
            batch["topk_ids"],
            batch["topk_logprobs"],
            batch["tail_mass"],
            batch.get("loss_mask"),
            temperature=temperature,
            kind=kind,
            reduction=reduction,
        )
        if ce_weight == 0.0:
            return kd
    labels = batch["labels"].to(student_logits.device, non_blocking=True).long()
    logits = student_logits.to(_compute_dtype(student_logits))
    ce = F.cross_entropy(
        logits.flatten(0, -2),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)
    if reduction == "none":
        ce_red = ce
    elif reduction == "sum":
        ce_red = ce.sum()
    else:
        ce_red = ce.sum() / (labels != IGNORE_INDEX).sum().clamp_min(1)
    if ce_weight == 1.0:
        return ce_red
    return (1.0 - ce_weight) * kd + ce_weight * ce_red


# --------------------------------------------------------------------------------------
# ALM: Approximate Likelihood Matching on aligned chunks
# --------------------------------------------------------------------------------------

AlmDistance = Literal[
    "binary_ce", "binary_kl", "reverse_binary_kl", "binary_kl_temp_limit", "abs", "abs_exp"
]
ALM_DISTANCES: tuple[str, ...] = (
    "binary_ce",
    "binary_kl",
    "reverse_binary_kl",
    "binary_kl_temp_limit",
    "abs",
    "abs_exp",
)
# Teacher chunk log-likelihoods are clamped to [_MIN_CHUNK_LOGP, 0]: below it the chunk's
# probability is 0 at any precision, and -inf (a chunk the teacher rules out) would give
# 0 * inf = NaN in the KL forms.
_MIN_CHUNK_LOGP = -1.0e4


def alm_chunk_distance(
    student_chunk_logp: torch.Tensor,
    teacher_chunk_logp: torch.Tensor,
    *,
    distance: AlmDistance = "binary_ce",
    binarization_temp: float = 100.0,
    epsilon: float = 1e-6,
) -> torch.Tensor:
    """The ALM distance between teacher and student chunk log-likelihoods, elementwise.

    With ``tau = binarization_temp``, ``a = log p_T / tau - epsilon`` and
    ``b = log p_S / tau - epsilon`` (natural logs; ``exp(a)`` is the teacher's chunk
    probability raised to ``1 / tau``, the "binarised" probability of the Bernoulli
    event "the model produces this chunk here"), and ``P = exp(a)``, ``Q = exp(b)``:

    - ``"binary_ce"`` (tokenkit's default): the cross-entropy between
      ``Bernoulli(P)`` and ``Bernoulli(Q)``: ``-(P b + (1 - P) log(1 - Q))``. Minimised
      at ``Q = P`` (the value there is the teacher's binary entropy).
    - ``"binary_kl"``: the binarised KL, ``KL(Bernoulli(P) || Bernoulli(Q)) =
      P (a - b) + (1 - P) (log(1 - P) - log(1 - Q))``: the paper's binarised
      f-divergence with the KL generator; ``binary_ce`` minus the teacher's binary
      entropy (same gradient), 0 at its minimum.
    - ``"reverse_binary_kl"``: ``KL(Bernoulli(Q) || Bernoulli(P))``.
    - ``"binary_kl_temp_limit"``: ``lim_{tau -> inf} tau * binary_kl`` with
      ``a = log p_T - epsilon``, ``b = log p_S - epsilon`` (no ``tau``):
      ``(a - b) - a (log(-a) - log(-b))``.
    - ``"abs"``: ``|log p_T - log p_S|`` (no ``tau``, no ``epsilon``).
    - ``"abs_exp"``: ``|P - Q|``.

    ``epsilon`` keeps the binarised probabilities below ``exp(-epsilon)`` so that
    ``log(1 - Q)`` stays finite when a chunk log-likelihood rounds to 0 (it shifts teacher
    and student alike, so equal inputs still minimise every distance). ``log(1 - exp(x))``
    is `log1mexp`, so the values and gradients are finite for chunk log-likelihoods from
    ``0`` down to ``_MIN_CHUNK_LOGP`` in float32. The student side is clamped to ``<= 0``
    and the teacher side to ``[-1e4, 0]``.

    Args:
        student_chunk_logp: [...] the student's chunk log-likelihoods (differentiable).
        teacher_chunk_logp: [...] the teacher's (same shape; no gradient expected).
        distance: one of `ALM_DISTANCES`.
        binarization_temp: ``tau > 0`` (tokenkit's ``binarization_temp``, formerly
            ``bce_temp``; 100 there by default).
        epsilon: ``>= 0``, tokenkit's 1e-6 by default.

    Returns:
        [...] the distance in the dtype of ``student_chunk_logp`` (float32 at least).
    """
    if distance not in ALM_DISTANCES:
        raise ValueError(f"distance must be one of {ALM_DISTANCES}, not {distance!r}")
    if not binarization_temp > 0:
        raise ValueError(f"binarization_temp must be > 0, not {binarization_temp}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, not {epsilon}")
    if student_chunk_logp.shape != teacher_chunk_logp.shape:
        raise ValueError(
            f"shapes disagree: student {tuple(student_chunk_logp.shape)}, "
            f"teacher {tuple(teacher_chunk_logp.shape)}"
        )
    dtype = _compute_dtype(student_chunk_logp)
    s = student_chunk_logp.to(dtype).clamp(max=0.0)
    t = teacher_chunk_logp.to(s.device, dtype).clamp(min=_MIN_CHUNK_LOGP, max=0.0)
    if distance == "abs":
        return (t - s).abs()
    if distance == "binary_kl_temp_limit":
        a, b = t - epsilon, s - epsilon
        return (a - b) - a * (torch.log(-a) - torch.log(-b))
    a = t / binarization_temp - epsilon
    b = s / binarization_temp - epsilon
    if distance == "abs_exp":
        return (a.exp() - b.exp()).abs()
    p_true = a.exp()
    p_false = -torch.expm1(a)  # 1 - P, accurate when P is near 1
    log_q_false = log1mexp(b)  # log(1 - Q)
    if distance == "binary_ce":
        return -(p_true * b + p_false * log_q_false)
    log_p_false = log1mexp(a)
    if distance == "binary_kl":
        return p_true * (a - b) + p_false * (log_p_false - log_q_false)
    # reverse_binary_kl
    return b.exp() * (b - a) + (-torch.expm1(b)) * (log_q_false - log_p_false)


def alm_student_chunk_logprobs(
    student_logits: torch.Tensor,
    alm_labels: torch.Tensor,
    alm_chunk: torch.Tensor,
    num_chunks: int,
    *,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-likelihood of every chunk, and how many of its tokens it has.

    ``log p_S(chunk c) = sum_t log_softmax(student_logits[t] / temperature)[alm_labels[t]]``
    over the positions ``t`` with ``alm_chunk[t] == c`` and ``alm_labels[t] != -100``
    (summed with ``scatter_add``; other positions add nothing).

    Args:
        student_logits: [B, L, V] (any float dtype; computed in float32, float64 kept).
        alm_labels: [B, L] the token predicted at each position (-100: none).
        alm_chunk: [B, L] the chunk it belongs to, ``0 .. num_chunks - 1`` (-1: none).
        num_chunks: C.
        temperature: divides the student logits.

    Returns:
        ``(logp [B, C], n_tokens [B, C] int64)``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, not {temperature}")
    if student_logits.dim() != 3 or alm_labels.shape != student_logits.shape[:2]:
        raise ValueError(
            f"student_logits must be [B, L, V] and alm_labels [B, L]: got "
            f"{tuple(student_logits.shape)} and {tuple(alm_labels.shape)}"
        )
    if alm_chunk.shape != alm_labels.shape:
        raise ValueError(
            f"alm_chunk {tuple(alm_chunk.shape)} must match alm_labels {tuple(alm_labels.shape)}"
        )
    dev = student_logits.device
    labels = alm_labels.to(dev, non_blocking=True).long()
    chunk = alm_chunk.to(dev, non_blocking=True).long()
    valid = (labels != IGNORE_INDEX) & (chunk >= 0)
    vocab = student_logits.shape[-1]
    if valid.any():
        lab_v, chunk_v = labels[valid], chunk[valid]
        if int(lab_v.min()) < 0 or int(lab_v.max()) >= vocab:
            raise ValueError(
                f"alm_labels must be in [0, {vocab}) (or -100): got "
                f"[{int(lab_v.min())}, {int(lab_v.max())}]"
            )
        if int(chunk_v.max()) >= num_chunks:
            raise ValueError(
                f"alm_chunk has index {int(chunk_v.max())} but there are {num_chunks} chunks"
            )
    z = student_logits.to(_compute_dtype(student_logits)) / temperature
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    # log_softmax at the label only: z[label] - logsumexp(z), no [B, L, V] log-prob tensor
    tok = z.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    tok = torch.where(valid, tok, torch.zeros_like(tok))
    idx = torch.where(valid, chunk, torch.zeros_like(chunk))
    batch_size = labels.shape[0]
    logp = tok.new_zeros(batch_size, num_chunks).scatter_add(1, idx, tok)
    n_tokens = torch.zeros(batch_size, num_chunks, dtype=torch.long, device=dev)
    n_tokens = n_tokens.scatter_add(1, idx, valid.long())
    return logp, n_tokens


def alm_loss(
    student_logits: torch.Tensor,
    batch: Mapping[str, Any],
    *,
    temperature: float = 1.0,
    binarization_temp: float = 100.0,
    distance: AlmDistance = "binary_ce",
    epsilon: float = 1e-6,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """ALM, the chunk-likelihood distillation loss of Minixhofer, Vulic & Ponti (2025),
    "Universal Cross-Tokenizer Distillation via Approximate Likelihood Matching".

    A chunk is a span of text whose start and end are token boundaries in both the
    teacher's and the student's tokenization, so the teacher's likelihood of the chunk
    (product of its teacher-token probabilities, ``batch["alm_chunk_logprob"]``) and the
    student's (product of its student-token probabilities) are likelihoods of the same
    text given the same prefix. The loss is

        ``sum_c D(p_T(c), p_S(c)) / #counted chunks``

    with ``D`` = `alm_chunk_distance` (default ``"binary_ce"`` at ``binarization_temp``
    100, tokenkit's defaults): the chunk probabilities, raised to ``1 / tau``, are
    compared as Bernoulli probabilities (a binarised f-divergence). Normalisation is
    tokenkit's default ``chunk_count / chunk_count``: every counted chunk has weight 1 and
    ``"mean"`` divides by the number of counted chunks in this batch.

    A chunk counts when ``alm_chunk_mask`` is True and at least one position with a label
    (``alm_labels != -100``) is mapped to it; a masked chunk's teacher value is never read
    (it may be NaN). The student side is `alm_student_chunk_logprobs` (no shift: position
    ``t``'s logits predict ``alm_labels[t]``).

    Options left out of tokenkit's ``compute_alm_loss`` (and why):

    - chunk construction (``chunk_kind`` unconstrained/unbiased/space, ``alm_mode`` e.g.
      ``append_space``/``merge_by_space_prob``, ``distill_chunk_sizes`` > 1): they decide
      which spans are chunks and what the teacher's chunk likelihood includes, which is
      the target generator's job; here the chunks arrive made. ``append_space`` would also
      need the student's probability of a space-initial next token at each chunk end,
      which this batch does not carry.
    - ``distill_main_path_numerator``/``denominator`` = ``token_count`` /
      ``log1p_token_count`` (weights by the number of teacher tokens, which the batch
      does not carry) and normalising by the count over the global, all-device batch: use
      ``reduction="sum"`` and divide by the global number of counted chunks instead.
    - distances ``renyi`` (needs ``renyi_alpha``; computed without the temperature and
      without `log1mexp`), ``joschu_k2``/``joschu_k3`` (KL estimators from RL, not in
      the paper).
    - the side-path loss, latent (hidden-state) distillation and the debiasing of
      outcome chunks: other terms, not this one.

    Args:
        student_logits: [B, L, V] (any float dtype; float32 compute, float64 kept).
        batch: ``alm_labels`` [B, L] int, ``alm_chunk`` [B, L] int, ``alm_chunk_logprob``
            [B, C] float (natural log), ``alm_chunk_mask`` [B, C] bool; any device.
        temperature: divides the student logits (the teacher's chunk log-likelihoods are
            as stored). No ``temperature ** 2`` factor: ``binarization_temp`` already sets
            the scale of the distance.
        binarization_temp, distance, epsilon: see `alm_chunk_distance`.
        reduction: ``"mean"`` over counted chunks (0 when none), ``"sum"``, or ``"none"``
            ([B, C], 0 for chunks that do not count).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    dev = student_logits.device
    teacher = batch["alm_chunk_logprob"].to(dev, non_blocking=True)
    chunk_mask = batch["alm_chunk_mask"].to(dev, non_blocking=True).bool()
    if teacher.dim() != 2 or chunk_mask.shape != teacher.shape:
        raise ValueError(
            f"alm_chunk_logprob {tuple(teacher.shape)} and alm_chunk_mask "
            f"{tuple(chunk_mask.shape)} must both be [B, C]"
        )
    if teacher.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"batch sizes disagree: student_logits {tuple(student_logits.shape)}, "
            f"alm_chunk_logprob {tuple(teacher.shape)}"
        )
    student, n_tokens = alm_student_chunk_logprobs(
        student_logits,
        batch["alm_labels"],
        batch["alm_chunk"],
        teacher.shape[1],
        temperature=temperature,
    )
    counted = chunk_mask & (n_tokens > 0)
    # chunks that do not count get harmless stand-ins, so no NaN reaches the gradient
    stand_in = torch.full_like(student, -1.0)
    dist = alm_chunk_distance(
        torch.where(counted, student, stand_in),
        torch.where(counted, teacher.to(student.dtype), stand_in),
        distance=distance,
        binarization_temp=binarization_temp,
        epsilon=epsilon,
    )
    dist = torch.where(counted, dist, torch.zeros_like(dist))
    if reduction == "none":
        return dist
    total = dist.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp_min(1)


# --------------------------------------------------------------------------------------
# BLD: a byte-level head distilled on the teacher's next-byte distributions
# --------------------------------------------------------------------------------------

BYTE_VOCAB_MIN = 257  # 0..255 byte values, 256 end-of-text, 257+ special tokens


def byte_head_loss(
    byte_logits: torch.Tensor,
    batch: Mapping[str, Any],
    *,
    kind: Kind = "kl",
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """The `sparse_kd` loss on a byte head's predictions (byte-level distillation).

    ``byte_logits[b, t, j]`` is the head's prediction of the ``j``-th byte after the end
    of student token ``t`` (teacher-forced on the actual earlier bytes, see
    `pipeline.heads.ByteHead`); its target is the teacher's next-byte distribution there,
    stored as top-k symbol ids with natural-log probabilities plus the mass outside them.
    Per ``(b, t, j)`` the loss is exactly `sparse_kd`'s on the ``k + 1`` bins (top-k +
    tail; ``log(1 - sum q)`` via `log1mexp`, the student tail floored at ~1.2e-7;
    ``kind="kl"`` or ``"ce"``; multiplied by ``temperature ** 2``), and ``"mean"`` is over
    the targets where ``byte_mask`` is True.

    An entry is missing when its id is -1 or its log-prob is not finite; missing entries
    have probability 0 and are not gathered.

    Args:
        byte_logits: [B, L, m, V_b] (``V_b >= 257``; any float dtype).
        batch: ``byte_ids`` [B, L, m, k] int (-1 = missing), ``byte_logprobs``
            [B, L, m, k] float (-inf = missing), ``byte_tail`` [B, L, m] float,
            ``byte_mask`` [B, L, m] bool (default: all count). ``byte_next`` is the head's
            input, not used here.
        kind, temperature: as in `sparse_kd`.
        reduction: ``"mean"`` over counted targets (0 when none), ``"sum"``, or
            ``"none"`` ([B, L, m], 0 where not counted).
    """
    _check_options(temperature, kind, reduction)
    if byte_logits.dim() != 4:
        raise ValueError(f"byte_logits must be [B, L, m, V_b], got {tuple(byte_logits.shape)}")
    if byte_logits.shape[-1] < BYTE_VOCAB_MIN:
        raise ValueError(
            f"the byte vocabulary has {byte_logits.shape[-1]} symbols, fewer than "
            f"{BYTE_VOCAB_MIN} (256 bytes + end-of-text)"
        )
    dev = byte_logits.device
    ids = batch["byte_ids"].to(dev, non_blocking=True).long()
    logprobs = batch["byte_logprobs"].to(dev, _compute_dtype(byte_logits), non_blocking=True)
    tail = batch["byte_tail"]
    mask = batch.get("byte_mask")
    if ids.shape != logprobs.shape or ids.shape[:-1] != byte_logits.shape[:-1]:
        raise ValueError(
            f"shapes disagree: byte_logits {tuple(byte_logits.shape)}, byte_ids "
            f"{tuple(ids.shape)}, byte_logprobs {tuple(logprobs.shape)}"
        )
    for name, value in (("byte_tail", tail), ("byte_mask", mask)):
        if value is not None and tuple(value.shape) != tuple(byte_logits.shape[:-1]):
            raise ValueError(
                f"{name} {tuple(value.shape)} must be [B, L, m] = {tuple(byte_logits.shape[:-1])}"
            )
    present = torch.isfinite(logprobs) & (ids >= 0)
    ids = torch.where(present, ids, torch.zeros_like(ids))
    logprobs = torch.where(present, logprobs, torch.full_like(logprobs, -math.inf))
    return sparse_kd(
        byte_logits,
        ids,
        logprobs,
        tail,
        mask,
        temperature=temperature,
        kind=kind,
        reduction=reduction,
    )


__all__ = [
    "ALM_DISTANCES",
    "BYTE_VOCAB_MIN",
    "IGNORE_INDEX",
    "alm_chunk_distance",
    "alm_loss",
    "alm_student_chunk_logprobs",
    "byte_head_loss",
    "collapse_student",
    "log1mexp",
    "sparse_kd",
    "sparse_kd_loss",
]
