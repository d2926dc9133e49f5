"""Running the generate step over input shards: planning, resume, the local executor,
and the run index. The Ray executor (`pipeline.ray_executor`) is the only module that
imports ``ray``.

Failure kinds, treated the same way everywhere:
- a bad config -> `ConfigError` before any model is loaded;
- a bad input record -> skipped, counted and named in the shard manifest;
- infrastructure (worker or node death, storage errors) -> the shard is retried up to
  ``ray.max_retries`` times, then reported as failed; no index is written until every
  shard has committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline import io as xio
from pipeline.config import ConfigError, JobConfig
from pipeline.shards import MANIFEST_SUFFIX, output_name

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"


@dataclass
class Plan:
    shards: list[str]  # input URLs, in order
    names: dict[str, str]  # input URL -> output shard name
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # input URL -> manifest

    @property
    def todo(self) -> list[str]:
        return [s for s in self.shards if s not in self.done]


def plan(cfg: JobConfig, overwrite: bool = False) -> Plan:
    """Validate inputs and output, guard resume, and find the shards still to do.

    Raises `ConfigError` (bad inputs, unwritable output, or a different config already
    in the output directory without ``overwrite``) before any model is loaded.
    """
    if not cfg.input.paths:
        raise ConfigError("input.paths is empty")
    try:
        if cfg.input.format == "hf_disk":
            shards = list(cfg.input.paths)
            for s in shards:
                if not xio.exists(s, cfg.input.storage_options):
                    raise xio.StorageError(f"input {s!r} does not exist")
        else:
            shards = xio.expand(cfg.input.paths, cfg.input.storage_options)
    except xio.StorageError as err:
        raise ConfigError(str(err)) from err
    names = {s: output_name(s) for s in shards}
    seen: dict[str, str] = {}
    for s, n in names.items():
        if n in seen:
            raise ConfigError(f"inputs {seen[n]!r} and {s!r} would both write output shard {n!r}")
        seen[n] = s
    out = cfg.output.path
    so = cfg.output.storage_options
    try:
        xio.check_writable(out, so)
    except xio.StorageError as err:
        raise ConfigError(f"output.path {out!r} is not writable: {err}") from err
    run_cfg_url = xio.join(out, RUN_CONFIG)
    current = {"config_hash": cfg.target_hash(), "config": cfg.model_dump(mode="json")}
    if xio.exists(run_cfg_url, so) and not overwrite:
        previous = xio.read_json(run_cfg_url, so)
        if previous.get("config_hash") != current["config_hash"]:
            raise ConfigError(
                f"{out} holds a run with a different config (hash {previous.get('config_hash')} vs "
                f"{current['config_hash']}); rerun with --overwrite to replace it, or choose another output.path"
            )
    xio.write_json_atomic(run_cfg_url, current, so)
    xio.write_bytes_atomic(
        xio.join(out, "config.yaml"),
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode(),
        so,
    )
    preflight(cfg)
    result = Plan(shards, names)
    if not overwrite:
        for s in shards:
            murl = xio.join(out, names[s] + MANIFEST_SUFFIX)
            if xio.exists(murl, so):
                m = xio.read_json(murl, so)
                if m.get("config_hash") == current["config_hash"]:
                    result.done[s] = m
    return result


def preflight(cfg: JobConfig) -> None:
    """Check the tokenizer pair on the driver (tokenizers only, no model weights), so
    a pair outside the subset regime is refused before any actor starts."""
    from pipeline.generate import tokenizer_pair
    from pipeline.scoring.subset import check_subset_pair
    from pipeline.tokenization import ByteLevelBPE, TokenizerError

    try:
        t_tok, s_tok = tokenizer_pair(cfg)
        check_subset_pair(ByteLevelBPE(t_tok, "teacher"), ByteLevelBPE(s_tok, "student"))
    except (TokenizerError, OSError) as err:
        raise ConfigError(f"tokenizers: {err}") from err
    except ValueError as err:  # SubsetRegimeError
        raise ConfigError(str(err)) from err


class Progress:
    """Driver-side progress: shards done/total, tokens/s, ETA (one log line per shard)."""

    def __init__(self, total_shards: int, already: int = 0) -> None:
        self.total = total_shards
        self.done = already
        self.this_run = 0
        self.tokens = 0
        self.t0 = time.perf_counter()

    def shard_done(self, manifest: dict[str, Any]) -> None:
        self.done += 1
        self.this_run += 1
        self.tokens += int(manifest.get("student_tokens", 0))
        el = time.perf_counter() - self.t0
        rate = self.tokens / el if el > 0 else 0.0
        eta = (self.total - self.done) * el / self.this_run
        log.info(
            "shard %s committed (%d skipped records): %d/%d shards, %d student tokens, %.0f tokens/s, ETA %.0fs",
            manifest.get("file"),
            len(manifest.get("skipped", [])),
            self.done,
            self.total,
            self.tokens,
            rate,
            eta,
        )


def run_local(
    cfg: JobConfig, todo: list[str], on_done: Callable[[dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """In-process executor: one step, shards in order."""
    from pipeline.generate import GenerateStep

    step = GenerateStep(cfg)
    step.setup()
    out = []
    for url in todo:
        m = step.process_shard(url)
        on_done(m)
        out.append(m)
    return out


def finalize(
    cfg: JobConfig, p: Plan, manifests: dict[str, dict[str, Any]], elapsed: float
) -> dict[str, Any]:
    """Write the run index (after every shard committed) and stats.json."""
    so = cfg.output.storage_options
    shards = []
    for s in p.shards:
        m = manifests[s]
        shards.append(
            {
                "name": p.names[s],
                "file": m["file"],
                "manifest": p.names[s] + MANIFEST_SUFFIX,
                "input": s,
                "sequences": m["sequences"],
                "documents": m["documents"],
                "student_tokens": m["student_tokens"],
                "bytes": m["bytes"],
                "sha256": m["sha256"],
                "skipped": len(m["skipped"]),
            }
        )
    totals = {
        k: sum(x[k] for x in shards)
        for k in ("sequences", "documents", "student_tokens", "bytes", "skipped")
    }
    first = manifests[p.shards[0]]
    index = {
        "schema_version": first["schema_version"],
        "config_hash": cfg.target_hash(),
        "provenance": {k: first[k] for k in first if k not in _PER_SHARD},
        "shards": shards,
        "totals": totals,
    }
    xio.write_json_atomic(xio.join(cfg.output.path, "index.json"), index, so)
    new = [m for s, m in manifests.items() if s in p.todo]
    new_tokens = sum(m["student_tokens"] for m in new)
    stats = {
        **totals,
        "shards": len(shards),
        "shards_this_run": len(new),
        "seconds_this_run": round(elapsed, 2),
        "student_tokens_per_second": round(new_tokens / elapsed, 1)
        if elapsed > 0 and new
        else None,
        "bytes_per_student_token": round(totals["bytes"] / max(1, totals["student_tokens"]), 2),
        "mean_topk_mass": round(
            sum(m["mean_topk_mass"] * m["target_rows"] for m in manifests.values())
            / max(1, sum(m["target_rows"] for m in manifests.values())),
            4,
        ),
        "skipped_by_reason": _reasons(manifests.values()),
    }
    xio.write_json_atomic(xio.join(cfg.output.path, "stats.json"), stats, so)
    return stats


_PER_SHARD = {
    "mean_topk_mass",
    "input",
    "records_in",
    "documents",
    "sequences",
    "student_tokens",
    "target_rows",
    "skipped",
    "seconds",
    "host",
    "file",
    "bytes",
    "sha256",
}


def _reasons(manifests: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in manifests:
        for s in m["skipped"]:
            key = s["reason"].split(":")[0]
            out[key] = out.get(key, 0) + 1
    return out
