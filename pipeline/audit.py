"""Audit target shards: what is in them, how good the targets are, and proof they are intact.

A pure library (no Ray, no plotting; `jobs.audit` is the command around it).

**Work unit.** `audit_shard` reads one shard completely and returns a `ShardAudit`:
its integrity checks and its `Stats`, a mergeable partial aggregate (counts, float64
sums, maxima and fixed-bin histograms). Shards can therefore be audited in any process
(the Ray path of `jobs.audit` maps them over tasks); `RunAudit.add` merges them in shard
order, so the run totals do not depend on where or in which order shards were read.

**Integrity checks** (per shard, each named; a failure never stops the other shards):

- ``manifest``: the manifest exists and, in a run, its checksum equals the index entry's;
- ``size`` and ``sha256``: the whole data file, hashed in one pass, vs the manifest;
- ``parquet``: `pipeline.shards.open_shard` (size, footer, schema version, sequences);
- ``pages``: every page of every column is read with its CRC32 verified, and the list
  columns are consistent (``L + 1`` rows per sequence, ``k`` entries per row, ids inside
  the student vocab, known regime codes, no NaN);
- ``counts``: documents, student tokens, target rows and the mean top-k mass recomputed
  from the rows vs the manifest;
- ``metadata``: the provenance stored in the file equals the manifest's.

**Consistency** (run level): the provenance stored in each shard's file (teacher and
revision, tokenizer hashes and vocab sizes, k, temperature, scorer, schema version,
config hash, ...) must equal the reference: the run index's provenance, else (shards
audited without an index) the most common one. Every differing key is listed per shard.
Mixing configs is an integrity problem for training, so a difference fails the audit.

**Quality statistics** count only target rows (``loss_mask`` True; all rows are counted
separately):

- top-k mass ``1 - tail_mass - unaccounted_mass`` (mean, p5, p50) and the tail mass;
- entropy in nats of the row's distribution *as stored*: the ``k`` top-k probabilities
  (from the quantised log-probs) plus the tail as ONE bin,
  ``H = -sum_j p_j ln p_j - t ln t``; a lower bound of the full distribution's entropy
  (the tail's spread over the rest of the vocab is not stored);
- share of rows by regime (0 exact, 1 lossless, 2 approximate), unaccounted mass (the
  scorer could not place it), estimated mass (placed by an estimate: approximate
  general-scorer rows, schema 3; 0 in older shards), unmapped mass (teacher mass on
  specials the student lacks), non-canonical mass;
- teacher log-likelihood per token: the mean ``target_logprob`` (natural log) over
  target rows with a finite value (rows at ``-inf`` are counted apart).

Quantiles come from the histograms (error at most one bin: 0.0005 of top-k mass,
0.01 nats); means are exact.

**Target kinds** (schema version 2, provenance ``targets``; a run without them, e.g. of
schema version 1, is audited exactly as above and its summary has none of the keys
below). A run without ``student`` has no student columns: its statistics have only
``documents`` and ``sequences`` of the student keys. Per kind:

- checks ``teacher`` and ``bytes`` (each fails the audit, naming the first sequence of
  each kind of problem): lengths (``teacher_logprob`` and ``teacher_loss_mask``
  ``m + 1`` for ``m`` teacher ids, ``teacher_byte_end`` ``m``; every byte column ``R``
  rows, ``byte_top_k`` entries per row), ``teacher_byte_end`` strictly increasing and
  ending at ``len(text)``, ``byte_row_start`` nondecreasing from 0 to ``len(text)``,
  ids inside the teacher vocab / byte symbols, each byte row's stored probabilities plus
  its tail summing to 1 within `ROW_SUM_TOLERANCE`, log-probs <= 0, masses in [0, 1],
  no NaN;
- check ``kinds`` (runs with two kinds or more): the telescoping identity of
  `pipeline.scoring.kinds` per sequence between every pair of kinds present: ``sum
  (target log-probs) + sum(log1p(-noncanonical)) + sum(log1p(-unmapped))`` of the student
  rows and of the byte rows, and ``sum(teacher_logprob)``, are each the teacher's
  log-likelihood of the sequence, so every pair must agree within `identity_tolerance`.
  Student rows count only in sequences whose rows are all exact (the subset scorer; the
  general scorer's rows are another quantity, counted as not applicable). The worst
  |difference| per pair is reported (``kinds.consistency``);
- statistics under ``kinds`` (with ``targets``, ``text_bytes``, ``teacher_tokens``):
  ``teacher`` (tokens, target rows, mean log-prob per token, log-likelihood
  per text byte over target tokens as ``nats_per_byte`` and ``bits_per_byte``: minus the
  target tokens' log-probs, end of text included, over their bytes) and ``bytes`` (rows,
  kept mass ``1 - tail``, entropy of the stored top-k plus the tail as one bin, target
  log-prob per row and per byte, non-canonical and unmapped mass), over target rows
  (``teacher_loss_mask``, ``byte_loss_mask``);
- stored bytes per kind (``bytes_by_kind``, from the Parquet footer: each column
  attributed to its kind by `column_kind`, ``text`` counted once apart): per student
  token, per text byte, per teacher token.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from pipeline import io as xio
from pipeline.shards import (
    DATA_SUFFIX,
    INDEX_NAME,
    MANIFEST_SUFFIX,
    ShardError,
    ShardRef,
    check_schema_version,
    column_bytes,
    flat_list,
    folder_of,
    open_shard,
    read_run_index,
    run_shards,
    shard_ref,
)
from schemas.run import Manifest, Provenance, skipped_by_kind
from schemas.targets import (
    CURRENT_VERSION,
    KINDS,
    LOGPROB_STEP,
    TEACHER_LOGPROB_STEP,
    decode_teacher_logprobs,
    decode_topk_logprobs,
    targets_schema,
)

REGIMES = ("exact", "lossless", "approximate")  # codes 0, 1, 2
# (low, high, bins) of the mergeable histograms; values outside are clipped to the ends
HISTOGRAMS: dict[str, tuple[float, float, int]] = {
    "topk_mass": (0.0, 1.0, 2000),
    "entropy": (0.0, 12.0, 1200),  # nats; ln(4097) = 8.3 is the most k + 1 bins can hold
    "target_logprob": (-30.0, 0.0, 3000),
}
# the same for the statistics of the other target kinds
KIND_HISTOGRAMS: dict[str, tuple[float, float, int]] = {
    "byte_kept_mass": (0.0, 1.0, 2000),
    "byte_entropy": (0.0, 12.0, 1200),
    "teacher_logprob": (-30.0, 0.0, 3000),
}
_HIST_SPECS = {**HISTOGRAMS, **KIND_HISTOGRAMS}
# what --verify-live tolerates beyond the storage quantisation, by the teacher dtype the
# run resolved, as (max |diff|, 99th percentile of |diff|) over the compared top-k
# log-probs. Measured with `jobs/bench/precision.py` (SmolLM2, 6 demo chats, top-64 rows
# of the 8,000-merge student, CPU, 76,480 entries; the same documents scored alone vs
# packed, which is what a re-score changes): float32 p99 1.3e-5, max 1.06e-4; bfloat16
# p99 0.142, max 0.749 (and bfloat16 vs float32: p99 0.35, max 0.75, mean 0.071).
LIVE_TOLERANCE = 2e-4  # float32: twice the measured max
LIVE_TOLERANCE_BY_DTYPE: dict[str, tuple[float, float]] = {
    "float64": (LIVE_TOLERANCE, LIVE_TOLERANCE),
    "float32": (LIVE_TOLERANCE, LIVE_TOLERANCE),
    "bfloat16": (1.0, 0.25),  # 1.3x the measured max, 1.8x the measured p99
    "float16": (1.0, 0.25),  # not measured: bfloat16's (float16 keeps 3 more bits)
}


def live_tolerance(dtype: str | None) -> tuple[float, float]:
    """(max, p99) tolerance of --verify-live beyond the storage quantisation for a run
    whose teacher ran in ``dtype`` (unknown: float32's)."""
    return LIVE_TOLERANCE_BY_DTYPE.get(str(dtype or "float32"), LIVE_TOLERANCE_BY_DTYPE["float32"])


# float32 unit roundoff: a stored float32 value is within 2**-24 * |value| of the float64
# value the job computed
FLOAT32_UNIT = 2.0**-24
# A stored row's probabilities: each top-k log-prob is quantised to within LOGPROB_STEP / 2
# nats, so each p_j is within a factor exp(+-STEP / 2) of the computed one and their sum
# within expm1(STEP / 2) * (1 - tail) <= 9.0e-4 of it; the tail is float32 (2**-24
# relative) and the computed row sums to 1 within 1e-9 (float64). A row further than this
# from 1 is not what the job computed.
ROW_SUM_TOLERANCE = float(np.expm1(LOGPROB_STEP / 2)) + 1e-6
# a float64 log-prob of a probability 1 may round a hair above 0
LOGPROB_MAX = 1e-6
# the lowest teacher log-prob `schemas.targets.encode_teacher_logprobs` stores (-inf and
# anything below are stored as this)
TEACHER_FLOOR = -1.0e5
# Absolute part of the telescoping tolerance (`identity_tolerance`): the job computes each
# kind's sum in float64 from the same teacher forward, every context renormalised in
# float64, so the kinds agree before storage within ~1e-12 relative (the scorer tests);
# 1e-4 nats covers that with a wide margin and is far below any real damage.
IDENTITY_ATOL = 1e-4
_ROW_COLUMNS = (
    "tail_mass",
    "target_logprob",
    "regime",
    "unaccounted_mass",
    "noncanonical_mass",
    "unmapped_mass",
)
# estimated_mass: schema 3 (approximate general-scorer rows); read as 0 from older shards
_MASS_COLUMNS = ("unaccounted_mass", "unmapped_mass", "noncanonical_mass", "estimated_mass")


class AuditError(RuntimeError):
    """Nothing can be audited as asked (no such run, shard or document; bad config)."""


class _BadRows(ValueError):
    """Rows that decode but are inconsistent (lengths, ids, codes, NaN)."""


# ---------------------------------------------------------------------------- statistics
def _hist(name: str) -> np.ndarray:
    return np.zeros(_HIST_SPECS[name][2], dtype=np.int64)


def _hist_add(h: np.ndarray, name: str, values: np.ndarray) -> None:
    lo, hi, n = _HIST_SPECS[name]
    idx = (np.asarray(values, dtype=np.float64) - lo) * (n / (hi - lo))
    np.clip(idx, 0, n - 1, out=idx)
    h += np.bincount(idx.astype(np.int64), minlength=n)


def hist_quantile(h: np.ndarray, name: str, q: float) -> float | None:
    """The ``q`` quantile of a histogram of `HISTOGRAMS` or `KIND_HISTOGRAMS` (linear
    within a bin)."""
    total = int(h.sum())
    if total == 0:
        return None
    lo, hi, n = _HIST_SPECS[name]
    cum = np.cumsum(h)
    target = q * total
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, n - 1)
    before = float(cum[i - 1]) if i else 0.0
    frac = (target - before) / h[i] if h[i] else 0.0
    return lo + (i + float(frac)) * (hi - lo) / n


# ---------------------------------------------------------------------------- target kinds
class _KindProblem(ValueError):
    """A row group's columns of one kind do not fit together (its statistics are skipped)."""


def identity_tolerance(bound_a: np.ndarray | float, bound_b: np.ndarray | float) -> Any:
    """The largest |difference| in nats the telescoping identity allows between two kinds'
    totals of a sequence, each total stored within ``bound_a`` / ``bound_b`` nats of the
    float64 value the job computed (`_identity_terms`, `_teacher_terms`):
    ``IDENTITY_ATOL + bound_a + bound_b``.

    What storage allows, per kind (the quantised top-k log-probs are no part of the
    identity):

    - student and byte rows: float32 ``target_logprob`` / ``byte_target_logprob`` and
      masses, not quantised; a stored log-prob ``v`` is within ``2**-24 |v|`` of the
      float64 value, and a stored mass ``x`` moves ``log1p(-x)`` by at most ``2**-24 x /
      (1 - x)``: the bound is their sum over the sequence's rows (worst case: every
      rounding in one direction; the typical error is ~sqrt(rows) times smaller);
    - teacher tokens: ``teacher_logprob_q`` stores the rounded running sum of the
      log-probs (error feedback), so the sequence's total is within half a step
      (``TEACHER_LOGPROB_STEP / 2`` = 0.00012 nats) whatever its length.

    `IDENTITY_ATOL` covers the float64 arithmetic before storage. A changed log-prob
    moves its sequence's total by the change itself, so damage above ~1e-3 nats is caught
    (more on sequences of thousands of tokens, whose float32 bound is ~1e-3 nats)."""
    return IDENTITY_ATOL + np.asarray(bound_a) + np.asarray(bound_b)


def _segments(values: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Per-sequence sums (float64) of a flat array cut at offsets ``off``."""
    cs = np.zeros(len(values) + 1, dtype=np.float64)
    np.cumsum(values, dtype=np.float64, out=cs[1:])
    return cs[off[1:]] - cs[off[:-1]]


def _identity_terms(
    logprob: np.ndarray, masses: Sequence[np.ndarray], off: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence: ``sum(logprob) + sum(log1p(-mass))`` over float32 columns (-inf when
    a term is -inf) and how far float32 storage may have moved it (`identity_tolerance`)."""
    lp = logprob.astype(np.float64)
    terms = [lp]
    sens = [np.abs(np.where(np.isfinite(lp), lp, 0.0))]
    for x in masses:
        x = np.clip(x.astype(np.float64), 0.0, 1.0)
        with np.errstate(divide="ignore"):
            terms.append(np.log1p(-x))
            sens.append(np.where(x < 1.0, x / np.where(x < 1.0, 1.0 - x, 1.0), 0.0))
    total = np.zeros(len(off) - 1)
    neginf = np.zeros(len(off) - 1)
    for t in terms:
        fin = np.isfinite(t)
        total += _segments(np.where(fin, t, 0.0), off)
        neginf += _segments((~fin).astype(np.float64), off)
    total[neginf > 0] = -np.inf
    magnitude = np.zeros(len(off) - 1)
    for s in sens:
        magnitude += _segments(s, off)
    return total, FLOAT32_UNIT * magnitude


def _first(bad: np.ndarray, off: np.ndarray) -> int | None:
    """The sequence (index into ``off``'s segments) of the first True of ``bad``, a flat
    per-value mask, or None."""
    hit = np.flatnonzero(bad)
    if not len(hit):
        return None
    return int(np.searchsorted(off, hit[0], side="right") - 1)


def _first_seq(bad: np.ndarray) -> int | None:
    hit = np.flatnonzero(bad)
    return int(hit[0]) if len(hit) else None


def _entropy(dq: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stored probabilities [rows, k], entropy of the stored top-k plus the tail as one
    bin, nats) of rows of quantised log-probs."""
    lp = decode_topk_logprobs(dq)
    np.maximum(lp, np.float32(-1e4), out=lp)  # missing (-inf) -> p = 0, p ln p = 0
    p = np.exp(lp.astype(np.float64))
    ent = -np.einsum("ij,ij->i", p, lp.astype(np.float64))
    t = tail.astype(np.float64)
    pos = t > 0
    ent[pos] -= t[pos] * np.log(t[pos])
    return p, ent


def _mass_summary(total: float, mx: float, above: int, n: int) -> dict[str, Any]:
    return {"mean": total / n if n else None, "max": mx, "rows_above_zero": above}


def _per_byte(logprob_sum: float, nbytes: int) -> dict[str, float | None]:
    nats = -logprob_sum / nbytes if nbytes else None
    return {"nats_per_byte": nats, "bits_per_byte": None if nats is None else nats / np.log(2)}


@dataclass
class TeacherStats:
    """Mergeable aggregate of the ``teacher`` kind (target rows: ``teacher_loss_mask``)."""

    sequences: int = 0
    tokens: int = 0  # teacher tokens (m per sequence)
    rows: int = 0  # log-probs (m + 1 per sequence: the last is end of text)
    target_rows: int = 0
    target_bytes: int = 0  # text bytes of the target tokens (end of text: none)
    logprob_sum: float = 0.0  # over finite target log-probs
    logprob_neginf: int = 0
    neginf_bytes: int = 0  # bytes of the target tokens at -inf (left out of per byte)
    hist: np.ndarray = field(default_factory=lambda: _hist("teacher_logprob"))

    def merge(self, o: TeacherStats) -> None:
        for name in (
            "sequences",
            "tokens",
            "rows",
            "target_rows",
            "target_bytes",
            "logprob_sum",
            "logprob_neginf",
            "neginf_bytes",
        ):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        self.hist = self.hist + o.hist

    def summary(self) -> dict[str, Any]:
        fin = self.target_rows - self.logprob_neginf
        mean = self.logprob_sum / fin if fin else None
        return {
            "sequences": self.sequences,
            "tokens": self.tokens,
            "rows": self.rows,
            "target_rows": self.target_rows,
            "target_bytes": self.target_bytes,
            "logprob": {
                "mean": mean,
                "perplexity": float(np.exp(-mean)) if mean is not None else None,
                "p50": hist_quantile(self.hist, "teacher_logprob", 0.5),
                "neginf_rows": self.logprob_neginf,
            },
            **_per_byte(self.logprob_sum, self.target_bytes - self.neginf_bytes),
        }


_BYTE_MASSES = ("byte_noncanonical_mass", "byte_unmapped_mass")


@dataclass
class ByteStats:
    """Mergeable aggregate of the ``bytes`` kind (target rows: ``byte_loss_mask``)."""

    sequences: int = 0
    rows: int = 0
    target_rows: int = 0
    target_bytes: int = 0  # text bytes of the symbols target rows predict
    kept_sum: float = 0.0  # 1 - tail
    entropy_sum: float = 0.0
    target_logprob_sum: float = 0.0  # over finite values
    target_logprob_neginf: int = 0
    neginf_bytes: int = 0
    mass_sum: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_BYTE_MASSES, 0.0))
    mass_max: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_BYTE_MASSES, 0.0))
    mass_rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_BYTE_MASSES, 0))
    hists: dict[str, np.ndarray] = field(
        default_factory=lambda: {n: _hist(n) for n in ("byte_kept_mass", "byte_entropy")}
    )

    def merge(self, o: ByteStats) -> None:
        for name in (
            "sequences",
            "rows",
            "target_rows",
            "target_bytes",
            "kept_sum",
            "entropy_sum",
            "target_logprob_sum",
            "target_logprob_neginf",
            "neginf_bytes",
        ):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        for c in _BYTE_MASSES:
            self.mass_sum[c] += o.mass_sum[c]
            self.mass_max[c] = max(self.mass_max[c], o.mass_max[c])
            self.mass_rows[c] += o.mass_rows[c]
        for n in self.hists:
            self.hists[n] = self.hists[n] + o.hists[n]

    def summary(self) -> dict[str, Any]:
        n = self.target_rows
        fin = n - self.target_logprob_neginf
        kept = self.kept_sum / n if n else None

        def q(name: str, p: float) -> float | None:
            return hist_quantile(self.hists[name], name, p)

        return {
            "sequences": self.sequences,
            "rows": self.rows,
            "target_rows": n,
            "target_bytes": self.target_bytes,
            "kept_mass": {
                "mean": kept,
                "p5": q("byte_kept_mass", 0.05),
                "p50": q("byte_kept_mass", 0.5),
            },
            "tail_mass": {
                "mean": None if kept is None else 1.0 - kept,
                "p95": _flip(q("byte_kept_mass", 0.05)),
            },
            "entropy_nats": {
                "mean": self.entropy_sum / n if n else None,
                "p50": q("byte_entropy", 0.5),
                "p95": q("byte_entropy", 0.95),
                "definition": "stored top-k probabilities plus the tail as one bin",
            },
            "target_logprob": {
                "mean": self.target_logprob_sum / fin if fin else None,
                "neginf_rows": self.target_logprob_neginf,
            },
            **_per_byte(self.target_logprob_sum, self.target_bytes - self.neginf_bytes),
            **{
                c.removeprefix("byte_"): _mass_summary(
                    self.mass_sum[c], self.mass_max[c], self.mass_rows[c], n
                )
                for c in _BYTE_MASSES
            },
        }


@dataclass
class PairStats:
    """The telescoping identity between two kinds over the sequences both apply to."""

    sequences: int = 0
    failed: int = 0
    max_abs_diff: float = 0.0  # nats
    worst: dict[str, Any] = field(default_factory=dict)  # the sequence of max_abs_diff

    def merge(self, o: PairStats) -> None:
        self.sequences += o.sequences
        self.failed += o.failed
        if o.sequences and (not self.worst or o.max_abs_diff > self.max_abs_diff):
            self.max_abs_diff, self.worst = o.max_abs_diff, dict(o.worst)

    def summary(self) -> dict[str, Any]:
        return {
            "sequences": self.sequences,
            "failed": self.failed,
            "max_abs_diff_nats": self.max_abs_diff if self.sequences else None,
            "worst": self.worst or None,
        }


def _pairs(kinds: Sequence[str]) -> list[tuple[str, str]]:
    ks = [k for k in KINDS if k in kinds]
    return [(a, b) for i, a in enumerate(ks) for b in ks[i + 1 :]]


def column_kind(name: str) -> str:
    """The target kind a shard column belongs to (`schemas.targets`), ``"text"`` for the
    text (shared by ``bytes`` and ``teacher``), ``"common"`` for ``doc_id`` and ``chunk``."""
    return _COLUMN_KIND.get(name, "common" if name in ("doc_id", "chunk") else "student")


_COLUMN_KIND = {
    f.name: kind
    for kind in KINDS
    for f in targets_schema(CURRENT_VERSION, kinds=(kind,))
    if f.name not in ("doc_id", "chunk", "text")
}
_COLUMN_KIND["text"] = "text"


def bytes_by_kind(columns: dict[str, list[int]], st: Stats | None) -> dict[str, Any]:
    """Stored bytes per kind (compressed / uncompressed, from the footer) and per unit:
    ``per_student_token`` (student), ``per_text_byte`` (text, bytes, teacher),
    ``per_teacher_token`` (bytes, teacher)."""
    acc: dict[str, list[int]] = {}
    for c, v in columns.items():
        a = acc.setdefault(column_kind(c), [0, 0])
        a[0] += v[0]
        a[1] += v[1]
    units = {
        "student": (("per_student_token", st.student_tokens if st else 0),),
        "text": (("per_text_byte", st.text_bytes if st else 0),),
        "teacher": (
            ("per_teacher_token", st.teacher_tokens if st else 0),
            ("per_text_byte", st.text_bytes if st else 0),
        ),
        "bytes": (
            ("per_text_byte", st.text_bytes if st else 0),
            ("per_teacher_token", st.teacher_tokens if st else 0),
        ),
        "common": (),
    }
    out: dict[str, Any] = {}
    for kind in ("student", "bytes", "teacher", "text", "common"):
        if kind not in acc:
            continue
        comp, raw = acc[kind]
        out[kind] = {
            "compressed": comp,
            "uncompressed": raw,
            **{key: (comp / n if n else None) for key, n in units[kind]},
        }
    return out


def _describe_identity(fails: list[tuple[str, str, float, float]]) -> str:
    """What disagrees in one sequence: ``[(kind a, kind b, a - b, tolerance)]``."""
    pairs = [{a, b} for a, b, _, _ in fails]
    common = set.intersection(*pairs)
    if len(fails) > 1 and len(common) == 1:
        odd = common.pop()
        others = [k for k in KINDS if k != odd and any(k in p for p in pairs)]
        head = f"{odd} disagrees with {' and '.join(others)}"
    else:
        head = "; ".join(f"{a} and {b} disagree" for a, b, _, _ in fails)
    return (
        head
        + " (telescoping identity): "
        + ", ".join(f"{a} - {b} = {d:+.6g} nats (tolerance {t:.2g})" for a, b, d, t in fails)
    )


@dataclass
class Stats:
    """Mergeable partial aggregate of target rows (see the module docstring)."""

    sequences: int = 0
    documents: int = 0  # sequences with chunk 0: each document has exactly one
    student_tokens: int = 0
    rows: int = 0  # all target rows (L + 1 per sequence)
    target_rows: int = 0  # rows with loss_mask True; everything below counts only these
    topk_mass_sum: float = 0.0
    entropy_sum: float = 0.0
    target_logprob_sum: float = 0.0  # over finite values
    target_logprob_neginf: int = 0
    regime: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.int64))
    mass_sum: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_MASS_COLUMNS, 0.0))
    mass_max: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_MASS_COLUMNS, 0.0))
    mass_rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_MASS_COLUMNS, 0))
    hists: dict[str, np.ndarray] = field(
        default_factory=lambda: {name: _hist(name) for name in HISTOGRAMS}
    )
    # target kinds (schema version 2; see the module docstring)
    kinds: list[str] = field(default_factory=list)  # of the shards merged in
    text_bytes: int = 0  # UTF-8 bytes of the texts (kinds bytes, teacher)
    teacher_tokens: int = 0  # from teacher_ids, else (bytes only) the manifests
    teacher_stats: TeacherStats | None = None
    byte_stats: ByteStats | None = None
    identity: dict[str, PairStats] = field(default_factory=dict)  # "a-b" -> PairStats
    identity_not_applicable: dict[str, int] = field(default_factory=dict)  # sequences

    def merge(self, other: Stats) -> Stats:
        """Add ``other`` into this aggregate (in place) and return it."""
        for name in (
            "sequences",
            "documents",
            "student_tokens",
            "rows",
            "target_rows",
            "topk_mass_sum",
            "entropy_sum",
            "target_logprob_sum",
            "target_logprob_neginf",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.regime = self.regime + other.regime
        for c in _MASS_COLUMNS:
            self.mass_sum[c] += other.mass_sum[c]
            self.mass_max[c] = max(self.mass_max[c], other.mass_max[c])
            self.mass_rows[c] += other.mass_rows[c]
        for name in HISTOGRAMS:
            self.hists[name] = self.hists[name] + other.hists[name]
        self.kinds = [k for k in KINDS if k in self.kinds or k in other.kinds]
        self.text_bytes += other.text_bytes
        self.teacher_tokens += other.teacher_tokens
        if other.teacher_stats is not None:
            self.teacher_stats = self.teacher_stats or TeacherStats()
            self.teacher_stats.merge(other.teacher_stats)
        if other.byte_stats is not None:
            self.byte_stats = self.byte_stats or ByteStats()
            self.byte_stats.merge(other.byte_stats)
        for pair, ps in other.identity.items():
            self.identity.setdefault(pair, PairStats()).merge(ps)
        for kind, n in other.identity_not_applicable.items():
            self.identity_not_applicable[kind] = self.identity_not_applicable.get(kind, 0) + n
        return self

    @property
    def has_kinds(self) -> bool:
        """Whether kinds other than ``student`` were merged in."""
        return bool(set(self.kinds) - {"student"})

    def add_rows(self, table: pa.Table, k: int, vocab_size: int | None) -> None:
        """Accumulate one decoded row group (all columns of schema v1).

        Raises `_BadRows` when the columns do not fit together."""
        ids, id_off = flat_list(table["input_ids"])
        mask, row_off = flat_list(table["loss_mask"])
        if not np.array_equal(np.diff(row_off), np.diff(id_off) + 1):
            raise _BadRows("loss_mask does not have L + 1 rows per sequence")
        cols: dict[str, np.ndarray] = {}
        for name in (*_ROW_COLUMNS, "estimated_mass"):
            if name == "estimated_mass" and name not in table.column_names:
                cols[name] = np.zeros(len(mask), np.float32)  # schemas 1 and 2
                continue
            values, off = flat_list(table[name])
            if not np.array_equal(off, row_off):
                raise _BadRows(f"{name} does not have one value per target row")
            cols[name] = values
        dq, off = flat_list(table["topk_logprob_dq"])
        topk_ids, off_ids = flat_list(table["topk_ids"])
        if not (np.array_equal(off, row_off * k) and np.array_equal(off_ids, row_off * k)):
            raise _BadRows(f"top-k columns do not have k={k} entries per target row")
        if vocab_size is not None and (
            (len(ids) and int(ids.max()) >= vocab_size)
            or (len(topk_ids) and int(topk_ids.max()) >= vocab_size)
        ):
            raise _BadRows(f"student ids outside the student vocab ({vocab_size})")
        m = mask.astype(bool, copy=False)
        regime = cols["regime"]
        if len(regime) and int(regime.max()) >= len(REGIMES):
            raise _BadRows(f"unknown regime code {int(regime.max())}")
        chunk = table["chunk"].to_numpy()
        self.sequences += len(id_off) - 1
        self.documents += int((chunk == 0).sum())
        self.student_tokens += len(ids)
        self.rows += len(m)
        nt = int(m.sum())
        self.target_rows += nt
        if nt == 0:
            return
        tail = cols["tail_mass"][m].astype(np.float64)
        if np.isnan(tail).any():
            raise _BadRows("NaN tail mass")
        # mass of the stored top-k entries (general-scorer rows also leave unaccounted mass)
        topk = 1.0 - tail - cols["unaccounted_mass"][m].astype(np.float64)
        self.topk_mass_sum += float(topk.sum())
        _hist_add(self.hists["topk_mass"], "topk_mass", topk)
        # entropy over the k stored probabilities plus the tail as one bin (nats)
        lp = decode_topk_logprobs(dq.reshape(-1, k)[m])
        np.maximum(lp, np.float32(-1e4), out=lp)  # missing (-inf) -> p = 0, p ln p = 0
        p = np.exp(lp)
        ent = -np.einsum("ij,ij->i", p, lp).astype(np.float64)
        pos = tail > 0
        ent[pos] -= tail[pos] * np.log(tail[pos])
        self.entropy_sum += float(ent.sum())
        _hist_add(self.hists["entropy"], "entropy", ent)
        tlp = cols["target_logprob"][m]
        if np.isnan(tlp).any():
            raise _BadRows("NaN target log-prob")
        fin = np.isfinite(tlp)
        self.target_logprob_sum += float(tlp[fin].sum(dtype=np.float64))
        self.target_logprob_neginf += int(nt - fin.sum())
        _hist_add(self.hists["target_logprob"], "target_logprob", tlp[fin])
        self.regime += np.bincount(regime[m], minlength=len(REGIMES))[: len(REGIMES)]
        for c in _MASS_COLUMNS:
            v = cols[c][m]
            if np.isnan(v).any():
                raise _BadRows(f"NaN {c}")
            self.mass_sum[c] += float(v.sum(dtype=np.float64))
            self.mass_max[c] = max(self.mass_max[c], float(v.max()))
            self.mass_rows[c] += int((v > 0).sum())

    def summary(self) -> dict[str, Any]:
        """Counts and the derived quality numbers (plain JSON types)."""
        n = self.target_rows
        fin = n - self.target_logprob_neginf

        def mean(x: float, d: int) -> float | None:
            return x / d if d else None

        def q(name: str, p: float) -> float | None:
            return hist_quantile(self.hists[name], name, p)

        if self.kinds and "student" not in self.kinds:
            return {"documents": self.documents, "sequences": self.sequences, **self._kinds()}
        mtk = mean(self.topk_mass_sum, n)
        mlp = mean(self.target_logprob_sum, fin)
        return {
            "documents": self.documents,
            "sequences": self.sequences,
            "student_tokens": self.student_tokens,
            "rows": self.rows,
            "target_rows": n,
            "topk_mass": {"mean": mtk, "p5": q("topk_mass", 0.05), "p50": q("topk_mass", 0.5)},
            "tail_mass": {
                "mean": None if mtk is None else 1.0 - mtk,
                "p95": _flip(q("topk_mass", 0.05)),
            },
            "entropy_nats": {
                "mean": mean(self.entropy_sum, n),
                "p50": q("entropy", 0.5),
                "p95": q("entropy", 0.95),
                "definition": "stored top-k probabilities plus the tail as one bin",
            },
            "regime_share": {
                name: (int(c) / n if n else None)
                for name, c in zip(REGIMES, self.regime, strict=True)
            },
            "regime_rows": {name: int(c) for name, c in zip(REGIMES, self.regime, strict=True)},
            **{
                c: {
                    "mean": mean(self.mass_sum[c], n),
                    "max": self.mass_max[c],
                    "rows_above_zero": self.mass_rows[c],
                }
                for c in _MASS_COLUMNS
            },
            "target_logprob": {
                "mean": mlp,
                "perplexity": float(np.exp(-mlp)) if mlp is not None else None,
                "p50": q("target_logprob", 0.5),
                "neginf_rows": self.target_logprob_neginf,
            },
            **self._kinds(),
        }

    def _kinds(self) -> dict[str, Any]:
        """The summary key ``kinds`` of the target kinds (none for a student-only run)."""
        if not self.has_kinds:
            return {}
        out: dict[str, Any] = {
            "targets": list(self.kinds),
            "text_bytes": self.text_bytes,
            "teacher_tokens": self.teacher_tokens,
        }
        if self.teacher_stats is not None:
            out["teacher"] = self.teacher_stats.summary()
        if self.byte_stats is not None:
            out["bytes"] = self.byte_stats.summary()
        pairs = _pairs(self.kinds)
        if pairs:
            stats = {f"{a}-{b}": self.identity.get(f"{a}-{b}", PairStats()) for a, b in pairs}
            out["consistency"] = {
                "ok": all(ps.failed == 0 for ps in stats.values()),
                "tolerance": f"{IDENTITY_ATOL} nats + what storage allows each kind "
                "(float32: 2**-24 of each stored term; teacher: half a quantisation step)",
                "pairs": {p: ps.summary() for p, ps in stats.items()},
                "not_applicable": dict(self.identity_not_applicable),
            }
        return {"kinds": out}

    def kind_histograms(self, bins: int = 100) -> dict[str, dict[str, Any]]:
        """`histograms` of the kinds' statistics present (`KIND_HISTOGRAMS`)."""
        hists: dict[str, np.ndarray] = {}
        if self.byte_stats is not None:
            hists.update(self.byte_stats.hists)
        if self.teacher_stats is not None:
            hists["teacher_logprob"] = self.teacher_stats.hist
        return {name: _rebin(h, name, bins) for name, h in hists.items()}

    def histograms(self, bins: int = 100) -> dict[str, dict[str, Any]]:
        """The histograms cut to their occupied range and re-binned to at most ``bins``
        equal bins: ``{name: {"low", "high", "counts"}}`` (for plots and the summary)."""
        return {name: _rebin(self.hists[name], name, bins) for name in HISTOGRAMS}

    # the kinds (methods of `Stats`, so a shard's pass fills one mergeable object)
    def add_sequences(self, table: pa.Table) -> None:
        """Count the sequences and documents of a row group without student columns."""
        chunk = table["chunk"].to_numpy()
        self.sequences += len(chunk)
        self.documents += int((chunk == 0).sum())

    def add_kinds(self, table: pa.Table, prov: Provenance, first: int) -> list[tuple[str, str]]:
        """Check and accumulate the ``teacher`` and ``bytes`` kinds of one row group (its
        sequences are numbered from ``first`` in the shard; student rows already added by
        `add_rows`) and check the telescoping identity between the kinds of each
        sequence. Returns the problems as ``(check name, message)``; a kind with a problem
        in the row group is left out of its statistics and of the identity there."""
        kinds = prov.kinds
        doc = table["doc_id"].to_pylist()
        chunk = table["chunk"].to_numpy()

        def name(i: int) -> str:
            return f"sequence {first + i} (doc {doc[i]!r} chunk {int(chunk[i])})"

        text_len = pc.binary_length(table["text"]).to_numpy().astype(np.int64)
        self.text_bytes += int(text_len.sum())
        problems: list[tuple[str, str]] = []
        totals: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if "student" in kinds:
            tlp, off = flat_list(table["target_logprob"])
            regime, _ = flat_list(table["regime"])
            masses = [flat_list(table[c])[0] for c in ("noncanonical_mass", "unmapped_mass")]
            exact = _segments((regime != 0).astype(np.float64), off) == 0
            total, mag = _identity_terms(tlp, masses, off)
            totals["student"] = (total, mag, exact)
            if not exact.all():
                na = self.identity_not_applicable
                na["student"] = na.get("student", 0) + int((~exact).sum())
        for kind, add in (("teacher", self._add_teacher), ("bytes", self._add_bytes)):
            if kind in kinds:
                try:
                    totals[kind] = add(table, prov, text_len, name)
                except _KindProblem as err:
                    problems.append((kind, str(err)))
        fails: dict[int, list[tuple[str, str, float, float]]] = {}
        for a, b in _pairs(kinds):
            if a not in totals or b not in totals:
                continue
            (ta, ma, aa), (tb, mb, ab) = totals[a], totals[b]
            sel = aa & ab
            with np.errstate(invalid="ignore"):
                diff = ta - tb
            diff[np.isneginf(ta) & np.isneginf(tb)] = 0.0
            d = np.abs(diff)
            d[np.isnan(d)] = np.inf
            tol = identity_tolerance(ma, mb)
            bad = sel & ~(d <= tol)
            ps = PairStats(sequences=int(sel.sum()), failed=int(bad.sum()))
            if sel.any():
                i = int(np.flatnonzero(sel)[np.argmax(d[sel])])
                ps.max_abs_diff = float(d[i])
                ps.worst = {
                    "sequence": first + i,
                    "doc_id": doc[i],
                    "chunk": int(chunk[i]),
                    "diff_nats": float(diff[i]),
                    "tolerance_nats": float(tol[i]),
                }
            self.identity.setdefault(f"{a}-{b}", PairStats()).merge(ps)
            for j in np.flatnonzero(bad).tolist():
                fails.setdefault(j, []).append((a, b, float(diff[j]), float(tol[j])))
        for i, f in sorted(fails.items()):
            problems.append(("kinds", f"{name(i)}: {_describe_identity(f)}"))
        return problems

    def _add_teacher(
        self, table: pa.Table, prov: Provenance, text_len: np.ndarray, name: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Check and accumulate the ``teacher`` kind of a row group; returns its identity
        totals, their storage bound (`identity_tolerance`) and where they apply. Raises
        `_KindProblem`."""
        ids, id_off = flat_list(table["teacher_ids"])
        q, q_off = flat_list(table["teacher_logprob_q"])
        blen, len_off = flat_list(table["teacher_byte_len"])
        mask, mask_off = flat_list(table["teacher_loss_mask"])
        m = np.diff(id_off)
        n = len(m)
        for col, off, want, what in (
            ("teacher_logprob_q", q_off, m + 1, "m + 1"),
            ("teacher_byte_len", len_off, m, "m"),
            ("teacher_loss_mask", mask_off, m + 1, "m + 1"),
        ):
            i = _first_seq(np.diff(off) != want)
            if i is not None:
                raise _KindProblem(
                    f"{name(i)}: {col} has {int(off[i + 1] - off[i])} values for "
                    f"m = {int(m[i])} teacher tokens (want {what})"
                )
        errs = []
        vocab = prov.teacher_vocab_size
        if vocab is not None and (i := _first(ids >= vocab, id_off)) is not None:
            errs.append(f"{name(i)}: teacher id outside the teacher vocab ({vocab})")
        q = q.astype(np.int64)
        # the steps of a running sum of log-probs <= 0 are >= 0: a negative one stored as
        # uint32 wraps above 2**31 (a log-prob above 0, or a damaged value)
        if (i := _first(q >= 1 << 31, q_off)) is not None:
            errs.append(f"{name(i)}: teacher_logprob_q holds a negative step (a log-prob above 0)")
        blen = blen.astype(np.int64)
        if (i := _first(blen < 1, len_off)) is not None:
            errs.append(f"{name(i)}: a teacher token of no bytes (byte ends not increasing)")
        ends = _segments(blen, len_off).astype(np.int64)
        if (i := _first_seq(ends != text_len)) is not None:
            errs.append(
                f"{name(i)}: teacher tokens end at byte {int(ends[i])}, the text has "
                f"{int(text_len[i])} bytes"
            )
        if errs:
            raise _KindProblem("; ".join(errs))
        lp = decode_teacher_logprobs(q)
        mk = mask.astype(bool, copy=False)
        row_bytes = np.zeros(len(lp), dtype=np.int64)  # end of text: no bytes
        row_bytes[np.arange(len(blen)) + np.repeat(np.arange(n), m)] = blen
        ts = self.teacher_stats = self.teacher_stats or TeacherStats()
        ts.sequences += n
        ts.tokens += len(ids)
        ts.rows += len(lp)
        t, tb = lp[mk], row_bytes[mk]
        fin = t > TEACHER_FLOOR + 1.0  # the floor stands for -inf
        ts.target_rows += int(mk.sum())
        ts.target_bytes += int(tb.sum())
        ts.logprob_sum += float(t[fin].sum())
        ts.logprob_neginf += int((~fin).sum())
        ts.neginf_bytes += int(tb[~fin].sum())
        _hist_add(ts.hist, "teacher_logprob", t[fin])
        self.teacher_tokens += len(ids)
        # the total is the last rounded running sum: exact in int64, within half a step;
        # a log-prob stored at the floor was -inf (or as good as): so is the total
        total = -TEACHER_LOGPROB_STEP * _segments(q, q_off)
        total[_segments((lp <= TEACHER_FLOOR + 1.0).astype(np.float64), q_off) > 0] = -np.inf
        return total, np.full(n, TEACHER_LOGPROB_STEP / 2), np.ones(n, dtype=bool)

    def _add_bytes(
        self, table: pa.Table, prov: Provenance, text_len: np.ndarray, name: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Check and accumulate the ``bytes`` kind of a row group (as `_add_teacher`)."""
        kb = prov.byte_top_k
        if not kb:
            raise _KindProblem("a shard with byte rows but no byte_top_k in its provenance")
        rs, off = flat_list(table["byte_row_start"])
        R = np.diff(off)
        n = len(R)
        if (i := _first_seq(R < 1)) is not None:
            raise _KindProblem(f"{name(i)}: no byte row (the last predicts end of text)")
        cols: dict[str, np.ndarray] = {}
        for col, per_row in (
            ("byte_loss_mask", 1),
            ("byte_tail_mass", 1),
            ("byte_target_logprob", 1),
            ("byte_noncanonical_mass", 1),
            ("byte_unmapped_mass", 1),
            ("byte_topk_ids", kb),
            ("byte_topk_logprob_dq", kb),
        ):
            values, o = flat_list(table[col])
            i = _first_seq(np.diff(o) != R * per_row)
            if i is not None:
                raise _KindProblem(
                    f"{name(i)}: {col} has {int(o[i + 1] - o[i])} values for {int(R[i])} "
                    f"byte rows (want {'R' if per_row == 1 else f'R * byte_top_k = R * {kb}'})"
                )
            cols[col] = values
        errs = []
        rs = rs.astype(np.int64)
        prev = np.zeros_like(rs)
        prev[1:] = rs[:-1]
        prev[off[:-1]] = 0
        if (i := _first_seq(rs[off[:-1]] != 0)) is not None:
            errs.append(f"{name(i)}: byte_row_start does not start at 0")
        if (i := _first(rs < prev, off)) is not None:
            errs.append(f"{name(i)}: byte_row_start decreases")
        last = rs[off[1:] - 1]
        if (i := _first_seq(last != text_len)) is not None:
            errs.append(
                f"{name(i)}: byte_row_start ends at {int(last[i])}, the text has "
                f"{int(text_len[i])} bytes"
            )
        ids = cols["byte_topk_ids"].reshape(-1, kb)
        if prov.byte_specials is not None:
            symbols = 257 + len(prov.byte_specials)
            if (i := _first(np.any(ids >= symbols, axis=1), off)) is not None:
                errs.append(f"{name(i)}: byte symbol outside 0..{symbols - 1}")
        tail = cols["byte_tail_mass"].astype(np.float64)
        p, ent = _entropy(cols["byte_topk_logprob_dq"].reshape(-1, kb), tail)
        with np.errstate(invalid="ignore"):
            total = p.sum(1) + tail
            off_one = ~(np.abs(total - 1.0) <= ROW_SUM_TOLERANCE)
            if (i := _first(off_one, off)) is not None:
                r = int(np.flatnonzero(off_one)[0])
                errs.append(
                    f"{name(i)}: byte row {r - int(off[i])} has probabilities + tail = "
                    f"{total[r]:.6f} (1 within {ROW_SUM_TOLERANCE:.2g})"
                )
            if (i := _first(~((tail >= 0) & (tail <= 1)), off)) is not None:
                errs.append(f"{name(i)}: byte_tail_mass outside [0, 1]")
            tlp = cols["byte_target_logprob"].astype(np.float64)
            if (i := _first(~(tlp <= LOGPROB_MAX), off)) is not None:
                errs.append(f"{name(i)}: byte_target_logprob above 0 or NaN")
            for c in _BYTE_MASSES:
                x = cols[c]
                if (i := _first(~((x >= 0) & (x <= 1)), off)) is not None:
                    errs.append(f"{name(i)}: {c} outside [0, 1]")
        if errs:
            raise _KindProblem("; ".join(errs))
        mk = cols["byte_loss_mask"].astype(bool, copy=False)
        row_bytes = np.zeros(len(rs), dtype=np.int64)
        row_bytes[:-1] = rs[1:] - rs[:-1]
        row_bytes[off[1:] - 1] = 0  # the end-of-text row of each sequence
        bs = self.byte_stats = self.byte_stats or ByteStats()
        bs.sequences += n
        bs.rows += len(rs)
        nt = int(mk.sum())
        bs.target_rows += nt
        kept = 1.0 - tail[mk]
        bs.kept_sum += float(kept.sum())
        _hist_add(bs.hists["byte_kept_mass"], "byte_kept_mass", kept)
        bs.entropy_sum += float(ent[mk].sum())
        _hist_add(bs.hists["byte_entropy"], "byte_entropy", ent[mk])
        t, tb = tlp[mk], row_bytes[mk]
        fin = np.isfinite(t)
        bs.target_bytes += int(tb.sum())
        bs.target_logprob_sum += float(t[fin].sum())
        bs.target_logprob_neginf += int((~fin).sum())
        bs.neginf_bytes += int(tb[~fin].sum())
        if nt:
            for c in _BYTE_MASSES:
                v = cols[c][mk]
                bs.mass_sum[c] += float(v.sum(dtype=np.float64))
                bs.mass_max[c] = max(bs.mass_max[c], float(v.max()))
                bs.mass_rows[c] += int((v > 0).sum())
        total_id, mag = _identity_terms(
            cols["byte_target_logprob"], [cols[c] for c in _BYTE_MASSES], off
        )
        return total_id, mag, np.ones(n, dtype=bool)


def _rebin(h: np.ndarray, name: str, bins: int) -> dict[str, Any]:
    """A histogram cut to its occupied range, re-binned to at most ``bins`` equal bins."""
    lo, hi, n = _HIST_SPECS[name]
    nz = np.flatnonzero(h)
    a, b = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, n)
    factor = max(1, -(-(b - a) // bins))
    nb = -(-(b - a) // factor)
    b = a + nb * factor
    if b > n:  # keep whole bins inside the range
        a = max(0, n - nb * factor)
        b = a + nb * factor
    part = np.zeros(b - a, dtype=np.int64)
    valid = h[a : min(b, n)]
    part[: len(valid)] = valid
    counts = part.reshape(-1, factor).sum(1)
    width = (hi - lo) / n
    return {"low": lo + a * width, "high": lo + b * width, "counts": [int(c) for c in counts]}


def _flip(x: float | None) -> float | None:
    return None if x is None else 1.0 - x


# ---------------------------------------------------------------------------- shards
@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class ShardAudit:
    name: str
    url: str
    checks: list[Check] = field(default_factory=list)
    stats: Stats | None = None  # None unless every row group was read
    provenance: dict[str, Any] = field(default_factory=dict)  # as stored in the file
    bytes: int | None = None
    columns: dict[str, list[int]] = field(default_factory=dict)  # [compressed, raw] bytes
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.stats is not None and all(c.ok for c in self.checks)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    @property
    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]


@contextlib.contextmanager
def _fetched(
    url: str, storage_options: dict[str, Any] | None
) -> Iterator[tuple[int, str, str | None]]:
    """``(bytes, sha256, local copy)`` of a whole file, read once in 8 MiB blocks. A
    file on another filesystem (an object store) is copied to a temporary local file
    (under ``TMPDIR``) as it is hashed, and the Parquet checks read the copy: one
    download per shard instead of three (hash, pages, footer). Local files are read in
    place (copy None)."""
    fs, path = xio.filesystem(url, storage_options)
    h = hashlib.sha256()
    n = 0
    with contextlib.ExitStack() as stack:
        copy = None
        if not isinstance(fs, LocalFileSystem):
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="xtok-audit-"))
            copy = os.path.join(tmp, "shard.parquet")
        with (
            fs.open(path, "rb") as f,
            open(copy, "wb") if copy else contextlib.nullcontext() as out,
        ):
            while block := f.read(8 << 20):
                h.update(block)
                n += len(block)
                if out is not None:
                    out.write(block)
        yield n, h.hexdigest(), copy


def _bad_columns(pf: Any, g: int) -> str:
    """Which columns of a row group fail to read (probed one by one after a failure)."""
    bad = []
    for name in pf.schema_arrow.names:
        try:
            pf.read_row_group(g, columns=[name], use_threads=False)
        except Exception:
            bad.append(name)
    return "column " + ", ".join(bad) if bad else "columns read alone"


def provenance_of(manifest: dict[str, Any] | Manifest) -> dict[str, Any]:
    """The provenance keys of a manifest (what the run index keeps)."""
    return Manifest.parse(manifest).provenance().to_dict()


def audit_shard(
    ref: ShardRef, storage_options: dict[str, Any] | None = None, use_threads: bool = True
) -> ShardAudit:
    """Check one shard's integrity and compute its `Stats` (see the module docstring).
    Never raises for a bad shard: failures are `Check`s with ``ok=False``."""
    t0 = time.perf_counter()
    a = ShardAudit(ref.name, ref.url)
    m = ref.manifest
    if m is None:
        a.check("manifest", False, ref.problem or "manifest missing (the shard never committed)")
        a.seconds = time.perf_counter() - t0
        return a
    a.check("manifest", ref.problem is None, ref.problem or "")
    a.provenance = provenance_of(m)
    a.skipped = skipped_by_kind([m])
    with contextlib.ExitStack() as stack:
        try:
            size, digest, copy = stack.enter_context(_fetched(ref.url, storage_options))
        except FileNotFoundError:
            a.check("size", False, f"data file {ref.url} is missing")
            a.seconds = time.perf_counter() - t0
            return a
        except Exception as err:
            a.check("size", False, f"cannot read {ref.url}: {err}")
            a.seconds = time.perf_counter() - t0
            return a
        _check_contents(a, ref, storage_options, size, digest, copy, use_threads)
    a.seconds = time.perf_counter() - t0
    return a


def _check_contents(
    a: ShardAudit,
    ref: ShardRef,
    storage_options: dict[str, Any] | None,
    size: int,
    digest: str,
    copy: str | None,
    use_threads: bool,
) -> None:
    """`audit_shard`'s checks of a fetched data file (``copy``: its local copy)."""
    m = ref.manifest
    assert m is not None
    a.bytes = size
    a.check(
        "size",
        size == m.bytes,
        ""
        if size == m.bytes
        else f"{size} bytes, the manifest says {m.bytes} (truncated or rewritten)",
    )
    a.check(
        "sha256",
        digest == m.sha256,
        ""
        if digest == m.sha256
        else f"file sha256 {digest[:16]}..., the manifest says {str(m.sha256)[:16]}...",
    )
    try:
        opened = open_shard(ref, storage_options, copy)
    except ShardError as err:
        a.check("parquet", False, str(err))
        return
    pf, groups = opened.file, opened.row_groups
    try:
        a.check("parquet", True)
        meta = opened.provenance.to_dict()
        a.provenance = meta
        stored = m.to_dict()
        differ = sorted(k for k in meta if stored.get(k) != meta[k])
        a.check(
            "metadata",
            not differ,
            "" if not differ else "file metadata and manifest differ in " + ", ".join(differ),
        )
        prov = opened.provenance
        k = int(prov.top_k or m.top_k or 0)
        vocab = prov.student_vocab_size
        kinds = prov.kinds
        st = Stats(kinds=list(kinds))
        extra = bool(set(kinds) - {"student"})
        # the columns a shard of these kinds has (checked for runs with kinds only: a
        # student-only shard is read as before)
        want_cols = (
            targets_schema(int(prov.schema_version or CURRENT_VERSION), kinds=tuple(kinds)).names
            if extra
            else None
        )
        problems: list[tuple[str, str]] = []
        try:
            for g in range(len(groups)):
                try:
                    table = pf.read_row_group(g, use_threads=use_threads)
                except Exception as err:  # page CRC, decompression, truncated pages
                    raise _BadRows(
                        f"row group {g} failed to read ({_bad_columns(pf, g)}): {err}"
                    ) from err
                if want_cols is not None and table.column_names != want_cols:
                    raise _BadRows(
                        f"row group {g}: columns {table.column_names} are not those of "
                        f"the kinds {kinds} ({want_cols})"
                    )
                first = st.sequences
                try:
                    if "student" in kinds:
                        st.add_rows(table, k, int(vocab) if vocab is not None else None)
                    else:
                        st.add_sequences(table)
                except _BadRows as err:
                    raise _BadRows(f"row group {g}: {err}") from err
                except Exception as err:  # reshape of a wrong k, wrong types
                    raise _BadRows(f"row group {g} does not decode: {err}") from err
                if extra:
                    try:
                        problems += st.add_kinds(table, prov, first)
                    except Exception as err:  # wrong types
                        problems.append(("kinds", f"row group {g} does not decode: {err}"))
        except _BadRows as err:
            a.check("pages", False, str(err))
            return
        a.check("pages", True)
        if extra:
            checks = [c for c in ("teacher", "bytes") if c in kinds]
            for check in checks + (["kinds"] if len(kinds) > 1 else []):
                found = [msg for c, msg in problems if c == check]
                more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
                a.check(check, not found, "; ".join(found[:3]) + more)
            if "teacher" not in kinds:  # bytes only: the tokens are counted by the job
                st.teacher_tokens = int(m.teacher_tokens or 0)
            for ps in st.identity.values():
                if ps.worst:
                    ps.worst = {"shard": ref.name, **ps.worst}
        a.stats = st
        wrong = []
        counts: list[tuple[str, int]] = [("documents", st.documents)]
        if "student" in kinds:
            counts += [("student_tokens", st.student_tokens), ("target_rows", st.target_rows)]
        if extra:
            counts.append(("text_bytes", st.text_bytes))
        # (a kind whose check failed has row groups left out of its statistics: its
        # count is not compared, the failure is already named)
        failed = {c.name for c in a.checks if not c.ok}
        if "teacher" in kinds and "teacher" not in failed:
            counts.append(("teacher_tokens", st.teacher_tokens))
        if "bytes" in kinds and "bytes" not in failed:
            counts.append(("byte_rows", st.byte_stats.rows if st.byte_stats else 0))
        for key, got in counts:
            want = m.get(key)
            if want is not None and int(want) != got:
                wrong.append(f"{key} {got} in the file, {want} in the manifest")
        if m.mean_topk_mass is not None and st.target_rows:
            mean = st.topk_mass_sum / st.target_rows
            if abs(mean - m.mean_topk_mass) > 1e-5:
                wrong.append(
                    f"mean top-k mass {mean:.6f} in the file, {m.mean_topk_mass:.6f} in the manifest"
                )
        a.check("counts", not wrong, "; ".join(wrong))
    finally:
        opened.close()
    with contextlib.suppress(Exception):  # footer only; its failure is already a check above
        a.columns = column_bytes(copy, None) if copy else column_bytes(ref.url, storage_options)


# ---------------------------------------------------------------------------- locating
@dataclass
class Source:
    """What an audit covers: a run (by its index) or loose shards."""

    url: str
    index_url: str | None
    base: str  # the folder holding the shards (and config.yaml)
    index_provenance: Provenance | None
    shards: list[ShardRef]
    problems: list[str] = field(default_factory=list)  # run level, each fails the audit


def locate(
    url: str, storage_options: dict[str, Any] | None = None, shards: str | None = None
) -> Source:
    """Find what to audit at ``url``: a run directory (its ``index.json``), an index URL,
    one ``.parquet`` shard or a glob of them (each with the manifest beside it), or a run
    directory without an index (an unfinished run: its committed shards, and a problem).
    ``shards`` keeps only shards whose name or file name matches that glob."""
    url = url.rstrip("/")
    index_url: str | None = None
    problems: list[str] = []
    prov: Provenance | None = None
    refs: list[ShardRef] = []
    if url.endswith(DATA_SUFFIX) or any(ch in url.rsplit("/", 1)[-1] for ch in "*?["):
        try:
            files = [f for f in xio.expand([url], storage_options) if f.endswith(DATA_SUFFIX)]
        except xio.StorageError as err:
            raise AuditError(str(err)) from err
        if not files:
            raise AuditError(f"{url!r} matches no {DATA_SUFFIX} shard")
        refs = [shard_ref(f, storage_options) for f in files]
        base = folder_of(files[0])
    else:
        if url.endswith(".json"):
            index_url = url
        elif xio.exists(xio.join(url, INDEX_NAME), storage_options):
            index_url = xio.join(url, INDEX_NAME)
        base = url if index_url is None else folder_of(index_url)
        if index_url is not None:
            try:  # an unknown version is a problem of the run: its shards are still audited
                index = read_run_index(index_url, storage_options, check_version=False)
            except ShardError as err:
                raise AuditError(str(err)) from err
            try:
                check_schema_version(index.schema_version, index_url)
            except ShardError as err:
                problems.append(str(err))
            prov = index.provenance
            refs = run_shards(index, base, storage_options)
        else:
            try:
                found = xio.expand([xio.join(url, "*" + MANIFEST_SUFFIX)], storage_options)
            except xio.StorageError as err:
                raise AuditError(
                    f"{url}: no index.json and no committed shard ({err}); is this a run?"
                ) from err
            problems.append(
                f"{url} has no index.json: the run has not finished (or its index was "
                f"removed); auditing the {len(found)} committed shards"
            )
            refs = [
                shard_ref(f[: -len(MANIFEST_SUFFIX)] + DATA_SUFFIX, storage_options) for f in found
            ]
    if shards:
        refs = [
            r
            for r in refs
            if fnmatch.fnmatchcase(r.name, shards)
            or fnmatch.fnmatchcase(r.url.rsplit("/", 1)[-1], shards)
        ]
        if not refs:
            raise AuditError(f"no shard of {url} matches --shards {shards!r}")
    if not refs:
        raise AuditError(f"{url}: the run lists no shard")
    return Source(url, index_url, base, prov, refs, problems)


# ---------------------------------------------------------------------------- the run
def compare_provenance(
    provenances: dict[str, dict[str, Any]], reference: dict[str, Any]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per shard, the keys whose value differs from ``reference`` (missing keys too):
    ``{shard: {key: {"expected": x, "found": y}}}``; shards that agree are left out."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, prov in provenances.items():
        diff = {
            k: {"expected": reference.get(k), "found": prov.get(k)}
            for k in sorted(set(prov) | set(reference))
            if prov.get(k) != reference.get(k)
        }
        if diff:
            out[name] = diff
    return out


def _majority(provenances: Sequence[dict[str, Any]]) -> dict[str, Any]:
    counts = Counter(json.dumps(p, sort_keys=True) for p in provenances)
    best = max(counts.values())
    for p in provenances:  # ties: the first shard's
        if counts[json.dumps(p, sort_keys=True)] == best:
            return p
    return {}


class RunAudit:
    """Merges `ShardAudit`s (in shard order) into the run's summary; keeps per-shard
    summaries, not per-shard histograms, so memory stays small for many shards."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.shards: list[dict[str, Any]] = []
        self.totals = Stats()
        self.bytes = 0
        self.columns: dict[str, list[int]] = {}
        self.skipped: dict[str, int] = {}
        self.covered: list[str] = []
        self._provenance: dict[str, dict[str, Any]] = {}
        self.verify_live: dict[str, Any] | None = None

    def add(self, a: ShardAudit) -> dict[str, Any]:
        """Merge one shard; returns its summary."""
        s = a.stats
        tokens = s.student_tokens if s is not None else None
        comp = sum(c[0] for c in a.columns.values())
        raw = sum(c[1] for c in a.columns.values())
        entry: dict[str, Any] = {
            "name": a.name,
            "file": a.url,
            "ok": a.ok,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in a.checks],
            "failures": a.failures,
            "bytes": a.bytes,
            "bytes_per_token": (a.bytes / tokens) if tokens and a.bytes else None,
            "compression_ratio": raw / comp if comp else None,
            "columns": {
                c: {"compressed": v[0], "uncompressed": v[1]} for c, v in sorted(a.columns.items())
            },
            "skipped": sum(a.skipped.values()),
            "skipped_by_reason": dict(sorted(a.skipped.items())),
            "seconds": round(a.seconds, 4),
            "stats": s.summary() if s is not None else None,
        }
        if s is not None and s.has_kinds:
            entry["bytes_by_kind"] = bytes_by_kind(a.columns, s)
        self.shards.append(entry)
        if a.provenance:
            self._provenance[a.name] = a.provenance
        if s is not None:  # fully read: part of the run totals
            self.covered.append(a.name)
            self.totals.merge(s)
            self.bytes += a.bytes or 0
            for c, v in a.columns.items():
                acc = self.columns.setdefault(c, [0, 0])
                acc[0] += v[0]
                acc[1] += v[1]
            for reason, n in a.skipped.items():
                self.skipped[reason] = self.skipped.get(reason, 0) + n
        return entry

    @property
    def _index_provenance(self) -> dict[str, Any]:
        prov = self.source.index_provenance
        return {} if prov is None else prov.to_dict()

    @property
    def reference(self) -> dict[str, Any]:
        return self._index_provenance or _majority(list(self._provenance.values()))

    def consistency(self) -> dict[str, Any]:
        diff = compare_provenance(self._provenance, self.reference)
        return {
            "ok": not diff,
            "reference": "run index" if self._index_provenance else "most common provenance",
            "provenance": self.reference,
            "differences": diff,
        }

    def summary(self) -> dict[str, Any]:
        """The machine-readable audit (``summary.json``)."""
        cons = self.consistency()
        failures = [f"{s['name']}: {f}" for s in self.shards for f in s["failures"]]
        failures += [
            f"{name}: provenance differs in " + ", ".join(keys)
            for name, keys in cons["differences"].items()
        ]
        failures += list(self.source.problems)
        if self.verify_live is not None and not self.verify_live["ok"]:
            failures.append("verify-live: " + self.verify_live["verdict"])
        st = self.totals
        comp = sum(v[0] for v in self.columns.values())
        raw = sum(v[1] for v in self.columns.values())
        tokens = st.student_tokens
        run = {
            **st.summary(),
            "shards": len(self.covered),
            "bytes": self.bytes,
            "bytes_per_token": self.bytes / tokens if tokens else None,
            "compression_ratio": raw / comp if comp else None,
            "columns": {
                c: {
                    "compressed": v[0],
                    "uncompressed": v[1],
                    "bytes_per_token": v[0] / tokens if tokens else None,
                }
                for c, v in sorted(self.columns.items())
            },
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
        }
        histograms = self.totals.histograms()
        if st.has_kinds:
            run["bytes_by_kind"] = bytes_by_kind(self.columns, st)
            histograms.update(st.kind_histograms())
        return {
            "ok": not failures,
            "source": self.source.url,
            "index": self.source.index_url,
            "schema_version": CURRENT_VERSION,
            "failures": failures,
            "problems": list(self.source.problems),
            "shards_audited": len(self.shards),
            "shards_failed": [s["name"] for s in self.shards if not s["ok"]],
            "totals_cover": list(self.covered),
            "run": run,
            "histograms": histograms,
            "shards": self.shards,
            "consistency": cons,
            "verify_live": self.verify_live,
        }


def default_report_dir(source: Source) -> str:
    """``./audit-<run folder name>`` (a local folder; runs may live on object stores)."""
    name = source.base.rstrip("/").rsplit("/", 1)[-1] or "run"
    return os.path.join(".", f"audit-{name}")


_LIVE = ("inspect_document", "load_run_config", "student_tokenizer", "verify_live")


def __getattr__(name: str) -> Any:
    """The live checks moved to `pipeline.audit_live`; old imports keep working."""
    if name in _LIVE:
        from pipeline import audit_live

        return getattr(audit_live, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
