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

import io
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline import io as xio
from pipeline.config import ConfigError, JobConfig
from pipeline.records import shard_format
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
            for s in shards:  # an unknown format fails here, before any model loads
                shard_format(s, cfg.input)
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
    preflight(cfg)  # a refused tokenizer pair leaves the output path as it was
    xio.write_json_atomic(run_cfg_url, current, so)
    xio.write_bytes_atomic(
        xio.join(out, "config.yaml"),
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode(),
        so,
    )
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
    """Choose the scorer on the driver (tokenizers only, no model weights) and say which
    and why; a pair the chosen scorer cannot handle is refused before any actor starts."""
    from pipeline.generate import choose_scorer, tokenizer_pair
    from pipeline.tokenization import TokenizerError

    try:
        t_tok, s_tok = tokenizer_pair(cfg)
    except (TokenizerError, OSError, ValueError) as err:
        raise ConfigError(f"tokenizers: {err}") from err
    kind, why = choose_scorer(cfg, t_tok, s_tok)
    log.info("scorer: %s (%s)", "subset-exact" if kind == "subset" else "general", why)
    if kind == "general" and cfg.scoring.general.mode == "fast":
        log.warning(
            "the general scorer is far costlier than the subset-exact one and leaves part "
            "of each row unaccounted (stored per row as unaccounted_mass): measured with "
            "SmolLM2 at the default setting, 26-45x the time and 0.33-0.37 of the mass "
            "per row (README, general scorer table); a student that is the teacher's BPE "
            "with a truncated merge list is scored exactly at about 1x"
        )


MetricsSink = Callable[[dict[str, Any]], None]
_METRICS_FACTORIES: list[Callable[[], MetricsSink | None]] = []


def register_metrics(factory: Callable[[], MetricsSink | None]) -> None:
    """Register a maker of a metrics sink (a callable taking `Progress.snapshot()`).

    `Progress` calls each factory until it returns a sink (None = not available yet, e.g.
    Ray not initialized); the Ray executor registers its Prometheus exporter this way so
    this module never imports ``ray``.
    """
    if factory not in _METRICS_FACTORIES:
        _METRICS_FACTORIES.append(factory)


class Progress:
    """Driver-side progress: shards done/total, tokens/s, ETA (one log line per shard),
    also pushed to the registered metrics sinks (Ray: Prometheus metrics on the dashboard).

    ``total_shards`` counts every input shard of the run, ``already`` those committed by an
    earlier run; tokens, rate and ETA cover this run only.
    """

    def __init__(self, total_shards: int, already: int = 0) -> None:
        self.total = total_shards
        self.done = already
        self.this_run = 0
        self.tokens = 0
        self.t0 = time.perf_counter()
        self.sinks: list[MetricsSink] = []

    def snapshot(self) -> dict[str, Any]:
        """The numbers behind the log line: shards, student tokens of this run, tokens/s
        and the ETA in seconds (None until a shard of this run has committed)."""
        el = time.perf_counter() - self.t0
        return {
            "shards_done": self.done,
            "shards_total": self.total,
            "shards_this_run": self.this_run,
            "student_tokens": self.tokens,
            "seconds": el,
            "tokens_per_second": self.tokens / el if el > 0 else 0.0,
            "eta_seconds": (self.total - self.done) * el / self.this_run if self.this_run else None,
        }

    def publish(self) -> dict[str, Any]:
        """Push a snapshot to the metrics sinks (attached on first use once available)."""
        if not self.sinks:
            for make in _METRICS_FACTORIES:
                sink = make()
                if sink is not None:
                    self.sinks.append(sink)
        snap = self.snapshot()
        for sink in self.sinks:
            try:
                sink(snap)
            except Exception as err:  # metrics must never fail a run
                log.warning("progress metrics not exported: %s", err)
        return snap

    def shard_done(self, manifest: dict[str, Any]) -> None:
        self.done += 1
        self.this_run += 1
        self.tokens += int(manifest.get("student_tokens", 0))
        snap = self.publish()
        log.info(
            "shard %s committed (%d skipped records): %d/%d shards, %d student tokens, %.0f tokens/s, ETA %.0fs",
            manifest.get("file"),
            len(manifest.get("skipped", [])),
            self.done,
            self.total,
            self.tokens,
            snap["tokens_per_second"],
            snap["eta_seconds"] or 0.0,
        )


LOGS_DIR = "logs"
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MAX_SKIPS_LOGGED = 1000
shard_logger = logging.getLogger("pipeline.shard")
shard_logger.setLevel(logging.INFO)  # the per-shard log always has its own lines


def shard_log_url(cfg: JobConfig, name: str) -> str:
    """``<output>/logs/<shard name>.log``: one shard's processing story."""
    return xio.join(cfg.output.path, LOGS_DIR, f"{name}.log")


def process_logged(
    step: Any,
    url: str,
    context: dict[str, Any] | None = None,
    attempt: int = 1,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run ``step.process_shard(url)`` and publish its log to `shard_log_url`.

    The log holds the start (host, pid, ``context`` such as the Ray node and actor),
    every batch (student tokens and records so far), what the ``pipeline.*`` loggers said
    meanwhile, the committed counts, every skipped record with its reason, and on
    failure the traceback. It is written whole (`pipeline.io.write_bytes_atomic`) when
    the shard ends, committed or failed; a failure to write it is only a warning, so it
    never undoes a commit. A process killed mid-shard leaves no log for that attempt.
    ``on_batch(student tokens so far, records read so far)`` is called after every batch.
    """
    cfg: JobConfig = step.cfg
    name = output_name(url)
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    plog = logging.getLogger("pipeline")
    plog.addHandler(handler)
    slog = shard_logger
    t0 = time.perf_counter()
    try:
        where = ", ".join(f"{k} {v}" for k, v in (context or {}).items())
        slog.info(
            "shard %s: start (attempt %d), input %s, output %s, host %s, pid %d%s",
            name,
            attempt,
            url,
            cfg.output.path,
            platform.node(),
            os.getpid(),
            f", {where}" if where else "",
        )

        def batch(tokens: int, records: int) -> None:
            slog.info(
                "shard %s: batch scored, %d student tokens so far, %d records read",
                name,
                tokens,
                records,
            )
            if on_batch is not None:
                on_batch(tokens, records)

        m = step.process_shard(url, progress=batch)
        skipped = m.get("skipped", [])
        for s in skipped[:_MAX_SKIPS_LOGGED]:
            doc = f" (doc {s['doc_id']})" if s.get("doc_id") is not None else ""
            slog.info(
                "shard %s: skipped record %s%s: %s", name, s.get("index"), doc, s.get("reason")
            )
        if len(skipped) > _MAX_SKIPS_LOGGED:
            slog.info(
                "shard %s: %d more skipped records in the manifest",
                name,
                len(skipped) - _MAX_SKIPS_LOGGED,
            )
        slog.info(
            "shard %s: committed %s (%d bytes, sha256 %s): %d records in, %d documents, "
            "%d skipped, %d sequences, %d student tokens, %d target rows, %.1fs",
            name,
            m.get("file"),
            m.get("bytes", 0),
            m.get("sha256"),
            m.get("records_in", 0),
            m.get("documents", 0),
            len(skipped),
            m.get("sequences", 0),
            m.get("student_tokens", 0),
            m.get("target_rows", 0),
            time.perf_counter() - t0,
        )
        return m
    except BaseException:
        slog.exception("shard %s: FAILED after %.1fs", name, time.perf_counter() - t0)
        raise
    finally:
        plog.removeHandler(handler)
        try:
            xio.write_bytes_atomic(
                shard_log_url(cfg, name), buf.getvalue().encode(), cfg.output.storage_options
            )
        except Exception as err:
            slog.warning("shard %s: log not written: %s", name, err)


def append_shard_log(cfg: JobConfig, name: str, text: str) -> None:
    """Add driver-side lines (e.g. "worker lost 3 times") to a shard's log."""
    url = shard_log_url(cfg, name)
    so = cfg.output.storage_options
    try:
        old = xio.read_bytes(url, so) if xio.exists(url, so) else b""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = "".join(f"{stamp} ERROR driver: {line}\n" for line in text.splitlines())
        xio.write_bytes_atomic(url, old + lines.encode(), so)
    except xio.StorageError as err:
        log.warning("shard %s: log not written: %s", name, err)


def run_local(
    cfg: JobConfig, todo: list[str], on_done: Callable[[dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """In-process executor: one step, shards in order."""
    from pipeline.generate import GenerateStep

    step = GenerateStep(cfg)
    step.setup()
    out = []
    for url in todo:
        m = process_logged(step, url, {"executor": "local"})
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
    nodes = {p.names[s]: m["ray_node_id"] for s, m in manifests.items() if "ray_node_id" in m}
    if nodes:  # where each shard of this run ran (Ray executor)
        stats["ray_node_of_shard"] = nodes
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
    # added by the Ray executor to the manifests it returns (not in the committed file)
    "ray_node_id",
    "actor",
    "attempt",
}


def _reasons(manifests: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in manifests:
        for s in m["skipped"]:
            key = s["reason"].split(":")[0]
            out[key] = out.get(key, 0) + 1
    return out
