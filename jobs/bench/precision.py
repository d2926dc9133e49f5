"""What the teacher's dtype does to the targets (prints distributions measured in one run).

SmolLM2-135M-Instruct with its 8,000-merge student, on demo documents (GSM8K chats,
else generated English), CPU. The student rows' top-k log-probs (k = 64, compared slot
by slot, both sorted) of:

(a) bfloat16 vs float32 (the same packing);
(b) bfloat16, each document scored alone vs all packed together (what a
    ``--verify-live`` re-score sees: other batch neighbours, other row widths);
(c) float32, alone vs packed (the float32 bound's premise).

It prints p50 / p90 / p99 / max of |difference| (nats) for each; the audit's
``LIVE_TOLERANCE_BY_DTYPE`` (max, p99) comes from (b) and (c).

    python -m jobs.bench.precision [--docs 8]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench.precision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--top-k", type=int, default=64)
    args = p.parse_args(argv)

    import numpy as np

    from pipeline.assets import demo_texts, smollm2_dir
    from pipeline.scoring import SubsetExactScorer
    from pipeline.teacher import HFTeacher
    from pipeline.tokenization import load_tokenizer, truncate_merges

    d = smollm2_dir()
    tok = load_tokenizer(d)
    scorer = SubsetExactScorer(tok, truncate_merges(tok, 8000))
    teachers = {
        dt: HFTeacher(d, device="cpu", dtype=dt, max_batch_tokens=4096)
        for dt in ("float32", "bfloat16")
    }
    texts = demo_texts(args.docs, teachers["float32"].tokenizer)
    k = args.top_k

    def rows(dtype: str, packed: bool) -> list[np.ndarray]:
        t = teachers[dtype]
        if packed:
            res = scorer.score(t, texts, top_k=k)
        else:
            res = [scorer.score(t, [x], top_k=k)[0] for x in texts]
        return [np.asarray(r.topk_logprobs, dtype=np.float64) for r in res]

    def report(name: str, a: list[np.ndarray], b: list[np.ndarray]) -> None:
        diffs = []
        for x, y in zip(a, b, strict=True):
            both = np.isfinite(x) & np.isfinite(y)
            diffs.append(np.abs(x - y)[both])
        v = np.concatenate(diffs)
        q = np.quantile(v, [0.5, 0.9, 0.99])
        print(
            f"{name:38s} p50 {q[0]:.2e}  p90 {q[1]:.2e}  p99 {q[2]:.2e}  max {v.max():.2e}  "
            f"mean {v.mean():.2e}  ({v.size} entries)"
        )

    f32_packed = rows("float32", True)
    bf16_packed = rows("bfloat16", True)
    print(f"{len(texts)} documents, top-{k} log-probs of the 8,000-merge student (nats):")
    report("(a) bfloat16 vs float32, packed", bf16_packed, f32_packed)
    report("(b) bfloat16 alone vs packed", rows("bfloat16", False), bf16_packed)
    report("(c) float32 alone vs packed", rows("float32", False), f32_packed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
