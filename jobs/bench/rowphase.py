"""The subset-exact row phase as a GPU host would see it, measured on CPU: torch ops and
host waits per student token, and the host's planning time.

On a GPU every torch op is a kernel launch (a few us of host time each) and every read
of a device value on the host (``.item()``, ``bool()``, ``int()``, ``.cpu()``,
``.numpy()``, ``.tolist()``, ``nonzero``, ``unique``, boolean indexing, a
``repeat_interleave`` without its output size) makes the host wait for the device.
This script counts both, per student token, while `SubsetExactScorer.score_prepared`
scores short GSM8K chats with a table teacher (log-probs from a fixed random table, the
real vocabulary; the teacher's own ops are not counted), and times the phases on the
host. It runs against any version of the scorer that has ``score_prepared`` (run it
from an older checkout to compare).

    python -m jobs.bench.rowphase [--docs 64] [--vocab smollm2,qwen2] [--nodes 1024]
                                  [--block-mib 256]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose output size or value the host must read before going on
DATA_DEPENDENT = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::masked_select",
}
HOST_READS = ("item", "tolist", "numpy", "cpu")


class Counting(TorchDispatchMode):
    """Counts aten ops and the data-dependent ones while not ``paused``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.waits: Counter[str] = Counter()
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not self.paused:
            name = func._schema.name
            self.ops[name] += 1
            unsized = name == "aten::repeat_interleave" and kwargs.get("output_size") is None
            if name in DATA_DEPENDENT or unsized:
                self.waits[name] += 1
            elif name in ("aten::index", "aten::index_put_", "aten::index_put"):
                idx = args[1] if len(args) > 1 else []
                if any(t is not None and t.dtype == torch.bool for t in idx):
                    self.waits[name + " (bool)"] += 1
        return func(*args, **kwargs)


class TableTeacher:
    """Log-probs of node v = a fixed random table row chosen by v's token."""

    def __init__(self, vocab: int, counting: Counting, max_batch_tokens: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.table = torch.log_softmax(torch.randn(64, vocab, generator=g) * 3.0, dim=-1)
        self.counting = counting
        self.max_batch_tokens = max_batch_tokens
        self.start_ids = [0]
        self.seconds = 0.0

    def tree_logprob_batches(self, trees: Any) -> Any:
        """All trees in one batch (one gather), as `HFTeacher.tree_logprob_batches`
        gives a forward's trees; a scorer without the batch path uses `tree_logprobs`."""
        t0 = time.thread_time()
        self.counting.paused = True
        try:
            first, row = {}, 0
            for t, (tok, _) in enumerate(trees):
                first[t] = row
                row += len(tok)
            ids = torch.as_tensor([x for tok, _ in trees for x in tok]).clamp_min(0) % 64
            out = self.table[ids]
        finally:
            self.counting.paused = False
            self.seconds += time.thread_time() - t0
        yield out, first

    def tree_logprobs(self, trees: Any) -> list[torch.Tensor]:
        t0 = time.thread_time()
        self.counting.paused = True
        try:
            return [self.table[torch.as_tensor(tok).clamp_min(0) % 64] for tok, _ in trees]
        finally:
            self.counting.paused = False
            self.seconds += time.thread_time() - t0


def pair(vocab: str, tmp: Path) -> tuple[Any, Any]:
    from pipeline.assets import shared_data_dir, smollm2_dir
    from pipeline.tokenization import load_tokenizer, truncate_merges

    if vocab == "smollm2":
        t = load_tokenizer(str(smollm2_dir()))
        return t, truncate_merges(t, 8000)
    from jobs.bench.overlap import qwen2_teacher_dir

    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("the Qwen2 vocabulary needs ../shared/data")
    t = load_tokenizer(str(qwen2_teacher_dir(shared, tmp / "qwen2")))
    return t, load_tokenizer(str(shared / "qwen2-subsets" / "32000" / "tokenizer.json"))


def measure(vocab: str, docs: int, nodes: int, tmp: Path, block_mib: int = 0) -> dict[str, Any]:
    from jobs.bench.common import pin_one_core
    from pipeline.assets import gsm8k_chats
    from pipeline.scoring.subset import SubsetExactScorer

    pin_one_core()
    t_tok, s_tok = pair(vocab, tmp)
    sc = SubsetExactScorer(t_tok, s_tok)
    if block_mib:
        sc.max_block_bytes = block_mib << 20
    texts = ["\n".join(m["content"] for m in chat) for chat in gsm8k_chats(docs)]
    c0 = time.thread_time()
    prepared = [sc.prepare(t) for t in texts]
    prepare_s = time.thread_time() - c0
    tokens = sum(len(p.student_ids) + 1 for p in prepared)
    counting = Counting()
    teacher: Any = TableTeacher(sc.T.size, counting, nodes)
    sc.score_prepared(teacher, prepared[:2], 64, max_batch_nodes=nodes)  # warm-up
    teacher.seconds = 0.0
    saved = {n: getattr(torch.Tensor, n) for n in HOST_READS}
    reads: Counter[str] = Counter()

    def reader(name: str) -> Any:
        def f(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            if not counting.paused:
                reads[name] += 1
            return saved[name](self, *a, **k)

        return f

    c0 = time.thread_time()
    try:
        for n in HOST_READS:
            setattr(torch.Tensor, n, reader(n))
        with counting:
            sc.score_prepared(teacher, prepared, 64, max_batch_nodes=nodes)
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
    rows_s = time.thread_time() - c0 - teacher.seconds
    plan_s = math.nan
    if hasattr(sc, "rows_batch"):  # the host's planning: from entry to the one copy
        import pipeline.scoring.subset as subset

        plan_s = 0.0
        entered = [0.0]
        send, rows_batch = subset._Upload.send, sc.rows_batch

        def timed_send(self: Any, device: Any) -> Any:
            nonlocal plan_s
            plan_s += time.thread_time() - entered[0]
            return send(self, device)

        def timed_rows(*a: Any, **k: Any) -> Any:
            entered[0] = time.thread_time()
            return rows_batch(*a, **k)

        subset._Upload.send = timed_send  # type: ignore[method-assign]
        sc.rows_batch = timed_rows  # type: ignore[method-assign]
        try:
            sc.score_prepared(teacher, prepared, 64, max_batch_nodes=nodes)
        finally:
            subset._Upload.send = send  # type: ignore[method-assign]
            del sc.rows_batch
    waits = sum(counting.waits.values()) + sum(reads.values())
    return {
        "vocab": vocab,
        "docs": docs,
        "student_tokens": tokens,
        "ops_per_token": sum(counting.ops.values()) / tokens,
        "waits_per_token": waits / tokens,
        "waits": dict(counting.waits) | {f".{k}()": v for k, v in reads.items()},
        "prepare_us_per_token": 1e6 * prepare_s / tokens,
        "row_phase_cpu_us_per_token": 1e6 * rows_s / tokens,
        # numpy planning of the row phase (from the covers' plans to the one copy); on a
        # GPU the host adds one launch per op (ops_per_token)
        "row_phase_plan_us_per_token": 1e6 * plan_s / tokens,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.rowphase", description=__doc__)
    ap.add_argument("--docs", type=int, default=64, help="GSM8K chats (default 64)")
    ap.add_argument("--vocab", default="smollm2,qwen2", help="smollm2 and/or qwen2")
    ap.add_argument(
        "--nodes", type=int, default=1024, help="tree nodes per teacher call (default 1024)"
    )
    ap.add_argument(
        "--block-mib",
        type=int,
        default=0,
        help="the scorer's max_block_bytes in MiB (default: the scorer's, 256)",
    )
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="xtok-bench-rowphase-"))
    for vocab in args.vocab.split(","):
        r = measure(vocab, args.docs, args.nodes, tmp, args.block_mib)
        print(json.dumps(r, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
