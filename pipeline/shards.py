"""Target shards: Parquet (zstd) built from scored sequences, a manifest written last,
and a run index written after every shard has committed."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io as xio
from pipeline.scoring.common import ScoredDocument
from schemas.targets import (
    BSS_LEAVES,
    CURRENT_VERSION,
    METADATA_KEY,
    encode_topk_logprobs,
    targets_schema,
)

MANIFEST_SUFFIX = ".manifest.json"
DATA_SUFFIX = ".parquet"


@dataclass
class Sequence_:
    doc_id: str
    chunk: int
    scored: ScoredDocument
    loss_mask: np.ndarray  # [L+1] bool


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


def build_table(
    seqs: Sequence[Sequence_],
    top_k: int,
    student_vocab_size: int,
    version: int = CURRENT_VERSION,
) -> pa.Table:
    """One row per sequence, columns as in `schemas.targets` (top-k rows padded to k
    with id 0 and log-prob -inf when the student vocab is smaller than k)."""
    schema = targets_schema(version, student_vocab_size)
    id_np = np.uint16 if schema.field("topk_ids").type.value_type == pa.uint16() else np.uint32
    L1 = [len(s.scored.student_ids) + 1 for s in seqs]

    def cat(get: Any, dtype: Any) -> np.ndarray:
        parts = [np.asarray(get(s), dtype=dtype).reshape(-1) for s in seqs]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    def topk(s: Sequence_, what: str) -> np.ndarray:
        arr = getattr(s.scored, what)
        if arr.shape[1] < top_k:  # tiny student vocab
            pad = np.full(
                (arr.shape[0], top_k - arr.shape[1]),
                0 if what == "topk_ids" else -np.inf,
                arr.dtype,
            )
            arr = np.concatenate([arr, pad], axis=1)
        return arr

    cols = {
        "doc_id": pa.array([s.doc_id for s in seqs], pa.string()),
        "chunk": pa.array([s.chunk for s in seqs], pa.int32()),
        "input_ids": _list(
            cat(lambda s: s.scored.student_ids, id_np),
            [n - 1 for n in L1],
            schema.field("input_ids").type.value_type,
        ),
        "loss_mask": _list(cat(lambda s: s.loss_mask, np.bool_), L1, pa.bool_()),
        "topk_ids": _list(
            cat(lambda s: topk(s, "topk_ids"), id_np),
            [n * top_k for n in L1],
            schema.field("topk_ids").type.value_type,
        ),
        "topk_logprob_dq": _list(
            cat(lambda s: encode_topk_logprobs(topk(s, "topk_logprobs")), np.uint16),
            [n * top_k for n in L1],
            pa.uint16(),
        ),
    }
    for name in (
        "tail_mass",
        "target_logprob",
        "unaccounted_mass",
        "noncanonical_mass",
        "unmapped_mass",
    ):
        attr = "target_logprobs" if name == "target_logprob" else name
        cols[name] = _list(
            cat(lambda s, a=attr: getattr(s.scored, a), np.float32), L1, pa.float32()
        )
    cols["regime"] = _list(cat(lambda s: s.scored.regime, np.uint8), L1, pa.uint8())
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def encode_parquet(
    table: pa.Table, metadata: dict[str, Any], zstd_level: int = 3, row_group_rows: int = 512
) -> bytes:
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(metadata, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        compression_level=zstd_level,
        row_group_size=row_group_rows,
        use_dictionary=["doc_id"],
        write_statistics=["doc_id", "chunk"],
        use_byte_stream_split=BSS_LEAVES,
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
    url: str, storage_options: dict[str, Any] | None = None, manifest: dict[str, Any] | None = None
) -> pa.Table:
    """Read a shard back; with its manifest, the checksum is verified first."""
    data = xio.read_bytes(url, storage_options)
    if manifest is not None and sha256(data) != manifest.get("sha256"):
        raise ValueError(f"shard {url} does not match the checksum in its manifest")
    table = pq.read_table(io.BytesIO(data))
    meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    version = meta.get("schema_version")
    if version is None or int(version) > CURRENT_VERSION:
        raise ValueError(f"shard {url}: unknown schema version {version!r}")
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
