"""Input shards -> documents to score, with every record accounted for.

A record that cannot be scored (malformed JSON, invalid UTF-8, missing or empty text,
a malformed chat) is a `Skip` with its index, a stable ``kind`` (what statistics group
by) and a ``reason`` (the details); it never stops the shard. A shard that cannot be
read whole (a truncated or corrupt compressed file, a jsonl cut inside its last record,
a Parquet file with a damaged footer or page) raises `InputError` and fails: nothing
is read short. So does a shard in which no record has the configured text (or chat)
field: that is a configuration error, named with the fields that are there.
Formats: jsonl (optionally .zst / .gz), parquet, and HF `datasets` saved to disk.

Record numbers: ``index`` is the 0-based record index in the shard; for jsonl the
1-based ``line`` number is given too (what an editor shows).
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline import io as xio
from pipeline.config import InputConfig
from pipeline.errors import InputError as InputError  # defined there; imported from here too


@dataclass
class Document:
    index: int  # record index in the input shard
    doc_id: str
    text: str
    # character spans of the text that are training targets; None = all of it
    target_spans: list[tuple[int, int]] | None = None
    line: int | None = None  # 1-based line number (jsonl)


# the kinds of skipped records (a Skip's ``kind``; statistics group by it)
SKIP_KINDS = (
    "blank line",
    "invalid UTF-8",
    "malformed JSON",
    "not a JSON object",
    "missing text field",
    "text not a string",
    "empty document",
    "missing chat field",
    "malformed chat",
    "chat template failed",
    "unscorable text",
)
_STRUCTURAL = ("missing text field", "missing chat field")


@dataclass
class Skip:
    index: int
    kind: str  # one of SKIP_KINDS
    reason: str
    doc_id: str | None = None
    line: int | None = None  # 1-based line number (jsonl)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "doc_id": self.doc_id,
            "kind": self.kind,
            "reason": self.reason,
        }
        if self.line is not None:
            out["line"] = self.line
        return out


@dataclass
class ShardInput:
    url: str
    records: list[Document | Skip] = field(default_factory=list)
    fields_seen: set[str] = field(default_factory=set)  # keys of the records read


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

        try:  # every page is decoded here: a damaged file fails now, not half-read
            table = pq.read_table(io.BytesIO(data))
        except Exception as err:
            raise InputError(f"{url!r} is not a readable Parquet file: {err}") from err
        for i, rec in enumerate(table.to_pylist()):
            yield i, rec
        return
    if url.endswith((".zst", ".zstd")):
        data = _unzstd(url, data)
    elif url.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise InputError(f"{url!r} is not a whole gzip file: {err}") from err
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last record
    cut = bool(data) and not data.endswith(b"\n")  # the last line has no newline
    for i, line in enumerate(lines):
        line = line.rstrip(b"\r")
        if not line.strip():
            yield i, Skip(i, "blank line", "blank line", line=i + 1)
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield i, Skip(i, "invalid UTF-8", f"invalid UTF-8 at byte {err.start}", line=i + 1)
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as err:
            if cut and i == len(lines) - 1:
                raise InputError(
                    f"{url!r} ends inside a record (line {i + 1} has no newline and is "
                    f"not whole JSON: {err.msg}): the file looks truncated"
                ) from err
            yield (
                i,
                Skip(
                    i,
                    "malformed JSON",
                    f"malformed JSON: {err.msg} (col {err.colno})",
                    line=i + 1,
                ),
            )
            continue
        if not isinstance(rec, dict):
            yield i, Skip(i, "not a JSON object", "record is not a JSON object", line=i + 1)
            continue
        yield i, rec


def _unzstd(url: str, data: bytes) -> bytes:
    """Every zstd frame of ``data``, decompressed; a truncated or corrupt file raises
    `InputError` (zstandard's stream reader returns what it has, without an error, when
    the last frame is cut short)."""
    import zstandard

    out: list[bytes] = []
    rest = data
    try:
        while rest:
            d = zstandard.ZstdDecompressor().decompressobj()
            out.append(d.decompress(rest))
            if not d.eof:
                raise InputError(
                    f"{url!r} is a truncated zstd file: its last frame ends after "
                    f"{len(data)} compressed bytes without its end mark"
                )
            rest = d.unused_data
    except zstandard.ZstdError as err:
        raise InputError(f"{url!r} is not valid zstd: {err}") from err
    return b"".join(out)


def read_shard(url: str, cfg: InputConfig, chat_template: Any = None) -> ShardInput:
    """All records of one input shard as `Document` or `Skip`, in order.

    ``chat_template(messages) -> str`` renders chats (the teacher tokenizer's template).
    Raises `InputError` when the shard cannot be read whole, or when every record lacks
    the configured text (chat) field (a wrong ``input.text_field``, named with the
    fields found).
    """
    name = url.rstrip("/").rsplit("/", 1)[-1]
    jsonl = shard_format(url, cfg) == "jsonl"
    out = ShardInput(url)
    for i, rec in _raw_records(url, cfg):
        if cfg.limit is not None and i >= cfg.limit:
            break
        if isinstance(rec, Skip):
            out.records.append(rec)
            continue
        out.fields_seen.update(str(k) for k in rec)
        doc_id = (
            str(rec[cfg.id_field])
            if cfg.id_field and rec.get(cfg.id_field) is not None
            else f"{name}:{i}"
        )
        line = i + 1 if jsonl else None
        if cfg.messages_field:
            out.records.append(_chat_document(i, doc_id, rec, cfg, chat_template, line))
            continue
        if cfg.text_field not in rec:
            out.records.append(
                Skip(
                    i,
                    "missing text field",
                    f"missing text field {cfg.text_field!r}",
                    doc_id,
                    line,
                )
            )
            continue
        text = rec[cfg.text_field]
        if not isinstance(text, str):
            out.records.append(
                Skip(
                    i,
                    "text not a string",
                    f"text field {cfg.text_field!r} is {type(text).__name__}, not a string",
                    doc_id,
                    line,
                )
            )
        elif not text.strip():
            out.records.append(Skip(i, "empty document", "empty document", doc_id, line))
        else:
            out.records.append(Document(i, doc_id, text, None, line))
    _check_fields(out, cfg)
    return out


def _check_fields(shard: ShardInput, cfg: InputConfig) -> None:
    """A shard whose every record lacks the configured field is misconfigured, not a
    shard of bad records: fail it, naming the field and the fields that are there."""
    recs = shard.records
    if not recs or not all(isinstance(r, Skip) and r.kind in _STRUCTURAL for r in recs):
        return
    key, field_name = (
        ("input.messages_field", cfg.messages_field)
        if cfg.messages_field
        else ("input.text_field", cfg.text_field)
    )
    found = ", ".join(sorted(shard.fields_seen)) or "none"
    raise InputError(
        f"{shard.url!r}: none of its {len(recs)} records has the field {field_name!r} "
        f"({key}); fields found: {found}. Set {key} to the field that holds the "
        + ("chat messages" if cfg.messages_field else "text")
    )


def _chat_document(
    i: int, doc_id: str, rec: dict, cfg: InputConfig, chat_template: Any, line: int | None
) -> Document | Skip:
    if (cfg.messages_field or "") not in rec:
        return Skip(
            i, "missing chat field", f"missing chat field {cfg.messages_field!r}", doc_id, line
        )
    msgs = rec[cfg.messages_field or ""]
    if not isinstance(msgs, list) or not msgs:
        return Skip(
            i,
            "malformed chat",
            f"empty or non-list chat field {cfg.messages_field!r}",
            doc_id,
            line,
        )
    for m in msgs:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or not isinstance(m.get("role"), str)
        ):
            return Skip(
                i,
                "malformed chat",
                "malformed chat message (needs string role and content)",
                doc_id,
                line,
            )
    if chat_template is None:
        raise ValueError("chat records need the teacher tokenizer's chat template")
    try:
        text = chat_template(msgs)
    except Exception as err:
        return Skip(i, "chat template failed", f"chat template failed: {err}", doc_id, line)
    spans: list[tuple[int, int]] | None = None
    if cfg.loss_on == "assistant":
        spans = []
        pos = 0
        for m in msgs:
            at = text.find(m["content"], pos)
            if at < 0:
                return Skip(
                    i,
                    "malformed chat",
                    "message content not found in the rendered chat",
                    doc_id,
                    line,
                )
            end = at + len(m["content"])
            if m["role"] == "assistant":
                spans.append((at, end))
            pos = end
    return Document(i, doc_id, text, spans, line)
