"""The training example end to end: a tiny run made by the real job (in-process
executor), then `jobs.train_student` streams it with the reader and trains a tiny
student on `pipeline.loss`; the loss must fall."""

from __future__ import annotations

import json
import math
import re

import pytest

from jobs.train_student import main as train_student
from pipeline import run as run_job
from tests.tiny_assets import tiny_job_config

pytestmark = pytest.mark.integration

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def _text(s: int, d: int) -> str:
    n = 4 + (7 * s + 5 * d) % 9
    return f"Doc {s}-{d}: " + " ".join(WORDS[(s + 3 * d + i) % len(WORDS)] for i in range(n)) + "."


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teacher_dir):
    """A run of 2 shards x 6 documents made by the real job."""
    root = tmp_path_factory.mktemp("train-run")
    (root / "in").mkdir()
    for s in range(2):
        recs = [{"id": f"s{s}d{d}", "text": _text(s, d)} for d in range(6)]
        (root / "in" / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = tiny_job_config(tiny_teacher_dir, f"{root}/in/*.jsonl", str(root / "out"))
    assert run_job(cfg, executor="local").stats["documents"] == 12
    return root / "out"


def test_student_learns_the_targets(run, capsys):
    rc = train_student(
        ["--run", str(run), "--steps", "40", "--batch-size", "4", "--lr", "3e-3", "--seed", "0"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    steps = [float(m) for m in re.findall(r"^step +\d+/40 .*? loss ([-\d.]+)", out, re.M)]
    assert len(steps) >= 8, out  # progress lines every 5 steps
    m = re.search(r"^loss first 10 steps ([\d.]+) -> last 10 steps ([\d.]+)$", out, re.M)
    assert m is not None, out
    first, last = float(m[1]), float(m[2])
    assert math.isfinite(first) and math.isfinite(last)
    # a random student starts near log(V) nats from the targets; 40 steps must cut that
    # substantially, not by noise
    assert last < 0.7 * first, out


def test_help_explains_the_example(capsys):
    with pytest.raises(SystemExit) as exc:
        train_student(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--run", "--steps", "--lr", "--batch-size", "--device", "--seed"):
        assert flag in out
    assert "sparse_kd_loss" in out and "temperature" in out


def test_missing_run_fails_clearly(tmp_path):
    from pipeline.reader import ShardError

    with pytest.raises(ShardError, match="no run index"):
        train_student(["--run", str(tmp_path / "nowhere"), "--steps", "1"])
