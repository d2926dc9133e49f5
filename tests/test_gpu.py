"""HFTeacher tree forwards on CUDA equal the CPU float32 forward (marked ``gpu``; skipped
where ``torch.cuda.is_available()`` is False). ``pytest -m gpu`` runs them alone.

The teacher: `tiny_causal_lm` (Qwen2 and Llama, 40 logits for 17 ids) with its tied
embeddings re-drawn at std 0.05. As built (std 0.5) it is nearly one-hot (row entropy
0.00 nats, |log-prob| up to 46), so a bound scaled to 46 nats would not catch a broken
tree mask; at std 0.05 the rows have about 2.0 nats of entropy and |log-prob| <= 5.

Bounds, with ``M`` = the largest |log-prob| of the CPU float32 result and u = 2^-8 (bf16
keeps 8 significant bits, so one rounding of a value of size M moves it by up to ~M*u):

- bfloat16 on CUDA vs float32 on CPU: ``BF16_FACTOR * M * u`` = 4 M u (about 0.08 nats
  here). Measured on CPU (torch 2.13.0+cpu, 2 cores; these models, the trees of
  `_trees(0)` to `_trees(2)`; 1 and 2 torch threads give the same numbers): CPU bfloat16
  vs CPU float32 differs by at most 0.0097-0.0120 nats = 0.51-0.65 M u (M = 4.66-4.95;
  mean 2.5e-3 to 2.9e-3). With the test's trees: Qwen2 0.0097 (0.51 M u), Llama 0.0120
  (0.65 M u). The bound 4 M u is 6.2x the largest CPU measurement, for CUDA's other
  kernels (cuBLAS, fused attention, other summation orders). A tree forward with a
  broken mask (every node attending to all earlier positions) differs from the right one
  by 0.44-0.59 nats, 5.7-8.2x the bound, so the comparison still has teeth.
  `test_cpu_bfloat16_is_within_the_bound` checks the CPU measurement on every machine.
- float32 on CUDA vs float32 on CPU: 1e-4. The CPU float32 forward is within 9.5e-7 of
  a float64 forward of the same model (a couple of float32 ulps at |log-prob| ~5), so
  1e-4 leaves 100x for other kernels and summation orders (TF32 is switched off).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.teacher import HFTeacher
from tests.tiny_assets import hf_tokenizer, tiny_causal_lm, tiny_teacher_tokenizer

U_BF16 = 2.0**-8
BF16_FACTOR = 4.0
F32_TOL = 1e-4

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def _teacher(arch: str, device: str, dtype: str) -> HFTeacher:
    """A fresh model each time: HFTeacher moves the model it is given."""
    tok = hf_tokenizer(tiny_teacher_tokenizer())
    model = tiny_causal_lm(len(tok), arch=arch, seed=1, logits=40)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return HFTeacher(model, tok, device=device, dtype=dtype, max_batch_tokens=64)


def _trees(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random trees of 1, 5, 20 and 31 nodes (as in tests/test_teacher.py): several
    trees share a row, and the 64-token budget makes several forwards."""
    rng = np.random.default_rng(seed)
    trees = []
    for size in (1, 5, 20, 31):
        tokens, parents = [-1], [-1]
        for v in range(1, size):
            tokens.append(int(rng.integers(0, 16)))
            parents.append(int(rng.integers(0, v)))
        trees.append((tokens, parents))
    return trees


def _forward(teacher: HFTeacher, trees) -> torch.Tensor:
    return torch.cat([lp.float().cpu() for lp in teacher.tree_logprobs(trees)])


@pytest.fixture
def highest_matmul_precision():
    """float32 matmuls in full float32 (no TF32) for the duration of the test."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def _check_bf16(reference: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    assert got.shape == reference.shape
    assert torch.isfinite(got).all()
    m = float(reference.abs().max())
    worst = float((got - reference).abs().max())
    assert worst <= BF16_FACTOR * m * U_BF16, (worst, m, worst / (m * U_BF16))
    return worst, m


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_cpu_bfloat16_is_within_the_bound(arch):
    """The premise of the CUDA bfloat16 bound, on CPU: bf16 vs f32 within 4 M u
    (measured 0.51 M u for Qwen2, 0.65 M u for Llama)."""
    trees = _trees()
    ref = _forward(_teacher(arch, "cpu", "float32"), trees)
    _check_bf16(ref, _forward(_teacher(arch, "cpu", "bfloat16"), trees))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_cuda_bfloat16_tree_forward_equals_cpu_float32(arch, highest_matmul_precision):
    trees = _trees()
    ref = _forward(_teacher(arch, "cpu", "float32"), trees)
    teacher = _teacher(arch, "cuda", "bfloat16")
    assert next(teacher.model.parameters()).dtype == torch.bfloat16
    worst, m = _check_bf16(ref, _forward(teacher, trees))
    print(f"{arch}: CUDA bf16 vs CPU f32 max |diff| {worst:.3e} = {worst / (m * U_BF16):.2f} M u")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_cuda_float32_tree_forward_equals_cpu_float32(arch, highest_matmul_precision):
    trees = _trees()
    ref = _forward(_teacher(arch, "cpu", "float32"), trees)
    got = _forward(_teacher(arch, "cuda", "float32"), trees)
    torch.testing.assert_close(got, ref, atol=F32_TOL, rtol=0)


@pytest.mark.gpu
@cuda
def test_a_short_job_on_one_gpu(tiny_teacher_dir, tmp_path):
    """The generate job end to end on one GPU (bf16 by default there), every target
    kind, then the audit with --verify-live re-scoring in the run's dtype."""
    import json

    from pipeline.job import run
    from tests.tiny_assets import tiny_job_config

    inp = tmp_path / "in"
    inp.mkdir()
    texts = ["The quick brown fox jumps over the lazy dog.", "Numbers 12 and 345, tab\there."]
    (inp / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = tiny_job_config(
        tiny_teacher_dir,
        f"{inp}/*.jsonl",
        str(tmp_path / "out"),
        "teacher.device=cuda",
        "scoring.targets=[student,bytes,teacher]",
    )
    result = run(cfg, executor="local")
    (m,) = result.manifests.values()
    assert m["teacher_device"] == "cuda" and m["teacher_dtype"] == "bfloat16"
    assert m["documents"] == 2 and m["teacher_tokens"] > 0
    from jobs.audit import main as audit

    assert audit([str(tmp_path / "out"), "--verify-live", "2", "--out", str(tmp_path / "rep")]) == 0
