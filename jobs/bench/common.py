"""Shared set-up of the benchmark scripts: a small demo run to measure on, one core."""

from __future__ import annotations

import json
import os
import tempfile


def demo_run(docs: int, prefix: str) -> str:
    """Generate a small run with the demo config (SmolLM2 teacher, 8,000-merge student,
    k=64, GSM8K chats in 4 shards) in-process into a new temporary directory."""
    from jobs.generate import demo_inputs
    from jobs.generate import main as generate

    out = tempfile.mkdtemp(prefix=prefix)
    shards = demo_inputs(max(docs, 8), 4)
    rc = generate(
        [
            "--executor",
            "local",
            "--show",
            "0",
            f"input.paths={json.dumps(shards)}",
            f"output.path={out}",
            "teacher.device=cpu",
        ]
    )
    if rc != 0:
        raise RuntimeError(f"generating the benchmark run failed (exit {rc})")
    return out


def pin_one_core() -> None:
    """Everything after this runs on one core (the reader and audit targets are per core)."""
    import pyarrow as pa
    import torch

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)
