"""Benchmark of the subset-exact scorer (prints ratios measured in one run).

On GSM8K chats (``../shared/data``; generated English when absent) with
SmolLM2-135M-Instruct as teacher, on CPU:

(a) teacher tokens forwarded / canonical teacher tokens: the algorithm's intrinsic
    extra work (branch contexts for exact covers off the canonical path), for several
    student merge counts (tokenizer phase only, no model);
(b) teacher tokens forwarded (incl. padding) / distinct teacher contexts needed: the
    redundant work of batching (target <= 1.05);
(c) scorer wall time / plain teacher-forcing wall time (forward + log-softmax + top-k
    over the canonical encodings, same documents, same batch budget) (target <= 1.2 x (a));
(d) speed-up over the sequential per-student-token reference
    (`pipeline.scoring.reference`), per student token, on a few short documents
    (target >= 20x).

    python -m jobs.bench.scoring [--docs 32] [--ref-docs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench.scoring",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--docs", type=int, default=32, help="documents for (a)-(c)")
    p.add_argument(
        "--ref-docs", type=int, default=2, help="documents for the sequential reference in (d)"
    )
    p.add_argument("--merges", type=int, default=8000, help="student merges for (b)-(d)")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    args = p.parse_args(argv)

    import torch

    from pipeline.assets import demo_texts, smollm2_dir
    from pipeline.scoring import SubsetExactScorer
    from pipeline.scoring.reference import SequentialSubsetScorer
    from pipeline.teacher import HFTeacher
    from pipeline.tokenization import load_tokenizer, truncate_merges

    d = smollm2_dir()
    teacher = HFTeacher(d, device="cpu", max_batch_tokens=args.max_batch_tokens)
    tok = load_tokenizer(d)
    texts = demo_texts(args.docs, teacher.tokenizer)
    print(
        f"teacher SmolLM2-135M-Instruct (cpu, {torch.get_num_threads()} threads), {len(texts)} GSM8K chats"
    )

    print("\n(a) teacher tokens forwarded / canonical teacher tokens, by student merge count")
    for n in (0, 1000, 8000, 24000, 48900):
        sc = SubsetExactScorer(tok, truncate_merges(tok, n))
        t = time.perf_counter()
        prep = [sc.prepare(x) for x in texts]
        tp = time.perf_counter() - t
        nodes = sum(x.num_nodes for x in prep)
        canon = sum(len(x.teacher_ids) + 1 for x in prep)
        stud = sum(len(x.student_ids) for x in prep)
        print(
            f"  merges {n:>6}: {nodes / canon:.3f}  (student/teacher tokens {stud / (canon - len(prep)):.2f}, "
            f"tokenizer phase {1e6 * tp / stud:.0f} us/student token)"
        )

    sc = SubsetExactScorer(tok, truncate_merges(tok, args.merges))
    prep = [sc.prepare(x) for x in texts]
    ratio_a = sum(x.num_nodes for x in prep) / sum(len(x.teacher_ids) + 1 for x in prep)

    # warm-up (first forward pays one-off costs)
    sc.score(teacher, texts[:2], top_k=64)
    teacher.teacher_forcing_logprobs([list(x.teacher_ids) for x in prep[:2]], top_k=64)

    teacher.forwarded_tokens = 0
    t = time.perf_counter()
    results = sc.score_prepared(teacher, prep, top_k=64)
    t_rows = time.perf_counter() - t
    forwarded = teacher.forwarded_tokens
    t = time.perf_counter()
    prep2 = [sc.prepare(x) for x in texts]
    t_prep = time.perf_counter() - t
    t_scorer = t_rows + t_prep
    distinct = sum(x.num_nodes for x in prep)

    teacher.forwarded_tokens = 0
    t = time.perf_counter()
    teacher.teacher_forcing_logprobs([list(x.teacher_ids) for x in prep2], top_k=64)
    t_tf = time.perf_counter() - t
    tf_forwarded = teacher.forwarded_tokens
    canon = sum(len(x.teacher_ids) + 1 for x in prep)
    stud = sum(len(r.student_ids) for r in results)
    print(
        f"\nstudent = {args.merges} merges, {len(prep)} documents, {stud} student tokens, {canon} canonical teacher tokens"
    )
    print(
        f"(b) forwarded incl. padding / distinct contexts: {forwarded / distinct:.3f}  "
        f"(teacher forcing baseline: {tf_forwarded / canon:.3f})"
    )
    print(
        f"(c) scorer / teacher forcing wall time: {t_scorer / t_tf:.3f}  (1.2 x (a) = {1.2 * ratio_a:.3f}); "
        f"scorer {t_scorer:.2f}s (tokenizer phase {t_prep:.2f}s), teacher forcing {t_tf:.2f}s"
    )

    short = sorted(texts, key=len)[: args.ref_docs]
    ref = SequentialSubsetScorer(tok, truncate_merges(tok, args.merges))
    t = time.perf_counter()
    rr = ref.score(teacher, short, top_k=64)
    t_ref = time.perf_counter() - t
    ref_tokens = sum(len(r.student_ids) + 1 for r in rr)
    t = time.perf_counter()
    sc.score(teacher, short, top_k=64)
    t_fast = time.perf_counter() - t
    per_ref = t_ref / ref_tokens
    per_fast_short = t_fast / ref_tokens
    per_fast_batch = t_scorer / sum(len(r.student_ids) + 1 for r in results)
    print(
        f"(d) sequential reference: {1e3 * per_ref:.1f} ms/row on {len(short)} short documents ({ref_tokens} rows, "
        f"{ref.teacher_calls} teacher calls); scorer on the same documents {1e3 * per_fast_short:.2f} ms/row "
        f"-> {per_ref / per_fast_short:.0f}x; scorer batched over {len(prep)} documents {1e3 * per_fast_batch:.2f} ms/row "
        f"-> {per_ref / per_fast_batch:.0f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
