"""Shard schema v1: round trip, quantisation bound, checksum and version checks; reading
shards, manifests and the run index back through `pipeline.shards` and `schemas.run`."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.scoring import SubsetExactScorer
from pipeline.shards import (
    DECODE_COLUMNS,
    SchemaVersionError,
    Sequence_,
    ShardError,
    ShardInfo,
    build_table,
    check_schema_version,
    commit_shard,
    decode_row_group,
    encode_parquet,
    flat_list,
    folder_of,
    index_url_of,
    open_shard,
    read_provenance,
    read_run_index,
    read_table,
    run_shards,
    shard_ref,
)
from schemas.run import (
    PER_SHARD_KEYS,
    Manifest,
    RunIndex,
    parse_manifest,
    parse_provenance,
    parse_run_index,
    skipped_by_kind,
)
from schemas.targets import (
    CURRENT_VERSION,
    LOGPROB_STEP,
    METADATA_KEY,
    decode_topk_logprobs,
    encode_topk_logprobs,
    targets_schema,
)
from tests.tiny_assets import PerfectTeacher, string_distribution, tiny_pair


def test_quantisation_error_is_within_half_a_step():
    rng = np.random.default_rng(0)
    lp = -np.sort(rng.exponential(5.0, (500, 64)), axis=1)  # rows sorted descending
    lp[0, 0] = 0.0
    lp[1, 60:] = -np.inf  # missing entries at a row's end
    lp[2, 63] = -500.0  # saturates
    dq = encode_topk_logprobs(lp)
    assert dq.dtype == np.uint16
    back = decode_topk_logprobs(dq)
    fin = np.isfinite(lp) & (lp > -100)
    assert np.abs(back[fin] - lp[fin]).max() <= LOGPROB_STEP / 2 + 1e-6
    assert np.all(np.isneginf(back[1, 60:])) and back[2, 63] < -100
    assert np.all(np.diff(back[np.isfinite(back).all(1)], axis=1) <= 0)
    with pytest.raises(ValueError, match="sorted"):
        encode_topk_logprobs(lp[:, ::-1])
    with pytest.raises(ValueError, match="sorted"):
        encode_topk_logprobs(np.array([[-1.0, -np.inf, -2.0]]))


def test_round_trip_and_integrity_checks(tmp_path):
    T, S = tiny_pair(4)
    teacher = PerfectTeacher(T, string_distribution(5, seed=0))
    docs = ["ab 1", "", "1  a"]
    scored = SubsetExactScorer(T, S).score(teacher, docs, top_k=8)  # k > student vocab: padded
    seqs = [
        Sequence_(f"d{i}", 0, r, np.ones(len(r.student_ids) + 1, bool))
        for i, r in enumerate(scored)
    ]
    table = build_table(seqs, top_k=8, student_vocab_size=S.get_vocab_size())
    assert table.schema == targets_schema(CURRENT_VERSION, S.get_vocab_size())
    assert table.schema.field("topk_ids").type == pa.list_(pa.uint16())
    assert targets_schema(CURRENT_VERSION, 151_665).field("topk_ids").type == pa.list_(pa.uint32())
    m = commit_shard(
        str(tmp_path), "x", encode_parquet(table, {"schema_version": CURRENT_VERSION}), {"rows": 3}
    )
    back = read_table(
        str(tmp_path / "x.parquet"), manifest=json.loads((tmp_path / "x.manifest.json").read_text())
    )
    for r, row in zip(scored, back.to_pylist(), strict=True):
        np.testing.assert_array_equal(row["input_ids"], r.student_ids)
        k = r.topk_ids.shape[1]
        got = decode_topk_logprobs(np.reshape(row["topk_logprob_dq"], (-1, 8)))
        fin = np.isfinite(r.topk_logprobs)
        assert np.abs(got[:, :k][fin] - r.topk_logprobs[fin]).max() <= LOGPROB_STEP / 2 + 1e-6
        assert np.all(np.isneginf(got[:, k:]))
        np.testing.assert_allclose(row["target_logprob"], r.target_logprobs, rtol=1e-6)
    # a flipped byte is caught by the manifest checksum
    data = bytearray((tmp_path / "x.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "x.parquet").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_table(str(tmp_path / "x.parquet"), manifest=m)
    # a shard from a future schema version is refused
    buf = io.BytesIO()
    pq.write_table(
        table.replace_schema_metadata({METADATA_KEY: json.dumps({"schema_version": 99})}), buf
    )
    (tmp_path / "y.parquet").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="schema version"):
        read_table(str(tmp_path / "y.parquet"))
    with pytest.raises(ValueError, match="unknown targets schema version"):
        targets_schema(CURRENT_VERSION + 1)


# ---------------------------------------------------------------------------- reading back
def _shard(tmp_path, name="s", metadata=None, manifest=None, row_group_rows=2):
    """A committed shard of 3 sequences (k=8, padded: the tiny student has fewer ids)."""
    T, S = tiny_pair(4)
    teacher = PerfectTeacher(T, string_distribution(5, seed=0))
    scored = SubsetExactScorer(T, S).score(teacher, ["ab 1", "", "1  a"], top_k=8)
    seqs = [
        Sequence_(f"d{i}", 0, r, np.arange(len(r.student_ids) + 1) % 2 == 0)
        for i, r in enumerate(scored)
    ]
    table = build_table(seqs, top_k=8, student_vocab_size=S.get_vocab_size())
    meta = {"schema_version": CURRENT_VERSION, "top_k": 8, **(metadata or {})}
    data = encode_parquet(table, meta, row_group_rows=row_group_rows)
    m = commit_shard(str(tmp_path), name, data, {**meta, "sequences": 3, **(manifest or {})})
    return seqs, m


def test_open_shard_and_decode_give_back_what_was_written(tmp_path):
    seqs, m = _shard(tmp_path, metadata={"teacher_dtype": "float32", "future_key": [1, 2]})
    info = ShardInfo("s", str(tmp_path / "s.parquet"), m)  # a dict manifest is parsed
    assert isinstance(info.manifest, Manifest) and info.manifest.sha256 == m["sha256"]
    opened = open_shard(info)
    try:
        assert opened.row_groups == [2, 1]
        prov = opened.provenance
        assert (prov.top_k, prov.teacher_dtype, prov.get("future_key")) == (8, "float32", [1, 2])
        assert read_provenance(opened.file, "s").to_dict() == prov.to_dict()
        units = [
            decode_row_group(opened.file.read_row_group(g, columns=list(DECODE_COLUMNS)), 8)
            for g in range(len(opened.row_groups))
        ]
    finally:
        opened.close()
    got = [(u, r) for u in units for r in range(len(u.id_off) - 1)]
    for s, (u, r) in zip(seqs, got, strict=True):
        L = len(s.scored.student_ids)
        assert u.length(r) == L
        a, z = int(u.row_off[r]), int(u.row_off[r + 1])
        assert z - a == L + 1
        np.testing.assert_array_equal(u.ids[u.id_off[r] : u.id_off[r + 1]], s.scored.student_ids)
        np.testing.assert_array_equal(u.loss_mask[a:z], s.loss_mask)
        np.testing.assert_array_equal(u.tail[a:z], s.scored.tail_mass.astype(np.float32))
        k = s.scored.topk_ids.shape[1]
        np.testing.assert_array_equal(u.topk_ids[a:z, :k], s.scored.topk_ids)
        lp = s.scored.topk_logprobs
        fin = np.isfinite(lp)
        assert np.abs(u.topk_lp[a:z, :k][fin] - lp[fin]).max() <= LOGPROB_STEP / 2 + 1e-6
    values, offsets = flat_list(pq.read_table(tmp_path / "s.parquet")["input_ids"])
    assert offsets[-1] == len(values) == sum(len(s.scored.student_ids) for s in seqs)


def test_open_shard_names_the_shard_and_what_failed(tmp_path):
    _, m = _shard(tmp_path)
    url = str(tmp_path / "s.parquet")
    with pytest.raises(ShardError, match=r"shard s: 3 sequences in the file, 4 in its manifest"):
        open_shard(ShardInfo("s", url, {**m, "sequences": 4}))
    with pytest.raises(ShardError, match=r"shard s: .*manifest says \d+ \(truncated"):
        open_shard(ShardInfo("s", url, {**m, "bytes": m["bytes"] + 1}))
    with pytest.raises(ShardError, match=r"shard s: data file .* is missing"):
        open_shard(ShardInfo("s", str(tmp_path / "nope.parquet"), m))
    _, m = _shard(tmp_path, "future", metadata={"schema_version": CURRENT_VERSION + 1})
    with pytest.raises(
        SchemaVersionError, match=f"shard future: unknown schema version {CURRENT_VERSION + 1}"
    ):
        open_shard(ShardInfo("future", str(tmp_path / "future.parquet"), m))


def test_one_schema_version_gate():
    assert check_schema_version(CURRENT_VERSION, "x") == CURRENT_VERSION
    assert check_schema_version(str(CURRENT_VERSION), "x") == CURRENT_VERSION
    for bad in (None, CURRENT_VERSION + 1, "one", [1]):
        with pytest.raises(SchemaVersionError, match=r"^x: unknown schema version"):
            check_schema_version(bad, "x")
    # read_table's callers catch ValueError, the reader's ShardError: it is both
    assert issubclass(SchemaVersionError, ValueError) and issubclass(SchemaVersionError, ShardError)


def _index(tmp_path, m, **extra):
    index = {
        "schema_version": CURRENT_VERSION,
        "config_hash": "abc",
        "provenance": {k: v for k, v in m.items() if k not in PER_SHARD_KEYS},
        "shards": [
            {
                "name": "s",
                "file": "s.parquet",
                "manifest": "s.manifest.json",
                "input": "in/s.jsonl",
                "sequences": 3,
                "documents": 3,
                "student_tokens": 7,
                "bytes": m["bytes"],
                "sha256": m["sha256"],
                "skipped": 0,
            }
        ],
        "totals": {"sequences": 3, "documents": 3, "student_tokens": 7, "bytes": 1, "skipped": 0},
        **extra,
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    return index


def test_run_index_and_manifests_parse_to_typed_models(tmp_path):
    _, m = _shard(tmp_path)
    raw = _index(tmp_path, m, written_by="a newer job")
    assert index_url_of(str(tmp_path)) == f"{tmp_path}/index.json"
    assert index_url_of("s3://b/run/index.json") == "s3://b/run/index.json"
    assert folder_of("s3://b/run/index.json") == "s3://b/run" and folder_of("index.json") == "."
    index = read_run_index(index_url_of(str(tmp_path)))
    assert isinstance(index, RunIndex) and index.to_dict() == raw  # nothing lost or added
    assert index.provenance.top_k == 8 and index.totals is not None
    assert index.shards[0].sha256 == m["sha256"] and index.get("written_by") == "a newer job"
    (ref,) = run_shards(index, str(tmp_path))
    assert ref.problem is None and ref.url == f"{tmp_path}/s.parquet"
    assert isinstance(ref.manifest, Manifest) and ref.manifest.sequences == 3
    # a manifest that is missing, or rewritten after the index, is named (not raised)
    index.shards[0].sha256 = "0" * 64
    assert "differs from the run index" in (run_shards(index, str(tmp_path))[0].problem or "")
    (tmp_path / "s.manifest.json").unlink()
    (ref,) = run_shards(index, str(tmp_path))
    assert ref.manifest is None and (ref.problem or "").startswith("manifest missing")
    assert shard_ref(f"{tmp_path}/s.parquet").problem == ref.problem
    # the gate, and errors that name the index
    _index(tmp_path, m, schema_version=CURRENT_VERSION + 1)
    with pytest.raises(SchemaVersionError, match=r"index\.json: unknown schema version"):
        read_run_index(f"{tmp_path}/index.json")
    assert (
        read_run_index(f"{tmp_path}/index.json", check_version=False).schema_version
        == CURRENT_VERSION + 1
    )
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        read_run_index(f"{tmp_path}/index.json")
    with pytest.raises(ShardError, match="no run index"):
        read_run_index(f"{tmp_path}/nowhere/index.json")


def test_the_models_accept_what_the_writers_write():
    """A manifest as `pipeline.generate` and `commit_shard` write it (with the resolved
    teacher settings, skipped records with and without kind/line, and keys this code
    does not know), an index entry written by hand with only what readers need."""
    prov = {
        "schema_version": 1,
        "teacher": "t",
        "teacher_revision": None,
        "teacher_tokenizer_sha256": "a" * 64,
        "student_tokenizer_sha256": "b" * 64,
        "teacher_vocab_size": 300,
        "student_vocab_size": 80,
        "scorer": "general-fast",
        "scorer_params": {"mode": "fast", "max_depth": 3},
        "top_k": 8,
        "temperature": 1.0,
        "logprobs": "natural log, normalised over the student vocab",
        "logprob_step": LOGPROB_STEP,
        "row_convention": "row i = ...",
        "student_eos_id": 2,
        "config_hash": "c" * 16,
        "teacher_dtype": "bfloat16",
        "teacher_device": "cuda",
        "max_context": 256,
        "max_batch_tokens": 512,
        "some_later_key": {"x": 1},
    }
    skipped = [
        {
            "index": 1,
            "doc_id": None,
            "kind": "malformed JSON",
            "reason": "malformed JSON: x",
            "line": 2,
        },
        {"index": 3, "doc_id": "d3", "kind": "empty document", "reason": "empty document"},
        {"index": 4, "doc_id": "d4", "reason": "unscorable text: why"},  # before kinds
    ]
    manifest = {
        **prov,
        "input": "in/a.jsonl",
        "records_in": 6,
        "documents": 3,
        "sequences": 4,
        "student_tokens": 40,
        "target_rows": 30,
        "mean_topk_mass": 0.97,
        "teacher_tokens": 35,
        "text_bytes": 150,
        "byte_rows": 152,
        "skipped": skipped,
        "seconds": 1.5,
        "host": "h",
        "file": "a.parquet",
        "bytes": 1234,
        "sha256": "d" * 64,
        "ray_node_id": "n",
        "actor": "generate-0",
        "attempt": 0,
    }
    m = parse_manifest(manifest)
    assert m.to_dict() == manifest and m.teacher_device == "cuda" and m.max_context == 256
    assert [s.line for s in m.skipped or []] == [2, None, None]
    assert m.provenance().to_dict() == prov == parse_provenance(prov).to_dict()
    assert set(manifest) - set(prov) == PER_SHARD_KEYS
    assert skipped_by_kind([manifest, m]) == {
        "malformed JSON": 2,
        "empty document": 2,
        "unscorable text": 2,
    }
    # dict-style reads, for code written against the JSON dicts
    assert m["top_k"] == 8 and m.get("nope", 5) == 5 and "host" in m and "nope" not in m
    with pytest.raises(KeyError):
        m["teacher_revision_x"]
    assert parse_manifest({}).to_dict() == {}  # every key may be missing in an old run
    entry = {"name": "x", "file": "x.parquet", "manifest": "x.manifest.json", "sha256": "e"}
    assert parse_run_index({"shards": [entry]}).shards[0].sequences is None
    with pytest.raises(ValueError, match="top_k"):
        parse_manifest({**manifest, "top_k": "eight"})


def test_estimated_mass_is_stored_from_schema_3_and_read_as_0_before():
    """Schema 3 stores each row's estimated mass (approximate general-scorer rows; 0 for
    exact rows); a version 2 shard has no such column and the audit reads it as 0."""
    from pipeline.audit import Stats

    T, S = tiny_pair(4)
    teacher = PerfectTeacher(T, string_distribution(5, seed=0))
    scored = SubsetExactScorer(T, S).score(teacher, ["ab 1", "1  a"], top_k=4)
    est = np.linspace(0.0, 0.5, len(scored[0].student_ids) + 1)
    scored[0].estimated_mass = est  # as an approximate row would carry it
    seqs = [
        Sequence_(f"d{i}", 0, r, np.ones(len(r.student_ids) + 1, bool))
        for i, r in enumerate(scored)
    ]
    v3 = build_table(seqs, top_k=4, student_vocab_size=S.get_vocab_size())
    assert CURRENT_VERSION == 3 and "estimated_mass" in v3.column_names
    got = v3.column("estimated_mass").to_pylist()
    np.testing.assert_allclose(got[0], est, rtol=1e-6)
    assert got[1] == [0.0] * (len(scored[1].student_ids) + 1)  # exact rows: nothing estimated
    v2 = build_table(seqs, top_k=4, student_vocab_size=S.get_vocab_size(), version=2)
    assert "estimated_mass" not in v2.column_names
    rows = sum(len(r.student_ids) + 1 for r in scored)
    summaries = []
    for table in (v3, v2):
        st = Stats()
        st.add_rows(table, 4, S.get_vocab_size())
        summaries.append(st.summary()["estimated_mass"])
    assert summaries[0]["mean"] == pytest.approx(float(est.sum()) / rows, rel=1e-6)
    assert summaries[0]["rows_above_zero"] == len(est) - 1
    assert summaries[1] == {"mean": 0.0, "max": 0.0, "rows_above_zero": 0}
