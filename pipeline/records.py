"""Input shards -> documents to score, with every record accounted for.

A record that cannot be scored (malformed JSON, invalid UTF-8, missing or empty text,
a malformed chat) is a `Skip` with its index and reason; it never stops the shard.
Formats: jsonl (optionally .zst / .gz), parquet, and HF `datasets` saved to disk.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline import io as xio
from pipeline.config import InputConfig


@dataclass
class Document:
    index: int  # record index in the input shard
    doc_id: str
    text: str
    # character spans of the text that are training targets; None = all of it
    target_spans: list[tuple[int, int]] | None = None


@dataclass
class Skip:
    index: int
    reason: str
    doc_id: str | None = None


@dataclass
class ShardInput:
    url: str
    records: list[Document | Skip] = field(default_factory=list)


def shard_format(url: str, cfg: InputConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    name = url.lower()
    if name.endswith(".arrow") or name.rsplit("/", 1)[-1] in ("state.json", "dataset_info.json"):
        # a directory written by `datasets.save_to_disk`, expanded into its files
        raise xio.StorageError(
            f"{url!r} is a file of an HF dataset saved with save_to_disk; set "
            "input.format=hf_disk and point input.paths at the dataset directory"
        )
    if name.endswith((".jsonl", ".jsonl.zst", ".jsonl.gz", ".json", ".jsonl.zstd")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise xio.StorageError(f"cannot tell the format of {url!r}; set input.format")


def _raw_records(url: str, cfg: InputConfig) -> Iterator[tuple[int, Any]]:
    """(index, dict or Skip) for every record of a shard."""
    fmt = shard_format(url, cfg)
    if fmt == "hf_disk":
        import datasets

        ds = datasets.load_from_disk(url, storage_options=cfg.storage_options or None)
        if isinstance(ds, datasets.DatasetDict):
            raise xio.StorageError(f"{url!r} is a DatasetDict; point input.paths at one split")
        for i, rec in enumerate(ds):
            yield i, rec
        return
    data = xio.read_bytes(url, cfg.storage_options)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as err:
            raise xio.StorageError(f"{url!r} is not a readable Parquet file: {err}") from err
        for i, rec in enumerate(table.to_pylist()):
            yield i, rec
        return
    if url.endswith((".zst", ".zstd")):
        import zstandard

        try:
            data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
        except zstandard.ZstdError as err:
            raise xio.StorageError(f"{url!r} is not valid zstd: {err}") from err
    elif url.endswith(".gz"):
        data = gzip.decompress(data)
    for i, line in enumerate(data.splitlines()):
        if not line.strip():
            yield i, Skip(i, "blank line")
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield i, Skip(i, f"invalid UTF-8 at byte {err.start}")
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as err:
            yield i, Skip(i, f"malformed JSON: {err.msg} (col {err.colno})")
            continue
        if not isinstance(rec, dict):
            yield i, Skip(i, "record is not a JSON object")
            continue
        yield i, rec


def read_shard(url: str, cfg: InputConfig, chat_template: Any = None) -> ShardInput:
    """All records of one input shard as `Document` or `Skip`, in order.

    ``chat_template(messages) -> str`` renders chats (the teacher tokenizer's template).
    """
    name = url.rstrip("/").rsplit("/", 1)[-1]
    out = ShardInput(url)
    for i, rec in _raw_records(url, cfg):
        if cfg.limit is not None and i >= cfg.limit:
            break
        if isinstance(rec, Skip):
            out.records.append(rec)
            continue
        doc_id = (
            str(rec[cfg.id_field])
            if cfg.id_field and rec.get(cfg.id_field) is not None
            else f"{name}:{i}"
        )
        if cfg.messages_field:
            out.records.append(_chat_document(i, doc_id, rec, cfg, chat_template))
            continue
        if cfg.text_field not in rec:
            out.records.append(Skip(i, f"missing text field {cfg.text_field!r}", doc_id))
            continue
        text = rec[cfg.text_field]
        if not isinstance(text, str):
            out.records.append(
                Skip(
                    i,
                    f"text field {cfg.text_field!r} is {type(text).__name__}, not a string",
                    doc_id,
                )
            )
        elif not text.strip():
            out.records.append(Skip(i, "empty document", doc_id))
        else:
            out.records.append(Document(i, doc_id, text))
    return out


def _chat_document(
    i: int, doc_id: str, rec: dict, cfg: InputConfig, chat_template: Any
) -> Document | Skip:
    msgs = rec.get(cfg.messages_field or "")
    if not isinstance(msgs, list) or not msgs:
        return Skip(i, f"missing or empty chat field {cfg.messages_field!r}", doc_id)
    for m in msgs:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or not isinstance(m.get("role"), str)
        ):
            return Skip(i, "malformed chat message (needs string role and content)", doc_id)
    if chat_template is None:
        raise ValueError("chat records need the teacher tokenizer's chat template")
    try:
        text = chat_template(msgs)
    except Exception as err:
        return Skip(i, f"chat template failed: {err}", doc_id)
    spans: list[tuple[int, int]] | None = None
    if cfg.loss_on == "assistant":
        spans = []
        pos = 0
        for m in msgs:
            at = text.find(m["content"], pos)
            if at < 0:
                return Skip(i, "message content not found in the rendered chat", doc_id)
            end = at + len(m["content"])
            if m["role"] == "assistant":
                spans.append((at, end))
            pos = end
    return Document(i, doc_id, text, spans)
