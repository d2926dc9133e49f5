"""Shard schema v1: round trip, quantisation bound, checksum and version checks."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.scoring import SubsetExactScorer
from pipeline.shards import Sequence_, build_table, commit_shard, encode_parquet, read_table
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
        targets_schema(2)
