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
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayTaskError

from pipeline.config import ConfigError, JobConfig
from pipeline.errors import RETRYABLE, classify
from pipeline.executors import (
    HEARTBEAT_SECONDS,
    Progress,
    append_shard_log,
    process_logged,
    register_metrics,
)
from pipeline.shards import output_name

log = logging.getLogger(__name__)

ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's custom resource for `accelerator_type`
# Ray drops a gauge not set for two metric report intervals (10 s each by default), so
# the driver re-publishes its progress this often, commits or not.
PUBLISH_SECONDS = 5.0
# ray.num_cpus_per_actor=auto on GPU actors: at most this many CPUs each
AUTO_GPU_ACTOR_CPUS = 8
# how long the driver waits for the actors to stop their prepare workers at the end
CLOSE_SECONDS = 15.0
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
    (the driver sends one shard at a time), the other answers `progress` meanwhile.
    ``threads``: torch's threads; ``cpus``: the actor's ``num_cpus`` (the step's
    ``teacher.prepare_workers=auto`` follows it). The driver calls `close` before it
    kills the actor."""

    def __init__(
        self,
        cfg: dict[str, Any],
        threads: int,
        name: str = "xtok-worker",
        cpus: float | None = None,
    ) -> None:
        import torch

        from pipeline import redact
        from pipeline.generate import GenerateStep

        torch.set_num_threads(max(1, threads))
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        redact.remember(cfg)
        redact.install()
        self.name = name
        self.current: tuple[str, dict[str, Any]] | None = None  # (shard, progress)
        self.step = GenerateStep(JobConfig.model_validate(cfg), cpus=cpus)
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

    def close(self) -> None:
        """Stop the step's prepare worker processes (the driver calls it before it kills
        the actor: `ray.kill` runs no atexit handler, and the workers would otherwise
        depend on Ray reaping the actor's child processes)."""
        self.step.close()


def _close_and_kill(actors: list[Any], started: list[Any]) -> None:
    """Kill ``actors``, after those of them ``started`` (idle, no shard) have stopped
    their prepare workers (`ShardWorker.close`, waited for up to `CLOSE_SECONDS`; an
    actor still starting has none yet)."""
    refs = []
    for a in started:
        with contextlib.suppress(Exception):
            refs.append(a.close.remote())
    if refs:
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs), timeout=CLOSE_SECONDS)
    for a in actors:
        with contextlib.suppress(Exception):
            ray.kill(a)


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


def connect(address: str | None = None) -> bool:
    """Join the Ray cluster at ``address`` (default: ``RAY_ADDRESS``), else start a local
    one; nothing when Ray is already initialized. Returns whether this call started it
    (the one Ray start-up of the project: the job and the audit use it)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    return True


def map_in_order(
    fn: Callable[..., Any],
    items: list[tuple[str, tuple[Any, ...]]],
    on_result: Callable[[Any], None],
    address: str | None = None,
    num_cpus: float = 1,
    max_retries: int = 3,
) -> None:
    """Run ``fn(*args)`` as one Ray task per ``(name, args)`` item (``num_cpus`` each,
    retried ``max_retries`` times if its worker dies) and hand each result to
    ``on_result`` in item order as it becomes available (a handed-on result is dropped
    so Ray can free it). Joins or starts Ray with `connect`, and shuts down a Ray it
    started."""
    started = connect(address)
    try:
        task = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
        futures = [task.options(name=name).remote(*args) for name, args in items]
        futures.reverse()
        while futures:
            on_result(ray.get(futures.pop()))
    finally:
        if started:
            ray.shutdown()


def _actor_options(cfg: JobConfig) -> tuple[dict[str, Any], int]:
    """Actor resources and how many such actors the live nodes can hold at once
    (`actor_resources` of the live nodes).

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
    return actor_resources(nodes, cfg)


def actor_resources(nodes: list[dict[str, Any]], cfg: JobConfig) -> tuple[dict[str, Any], int]:
    """The actor options (``num_gpus``, ``num_cpus``, ``accelerator_type``) and how many
    such actors ``nodes`` hold at once; ``nodes``: the Ray resources of the live nodes
    (``{"CPU": 16.0, "GPU": 2.0, ...}``, those of ``ray.accelerator_type`` only).

    GPU actors when ``ray.num_gpus_per_actor`` > 0 and the nodes have that many GPUs,
    else CPU actors. ``ray.num_cpus_per_actor=auto``: 1 on CPU actors; on GPU actors
    ``num_gpus_per_actor`` x the CPUs per GPU of the GPU node with the fewest, rounded
    down, between 1 and `AUTO_GPU_ACTOR_CPUS` (so that every GPU node fills its GPUs).
    """
    per_gpu = cfg.ray.num_gpus_per_actor
    gpu = per_gpu > 0 and sum(r.get("GPU", 0) for r in nodes) >= per_gpu
    cpus = cfg.ray.num_cpus_per_actor
    if cpus == "auto":
        shares = [r.get("CPU", 0) * per_gpu / r["GPU"] for r in nodes if r.get("GPU", 0) >= per_gpu]
        if gpu and shares:
            cpus = float(max(1, min(AUTO_GPU_ACTOR_CPUS, math.floor(min(shares)))))
        else:
            cpus = 1.0
    per_cpu = max(cpus, 1e-9)
    if gpu:
        opts: dict[str, Any] = {"num_gpus": per_gpu, "num_cpus": cpus}
        capacity = sum(
            min(int(r.get("GPU", 0) // per_gpu), int(r.get("CPU", 0) // per_cpu)) for r in nodes
        )
    else:
        opts = {"num_cpus": cpus}
        capacity = sum(int(r.get("CPU", 0) // per_cpu) for r in nodes)
    if cfg.ray.accelerator_type:
        opts["accelerator_type"] = cfg.ray.accelerator_type
    return opts, capacity


@dataclass
class Outcome:
    """What a transition of `Scheduler` decided, for the driver to log and act on."""

    shard: str
    attempt: int  # attempts used so far
    requeued: bool  # back in the queue (after ``delay`` seconds)
    delay: float = 0.0
    failed: str | None = None  # the shard's final failure reason


@dataclass
class Scheduler:
    """The Ray executor's bookkeeping, with no Ray in it (so each transition is testable
    alone): which shards are queued, running (on which actor, under which task future),
    committed or failed, which actors are idle or still starting, and how many attempts
    each shard used. Actors and futures are opaque handles here.

    A shard goes queued -> running -> committed; a lost worker or a retryable task
    error puts it back in the queue (after ``storage_retry_seconds x attempt`` for a
    task error, at once for a lost worker) until it has used ``max_retries`` retries,
    then it fails; any other task error fails it at once. An actor that fails to start
    is replaced up to ``max_retries`` times in all. The run stalls (and every queued
    shard fails) when shards are queued but no actor is idle, running or starting, or
    when none has ever started by ``deadline``.
    """

    queue: list[str]
    max_retries: int
    storage_retry_seconds: float
    deadline: float  # monotonic time by which some actor must have started
    node_wait_seconds: float = 0.0  # what the deadline allowed (for the message)
    idle: list[Any] = field(default_factory=list)  # actors without a shard
    starting: dict[Any, Any] = field(default_factory=dict)  # ready future -> actor
    running: dict[Any, tuple[Any, str]] = field(default_factory=dict)  # future -> (actor, shard)
    attempts: dict[str, int] = field(default_factory=dict)
    not_before: dict[str, float] = field(default_factory=dict)  # retry no earlier than
    done: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    start_failures: list[str] = field(default_factory=list)
    started: bool = False  # some actor has started (or was placed within capacity)

    @property
    def active(self) -> bool:
        return bool(self.queue or self.running)

    def stall_reason(self, now: float, what: str) -> str | None:
        """Why queued shards can never run (``what`` names the actor resources), or None."""
        if not self.queue or self.idle or self.running:
            return None
        if self.starting and (self.started or now <= self.deadline):
            return None
        if self.start_failures:
            return f"no actor could start: {self.start_failures[-1]}"
        return (
            f"no actor started within ray.node_wait_seconds={self.node_wait_seconds:.0f}s: no "
            f"node has room for an actor with {what} (or starting one takes longer: raise "
            "ray.node_wait_seconds)"
        )

    def fail_queued(self, reason: str) -> None:
        for url in self.queue:
            self.failed[url] = reason
        self.queue.clear()

    def assign(self, now: float) -> list[tuple[Any, str, int]]:
        """(actor, shard, attempt number) for each idle actor and each shard that is due;
        the caller submits the task and reports its future with `submitted`."""
        out = []
        while self.idle:
            due = [u for u in self.queue if self.not_before.get(u, 0.0) <= now]
            if not due:
                break
            url = due[0]
            self.queue.remove(url)
            out.append((self.idle.pop(), url, self.attempts.get(url, 0) + 1))
        return out

    def submitted(self, fut: Any, actor: Any, url: str) -> None:
        self.running[fut] = (actor, url)

    def waiting(self) -> list[Any]:
        """The futures worth waiting on: running tasks, and starting actors while
        shards are queued."""
        return list(self.running) + (list(self.starting) if self.queue else [])

    def next_wake(self) -> float:
        """When the earliest queued shard is due (nothing to wait on meanwhile)."""
        return min(self.not_before.get(u, 0.0) for u in self.queue)

    def add_starting(self, fut: Any, actor: Any) -> None:
        self.starting[fut] = actor

    def actor_started(self, fut: Any) -> Any:
        actor = self.starting.pop(fut)
        self.started = True
        self.idle.append(actor)
        return actor

    def actor_start_failed(self, fut: Any, reason: str) -> tuple[Any, bool]:
        """(the actor, whether to start a replacement)."""
        actor = self.starting.pop(fut)
        self.start_failures.append(reason)
        return actor, len(self.start_failures) <= self.max_retries

    def committed(self, fut: Any, manifest: dict[str, Any]) -> Any:
        actor, _ = self.running.pop(fut)
        self.done.append(manifest)
        self.idle.append(actor)
        return actor

    def task_failed(self, fut: Any, reason: str, retryable: bool, now: float) -> Outcome:
        """The task raised; its actor lives on and is idle again."""
        actor, url = self.running.pop(fut)
        self.idle.append(actor)
        if not retryable:
            self.failed[url] = reason
            return Outcome(url, self.attempts.get(url, 0), False, failed=reason)
        n = self.attempts[url] = self.attempts.get(url, 0) + 1
        if n <= self.max_retries:
            delay = self.storage_retry_seconds * n
            self.not_before[url] = now + delay
            self.queue.append(url)
            return Outcome(url, n, True, delay)
        self.failed[url] = f"storage failed {n} times: {reason}"
        return Outcome(url, n, False, failed=self.failed[url])

    def worker_lost(self, fut: Any, why: str) -> tuple[Any, Outcome]:
        """The actor (or its node) died holding the shard: (the dead actor, outcome);
        the caller starts a replacement."""
        actor, url = self.running.pop(fut)
        n = self.attempts[url] = self.attempts.get(url, 0) + 1
        if n <= self.max_retries:
            self.queue.append(url)
            return actor, Outcome(url, n, True)
        self.failed[url] = f"worker lost {n} times: {why}"
        return actor, Outcome(url, n, False, failed=self.failed[url])

    def leftover_actors(self) -> list[Any]:
        return [*self.idle, *self.starting.values()]


def run_ray(
    cfg: JobConfig,
    todo: list[str],
    on_done: Callable[[dict[str, Any]], None],
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Process ``todo`` shards on actors; returns the manifests of committed shards (each
    with the ``ray_node_id``, ``actor`` and ``attempt`` that committed it) and raises
    `ShardFailed` naming every shard that could not be committed.

    The bookkeeping is a `Scheduler`; this loop only talks to Ray (submit, wait, get,
    kill) and logs. ``progress``, when given, is published at the start and every
    `PUBLISH_SECONDS`, so the dashboard metrics show the run before its first shard
    commits and stay fresh.
    """
    if not todo:
        return []
    connect(cfg.ray.address)
    opts, capacity = _actor_options(cfg)
    n_actors = min(len(todo), cfg.ray.num_actors or max(1, capacity))
    threads = max(1, int(opts.get("num_cpus", 1)))
    cfg_dict = cfg.model_dump(mode="json")

    def new_actor() -> Any:
        name = f"xtok-worker-{next(_actor_numbers)}"
        return ShardWorker.options(name=name, **opts).remote(  # type: ignore[attr-defined]
            cfg_dict, threads, name, opts["num_cpus"]
        )

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
    sched = Scheduler(
        queue=list(todo),
        max_retries=cfg.ray.max_retries,
        storage_retry_seconds=cfg.ray.storage_retry_seconds,
        deadline=time.monotonic() + cfg.ray.node_wait_seconds,
        node_wait_seconds=cfg.ray.node_wait_seconds,
    )

    def start_actor() -> None:
        actor = new_actor()
        sched.add_starting(actor.__ray_ready__.remote(), actor)

    # actors the live nodes have room for now will start: shards may wait on them (as
    # they go out at once); any others take work only once they have started
    sched.idle = [new_actor() for _ in range(min(n_actors, capacity))]
    sched.started = bool(sched.idle)  # a pool that never starts fails at the deadline
    for _ in range(n_actors - len(sched.idle)):
        start_actor()
    log.info("starting %d actors with %s for %d shards", n_actors, opts, len(todo))
    if progress is not None:
        progress.publish()
    last_line = time.monotonic()
    while sched.active:
        why = sched.stall_reason(time.monotonic(), str(opts))
        if why is not None:
            sched.fail_queued(why)
            log.error("%s", why)
            break
        for actor, url, attempt in sched.assign(time.monotonic()):
            fut = actor.process.options(name=f"xtok-shard-{output_name(url)}").remote(url, attempt)
            sched.submitted(fut, actor, url)
        waiting = sched.waiting()
        if not waiting:  # only shards waiting to be retried, and idle actors
            time.sleep(min(PUBLISH_SECONDS, max(0.0, sched.next_wake() - time.monotonic())))
            continue
        ready, _ = ray.wait(waiting, num_returns=1, timeout=PUBLISH_SECONDS)
        if not ready:
            if progress is not None:
                progress.publish()
            if time.monotonic() - last_line >= HEARTBEAT_SECONDS:
                last_line = time.monotonic()
                if progress is not None:
                    _poll_progress(progress, [a for a, _ in sched.running.values()])
                    progress.heartbeat(
                        force=True, queued=len(sched.queue), active=len(sched.running)
                    )
                log.info(
                    "%d shards running, %d queued, %d committed this run%s",
                    len(sched.running),
                    len(sched.queue),
                    len(sched.done),
                    f"; {len(sched.starting)} actors waiting to start" if sched.starting else "",
                )
            continue
        fut = ready[0]
        if fut in sched.starting:
            try:
                ray.get(fut)
            except Exception as err:
                if not isinstance(err, RayTaskError) and classify(err) != RETRYABLE:
                    raise  # neither the actor's constructor nor a lost worker: Ray itself
                reason = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
                actor, replace = sched.actor_start_failed(fut, reason)
                with contextlib.suppress(Exception):
                    ray.kill(actor)
                if replace:
                    log.warning(
                        "an actor failed to start (%s); starting another (%d/%d)",
                        reason,
                        len(sched.start_failures),
                        cfg.ray.max_retries,
                    )
                    start_actor()
                else:
                    log.error(
                        "an actor failed to start (%s); %d failures, no more replacements",
                        reason,
                        len(sched.start_failures),
                    )
                continue
            sched.actor_started(fut)
            continue
        url = sched.running[fut][1]
        name = output_name(url)
        try:
            m = ray.get(fut)
        except RayTaskError as err:  # the task raised (err.cause); its actor lives on
            cause = getattr(err, "cause", None)
            reason = str(cause if cause is not None else err).splitlines()[0]
            out = sched.task_failed(fut, reason, classify(err) == RETRYABLE, time.monotonic())
            if out.requeued:  # e.g. storage still failing after the client's own retries
                log.warning(
                    "shard %s: storage error (%s); attempt %d/%d in %.0fs",
                    url,
                    reason,
                    out.attempt,
                    cfg.ray.max_retries,
                    out.delay,
                )
                append_shard_log(
                    cfg,
                    name,
                    f"shard {name}: storage error after the client's retries ({reason}); "
                    f"attempt {out.attempt}/{cfg.ray.max_retries} of the retries in "
                    f"{out.delay:.0f}s",
                )
            else:
                log.error("shard %s failed: %s", url, out.failed)
                append_shard_log(cfg, name, f"shard failed: {out.failed}", "ERROR")
            continue
        except Exception as err:  # Ray's own error: the actor or its node is gone
            if classify(err) != RETRYABLE:
                raise
            if progress is not None:
                progress.running.pop(name, None)
            actor, out = sched.worker_lost(fut, str(err))
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            line = (
                f"worker lost ({type(err).__name__}); attempt {out.attempt}/"
                f"{cfg.ray.max_retries}: {first}"
            )
            log.warning("shard %s: %s", url, line)
            if out.requeued:
                append_shard_log(cfg, name, f"shard {name}: {line}; requeued")
            else:
                append_shard_log(cfg, name, f"shard failed: {out.failed}", "ERROR")
            with contextlib.suppress(Exception):
                ray.kill(actor)
            start_actor()
            continue
        sched.committed(fut, m)
        on_done(m)
        last_line = time.monotonic()
    _close_and_kill(sched.leftover_actors(), started=list(sched.idle))
    if sched.failed:
        raise ShardFailed(
            "shards not committed (see <output>/logs/<shard>.log):\n"
            + "\n".join(f"  {u}: {r}" for u, r in sched.failed.items())
        )
    return sched.done
