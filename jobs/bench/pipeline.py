"""Benchmark of the generate pipeline around the scorer (one run, ratios printed).

Same documents (GSM8K chats, the demo config: SmolLM2-135M-Instruct teacher, 8,000-merge
student, k=64, CPU), measured in one run:
- the bare scorer in-process (prepare + teacher + rows, no IO), student tokens/s;
- the full job on a local Ray (reading input shards, chunking, scoring, Parquet
  encoding, atomic commits, manifests, index), student tokens/s, with one actor so
  both use the same cores;
- bytes per student token of the shards and the log-prob quantisation error.

    python -m jobs.bench.pipeline [--docs 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--docs", type=int, default=64)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from jobs.generate import DEMO_CONFIG, demo_inputs
    from pipeline import run as run_job
    from pipeline.config import load_config
    from pipeline.generate import GenerateStep
    from pipeline.records import Document, read_shard
    from pipeline.shards import column_bytes, read_table
    from schemas.targets import decode_topk_logprobs

    shards = demo_inputs(max(args.docs, 8), 4)
    cfg = load_config(DEMO_CONFIG, [f"input.paths={json.dumps(shards)}", "teacher.device=cpu"])
    step = GenerateStep(cfg)
    step.setup()
    docs = []
    for s in shards:
        docs += [
            r
            for r in read_shard(s, cfg.input, step.chat_template).records
            if isinstance(r, Document)
        ]
    texts = [c.text for d in docs for c, _ in step.prepared_chunks(d.text)]
    scorer = step.scorer
    assert scorer is not None  # the demo config has the student kind
    scorer.score(step.teacher, texts[:2], top_k=64)  # warm-up
    t = time.perf_counter()
    scored = scorer.score(step.teacher, texts, top_k=64)
    t_bare = time.perf_counter() - t
    tokens = sum(len(r.student_ids) for r in scored)
    bare = tokens / t_bare

    out = tempfile.mkdtemp(prefix="xtok-bench-")
    try:
        t = time.perf_counter()
        job_cfg = load_config(
            DEMO_CONFIG,
            [
                f"input.paths={json.dumps(shards)}",
                f"output.path={out}",
                "ray.num_actors=1",
                f"ray.num_cpus_per_actor={torch.get_num_threads()}",
                "teacher.device=cpu",
            ],
        )
        result = run_job(job_cfg, executor="ray")
        t_job = time.perf_counter() - t
        stats = result.stats  # what stats.json holds
        manifests = [result.manifests[s] for s in result.plan.shards]
        shard_seconds = sum(m["seconds"] for m in manifests)
        # quantisation error against the in-process scores; bytes by column
        by_id = {}
        columns: dict[str, int] = {}
        ids_by_rank: list[np.ndarray] = []
        for m in manifests:
            table = read_table(os.path.join(out, m["file"]))
            for r in table.to_pylist():
                by_id[(r["doc_id"], r["chunk"])] = r
            ids_by_rank.append(
                table["topk_ids"]
                .combine_chunks()
                .flatten()
                .to_numpy()
                .reshape(-1, cfg.scoring.top_k)
            )
            for name, (packed, _) in column_bytes(os.path.join(out, m["file"])).items():
                columns[name] = columns.get(name, 0) + packed
        k = cfg.scoring.top_k
        err = 0.0
        i = 0
        for d in docs:
            for c, _ in enumerate(step.prepared_chunks(d.text)):
                r = by_id[(d.doc_id, c)]
                got = decode_topk_logprobs(np.reshape(r["topk_logprob_dq"], (-1, k)))
                want = scored[i].topk_logprobs
                assert want is not None
                fin = np.isfinite(want)
                err = max(err, float(np.abs(got[fin] - want[fin]).max()))
                i += 1
    finally:
        shutil.rmtree(out, ignore_errors=True)
    job_tokens = stats["student_tokens"]
    print(f"documents {len(docs)}, sequences {len(texts)}, student tokens {tokens}")
    print(f"bare scorer          {bare:8.1f} student tokens/s ({t_bare:.1f}s)")
    print(
        f"full job (Ray, 1 actor) {job_tokens / t_job:8.1f} student tokens/s end to end incl. startup ({t_job:.1f}s); "
        f"stats.json: {stats['student_tokens_per_second']} tokens/s"
    )
    steady = job_tokens / shard_seconds
    print(
        f"in the actor         {steady:8.1f} student tokens/s (read, chunk, score, encode, commit: {shard_seconds:.1f}s)"
    )
    print(
        f"pipeline cost        {1 - steady / bare:+.1%} of the bare scorer's rate inside the actor (target <= 10%); "
        f"{1 - job_tokens / t_job / bare:+.1%} including Ray and model start-up"
    )
    print(f"bytes/student token  {stats['bytes_per_student_token']} at k={k} (target <= 100)")
    rows = sum(len(a) for a in ids_by_rank)
    print("  by column (bytes per target row, i.e. per student token + 1 per sequence):")
    for name, packed in sorted(columns.items(), key=lambda x: -x[1]):
        print(f"    {name:18s} {packed / rows:7.2f}")
    ids = np.concatenate(ids_by_rank)
    floor = 0.0
    for rank in range(ids.shape[1]):  # empirical entropy of the id at each rank
        _, counts = np.unique(ids[:, rank], return_counts=True)
        p = counts / counts.sum()
        floor -= float((p * np.log2(p)).sum()) / 8
    print(
        f"  top-k ids: {columns['topk_ids'] / rows:.1f} B/row stored vs {floor:.1f} B/row "
        "empirical entropy of the id at each rank (an optimistic floor for ranked ids)"
    )
    print(f"max |log-prob error| {err:.2e} nats (target <= 1e-3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
