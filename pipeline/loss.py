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


__all__ = ["IGNORE_INDEX", "collapse_student", "log1mexp", "sparse_kd", "sparse_kd_loss"]
