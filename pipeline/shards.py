"""The target-shard format, in one module: writing a shard (Parquet, zstd, page
checksums) and its manifest, and everything a reader needs to read one back.

Writing: `build_table` -> `encode_parquet` -> `commit_shard` (data file, then the
manifest, the only mark of "done"); the run index is written after every shard has
committed (`pipeline.executors.finalize`).

Reading (the reader, the audit, the benchmarks and tools use these, nothing private):

- the run index: `index_url_of` (a run directory or index URL -> the index URL),
  `read_run_index` (-> `schemas.run.RunIndex`), `run_shards` (each listed shard's data
  URL and manifest, with what is wrong with it), `folder_of`;
- a shard's manifest: `read_manifest` (-> `schemas.run.Manifest`), `shard_ref` (a loose
  shard with the manifest beside it);
- a shard's data file: `open_shard` (size vs the manifest, footer, schema version,
  sequences vs the manifest -> an `OpenShard`), `read_provenance` (the provenance in
  the Parquet metadata -> `schemas.run.Provenance`, schema version checked),
  `check_schema_version` (the one version gate), `read_table` (a whole shard);
- a row group: `decode_row_group` (the `DECODE_COLUMNS` -> `DecodedRows`, numpy arrays
  with per-sequence offsets), `flat_list` (one list column -> values and offsets),
  `column_bytes` (per-column sizes from the footer).

Every failure is a `ShardError` naming the shard and what failed.

This module imports neither torch nor Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io as xio
from pipeline.scoring.common import ScoredDocument
from schemas.run import Manifest, Provenance, RunIndex
from schemas.targets import (
    BSS_LEAVES,
    CURRENT_VERSION,
    DELTA_LEAVES,
    METADATA_KEY,
    decode_teacher_logprobs,
    decode_topk_logprobs,
    encode_teacher_logprobs,
    encode_topk_logprobs,
    targets_schema,
)

if TYPE_CHECKING:
    from pipeline.scoring.kinds import ByteRows, TeacherTokens

MANIFEST_SUFFIX = ".manifest.json"
DATA_SUFFIX = ".parquet"
INDEX_NAME = "index.json"
# the columns `decode_row_group` reads (what a trainer needs)
DECODE_COLUMNS = (
    "input_ids",
    "loss_mask",
    "topk_ids",
    "topk_logprob_dq",
    "tail_mass",
    "target_logprob",
)


class ShardError(RuntimeError):
    """A shard is missing, truncated, altered, or of an unknown schema version."""


class ShardFormatError(ShardError, ValueError):
    """What a shard or run index stores cannot be read by this code: an unknown schema
    version, or provenance metadata that is not valid."""


class SchemaVersionError(ShardFormatError):
    """A shard or run index of a schema version this code does not know (or none)."""


@dataclass
class Sequence_:
    """One stored sequence: its student rows (``scored``, ``loss_mask``) and, in runs
    with those kinds, its text, teacher tokens and byte rows with their masks."""

    doc_id: str
    chunk: int
    scored: ScoredDocument | None  # the student rows (None without the student kind)
    loss_mask: np.ndarray | None  # [L+1] bool
    text: str = ""
    teacher: TeacherTokens | None = None
    teacher_loss_mask: np.ndarray | None = None  # [m+1] bool
    bytes: ByteRows | None = None
    byte_loss_mask: np.ndarray | None = None  # [R] bool


def output_name(input_url: str) -> str:
    """Output shard name from an input shard name: ``a/b/train-0001.jsonl.zst`` ->
    ``train-0001`` (a rerun overwrites, never duplicates)."""
    base = input_url.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".zstd", ".zst", ".gz", ".jsonl", ".json", ".parquet", ".arrow"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base or "shard"


def _list(values: np.ndarray, lengths: Sequence[int], typ: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=typ)).cast(
        pa.list_(typ)
    )


def _pad_topk(arr: np.ndarray, k: int, fill: float) -> np.ndarray:
    """[rows, k'] -> [rows, k]: a vocabulary smaller than k pads with ``fill``."""
    if arr.shape[1] >= k:
        return arr
    pad = np.full((arr.shape[0], k - arr.shape[1]), fill, arr.dtype)
    return np.concatenate([arr, pad], axis=1)


def build_table(
    seqs: Sequence[Sequence_],
    top_k: int,
    student_vocab_size: int,
    version: int = CURRENT_VERSION,
    *,
    kinds: Sequence[str] = ("student",),
    byte_top_k: int = 8,
    teacher_vocab_size: int = 1 << 32,
) -> pa.Table:
    """One row per sequence, columns as in `schemas.targets` for the target ``kinds``
    (top-k rows padded to k with id 0 and log-prob -inf when the vocab is smaller than
    k)."""
    schema = targets_schema(version, student_vocab_size, tuple(kinds), teacher_vocab_size)

    def cat(get: Any, dtype: Any) -> np.ndarray:
        parts = [np.asarray(get(s), dtype=dtype).reshape(-1) for s in seqs]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    def lst(name: str, get: Any, lengths: Sequence[int]) -> pa.Array:
        typ = schema.field(name).type.value_type
        return _list(cat(get, typ.to_pandas_dtype()), lengths, typ)

    cols: dict[str, pa.Array] = {
        "doc_id": pa.array([s.doc_id for s in seqs], pa.string()),
        "chunk": pa.array([s.chunk for s in seqs], pa.int32()),
    }
    if "student" in kinds:
        sc = [s.scored for s in seqs]
        if any(x is None for x in sc):
            raise ValueError("a sequence without student rows in a run with the student kind")
        L1 = [len(x.student_ids) + 1 for x in sc]  # type: ignore[union-attr]
        kL1 = [n * top_k for n in L1]
        cols["input_ids"] = lst("input_ids", lambda s: s.scored.student_ids, [n - 1 for n in L1])
        cols["loss_mask"] = lst("loss_mask", lambda s: s.loss_mask, L1)
        cols["topk_ids"] = lst("topk_ids", lambda s: _pad_topk(s.scored.topk_ids, top_k, 0), kL1)
        cols["topk_logprob_dq"] = lst(
            "topk_logprob_dq",
            lambda s: encode_topk_logprobs(_pad_topk(s.scored.topk_logprobs, top_k, -np.inf)),
            kL1,
        )
        for name in ("tail_mass", "target_logprob", "unaccounted_mass", "noncanonical_mass"):
            attr = "target_logprobs" if name == "target_logprob" else name
            cols[name] = lst(name, lambda s, a=attr: getattr(s.scored, a), L1)
        cols["unmapped_mass"] = lst("unmapped_mass", lambda s: s.scored.unmapped_mass, L1)
        cols["regime"] = lst("regime", lambda s: s.scored.regime, L1)
        if "estimated_mass" in schema.names:
            cols["estimated_mass"] = lst(
                "estimated_mass",
                lambda s: (
                    s.scored.estimated_mass
                    if s.scored.estimated_mass is not None
                    else np.zeros(len(s.scored.student_ids) + 1)
                ),
                L1,
            )
    if "bytes" in kinds or "teacher" in kinds:
        cols["text"] = pa.array([s.text.encode("utf-8") for s in seqs], pa.binary())
    if "teacher" in kinds:
        if any(s.teacher is None for s in seqs):
            raise ValueError("a sequence without teacher tokens in a run with the teacher kind")
        m = [len(s.teacher.ids) for s in seqs]  # type: ignore[union-attr]
        m1 = [n + 1 for n in m]
        cols["teacher_ids"] = lst("teacher_ids", lambda s: s.teacher.ids, m)
        cols["teacher_logprob_q"] = lst(
            "teacher_logprob_q", lambda s: encode_teacher_logprobs(s.teacher.logprob), m1
        )
        cols["teacher_byte_len"] = lst(
            "teacher_byte_len", lambda s: np.diff(s.teacher.byte_end, prepend=0), m
        )
        cols["teacher_loss_mask"] = lst("teacher_loss_mask", lambda s: s.teacher_loss_mask, m1)
    if "bytes" in kinds:
        if any(s.bytes is None for s in seqs):
            raise ValueError("a sequence without byte rows in a run with the bytes kind")
        R = [len(s.bytes.row_start) for s in seqs]  # type: ignore[union-attr]
        kR = [n * byte_top_k for n in R]
        cols["byte_row_start"] = lst("byte_row_start", lambda s: s.bytes.row_start, R)
        cols["byte_loss_mask"] = lst("byte_loss_mask", lambda s: s.byte_loss_mask, R)
        cols["byte_topk_ids"] = lst(
            "byte_topk_ids", lambda s: _pad_topk(s.bytes.scored.topk_ids, byte_top_k, 0), kR
        )
        cols["byte_topk_logprob_dq"] = lst(
            "byte_topk_logprob_dq",
            lambda s: encode_topk_logprobs(
                _pad_topk(s.bytes.scored.topk_logprobs, byte_top_k, -np.inf)
            ),
            kR,
        )
        for name, attr in (
            ("byte_tail_mass", "tail_mass"),
            ("byte_target_logprob", "target_logprobs"),
            ("byte_noncanonical_mass", "noncanonical_mass"),
            ("byte_unmapped_mass", "unmapped_mass"),
        ):
            cols[name] = lst(name, lambda s, a=attr: getattr(s.bytes.scored, a), R)
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def encode_parquet(
    table: pa.Table, metadata: dict[str, Any], zstd_level: int = 3, row_group_rows: int = 512
) -> bytes:
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(metadata, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    names = set(table.column_names)
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        compression_level=zstd_level,
        row_group_size=row_group_rows,
        use_dictionary=["doc_id"],
        write_statistics=["doc_id", "chunk"],
        use_byte_stream_split=[c for c in BSS_LEAVES if c.split(".")[0] in names],
        column_encoding={
            c: "DELTA_BINARY_PACKED" for c in DELTA_LEAVES if c.split(".")[0] in names
        },
        write_page_checksum=True,  # readers of a few row groups verify what they read
    )
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def commit_shard(
    out_dir: str,
    name: str,
    data: bytes,
    manifest: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Publish the data file, then the manifest (the only truth of "done")."""
    xio.write_bytes_atomic(xio.join(out_dir, name + DATA_SUFFIX), data, storage_options)
    manifest = {**manifest, "file": name + DATA_SUFFIX, "bytes": len(data), "sha256": sha256(data)}
    xio.write_json_atomic(xio.join(out_dir, name + MANIFEST_SUFFIX), manifest, storage_options)
    return manifest


def read_table(
    url: str,
    storage_options: dict[str, Any] | None = None,
    manifest: Mapping[str, Any] | Manifest | None = None,
) -> pa.Table:
    """Read a whole shard back; with its manifest, the checksum is verified first.
    Raises `ValueError` (a checksum that differs, an unknown schema version)."""
    data = xio.read_bytes(url, storage_options)
    if manifest is not None and sha256(data) != Manifest.parse(manifest).sha256:
        raise ValueError(f"shard {url} does not match the checksum in its manifest")
    table = pq.read_table(io.BytesIO(data))
    read_provenance(table, url)
    return table


def column_bytes(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, list[int]]:
    """Per column of a shard: [compressed, uncompressed] bytes summed over row groups
    (from the Parquet footer only)."""
    fs, path = xio.filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        md = pq.ParquetFile(f).metadata
    out: dict[str, list[int]] = {}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            name = col.path_in_schema.split(".", 1)[0]
            acc = out.setdefault(name, [0, 0])
            acc[0] += col.total_compressed_size
            acc[1] += col.total_uncompressed_size
    return out


# ---------------------------------------------------------------------------- reading
def check_schema_version(version: object, where: str) -> int:
    """The schema-version gate of everything a run stores (shard metadata, run index):
    ``version`` as an int, or `SchemaVersionError` ``"<where>: unknown schema version
    <version>"`` when it is missing, not a number, or newer than
    `schemas.targets.CURRENT_VERSION` (every older version stays readable)."""
    try:
        v = None if version is None else int(version)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        v = None
    if v is None or v > CURRENT_VERSION:
        raise SchemaVersionError(f"{where}: unknown schema version {version!r}")
    return v


def folder_of(url: str) -> str:
    """The folder of a file URL (``.`` for a bare file name)."""
    return url.rsplit("/", 1)[0] if "/" in url else "."


def index_url_of(run: str) -> str:
    """The run index URL of a run directory (an ``.json`` URL is one already)."""
    return run if run.endswith(".json") else xio.join(run, INDEX_NAME)


def read_run_index(
    index_url: str, storage_options: dict[str, Any] | None = None, *, check_version: bool = True
) -> RunIndex:
    """Read and parse ``index.json``. Raises `ShardError` when it cannot be read or is
    not a run index, and (``check_version``) `SchemaVersionError`."""
    try:
        data = xio.read_json(index_url, storage_options)
    except xio.StorageError as err:
        raise ShardError(
            f"no run index at {index_url} ({err}); the run has not finished, or the path is wrong"
        ) from err
    except ValueError as err:
        raise ShardError(f"{index_url}: the run index is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ShardError(f"{index_url}: the run index is not a JSON object")
    if check_version:
        check_schema_version(data.get("schema_version"), index_url)
    try:
        return RunIndex.parse(data)
    except ValueError as err:
        raise ShardError(f"{index_url}: not a valid run index: {err}") from err


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read and parse a shard manifest. Raises `ShardError` (``manifest missing (...)``,
    or not a valid manifest); the caller names the shard."""
    try:
        data = xio.read_json(url, storage_options)
    except xio.StorageError as err:
        raise ShardError(f"manifest missing ({err})") from err
    except ValueError as err:
        raise ShardError(f"manifest {url} is not valid JSON ({err})") from err
    try:
        return Manifest.parse(data)
    except ValueError as err:
        raise ShardError(f"manifest {url} is not a valid manifest: {err}") from err


@dataclass(init=False)
class ShardRef:
    """A shard located in a run or beside its manifest: its data URL and its manifest
    (None when it could not be read; a dict is parsed), and what is wrong with it
    (``problem``: the manifest is missing, or differs from the run index)."""

    name: str
    url: str
    manifest: Manifest | None
    problem: str | None

    def __init__(
        self,
        name: str,
        url: str,
        manifest: Manifest | Mapping[str, Any] | None,
        problem: str | None = None,
    ) -> None:
        self.name, self.url, self.problem = name, url, problem
        self.manifest = None if manifest is None else Manifest.parse(manifest)


def shard_ref(data_url: str, storage_options: dict[str, Any] | None = None) -> ShardRef:
    """A loose shard (``<folder>/<name>.parquet``) with the manifest beside it."""
    base, file = folder_of(data_url), data_url.rsplit("/", 1)[-1]
    name = file[: -len(DATA_SUFFIX)] if file.endswith(DATA_SUFFIX) else file
    try:
        manifest = read_manifest(xio.join(base, name + MANIFEST_SUFFIX), storage_options)
    except ShardError as err:
        return ShardRef(name, data_url, None, str(err))
    return ShardRef(name, data_url, manifest)


def run_shards(
    index: RunIndex, base: str, storage_options: dict[str, Any] | None = None
) -> list[ShardRef]:
    """Every shard the index lists (in its order), with its manifest from ``base`` (the
    index's folder). A shard whose manifest is missing, or whose manifest checksum
    differs from the index entry's, has a ``problem``."""
    refs = []
    for entry in index.shards:
        data_url = xio.join(base, entry.file or entry.name + DATA_SUFFIX)
        try:
            m = read_manifest(xio.join(base, entry.manifest), storage_options)
        except ShardError as err:
            refs.append(ShardRef(entry.name, data_url, None, str(err)))
            continue
        data_url = xio.join(base, m.file or entry.file or entry.name + DATA_SUFFIX)
        problem = None
        if m.sha256 != entry.sha256:
            problem = (
                "manifest checksum differs from the run index (the shard was rewritten "
                "after the index; rerun the job to refresh it)"
            )
        refs.append(ShardRef(entry.name, data_url, m, problem))
    return refs


@dataclass(init=False)
class ShardInfo:
    """A committed shard of a run: name, data URL, manifest (a dict is parsed), and the
    sequences in each row group (filled from the footer by
    `pipeline.reader.Run.load_footers`)."""

    name: str
    url: str
    manifest: Manifest
    row_groups: list[int]  # sequences per row group

    def __init__(
        self,
        name: str,
        url: str,
        manifest: Manifest | Mapping[str, Any],
        row_groups: list[int] | None = None,
    ) -> None:
        self.name, self.url = name, url
        self.manifest = Manifest.parse(manifest)
        self.row_groups = [] if row_groups is None else row_groups


def read_provenance(source: pq.ParquetFile | pa.Schema | pa.Table, shard: str = "?") -> Provenance:
    """The provenance a shard stores in its Parquet metadata (`schemas.targets.METADATA_KEY`),
    its schema version checked. ``shard`` names the shard in errors: `SchemaVersionError`,
    `ShardFormatError` (metadata that is not valid)."""
    if isinstance(source, pq.ParquetFile):
        schema = source.schema_arrow
    elif isinstance(source, pa.Table):
        schema = source.schema
    else:
        schema = source
    try:
        data = json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}"))
    except ValueError as err:
        raise ShardFormatError(f"shard {shard}: provenance metadata is not JSON ({err})") from err
    if not isinstance(data, dict):
        raise ShardFormatError(f"shard {shard}: provenance metadata is not a JSON object")
    check_schema_version(data.get("schema_version"), f"shard {shard}")
    try:
        return Provenance.parse(data)
    except ValueError as err:
        raise ShardFormatError(f"shard {shard}: provenance metadata is not valid: {err}") from err


@dataclass
class OpenShard:
    """A shard's Parquet file opened by `open_shard` (page checksums verified on every
    read), with its sequences per row group and its stored provenance."""

    file: pq.ParquetFile
    row_groups: list[int]
    provenance: Provenance

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close(force=True)


def open_shard(
    shard: ShardInfo | ShardRef,
    storage_options: dict[str, Any] | None = None,
    copy: str | None = None,
) -> OpenShard:
    """Open a shard's Parquet file after checking, in this order, its size against the
    manifest (truncation), the footer, the schema version and provenance stored in it,
    and its sequences against the manifest. ``copy``: a local copy of the data file to
    read instead (messages still name ``shard.url``). Raises `ShardError`."""
    manifest = shard.manifest if shard.manifest is not None else Manifest()
    fs, path = xio.filesystem(copy or shard.url, None if copy else storage_options)
    try:
        size = fs.size(path)
    except FileNotFoundError as err:
        raise ShardError(f"shard {shard.name}: data file {shard.url} is missing") from err
    except Exception as err:
        raise ShardError(f"shard {shard.name}: cannot stat {shard.url}: {err}") from err
    if size != manifest.bytes:
        raise ShardError(
            f"shard {shard.name}: {shard.url} has {size} bytes, its manifest says "
            f"{manifest.bytes} (truncated or rewritten)"
        )
    try:
        f = fs.open(path, "rb")
    except Exception as err:
        raise ShardError(f"shard {shard.name}: cannot open {shard.url}: {err}") from err
    try:
        pf = pq.ParquetFile(f, page_checksum_verification=True)
    except Exception as err:
        f.close()
        raise ShardError(f"shard {shard.name}: unreadable Parquet footer: {err}") from err
    opened = OpenShard(pf, [], Provenance())
    try:
        opened.provenance = read_provenance(pf, shard.name)
        md = pf.metadata
        opened.row_groups = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        if sum(opened.row_groups) != manifest.sequences:
            raise ShardError(
                f"shard {shard.name}: {sum(opened.row_groups)} sequences in the file, "
                f"{manifest.sequences} in its manifest"
            )
    except BaseException:
        opened.close()
        raise
    return opened


# ---------------------------------------------------------------------------- decoding
def flat_list(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (all values, offsets from 0) in numpy: the values of row ``i``
    are ``values[offsets[i]:offsets[i + 1]]``."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    assert isinstance(arr, pa.ListArray | pa.LargeListArray)
    off = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    return values[off[0] : off[-1]], off - off[0]


@dataclass
class DecodedRows:
    """One decoded row group (`decode_row_group`): flat arrays plus per-sequence offsets.
    Sequence ``r`` has tokens ``ids[id_off[r]:id_off[r + 1]]`` and target rows
    ``row_off[r]:row_off[r + 1]`` (``L + 1`` of them) of the per-row arrays."""

    ids: np.ndarray  # [sum L] int64
    id_off: np.ndarray  # [n + 1]
    row_off: np.ndarray  # [n + 1] target rows (L + 1 per sequence)
    loss_mask: np.ndarray  # [sum L+1] bool
    topk_ids: np.ndarray  # [sum L+1, k] int32
    topk_lp: np.ndarray  # [sum L+1, k] float32 natural-log probabilities (-inf: missing)
    tail: np.ndarray  # [sum L+1] float32
    target_lp: np.ndarray  # [sum L+1] float32

    def length(self, r: int) -> int:
        """Student tokens of sequence ``r``."""
        return int(self.id_off[r + 1] - self.id_off[r])


def decode_row_group(table: pa.Table, k: int) -> DecodedRows:
    """The `DECODE_COLUMNS` of a row group (of a run with top-k ``k``) as numpy arrays,
    log-probs dequantised (`schemas.targets.decode_topk_logprobs`)."""
    ids, id_off = flat_list(table["input_ids"])
    mask, row_off = flat_list(table["loss_mask"])
    topk_ids, _ = flat_list(table["topk_ids"])
    dq, _ = flat_list(table["topk_logprob_dq"])
    tail, _ = flat_list(table["tail_mass"])
    tlp, _ = flat_list(table["target_logprob"])
    return DecodedRows(
        ids=ids.astype(np.int64),
        id_off=id_off,
        row_off=row_off,
        loss_mask=mask.astype(bool),
        topk_ids=topk_ids.astype(np.int32).reshape(-1, k),
        topk_lp=decode_topk_logprobs(dq.reshape(-1, k)),
        tail=tail,
        target_lp=tlp,
    )


# the columns `decode_kinds_row_group` reads, per kind (a trainer with any student)
KIND_COLUMNS = {
    "teacher": ("teacher_byte_len", "teacher_logprob_q", "teacher_loss_mask"),
    "bytes": (
        "byte_row_start",
        "byte_loss_mask",
        "byte_topk_ids",
        "byte_topk_logprob_dq",
        "byte_tail_mass",
    ),
}


@dataclass
class KindSequence:
    """One sequence of a v2 shard as a trainer with its own tokenizer reads it
    (`decode_kinds_row_group`); absent kinds are None."""

    text: bytes
    teacher_byte_end: np.ndarray | None = None  # [m] int64
    teacher_logprob: np.ndarray | None = None  # [m + 1] float64
    teacher_loss_mask: np.ndarray | None = None  # [m + 1] bool
    byte_row_start: np.ndarray | None = None  # [R] int64
    byte_loss_mask: np.ndarray | None = None  # [R] bool
    byte_ids: np.ndarray | None = None  # [R, k] int64
    byte_logprobs: np.ndarray | None = None  # [R, k] float32 (-inf: missing)
    byte_tail: np.ndarray | None = None  # [R] float32


def kind_columns(kinds: Sequence[str]) -> list[str]:
    """The columns `decode_kinds_row_group` needs for ``kinds`` (teacher and/or bytes)."""
    return ["text", *(c for k in kinds for c in KIND_COLUMNS.get(k, ()))]


def decode_kinds_row_group(table: pa.Table, byte_top_k: int | None) -> list[KindSequence]:
    """The text and the teacher / byte kinds a row group holds, one `KindSequence` each."""
    texts = table["text"].to_pylist()
    out = [KindSequence(bytes(t)) for t in texts]

    def split(name: str, dtype: Any, width: int = 1) -> list[np.ndarray]:
        values, off = flat_list(table[name])
        values = values.astype(dtype)
        return [
            values[a:b].reshape(-1, width) if width > 1 else values[a:b]
            for a, b in itertools.pairwise(off)
        ]

    names = set(table.column_names)
    if "teacher_logprob_q" in names:
        for seq, n, q, m in zip(
            out,
            split("teacher_byte_len", np.int64),
            split("teacher_logprob_q", np.int64),
            split("teacher_loss_mask", bool),
            strict=True,
        ):
            seq.teacher_byte_end = np.cumsum(n)
            seq.teacher_logprob = decode_teacher_logprobs(q)
            seq.teacher_loss_mask = m
    if "byte_row_start" in names:
        if not byte_top_k:
            raise ShardFormatError("a shard with byte rows but no byte_top_k in its provenance")
        k = byte_top_k
        dq = split("byte_topk_logprob_dq", np.uint16, k)
        for seq, rs, m, ids, q, tail in zip(
            out,
            split("byte_row_start", np.int64),
            split("byte_loss_mask", bool),
            split("byte_topk_ids", np.int64, k),
            dq,
            split("byte_tail_mass", np.float32),
            strict=True,
        ):
            seq.byte_row_start, seq.byte_loss_mask, seq.byte_tail = rs, m, tail
            seq.byte_ids = ids.reshape(-1, k)
            seq.byte_logprobs = decode_topk_logprobs(q.reshape(-1, k))
    return out


__all__ = [
    "DATA_SUFFIX",
    "DECODE_COLUMNS",
    "INDEX_NAME",
    "KIND_COLUMNS",
    "MANIFEST_SUFFIX",
    "DecodedRows",
    "KindSequence",
    "OpenShard",
    "SchemaVersionError",
    "Sequence_",
    "ShardError",
    "ShardFormatError",
    "ShardInfo",
    "ShardRef",
    "build_table",
    "check_schema_version",
    "column_bytes",
    "commit_shard",
    "decode_kinds_row_group",
    "decode_row_group",
    "encode_parquet",
    "flat_list",
    "folder_of",
    "index_url_of",
    "kind_columns",
    "open_shard",
    "output_name",
    "read_manifest",
    "read_provenance",
    "read_run_index",
    "read_table",
    "run_shards",
    "sha256",
    "shard_ref",
]
