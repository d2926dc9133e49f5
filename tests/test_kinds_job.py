"""Target kinds end to end (in-process executor, tiny random teacher): a run with
``scoring.targets`` writes schema-2 shards whose stored kinds agree with each other, the
chunk overlaps are targets once per kind, and the reader aligns the run to a student
tokenizer chosen at read time (or says why it cannot)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError
from pipeline.job import run
from pipeline.reader import TargetDataset, open_run
from pipeline.tokenization import load_tokenizer
from schemas.targets import decode_teacher_logprobs
from tests.tiny_assets import tiny_job_config, trained_byte_bpe

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers 12 and 345, then  two spaces and a tab\there. café 中文",
    "A longer document that is cut into chunks. " * 12,
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("kinds-in")
    (d / "a.jsonl").write_text(
        "".join(json.dumps({"id": f"a{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS))
    )
    return d


def _run(teacher_dir, corpus, out, *extra):
    cfg = tiny_job_config(
        teacher_dir, f"{corpus}/*.jsonl", str(out), "teacher.max_context=64", *extra
    )
    return run(cfg, executor="local")


@pytest.fixture(scope="module")
def all_kinds(tiny_teacher_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("kinds-all")
    _run(tiny_teacher_dir, corpus, out, "scoring.targets=[student,bytes,teacher]")
    return out


def _rows(out):
    (f,) = sorted(out.glob("*.parquet"))
    return pq.read_table(f).to_pylist()


def test_the_stored_kinds_telescope_to_one_likelihood(all_kinds):
    prov = open_run(str(all_kinds)).provenance
    assert prov.schema_version == 3 and prov.kinds == ["student", "bytes", "teacher"]
    assert prov.byte_top_k == 16 and prov.byte_eos == "<|endoftext|>"
    rows = _rows(all_kinds)
    assert len({r["doc_id"] for r in rows}) == len(TEXTS)
    assert len(rows) > len(TEXTS)  # the long document was chunked
    worst = 0.0
    for r in rows:
        text = bytes(r["text"])
        teacher = float(decode_teacher_logprobs(r["teacher_logprob_q"]).sum())

        def corrected(prefix: str, r: dict = r) -> float:
            return float(
                np.sum(np.asarray(r[f"{prefix}target_logprob"], np.float64))
                + np.log1p(-np.asarray(r[f"{prefix}noncanonical_mass"], np.float64)).sum()
                + np.log1p(-np.asarray(r[f"{prefix}unmapped_mass"], np.float64)).sum()
            )

        for prefix in ("", "byte_"):
            # float32 storage: each log-prob to 6e-8 relative, each 1 - noncanonical to
            # 6e-8 / (1 - noncanonical) relative (a random teacher puts nearly all of
            # some rows' mass on non-canonical sequences); the teacher log-probs' sum to
            # one quantisation step (2.4e-4)
            lp = np.asarray(r[f"{prefix}target_logprob"], np.float64)
            nc = np.asarray(r[f"{prefix}noncanonical_mass"], np.float64)
            bound = 2.5e-4 + 1.2e-7 * (np.abs(lp).sum() + np.sum(1 / np.maximum(1 - nc, 1e-30)))
            gap = abs(corrected(prefix) - teacher)
            assert gap < bound, (r["doc_id"], r["chunk"], prefix, gap, bound)
            worst = max(worst, gap / bound)
        assert sum(r["teacher_byte_len"]) == len(text)
        assert r["byte_row_start"][0] == 0 and r["byte_row_start"][-1] == len(text)
        assert len(r["teacher_logprob_q"]) == len(r["teacher_ids"]) + 1
        assert len(r["byte_loss_mask"]) == len(r["byte_row_start"])
    assert worst > 1e-3  # the bound is not vacuous


def test_each_byte_and_token_is_a_target_once_across_chunks(all_kinds):
    by_doc: dict[str, list] = {}
    for r in _rows(all_kinds):
        by_doc.setdefault(r["doc_id"], []).append(r)
    long = by_doc["a2"]
    assert len(long) > 1
    # byte rows that are targets: every byte of the document once, plus end of text
    n_target_bytes = sum(sum(r["byte_loss_mask"]) for r in long)
    assert n_target_bytes == len(TEXTS[2].encode()) + 1
    # the last row of every chunk but the final one (an end of text that is not one)
    for r in long[:-1]:
        assert not r["byte_loss_mask"][-1] and not r["teacher_loss_mask"][-1]
    assert long[-1]["byte_loss_mask"][-1] and long[-1]["teacher_loss_mask"][-1]
    # teacher tokens: the target ones spell the document once
    spelled = b""
    for r in long:
        text = bytes(r["text"])
        ends = np.cumsum(r["teacher_byte_len"])
        starts = ends - np.asarray(r["teacher_byte_len"])
        for a, b, m in zip(starts, ends, r["teacher_loss_mask"][:-1], strict=True):
            if m:
                spelled += text[a:b]
    assert spelled == TEXTS[2].encode()


def test_a_run_without_a_student_is_read_with_any_student(tiny_teacher_dir, corpus, tmp_path):
    out = tmp_path / "any"
    result = _run(
        tiny_teacher_dir, corpus, out, "scoring.targets=[bytes,teacher]", "student.merges=null"
    )
    assert result is not None
    prov = open_run(str(out)).provenance
    assert prov.kinds == ["bytes", "teacher"] and prov.top_k is None
    cols = pq.ParquetFile(next(out.glob("*.parquet"))).schema_arrow.names
    assert "topk_ids" not in cols and "input_ids" not in cols and "text" in cols
    with pytest.raises(ValueError, match="pass student_tokenizer"):
        TargetDataset(str(out))
    other = trained_byte_bpe(300, seed_text="other words entirely, 98765 !?")
    ds = TargetDataset(
        str(out), batch_size=2, student_tokenizer=other, byte_window=3, shuffle=False
    )
    batches = list(ds)
    n_seq = sum(len(pq.read_table(f)) for f in out.glob("*.parquet"))
    assert sum(b["input_ids"].shape[0] for b in batches) == n_seq > len(TEXTS)
    b = batches[0]
    assert b["byte_ids"].shape[2:] == (3, 16) and b["alm_chunk_logprob"].ndim == 2
    # every chunk the batch counts has its student tokens in the batch, and its
    # teacher log-likelihood is a sum of log-probs (<= 0)
    for bb in batches:
        ch = bb["alm_chunk"]
        used = set(ch[ch >= 0].tolist())
        assert used == set(range(len(used)))
        assert (bb["alm_chunk_logprob"] <= 0).all()
        assert bool(bb["byte_mask"].any()) and bool(bb["alm_chunk_mask"].any())
    # a student-kind-only selection of an any-student run is refused with the reason
    with pytest.raises(ValueError, match="can align"):
        TargetDataset(str(out), student_tokenizer=other, targets=["student"])


def test_a_student_rows_run_says_it_serves_its_own_student_only(tiny_teacher_dir, corpus, tmp_path):
    out = tmp_path / "own"
    _run(tiny_teacher_dir, corpus, out)  # default targets: [student]
    prov = open_run(str(out)).provenance
    assert prov.kinds == ["student"]
    with pytest.raises(ValueError, match="student rows only"):
        TargetDataset(str(out), student_tokenizer=load_tokenizer(tiny_teacher_dir))
    assert sum(1 for _ in TargetDataset(str(out), batch_size=4)) >= 1


def test_targets_must_be_known_and_not_empty(tiny_teacher_dir, corpus, tmp_path):
    with pytest.raises(ConfigError, match="at least one"):
        _run(tiny_teacher_dir, corpus, tmp_path / "x", "scoring.targets=[]")
    with pytest.raises(ConfigError, match="targets"):
        _run(tiny_teacher_dir, corpus, tmp_path / "y", "scoring.targets=[logits]")
