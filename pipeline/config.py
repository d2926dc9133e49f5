"""Typed job configuration: YAML + ``key=value`` overrides, validated before any model
is loaded, saved resolved next to the outputs.

Unknown keys are errors (a typo must not silently fall back to a default). The config
hash that guards resume covers everything that changes the targets (teacher, student,
scoring, input selection), not execution details (number of actors, batch sizes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError as ConfigError  # defined there; imported from here too


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputConfig(_Strict):
    paths: list[str] = Field(
        default_factory=list, description="URLs or globs (local, s3://, gs://, memory://)"
    )
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = Field(
        "auto", description="auto: from the file suffix (.jsonl[.zst|.gz], .json, .parquet)"
    )
    text_field: str = Field("text", description="field holding plain text records")
    messages_field: str | None = Field(
        None, description="chat field: a list of {role, content}; uses the teacher's chat template"
    )
    id_field: str | None = Field(
        "id", description="document id field (None or missing: <shard>:<record index>)"
    )
    loss_on: Literal["all", "assistant"] = Field(
        "all", description="rows that are training targets (loss_mask)"
    )
    limit: int | None = Field(None, ge=1, description="records per input shard (for smoke runs)")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the input filesystem"
    )


# teacher keys that change how the step runs, never a stored number (not in the hash)
EXECUTION_ONLY = {"overlap", "prepare_workers"}


class TeacherConfig(_Strict):
    model: str | None = Field(
        None, description="HF model id or local dir; None = embedded SmolLM2-135M-Instruct"
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    device: str = Field(
        "auto", description="auto: cuda when torch sees a GPU, else cpu; or cpu, cuda:1, ..."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model weights; auto: bfloat16 on cuda, else float32"
    )
    max_batch_tokens: int | Literal["auto"] = Field(
        2048,
        description="teacher tokens per forward pass (padded batch size), >= 16; auto: on "
        "cuda the most that fit the GPU memory free after the weights (pipeline.teacher."
        "plan_max_batch_tokens), else 2048",
    )
    temperature: float = Field(
        1.0, gt=0, description="teacher logits are divided by it before the log-softmax"
    )
    deterministic: bool = Field(
        False,
        description="bit-identical reruns on the same hardware: deterministic torch "
        "kernels (slower on CUDA); see the README's precision notes",
    )
    max_context: int | None = Field(
        None,
        ge=16,
        description="teacher tokens per sequence (default: min(model limit, max_batch_tokens / 2))",
    )
    overlap: Literal["auto", "on", "off"] = Field(
        "auto",
        description="prepare the next batch (chunking, tokenizing: pure Python) in a "
        "producer thread while the current one is scored; the same shard bytes either "
        "way; auto: on when the teacher does not run on the CPU (a CPU teacher and the "
        "producer would compete for the actor's cores)",
    )
    prepare_workers: int | Literal["auto"] = Field(
        "auto",
        description="with overlap: worker processes (spawned) that run the tokenizer "
        "phase, so that it does not share the GIL with the scoring thread; 0: in the "
        "producer thread; auto: max(0, min(4, cpus - 2)) with overlap active and the "
        "teacher not on the CPU, where cpus are the CPUs the step has (a Ray actor's "
        "num_cpus; the local executor: the CPUs this process may use), else 0",
    )

    @field_validator("overlap", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        # YAML reads a bare on/off as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("prepare_workers", mode="before")
    @classmethod
    def _workers_count(cls, v: Any) -> Any:
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"teacher.prepare_workers must be an integer >= 0 or auto, not {v!r}")
        return v

    @model_validator(mode="after")
    def _context_fits_a_forward(self) -> TeacherConfig:
        mbt = self.max_batch_tokens
        if mbt != "auto" and mbt < 16:
            raise ValueError(f"max_batch_tokens must be >= 16 or 'auto', not {mbt}")
        if mbt == "auto" and self.max_context is None:
            # the default max_context is max_batch_tokens / 2: the chunking, and so the
            # stored targets, would depend on the GPU's free memory
            raise ValueError(
                "teacher.max_batch_tokens=auto needs teacher.max_context set (the chunk "
                "length in teacher tokens; its default derives from max_batch_tokens)"
            )
        if self.overlap == "off" and self.prepare_workers not in (0, "auto"):
            raise ValueError(
                f"teacher.prepare_workers={self.prepare_workers} needs teacher.overlap on "
                "or auto (the workers prepare batches ahead of the scoring); set it to 0"
            )
        if mbt == "auto" and self.deterministic:
            raise ValueError(
                "teacher.deterministic needs a fixed teacher.max_batch_tokens (auto "
                "depends on the free GPU memory, and it decides which texts share a forward)"
            )
        # with auto the teacher checks max_context against the resolved number
        if self.max_context is not None and mbt != "auto" and self.max_context > mbt:
            raise ValueError(
                f"max_context ({self.max_context}) must not exceed max_batch_tokens "
                f"({self.max_batch_tokens}): a chunk's context tree is one forward row"
            )
        return self


class StudentConfig(_Strict):
    tokenizer: str | None = Field(
        None, description="tokenizer.json, HF dir or id; None = the teacher's BPE cut to `merges`"
    )
    merges: int | None = Field(
        8000, ge=0, description="with tokenizer=None: merges of the teacher's BPE kept"
    )


class GeneralScorerConfig(_Strict):
    """Parameters of the general scorer (any student tokenizer; see
    `pipeline.scoring.GeneralScorer`)."""

    mode: Literal["approx", "bounded", "lossless", "fast"] = Field(
        "approx",
        description="approx: prune by beam and min_prob, place the pruned mass by a "
        "word-end estimate (stored per row as estimated_mass), never prune the "
        "document's own continuation: rows sum to 1 and the actual next token is never "
        "0 (token walk only); bounded: prune likewise but leave the pruned mass "
        "unaccounted (rows are rigorous lower bounds; fast: its former name); lossless: "
        "enumerate until each row is decided (up to max_depth)",
    )
    walk: Literal["tokens", "bytes"] = Field(
        "tokens",
        description="tokens: enumerate whole teacher tokens (one teacher distribution "
        "decides all next tokens at once); bytes: the byte-model reference walk",
    )
    max_depth: int = Field(24, ge=1, description="continuation bytes enumerated per row")
    beam: int = Field(
        64, ge=1, description="approx/bounded: open branches expanded per level and row"
    )
    min_prob: float = Field(
        0.02,
        ge=0.0,
        lt=1.0,
        description="approx/bounded: branches below this share are dropped (approx: "
        "placed by the estimate)",
    )
    budget: int | None = Field(
        None,
        ge=0,
        description="approx/bounded, token walk: at most this many teacher positions "
        "expanded per row off the document's own text (whose distributions come with "
        "the document's forward), heaviest first; null: beam and min_prob alone",
    )

    @model_validator(mode="after")
    def _approx_walks_tokens(self) -> GeneralScorerConfig:
        if self.mode == "approx" and self.walk != "tokens":
            raise ValueError(
                "scoring.general.mode=approx needs scoring.general.walk=tokens (the byte "
                "walk has bounded and lossless modes only)"
            )
        if self.budget is not None and self.walk != "tokens":
            raise ValueError("scoring.general.budget needs scoring.general.walk=tokens")
        return self


TargetKind = Literal["student", "bytes", "teacher"]


class ScoringConfig(_Strict):
    scorer: Literal["auto", "subset", "general"] = Field(
        "auto",
        description="auto: subset-exact when the student is the teacher's BPE with a "
        "truncated merge list, else general",
    )
    general: GeneralScorerConfig = Field(default_factory=GeneralScorerConfig)
    targets: list[TargetKind] = Field(
        default_factory=lambda: list[TargetKind](["student"]),
        description="target kinds, any non-empty subset, all from the same teacher "
        "forwards: student (rows over student.tokenizer's vocab), bytes (the teacher's "
        "exact next-byte distributions, for byte-level distillation), teacher (the "
        "teacher's log-probs of its own tokens with their byte spans, for ALM); bytes "
        "and teacher serve any student tokenizer chosen at read time",
    )
    top_k: int = Field(64, ge=1, le=4096, description="student tokens stored per row")
    byte_top_k: int = Field(
        16,
        ge=1,
        le=257,
        description="byte symbols stored per byte row (kind bytes): 16 keeps 0.987 of "
        "the mass on average on held-out English (8: 0.969, 32: 0.996; the student rows "
        "keep 0.989 at top_k=64), at ~48 B per text byte (8: ~30); jobs/bench/README.md",
    )
    chunk_overlap: int = Field(
        64,
        ge=0,
        description="teacher tokens of context repeated at the start of the next chunk of "
        "a long document (their rows are not targets again)",
    )

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("scoring.targets: ask for at least one of student, bytes, teacher")
        order = ("student", "bytes", "teacher")
        return [k for k in order if k in v]


class OutputConfig(_Strict):
    path: str = Field("./out", description="directory or URL the shards are written to")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the output filesystem"
    )
    zstd_level: int = Field(3, ge=1, le=22, description="Parquet zstd compression level")
    row_group_rows: int = Field(512, ge=1, description="sequences per Parquet row group")


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="None: join a cluster if RAY_ADDRESS is set, else start a local one"
    )
    num_actors: int | None = Field(
        None, ge=1, description="default: one per GPU, else one per CPU (at most one per shard)"
    )
    num_gpus_per_actor: float = Field(
        1.0, ge=0, description="GPUs each actor reserves (on clusters with GPUs)"
    )
    num_cpus_per_actor: float | Literal["auto"] = Field(
        "auto",
        description="CPUs each actor reserves (its torch threads; teacher.prepare_workers="
        "auto follows it); auto: 1 on CPU actors; on GPU actors num_gpus_per_actor x the "
        "CPUs per GPU of the GPU node with the fewest, rounded down, between 1 and 8",
    )
    accelerator_type: str | None = Field(
        None, description="run only on nodes of this type, e.g. A100 (Ray accelerator_type)"
    )
    node_wait_seconds: float = Field(
        300.0,
        ge=0,
        description="how long to wait for a node of accelerator_type to join, or for "
        "the first actor to start (autoscaling clusters start nodes on demand), before "
        "failing",
    )
    max_retries: int = Field(
        3, ge=0, description="attempts per shard after infrastructure failures"
    )
    storage_retry_seconds: float = Field(
        15.0,
        ge=0,
        description="a shard whose storage still fails after the client's own retries "
        "(an object store out for a while) is retried after this many seconds times its "
        "attempt number",
    )

    @field_validator("num_cpus_per_actor", mode="before")
    @classmethod
    def _cpus_count(cls, v: Any) -> Any:
        if v != "auto" and (
            isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < float("inf")
        ):
            raise ValueError(f"ray.num_cpus_per_actor must be a number >= 0 or auto, not {v!r}")
        return v


class JobConfig(_Strict):
    input: InputConfig = Field(default_factory=InputConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("input")
    @classmethod
    def _text_or_messages(cls, v: InputConfig) -> InputConfig:
        if v.loss_on == "assistant" and not v.messages_field:
            raise ValueError("loss_on=assistant needs input.messages_field (chat records)")
        return v

    def target_settings(self) -> dict[str, Any]:
        """Every setting that can change a stored number, flattened (``teacher.dtype``):
        the input selection and fields, the whole teacher (its weights, dtype and device
        class, and ``max_batch_tokens``, which sets the default ``max_context`` and so the
        chunking, and which documents share a forward), the student and the scoring.
        Not: storage options, the output location and format, Ray placement, how the
        tokenizer phase runs (``teacher.overlap``, ``teacher.prepare_workers``: the same
        shard bytes either way)."""
        keep = {
            "input": self.input.model_dump(mode="json", exclude={"storage_options"}),
            # the device class (cuda:0 and cuda:1 compute alike)
            "teacher": {
                **self.teacher.model_dump(mode="json", exclude=EXECUTION_ONLY),
                "device": self.teacher.device.split(":")[0],
            },
            "student": self.student.model_dump(mode="json"),
            "scoring": self.scoring.model_dump(mode="json"),
        }
        return flatten(keep)

    def target_hash(self) -> str:
        """Hash of `target_settings` (guards resume: a rerun with another value is
        refused, naming the keys that differ)."""
        blob = json.dumps(self.target_settings(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "storage_options":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_reference(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """One line per config key: ``section.key: type = default  description`` (nested
    sections in order), for ``--help-config``."""
    lines: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(config_reference(ann, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        kind = getattr(ann, "__name__", None) if isinstance(ann, type) else None
        kind = kind or str(ann).replace("typing.", "")
        line = f"{key}: {kind} = {json.dumps(default)}"
        lines.append(f"{line}  ({field.description})" if field.description else line)
    return lines


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Build a validated `JobConfig` from a YAML file and ``key=value`` overrides
    (values parsed as YAML: ``scoring.top_k=32``, ``input.paths=[a.jsonl,b.jsonl]``)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ConfigError(f"config file {path} does not exist") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        data = loaded or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"])
            lines.append(f"  {loc}: {e['msg']}")
        raise ConfigError("invalid job config:\n" + "\n".join(lines)) from None
