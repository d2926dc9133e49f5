"""Benchmark of the target kinds (``scoring.targets``): cost, storage and agreement.

Held-out real text (not GSM8K): the docstrings of Python standard-library modules,
with SmolLM2-135M-Instruct as teacher (float32, CPU) and its BPE cut to 8,000 merges as
the ``student`` kind. Prints, measured in one run:

(a) teacher tokens forwarded / canonical teacher tokens (+1 for end of text) for each
    combination of kinds (the merged context trees `pipeline.scoring.kinds` sends to
    the teacher; tokenizer phase only);
(b) wall time of the teacher and row phases per combination, relative to ``teacher``
    alone (one run; this shared machine varies ~10-20%);
(c) stored bytes per text byte and per teacher token, per kind (from the Parquet
    footer of a shard written by `pipeline.shards.build_table`, zstd level 3), and the
    kept mass of the byte rows for byte_top_k = 1..32;
(d) the three views of one likelihood, from the values AS STORED (read back from the
    shard): per sequence, the byte rows' sum of the actual bytes' log-probs, the
    teacher-token log-probs' sum and the student rows' sum of gold log-probs, each
    after the non-canonical mass it records, against the teacher's log-likelihood of
    the text from an independent plain causal forward; the worst sequence is printed.

    python -m jobs.bench.kinds [--docs 16] [--chars 2000]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODULES = (
    "json", "textwrap", "argparse", "collections", "functools", "itertools", "re",
    "pathlib", "subprocess", "threading", "logging", "unittest", "csv", "datetime",
    "heapq", "bisect", "string", "shutil", "tempfile", "zipfile", "decimal", "fractions",
    "statistics", "difflib",
)  # fmt: skip

TEACHER_COLUMNS = (
    "text", "teacher_ids", "teacher_logprob_q", "teacher_byte_len", "teacher_loss_mask",
)  # fmt: skip

COMBOS = (
    ("teacher",),
    ("bytes",),
    ("student",),
    ("student", "teacher"),
    ("bytes", "teacher"),
    ("student", "bytes"),
    ("student", "bytes", "teacher"),
)


def heldout_texts(n: int, chars: int) -> list[str]:
    """Docstrings of standard-library modules, cut at a paragraph before ``chars``."""
    out = []
    for name in MODULES:
        doc = inspect.getdoc(importlib.import_module(name)) or ""
        if len(doc) < 200:
            continue
        if len(doc) > chars:
            cut = doc.rfind("\n\n", 0, chars)
            doc = doc[: cut if cut > chars // 2 else chars]
        out.append(doc)
        if len(out) == n:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench.kinds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--docs", type=int, default=16, help="held-out documents (max 24)")
    p.add_argument("--chars", type=int, default=2000, help="characters per document (about)")
    p.add_argument("--merges", type=int, default=8000, help="merges of the student kind")
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    args = p.parse_args(argv)

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from pipeline.assets import smollm2_dir
    from pipeline.scoring.kinds import TargetKinds
    from pipeline.scoring.subset import SubsetExactScorer
    from pipeline.shards import Sequence_, build_table, encode_parquet
    from pipeline.teacher import HFTeacher
    from pipeline.tokenization import load_tokenizer, truncate_merges
    from schemas.targets import decode_teacher_logprobs

    d = smollm2_dir()
    teacher = HFTeacher(d, device="cpu", dtype="float32", max_batch_tokens=args.max_batch_tokens)
    tok = load_tokenizer(d)
    texts = heldout_texts(args.docs, args.chars)
    student = SubsetExactScorer(tok, truncate_merges(tok, args.merges))
    n_bytes = sum(len(t.encode()) for t in texts)
    print(
        f"teacher SmolLM2-135M-Instruct (cpu float32, {torch.get_num_threads()} threads); "
        f"{len(texts)} stdlib docstrings, {n_bytes} bytes; student: {args.merges} merges"
    )

    # (a) cost in forwarded teacher tokens, (b) time
    print("\n(a) teacher tokens forwarded / canonical (+EOS), (b) time relative to teacher")
    base_time = None
    results: list[Any] | None = None
    kinds_all = None
    for combo in COMBOS:
        tk = TargetKinds(tok, combo, student if "student" in combo else None)
        preps = [tk.prepare(t) for t in texts]
        fwd = sum(len(pr.tree[0]) for pr in preps if pr.tree is not None)
        canon = sum(len(pr.teacher_ids) + 1 for pr in preps)
        t0 = time.perf_counter()
        res: list[Any] = tk.score_prepared(teacher, preps, 64, byte_top_k=32)
        secs = time.perf_counter() - t0
        base_time = base_time or secs
        print(
            f"  {'+'.join(combo):24s} {fwd / canon:6.3f}   {secs:7.2f} s  "
            f"({secs / base_time:5.2f}x teacher)"
        )
        if len(combo) == 3:
            results, kinds_all = res, tk

    assert results is not None and kinds_all is not None
    # (c) storage: byte rows kept mass by k, then a shard at the default k
    probs = np.concatenate([np.exp(r.bytes.scored.topk_logprobs) for r in results])
    kept = np.cumsum(probs, axis=1)
    print("\n(c) byte rows: kept mass (1 - tail) by byte_top_k, over all rows")
    for k in (1, 2, 4, 8, 16, 32):
        print(
            f"  k={k:2d}: mean {kept[:, k - 1].mean():.4f}, 1st percentile "
            f"{np.percentile(kept[:, k - 1], 1):.4f}"
        )
    student_tokens = sum(len(r.student.student_ids) for r in results)
    teacher_tokens = sum(len(r.teacher.ids) for r in results)
    print(
        f"  {n_bytes} text bytes, {teacher_tokens} teacher tokens, {student_tokens} student tokens"
    )
    for kb in (4, 8, 16):
        seqs = []
        for i, r in enumerate(results):
            b = r.bytes
            sc = b.scored
            cut = type(sc)(**{**sc.__dict__})
            cut.topk_ids = sc.topk_ids[:, :kb]
            cut.topk_logprobs = sc.topk_logprobs[:, :kb]
            cut.tail_mass = np.clip(1.0 - np.exp(cut.topk_logprobs).sum(1), 0.0, None)
            rows = type(b)(b.row_start, b.symbols, cut)
            seqs.append(
                Sequence_(
                    f"doc{i}",
                    0,
                    r.student,
                    np.ones(len(r.student.student_ids) + 1, bool),
                    text=r.text,
                    teacher=r.teacher,
                    teacher_loss_mask=np.ones(len(r.teacher.ids) + 1, bool),
                    bytes=rows,
                    byte_loss_mask=np.ones(len(b.row_start), bool),
                )
            )
        table = build_table(
            seqs,
            64,
            student.S.size,
            kinds=("student", "bytes", "teacher"),
            byte_top_k=kb,
            teacher_vocab_size=tok.get_vocab_size(),
        )
        data = encode_parquet(table, {"schema_version": 2}, 3, 512)
        md = pq.ParquetFile(io.BytesIO(data)).metadata
        size: dict[str, int] = {}
        for g in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                size[name] = size.get(name, 0) + col.total_compressed_size
        kind_of = {
            "text": "text",
            **{n: "teacher" for n in size if n.startswith("teacher_")},
            **{n: "bytes" for n in size if n.startswith("byte_")},
        }
        per: dict[str, int] = {}
        for n, v in size.items():
            per[kind_of.get(n, "student")] = per.get(kind_of.get(n, "student"), 0) + v
        if kb == 16:
            stored = pq.read_table(io.BytesIO(data))
            detail = ", ".join(f"{n} {size[n] / teacher_tokens:.2f}" for n in TEACHER_COLUMNS)
            print(f"  teacher kind, B/teacher token: {detail}")
        print(
            f"  byte_top_k={kb:2d}: bytes {per['bytes'] / n_bytes:6.2f} B/text byte "
            f"({per['bytes'] / teacher_tokens:6.2f} B/teacher token); teacher "
            f"{per['teacher'] / teacher_tokens:.2f} B/teacher token, with the text "
            f"{(per['teacher'] + per['text']) / teacher_tokens:.2f}; text "
            f"{per['text'] / n_bytes:.3f} B/text byte; student "
            f"{per['student'] / student_tokens:.1f} B/student token"
        )

    # (d) the three views from the stored values vs an independent causal forward
    print("\n(d) per-sequence log-likelihood, stored views vs a plain causal forward (nats)")
    worst = (0.0, "")
    eos = kinds_all.teacher_eos
    for i, r in enumerate(results):
        row = stored.slice(i, 1).to_pylist()[0]
        seq = [*r.teacher.ids.tolist(), eos]
        (tf,) = teacher.teacher_forcing_logprobs([seq])
        ref = float(tf.double().sum())
        views = {
            "teacher": float(np.sum(decode_teacher_logprobs(row["teacher_logprob_q"]))),
            "bytes": float(
                np.sum(np.asarray(row["byte_target_logprob"], np.float64))
                + np.log1p(-np.asarray(row["byte_noncanonical_mass"], np.float64)).sum()
                + np.log1p(-np.asarray(row["byte_unmapped_mass"], np.float64)).sum()
            ),
            "student": float(
                np.sum(np.asarray(row["target_logprob"], np.float64))
                + np.log1p(-np.asarray(row["noncanonical_mass"], np.float64)).sum()
                + np.log1p(-np.asarray(row["unmapped_mass"], np.float64)).sum()
            ),
        }
        raw = {
            "bytes": float(np.sum(np.asarray(row["byte_target_logprob"], np.float64))),
            "student": float(np.sum(np.asarray(row["target_logprob"], np.float64))),
        }
        diff = max(abs(v - ref) for v in views.values())
        line = (
            f"  doc {i:2d} ({len(seq) - 1:4d} tokens): causal {ref:10.4f}; "
            + ", ".join(f"{k} {v - ref:+.1e}" for k, v in views.items())
            + f"; raw gap bytes {raw['bytes'] - ref:+.4f} student {raw['student'] - ref:+.4f}"
        )
        print(line)
        if diff >= worst[0]:
            worst = (diff, line.strip())
    print(
        f"  worst |view - causal| over {len(results)} sequences: {worst[0]:.2e} nats ({worst[1]})"
    )
    return 0 if worst[0] <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
