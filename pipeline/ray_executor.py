"""The Ray executor: a thin adapter that runs `GenerateStep` inside actors.

One actor per GPU (``num_gpus``; with ``ray.accelerator_type`` only on nodes of that
type, checked in the driver before any actor starts), or CPU actors when the cluster
has no GPU. Actors are named ``xtok-worker-<i>`` and their tasks ``xtok-shard-<shard>``
(readable in ``ray list actors``/``tasks`` and the dashboard); the driver exports its
progress as Ray metrics (`RayMetrics`), and each shard writes
``<output>/logs/<shard>.log``. Each actor takes whole input shards from a driver-side queue; a
shard is done when its manifest is committed (the actor returns only the manifest).
Shards go at once to the actors the live nodes have room for; any other actor (beyond
that capacity with ``ray.num_actors``, or a replacement waiting for a node an autoscaler
has yet to add) takes work only once it has started (`__ray_ready__`), and never holds a
shard while it waits.
When an actor or its node dies, its shard goes back to the queue (up to
``ray.max_retries`` times) and a replacement actor is started if resources allow. A
shard whose storage still fails after the client's own retries (a `StorageError`: an
object store out for longer than botocore waits) goes back too, after
``ray.storage_retry_seconds`` times its attempt number (up to ``ray.max_retries`` times).
An actor that fails to start is replaced (up to ``ray.max_retries`` times in all); when
none can start, or none has started after ``ray.node_wait_seconds`` (no node has room
for one), the run fails with the reason. Application errors in a shard
(bugs, not bad records) are not retried.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)

from pipeline.config import ConfigError, JobConfig
from pipeline.executors import (
    HEARTBEAT_SECONDS,
    Progress,
    append_shard_log,
    process_logged,
    register_metrics,
)
from pipeline.io import StorageError
from pipeline.shards import output_name

log = logging.getLogger(__name__)

INFRA_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)
ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's custom resource for `accelerator_type`
# Ray drops a gauge not set for two metric report intervals (10 s each by default), so
# the driver re-publishes its progress this often, commits or not.
PUBLISH_SECONDS = 5.0
_actor_numbers = itertools.count()  # actor names stay unique within a driver process


class ShardFailed(RuntimeError):
    pass


@functools.cache
def _metric(kind: str, name: str, description: str) -> Any:
    """One Ray metric object per name and process (created on first use)."""
    from ray.util import metrics

    return getattr(metrics, kind)(name, description)


class RayMetrics:
    """The driver's progress as Ray metrics (Prometheus, shown by the Ray dashboard and
    its Grafana panels with the ``ray_`` prefix): ``xtok_shards_total``,
    ``xtok_shards_done`` (gauges, every shard of the run incl. earlier runs),
    ``xtok_tokens_total`` (counter, student tokens committed), ``xtok_tokens_per_second``
    and ``xtok_eta_seconds`` (gauges, this run). A sink for `Progress`."""

    def __init__(self) -> None:
        self.shards_total = _metric("Gauge", "xtok_shards_total", "input shards of the run")
        self.shards_done = _metric("Gauge", "xtok_shards_done", "input shards committed")
        self.tokens = _metric("Counter", "xtok_tokens_total", "student tokens committed")
        self.rate = _metric(
            "Gauge", "xtok_tokens_per_second", "student tokens per second, this run"
        )
        self.eta = _metric("Gauge", "xtok_eta_seconds", "estimated seconds to finish the run")
        self._tokens_seen = 0

    def __call__(self, snap: dict[str, Any]) -> None:
        self.shards_total.set(snap["shards_total"])
        self.shards_done.set(snap["shards_done"])
        delta = snap["student_tokens"] - self._tokens_seen
        if delta > 0:
            self.tokens.inc(delta)
            self._tokens_seen = snap["student_tokens"]
        self.rate.set(snap["tokens_per_second"])
        if snap["eta_seconds"] is not None:
            self.eta.set(snap["eta_seconds"])

    @classmethod
    def create(cls) -> RayMetrics | None:
        """A sink when Ray is initialized in this process, else None (nothing exported)."""
        return cls() if ray.is_initialized() else None


register_metrics(RayMetrics.create)


@ray.remote(max_restarts=0, max_concurrency=2)  # type: ignore[call-overload]
class ShardWorker:
    """One `GenerateStep` per actor (``xtok-worker-<i>``); logs go to the Ray worker log
    and, per shard, to ``<output>/logs/<shard>.log``. Two threads: one runs `process`
    (the driver sends one shard at a time), the other answers `progress` meanwhile."""

    def __init__(self, cfg: dict[str, Any], threads: int, name: str = "xtok-worker") -> None:
        import torch

        from pipeline import redact
        from pipeline.generate import GenerateStep

        torch.set_num_threads(max(1, threads))
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        redact.remember(cfg)
        redact.install()
        self.name = name
        self.current: tuple[str, dict[str, Any]] | None = None  # (shard, progress)
        self.step = GenerateStep(JobConfig.model_validate(cfg))
        # live token count while a shard runs (the driver only sees whole shards)
        self.tokens = _metric(
            "Counter",
            "xtok_worker_tokens_total",
            "student tokens scored by actors, committed or not",
        )

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return self.name

    def process(self, url: str, attempt: int = 1) -> dict[str, Any]:
        node = ray.get_runtime_context().get_node_id()
        seen = [0]

        def count(shard: str, state: dict[str, Any]) -> None:
            tokens = state["student_tokens"]
            if tokens > seen[0]:
                self.tokens.inc(tokens - seen[0])
                seen[0] = tokens
            self.current = (shard, state)

        try:
            m = process_logged(
                self.step, url, {"ray node": node, "actor": self.name}, attempt, on_batch=count
            )
        finally:
            self.current = None
        return {**m, "ray_node_id": node, "actor": self.name, "attempt": attempt}

    def progress(self) -> tuple[str, dict[str, Any]] | None:
        """(shard, its latest `ShardProgress` fields) while a shard runs, else None."""
        return self.current


def _poll_progress(progress: Progress, actors: list[Any]) -> None:
    """Ask the running actors where their shards stand (`ShardWorker.progress`)."""
    refs = [a.progress.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0)
    for ref in ready:
        try:
            got = ray.get(ref)
        except Exception:  # an actor that died answers nothing; its shard is requeued
            continue
        if got is not None:
            progress.running[got[0]] = got[1]


def ensure_ray(cfg: JobConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True)


def _actor_options(cfg: JobConfig) -> tuple[dict[str, Any], int]:
    """Actor resources and how many such actors the live nodes can hold at once.

    With ``ray.accelerator_type`` only nodes carrying Ray's ``accelerator_type:<type>``
    resource count. When no live node has the type, the driver asks the autoscaler for
    one and waits up to ``ray.node_wait_seconds``, then fails with a `ConfigError`
    before any actor exists (an actor asking for it would wait forever).
    """
    acc = cfg.ray.accelerator_type
    deadline = time.monotonic() + cfg.ray.node_wait_seconds
    asked = False
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if not acc:
            break
        matching = [r for r in nodes if r.get(ACCELERATOR_PREFIX + acc, 0) > 0]
        if matching:
            nodes = matching
            if asked:  # withdraw the standing request
                with contextlib.suppress(Exception):
                    from ray.autoscaler.sdk import request_resources

                    request_resources(bundles=[])
            break
        have = sorted(
            {
                k[len(ACCELERATOR_PREFIX) :]
                for r in nodes
                for k in r
                if k.startswith(ACCELERATOR_PREFIX)
            }
        )
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"ray.accelerator_type={acc!r}: no node of the Ray cluster has this accelerator "
                f"after waiting {cfg.ray.node_wait_seconds:.0f}s (types present: "
                f"{', '.join(have) or 'none'}); choose one of those or set it to null"
            )
        if not asked:  # an autoscaler starts such a node on demand; ask for one
            log.info(
                "waiting up to %.0fs for a node with accelerator %s (present: %s)",
                cfg.ray.node_wait_seconds,
                acc,
                ", ".join(have) or "none",
            )
            with contextlib.suppress(Exception):
                from ray.autoscaler.sdk import request_resources

                request_resources(bundles=[{ACCELERATOR_PREFIX + acc: 0.001}])
            asked = True
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
    per_gpu = cfg.ray.num_gpus_per_actor
    per_cpu = max(cfg.ray.num_cpus_per_actor, 1e-9)
    if per_gpu > 0 and sum(r.get("GPU", 0) for r in nodes) >= per_gpu:
        opts: dict[str, Any] = {"num_gpus": per_gpu, "num_cpus": cfg.ray.num_cpus_per_actor}
        capacity = sum(
            min(int(r.get("GPU", 0) // per_gpu), int(r.get("CPU", 0) // per_cpu)) for r in nodes
        )
    else:
        opts = {"num_cpus": cfg.ray.num_cpus_per_actor}
        capacity = sum(int(r.get("CPU", 0) // per_cpu) for r in nodes)
    if acc:
        opts["accelerator_type"] = acc
    return opts, capacity


def run_ray(
    cfg: JobConfig,
    todo: list[str],
    on_done: Callable[[dict[str, Any]], None],
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Process ``todo`` shards on actors; returns the manifests of committed shards (each
    with the ``ray_node_id``, ``actor`` and ``attempt`` that committed it) and raises
    `ShardFailed` naming every shard that could not be committed.

    ``progress``, when given, is published at the start and every `PUBLISH_SECONDS`, so the dashboard
    metrics show the run before its first shard commits and stay fresh.
    """
    if not todo:
        return []
    ensure_ray(cfg)
    opts, capacity = _actor_options(cfg)
    n_actors = min(len(todo), cfg.ray.num_actors or max(1, capacity))
    threads = max(1, int(opts.get("num_cpus", 1)))
    cfg_dict = cfg.model_dump(mode="json")

    def new_actor() -> Any:
        name = f"xtok-worker-{next(_actor_numbers)}"
        return ShardWorker.options(name=name, **opts).remote(cfg_dict, threads, name)  # type: ignore[attr-defined]

    if capacity == 0:
        log.warning(
            "no node of the cluster has room for an actor with %s now; waiting up to "
            "ray.node_wait_seconds=%.0fs for one to start",
            opts,
            cfg.ray.node_wait_seconds,
        )
    elif cfg.ray.num_actors and cfg.ray.num_actors > capacity:
        log.warning(
            "ray.num_actors=%d but the cluster holds %d actors with %s now: the others "
            "start when resources free up or nodes join",
            cfg.ray.num_actors,
            capacity,
            opts,
        )
    starting: dict[Any, Any] = {}  # ready future -> actor not started yet

    def start_actor() -> None:
        actor = new_actor()
        starting[actor.__ray_ready__.remote()] = actor

    # actors the live nodes have room for now will start: shards may wait on them (as
    # they go out at once); any others take work only once they have started
    early = [new_actor() for _ in range(min(n_actors, capacity))]
    for _ in range(n_actors - len(early)):
        start_actor()
    log.info("starting %d actors with %s for %d shards", n_actors, opts, len(todo))
    if progress is not None:
        progress.publish()
    queue = list(todo)
    attempts: dict[str, int] = {}
    not_before: dict[str, float] = {}  # shards to retry after a storage error: when
    running: dict[Any, tuple[Any, str]] = {}  # future -> (actor, shard)
    done: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    idle: list[Any] = early  # actors without a shard (started, or within capacity)
    start_failures: list[str] = []
    started = bool(early)  # a pool that never starts fails at the deadline
    deadline = time.monotonic() + cfg.ray.node_wait_seconds
    last_line = time.monotonic()
    while queue or running:
        if (
            queue
            and not (idle or running)
            and (not starting or (not started and time.monotonic() > deadline))
        ):
            why = (
                f"no actor could start: {start_failures[-1]}"
                if start_failures
                else f"no actor started within ray.node_wait_seconds="
                f"{cfg.ray.node_wait_seconds:.0f}s: no node has room for an actor with {opts} "
                "(or starting one takes longer: raise ray.node_wait_seconds)"
            )
            for url in queue:
                failed[url] = why
            log.error("%s", why)
            break
        while idle:
            now = time.monotonic()
            due = [u for u in queue if not_before.get(u, 0.0) <= now]
            if not due:
                break
            url = due[0]
            queue.remove(url)
            actor = idle.pop()
            fut = actor.process.options(name=f"xtok-shard-{output_name(url)}").remote(
                url, attempts.get(url, 0) + 1
            )
            running[fut] = (actor, url)
        waiting = list(running) + (list(starting) if queue else [])
        if not waiting:  # only shards waiting to be retried, and idle actors
            wake = min(not_before.get(u, 0.0) for u in queue)
            time.sleep(min(PUBLISH_SECONDS, max(0.0, wake - time.monotonic())))
            continue
        ready, _ = ray.wait(waiting, num_returns=1, timeout=PUBLISH_SECONDS)
        if not ready:
            if progress is not None:
                progress.publish()
            if time.monotonic() - last_line >= HEARTBEAT_SECONDS:
                last_line = time.monotonic()
                if progress is not None:
                    _poll_progress(progress, [a for a, _ in running.values()])
                    progress.heartbeat(force=True, queued=len(queue), active=len(running))
                log.info(
                    "%d shards running, %d queued, %d committed this run%s",
                    len(running),
                    len(queue),
                    len(done),
                    f"; {len(starting)} actors waiting to start" if starting else "",
                )
            continue
        fut = ready[0]
        if fut in starting:
            actor = starting.pop(fut)
            try:
                ray.get(fut)
            except (RayTaskError, *INFRA_ERRORS) as err:
                reason = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
                start_failures.append(reason)
                with contextlib.suppress(Exception):
                    ray.kill(actor)
                if len(start_failures) <= cfg.ray.max_retries:
                    log.warning(
                        "an actor failed to start (%s); starting another (%d/%d)",
                        reason,
                        len(start_failures),
                        cfg.ray.max_retries,
                    )
                    start_actor()
                else:
                    log.error(
                        "an actor failed to start (%s); %d failures, no more replacements",
                        reason,
                        len(start_failures),
                    )
                continue
            started = True
            idle.append(actor)
            continue
        actor, url = running.pop(fut)
        try:
            m = ray.get(fut)
        except INFRA_ERRORS as err:
            attempts[url] = attempts.get(url, 0) + 1
            name = output_name(url)
            if progress is not None:
                progress.running.pop(name, None)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            line = (
                f"worker lost ({type(err).__name__}); attempt {attempts[url]}/"
                f"{cfg.ray.max_retries}: {first}"
            )
            log.warning("shard %s: %s", url, line)
            if attempts[url] <= cfg.ray.max_retries:
                queue.append(url)
                append_shard_log(cfg, name, f"shard {name}: {line}; requeued")
            else:
                failed[url] = f"worker lost {attempts[url]} times: {err}"
                append_shard_log(cfg, name, f"shard failed: {failed[url]}", "ERROR")
            with contextlib.suppress(Exception):
                ray.kill(actor)
            start_actor()
            continue
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            reason = str(cause if cause is not None else err).splitlines()[0]
            idle.append(actor)
            if isinstance(cause, StorageError):  # storage still failing after the client's
                attempts[url] = attempts.get(url, 0) + 1  # own retries: try again later
                if attempts[url] <= cfg.ray.max_retries:
                    delay = cfg.ray.storage_retry_seconds * attempts[url]
                    log.warning(
                        "shard %s: storage error (%s); attempt %d/%d in %.0fs",
                        url,
                        reason,
                        attempts[url],
                        cfg.ray.max_retries,
                        delay,
                    )
                    not_before[url] = time.monotonic() + delay
                    queue.append(url)
                    append_shard_log(
                        cfg,
                        output_name(url),
                        f"shard {output_name(url)}: storage error after the client's retries "
                        f"({reason}); attempt {attempts[url]}/{cfg.ray.max_retries} of the "
                        f"retries in {delay:.0f}s",
                    )
                    continue
                reason = f"storage failed {attempts[url]} times: {reason}"
            failed[url] = reason
            log.error("shard %s failed: %s", url, failed[url])
            append_shard_log(cfg, output_name(url), f"shard failed: {reason}", "ERROR")
            continue
        done.append(m)
        on_done(m)
        last_line = time.monotonic()
        idle.append(actor)
    for a in [*idle, *starting.values()]:
        with contextlib.suppress(Exception):
            ray.kill(a)
    if failed:
        raise ShardFailed(
            "shards not committed (see <output>/logs/<shard>.log):\n"
            + "\n".join(f"  {u}: {r}" for u, r in failed.items())
        )
    return done
