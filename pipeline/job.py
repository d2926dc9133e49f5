"""The library entry point: one call runs the generate job over a config.

    from pipeline import run
    from pipeline.config import load_config

    result = run(load_config("my.yaml", ["scoring.top_k=32"]), executor="ray")
    result.stats["student_tokens"], result.manifests

`run` plans (validates inputs and output, guards resume; `ConfigError` before any model
is loaded), executes the shards still to do (in-process, or on Ray actors through
`pipeline.ray_executor`), then writes the run index and stats (`finalize`). The CLI
(`jobs.generate`), the tests and the benchmarks call it; the CLI adds only argument
parsing, logging set-up and the printed summary.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import JobConfig
from pipeline.executors import Plan, Progress, finalize, plan, run_local

log = logging.getLogger(__name__)

Executor = Literal["local", "ray"]


@dataclass
class RunResult:
    plan: Plan
    manifests: dict[str, dict[str, Any]]  # input URL -> manifest, every shard of the run
    stats: dict[str, Any]  # what stats.json holds (``shards_this_run`` 0 for a no-op rerun)


def run(cfg: JobConfig, executor: Executor = "ray", overwrite: bool = False) -> RunResult:
    """Run the generate job: plan, score the shards not yet committed, finalize.

    Raises `pipeline.config.ConfigError` for a bad config (before any model loads, or once
    the cluster is seen for ``ray.accelerator_type``), and the executor's error when a
    shard could not be committed (`pipeline.ray_executor.ShardFailed` on Ray, the
    shard's own error in-process); nothing is finalized then.
    """
    p = plan(cfg, overwrite=overwrite)
    log.info(
        "%d input shards, %d already committed, %d to do -> %s",
        len(p.shards),
        len(p.done),
        len(p.todo),
        cfg.output.path,
    )
    unit = "student" if "student" in cfg.scoring.targets else "teacher"
    progress = Progress(len(p.shards), len(p.done), unit=unit)
    t0 = time.perf_counter()
    if executor == "local":
        new = run_local(cfg, p.todo, progress.shard_done, progress=progress)
    elif executor == "ray":
        from pipeline.ray_executor import run_ray

        new = run_ray(cfg, p.todo, progress.shard_done, progress=progress)
    else:
        raise ValueError(f"executor must be 'local' or 'ray', not {executor!r}")
    manifests = {**p.done, **{m["input"]: m for m in new}}
    stats = finalize(cfg, p, manifests, time.perf_counter() - t0)
    return RunResult(p, manifests, stats)
