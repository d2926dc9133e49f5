"""Offline teacher targets for cross-tokenizer distillation.

`run` (in `pipeline.job`) is the library entry point; the package imports nothing heavy
until it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.job import RunResult


def run(cfg: Any, executor: str = "ray", overwrite: bool = False) -> RunResult:
    """Run the generate job over a `pipeline.config.JobConfig`; see `pipeline.job.run`."""
    from pipeline.job import run as _run

    return _run(cfg, executor=executor, overwrite=overwrite)  # type: ignore[arg-type]
