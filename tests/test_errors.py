"""The failure kinds (`pipeline.errors`): one class each, the old import paths, `classify`
(also through Ray's wrappers, without a Ray cluster), and that only a bad record is
skipped: an internal error while scoring a document fails its shard."""

from __future__ import annotations

import json

import pytest

from pipeline import errors
from pipeline.errors import (
    BAD_RECORD,
    CONFIG,
    INPUT,
    INTERNAL,
    RETRYABLE,
    BadRecordError,
    ConfigError,
    InputError,
    RetryableError,
    StorageError,
    UnscorableTextError,
    classify,
)

# ---------------------------------------------------------------------------- classes


def test_one_definition_each_under_the_old_import_paths():
    import pipeline.config
    import pipeline.io
    import pipeline.records
    import pipeline.tokenization

    assert pipeline.config.ConfigError is ConfigError
    assert pipeline.io.StorageError is StorageError
    assert pipeline.records.InputError is InputError
    assert pipeline.tokenization.UnscorableTextError is UnscorableTextError


def test_ancestry_kept_for_existing_handlers():
    from pipeline.tokenization import TokenizerError, UnscorableTokenizationError

    assert issubclass(ConfigError, ValueError)
    assert issubclass(StorageError, RetryableError) and issubclass(StorageError, RuntimeError)
    assert issubclass(InputError, RuntimeError)
    assert issubclass(UnscorableTextError, BadRecordError)
    assert issubclass(UnscorableTextError, ValueError)
    # a text the tokenizer pair cannot encode for scoring: a bad record, still a
    # TokenizerError for the callers that catch that
    assert issubclass(UnscorableTokenizationError, TokenizerError)
    assert issubclass(UnscorableTokenizationError, UnscorableTextError)
    assert classify(UnscorableTokenizationError("x")) == BAD_RECORD
    assert classify(TokenizerError("x")) == INTERNAL  # at run time: not a record's fault


def test_errors_module_imports_nothing_from_the_project_nor_ray():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(errors.__file__).read_text())
    imported = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in (n.names if isinstance(n, ast.Import) else [n])
    }
    assert imported <= {"__future__", "typing"}, imported


# ---------------------------------------------------------------------------- classify


@pytest.mark.parametrize(
    ("err", "kind"),
    [
        (ConfigError("input.paths is empty"), CONFIG),
        (BadRecordError("one record"), BAD_RECORD),
        (UnscorableTextError("does not survive encode/decode"), BAD_RECORD),
        (RetryableError("later"), RETRYABLE),
        (StorageError("cannot write 's3://b/k': SlowDown"), RETRYABLE),
        (InputError("'x.jsonl.zst' is not valid zstd"), INPUT),
        (ValueError("internal invariant broken"), INTERNAL),
        (AssertionError("row accounting"), INTERNAL),
        (KeyError("k"), INTERNAL),
        (RuntimeError("boom"), INTERNAL),
        (KeyboardInterrupt(), INTERNAL),
    ],
)
def test_classify_each_kind(err, kind):
    assert classify(err) == kind
    assert kind in errors.KINDS


def test_classify_does_not_follow_raise_from():
    """``raise ConfigError(...) from StorageError(...)`` is a config error (the driver's
    check of the output path), not a retryable one."""
    try:
        try:
            raise StorageError("not writable")
        except StorageError as err:
            raise ConfigError("output.path is not writable") from err
    except ConfigError as err:
        assert classify(err) == CONFIG


class _TaskError(Exception):
    """Like Ray's ``RayTaskError``: the exception the task raised is ``.cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"task failed: {cause!r}")
        self.cause = cause


@pytest.mark.parametrize(
    ("cause", "kind"),
    [
        (StorageError("SlowDown"), RETRYABLE),
        (InputError("truncated"), INPUT),
        (ConfigError("bad key"), CONFIG),
        (UnscorableTextError("x"), BAD_RECORD),
        (ValueError("internal invariant broken"), INTERNAL),
    ],
)
def test_classify_looks_through_a_task_wrapper(cause, kind):
    assert classify(_TaskError(cause)) == kind
    assert classify(_TaskError(_TaskError(cause))) == kind
    assert errors.unwrap(_TaskError(cause)) is cause


def test_classify_ignores_a_cause_that_is_not_an_exception():
    class WithContext(Exception):
        cause = "some context object"

    assert classify(WithContext()) == INTERNAL
    assert errors.unwrap(WithContext()).__class__ is WithContext


def _fake_ray_class(name: str, base: type = Exception) -> type:
    cls = type(name, (base,), {})
    cls.__module__ = "ray.exceptions"
    return cls


def test_lost_worker_is_retryable_by_ray_class_name_without_ray():
    actor_error = _fake_ray_class("RayActorError")
    for err in (
        actor_error(),
        _fake_ray_class("ActorDiedError", actor_error)(),
        _fake_ray_class("ActorUnavailableError", actor_error)(),
        _fake_ray_class("WorkerCrashedError")(),
        _fake_ray_class("SomeNewActorError", actor_error)(),  # a subclass Ray may add
    ):
        assert classify(err) == RETRYABLE, type(err)
        assert classify(_TaskError(err)) == RETRYABLE
    # the same names elsewhere, and other Ray errors, are not
    other = type("ActorDiedError", (Exception,), {})
    assert classify(other()) == INTERNAL
    assert classify(_fake_ray_class("ObjectLostError")()) == INTERNAL


def test_classify_real_ray_exceptions():
    """The installed Ray's classes (no cluster): its lost-worker errors, and the error
    `ray.get` raises for a task that raised (``RayTaskError`` with ``.cause``, and the
    class derived from both it and the cause's class)."""
    rex = pytest.importorskip("ray.exceptions")

    assert classify(rex.RayActorError()) == RETRYABLE
    assert classify(rex.ActorDiedError()) == RETRYABLE
    assert classify(rex.ActorUnavailableError("gone", None)) == RETRYABLE
    assert classify(rex.WorkerCrashedError()) == RETRYABLE
    assert classify(rex.RaySystemError("x")) == INTERNAL
    for cause, kind in (
        (StorageError("SlowDown"), RETRYABLE),
        (InputError("truncated"), INPUT),
        (ValueError("internal invariant broken"), INTERNAL),
        (UnscorableTextError("x"), BAD_RECORD),
    ):
        wrapped = rex.RayTaskError("process", "Traceback ...", cause, "p", 1, "127.0.0.1")
        assert wrapped.cause is cause
        assert classify(wrapped) == kind
        dual = wrapped.as_instanceof_cause()
        assert isinstance(dual, rex.RayTaskError) and isinstance(dual, type(cause))
        assert classify(dual) == kind


def test_scorer_refusals_of_a_text_are_bad_records():
    """The subset-exact scorer's refusals of one text (raised in its tokenizer phase,
    `SubsetExactScorer.prepare`) are bad records, whatever else they are."""
    from pipeline.scoring import SubsetExactScorer
    from pipeline.tokenization import TokenizerError, truncate_merges
    from tests.tiny_assets import tiny_pair, tiny_teacher_tokenizer

    T, S = tiny_pair(2)
    with pytest.raises(UnscorableTextError, match="does not survive") as info:
        SubsetExactScorer(T, S).prepare("ab z")  # 'z' has no symbol in the tiny vocab
    assert classify(info.value) == BAD_RECORD
    T = tiny_teacher_tokenizer()
    S = truncate_merges(T, 3)
    T.add_special_tokens(["<|sep|>"])
    with pytest.raises(TokenizerError, match="does not have") as info:
        SubsetExactScorer(T, S).prepare("ab<|sep|>a")  # an added token the student lacks
    assert classify(info.value) == BAD_RECORD


# ------------------------------------------------- an internal error fails the shard


DOCS = {"d0": "ab 12 a text.", "d1": "b  1 and more text.", "d2": "the last one, 345."}


@pytest.fixture(scope="module")
def step(tiny_teacher_dir, tmp_path_factory):
    """A `GenerateStep` with the tiny teacher (subset-exact scorer), set up once."""
    from pipeline.generate import GenerateStep
    from tests.tiny_assets import tiny_job_config

    tmp = tmp_path_factory.mktemp("errors")
    s = GenerateStep(
        tiny_job_config(tiny_teacher_dir, str(tmp / "in" / "*.jsonl"), str(tmp / "out"))
    )
    s.setup()
    return s


def _shard(step, name: str) -> str:
    """An input shard of `DOCS` beside the step's output; its URL."""
    from pathlib import Path

    d = Path(step.cfg.output.path).parent / "in"
    d.mkdir(exist_ok=True)
    p = d / f"{name}.jsonl"
    p.write_text("".join(json.dumps({"id": k, "text": t}) + "\n" for k, t in DOCS.items()))
    return str(p)


def _fail_prepare_on(monkeypatch, step, text: str, err: BaseException) -> None:
    """The scorer's tokenizer phase raises ``err`` for the document ``text``."""
    prepare = step.scorer.prepare

    def failing(t, *args, **kwargs):
        if t == text:
            raise err
        return prepare(t, *args, **kwargs)

    monkeypatch.setattr(step.scorer, "prepare", failing)


def test_internal_error_in_scoring_fails_the_shard_and_commits_nothing(step, monkeypatch):
    """A ValueError from scoring is a bug, not a bad record: the shard fails (before
    issue 14 the document was skipped as "unscorable text" and the shard committed)."""
    from pathlib import Path

    url = _shard(step, "internal")
    _fail_prepare_on(monkeypatch, step, DOCS["d1"], ValueError("internal invariant broken"))
    with pytest.raises(ValueError, match="internal invariant broken") as info:
        step.process_shard(url)
    assert classify(info.value) == INTERNAL
    out = Path(step.cfg.output.path)
    assert not list(out.glob("internal*")), list(out.iterdir())


@pytest.mark.parametrize(
    "err",
    [
        UnscorableTextError("text does not survive the teacher's encode/decode"),
        BadRecordError("text does not survive the teacher's encode/decode"),
    ],
    ids=["UnscorableTextError", "BadRecordError"],
)
def test_bad_record_in_scoring_is_skipped_and_named(step, monkeypatch, err):
    url = _shard(step, f"bad-{type(err).__name__}")
    _fail_prepare_on(monkeypatch, step, DOCS["d1"], err)
    m = step.process_shard(url)
    assert m["records_in"] == 3 and m["documents"] == 2
    assert m["skipped"] == [
        {
            "index": 1,
            "kind": "unscorable text",
            "reason": "text does not survive the teacher's encode/decode",
            "doc_id": "d1",
            "line": 2,
        }
    ]
