"""Reader throughput: student tokens/s decoded into torch tensors (k=64, one process pinned
to one core), next to the rate at which the pipeline produced the same shards in the
same run.

    python -m jobs.bench.reader [--docs 32] [--seconds 3] [--run DIR]

Without ``--run`` it first generates a small run with the demo config (SmolLM2-135M
teacher, 8,000-merge student, k=64, GSM8K chats) in-process, which also measures the
production rate; with ``--run`` it reads an existing run (production rate from its
stats.json). Reading repeats epochs until ``--seconds`` have passed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--docs", type=int, default=32, help="GSM8K chats to generate (default 32)")
    p.add_argument("--seconds", type=float, default=3.0, help="minimum read time per mode")
    p.add_argument("--run", help="read this existing run instead of generating one")
    args = p.parse_args(argv)

    from jobs.bench.common import demo_run, pin_one_core
    from pipeline.reader import TargetDataset, open_run
    from pipeline.shards import DECODE_COLUMNS, decode_row_group, open_shard

    tmp = demo_run(args.docs, "xtok-bench-reader-") if args.run is None else None
    run_dir = tmp or args.run
    try:
        stats = json.loads(Path(run_dir, "stats.json").read_text())
        pin_one_core()
        run = open_run(run_dir)
        k = run.top_k

        def rate(ds: TargetDataset) -> tuple[float, int]:
            tokens = 0
            t0 = time.perf_counter()
            epochs = 0
            while time.perf_counter() - t0 < args.seconds or epochs == 0:
                ds.set_epoch(epochs)
                for batch in ds:
                    tokens += int(batch["attention_mask"].sum())
                epochs += 1
            return tokens / (time.perf_counter() - t0), epochs

        # stage costs on one row group at a time (warm file cache)
        run.load_footers()
        t_read = t_decode = 0.0
        n_rows = 0
        for rep in range(3):  # the first pass warms caches and lazy imports: not counted
            for s in run.shards:
                shard = open_shard(s)
                for g in range(len(shard.row_groups)):
                    t0 = time.perf_counter()
                    table = shard.file.read_row_group(
                        g, columns=list(DECODE_COLUMNS), use_threads=False
                    )
                    t1 = time.perf_counter()
                    unit = decode_row_group(table, k)
                    t2 = time.perf_counter()
                    if rep:
                        t_read += t1 - t0
                        t_decode += t2 - t1
                        n_rows += len(unit.topk_ids)
                shard.close()
        # the ceiling any zstd-compressed layout has here: decompressing the top-k ids and
        # log-prob columns' raw bytes (zstd level 3, one frame per row group) and nothing else
        import zstandard

        frames = []
        zstd_rows = 0
        for s in run.shards:
            shard = open_shard(s)
            table = shard.file.read(columns=list(DECODE_COLUMNS))
            shard.close()
            zstd_rows += len(table["loss_mask"].combine_chunks().values)
            for c in ("topk_ids", "topk_logprob_dq"):
                raw = table[c].combine_chunks().values.to_numpy().tobytes()
                frames.append(zstandard.ZstdCompressor(level=3).compress(raw))
        dctx = zstandard.ZstdDecompressor()
        t0 = time.perf_counter()
        reps = 0
        while time.perf_counter() - t0 < 1.0:
            for f in frames:
                dctx.decompress(f)
            reps += 1
        zstd_rate = reps * zstd_rows / (time.perf_counter() - t0)
        results = {}
        for name, batch_size, pack in (
            ("unpacked, batch 8", 8, None),
            ("packed to 2048, batch 4", 4, 2048),
        ):
            ds = TargetDataset(run, batch_size, pack_length=pack, prefetch=0, seed=0)
            results[name] = rate(ds)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    produce = stats["student_tokens_per_second"]
    print(
        f"run: {stats['student_tokens']} student tokens, k={k}, "
        f"{stats['bytes_per_student_token']} bytes/token"
    )
    print(
        f"produced at          {produce:12,.0f} student tokens/s (generate job, CPU, "
        f"{stats.get('executor', 'this machine')})"
    )
    print(
        f"zstd alone (ceiling) {zstd_rate:12,.0f} target rows/s: decompressing the top-k "
        "columns' raw bytes, nothing else"
    )
    print(f"parquet read         {n_rows / t_read:12,.0f} target rows/s (one core)")
    print(f"decode to arrays     {n_rows / t_decode:12,.0f} target rows/s")
    for name, (r, epochs) in results.items():
        print(
            f"reader {name:24s} {r:12,.0f} student tokens/s into torch tensors "
            f"({epochs} epochs, one core; {r / produce:,.0f}x the production rate; "
            "target >= 2,000,000)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
