"""Generate cross-tokenizer teacher targets over a sharded corpus, on Ray.

    python -m jobs.generate --config jobs/configs/<name>.yaml [key=value ...] [--overwrite]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.generate --config ...

Without ``--config`` it runs the embedded default (``jobs/configs/demo.yaml``):
SmolLM2-135M-Instruct as teacher, its BPE cut to 8,000 merges as student, 200 GSM8K
chats (``../shared/data``, else generated English) in 4 input shards, output ``./out``,
on a local single-node Ray with CPU actors. It prints progress while it runs and a
summary at the end.

Outputs (``output.path``): one ``<input name>.parquet`` per input shard and its
``<input name>.manifest.json`` (written last: the only mark of "done"),
``index.json`` once every shard has committed, ``stats.json``, and the resolved
``config.yaml``. Rerunning the same config skips committed shards; a different config
in the same output path is refused unless ``--overwrite``.

Overrides are ``section.key=value`` (YAML values), e.g. ``scoring.top_k=32``,
``input.paths=[s3://bucket/corpus/*.jsonl.zst]``, ``ray.num_actors=8``;
``--help-config`` lists every key with its default.

Target kinds: ``scoring.targets=[student,bytes,teacher]`` (any non-empty subset; default
``[student]``), all from the same teacher forwards. ``student``: rows over
``student.tokenizer``'s vocab. ``bytes`` (byte-level distillation) and ``teacher`` (ALM:
the teacher's log-probs of its own tokens) serve any student tokenizer chosen when the
run is read (``TargetDataset(run, student_tokenizer=...)``); a run with only those needs
no student tokenizer (``student.merges=null``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
log = logging.getLogger("generate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", type=Path, default=None, help="job YAML (default: the embedded demo)"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run with a different config in output.path",
    )
    p.add_argument(
        "--executor", choices=["ray", "local"], default="ray", help="ray (default) or in-process"
    )
    p.add_argument(
        "--help-config",
        action="store_true",
        help="list every config key with its type, default and meaning, and exit",
    )
    p.add_argument(
        "--show",
        type=int,
        default=8,
        help="print decoded top targets at this many positions (0: none)",
    )
    # overrides may come before, between or after the flags
    return p.parse_intermixed_args(argv)


def demo_inputs(n_docs: int = 200, n_shards: int = 4) -> list[str]:
    """Write the demo corpus as jsonl shards in the cache (once) and return their paths."""
    from pipeline.assets import cache_dir, generated_texts, gsm8k_chats, gsm8k_path

    src = "gsm8k" if gsm8k_path() is not None else "generated"
    folder = cache_dir() / f"demo-input-{src}-{n_docs}x{n_shards}"
    paths = [folder / f"{src}-{k:05d}.jsonl" for k in range(n_shards)]
    if all(p.is_file() for p in paths):
        return [str(p) for p in paths]
    folder.mkdir(parents=True, exist_ok=True)
    if src == "gsm8k":
        recs = [
            {"id": f"gsm8k-train-{i}", "messages": m} for i, m in enumerate(gsm8k_chats(n_docs))
        ]
    else:
        recs = [
            {
                "id": f"pydoc-{i}",
                "messages": [
                    {"role": "user", "content": "Explain."},
                    {"role": "assistant", "content": t},
                ],
            }
            for i, t in enumerate(generated_texts(n_docs))
        ]
    per = -(-len(recs) // n_shards)
    for k, p in enumerate(paths):
        tmp = p.with_suffix(".tmp")
        tmp.write_text(
            "".join(json.dumps(r) + "\n" for r in recs[k * per : (k + 1) * per]), encoding="utf-8"
        )
        tmp.replace(p)
    return [str(p) for p in paths]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        from pipeline.config import config_reference

        print("\n".join(config_reference()))
        return 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from pipeline import redact
    from pipeline.config import ConfigError, load_config
    from pipeline.job import run

    redact.install()  # credentials given in storage_options never reach a log line
    try:
        cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
        redact.remember(cfg.model_dump(mode="json"))
        if not cfg.input.paths and args.config is None:
            cfg.input.paths = demo_inputs()
        result = run(cfg, executor=args.executor, overwrite=args.overwrite)
    except ConfigError as err:  # before any model, or once the cluster is seen
        print(f"error: {redact.redact(str(err))}", file=sys.stderr)
        return 2
    except Exception as err:
        log.error("%s: %s", type(err).__name__, err)
        print(f"error: {redact.redact(str(err))}", file=sys.stderr)
        return 1
    p, manifests, stats = result.plan, result.manifests, result.stats
    print("\n=== summary ===")
    print(
        f"output               {cfg.output.path} ({stats['shards']} shards, {stats['shards_this_run']} this run)"
    )
    print(
        f"documents            {stats['documents']} ({stats['skipped']} records skipped: {stats['skipped_by_reason']})"
    )
    if "student" in cfg.scoring.targets:
        print(f"student tokens       {stats['student_tokens']}")
    if "teacher_tokens" in stats:
        print(f"teacher tokens       {stats['teacher_tokens']} ({stats['text_bytes']} text bytes)")
    rate = stats["student_tokens_per_second"]
    print(
        f"tokens/s             {rate}"
        + (
            " (recorded by the run that committed the shards)"
            if not stats["shards_this_run"]
            else ""
        )
    )
    if "student" in cfg.scoring.targets:
        print(f"bytes/student token  {stats['bytes_per_student_token']}")
        print(f"mean top-k mass      {stats['mean_topk_mass']} (target rows)")
    if "bytes_per_teacher_token" in stats:
        print(f"bytes/teacher token  {stats['bytes_per_teacher_token']} (all kinds)")
    if stats["documents"] == 0:
        print(
            f"error: no document was scored: all {stats['skipped']} records of the "
            f"{stats['shards']} input shards were skipped ({stats['skipped_by_reason']}); "
            "see the shard logs under <output.path>/logs/",
            file=sys.stderr,
        )
        return 1
    if args.show and "student" in cfg.scoring.targets:  # decoded student rows
        show_targets(cfg, p, manifests, args.show)
    return 0


def show_targets(cfg, p, manifests, n: int) -> None:  # type: ignore[no-untyped-def]
    """Read the first shard back and print decoded top targets at a few positions."""
    import numpy as np

    from pipeline import io as xio
    from pipeline.generate import tokenizer_pair
    from pipeline.shards import read_table
    from pipeline.tokenization import TokenPrinter
    from schemas.targets import decode_topk_logprobs

    first = p.shards[0]
    m = manifests[first]
    table = read_table(xio.join(cfg.output.path, m["file"]), cfg.output.storage_options, m)
    if table.num_rows == 0:
        return
    S = TokenPrinter(tokenizer_pair(cfg)[1])
    row = table.slice(0, 1).to_pylist()[0]
    ids = row["input_ids"]
    k = cfg.scoring.top_k
    tk = np.asarray(row["topk_ids"]).reshape(-1, k)
    tl = decode_topk_logprobs(np.asarray(row["topk_logprob_dq"]).reshape(-1, k))
    mask = np.asarray(row["loss_mask"])
    rows = [i for i in range(len(ids) + 1) if mask[i]][:n]
    print(
        f"\n=== {row['doc_id']}: top targets at the first {len(rows)} target rows (loss_mask) ==="
    )
    for i in rows:
        ctx = "".join(S.token_repr(x) for x in ids[max(0, i - 6) : i])
        nxt = S.token_repr(ids[i]) if i < len(ids) else "<end>"
        tops = ", ".join(
            f"{S.token_repr(j)!r} {np.exp(lp):.2f}"
            for j, lp in zip(tk[i][:5], tl[i][:5], strict=False)
        )
        print(f"...{ctx!r:>40} | next {nxt!r:<10} | {tops}")


if __name__ == "__main__":
    sys.exit(main())
