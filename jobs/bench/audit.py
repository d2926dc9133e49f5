"""Audit throughput next to the reader's raw throughput, on the same shards, in one run,
one process pinned to one core.

    python -m jobs.bench_audit [--docs 32] [--seconds 3] [--run DIR]

Both are measured in target rows per second (``L + 1`` rows per sequence):

- reader raw: what `pipeline.reader` does per unit of work: ``_open_shard`` (size,
  footer, schema version, row counts), then per row group ``read_row_group`` of the
  reader's columns (page CRCs verified) and ``_decode`` into numpy arrays;
- audit: `pipeline.audit.audit_shard` per shard: sha256 of the whole file, the same
  ``_open_shard`` checks, EVERY column of every row group read with its page CRCs, the
  quality statistics, and the footer's column sizes.

Without ``--run`` it first generates a small run with the demo config (SmolLM2-135M
teacher, 8,000-merge student, k=64, GSM8K chats) in-process, as `jobs.bench_reader`
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

    from jobs._bench import demo_run, pin_one_core

    tmp = demo_run(args.docs, "xtok-bench-audit-") if args.run is None else None
    run_dir = tmp or args.run
    try:
        pin_one_core()
        import hashlib

        from pipeline.audit import RunAudit, audit_shard, locate
        from pipeline.reader import _COLUMNS, _decode, _open_shard, open_run

        run = open_run(run_dir)
        k = run.top_k
        source = locate(run_dir)

        def reader_pass() -> int:
            rows = 0
            for s in run.shards:
                pf, groups = _open_shard(s, None)
                for g in range(len(groups)):
                    unit = _decode(pf.read_row_group(g, columns=_COLUMNS, use_threads=False), k)
                    rows += len(unit.topk_ids)
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
                int(s.manifest["student_tokens"]) + int(s.manifest["sequences"]) for s in run.shards
            )

        def all_columns_pass() -> int:
            rows = 0
            for s in run.shards:
                pf, groups = _open_shard(s, None)
                for g in range(len(groups)):
                    rows += len(
                        pf.read_row_group(g, use_threads=False)["loss_mask"].combine_chunks().values
                    )
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
        tokens = sum(int(s.manifest["student_tokens"]) for s in run.shards)
        size = sum(int(s.manifest["bytes"]) for s in run.shards)
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
