"""The Ray executor's bookkeeping (`pipeline.ray_executor.Scheduler`) without Ray:
actors and task futures are plain handles, and each transition is checked alone."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from pipeline.ray_executor import Scheduler


def _sched(shards=("a", "b"), retries=2, **kw) -> Scheduler:
    return Scheduler(
        queue=list(shards),
        max_retries=retries,
        storage_retry_seconds=10.0,
        deadline=100.0,
        node_wait_seconds=100.0,
        **kw,
    )


def test_shards_go_to_idle_actors_and_commit():
    s = _sched(idle=["w0"], started=True)
    assert s.assign(now=0.0) == [("w0", "a", 1)]  # one actor, one shard
    s.submitted("f-a", "w0", "a")
    assert s.waiting() == ["f-a"] and s.queue == ["b"]
    assert s.committed("f-a", {"input": "a"}) == "w0"
    assert s.assign(now=1.0) == [("w0", "b", 1)]
    s.submitted("f-b", "w0", "b")
    s.committed("f-b", {"input": "b"})
    assert not s.active and [m["input"] for m in s.done] == ["a", "b"] and not s.failed


def test_a_lost_worker_requeues_its_shard_until_the_retries_are_used():
    s = _sched(shards=["a"], retries=2, idle=["w0"], started=True)
    for attempt in (1, 2, 3):
        [(actor, url, n)] = s.assign(now=0.0)
        assert (url, n) == ("a", attempt)
        s.submitted(f"f{attempt}", actor, url)
        dead, out = s.worker_lost(f"f{attempt}", "ActorDiedError: node gone")
        assert dead == actor and out.attempt == attempt
        s.idle.append(f"w{attempt}")  # the driver starts a replacement
        if attempt <= 2:
            assert out.requeued and s.queue == ["a"]
    assert not out.requeued and s.failed == {"a": "worker lost 3 times: ActorDiedError: node gone"}
    assert not s.active


def test_a_retryable_task_error_waits_longer_each_attempt_and_other_errors_fail_at_once():
    s = _sched(shards=["a", "b"], retries=1, idle=["w0", "w1"], started=True)
    for actor, url, _ in s.assign(now=0.0):
        s.submitted(f"f-{url}", actor, url)
    out = s.task_failed("f-a", "OSError: slow down", retryable=True, now=5.0)
    assert out.requeued and (out.attempt, out.delay) == (1, 10.0)
    assert s.assign(now=14.9) == []  # not due before 5 + 10 s
    [(actor, url, n)] = s.assign(now=15.0)
    assert (url, n) == ("a", 2)
    s.submitted("f-a2", actor, url)
    out = s.task_failed("f-a2", "OSError: slow down", retryable=True, now=16.0)
    assert not out.requeued and s.failed["a"] == "storage failed 2 times: OSError: slow down"
    out = s.task_failed("f-b", "InputError: truncated zstd", retryable=False, now=16.0)
    assert not out.requeued and s.failed["b"] == "InputError: truncated zstd"
    assert sorted(s.idle) == ["w0", "w1"]  # a task error leaves its actor usable


def test_actors_that_cannot_start_are_replaced_then_the_run_stalls_with_the_reason():
    s = _sched(shards=["a"], retries=1)
    s.add_starting("r0", "w0")
    assert s.stall_reason(now=0.0, what="{'num_gpus': 1}") is None  # one is starting
    assert s.actor_start_failed("r0", "CUDA error") == ("w0", True)
    s.add_starting("r1", "w1")
    assert s.actor_start_failed("r1", "CUDA error again") == ("w1", False)
    assert s.stall_reason(now=1.0, what="x") == "no actor could start: CUDA error again"
    s.fail_queued("no actor could start: CUDA error again")
    assert s.failed == {"a": "no actor could start: CUDA error again"} and not s.active


def test_a_pool_that_never_starts_stalls_at_the_deadline():
    s = _sched(shards=["a"])
    s.add_starting("r0", "w0")
    assert s.stall_reason(now=99.0, what="{'num_gpus': 2}") is None
    why = s.stall_reason(now=101.0, what="{'num_gpus': 2}")
    assert why is not None and "no actor started within ray.node_wait_seconds=100s" in why
    # once one actor has started, waiting ones never stall the run
    s.add_starting("r1", "w1")
    assert s.actor_started("r1") == "w1" and s.started
    assert s.stall_reason(now=500.0, what="x") is None


def test_only_shards_due_are_waited_for_and_starting_actors_only_while_shards_queue():
    s = _sched(shards=["a"], started=True)
    s.add_starting("r0", "w0")
    assert s.waiting() == ["r0"]
    s.actor_started("r0")
    [(actor, url, _)] = s.assign(now=0.0)
    s.submitted("f", actor, url)
    s.add_starting("r1", "w1")
    assert s.waiting() == ["f"]  # nothing queued: a starting actor is not awaited
    s.task_failed("f", "slow", retryable=True, now=0.0)
    assert s.next_wake() == 10.0
    assert s.leftover_actors() == ["w0", "w1"]
