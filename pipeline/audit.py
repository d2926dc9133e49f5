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
  scorer could not place it), unmapped mass (teacher mass on specials the student lacks),
  non-canonical mass;
- teacher log-likelihood per token: the mean ``target_logprob`` (natural log) over
  target rows with a finite value (rows at ``-inf`` are counted apart).

Quantiles come from the histograms (error at most one bin: 0.0005 of top-k mass,
0.01 nats); means are exact.
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
    decode_topk_logprobs,
)

REGIMES = ("exact", "lossless", "approximate")  # codes 0, 1, 2
# (low, high, bins) of the mergeable histograms; values outside are clipped to the ends
HISTOGRAMS: dict[str, tuple[float, float, int]] = {
    "topk_mass": (0.0, 1.0, 2000),
    "entropy": (0.0, 12.0, 1200),  # nats; ln(4097) = 8.3 is the most k + 1 bins can hold
    "target_logprob": (-30.0, 0.0, 3000),
}
# what --verify-live tolerates beyond the storage quantisation (float noise of a re-score
# batched differently)
LIVE_TOLERANCE = 1e-4
_ROW_COLUMNS = (
    "tail_mass",
    "target_logprob",
    "regime",
    "unaccounted_mass",
    "noncanonical_mass",
    "unmapped_mass",
)
_MASS_COLUMNS = ("unaccounted_mass", "unmapped_mass", "noncanonical_mass")


class AuditError(RuntimeError):
    """Nothing can be audited as asked (no such run, shard or document; bad config)."""


class _BadRows(ValueError):
    """Rows that decode but are inconsistent (lengths, ids, codes, NaN)."""


# ---------------------------------------------------------------------------- statistics
def _hist(name: str) -> np.ndarray:
    return np.zeros(HISTOGRAMS[name][2], dtype=np.int64)


def _hist_add(h: np.ndarray, name: str, values: np.ndarray) -> None:
    lo, hi, n = HISTOGRAMS[name]
    idx = (np.asarray(values, dtype=np.float64) - lo) * (n / (hi - lo))
    np.clip(idx, 0, n - 1, out=idx)
    h += np.bincount(idx.astype(np.int64), minlength=n)


def hist_quantile(h: np.ndarray, name: str, q: float) -> float | None:
    """The ``q`` quantile of a histogram of `HISTOGRAMS` (linear within a bin)."""
    total = int(h.sum())
    if total == 0:
        return None
    lo, hi, n = HISTOGRAMS[name]
    cum = np.cumsum(h)
    target = q * total
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, n - 1)
    before = float(cum[i - 1]) if i else 0.0
    frac = (target - before) / h[i] if h[i] else 0.0
    return lo + (i + float(frac)) * (hi - lo) / n


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
        return self

    def add_rows(self, table: pa.Table, k: int, vocab_size: int | None) -> None:
        """Accumulate one decoded row group (all columns of schema v1).

        Raises `_BadRows` when the columns do not fit together."""
        ids, id_off = flat_list(table["input_ids"])
        mask, row_off = flat_list(table["loss_mask"])
        if not np.array_equal(np.diff(row_off), np.diff(id_off) + 1):
            raise _BadRows("loss_mask does not have L + 1 rows per sequence")
        cols: dict[str, np.ndarray] = {}
        for name in _ROW_COLUMNS:
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
        }

    def histograms(self, bins: int = 100) -> dict[str, dict[str, Any]]:
        """The histograms cut to their occupied range and re-binned to at most ``bins``
        equal bins: ``{name: {"low", "high", "counts"}}`` (for plots and the summary)."""
        out = {}
        for name, (lo, hi, n) in HISTOGRAMS.items():
            h = self.hists[name]
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
            out[name] = {
                "low": lo + a * width,
                "high": lo + b * width,
                "counts": [int(c) for c in counts],
            }
        return out


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
        k = int(opened.provenance.top_k or m.top_k or 0)
        vocab = opened.provenance.student_vocab_size
        st = Stats()
        try:
            for g in range(len(groups)):
                try:
                    table = pf.read_row_group(g, use_threads=use_threads)
                except Exception as err:  # page CRC, decompression, truncated pages
                    raise _BadRows(
                        f"row group {g} failed to read ({_bad_columns(pf, g)}): {err}"
                    ) from err
                try:
                    st.add_rows(table, k, int(vocab) if vocab is not None else None)
                except _BadRows as err:
                    raise _BadRows(f"row group {g}: {err}") from err
                except Exception as err:  # reshape of a wrong k, wrong types
                    raise _BadRows(f"row group {g} does not decode: {err}") from err
        except _BadRows as err:
            a.check("pages", False, str(err))
            return
        a.check("pages", True)
        a.stats = st
        wrong = []
        for key, got in (
            ("documents", st.documents),
            ("student_tokens", st.student_tokens),
            ("target_rows", st.target_rows),
        ):
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
            "histograms": self.totals.histograms(),
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
