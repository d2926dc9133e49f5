"""GPU benchmark: teacher forward tokens/s vs pipeline student tokens/s (needs CUDA).

A random-weight model shaped like Qwen2.5-1.5B (built from a config, nothing
downloaded: hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, 151,936 logits)
with the Qwen2 tokenizer from ``../shared/data`` (else SmolLM2's, its 49,152 ids) as
teacher, bfloat16 on ``cuda``, at ``teacher.max_batch_tokens`` (default ``auto``: the
memory planner's choice). Prints, measured in one run on the documents of the demo
input (GSM8K chats, else generated English):

(a) plain teacher forward tokens/s: `HFTeacher.tree_logprobs` over the documents'
    canonical encodings (paths), the same packing as the job;
(b) the generate step's student tokens/s and teacher tokens/s (tokenizer phase, tree
    forward, row phase, Parquet, commit; in-process, one actor's work) for the
    8,000-merge student (32,000 with the Qwen2 tokenizer), and the ratio to (a);
(c) peak device memory of (b) vs the planner's estimate.

    python -m jobs.bench.gpu [--docs 64] [--max-batch-tokens auto]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QWEN25_15B: dict[str, Any] = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--docs", type=int, default=64, help="demo documents")
    p.add_argument("--max-batch-tokens", default="auto", help="an int or auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("CUDA is not available: this benchmark needs a GPU", file=sys.stderr)
        return 2
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from jobs.generate import demo_inputs
    from pipeline.assets import shared_data_dir, smollm2_dir
    from pipeline.config import load_config
    from pipeline.generate import GenerateStep
    from pipeline.teacher import HFTeacher
    from pipeline.tokenization import load_tokenizer

    shared = shared_data_dir()
    qwen = shared / "qwen2-tokenizer" if shared is not None else None
    if qwen is not None and qwen.exists():
        tok_dir, merges, tok_name = str(qwen), 32000, "Qwen2"
    else:
        tok_dir, merges, tok_name = str(smollm2_dir()), 8000, "SmolLM2"
    tok = load_tokenizer(tok_dir)
    shape = dict(QWEN25_15B)
    shape["vocab_size"] = max(shape["vocab_size"], tok.get_vocab_size(with_added_tokens=True))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(Qwen2Config(**shape)).to(getattr(torch, args.dtype))
    model.eval()
    mbt: int | str = args.max_batch_tokens
    mbt = int(mbt) if str(mbt).isdigit() else "auto"
    gpu = torch.cuda.get_device_name()
    print(
        f"{gpu}: random Qwen2.5-1.5B-shaped teacher ({args.dtype}), {tok_name} tokenizer, "
        f"max_batch_tokens={mbt}"
    )

    out = tempfile.mkdtemp(prefix="xtok-bench-gpu-")
    shards = demo_inputs(max(args.docs, 8), 4)
    cfg = load_config(
        None,
        [
            f"input.paths={json.dumps(shards)}",
            f"input.limit={max(1, args.docs // 4)}",
            f"teacher.model={tok_dir}",
            "teacher.device=cuda",
            f"teacher.dtype={args.dtype}",
            f"student.merges={merges}",
            f"output.path={out}",
        ],
    )
    teacher = HFTeacher(model, tok_dir, device="cuda", dtype=args.dtype, max_batch_tokens=mbt)  # type: ignore[arg-type]
    print(f"resolved max_batch_tokens {teacher.max_batch_tokens}")
    cfg.teacher.max_batch_tokens = int(teacher.max_batch_tokens)
    step = GenerateStep(cfg)
    # the step builds its teacher from teacher.model (here a tokenizer-only dir): hand it
    # the random model instead
    import pipeline.teacher as teacher_module

    real = teacher_module.HFTeacher
    teacher_module.HFTeacher = lambda *a, **k: teacher  # type: ignore[misc,assignment]
    try:
        step.setup()
    finally:
        teacher_module.HFTeacher = real  # type: ignore[misc]

    # (a) plain forward over the canonical paths of the same documents
    from pipeline.records import Document, read_shard

    texts = []
    for s in shards:
        recs = read_shard(s, cfg.input, step.chat_template).records
        texts += [r.text for r in recs if isinstance(r, Document)]
    paths = []
    for t in texts:
        for c in step.chunks(t):
            ids = tok.encode(c.text, add_special_tokens=False).ids
            paths.append(([-1, *ids], [-1, *range(len(ids))]))
    teacher.tree_logprobs(paths[:2])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n_tok = 0
    for i in range(0, len(paths), 16):
        batch = paths[i : i + 16]
        teacher.tree_logprobs(batch)
        n_tok += sum(len(x[0]) for x in batch)
    torch.cuda.synchronize()
    fwd = n_tok / (time.perf_counter() - t0)
    print(f"(a) plain tree forward: {fwd:,.0f} teacher tokens/s over {n_tok} tokens")

    # (b) the generate step, shard by shard
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    student = teacher_tokens = 0
    try:
        for s in shards:
            m = step.process_shard(s)
            student += int(m.get("student_tokens", 0))
            teacher_tokens += int(m.get("teacher_tokens") or 0)
    finally:
        step.close()  # the prepare worker processes (teacher.prepare_workers=auto)
    secs = time.perf_counter() - t0
    print(
        f"(b) pipeline: {student / secs:,.0f} student tokens/s ({student} tokens, {secs:.1f} s); "
        f"(b)/(a) = {student / secs / fwd:.2f}"
    )
    peak = torch.cuda.max_memory_allocated()
    print(f"(c) peak device memory {peak / 2**30:.2f} GiB (weights included)")
    estimate = getattr(teacher, "planned_bytes", None)
    if estimate:
        print(f"    planner's estimate for one forward batch: {estimate / 2**30:.2f} GiB")
    print(f"output {Path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
