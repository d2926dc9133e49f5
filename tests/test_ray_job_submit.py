"""`ray job submit` against a head started by the test (`ray start --head`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny_assets import stop_process_group, tiny_job_args

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def foreign_python(tmp_path_factory):
    """A Python with nothing but Ray installed (the same Ray version), as a cluster
    started from a system or image Python has: the project and its dependencies are
    not there."""
    import ray

    venv = tmp_path_factory.mktemp("ray-only") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    r = subprocess.run(
        [
            f"{venv}/bin/python",
            "-m",
            "pip",
            "install",
            "-q",
            f"ray[default]=={ray.__version__}",
            "-c",
            str(ROOT / "infra" / "constraints.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot install ray into a second venv (no package index?): {r.stderr[-500:]}")
    return f"{venv}/bin"


@pytest.fixture()
def head(tmp_path, request):
    """A head started by ``ray start --head`` from this venv, or from the Ray-only venv
    when the test asks for ``foreign_head``."""
    bindir = (
        request.getfixturevalue("foreign_python")
        if "foreign_head" in request.keywords
        else os.path.dirname(sys.executable)
    )
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"rayjob-{os.getpid()}"  # short: Ray's socket paths are length-limited
    log = open(tmp_path / "head.log", "wb")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [
            f"{bindir}/ray",
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--include-dashboard=true",
            # the session's local Ray (other modules) holds the default agent ports
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        r = subprocess.run(
            [f"{bindir}/ray", "job", "list", "--address", address], env=env, capture_output=True
        )
        if r.returncode == 0:
            break
        assert proc.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
        time.sleep(1)
    else:
        pytest.fail("Ray head did not come up: " + (tmp_path / "head.log").read_text()[-3000:])
    yield address, env
    stop_process_group(proc, timeout=30)
    log.close()


def _submit(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    deadline = time.time() + 120
    while True:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        # the head answers `ray job list` before its job agent is up (slow on a busy
        # machine); Ray's own message says to try again later
        if r.returncode == 0 or "No available agent" not in r.stderr + r.stdout:
            return r
        assert time.time() < deadline, "the head's job agent never came up"
        time.sleep(2)


@pytest.mark.foreign_head
def test_the_readme_form_for_a_cluster_started_from_another_python(
    head, tiny_teacher_dir, tmp_path
):
    """The cluster's Python has Ray only. The plain form fails (ModuleNotFoundError in
    the driver); the README's form (the project's venv Python as the entrypoint and as
    the workers' ``py_executable``) runs the job."""
    address, env = head
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "q.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "text": f"Question {i}?"}) + "\n" for i in range(4))
    )

    def job(out: str) -> list[str]:
        return ["-m", "jobs.generate", *tiny_job_args(tiny_teacher_dir, f"{inp}/*.jsonl", out)]

    ray_cli = [f"{env['PATH'].split(':')[0]}/ray", "job", "submit", "--address", address]
    plain = _submit(
        [*ray_cli, "--working-dir", str(ROOT), "--", "python", *job(str(tmp_path / "out"))], env
    )
    assert plain.returncode != 0 and "ModuleNotFoundError" in plain.stdout + plain.stderr
    venv_python = sys.executable  # the project's venv, at the same path on every node
    runtime_env = json.dumps({"py_executable": venv_python})
    r = _submit(
        [
            *ray_cli,
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            runtime_env,
            "--",
            venv_python,
            *job(str(tmp_path / "out2")),
        ],
        env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "out2" / "index.json").read_text())["totals"]["documents"] == 4


def test_ray_job_submit_runs_a_tiny_job(head, tiny_teacher_dir, tmp_path):
    address, env = head
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "q.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "text": f"Question {i}?"}) + "\n" for i in range(4))
    )
    out = tmp_path / "out"
    cmd = [
        f"{os.path.dirname(sys.executable)}/ray",
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "-m",
        "jobs.generate",
        *tiny_job_args(tiny_teacher_dir, f"{inp}/*.jsonl", str(out)),
    ]
    deadline = time.time() + 120
    while True:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        # the head answers `ray job list` before its job agent is up (slow on a busy
        # machine); Ray's own message says to try again later
        if r.returncode == 0 or "No available agent" not in r.stderr + r.stdout:
            break
        assert time.time() < deadline, "the head's job agent never came up"
        time.sleep(2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    index = json.loads((out / "index.json").read_text())
    assert index["totals"]["documents"] == 4
