"""The three views of one likelihood with the real demo teacher (SmolLM2-135M-Instruct,
float32 as a run uses it) on held-out real text (standard-library docstrings, not
GSM8K), from the values as a shard stores them: the byte rows' and the student rows'
log-probs of the actual text after the non-canonical mass they record, and the teacher
tokens' log-probs, each within 1e-3 nats of an independent plain causal forward."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.bench.kinds import heldout_texts
from pipeline.scoring.kinds import TargetKinds
from pipeline.scoring.subset import SubsetExactScorer
from pipeline.shards import Sequence_, build_table, encode_parquet
from pipeline.teacher import HFTeacher
from pipeline.tokenization import load_tokenizer, truncate_merges
from schemas.targets import decode_teacher_logprobs

pytestmark = pytest.mark.slow


def test_three_views_agree_on_heldout_text(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    teacher = HFTeacher(smollm2_dir, device="cpu", dtype="float32", max_batch_tokens=4096)
    texts = heldout_texts(4, 700)
    student = SubsetExactScorer(tok, truncate_merges(tok, 8000))
    kinds = TargetKinds(tok, ["student", "bytes", "teacher"], student)
    results = kinds.score(teacher, texts, top_k=64, byte_top_k=16)
    seqs = [
        Sequence_(
            f"d{i}",
            0,
            r.student,
            np.ones(len(r.student.student_ids) + 1, bool),
            text=r.text,
            teacher=r.teacher,
            teacher_loss_mask=np.ones(len(r.teacher.ids) + 1, bool),
            bytes=r.bytes,
            byte_loss_mask=np.ones(len(r.bytes.row_start), bool),
        )
        for i, r in enumerate(results)
    ]
    table = build_table(
        seqs,
        64,
        student.S.size,
        kinds=kinds.kinds,
        byte_top_k=16,
        teacher_vocab_size=tok.get_vocab_size(),
    )
    stored = pq.read_table(io.BytesIO(encode_parquet(table, {"schema_version": 2}))).to_pylist()
    worst = (0.0, "")
    for i, (r, row) in enumerate(zip(results, stored, strict=True)):
        (tf,) = teacher.teacher_forcing_logprobs([[*r.teacher.ids.tolist(), kinds.teacher_eos]])
        ref = float(tf.double().sum())

        def corrected(prefix: str, row: dict = row) -> float:
            return float(
                np.sum(np.asarray(row[f"{prefix}target_logprob"], np.float64))
                + np.log1p(-np.asarray(row[f"{prefix}noncanonical_mass"], np.float64)).sum()
                + np.log1p(-np.asarray(row[f"{prefix}unmapped_mass"], np.float64)).sum()
            )

        views = {
            "teacher": float(decode_teacher_logprobs(row["teacher_logprob_q"]).sum()),
            "bytes": corrected("byte_"),
            "student": corrected(""),
        }
        gap = max(abs(v - ref) for v in views.values())
        if gap >= worst[0]:
            worst = (
                gap,
                f"doc {i}: causal {ref:.4f}, "
                + ", ".join(f"{k} {v - ref:+.1e}" for k, v in views.items()),
            )
        # the correction matters: SmolLM2 puts mass on non-canonical byte spellings
        assert float(np.sum(row["byte_target_logprob"])) > ref
    print(f"worst sequence: {worst[0]:.2e} nats ({worst[1]})")
    assert worst[0] < 1e-3, worst
