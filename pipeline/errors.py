"""The failure kinds of a run: one class each, and `classify` for the executors.

- ``config``: `ConfigError`. The job exits with code 2 before any model loads.
- ``bad_record``: `BadRecordError` (e.g. `UnscorableTextError`). The record is
  skipped, counted and named with its reason in the shard manifest; the shard goes on.
- ``input``: `InputError`. The input shard is damaged or holds none of the configured
  fields: the shard fails, commits nothing and is not retried.
- ``retryable``: `RetryableError` (e.g. `StorageError`, storage still failing after the
  client's own retries) and a lost Ray worker, actor or node. The Ray executor retries
  the shard, up to ``ray.max_retries`` times.
- ``internal``: anything else (a bug). The shard fails and is not retried.

Records that cannot be parsed at all (malformed JSON, invalid UTF-8, a missing text
field) never raise: the reader returns them as `pipeline.records.Skip`. A run that
commits no document exits 1.

The classes are defined here once; the modules that raise them re-export them under
their old names (``pipeline.config.ConfigError``, ``pipeline.io.StorageError``,
``pipeline.records.InputError``, ``pipeline.tokenization.UnscorableTextError``). This
module imports nothing from the project, nor ``ray``: Ray's own errors are recognised
by their class names in ``ray.exceptions``.
"""

from __future__ import annotations

from typing import Final, Literal

Kind = Literal["config", "bad_record", "retryable", "input", "internal"]
CONFIG: Final = "config"
BAD_RECORD: Final = "bad_record"
RETRYABLE: Final = "retryable"
INPUT: Final = "input"
INTERNAL: Final = "internal"
KINDS: Final[tuple[Kind, ...]] = (CONFIG, BAD_RECORD, RETRYABLE, INPUT, INTERNAL)


class ConfigError(ValueError):
    """The job configuration is invalid; the message says which key and why.

    Fatal: the job exits with code 2 before any model is loaded."""


class BadRecordError(Exception):
    """One input record cannot be scored: it is skipped, counted and named (with its
    reason) in the shard manifest; the shard goes on."""


class RetryableError(Exception):
    """Infrastructure that may work on a later try (storage still failing after the
    client's own retries, a lost worker): the shard is retried, up to
    ``ray.max_retries`` times."""


class InputError(RuntimeError):
    """An input shard cannot be read whole (damaged, truncated) or holds none of the
    configured fields: the shard fails (it is not retried; rerunning cannot help)."""


class StorageError(RetryableError, RuntimeError):
    """Reading or writing a path failed (missing file, permissions, credentials, network).

    Raised after the storage client's own retries (for s3fs: botocore retries throttling,
    5xx answers and dropped connections, by default 5 attempts with exponential backoff;
    tune with ``storage_options={"config_kwargs": {"retries": {...}}}``). Retryable in a
    running shard; where the driver checks inputs and output before a run it becomes a
    `ConfigError`."""


class UnscorableTextError(BadRecordError, ValueError):
    """A text cannot be scored as given (e.g. it does not survive encode/decode): a bad
    record."""


# Ray's errors for a worker, actor or node that is gone (``ray.exceptions``; subclasses
# such as ``ActorDiedError`` match through ``RayActorError``)
RAY_LOST_WORKER: Final = frozenset(
    {"RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError"}
)
_RAY_MODULE = "ray.exceptions"


def _ray_lost_worker(err: BaseException) -> bool:
    return any(
        c.__module__ == _RAY_MODULE and c.__name__ in RAY_LOST_WORKER for c in type(err).__mro__
    )


def unwrap(err: BaseException) -> BaseException:
    """The exception a Ray task raised, for Ray's wrapper of it (``RayTaskError`` and the
    classes Ray derives from it keep it as ``.cause``); any other error as it is."""
    for _ in range(8):  # a task error of a task error ...
        cause = getattr(err, "cause", None)
        if not isinstance(cause, BaseException) or cause is err:
            break
        err = cause
    return err


def classify(err: BaseException) -> Kind:
    """The failure kind of ``err`` (as this module's docstring lists them), looking
    through Ray's task-error wrapper to the exception the task raised."""
    if _ray_lost_worker(err):
        return RETRYABLE
    err = unwrap(err)
    if isinstance(err, ConfigError):
        return CONFIG
    if isinstance(err, InputError):
        return INPUT
    if isinstance(err, BadRecordError):
        return BAD_RECORD
    if isinstance(err, RetryableError) or _ray_lost_worker(err):
        return RETRYABLE
    return INTERNAL
