"""The Ray executor: a thin adapter that runs `GenerateStep` inside actors.

One actor per GPU (``num_gpus``, optional ``accelerator_type``), or CPU actors when the
cluster has no GPU. Each actor takes whole input shards from a driver-side queue; a
shard is done when its manifest is committed (the actor returns only the manifest).
When an actor or its node dies, its shard goes back to the queue (up to
``ray.max_retries`` times) and a replacement actor is started if resources allow.
Application errors in a shard (bugs, not bad records) are not retried.
"""

from __future__ import annotations

import contextlib
import logging
import os
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

from pipeline.config import JobConfig

log = logging.getLogger(__name__)

INFRA_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)


class ShardFailed(RuntimeError):
    pass


@ray.remote(max_restarts=0)
class ShardWorker:
    def __init__(self, cfg: dict[str, Any], threads: int) -> None:
        import torch

        from pipeline.generate import GenerateStep

        torch.set_num_threads(max(1, threads))
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        self.step = GenerateStep(JobConfig.model_validate(cfg))

    def process(self, url: str) -> dict[str, Any]:
        log = logging.getLogger("shard")
        log.info("shard %s: start (pid %d)", url, os.getpid())
        m = self.step.process_shard(
            url, progress=lambda t, n: log.info("shard %s: %d tokens, %d chunks", url, t, n)
        )
        log.info("shard %s: committed %d sequences", url, m["sequences"])
        return {**m, "ray_node_id": ray.get_runtime_context().get_node_id()}


def ensure_ray(cfg: JobConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True)


def _actor_options(cfg: JobConfig) -> tuple[dict[str, Any], int]:
    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    if gpus >= 1 and cfg.ray.num_gpus_per_actor > 0:
        opts: dict[str, Any] = {
            "num_gpus": cfg.ray.num_gpus_per_actor,
            "num_cpus": cfg.ray.num_cpus_per_actor,
        }
        if cfg.ray.accelerator_type:
            opts["accelerator_type"] = cfg.ray.accelerator_type
        capacity = int(gpus // cfg.ray.num_gpus_per_actor)
    else:
        opts = {"num_cpus": cfg.ray.num_cpus_per_actor}
        capacity = int(float(res.get("CPU", 1)) // max(cfg.ray.num_cpus_per_actor, 1e-9))
    return opts, max(1, capacity)


def run_ray(
    cfg: JobConfig, todo: list[str], on_done: Callable[[dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """Process ``todo`` shards on actors; returns the manifests of committed shards and
    raises `ShardFailed` naming every shard that could not be committed."""
    if not todo:
        return []
    ensure_ray(cfg)
    opts, capacity = _actor_options(cfg)
    n_actors = min(len(todo), cfg.ray.num_actors or capacity)
    threads = max(1, int(opts.get("num_cpus", 1)))
    cfg_dict = cfg.model_dump(mode="json")
    log.info("starting %d actors with %s for %d shards", n_actors, opts, len(todo))

    def new_actor() -> Any:
        return ShardWorker.options(**opts).remote(cfg_dict, threads)  # type: ignore[attr-defined]

    actors = [new_actor() for _ in range(n_actors)]
    queue = list(todo)
    attempts: dict[str, int] = {}
    running: dict[Any, tuple[Any, str]] = {}  # future -> (actor, shard)
    done: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    idle = list(actors)
    while queue or running:
        while queue and idle:
            actor = idle.pop()
            url = queue.pop(0)
            running[actor.process.remote(url)] = (actor, url)
        ready, _ = ray.wait(list(running), num_returns=1)
        fut = ready[0]
        actor, url = running.pop(fut)
        try:
            m = ray.get(fut)
        except INFRA_ERRORS as err:
            attempts[url] = attempts.get(url, 0) + 1
            log.warning(
                "shard %s: worker lost (%s); attempt %d/%d",
                url,
                type(err).__name__,
                attempts[url],
                cfg.ray.max_retries,
            )
            if attempts[url] <= cfg.ray.max_retries:
                queue.append(url)
            else:
                failed[url] = f"worker lost {attempts[url]} times: {err}"
            with contextlib.suppress(Exception):
                ray.kill(actor)
            idle.append(new_actor())
            continue
        except RayTaskError as err:
            failed[url] = str(err.cause if hasattr(err, "cause") else err).splitlines()[0]
            log.error("shard %s failed: %s", url, failed[url])
            idle.append(actor)
            continue
        done.append(m)
        on_done(m)
        idle.append(actor)
    for a in idle:
        with contextlib.suppress(Exception):
            ray.kill(a)
    if failed:
        raise ShardFailed(
            "shards not committed:\n" + "\n".join(f"  {u}: {r}" for u, r in failed.items())
        )
    return done
