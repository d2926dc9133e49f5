"""Typed models of a run's JSON files: a shard's provenance (also stored in its Parquet
metadata), its manifest (``<name>.manifest.json``) and the run index (``index.json``).

The writers (`pipeline.generate`, `pipeline.executors.finalize`) produce plain dicts and
the files on disk are exactly those dicts; these models are how readers (`pipeline.reader`,
`pipeline.audit`, `pipeline.shards`) parse them. Every model keeps keys it does not
declare (``extra="allow"``: older or newer runs may carry others) and declares every key
optional that some run may lack, so a file any version of the job wrote parses; what a
reader needs and does not find is its error, named there.

`Record.to_dict` gives the keys the file had (declared and other), as the declared types
parse them; ``record["key"]`` and ``record.get("key")`` read the same way, for code
written against the dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

_R = TypeVar("_R", bound="Record")


class Record(BaseModel):
    """A JSON object with some keys declared: the rest are kept as they are."""

    model_config = ConfigDict(extra="allow")

    @classmethod
    def parse(cls: type[_R], data: Mapping[str, Any] | Record) -> _R:
        """Validate a dict (or another `Record`, by its keys); raises `ValueError`
        (pydantic's `ValidationError`) naming the keys of the wrong type."""
        if isinstance(data, cls):
            return data
        if isinstance(data, Record):
            data = data.to_dict()
        return cls.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        """The keys the object had (declared and other), with their parsed values."""
        return self.model_dump(exclude_unset=True)

    def __contains__(self, key: object) -> bool:
        return key in self.model_fields_set

    def __getitem__(self, key: str) -> Any:
        if key not in self.model_fields_set:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.model_fields_set else default


class Provenance(Record):
    """What made a shard: written by `pipeline.generate.GenerateStep` into each shard's
    Parquet metadata (`schemas.targets.METADATA_KEY`) and its manifest; the run index
    keeps the first shard's. Shards of one run must agree on every key (the audit's
    consistency check)."""

    schema_version: int | None = None
    teacher: str | None = None
    teacher_revision: str | None = None
    teacher_tokenizer_sha256: str | None = None
    student_tokenizer_sha256: str | None = None
    teacher_vocab_size: int | None = None
    student_vocab_size: int | None = None
    scorer: str | None = None  # "subset-exact" | "general-<mode>"
    scorer_params: dict[str, Any] | None = None
    top_k: int | None = None
    temperature: float | None = None
    logprobs: str | None = None
    logprob_step: float | None = None
    row_convention: str | None = None
    student_eos_id: int | None = None
    config_hash: str | None = None
    # resolved where the shard ran (runs before these existed lack them)
    teacher_dtype: str | None = None
    teacher_device: str | None = None
    max_context: int | None = None
    max_batch_tokens: int | None = None
    # schema version 2: the target kinds (runs before kinds existed: student only)
    targets: list[str] | None = None
    byte_top_k: int | None = None
    byte_specials: list[str] | None = None  # byte symbol 257 + j is byte_specials[j]
    byte_eos: str | None = None  # the added token symbol 256 stands for (end of text)
    teacher_eos_id: int | None = None

    @property
    def kinds(self) -> list[str]:
        """The target kinds the run stores (``["student"]`` for a schema 1 run)."""
        return list(self.targets or ["student"])


class SkippedRecord(Record):
    """An input record a shard skipped (`pipeline.records.Skip.as_dict`); manifests
    written before kinds existed have no ``kind``."""

    index: int | None = None
    doc_id: str | None = None
    kind: str | None = None  # one of `pipeline.records.SKIP_KINDS`
    reason: str | None = None
    line: int | None = None  # 1-based line number (jsonl)

    @property
    def group(self) -> str:
        """What statistics count it under: its kind, else its reason up to the first ":"."""
        return self.kind or (self.reason or "").split(":")[0]


class Manifest(Provenance):
    """``<name>.manifest.json``: the shard's provenance plus what is particular to the
    shard (`PER_SHARD_KEYS`). Written last: a shard without one never committed."""

    input: str | None = None
    records_in: int | None = None
    documents: int | None = None
    sequences: int | None = None
    student_tokens: int | None = None
    target_rows: int | None = None
    mean_topk_mass: float | None = None
    teacher_tokens: int | None = None  # kind teacher or bytes: canonical teacher tokens
    text_bytes: int | None = None  # kind teacher or bytes: UTF-8 bytes of the texts
    byte_rows: int | None = None  # kind bytes
    skipped: list[SkippedRecord] | None = None
    seconds: float | None = None
    host: str | None = None
    # added by `pipeline.shards.commit_shard`
    file: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    # added by the Ray executor to the manifests it returns (not in the committed file)
    ray_node_id: str | None = None
    actor: str | None = None
    attempt: int | None = None

    def provenance(self) -> Provenance:
        """The provenance keys of the manifest (everything but `PER_SHARD_KEYS`)."""
        return Provenance.model_validate(
            {k: v for k, v in self.to_dict().items() if k not in PER_SHARD_KEYS}
        )


# the manifest keys that describe one shard, not the run (the rest is provenance)
PER_SHARD_KEYS: frozenset[str] = frozenset(Manifest.model_fields) - frozenset(
    Provenance.model_fields
)


class IndexEntry(Record):
    """One shard in the run index."""

    name: str
    manifest: str  # the manifest's file name, beside the index
    file: str | None = None  # the data file's name (default ``<name>.parquet``)
    input: str | None = None
    sequences: int | None = None
    documents: int | None = None
    student_tokens: int | None = None
    bytes: int | None = None
    sha256: str | None = None  # the manifest's, when the index was written
    skipped: int | None = None  # how many records the shard skipped


class RunTotals(Record):
    sequences: int | None = None
    documents: int | None = None
    student_tokens: int | None = None
    bytes: int | None = None
    skipped: int | None = None


class RunIndex(Record):
    """``index.json``: written once every shard committed."""

    schema_version: int | None = None
    config_hash: str | None = None
    provenance: Provenance = Field(default_factory=Provenance)
    shards: list[IndexEntry] = Field(default_factory=list)
    totals: RunTotals | None = None


def parse_provenance(data: Mapping[str, Any] | Record) -> Provenance:
    return Provenance.parse(data)


def parse_manifest(data: Mapping[str, Any] | Record) -> Manifest:
    return Manifest.parse(data)


def parse_run_index(data: Mapping[str, Any] | Record) -> RunIndex:
    return RunIndex.parse(data)


def skipped_by_kind(manifests: Iterable[Mapping[str, Any] | Manifest]) -> dict[str, int]:
    """Skipped records per kind over manifests (`SkippedRecord.group`)."""
    out: dict[str, int] = {}
    for m in manifests:
        for s in parse_manifest(m).skipped or []:
            out[s.group] = out.get(s.group, 0) + 1
    return out


__all__ = [
    "PER_SHARD_KEYS",
    "IndexEntry",
    "Manifest",
    "Provenance",
    "Record",
    "RunIndex",
    "RunTotals",
    "SkippedRecord",
    "parse_manifest",
    "parse_provenance",
    "parse_run_index",
    "skipped_by_kind",
]
