"""Input formats end to end: an HF dataset saved with `save_to_disk`, jsonl in fsspec's
``memory://`` filesystem, Parquet with a configurable text field, jsonl.zst; each read
by `read_shard`, planned by `plan`, and run through the job with the in-process (local)
executor and the tiny teacher. ``memory://`` lives in one process, so only the local
executor can read it. A ``gs://`` URL without gcsfs is a clear config error."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from jobs.generate import main
from pipeline import io as xio
from pipeline.config import ConfigError, InputConfig, load_config
from pipeline.executors import plan
from pipeline.records import Document, InputError, Skip, read_shard
from pipeline.shards import read_table
from pipeline.tokenization import load_tokenizer, truncate_merges
from tests.tiny_assets import tiny_job_args

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers 12 and 345, then  two spaces and a tab\there.",
    "Short one.",
]


def _overrides(teacher_dir: Any, paths: str, out: str, *extra: str) -> list[str]:
    return tiny_job_args(teacher_dir, paths, out, *extra)[2:]  # without "--show 0"


def _run(teacher_dir: Any, paths: str, out: str, *extra: str) -> list[tuple[str, str]]:
    """Run the job in-process; (doc id, decoded student input ids) of every stored
    sequence, shard by shard in index order, each checked against its manifest."""
    assert main(["--executor", "local", *tiny_job_args(teacher_dir, paths, out, *extra)]) == 0
    student = truncate_merges(load_tokenizer(teacher_dir), 60)
    index = xio.read_json(xio.join(out, "index.json"))
    rows = []
    for s in index["shards"]:
        m = xio.read_json(xio.join(out, s["manifest"]))
        for r in read_table(xio.join(out, s["file"]), manifest=m).to_pylist():
            rows.append((r["doc_id"], student.decode(r["input_ids"])))
    return rows


def _docs(records: list[Document | Skip]) -> list[tuple[str, str]]:
    return [(r.doc_id, r.text) for r in records if isinstance(r, Document)]


def test_hf_dataset_saved_to_disk(tiny_teacher_dir, tmp_path):
    import datasets

    ds_dir = tmp_path / "corpus" / "train-hf"
    ids = [f"h{i}" for i in range(len(TEXTS))]
    datasets.Dataset.from_dict({"id": ids, "text": TEXTS, "n": [1, 2, 3]}).save_to_disk(str(ds_dir))
    want = list(zip(ids, TEXTS, strict=True))
    cfg_in = InputConfig(format="hf_disk")
    assert _docs(read_shard(str(ds_dir), cfg_in).records) == want
    assert (
        _docs(read_shard(str(ds_dir), InputConfig(format="hf_disk", limit=2)).records) == want[:2]
    )

    out = str(tmp_path / "out")
    p = plan(
        load_config(None, _overrides(tiny_teacher_dir, str(ds_dir), out, "input.format=hf_disk"))
    )
    assert p.shards == [str(ds_dir)] and p.names == {str(ds_dir): "train-hf"} and not p.done
    assert _run(tiny_teacher_dir, str(ds_dir), out, "input.format=hf_disk") == want
    assert xio.read_json(xio.join(out, "train-hf.manifest.json"))["records_in"] == len(TEXTS)

    # a DatasetDict (several splits) or a missing directory: clear errors
    dd_dir = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})}).save_to_disk(
        str(dd_dir)
    )
    with pytest.raises(xio.StorageError, match=r"DatasetDict; point input\.paths at one split"):
        read_shard(str(dd_dir), cfg_in)
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="does not exist"):
        plan(load_config(None, _overrides(tiny_teacher_dir, missing, out, "input.format=hf_disk")))
    # the dataset's files, read without input.format=hf_disk: a message that says what to do
    arrow = next(str(f) for f in ds_dir.iterdir() if f.suffix == ".arrow")
    with pytest.raises(xio.StorageError, match=r"input\.format=hf_disk"):
        read_shard(arrow, InputConfig())
    # ... and the job refuses the directory at plan time, before any model loads
    with pytest.raises(ConfigError, match=r"input\.format=hf_disk"):
        plan(load_config(None, _overrides(tiny_teacher_dir, f"{ds_dir}/*", out)))


@pytest.fixture()
def memory_root():
    """A fresh folder in fsspec's in-process memory filesystem, removed afterwards."""
    root = f"memory://xtok-inputs-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_url_jsonl(tiny_teacher_dir, memory_root):
    fs = fsspec.filesystem("memory")
    parts = {"m0": TEXTS[:2], "m1": TEXTS[2:]}
    for name, texts in parts.items():
        recs = [{"id": f"{name}-{i}", "text": t} for i, t in enumerate(texts)]
        fs.pipe_file(
            f"{memory_root}/in/{name}.jsonl",
            "".join(json.dumps(r) + "\n" for r in recs).encode(),
        )
    fs.pipe_file(f"{memory_root}/in/_SUCCESS", b"")  # marker files are not inputs
    want = [(f"{n}-{i}", t) for n, texts in parts.items() for i, t in enumerate(texts)]
    urls = xio.expand([f"{memory_root}/in"])
    assert [u.rsplit("/", 1)[-1] for u in urls] == ["m0.jsonl", "m1.jsonl"]
    assert [d for u in urls for d in _docs(read_shard(u, InputConfig()).records)] == want

    out = f"{memory_root}/out"  # the output may live there too: one fsspec entry point
    p = plan(load_config(None, _overrides(tiny_teacher_dir, f"{memory_root}/in/*.jsonl", out)))
    assert p.shards == urls and sorted(p.names.values()) == ["m0", "m1"]
    assert _run(tiny_teacher_dir, f"{memory_root}/in/*.jsonl", out) == want
    assert fs.exists(f"{out}/m1.manifest.json") and fs.exists(f"{out}/index.json")


def test_parquet_with_a_configured_text_field(tiny_teacher_dir, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(
        pa.table(
            {
                "uid": ["p0", "p1", "p2", "p3"],
                "body": [TEXTS[0], None, TEXTS[1], TEXTS[2]],
                "text": ["decoy"] * 4,  # the default field, not the configured one
            }
        ),
        inp / "shard-a.parquet",
    )
    pq.write_table(pa.table({"body": [TEXTS[2]]}), inp / "shard-b.parquet")  # no id column
    cfg_in = InputConfig(text_field="body", id_field="uid")
    a = read_shard(str(inp / "shard-a.parquet"), cfg_in).records
    assert _docs(a) == [("p0", TEXTS[0]), ("p2", TEXTS[1]), ("p3", TEXTS[2])]
    assert [(s.index, s.doc_id) for s in a if isinstance(s, Skip)] == [(1, "p1")]
    # without an id, the document id is the shard name and the record index
    assert _docs(read_shard(str(inp / "shard-b.parquet"), cfg_in).records) == [
        ("shard-b.parquet:0", TEXTS[2])
    ]

    out = str(tmp_path / "out")
    extra = ("input.text_field=body", "input.id_field=uid")
    p = plan(load_config(None, _overrides(tiny_teacher_dir, f"{inp}/*.parquet", out, *extra)))
    assert [p.names[s] for s in p.shards] == ["shard-a", "shard-b"]
    assert _run(tiny_teacher_dir, f"{inp}/*.parquet", out, *extra) == [
        ("p0", TEXTS[0]),
        ("p2", TEXTS[1]),
        ("p3", TEXTS[2]),
        ("shard-b.parquet:0", TEXTS[2]),
    ]
    m = xio.read_json(xio.join(out, "shard-a.manifest.json"))
    assert m["records_in"] == 4 and m["documents"] == 3
    assert [(s["index"], s["doc_id"]) for s in m["skipped"]] == [(1, "p1")]
    assert "not a string" in m["skipped"][0]["reason"]


def test_jsonl_zst(tiny_teacher_dir, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    lines = [json.dumps({"id": f"z{i}", "text": t}).encode() for i, t in enumerate(TEXTS)]
    lines.insert(1, b'{"id": "cut", "text": "no end')
    raw = b"\n".join(lines) + b"\n"
    (inp / "part-00.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))
    # a streamed frame (no content size in the header), as `zstd` and writers produce
    cctx = zstandard.ZstdCompressor()
    with open(inp / "part-01.jsonl.zst", "wb") as f, cctx.stream_writer(f) as w:
        w.write(json.dumps({"id": "s0", "text": TEXTS[2]}).encode() + b"\n")
    records = read_shard(str(inp / "part-00.jsonl.zst"), InputConfig()).records
    assert _docs(records) == [(f"z{i}", t) for i, t in enumerate(TEXTS)]
    assert [(s.index, s.reason.split(":")[0]) for s in records if isinstance(s, Skip)] == [
        (1, "malformed JSON")
    ]
    assert _docs(read_shard(str(inp / "part-01.jsonl.zst"), InputConfig()).records) == [
        ("s0", TEXTS[2])
    ]

    out = str(tmp_path / "out")
    p = plan(load_config(None, _overrides(tiny_teacher_dir, str(inp), out)))
    assert [p.names[s] for s in p.shards] == ["part-00", "part-01"]
    assert _run(tiny_teacher_dir, str(inp), out) == [
        *[(f"z{i}", t) for i, t in enumerate(TEXTS)],
        ("s0", TEXTS[2]),
    ]
    m = xio.read_json(xio.join(out, "part-00.manifest.json"))
    assert m["records_in"] == len(TEXTS) + 1 and m["documents"] == len(TEXTS)
    # a file that is not zstd is a clear storage error, not a crash in the decoder
    (inp / "bad.jsonl.zst").write_bytes(b'{"text": "plain"}\n')
    with pytest.raises(InputError, match="not valid zstd"):
        read_shard(str(inp / "bad.jsonl.zst"), InputConfig())
    # concatenated frames (``zstd a >> b``) are read whole
    two = inp / "two.jsonl.zst"
    two.write_bytes(
        zstandard.ZstdCompressor().compress(lines[0] + b"\n")
        + zstandard.ZstdCompressor().compress(lines[2] + b"\n")
    )
    assert [d[0] for d in _docs(read_shard(str(two), InputConfig()).records)] == ["z0", "z1"]


def _news(n: int) -> list[bytes]:
    return [
        json.dumps(
            {"id": f"n{i}", "text": f"Report {i}: " + "the council met again. " * 40}
        ).encode()
        + b"\n"
        for i in range(n)
    ]


@pytest.mark.parametrize("n_docs", [10, 150])
def test_truncated_or_damaged_inputs_fail_their_shard_and_the_run(
    tiny_teacher_dir, tmp_path, n_docs, caplog
):
    """Half of a .jsonl.zst used to read as 0 records and commit an empty shard with exit
    0 (zstandard's stream reader returns what it has for a cut frame). Every compression
    the reader accepts, a jsonl cut inside a record and a Parquet file with a damaged
    footer must fail with a named error, commit nothing and fail the run."""
    raw = b"".join(_news(n_docs))
    whole = zstandard.ZstdCompressor(level=3).compress(raw)
    streamed = io.BytesIO()  # streamed frame: no content size in the header
    with zstandard.ZstdCompressor().stream_writer(streamed, closefd=False) as w:
        w.write(raw)
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [str(i) for i in range(n_docs)], "text": ["x y"] * n_docs}), buf)
    pq_bytes = buf.getvalue()
    damaged_pq = bytearray(pq_bytes)
    damaged_pq[-8:-4] = b"\xff\xff\xff\x7f"  # footer length beyond the file
    cases = {
        "half.jsonl.zst": (whole[: len(whole) // 2], "truncated zstd"),
        "half-streamed.jsonl.zst": (
            streamed.getvalue()[: len(streamed.getvalue()) // 2],
            "truncated zstd",
        ),
        "half.jsonl.gz": (gzip.compress(raw)[: len(gzip.compress(raw)) // 2], "not a whole gzip"),
        "cut.jsonl": (raw[: len(raw) // 2 + 7], "ends inside a record"),
        "footer.parquet": (bytes(damaged_pq), "not a readable Parquet"),
    }
    for name, (data, msg) in cases.items():
        inp = tmp_path / name.replace(".", "_")
        inp.mkdir()
        (inp / name).write_bytes(data)
        with pytest.raises(InputError, match=msg):
            read_shard(str(inp / name), InputConfig())
        out = tmp_path / f"out-{name}"
        assert (
            main(["--executor", "local", *tiny_job_args(tiny_teacher_dir, str(inp), str(out))]) == 1
        )
        assert not list(out.glob("*.manifest.json")) and not (out / "index.json").exists()
        assert msg in caplog.text
        # the shard log names the failure
        log_text = (out / "logs" / f"{name.split('.')[0]}.log").read_text()
        assert "InputError" in log_text and msg in log_text
    # a jsonl whose last record is whole but has no newline is read whole
    ok = tmp_path / "nonl.jsonl"
    ok.write_bytes(raw.rstrip(b"\n"))
    assert len(_docs(read_shard(str(ok), InputConfig()).records)) == n_docs


def test_a_wrong_text_field_is_a_named_error_not_an_empty_shard(tiny_teacher_dir, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(
        pa.table({"id": ["a", "b"], "content": ["Some text here.", "More text."]}),
        inp / "web.parquet",
    )
    with pytest.raises(
        InputError, match=r"field 'text' \(input.text_field\); fields found: content, id"
    ):
        read_shard(str(inp / "web.parquet"), InputConfig())
    out = tmp_path / "out"
    assert main(["--executor", "local", *tiny_job_args(tiny_teacher_dir, str(inp), str(out))]) == 1
    assert not (out / "web.manifest.json").exists()
    # chats: the same for input.messages_field
    (inp / "c.jsonl").write_text('{"id": 1, "conversation": []}\n')
    with pytest.raises(InputError, match=r"input.messages_field.*fields found: conversation, id"):
        read_shard(str(inp / "c.jsonl"), InputConfig(messages_field="messages"))
    # some records without the field are only skipped, by kind, with 1-based line numbers
    (inp / "mixed.jsonl").write_text('{"text": "ok then"}\n{"body": "x"}\n')
    recs = read_shard(str(inp / "mixed.jsonl"), InputConfig()).records
    skip = recs[1]
    assert isinstance(skip, Skip)
    assert (skip.index, skip.line, skip.kind) == (1, 2, "missing text field")
    # statistics group by kind: keys carry no data (they were the text before ":",
    # e.g. 'invalid UTF-8 at byte 31')
    (inp / "bad.jsonl").write_bytes(
        b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n{"text": "x\xff"}\n[1]\n{"text": 5}\n'
    )
    from schemas.run import skipped_by_kind

    recs = read_shard(str(inp / "bad.jsonl"), InputConfig()).records
    skipped = [r.as_dict() for r in recs if isinstance(r, Skip)]
    assert skipped_by_kind([{"skipped": skipped}]) == {
        "invalid UTF-8": 2,
        "not a JSON object": 1,
        "text not a string": 1,
    }
    assert [s["line"] for s in skipped] == [2, 3, 4, 5]
    assert "at byte" in skipped[0]["reason"]  # the details stay in the reason
    # the right field: the run commits; a run whose every record is skipped does not exit 0
    assert (
        main(
            [
                "--executor",
                "local",
                *tiny_job_args(
                    tiny_teacher_dir,
                    str(inp / "web.parquet"),
                    str(out),
                    "input.text_field=content",
                    "--overwrite",
                ),
            ]
        )
        == 0
    )
    out2 = tmp_path / "out2"
    (inp / "empty.jsonl").write_text('{"text": "  "}\n{"text": ""}\n')
    assert (
        main(
            [
                "--executor",
                "local",
                *tiny_job_args(tiny_teacher_dir, str(inp / "empty.jsonl"), str(out2)),
            ]
        )
        == 1
    )
    assert "no document was scored" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
def test_gs_url_without_gcsfs_is_a_clear_config_error(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "out"
    url = "gs://xtok-bucket/corpus/*.jsonl"
    with pytest.raises(ConfigError, match=r"gs://xtok-bucket/corpus/\*\.jsonl.*install gcsfs"):
        plan(load_config(None, _overrides(tiny_teacher_dir, url, str(out))))
    assert not out.exists()  # refused before anything was written
    # the job's command line: exit code 2 and the message, no traceback
    assert main(tiny_job_args(tiny_teacher_dir, url, str(out))) == 2
    err = capsys.readouterr().err
    assert "install gcsfs" in err and "Traceback" not in err
    # an output on gs:// likewise
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ConfigError, match=r"output.path 'gs://xtok-bucket/out'.*install gcsfs"):
        plan(
            load_config(
                None,
                _overrides(tiny_teacher_dir, str(tmp_path / "a.jsonl"), "gs://xtok-bucket/out"),
            )
        )
