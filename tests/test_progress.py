"""Progress that a user can follow: the driver's numbers, Ray metrics (Prometheus, as the
dashboard reads them), readable actor names, and one log per shard under
``<output>/logs/`` (also for a shard that failed). One small run on the session's real
local Ray, with one good shard, one with a bad record and one that cannot be read."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import ray

from pipeline.config import load_config
from pipeline.executors import Progress, plan
from pipeline.ray_executor import RayMetrics, ShardFailed, run_ray
from tests.tiny_assets import tiny_job_args

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(ray_local, tiny_teacher_dir, tmp_path_factory):
    """Run three shards on Ray: ``good``, ``mixed`` (one malformed record) and
    ``broken`` (not zstd: the shard fails). Returns what the run left behind."""
    tmp = tmp_path_factory.mktemp("progress")
    inp = tmp / "in"
    inp.mkdir()
    docs = {
        "good": [{"id": f"g{i}", "text": f"Good document number {i}. " * 4} for i in range(3)],
        "mixed": [{"id": "m0", "text": "A fine record."}, {"id": "m2", "text": "Another one."}],
    }
    (inp / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs["good"]))
    (inp / "mixed.jsonl").write_text(
        json.dumps(docs["mixed"][0])
        + '\n{"id": "m1", "text": "no end\n'
        + json.dumps(docs["mixed"][1])
        + "\n"
    )
    (inp / "broken.jsonl.zst").write_bytes(b"this is not zstd at all")
    out = tmp / "out"
    overrides = tiny_job_args(tiny_teacher_dir, f"{inp}/*", str(out), "ray.num_actors=2")[2:]
    cfg = load_config(None, overrides)  # [2:]: without "--show 0"
    p = plan(cfg)
    prog = Progress(len(p.shards), len(p.done))
    scraper = Scraper(next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]))
    committed: list[dict] = []
    named_during_run: list[list[str]] = []

    def on_done(m: dict) -> None:
        named_during_run.append(ray.util.list_named_actors())  # the actors are alive now
        committed.append(m)
        prog.shard_done(m)

    with pytest.raises(ShardFailed) as failure:
        run_ray(cfg, p.todo, on_done, progress=prog)
    yield {
        "out": out,
        "progress": prog,
        "committed": {m["input"].rsplit("/", 1)[-1]: m for m in committed},
        "named": named_during_run,
        "error": str(failure.value),
        "scraper": scraper,
    }
    scraper.stop()


def test_progress_numbers_add_up():
    prog = Progress(total_shards=5, already=2)
    seen: list[dict] = []
    prog.sinks.append(seen.append)  # a sink gets every snapshot
    assert prog.snapshot()["eta_seconds"] is None  # nothing committed this run yet
    for tokens in (100, 250):
        prog.shard_done({"file": "x.parquet", "student_tokens": tokens, "skipped": []})
    mid = prog.snapshot()
    assert (mid["shards_done"], mid["shards_total"], mid["shards_this_run"]) == (4, 5, 2)
    assert mid["student_tokens"] == 350
    assert mid["tokens_per_second"] == pytest.approx(350 / mid["seconds"], rel=0.05)
    # one shard left at the rate of this run's two
    assert mid["eta_seconds"] == pytest.approx(mid["seconds"] / 2, rel=0.05)
    prog.shard_done({"file": "y.parquet", "student_tokens": 50, "skipped": [{"index": 0}]})
    assert [s["shards_done"] for s in seen] == [3, 4, 5]
    assert [s["student_tokens"] for s in seen] == [100, 350, 400]
    assert seen[-1]["eta_seconds"] == 0


def test_no_metrics_and_no_ray_import_without_ray():
    code = (
        "import sys\n"
        "from pipeline.executors import Progress\n"
        "p = Progress(2)\n"
        "p.shard_done({'student_tokens': 5, 'skipped': []})\n"
        "assert 'ray' not in sys.modules, 'the local path imported ray'\n"
        "assert p.sinks == []\n"
        "import pipeline.ray_executor  # registers the Ray exporter; Ray is not initialized\n"
        "p.shard_done({'student_tokens': 5, 'skipped': []})\n"
        "assert p.sinks == [] and p.snapshot()['student_tokens'] == 10\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_committed_shards_and_the_failed_one_are_reported(run):
    assert set(run["committed"]) == {"good.jsonl", "mixed.jsonl"}
    assert "broken.jsonl.zst" in run["error"] and "logs/" in run["error"]
    snap = run["progress"].snapshot()
    assert (snap["shards_done"], snap["shards_total"]) == (2, 3)
    assert snap["student_tokens"] == sum(m["student_tokens"] for m in run["committed"].values())


def test_actors_have_readable_names(run):
    names = [m["actor"] for m in run["committed"].values()]
    assert all(re.fullmatch(r"xtok-worker-\d+", n) for n in names), names
    # they are Ray actor names (what `ray list actors` and the dashboard show): the
    # actor that committed each shard was a live named actor when it did
    assert len(run["named"]) == len(names)
    for name, live in zip(names, run["named"], strict=True):
        assert name in live


def test_per_shard_logs_tell_each_shard_story(run):
    logs = run["out"] / "logs"
    good = (logs / "good.log").read_text()
    m = run["committed"]["good.jsonl"]
    assert "shard good: start (attempt 1)" in good
    assert f"actor {m['actor']}" in good and f"ray node {m['ray_node_id']}" in good
    assert re.search(r"batch \d+ scored", good)
    assert f"{m['documents']} documents" in good and m["documents"] == 3
    assert f"{m['student_tokens']} student tokens" in good and m["student_tokens"] > 0
    mixed = (logs / "mixed.log").read_text()
    assert re.search(r"skipped record 1 \(line 2\): malformed JSON", mixed)
    assert "2 documents, 1 skipped" in mixed
    broken = (logs / "broken.log").read_text()
    assert "FAILED" in broken and "Traceback" in broken and "not valid zstd" in broken
    assert "InputError" in broken
    assert "committed" not in broken
    assert not list(logs.glob("*.tmp-*"))  # written atomically


class Scraper:
    """Scrapes the node's Prometheus endpoint (what the dashboard's Grafana reads) every
    second from a thread: every value seen for each ``ray_xtok_*`` metric, and the last
    value of each series (a metric has one series per process that records it)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.seen: dict[str, set[float]] = {}
        self.last: dict[str, dict[str, float]] = {}  # metric -> labels -> value
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                body = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                continue
            for line in body.splitlines():
                if line.startswith("ray_xtok_"):
                    series, value = line.rsplit(" ", 1)
                    name = series.split("{", 1)[0]
                    self.seen.setdefault(name, set()).add(float(value))
                    self.last.setdefault(name, {})[series] = float(value)

    def top(self, name: str) -> float:
        return max(self.seen.get(name, {0.0}))

    def total(self, name: str) -> float:
        """A counter summed over its series (e.g. over the actors)."""
        return sum(self.last.get(name, {}).values())

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)


def test_progress_is_exported_as_ray_metrics(run):
    assert any(isinstance(s, RayMetrics) for s in run["progress"].sinks)
    tokens = sum(m["student_tokens"] for m in run["committed"].values())
    sc = run["scraper"]
    # Ray exports every ~10 s: the last values may arrive after the run returned
    deadline = time.time() + 25
    while time.time() < deadline and not (
        2.0 in sc.seen.get("ray_xtok_shards_done", set())
        and sc.total("ray_xtok_worker_tokens_total") >= tokens
    ):
        time.sleep(1)
    assert 3.0 in sc.seen.get("ray_xtok_shards_total", set()), sc.seen
    assert 2.0 in sc.seen.get("ray_xtok_shards_done", set()), sc.seen
    assert sc.top("ray_xtok_tokens_total") >= tokens, sc.seen  # a counter (whole session)
    assert sc.top("ray_xtok_tokens_per_second") > 0, sc.seen
    assert sc.total("ray_xtok_worker_tokens_total") >= tokens, sc.last  # counted in the actors


def _long_shard(tmp_path, n_words: int = 3000):
    inp = tmp_path / "in"
    inp.mkdir()
    words = " ".join(f"word{i % 97} and more text" for i in range(n_words // 4))
    (inp / "long.jsonl").write_text(json.dumps({"id": "long", "text": words}) + "\n")
    return inp


def test_a_long_document_reports_progress_by_batch_with_a_token_eta(
    tiny_teacher_dir, tmp_path, caplog, monkeypatch
):
    """One long document in one shard used to print nothing until the shard committed.
    Every scoring batch now logs the shard's tokens, share of text and ETA, and the run
    logs its own line (tokens, rate, ETA in tokens) while the shard runs."""
    from jobs.generate import main
    from pipeline import executors

    monkeypatch.setattr(executors, "HEARTBEAT_SECONDS", 0.0)
    inp = _long_shard(tmp_path)
    out = tmp_path / "out"
    args = tiny_job_args(tiny_teacher_dir, str(inp), str(out), "teacher.max_batch_tokens=64")
    with caplog.at_level("INFO"):
        assert main(["--executor", "local", *args]) == 0
    batches = re.findall(
        r"shard long: batch (\d+) scored: (\d+) student tokens.*?(\d+)% of the text.*shard ETA (\S+)",
        caplog.text,
    )
    assert len(batches) >= 5, caplog.text[-3000:]
    assert [int(b[0]) for b in batches] == list(range(1, len(batches) + 1))
    tokens = [int(b[1]) for b in batches]
    shares = [int(b[2]) for b in batches]
    assert tokens == sorted(tokens) and shares == sorted(shares) and shares[-1] == 100
    assert batches[-1][3] == "0m00s"
    m = json.loads((out / "long.manifest.json").read_text())
    assert tokens[-1] == m["student_tokens"] and m["sequences"] > 1  # chunked, all counted
    runs = re.findall(
        r"run: 0/1 shards committed, 1 running \(long (\d+)%\).*ETA (\S+)", caplog.text
    )
    assert len(runs) >= 4 and runs[0][1] != "unknown"
    # the shard log holds the same batch lines
    assert len(re.findall(r"batch \d+ scored", (out / "logs" / "long.log").read_text())) == len(
        batches
    )


def test_progress_eta_counts_tokens_of_running_and_queued_shards():
    prog = Progress(total_shards=3)
    prog.shard_progress("a", {"student_tokens": 100, "fraction": 0.25})
    snap = prog.snapshot()
    # a: 300 tokens left (100 is a quarter); 2 queued shards at a's expected 400 each
    assert snap["student_tokens_in_flight"] == 100
    assert snap["eta_seconds"] == pytest.approx(1100 / (100 / snap["seconds"]), rel=0.05)
    prog.shard_done({"file": "a.parquet", "student_tokens": 400, "skipped": []})
    assert prog.running == {} and prog.snapshot()["student_tokens_in_flight"] == 0


def test_the_driver_reads_a_running_shards_progress_from_its_actor(
    ray_local, tiny_teacher_dir, tmp_path
):
    from pipeline.ray_executor import ShardWorker, _poll_progress

    inp = _long_shard(tmp_path, 6000)
    cfg = load_config(
        None,
        tiny_job_args(
            tiny_teacher_dir, str(inp), str(tmp_path / "out"), "teacher.max_batch_tokens=64"
        )[2:],
    )
    plan(cfg)
    actor = ShardWorker.remote(cfg.model_dump(mode="json"), 1, "xtok-worker-test")
    fut = actor.process.remote(str(inp / "long.jsonl"))
    prog = Progress(1)
    seen = []
    while not ray.wait([fut], timeout=0.05)[0]:
        _poll_progress(prog, [actor])
        if "long" in prog.running:
            seen.append(prog.running["long"]["fraction"])
    m = ray.get(fut)
    assert seen and all(0 < f <= 1 for f in seen) and seen == sorted(seen)
    assert m["sequences"] > 1
    ray.kill(actor)
