"""Audit throughput next to the reader's raw throughput, on the same shards, in one run,
one process pinned to one core.

    python -m jobs.bench.audit [--docs 32] [--seconds 3] [--run DIR]

Both are measured in target rows per second (``L + 1`` rows per sequence):

- reader raw: what `pipeline.reader` does per unit of work: `pipeline.shards.open_shard`
  (size, footer, schema version, row counts), then per row group ``read_row_group`` of
  the reader's columns (``DECODE_COLUMNS``, page CRCs verified) and
  `pipeline.shards.decode_row_group` into numpy arrays;
- audit: `pipeline.audit.audit_shard` per shard: sha256 of the whole file, the same
  ``open_shard`` checks, EVERY column of every row group read with its page CRCs, the
  quality statistics, and the footer's column sizes.

Without ``--run`` it first generates a small run with the demo config (SmolLM2-135M
teacher, 8,000-merge student, k=64, GSM8K chats) in-process, as `jobs.bench.reader`
does. Passes alternate between the two (file cache warm for both; the first pass of
each is a warm-up, not counted) until each has run ``--seconds``. Target: the audit at
>= 50% of the reader's raw rate.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--docs", type=int, default=32, help="GSM8K chats to generate (default 32)")
    p.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per mode")
    p.add_argument("--run", help="audit this existing run instead of generating one")
    args = p.parse_args(argv)

    from jobs.bench.common import demo_run, pin_one_core

    tmp = demo_run(args.docs, "xtok-bench-audit-") if args.run is None else None
    run_dir = tmp or args.run
    try:
        pin_one_core()
        import hashlib

        from pipeline.audit import RunAudit, audit_shard, locate
        from pipeline.reader import open_run
        from pipeline.shards import DECODE_COLUMNS, decode_row_group, open_shard

        run = open_run(run_dir)
        k = run.top_k
        source = locate(run_dir)

        def reader_pass() -> int:
            rows = 0
            for s in run.shards:
                shard = open_shard(s)
                for g in range(len(shard.row_groups)):
                    table = shard.file.read_row_group(
                        g, columns=list(DECODE_COLUMNS), use_threads=False
                    )
                    rows += len(decode_row_group(table, k).topk_ids)
                shard.close()
            return rows

        def audit_pass() -> int:
            audit = RunAudit(source)
            for ref in source.shards:
                a = audit_shard(ref, None, use_threads=False)
                if not a.ok:
                    raise SystemExit(f"audit failed on {a.name}: {a.failures}")
                audit.add(a)
            return int(audit.totals.rows)

        def hash_pass() -> int:
            for s in run.shards:
                with open(s.url, "rb") as f:
                    hashlib.sha256(f.read()).hexdigest()
            return sum(
                int(s.manifest.student_tokens or 0) + int(s.manifest.sequences or 0)
                for s in run.shards
            )

        def all_columns_pass() -> int:
            rows = 0
            for s in run.shards:
                shard = open_shard(s)
                for g in range(len(shard.row_groups)):
                    table = shard.file.read_row_group(g, use_threads=False)
                    rows += len(table["loss_mask"].combine_chunks().values)
                shard.close()
            return rows

        modes = {
            "reader raw": reader_pass,
            "audit": audit_pass,
            "  sha256 of the files": hash_pass,
            "  read all columns": all_columns_pass,
        }
        spent = dict.fromkeys(modes, 0.0)
        rows = dict.fromkeys(modes, 0)
        for fn in modes.values():  # warm-up: file cache, lazy imports
            fn()
        while min(spent.values()) < args.seconds:
            for name, fn in modes.items():
                if spent[name] >= args.seconds:
                    continue
                t0 = time.perf_counter()
                n = fn()
                spent[name] += time.perf_counter() - t0
                rows[name] += n
        total_rows = audit_pass()
        tokens = sum(int(s.manifest.student_tokens or 0) for s in run.shards)
        size = sum(int(s.manifest.bytes or 0) for s in run.shards)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    rate = {name: rows[name] / spent[name] for name in modes}
    print(
        f"run: {len(run.shards)} shards, {total_rows} target rows, {tokens} student tokens, "
        f"k={k}, {size / tokens:.1f} bytes/token, {size / 1e6:.1f} MB"
    )
    for name in modes:
        print(f"{name:24s} {rate[name]:12,.0f} target rows/s ({spent[name]:.1f}s timed, one core)")
    ratio = rate["audit"] / rate["reader raw"]
    print(
        f"audit / reader raw      {ratio:12.0%}  (target >= 50%: "
        f"{'met' if ratio >= 0.5 else 'NOT met'}); audit at {rate['audit'] * size / total_rows / 1e6:,.0f} MB/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
