"""Multi-node runs on `ray.cluster_utils.Cluster` with simulated GPUs: actors spread over
nodes, and losing a node or an actor mid-run still ends with every input document
exactly once in the output; a rerun is a no-op. ``ray.accelerator_type`` keeps actors on
nodes of that type, and a type no node has fails fast in the driver."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from pipeline.config import ConfigError, load_config
from pipeline.executors import Progress, finalize, plan
from pipeline.ray_executor import ShardFailed, run_ray
from pipeline.shards import read_table

pytestmark = pytest.mark.integration

N_SHARDS, DOCS_PER_SHARD = 8, 6


@pytest.fixture()
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    workers = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()


def _corpus(tmp_path, repeat=1):
    d = tmp_path / "in"
    d.mkdir()
    for s in range(N_SHARDS):
        recs = [
            {"id": f"s{s}-d{k}", "text": f"Document {k} of shard {s}. " * (3 + k) * repeat}
            for k in range(DOCS_PER_SHARD)
        ]
        (d / f"part-{s:03d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def _cfg(tiny_teacher_dir, inp, out, *extra):
    return load_config(
        None,
        [
            f"teacher.model={tiny_teacher_dir}",
            "teacher.max_batch_tokens=512",
            "student.merges=60",
            "scoring.top_k=8",
            f"input.paths=[{inp}/*.jsonl]",
            f"output.path={out}",
            "input.messages_field=null",
            "input.loss_on=all",
            "ray.num_cpus_per_actor=0.5",
            *extra,
        ],
    )


def _check_exactly_once(out):
    index = json.loads((out / "index.json").read_text())
    ids = []
    for s in index["shards"]:
        m = json.loads((out / s["manifest"]).read_text())
        t = read_table(str(out / s["file"]), manifest=m).select(["doc_id", "chunk"])
        ids += [r["doc_id"] for r in t.to_pylist() if r["chunk"] == 0]  # long docs: chunks
    want = [f"s{s}-d{k}" for s in range(N_SHARDS) for k in range(DOCS_PER_SHARD)]
    assert ids == want  # no gap, no duplicate, in order
    assert index["totals"]["documents"] == len(want)


def _run(cfg):
    p = plan(cfg)
    prog = Progress(len(p.shards), len(p.done))
    t0 = time.perf_counter()
    new = run_ray(cfg, p.todo, prog.shard_done, progress=prog)
    finalize(cfg, p, {**p.done, **{m["input"]: m for m in new}}, time.perf_counter() - t0)
    return new


def _start_and_wait_for_a_commit(cfg, out):
    """Run the job in a thread; return once its first shard has committed."""
    result: dict = {}

    def go():
        try:
            result["new"] = _run(cfg)
        except Exception as err:  # surfaced by the test
            result["err"] = err

    t = threading.Thread(target=go)
    t.start()
    deadline = time.time() + 300
    while not list(out.glob("*.manifest.json")) and time.time() < deadline:
        time.sleep(0.2)
    return t, result


def _live_workers(address, state=None):
    """ShardWorker actors not dead (or in ``state``)."""
    where = ("state", "=", state) if state else ("state", "!=", "DEAD")
    return list_actors(address=address, filters=[("class_name", "=", "ShardWorker"), where])


def test_gpu_actors_spread_over_nodes_and_survive_a_node_loss(
    cluster, tiny_teacher_dir, tmp_path, caplog
):
    c, workers = cluster
    out = tmp_path / "out"
    # shards long enough that the node dies in the middle of one
    cfg = _cfg(tiny_teacher_dir, _corpus(tmp_path, repeat=8), out)
    with caplog.at_level("WARNING", logger="pipeline.ray_executor"):
        t, result = _start_and_wait_for_a_commit(cfg, out)
        # one actor pinned to each GPU node (both were given a shard as they were created)
        deadline = time.time() + 60
        while len(alive := _live_workers(c.address, "ALIVE")) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert sorted(a.node_id for a in alive) == sorted(w.node_id for w in workers)
        c.remove_node(workers[0])  # a worker node dies mid-run ...
        c.add_node(num_cpus=1, num_gpus=1)  # ... and a replacement joins (spot instance)
        t.join(timeout=600)
    assert not t.is_alive()
    assert "err" not in result, result.get("err")
    assert re.search(r"worker lost \(\w+\); attempt 1/3", caplog.text)  # died holding a shard
    # what was retried and succeeded is a WARNING, not an ERROR, on the console
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("pipeline") and r.levelno >= logging.ERROR
    ]
    assert not errors
    redone = [m for m in result["new"] if m["attempt"] > 1]
    assert redone and all(m["ray_node_id"] != workers[0].node_id for m in redone)
    # the redone shard's log keeps the loss: the driver's line, then the attempt that
    # committed (a lost attempt's log used to vanish under the successful one's)
    for m in redone:
        story = (out / "logs" / (m["file"].removesuffix(".parquet") + ".log")).read_text()
        marks = ["worker lost", f"start (attempt {m['attempt']})", "committed"]
        assert [story.index(x) for x in marks] == sorted(story.index(x) for x in marks), story
    _check_exactly_once(out)
    # a rerun is a no-op
    assert _run(cfg) == []


def test_killed_actor_shard_is_redone(cluster, tiny_teacher_dir, tmp_path):
    # shards long enough that the run is still going after the first commit (with the
    # default ones, a loaded machine could finish the other 7 before the kill)
    cfg = _cfg(tiny_teacher_dir, _corpus(tmp_path, repeat=4), tmp_path / "out")
    out = tmp_path / "out"
    t, result = _start_and_wait_for_a_commit(cfg, out)
    # SIGKILL one live actor process (an OOM kill or a crashed worker looks like this)
    deadline = time.time() + 60
    while not (live := _live_workers(cluster[0].address, "ALIVE")) and time.time() < deadline:
        time.sleep(0.1)
    assert live and t.is_alive()
    os.kill(live[0].pid, signal.SIGKILL)
    t.join(timeout=600)
    assert not t.is_alive()
    assert "err" not in result, result.get("err")
    _check_exactly_once(out)


def test_actors_beyond_capacity_take_no_shard_while_they_wait(
    cluster, tiny_teacher_dir, tmp_path, caplog
):
    """``ray.num_actors=3`` where the cluster holds two GPU actors: the third waits for
    resources and must not hold a shard meanwhile (it used to stall the run). Killed
    while it waits, it is replaced; it is gone when the run ends."""
    c, _ = cluster
    out = tmp_path / "out"
    # shards long enough that some are still queued when the waiting actor is killed (the
    # driver watches waiting actors only while shards are queued)
    cfg = _cfg(tiny_teacher_dir, _corpus(tmp_path, repeat=8), out, "ray.num_actors=3")
    with caplog.at_level("INFO", logger="pipeline.ray_executor"):
        t, result = _start_and_wait_for_a_commit(cfg, out)
        pending = list_actors(
            address=c.address,
            filters=[("class_name", "=", "ShardWorker"), ("state", "=", "PENDING_CREATION")],
        )
        assert len(pending) == 1
        ray.kill(ray.get_actor(pending[0].name))
        t.join(timeout=300)
    assert not t.is_alive(), "the run stalled"
    assert "err" not in result, result.get("err")
    assert len(result["new"]) == N_SHARDS
    assert len({m["actor"] for m in result["new"]}) == 2  # only the started ones worked
    assert "ray.num_actors=3 but the cluster holds 2 actors" in caplog.text
    assert "an actor failed to start" in caplog.text
    _check_exactly_once(out)
    deadline = time.time() + 20  # the replacement, still waiting, is killed with the run
    while _live_workers(c.address) and time.time() < deadline:
        time.sleep(0.5)
    assert not _live_workers(c.address)


def test_an_actor_no_node_can_hold_fails_the_run_after_the_wait(
    cluster, tiny_teacher_dir, tmp_path, caplog
):
    """Two GPUs per actor on nodes of one GPU: no actor ever starts; the run fails with
    the reason after ``ray.node_wait_seconds`` instead of waiting forever."""
    c, _ = cluster
    cfg = _cfg(
        tiny_teacher_dir,
        _corpus(tmp_path),
        tmp_path / "out",
        "ray.num_gpus_per_actor=2",
        "ray.node_wait_seconds=3",
    )
    t0 = time.perf_counter()
    with (
        caplog.at_level("WARNING", logger="pipeline.ray_executor"),
        pytest.raises(ShardFailed, match=r"no actor started within ray.node_wait_seconds=3s"),
    ):
        _run(cfg)
    assert "no node of the cluster has room for an actor" in caplog.text
    assert time.perf_counter() - t0 < 60
    assert not list((tmp_path / "out").glob("*.manifest.json"))
    deadline = time.time() + 20
    while _live_workers(c.address) and time.time() < deadline:
        time.sleep(0.5)
    assert not _live_workers(c.address)


@pytest.fixture()
def typed_cluster():
    """A CPU head and two worker nodes with two simulated GPUs each: one A100, one T4."""
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    nodes = {
        acc: c.add_node(num_cpus=1, num_gpus=2, resources={f"accelerator_type:{acc}": 1})
        for acc in ("A100", "T4")
    }
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_accelerator_type_keeps_actors_on_that_node_type(typed_cluster, tiny_teacher_dir, tmp_path):
    c, nodes = typed_cluster
    out = tmp_path / "out"
    inp = _corpus(tmp_path)
    # a type no node has: a clear error from the driver, before any actor exists
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"'H100'.*types present: A100, T4"):
        _run(
            _cfg(tiny_teacher_dir, inp, out, "ray.accelerator_type=H100", "ray.node_wait_seconds=3")
        )
    assert time.perf_counter() - t0 < 20
    assert not list_actors(address=c.address, filters=[("class_name", "=", "ShardWorker")])
    # A100: both actors (the A100 node holds two) run there, none on the T4 node
    new = _run(_cfg(tiny_teacher_dir, inp, out, "ray.accelerator_type=A100"))
    assert len(new) == N_SHARDS
    a100 = nodes["A100"].node_id
    assert {m["ray_node_id"] for m in new} == {a100}
    assert len({m["actor"] for m in new}) == 2
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["ray_node_of_shard"].values()) == {a100}
    _check_exactly_once(out)
    # readable names in Ray's state API (what `ray list actors/tasks` and the dashboard show)
    actors = list_actors(address=c.address, filters=[("class_name", "=", "ShardWorker")])
    assert {a.name for a in actors} == {m["actor"] for m in new}
    assert all(a.node_id == a100 for a in actors)
    want = {f"xtok-shard-part-{s:03d}" for s in range(N_SHARDS)}
    deadline = time.time() + 20  # task events reach the GCS asynchronously
    while time.time() < deadline:
        names = {
            t.name
            for t in list_tasks(
                address=c.address, filters=[("func_or_class_name", "=", "ShardWorker.process")]
            )
        }
        if want <= names:
            break
        time.sleep(0.5)
    assert want <= names
    log = (out / "logs" / "part-000.log").read_text()
    assert f"ray node {a100}" in log and "committed" in log
