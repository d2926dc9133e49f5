"""Train a tiny student on a run's targets: the reader and the loss end to end.

    python -m jobs.generate                      # writes ./out (the demo run)
    python -m jobs.train_student --run ./out --steps 50

    # a run for ANY student, then a student whose tokenizer the run never saw
    python -m jobs.generate output.path=./any "scoring.targets=[bytes,teacher]"
    python -m jobs.train_student --run ./any --loss alm --student-tokenizer tok.json
    python -m jobs.train_student --run ./any --loss bld --student-tokenizer tok.json

Builds a small random Llama (hidden 64, 2 layers, 4 heads), streams the run with
`pipeline.reader.TargetDataset` / `TargetLoader` (seeded shuffle, epochs cycled with
``set_epoch`` until ``--steps`` optimizer steps are done) and trains it with AdamW on one
of three losses (``--loss``):

- ``kd`` (default): the run's own student rows (``scoring.targets`` with ``student``;
  the student vocabulary is ``provenance["student_vocab_size"]``) with
  ``pipeline.loss.sparse_kd_loss`` (KL on the sparse top-k + tail targets, mixed with
  ``--ce-weight`` cross-entropy on the actual next tokens).
- ``alm``: Approximate Likelihood Matching (``pipeline.loss.alm_loss``) for a student
  with ANY tokenizer (``--student-tokenizer``; its vocabulary sizes the student): the
  reader encodes each stored text with it and aligns the run's ``teacher`` kind into
  chunks that end on both tokenizations' boundaries; the student's log-likelihood of
  each chunk is matched to the teacher's (``--alm-distance`` at
  ``--binarization-temp``).
- ``bld``: byte-level distillation for a student with any tokenizer: a
  ``pipeline.heads.ByteHead`` on the student's last hidden state predicts the next
  ``--byte-window`` bytes after every student token and is trained, jointly with the
  student, on the run's ``bytes`` kind (the teacher's exact next-byte distributions) with
  ``pipeline.loss.byte_head_loss``.

It prints the loss every few steps and ends with ``loss first 10 steps X -> last 10
steps Y``; a falling loss means the student is learning the teacher's targets. The exit
status is 1 if the loss is ever not finite, 2 for a usage error (a loss the run has no
targets for, a missing or unreadable --student-tokenizer), with a one-line message.

The targets are stored at the teacher temperature the run recorded
(``provenance["temperature"]``); ``--temperature`` (default: that same value, i.e.
matched-temperature distillation) divides the student's logits (and the byte head's),
and the kd and bld terms are scaled by its square. It is an example, not a trainer: no
checkpoints, no evaluation.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LOSSES = ("kd", "alm", "bld")
# the run's target kind each loss reads
KIND_OF_LOSS = {"kd": "student", "alm": "teacher", "bld": "bytes"}


class UsageError(Exception):
    """A request the run or the options cannot serve: reported in one line, exit 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.loss import ALM_DISTANCES

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
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default="kd",
        help="kd: sparse KD on the run's own student rows (needs the run's `student` kind); "
        "alm: ALM chunk-likelihood matching for any student tokenizer (needs `teacher`); "
        "bld: a byte head distilled on the teacher's next-byte distributions for any "
        "student tokenizer (needs `bytes`). Default kd",
    )
    p.add_argument(
        "--student-tokenizer",
        metavar="PATH_OR_ID",
        default=None,
        help="the student's tokenizer, required by --loss alm/bld (not used by kd): a "
        "tokenizer.json (e.g. trained with `tokenizers`), an HF directory or a hub id "
        "(offline: from the local cache); its vocabulary size sizes the student",
    )
    p.add_argument(
        "--bos",
        default="auto",
        metavar="auto|none|TOKEN",
        help="alm/bld: the start token the student reads before every text. auto "
        "(default): the token the tokenizer's post-processor prepends, else the "
        "bos_token of its tokenizer_config.json (HF directory / hub id), else none; none: "
        "no start token (the targets of the first token, which has no input position, "
        "are then not used); TOKEN: that token of the student vocabulary",
    )
    p.add_argument(
        "--byte-window",
        type=int,
        default=4,
        metavar="M",
        help="bld: bytes the byte head predicts after every student token (default 4)",
    )
    p.add_argument(
        "--alm-distance",
        choices=ALM_DISTANCES,
        default="binary_ce",
        help="alm: the distance between teacher and student chunk probabilities "
        "(pipeline.loss.alm_chunk_distance; default binary_ce)",
    )
    p.add_argument(
        "--binarization-temp",
        type=float,
        default=None,
        help="alm: the chunk probabilities are raised to 1/this before the binarised "
        "distance (default: alm_loss's default, 100)",
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
        default=None,
        help="weight w of cross-entropy on the actual next student tokens: loss = "
        "(1 - w) * distillation + w * CE (default 0.1 for kd, 0 for alm and bld)",
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
    if args.byte_window < 1:
        p.error("--byte-window must be >= 1")
    if args.binarization_temp is not None and not args.binarization_temp > 0:
        p.error("--binarization-temp must be > 0")
    if args.ce_weight is None:
        args.ce_weight = 0.1 if args.loss == "kd" else 0.0
    if not 0.0 <= args.ce_weight <= 1.0:
        p.error("--ce-weight must be in [0, 1]")
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


def _config_bos(source: str) -> str | None:
    """The ``bos_token`` an HF tokenizer declares (tokenizer_config.json of a directory or
    beside a tokenizer.json; a hub id through transformers), or None."""
    path = Path(source)
    cfg = None
    if path.is_dir():
        cfg = path / "tokenizer_config.json"
    elif path.is_file():
        if path.name != "tokenizer.json":
            return None
        cfg = path.parent / "tokenizer_config.json"
    if cfg is not None:
        if not cfg.is_file():
            return None
        try:
            bos = json.loads(cfg.read_text(encoding="utf-8")).get("bos_token")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(bos, dict):
            bos = bos.get("content")
        return bos if isinstance(bos, str) else None
    try:  # a hub id (load_tokenizer has just resolved it, so it is cached)
        from transformers import AutoTokenizer

        bos = AutoTokenizer.from_pretrained(source).bos_token
    except Exception:
        return None
    return bos if isinstance(bos, str) else None


def student_bos(spec: str, source: str, tok: Any) -> int | None:
    """The id the student reads first (``--bos``), None for no start token."""
    if spec == "none":
        return None
    if spec != "auto":
        tid = tok.token_to_id(spec)
        if tid is None:
            raise UsageError(f"--bos {spec!r} is not a token of the student tokenizer {source}")
        return int(tid)
    ids = tok.encode("", add_special_tokens=True).ids
    if ids:  # a post-processor that prepends a start token (Llama's <s>, ...)
        return int(ids[0])
    bos = _config_bos(source)
    if bos is not None and tok.token_to_id(bos) is not None:
        return int(tok.token_to_id(bos))
    return None


def check_request(args: argparse.Namespace, kinds: list[str], run_url: str) -> None:
    """Raise `UsageError` when the run has no targets for ``--loss``."""
    need = KIND_OF_LOSS[args.loss]
    if need in kinds:
        return
    stored = ", ".join(kinds)
    if args.loss == "kd":
        raise UsageError(
            f"--loss kd needs the run's own student rows, but run {run_url} stores "
            f"targets {stored} (no student kind): train with --loss alm (kind teacher) "
            "or --loss bld (kind bytes) and --student-tokenizer"
        )
    raise UsageError(
        f"--loss {args.loss} needs the run's `{need}` kind, but run {run_url} stores "
        f"targets {stored}: generate with scoring.targets including {need}"
    )


def train(args: argparse.Namespace) -> list[float]:
    """Run ``args.steps`` steps; returns the loss of every step (stops early at the first
    non-finite loss, which is then the last entry). Raises `UsageError` for a request
    the run or the options cannot serve."""
    import torch
    import torch.nn.functional as F

    from pipeline.heads import ByteHead
    from pipeline.loss import IGNORE_INDEX, alm_loss, byte_head_loss, sparse_kd_loss
    from pipeline.reader import TargetDataset, TargetLoader, open_run
    from pipeline.tokenization import TokenizerError, load_tokenizer

    if args.loss == "kd" and args.student_tokenizer is not None:
        raise UsageError(
            "--student-tokenizer is for --loss alm/bld; --loss kd trains the run's own "
            "student (its vocabulary is in the run)"
        )
    if args.loss == "kd" and args.bos != "auto":
        raise UsageError(
            "--bos is for --loss alm/bld; --loss kd reads the run's own student rows "
            "without a start token"
        )
    if args.loss != "kd" and args.student_tokenizer is None:
        raise UsageError(
            f"--loss {args.loss} needs --student-tokenizer PATH_OR_ID (the student's "
            "tokenizer: a tokenizer.json, an HF directory or a hub id)"
        )
    run = open_run(args.run)
    prov = run.provenance
    check_request(args, prov.kinds, args.run)
    teacher_temperature = float(prov.get("temperature", 1.0))
    temperature = teacher_temperature if args.temperature is None else args.temperature
    device = torch.device(args.device)

    head: ByteHead | None = None
    if args.loss == "kd":
        vocab = int(prov["student_vocab_size"])
        ds = TargetDataset(run, batch_size=args.batch_size, seed=args.seed)
        about = f"student vocab {vocab}, k={run.top_k}"
    else:
        try:
            tok = load_tokenizer(args.student_tokenizer)
        except TokenizerError as err:
            raise UsageError(f"--student-tokenizer {args.student_tokenizer}: {err}") from None
        vocab = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        bos = student_bos(args.bos, args.student_tokenizer, tok)
        kind = KIND_OF_LOSS[args.loss]
        ds = TargetDataset(
            run,
            batch_size=args.batch_size,
            seed=args.seed,
            student_tokenizer=tok,
            targets=[kind],
            byte_window=args.byte_window,
            bos_id=bos,
        )
        bos_text = "none" if bos is None else f"{tok.id_to_token(bos)!r} (id {bos})"
        about = f"student tokenizer {args.student_tokenizer} (vocab {vocab}, BOS {bos_text})"
        if args.loss == "alm":
            btemp = args.binarization_temp
            if btemp is None:
                btemp = inspect.signature(alm_loss).parameters["binarization_temp"].default
            about += f", ALM {args.alm_distance} at binarization temp {btemp}"
        else:
            specials = list(prov.byte_specials or [])
            head = ByteHead(64, args.byte_window, vocab=257 + len(specials))
            about += (
                f", byte head m={args.byte_window} over {257 + len(specials)} symbols, "
                f"byte top-k {prov.byte_top_k}"
            )

    model = build_student(vocab, args.seed).to(device)
    model.train()
    params = list(model.parameters())
    if head is not None:
        head = head.to(device)
        head.train()
        params += list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    loader = TargetLoader(ds, num_workers=args.num_workers)
    print(
        f"run {args.run}: teacher {prov.get('teacher')}, targets {', '.join(prov.kinds)}; "
        f"loss {args.loss}: {about}; teacher temperature {teacher_temperature}, student "
        f"temperature {temperature}, ce weight {args.ce_weight}; student "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M params on {device}",
        flush=True,
    )
    alm_options: dict[str, Any] = {"distance": args.alm_distance}
    if args.binarization_temp is not None:
        alm_options["binarization_temp"] = args.binarization_temp

    def step_loss(batch: dict[str, Any]) -> Any:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=head is not None,
        )
        if args.loss == "kd":
            return sparse_kd_loss(
                out.logits, batch, temperature=temperature, kind="kl", ce_weight=args.ce_weight
            )
        if head is not None:
            byte_logits = head(out.hidden_states[-1], batch["byte_next"])
            distill = byte_head_loss(byte_logits, batch, kind="kl", temperature=temperature)
        else:
            distill = alm_loss(out.logits, batch, temperature=temperature, **alm_options)
        labels = batch["labels"]
        if args.ce_weight == 0 or not bool((labels != IGNORE_INDEX).any()):
            return distill
        ce = F.cross_entropy(
            out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
        )
        return (1 - args.ce_weight) * distill + args.ce_weight * ce

    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    epoch = 0
    while len(losses) < args.steps:
        loader.set_epoch(epoch)
        before = len(losses)
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss = step_loss(batch)
            value = float(loss.detach())
            losses.append(value)
            if not math.isfinite(value):
                print(f"step {len(losses)}: loss is {value}; stopping", flush=True)
                return losses
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
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
    try:
        losses = train(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not all(math.isfinite(x) for x in losses):
        return 1
    n = min(10, len(losses))
    first = sum(losses[:n]) / n
    last = sum(losses[-n:]) / n
    print(f"loss first {n} steps {first:.4f} -> last {n} steps {last:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
