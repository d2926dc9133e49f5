"""S3 faults: a loopback HTTP proxy between s3fs and a moto S3 server that can be told
to answer errors or drop connections, and what `pipeline.io` / `commit_shard` make of
them: transient faults are retried into a whole object; persistent ones raise a
`StorageError` naming the URL, with nothing partial visible under a final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import struct
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import s3fs

from pipeline import io as xio
from pipeline.shards import DATA_SUFFIX, MANIFEST_SUFFIX, commit_shard, sha256

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Match = Callable[[str, str], bool]  # (method, request target) -> does the fault apply


@dataclass
class Fault:
    match: Match
    # an HTTP status (answered with an S3 error body), "reset" (drop both connections
    # half-way through the request body), "drop_response" (forward the request, drop
    # the connection instead of answering) or "truncate" (half the response body)
    action: int | str
    times: int | None  # None: every matching request


@dataclass
class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream``; one request per client
    connection (every response says ``Connection: close``). Faults are applied to the
    next matching requests; ``log`` records (method, target, outcome) of each request.
    Its threads are daemons with socket timeouts, and `stop` ends the accept loop."""

    upstream: tuple[str, int]
    timeout: float = 10.0
    faults: list[Fault] = field(default_factory=list)
    log: list[tuple[str, str, str]] = field(default_factory=list)
    body_bytes: list[tuple[str, str, int]] = field(default_factory=list)  # answered whole

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, match: Match, action: int | str, times: int | None = 1) -> None:
        with self._lock:
            self.faults.append(Fault(match, action, times))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def outcomes(self, method: str, key: str) -> list[str]:
        with self._lock:
            return [o for m, t, o in self.log if m == method and key in t]

    def bytes_sent(self, method: str, key: str) -> int:
        """Response body bytes of the whole answers to ``method`` requests for ``key``."""
        with self._lock:
            return sum(n for m, t, n in self.body_bytes if m == method and t.split("?")[0] == key)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    # ---------------------------------------------------------------- internals
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _take(self, method: str, target: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.match(method, target) and (f.times is None or f.times > 0):
                    if f.times is not None:
                        f.times -= 1
                    return f
        return None

    def _record(self, method: str, target: str, outcome: str) -> None:
        with self._lock:
            self.log.append((method, target, outcome))

    def _handle(self, client: socket.socket) -> None:
        client.settimeout(self.timeout)
        try:
            rfile = client.makefile("rb")
            request_line = rfile.readline()
            if not request_line:
                return
            method, target, _ = request_line.decode("latin-1").split(" ", 2)
            headers: list[tuple[str, str]] = []
            while (line := rfile.readline()) not in (b"\r\n", b"\n", b""):
                k, v = line.decode("latin-1").split(":", 1)
                headers.append((k.strip(), v.strip()))
            lower = {k.lower(): v for k, v in headers}
            if lower.get("expect", "").lower() == "100-continue":
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            fault = self._take(method, target)
            action = None if fault is None else fault.action
            if action == "reset" and "content-length" in lower:
                # only half the body is read: a large upload is cut while still being sent
                body = rfile.read(int(lower["content-length"]) // 2)
            else:
                body = _read_body(rfile, lower)
            rfile.close()  # else the socket stays open (and cannot be reset) while it lives
            keep = [(k, v) for k, v in headers if k.lower() not in ("expect", "connection")]
            head = (
                request_line
                + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in keep)
                + b"Connection: close\r\n\r\n"
            )
            if isinstance(action, int):
                self._record(method, target, str(action))
                code = {500: "InternalError", 503: "ServiceUnavailable"}.get(action, "Error")
                xml = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>injected fault</Message></Error>"
                ).encode()
                client.sendall(
                    f"HTTP/1.1 {action} Injected\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(xml)}\r\nConnection: close\r\n\r\n".encode()
                    + xml
                )
                return
            with socket.create_connection(self.upstream, timeout=self.timeout) as up:
                if action == "reset":
                    # the server gets the head and half the body, then both sides drop
                    up.sendall(head + body)
                    _reset(up)
                    self._record(method, target, "reset")
                    _reset(client)
                    return
                up.sendall(head + body)
                parts = []
                while chunk := up.recv(1 << 20):
                    parts.append(chunk)
            response = b"".join(parts)
            status = response.split(b" ", 2)[1].decode()
            if action == "drop_response":  # the server has acted; the client never hears
                self._record(method, target, f"{status}, dropped")
                _reset(client)
                return
            if action == "truncate":  # half the response body, then the connection drops
                cut = response.index(b"\r\n\r\n") + 4
                client.sendall(response[: cut + (len(response) - cut) // 2])
                self._record(method, target, f"{status}, truncated")
                _reset(client)
                return
            self._record(method, target, status)
            with self._lock:
                self.body_bytes.append(
                    (method, target, len(response) - response.index(b"\r\n\r\n") - 4)
                )
            client.sendall(response)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()


def _read_body(rfile: Any, headers: dict[str, str]) -> bytes:
    """The raw request body (Content-Length, or chunked kept as sent)."""
    if "content-length" in headers:
        return rfile.read(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() != "chunked":
        return b""
    out = b""
    while True:
        size_line = rfile.readline()
        out += size_line
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while (trailer := rfile.readline()) not in (b"\r\n", b"\n", b""):
                out += trailer
            return out + b"\r\n"
        out += rfile.read(size + 2)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dropped network connection looks."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


# ----------------------------------------------------------------------------- tests
# Persistent-failure tests cap the client's retries so they give up in about a second;
# the transient tests run with the defaults a user gets (botocore: 5 attempts with
# exponential backoff; aiohttp resends an idempotent request once on a dropped
# connection; s3fs retries throttling and truncated reads on top).
CAPPED = {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 2}}}
PART = 50 * 2**20  # s3fs's multipart chunk: objects of 2 parts or more go multipart


@pytest.fixture()
def proxy(moto_s3):
    px = FaultProxy((moto_s3["host"], moto_s3["port"]))
    yield px
    px.stop()


@pytest.fixture()
def prefix(moto_s3) -> str:
    """A fresh key prefix (bucket/...) for each test on the shared server."""
    return f"{moto_s3['bucket']}/{uuid.uuid4().hex[:12]}"


def _opts(moto_s3, px: FaultProxy, **extra: Any) -> dict[str, Any]:
    return {**moto_s3["options"], "endpoint_url": px.endpoint, **extra}


def _direct(moto_s3) -> s3fs.S3FileSystem:
    """A client straight to the server (no proxy, no cached listings) to see what is there."""
    return s3fs.S3FileSystem(
        skip_instance_cache=True, use_listings_cache=False, **moto_s3["options"]
    )


def _put(key: str) -> Match:
    return lambda method, target: method == "PUT" and target.split("?")[0] == f"/{key}"


def _part(key: str, n: int) -> Match:
    return lambda method, target: method == "PUT" and target.startswith(f"/{key}?partNumber={n}&")


@pytest.mark.parametrize(
    ("action", "times"), [(503, 3), (500, 2), ("reset", 2), ("drop_response", 1)]
)
def test_transient_put_faults_are_retried_into_the_whole_object(
    moto_s3, proxy, prefix, action, times
):
    key = f"{prefix}/obj.bin"
    data = os.urandom(8 << 20)  # larger than the socket buffers: cut mid-send
    proxy.fail(_put(key), action, times)
    xio.write_bytes_atomic(f"s3://{key}", data, _opts(moto_s3, proxy))
    outcomes = proxy.outcomes("PUT", key)
    # every injected fault was met, then one more attempt succeeded
    assert len(outcomes) == times + 1 and outcomes[-1] == "200", outcomes
    assert all(o != "200" for o in outcomes[:-1])
    fs = _direct(moto_s3)
    assert fs.cat_file(key) == data
    assert fs.find(prefix) == [key]


@pytest.mark.parametrize(("action", "times"), [(503, 2), ("truncate", 2), ("reset", 1)])
def test_transient_read_faults_are_retried(moto_s3, proxy, prefix, action, times):
    key = f"{prefix}/in.jsonl"
    data = os.urandom(2_000_000)
    _direct(moto_s3).pipe_file(key, data)
    proxy.fail(lambda m, t: m == "GET" and t.split("?")[0] == f"/{key}", action, times)
    assert xio.read_bytes(f"s3://{key}", _opts(moto_s3, proxy)) == data
    outcomes = proxy.outcomes("GET", key)
    assert len(outcomes) == times + 1 and outcomes[-1] == "200", outcomes


@pytest.mark.parametrize(
    ("action", "cause"),
    # a reset reads "Connection reset by peer" or, when it hits the request body being
    # written, aiohttp's "ClientConnectionResetError: Cannot write to closing transport"
    [(503, "ServiceUnavailable"), (500, "InternalError"), ("reset", r"(?i)connection ?reset")],
)
def test_a_persistent_put_failure_is_a_clear_error_and_publishes_nothing(
    moto_s3, proxy, prefix, action, cause
):
    key, fresh = f"{prefix}/obj.bin", f"{prefix}/fresh.bin"
    opts = _opts(moto_s3, proxy, **CAPPED)
    old = b"version 1\n" * 10_000
    fs = _direct(moto_s3)
    fs.pipe_file(key, old)
    proxy.fail(lambda m, t: m == "PUT", action, None)
    for k in (key, fresh):
        with pytest.raises(xio.StorageError) as info:
            xio.write_bytes_atomic(f"s3://{k}", os.urandom(8 << 20), opts)
        msg = str(info.value)
        assert msg.startswith(f"cannot write 's3://{k}'") and re.search(cause, msg), msg
        outcomes = proxy.outcomes("PUT", k)
        assert len(outcomes) >= 2 and "200" not in outcomes, outcomes  # retried, then gave up
    assert fs.cat_file(key) == old  # the previous object, whole: never a partial new one
    assert not fs.exists(fresh)
    assert fs.find(prefix) == [key]  # no temporary or partial objects anywhere


@pytest.mark.parametrize("action", [503, "reset"])
@pytest.mark.parametrize("failing", [DATA_SUFFIX, MANIFEST_SUFFIX])
def test_commit_shard_never_leaves_a_manifest_without_its_data(
    moto_s3, proxy, prefix, failing, action
):
    opts = _opts(moto_s3, proxy, **CAPPED)
    out, name = f"s3://{prefix}/out", "train-0001"
    data_key, manifest_key = (
        f"{prefix}/out/{name}{DATA_SUFFIX}",
        f"{prefix}/out/{name}{MANIFEST_SUFFIX}",
    )
    data = os.urandom(300_000)
    proxy.fail(lambda m, t: m == "PUT" and t.split("?")[0].endswith(failing), action, None)
    with pytest.raises(xio.StorageError, match=f"cannot write 's3://{prefix}/out/{name}{failing}'"):
        commit_shard(out, name, data, {"config_hash": "abc"}, opts)
    fs = _direct(moto_s3)
    assert not fs.exists(manifest_key)  # the shard is not done: a rerun redoes it
    if failing == MANIFEST_SUFFIX:
        assert fs.cat_file(data_key) == data  # published whole before the manifest failed
    else:
        assert not fs.exists(data_key)
    # once storage recovers, the rerun commits the shard; the manifest describes its data
    proxy.clear()
    m = commit_shard(out, name, data, {"config_hash": "abc"}, opts)
    on_disk = json.loads(fs.cat_file(manifest_key))
    assert on_disk == m
    stored = fs.cat_file(data_key)
    assert on_disk["sha256"] == sha256(stored) == sha256(data)
    assert on_disk["bytes"] == len(data) and on_disk["file"] == name + DATA_SUFFIX
    assert sorted(fs.find(prefix)) == sorted([data_key, manifest_key])


@pytest.fixture(scope="module")
def big() -> bytes:
    """Two full multipart chunks and a bit: s3fs uploads it as 3 parts."""
    return os.urandom(1 << 20) * (2 * PART // (1 << 20) + 1)


def test_a_dropped_part_upload_is_retried_into_the_whole_object(moto_s3, proxy, prefix, big):
    key = f"{prefix}/big.parquet"
    proxy.fail(_part(key, 2), "reset", 1)
    xio.write_bytes_atomic(f"s3://{key}", big, _opts(moto_s3, proxy))
    assert proxy.outcomes("PUT", f"{key}?partNumber=2&") == ["reset", "200"]
    got = _direct(moto_s3).cat_file(key)
    assert len(got) == len(big) and hashlib.sha256(got).digest() == hashlib.sha256(big).digest()


def test_a_part_that_keeps_failing_aborts_the_upload_and_publishes_nothing(
    moto_s3, proxy, prefix, big
):
    key = f"{prefix}/big.parquet"
    proxy.fail(_part(key, 2), "reset", None)
    # "Connection reset by peer", or "ClientConnectionResetError" mid-body (see above)
    with pytest.raises(xio.StorageError, match=f"(?i)cannot write 's3://{key}'.*connection ?reset"):
        xio.write_bytes_atomic(f"s3://{key}", big, _opts(moto_s3, proxy, **CAPPED))
    assert len(proxy.outcomes("PUT", f"{key}?partNumber=2&")) >= 2
    # parts 1 and 3 were uploaded, but the upload was never completed: it was aborted
    assert not [t for m, t, _ in proxy.log if m == "POST" and t.startswith(f"/{key}?uploadId=")]
    assert [o for m, t, o in proxy.log if m == "DELETE" and t.startswith(f"/{key}?uploadId=")] == [
        "204"
    ]
    fs = _direct(moto_s3)
    assert not fs.exists(key)
    bucket, _, sub = prefix.partition("/")
    pending = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=sub)
    assert not pending.get("Uploads")


@pytest.mark.timeout(300)
def test_a_shard_whose_storage_stays_down_is_retried_by_the_ray_executor(
    moto_s3, proxy, prefix, ray_local, tiny_teacher_dir, tmp_path, caplog
):
    """The object store refuses one shard's data file for longer than botocore retries
    (capped at 2 attempts here): the Ray executor puts the shard back and a later
    attempt commits it; the other shard is untouched and the run completes."""
    from jobs.generate import main
    from tests.tiny_assets import tiny_job_args

    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(2):
        (inp / f"p{k}.jsonl").write_text(
            "".join(
                json.dumps({"id": f"p{k}-{i}", "text": f"Text {i} of {k}."}) + "\n"
                for i in range(3)
            )
        )
    opts = _opts(moto_s3, proxy, **CAPPED)
    data_key = f"/{prefix}/out/p0{DATA_SUFFIX}"
    proxy.fail(lambda m, t: m == "PUT" and t.split("?")[0] == data_key, 503, 2)
    args = tiny_job_args(
        tiny_teacher_dir,
        f"{inp}/*.jsonl",
        f"s3://{prefix}/out",
        f"output.storage_options={json.dumps(opts)}",
        "ray.storage_retry_seconds=0.5",
    )
    with caplog.at_level("WARNING", logger="pipeline.ray_executor"):
        assert main(args) == 0
    assert proxy.outcomes("PUT", data_key) == ["503", "503", "200"]  # 2 refused, then whole
    assert "storage error" in caplog.text and "attempt 1/3" in caplog.text
    fs = _direct(moto_s3)
    index = json.loads(fs.cat_file(f"{prefix}/out/index.json"))
    assert [s["name"] for s in index["shards"]] == ["p0", "p1"]
    m = json.loads(fs.cat_file(f"{prefix}/out/p0{MANIFEST_SUFFIX}"))
    assert m["sha256"] == sha256(fs.cat_file(data_key.lstrip("/")))
    # the shard log keeps every attempt in order: the failed one with its traceback, the
    # driver's retry line, then the one that committed; the console has no ERROR line
    story = fs.cat_file(f"{prefix}/out/logs/p0.log").decode()
    marks = [
        "start (attempt 1)",
        "FAILED (attempt 1)",
        "Traceback",
        "storage error after the client's retries",
        "start (attempt 2)",
        "committed p0",
    ]
    assert all(x in story for x in marks), story
    assert [story.index(x) for x in marks] == sorted(story.index(x) for x in marks)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
