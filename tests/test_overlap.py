"""The overlapped tokenizer phase (`GenerateStep(cfg, overlap=True)`: the next batch is
prepared in a producer thread, or in worker processes with ``prepare_workers``, while
the current one is scored) writes the same shard bytes, skips and progress as the
sequential path, fails the shard on an error in the producer, a worker or in scoring
(the producer stopped), and hides prepare behind a slow forward."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path

import pytest

LONG = " ".join(f"Sentence {i} of a long document, with words." for i in range(40))
# one pre-token longer than the 64-token context: a bad record (skipped), in any process
BAD = "Numbers: " + "1234567890" * 30 + " end."
BOOM = "BOOMREC"  # the patched prepare raises a RuntimeError on it: a bug, the shard fails

MODES = {"sequential": (False, 0), "thread": (True, 0), "process": (True, 1)}


def _texts() -> list[str]:
    short = [f"Document {i}: ab {i * 7} and a little text, {i}." for i in range(24)]
    return [*short[:5], BAD, *short[5:12], LONG, *short[12:]]


@pytest.fixture(scope="module")
def step(tiny_teacher_dir, tmp_path_factory):
    """Small batches (4 x 128 context nodes) and a 64-token context, so that the shard
    has several batches and the long document is chunked (a batch ends inside it)."""
    from pipeline.generate import GenerateStep
    from tests.tiny_assets import tiny_job_config

    tmp = tmp_path_factory.mktemp("overlap")
    cfg = tiny_job_config(
        tiny_teacher_dir,
        str(tmp / "in" / "*.jsonl"),
        str(tmp / "out"),
        "teacher.max_batch_tokens=128",
        "teacher.max_context=64",
        "scoring.chunk_overlap=16",
    )
    s = GenerateStep(cfg)
    s.setup()
    yield s
    s.close()


def _shard(step, name: str, texts: list[str]) -> str:
    d = Path(step.cfg.output.path).parent / "in"
    d.mkdir(exist_ok=True)
    lines = [json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(texts)]
    lines.insert(3, "{not json")  # a record skipped when read
    p = d / f"{name}.jsonl"
    p.write_text("".join(line + "\n" for line in lines))
    return str(p)


def _patch_prepare(monkeypatch, step) -> set[str]:
    """The scorer's tokenizer phase in this process raises on `BOOM`; returns the names
    of the threads it ran in."""
    prepare = step.scorer.prepare
    threads: set[str] = set()

    def patched(text, *args, **kwargs):
        threads.add(threading.current_thread().name)
        if BOOM in text:
            raise RuntimeError("boom in prepare")
        return prepare(text, *args, **kwargs)

    monkeypatch.setattr(step.scorer, "prepare", patched)
    return threads


def _mode(step, mode: str) -> None:
    step.overlap, step.prepare_workers = MODES[mode]


def _run(step, url: str, mode: str):
    _mode(step, mode)
    seen = []

    def progress(state):
        snap = dataclasses.asdict(state)
        del snap["seconds"]
        seen.append(snap)

    m = step.process_shard(url, progress)
    data = (Path(step.cfg.output.path) / m["file"]).read_bytes()
    return data, {k: v for k, v in m.items() if k != "seconds"}, seen


def _producers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "generate-prepare"]


def _workers() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("generate-prep")]


def test_overlapped_shard_is_byte_identical_to_sequential(step, monkeypatch):
    threads = _patch_prepare(monkeypatch, step)
    url = _shard(step, "same", _texts())
    step.overlap = None  # the default: off with a CPU teacher
    assert not step.overlap_active
    interval = sys.getswitchinterval()
    runs = {}
    prepared_in = {}
    for mode in MODES:
        threads.clear()
        runs[mode] = _run(step, url, mode)
        prepared_in[mode] = set(threads)
    assert prepared_in == {
        "sequential": {threading.current_thread().name},
        "thread": {"generate-prepare"},
        "process": set(),  # in the worker process
    }
    seq_data, seq_m, seq_progress = runs["sequential"]
    for mode in ("thread", "process"):
        data, m, progress = runs[mode]
        assert data == seq_data, mode
        assert m == seq_m, mode
        assert progress == seq_progress, mode
    assert sys.getswitchinterval() == pytest.approx(interval)  # lowered while it ran
    # what the shard exercises: both kinds of skip, a chunked document, several batches
    # and a batch that ends inside the long document
    assert [(s["kind"], s["index"]) for s in seq_m["skipped"]] == [
        ("malformed JSON", 3),
        ("unscorable text", 6),
    ]
    assert "pre-token is longer" in seq_m["skipped"][1]["reason"]
    assert seq_m["records_in"] == len(_texts()) + 1
    assert seq_m["documents"] == len(_texts()) - 1
    assert seq_m["sequences"] > seq_m["documents"] + 3
    assert len(seq_progress) >= 3
    long_index = _texts().index(LONG) + 1  # record index (after the malformed line)
    assert any(p["records"] == long_index for p in seq_progress)
    assert seq_progress[-1]["text_chars"] == seq_progress[-1]["text_chars_total"]
    assert not _producers()
    assert len(_workers()) == 1  # kept for the next shard
    step.close()
    assert not _workers()


@pytest.mark.parametrize("mode", ["sequential", "thread"])
def test_an_error_in_prepare_fails_the_shard(step, monkeypatch, mode):
    """A RuntimeError in prepare (not a bad record) fails the shard as in the sequential
    path: raised by process_shard, nothing committed, the producer thread gone."""
    _patch_prepare(monkeypatch, step)
    texts = _texts()
    texts[15] = f"a {BOOM} here"
    url = _shard(step, f"fail-prepare-{mode}", texts)
    _mode(step, mode)
    with pytest.raises(RuntimeError, match="boom in prepare"):
        step.process_shard(url)
    assert not list(Path(step.cfg.output.path).glob(f"fail-prepare-{mode}*"))
    assert not _producers()


@pytest.mark.parametrize("mode", list(MODES))
def test_an_error_in_scoring_fails_the_shard_and_stops_the_producer(step, monkeypatch, mode):
    calls = []
    launch = step.targets.launch

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in scoring")
        return launch(*args, **kwargs)

    monkeypatch.setattr(step.targets, "launch", failing)
    url = _shard(step, f"fail-scoring-{mode}", _texts())
    _mode(step, mode)
    with pytest.raises(RuntimeError, match="boom in scoring"):
        step.process_shard(url)
    assert not list(Path(step.cfg.output.path).glob(f"fail-scoring-{mode}*"))
    assert not _producers()
    assert not _workers()  # a pool that may hold the failed shard's documents is stopped
    assert step._workers is None


def test_an_error_in_a_worker_is_raised_with_its_traceback(step):
    """A worker that cannot set up (here: no limits) raises that error in the producer,
    with the worker's traceback as a note."""
    from pipeline.generate import _PreparePool
    from pipeline.records import Document

    pool = _PreparePool(step.cfg, {}, 1)
    try:
        with pytest.raises(KeyError, match="max_context") as info:
            next(pool.outcomes([Document(0, "d0", "some text")]))
        assert any("in a prepare worker" in n for n in info.value.__notes__)
    finally:
        pool.close()
    assert not _workers()


def test_overlap_hides_prepare_behind_a_slow_forward(step, monkeypatch):
    """Prepare and forward each sleep about as long (sleep releases the GIL, as a CUDA
    sync does): overlapped, the prepare calls after the first batch is ready are hidden
    behind the forwards; at least half of their time must be saved. One torch thread: on
    a shared 2-core machine, torch's spinning worker threads beside the producer thread
    (or another process) make the real work vary many-fold."""
    import torch

    delay = 0.03
    prepare = step.scorer.prepare
    calls: list[str] = []

    def slow_prepare(text, *args, **kwargs):
        calls.append("prepare")
        time.sleep(delay)
        return prepare(text, *args, **kwargs)

    launch = step.targets.launch

    def slow_score(teacher, prepared, *args, **kwargs):
        calls.append("score")
        time.sleep(delay * len(prepared))
        return launch(teacher, prepared, *args, **kwargs)

    monkeypatch.setattr(step.scorer, "prepare", slow_prepare)
    monkeypatch.setattr(step.targets, "launch", slow_score)
    # short documents only: one prepare call each (a long one may be re-chunked)
    url = _shard(step, "slow", [f"Document {i}: ab {i * 7} and some text, {i}." for i in range(48)])
    walls = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for mode in ("sequential", "thread"):
            calls.clear()
            t = time.perf_counter()
            _run(step, url, mode)
            walls[mode] = time.perf_counter() - t
            if mode == "sequential":
                first = calls.index("score")
                hidden = delay * (calls.count("prepare") - first)
                assert calls.count("score") >= 3
    finally:
        torch.set_num_threads(threads)
    assert walls["thread"] < walls["sequential"] - 0.5 * hidden, (walls, hidden)
