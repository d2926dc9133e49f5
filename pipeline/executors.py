"""Running the generate step over input shards: planning, resume, the local executor,
and the run index. The Ray executor (`pipeline.ray_executor`) is the only module that
imports ``ray``.

Failures are of the kinds in `pipeline.errors` (config, bad record, input, retryable,
internal), each treated as it says there (`pipeline.errors.classify`); no index is
written until every shard has committed.
"""

from __future__ import annotations

import io
import logging
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline import io as xio
from pipeline.config import ConfigError, JobConfig
from pipeline.records import shard_format
from pipeline.redact import RedactingFilter, public, redact
from pipeline.shards import INDEX_NAME, MANIFEST_SUFFIX, output_name
from schemas.run import PER_SHARD_KEYS, skipped_by_kind

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
    current = {
        "config_hash": cfg.target_hash(),
        "target_settings": cfg.target_settings(),
        "config": public(cfg.model_dump(mode="json")),
    }
    previous = xio.read_json(run_cfg_url, so) if xio.exists(run_cfg_url, so) else None
    same = previous is not None and previous.get("config_hash") == current["config_hash"]
    if previous is not None and not same and not overwrite:
        raise ConfigError(
            f"{out} holds a run with a different config (hash {previous.get('config_hash')} "
            f"vs {current['config_hash']}): {_differences(previous, current)}; rerun with "
            "--overwrite to replace it, or choose another output.path"
        )
    preflight(cfg)  # a refused tokenizer pair leaves the output path as it was
    if not same or overwrite:  # a rerun of the same run leaves its record as it was
        xio.write_json_atomic(run_cfg_url, current, so)
        xio.write_bytes_atomic(
            xio.join(out, "config.yaml"),
            yaml.safe_dump(current["config"], sort_keys=False).encode(),
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


def _differences(previous: dict[str, Any], current: dict[str, Any]) -> str:
    """The settings that change the targets and differ, ``key: old -> new``."""
    from pipeline.config import flatten

    old = previous.get("target_settings")
    if old is None:  # written before the settings were recorded: compare the configs
        old = flatten(previous.get("config", {}))
        new = flatten(current["config"])
        keys = set(current["target_settings"])
        diff = [k for k in sorted(keys) if old.get(k) != new.get(k)]
        if not diff:
            return (
                "it was made by an earlier version whose config hash covered fewer "
                "settings (the same in both where recorded)"
            )
        return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
    new = current["target_settings"]
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in diff)


def work_tokens(manifest: dict[str, Any]) -> int:
    """The tokens progress and rates count: the student's, or the teacher's in a run
    without the student kind."""
    if "student_tokens" in manifest:
        return int(manifest["student_tokens"])
    return int(manifest.get("teacher_tokens", 0))


def preflight(cfg: JobConfig) -> None:
    """Choose the scorer on the driver (tokenizers only, no model weights) and say which
    and why; a pair the chosen scorer cannot handle is refused before any actor starts."""
    from pipeline.generate import choose_scorer, teacher_tokenizer, tokenizer_pair
    from pipeline.tokenization import TokenizerError

    log.info("target kinds: %s", ", ".join(cfg.scoring.targets))
    if "student" not in cfg.scoring.targets:
        try:
            teacher_tokenizer(cfg)
        except (TokenizerError, OSError, ValueError) as err:
            raise ConfigError(f"tokenizers: {err}") from err
        return
    try:
        t_tok, s_tok = tokenizer_pair(cfg)
    except ConfigError:
        raise
    except (TokenizerError, OSError, ValueError) as err:
        raise ConfigError(f"tokenizers: {err}") from err
    kind, why = choose_scorer(cfg, t_tok, s_tok)
    from pipeline.scoring.factory import cost_warning, scorer_label

    log.info("scorer: %s (%s)", scorer_label(kind), why)
    if (warning := cost_warning(kind, cfg)) is not None:
        log.warning(warning)


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
    """Driver-side progress: shards done/total, student tokens, tokens/s and an ETA from
    tokens, logged per committed shard and, while shards run, every
    `HEARTBEAT_SECONDS` from the running shards' batch progress (`running`); also
    pushed to the registered metrics sinks (Ray: Prometheus metrics on the dashboard).

    ``total_shards`` counts every input shard of the run, ``already`` those committed by an
    earlier run; tokens, rate and ETA cover this run only. The ETA is in tokens: the
    student tokens still to score (each running shard's tokens so far / the share of its
    text scored; each queued shard at the mean of the shards seen) at this run's rate.
    """

    def __init__(self, total_shards: int, already: int = 0, unit: str = "student") -> None:
        self.unit = unit  # whose tokens are counted: "student", or "teacher" without one
        self.total = total_shards
        self.done = already
        self.this_run = 0
        self.tokens = 0  # committed this run
        self.running: dict[str, dict[str, Any]] = {}  # shard name -> ShardProgress fields
        self.t0 = time.perf_counter()
        self.sinks: list[MetricsSink] = []
        self._last_line = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        """The numbers behind the log line: shards, student tokens of this run (committed
        and in running shards), tokens/s and the ETA in seconds (None until a shard of
        this run has scored a batch)."""
        el = time.perf_counter() - self.t0
        in_flight = sum(r["student_tokens"] for r in self.running.values())
        tokens = self.tokens + in_flight
        # (tokens so far, expected tokens) of each running shard with a batch scored:
        # the expected count from the share of its text done
        seen = [
            (r["student_tokens"], r["student_tokens"] / r["fraction"])
            for r in self.running.values()
            if r.get("fraction", 0) > 0 and r["student_tokens"] > 0
        ]
        per_shard = [self.tokens / self.this_run] * self.this_run if self.this_run else []
        per_shard += [e for _, e in seen]
        eta = None
        if per_shard and tokens > 0 and el > 0:
            queued = max(0, self.total - self.done - len(self.running))
            left = sum(e - r for r, e in seen) + queued * sum(per_shard) / len(per_shard)
            eta = max(0.0, left) / (tokens / el)
        return {
            "shards_done": self.done,
            "shards_total": self.total,
            "shards_this_run": self.this_run,
            "shards_running": len(self.running),
            "student_tokens": self.tokens,
            "student_tokens_in_flight": in_flight,
            "seconds": el,
            "tokens_per_second": tokens / el if el > 0 else 0.0,
            "eta_seconds": eta,
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

    def shard_progress(self, name: str, state: dict[str, Any]) -> None:
        """A running shard's latest `ShardProgress` (as a dict with its ``fraction``);
        logs the run's line at most every `HEARTBEAT_SECONDS`."""
        self.running[name] = state
        self.heartbeat()

    def heartbeat(
        self, force: bool = False, queued: int | None = None, active: int | None = None
    ) -> None:
        """The run's progress line, when shards are running and `HEARTBEAT_SECONDS`
        have passed since the last line (or ``force``)."""
        if not force and time.monotonic() - self._last_line < HEARTBEAT_SECONDS:
            return
        self._last_line = time.monotonic()
        snap = self.publish()
        shards = ", ".join(
            f"{n} {100 * r.get('fraction', 0):.0f}%" for n, r in sorted(self.running.items())
        )
        log.info(
            "run: %d/%d shards committed, %d running%s%s; %d %s tokens this run, "
            "%.0f tokens/s, ETA %s",
            self.done,
            self.total,
            len(self.running) if active is None else active,
            f" ({shards})" if shards else "",
            f", {queued} queued" if queued is not None else "",
            self.tokens + snap["student_tokens_in_flight"],
            self.unit,
            snap["tokens_per_second"],
            _duration(snap["eta_seconds"]),
        )

    def shard_done(self, manifest: dict[str, Any]) -> None:
        self.done += 1
        self.this_run += 1
        self.tokens += work_tokens(manifest)
        name = manifest.get("file", "").rsplit(".parquet", 1)[0]
        self.running.pop(name, None)
        snap = self.publish()
        self._last_line = time.monotonic()
        log.info(
            "shard %s committed (%d skipped records): %d/%d shards, %d %s tokens, "
            "%.0f tokens/s, ETA %s",
            manifest.get("file"),
            len(manifest.get("skipped", [])),
            self.done,
            self.total,
            self.tokens,
            self.unit,
            snap["tokens_per_second"],
            _duration(snap["eta_seconds"] if self.done < self.total else 0.0),
        )


HEARTBEAT_SECONDS = 30.0  # a run progress line at most this often while shards run


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown yet"
    s = round(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


LOGS_DIR = "logs"
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MAX_SKIPS_LOGGED = 1000
shard_logger = logging.getLogger("pipeline.shard")
shard_logger.setLevel(logging.INFO)  # the per-shard log always has its own lines


def shard_log_url(cfg: JobConfig, name: str) -> str:
    """``<output>/logs/<shard name>.log``: one shard's processing story."""
    return xio.join(cfg.output.path, LOGS_DIR, f"{name}.log")


LOG_FLUSH_SECONDS = 30.0  # a running shard's log reaches storage at least this often


def process_logged(
    step: Any,
    url: str,
    context: dict[str, Any] | None = None,
    attempt: int = 1,
    on_batch: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``step.process_shard(url)`` and keep its story in `shard_log_url`.

    The log holds, for every attempt in order (a rerun and a retry append; nothing is
    erased): the start (host, pid, ``context`` such as the Ray node and actor), every
    batch (student tokens, share of the text, rate, the shard's ETA), what the
    ``pipeline.*`` loggers said meanwhile, the committed counts, every skipped record
    with its kind, line and reason, and on failure the traceback (the console gets
    one line). The driver adds its own lines (a lost worker, a retry). The log is
    published atomically at the start, at most every `LOG_FLUSH_SECONDS` while
    batches finish, and at the end, so an attempt whose process is killed leaves what
    it did; a failure to write it is only a warning, so it never undoes a commit.
    ``on_batch(shard name, progress dict)`` is called after every batch.
    """
    cfg: JobConfig = step.cfg
    name = output_name(url)
    log_url = shard_log_url(cfg, name)
    so = cfg.output.storage_options
    try:
        before = xio.read_bytes(log_url, so) if xio.exists(log_url, so) else b""
    except xio.StorageError as err:
        shard_logger.warning("shard %s: earlier log not read: %s", name, err)
        before = b""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    handler.addFilter(RedactingFilter())
    plog = logging.getLogger("pipeline")
    plog.addHandler(handler)
    slog = shard_logger
    t0 = time.perf_counter()
    flushed = [time.monotonic()]

    def publish() -> None:
        flushed[0] = time.monotonic()
        try:
            xio.write_bytes_atomic(log_url, before + buf.getvalue().encode(), so)
        except Exception as err:
            slog.warning("shard %s: log not written: %s", name, err)

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
        publish()

        def batch(state: Any) -> None:
            eta = state.eta_seconds()
            slog.info(
                "shard %s: batch %d scored: %d %s tokens, %d sequences, %.0f%% of the "
                "text (%d/%d records), %.0f tokens/s, shard ETA %s",
                name,
                state.batches,
                state.student_tokens,
                "student" if "student" in cfg.scoring.targets else "teacher",
                state.sequences,
                100 * state.fraction,
                state.records,
                state.records_total,
                state.student_tokens / state.seconds if state.seconds > 0 else 0.0,
                _duration(eta),
            )
            if time.monotonic() - flushed[0] >= LOG_FLUSH_SECONDS:
                publish()
            if on_batch is not None:
                on_batch(name, {**vars(state), "fraction": state.fraction})

        m = step.process_shard(url, progress=batch)
        skipped = m.get("skipped", [])
        for s in skipped[:_MAX_SKIPS_LOGGED]:
            doc = f" (doc {s['doc_id']})" if s.get("doc_id") is not None else ""
            line = f" (line {s['line']})" if s.get("line") is not None else ""
            slog.info(
                "shard %s: skipped record %s%s%s: %s",
                name,
                s.get("index"),
                line,
                doc,
                s.get("reason"),
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
    except BaseException as err:
        # one line for the console; the traceback goes to the shard log only
        slog.warning(
            "shard %s: FAILED (attempt %d) after %.1fs: %s: %s (traceback in %s)",
            name,
            attempt,
            time.perf_counter() - t0,
            type(err).__name__,
            redact(str(err).splitlines()[0] if str(err) else ""),
            log_url,
        )
        buf.write(redact(traceback.format_exc()))
        raise
    finally:
        plog.removeHandler(handler)
        publish()


def append_shard_log(cfg: JobConfig, name: str, text: str, level: str = "WARNING") -> None:
    """Add driver-side lines (e.g. "worker lost, attempt 2") to a shard's log."""
    url = shard_log_url(cfg, name)
    so = cfg.output.storage_options
    try:
        old = xio.read_bytes(url, so) if xio.exists(url, so) else b""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = "".join(f"{stamp} {level} driver: {line}\n" for line in text.splitlines())
        xio.write_bytes_atomic(url, old + lines.encode(), so)
    except xio.StorageError as err:
        log.warning("shard %s: log not written: %s", name, err)


def run_local(
    cfg: JobConfig,
    todo: list[str],
    on_done: Callable[[dict[str, Any]], None],
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """In-process executor: one step, shards in order; the step has the CPUs this
    process may use (`available_cpus`)."""
    from pipeline.generate import GenerateStep

    step = GenerateStep(cfg, cpus=available_cpus())
    try:
        step.setup()
        out = []
        for url in todo:
            m = process_logged(
                step,
                url,
                {"executor": "local"},
                on_batch=progress.shard_progress if progress is not None else None,
            )
            on_done(m)
            out.append(m)
        return out
    finally:
        step.close()  # its prepare worker processes, if any


def available_cpus() -> int:
    """The CPUs this process may use: its CPU affinity (``os.cpu_count()`` where that
    is unknown), at most a cgroup v2 CPU quota (a container's CPU limit, which the
    affinity does not show), rounded down; at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, int(quota) // int(period))
    except (OSError, ValueError):
        pass
    return max(1, n)


def finalize(
    cfg: JobConfig, p: Plan, manifests: dict[str, dict[str, Any]], elapsed: float
) -> dict[str, Any]:
    """Write the run index (after every shard committed) and stats.json.

    stats.json keeps the record of every invocation that committed shards (``runs``:
    when, how long, tokens/s, where each shard ran); a rerun with nothing to do writes
    nothing and returns the recorded stats with ``shards_this_run`` 0."""
    so = cfg.output.storage_options
    stats_url = xio.join(cfg.output.path, "stats.json")
    index_url = xio.join(cfg.output.path, INDEX_NAME)
    old: dict[str, Any] = {}
    if xio.exists(stats_url, so):
        try:
            old = xio.read_json(stats_url, so)
        except (xio.StorageError, ValueError) as err:
            log.warning("stats.json not read (%s); writing a new one", err)
        if old.get("config_hash") != cfg.target_hash():  # another run's (--overwrite)
            old = {}
    new = [m for s, m in manifests.items() if s in p.todo]
    if not new and old and xio.exists(index_url, so):
        return {**old, "shards_this_run": 0, "seconds_this_run": round(elapsed, 2)}
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
                "student_tokens": m.get("student_tokens", 0),
                **{str(k): m[k] for k in ("teacher_tokens", "text_bytes") if k in m},
                "bytes": m["bytes"],
                "sha256": m["sha256"],
                "skipped": len(m["skipped"]),
            }
        )
    totals = {
        k: sum(x[k] for x in shards)
        for k in ("sequences", "documents", "student_tokens", "bytes", "skipped")
    }
    for k in ("teacher_tokens", "text_bytes"):  # runs with the bytes or teacher kind
        if all(k in x for x in shards):
            totals[k] = sum(x[k] for x in shards)
    first = manifests[p.shards[0]]
    index = {
        "schema_version": first["schema_version"],
        "config_hash": cfg.target_hash(),
        "provenance": {k: first[k] for k in first if k not in PER_SHARD_KEYS},
        "shards": shards,
        "totals": totals,
    }
    xio.write_json_atomic(index_url, index, so)
    new_tokens = sum(work_tokens(m) for m in new)
    rate = round(new_tokens / elapsed, 1) if elapsed > 0 and new else None
    nodes = {p.names[s]: m["ray_node_id"] for s, m in manifests.items() if "ray_node_id" in m}
    runs = list(old.get("runs", []))
    if new:
        runs.append(
            {
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(elapsed, 2),
                "shards": len(new),
                "student_tokens": new_tokens,
                "student_tokens_per_second": rate,
                **({"ray_node_of_shard": nodes} if nodes else {}),
            }
        )
    stats = {
        **totals,
        "config_hash": cfg.target_hash(),
        "shards": len(shards),
        "shards_this_run": len(new),
        "seconds_this_run": round(elapsed, 2),
        "student_tokens_per_second": rate,
        "bytes_per_student_token": round(totals["bytes"] / max(1, totals["student_tokens"]), 2),
        "mean_topk_mass": round(
            sum(m.get("mean_topk_mass", 0.0) * m.get("target_rows", 0) for m in manifests.values())
            / max(1, sum(m.get("target_rows", 0) for m in manifests.values())),
            4,
        ),
        **(
            {
                "bytes_per_teacher_token": round(
                    totals["bytes"] / max(1, totals["teacher_tokens"]), 2
                )
            }
            if "teacher_tokens" in totals
            else {}
        ),
        "skipped_by_reason": skipped_by_kind(manifests.values()),
        "runs": runs,
    }
    placed = {**old.get("ray_node_of_shard", {}), **nodes}
    if placed:  # where each shard ran (Ray executor), over every run
        stats["ray_node_of_shard"] = placed
    xio.write_json_atomic(stats_url, stats, so)
    return stats
