"""Train a tiny student on a run's targets: the reader and the loss end to end.

    python -m jobs.generate                      # writes ./out (the demo run)
    python -m jobs.train_student --run ./out --steps 50

Builds a small random Llama (hidden 64, 2 layers, 4 heads) with the run's student
vocabulary (``provenance["student_vocab_size"]``), streams the run with
`pipeline.reader.TargetDataset` / `TargetLoader` (seeded shuffle, epochs cycled with
``set_epoch`` until ``--steps`` optimizer steps are done) and trains it with AdamW on
``pipeline.loss.sparse_kd_loss`` (KL on the sparse top-k + tail targets, mixed with 10%
cross-entropy on the actual next tokens). It prints the loss every few steps and ends
with ``loss first 10 steps X -> last 10 steps Y``; a falling loss means the student is
learning the teacher's targets. The exit status is 1 if the loss is ever not finite.

The targets are stored at the teacher temperature the run recorded
(``provenance["temperature"]``); ``--temperature`` (default: that same value, i.e.
matched-temperature distillation) divides the student's logits, and the KD term is
scaled by its square. It is an example, not a trainer: no checkpoints, no evaluation.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train_student",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--run",
        default="./out",
        help="run directory or index.json URL made by `python -m jobs.generate` (default ./out)",
    )
    p.add_argument("--steps", type=int, default=50, help="optimizer steps (default 50)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    p.add_argument("--seed", type=int, default=0, help="model init and shuffle seed (default 0)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="student temperature (default: the run's teacher temperature, i.e. matched)",
    )
    p.add_argument(
        "--ce-weight",
        type=float,
        default=0.1,
        help="weight of cross-entropy on the actual next tokens (default 0.1)",
    )
    p.add_argument("--log-every", type=int, default=5, help="print the loss every N steps")
    p.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)"
    )
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def build_student(vocab_size: int, seed: int) -> Any:
    """A tiny random Llama over the student vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def train(args: argparse.Namespace) -> list[float]:
    """Run ``args.steps`` steps; returns the loss of every step (stops early at the first
    non-finite loss, which is then the last entry)."""
    import torch

    from pipeline.loss import sparse_kd_loss
    from pipeline.reader import TargetDataset, TargetLoader, open_run

    run = open_run(args.run)
    prov = run.provenance
    vocab = int(prov["student_vocab_size"])
    teacher_temperature = float(prov.get("temperature", 1.0))
    temperature = teacher_temperature if args.temperature is None else args.temperature
    device = torch.device(args.device)

    model = build_student(vocab, args.seed).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    ds = TargetDataset(run, batch_size=args.batch_size, seed=args.seed)
    loader = TargetLoader(ds, num_workers=args.num_workers)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"run {args.run}: teacher {prov.get('teacher')}, student vocab {vocab}, "
        f"k={run.top_k}, teacher temperature {teacher_temperature}, student temperature "
        f"{temperature}; student {params / 1e6:.2f}M params on {device}",
        flush=True,
    )

    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    epoch = 0
    while len(losses) < args.steps:
        loader.set_epoch(epoch)
        before = len(losses)
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            loss = sparse_kd_loss(
                logits, batch, temperature=temperature, kind="kl", ce_weight=args.ce_weight
            )
            value = float(loss.detach())
            losses.append(value)
            if not math.isfinite(value):
                print(f"step {len(losses)}: loss is {value}; stopping", flush=True)
                return losses
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tokens += int(batch["loss_mask"].sum())
            step = len(losses)
            if step % args.log_every == 0 or step == 1 or step == args.steps:
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                print(
                    f"step {step:5d}/{args.steps}  epoch {epoch}  loss {value:.4f}  "
                    f"{rate:,.0f} target tokens/s",
                    flush=True,
                )
            if step >= args.steps:
                break
        if len(losses) == before:
            raise RuntimeError(f"run {args.run} yielded no batches")
        epoch += 1
    return losses


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    losses = train(args)
    if not all(math.isfinite(x) for x in losses):
        return 1
    n = min(10, len(losses))
    first = sum(losses[:n]) / n
    last = sum(losses[-n:]) / n
    print(f"loss first {n} steps {first:.4f} -> last {n} steps {last:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
