"""s3:// input and output against a real S3-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import s3fs

from jobs.generate import main
from pipeline import io as xio
from pipeline.config import ConfigError, load_config
from pipeline.executors import plan
from pipeline.shards import read_table
from tests.tiny_assets import tiny_job_args

pytestmark = pytest.mark.integration


def _opts_yaml(opts: dict) -> str:
    return json.dumps(opts)  # JSON is YAML


def test_job_reads_and_writes_s3(s3_server, ray_local, tiny_teacher_dir, capfd, caplog):
    opts, bucket = s3_server["options"], s3_server["bucket"]
    fs = s3fs.S3FileSystem(**opts)
    for k in range(2):
        fs.pipe_file(
            f"{bucket}/in/p{k}.jsonl",
            "".join(
                json.dumps({"id": f"p{k}-{i}", "text": f"Text {i} of part {k}."}) + "\n"
                for i in range(3)
            ).encode(),
        )
    args = [
        *tiny_job_args(tiny_teacher_dir, f"s3://{bucket}/in/*.jsonl", f"s3://{bucket}/out"),
        f"input.storage_options={_opts_yaml(opts)}",
        f"output.storage_options={_opts_yaml(opts)}",
    ]
    assert main(args) == 0
    index = json.loads(fs.cat_file(f"{bucket}/out/index.json"))
    assert [s["name"] for s in index["shards"]] == ["p0", "p1"]
    docs = []
    for s in index["shards"]:
        m = json.loads(fs.cat_file(f"{bucket}/out/{s['manifest']}"))
        docs += [
            r["doc_id"] for r in read_table(f"s3://{bucket}/out/{s['file']}", opts, m).to_pylist()
        ]
    assert docs == [f"p{k}-{i}" for k in range(2) for i in range(3)]
    assert not [p for p in fs.ls(f"{bucket}/out") if "tmp" in p or "_write_probe" in p]
    # the credentials given in storage_options are nowhere in the outputs (config.yaml
    # and run_config.json held them in plain text), the shard logs or the console
    written = {p: fs.cat_file(p) for p in fs.find(f"{bucket}/out")}
    assert {p.rsplit("/", 1)[-1] for p in written} >= {"config.yaml", "run_config.json", "p0.log"}
    said = capfd.readouterr()
    for secret in (opts["key"], opts["secret"]):
        leaks = [p for p, data in written.items() if secret.encode() in data]
        assert not leaks, f"{secret!r} written to {leaks}"
        assert secret not in said.out + said.err + caplog.text
    saved = json.loads(written[f"{bucket}/out/run_config.json"])["config"]
    assert saved["output"]["storage_options"] == {
        "key": "***",
        "secret": "***",
        "endpoint_url": opts["endpoint_url"],
    }


def test_credentials_are_masked_by_name_and_by_value_in_any_text():
    from pipeline import redact

    cfg = {
        "input": {
            "storage_options": {
                "client_kwargs": {"aws_secret_access_key": "s3cr3t-value", "region_name": "x"},
                "token": "tok-123456",
            }
        },
        "output": {"path": "s3://b/o", "storage_options": {}},
    }
    assert redact.public(cfg)["input"]["storage_options"] == {
        "client_kwargs": {"aws_secret_access_key": "***", "region_name": "x"},
        "token": "***",
    }
    # a storage client's error that quotes a credential is masked in logs and messages
    text = "cannot write: signature of s3cr3t-value and tok-123456 rejected"
    assert redact.redact(text) == "cannot write: signature of *** and *** rejected"
    import logging

    record = logging.LogRecord("pipeline", logging.ERROR, __file__, 1, "failed: %s", (text,), None)
    redact.RedactingFilter().filter(record)
    assert "s3cr3t" not in record.getMessage() and "tok-1234" not in record.getMessage()


def test_interrupted_write_leaves_no_partial_object(s3_server):
    opts, bucket = s3_server["options"], s3_server["bucket"]
    url = f"s3://{bucket}/atomic/big.bin"
    size = 64 * 2**20
    code = textwrap.dedent(f"""
        import sys
        from pipeline import io as xio
        print("start", flush=True)
        xio.write_bytes_atomic({url!r}, b"x" * {size}, {opts!r})
        print("done", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "start"
    time.sleep(0.3)
    proc.kill()  # the writer dies in the middle of its upload
    proc.wait()
    fs = s3fs.S3FileSystem(**opts)
    if fs.exists(url):  # either the whole object, or nothing
        assert fs.info(url)["size"] == size
    # and a complete write is visible whole
    xio.write_bytes_atomic(url, b"y" * 1000, opts)
    assert xio.read_bytes(url, opts) == b"y" * 1000


def test_wrong_credentials_give_a_clear_error(s3_server, tmp_path, tiny_teacher_dir):
    bad = {**s3_server["options"], "secret": "wrong"}
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    cfg = load_config(
        None,
        [
            f"teacher.model={tiny_teacher_dir}",
            "student.merges=60",
            "input.messages_field=null",
            "input.loss_on=all",
            f"input.paths=[{tmp_path}/x.jsonl]",
            f"output.path=s3://{s3_server['bucket']}/denied",
            f"output.storage_options={_opts_yaml(bad)}",
        ],
    )
    with pytest.raises(
        ConfigError, match=r"not writable.*(Signature|Access|denied|credentials|Forbidden)"
    ):
        plan(cfg)
    with pytest.raises(xio.StorageError):
        xio.read_bytes(f"s3://{s3_server['bucket']}/atomic/big.bin", bad)
