"""The audit of runs with target kinds (``scoring.targets``): per-kind statistics against
a recomputation from the Parquet rows, the kinds' integrity checks, the telescoping
identity between kinds catching a damaged value that every other check passes, a
student-only shard of schema version 1 audited as before, and --verify-live re-scoring
the byte rows and teacher tokens (with and without a student)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.audit import main as audit_main
from pipeline.audit import LIVE_TOLERANCE
from pipeline.shards import column_bytes, decode_kinds_row_group, encode_parquet
from schemas.targets import LOGPROB_STEP, METADATA_KEY, TEACHER_LOGPROB_STEP
from tests.tiny_assets import tiny_job_config

DAMAGE = 205 * TEACHER_LOGPROB_STEP  # 0.05 nats off one teacher log-prob
BOUND = LOGPROB_STEP / 2 + LIVE_TOLERANCE  # --verify-live's bound on quantised top-k log-probs
STUDENT_CHECKS = ["manifest", "size", "sha256", "parquet", "metadata", "pages", "counts"]
WORDS = ["alpha", "beta", "gamma", "délta", "épsilon", "zeta", "中文", "theta", "12", "345"]


def _records() -> list[dict]:
    """Four documents (non-ASCII text: bytes != characters); d2 is longer than the
    teacher context, so it is cut into chunks whose overlap rows are not targets."""
    recs = []
    for d in range(4):
        n = 150 if d == 2 else 4 + 3 * d
        words = " ".join(WORDS[(d + 3 * i) % len(WORDS)] for i in range(n))
        recs.append({"id": f"d{d}", "text": f"Doc {d}: {words}."})
    return recs


def _make_run(root: Path, teacher_dir, *extra: str) -> Path:
    from pipeline.job import run

    (root / "in").mkdir(parents=True)
    (root / "in" / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    cfg = tiny_job_config(
        teacher_dir, f"{root}/in/*.jsonl", str(root / "out"), "output.row_group_rows=2", *extra
    )
    run(cfg, executor="local")
    return root / "out"


@pytest.fixture(scope="module")
def all_kinds(tmp_path_factory, tiny_teacher_dir) -> Path:
    return _make_run(
        tmp_path_factory.mktemp("kinds-all"),
        tiny_teacher_dir,
        "scoring.targets=[student,bytes,teacher]",
    )


@pytest.fixture(scope="module")
def no_student(tmp_path_factory, tiny_teacher_dir) -> Path:
    """No student tokenizer at all in the config (student.merges=null)."""
    return _make_run(
        tmp_path_factory.mktemp("kinds-bt"),
        tiny_teacher_dir,
        "scoring.targets=[bytes,teacher]",
        "student.merges=null",
    )


def _audit(target, out: Path, *extra: str) -> tuple[int, dict]:
    rc = audit_main([str(target), "--out", str(out), "--quiet", *extra])
    return rc, json.loads((out / "summary.json").read_text())


def _checks(shard: dict) -> dict[str, dict]:
    return {c["name"]: c for c in shard["checks"]}


def _byte_top_k(run_dir: Path) -> int:
    return json.loads((run_dir / "t.manifest.json").read_text())["byte_top_k"]


def _recompute(path: Path) -> dict:
    """The kinds' statistics straight from the Parquet rows, sequence by sequence (the
    teacher and byte rows decoded by the reader's `decode_kinds_row_group`)."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    kb = json.loads(table.schema.metadata[METADATA_KEY])["byte_top_k"]
    t_lp, t_bytes, kept, ent, b_lp, b_bytes, totals = [], [], [], [], [], [], []
    for r, ks in zip(rows, decode_kinds_row_group(table, kb), strict=True):
        text = r["text"]
        out: dict[str, float] = {}
        if ks.teacher_logprob is not None:
            lp, ends = ks.teacher_logprob, ks.teacher_byte_end
            assert ends is not None and ks.teacher_loss_mask is not None
            nbytes = np.append(np.diff(np.concatenate([[0], ends])), 0)  # end of text: 0
            assert ends[-1] == len(text) and len(lp) == len(ends) + 1 == len(r["teacher_ids"]) + 1
            mask = ks.teacher_loss_mask
            t_lp += lp[mask].tolist()
            t_bytes += nbytes[mask].tolist()
            out["teacher"] = float(lp.sum())
        if ks.byte_row_start is not None:
            rs, bmask, blp = ks.byte_row_start, ks.byte_loss_mask, ks.byte_logprobs
            assert bmask is not None and blp is not None
            tail = np.asarray(r["byte_tail_mass"], np.float64)
            tlp = np.asarray(r["byte_target_logprob"], np.float64)
            for i in np.flatnonzero(bmask):
                p = np.exp(blp[i][np.isfinite(blp[i])].astype(np.float64))
                h = -float((p * np.log(p)).sum())
                if tail[i] > 0:
                    h -= tail[i] * math.log(tail[i])
                ent.append(h)
                kept.append(1.0 - tail[i])
                b_lp.append(tlp[i])
                b_bytes.append(rs[i + 1] - rs[i] if i + 1 < len(rs) else 0)
            nc = np.asarray(r["byte_noncanonical_mass"], np.float64)
            um = np.asarray(r["byte_unmapped_mass"], np.float64)
            out["bytes"] = float(tlp.sum() + np.log1p(-nc).sum() + np.log1p(-um).sum())
        if "target_logprob" in r:
            tlp = np.asarray(r["target_logprob"], np.float64)
            nc = np.asarray(r["noncanonical_mass"], np.float64)
            um = np.asarray(r["unmapped_mass"], np.float64)
            out["student"] = float(tlp.sum() + np.log1p(-nc).sum() + np.log1p(-um).sum())
        totals.append(out)
    return {
        "sequences": len(rows),
        "text_bytes": sum(len(r["text"]) for r in rows),
        "teacher_tokens": sum(len(r.get("teacher_ids", [])) for r in rows),
        "byte_rows": sum(len(r.get("byte_row_start", [])) for r in rows),
        "teacher_nats_per_byte": -sum(t_lp) / sum(t_bytes) if t_lp else None,
        "byte_nats_per_byte": -sum(b_lp) / sum(b_bytes) if b_lp else None,
        "kept": np.asarray(kept),
        "entropy": np.asarray(ent),
        "totals": totals,
    }


def _kind_bytes(path: Path, prefix: str) -> int:
    return sum(v[0] for c, v in column_bytes(str(path)).items() if c.startswith(prefix))


def _assert_kind_stats(summary: dict, out_dir: Path, kinds: list[str]) -> dict:
    """The run's kind statistics equal a recomputation from the rows and are plausible."""
    path = out_dir / "t.parquet"
    want = _recompute(path)
    st = summary["run"]["kinds"]
    assert st["targets"] == kinds
    assert st["text_bytes"] == want["text_bytes"] and st["teacher_tokens"] == want["teacher_tokens"]
    t, b = st["teacher"], st["bytes"]
    assert t["tokens"] == want["teacher_tokens"] and t["sequences"] == want["sequences"]
    assert t["rows"] == want["teacher_tokens"] + want["sequences"]
    assert t["nats_per_byte"] == pytest.approx(want["teacher_nats_per_byte"], rel=1e-9)
    assert t["bits_per_byte"] == pytest.approx(t["nats_per_byte"] / math.log(2))
    assert b["rows"] == want["byte_rows"] and b["target_rows"] == len(want["kept"])
    assert b["kept_mass"]["mean"] == pytest.approx(want["kept"].mean(), abs=1e-9)
    assert b["entropy_nats"]["mean"] == pytest.approx(want["entropy"].mean(), abs=1e-6)
    assert b["nats_per_byte"] == pytest.approx(want["byte_nats_per_byte"], rel=1e-9)
    # plausible: the top-k of 259 symbols keep most of the mass, the rows are real
    # spreads, and the byte rows leave out non-canonical mass: never less likely than
    # the teacher's tokens (up to the teacher's quantisation, 2**-12 nats per token)
    kb = _byte_top_k(out_dir)
    assert 0.5 < b["kept_mass"]["mean"] <= 1 and 0 < b["entropy_nats"]["mean"] < math.log(kb + 1)
    slack = TEACHER_LOGPROB_STEP * t["target_rows"] / t["target_bytes"]
    assert 0 < b["nats_per_byte"] <= t["nats_per_byte"] + slack
    # chunked d2: overlap rows are not targets
    assert t["target_rows"] < t["rows"] and b["target_rows"] < b["rows"]
    by_kind = summary["run"]["bytes_by_kind"]
    assert by_kind["bytes"]["compressed"] == _kind_bytes(path, "byte_")
    assert by_kind["teacher"]["compressed"] == _kind_bytes(path, "teacher_")
    assert by_kind["text"]["per_text_byte"] == pytest.approx(
        _kind_bytes(path, "text") / want["text_bytes"]
    )
    assert by_kind["bytes"]["per_teacher_token"] == pytest.approx(
        by_kind["bytes"]["compressed"] / want["teacher_tokens"]
    )
    # the identity holds between every pair, in every sequence, far inside the tolerance
    cons = st["consistency"]
    assert cons["ok"] and cons["not_applicable"] == {}
    pairs = [f"{a}-{c}" for i, a in enumerate(kinds) for c in kinds[i + 1 :]]
    assert sorted(cons["pairs"]) == sorted(pairs)
    for name, p in cons["pairs"].items():
        a, c = name.split("-")
        worst = max(abs(x[a] - x[c]) for x in want["totals"])
        assert p["sequences"] == want["sequences"] and p["failed"] == 0
        assert p["max_abs_diff_nats"] == pytest.approx(worst, abs=1e-9)
        assert p["max_abs_diff_nats"] < 1e-3 < p["worst"]["tolerance_nats"] * 10
    return want


# ---------------------------------------------------------------------------- clean runs
def test_a_run_of_every_kind_audits_clean_with_per_kind_statistics(all_kinds, tmp_path, capsys):
    rc, summary = _audit(all_kinds, tmp_path / "report")
    out = capsys.readouterr().out
    assert rc == 0 and summary["ok"], summary["failures"]
    (shard,) = summary["shards"]
    assert list(_checks(shard)) == [*STUDENT_CHECKS[:-1], "teacher", "bytes", "kinds", "counts"]
    assert all(c["ok"] for c in shard["checks"])
    want = _assert_kind_stats(summary, all_kinds, ["student", "bytes", "teacher"])
    assert shard["stats"]["kinds"] == summary["run"]["kinds"]
    # the student statistics are still there, the student rows being all exact
    assert summary["run"]["regime_share"]["exact"] == 1.0
    assert summary["run"]["sequences"] == want["sequences"] > 4  # d2 is chunked
    assert summary["run"]["bytes_by_kind"]["student"]["per_student_token"] > 0
    assert {"byte_kept_mass", "byte_entropy", "teacher_logprob"} <= set(summary["histograms"])
    # the printed summary: the kinds' tables and the pairs of the identity
    assert "target kinds: student, bytes, teacher" in out
    assert "kind consistency (telescoping identity per sequence" in out
    for pair in ("student-bytes", "student-teacher", "bytes-teacher"):
        assert pair in out
    assert "RESULT: OK" in out


def test_a_run_without_a_student_audits_with_no_student_tokenizer(
    no_student, all_kinds, tmp_path, capsys
):
    cfg = (no_student / "config.yaml").read_text()
    assert "merges: null" in cfg and "tokenizer: null" in cfg  # no student tokenizer at all
    rc, summary = _audit(no_student, tmp_path / "report")
    out = capsys.readouterr().out
    assert rc == 0 and summary["ok"], summary["failures"]
    (shard,) = summary["shards"]
    assert list(_checks(shard)) == [*STUDENT_CHECKS[:-1], "teacher", "bytes", "kinds", "counts"]
    run = summary["run"]
    assert "student_tokens" not in run and "topk_mass" not in run
    assert run["documents"] == 4 and "student" not in run["bytes_by_kind"]
    _assert_kind_stats(summary, no_student, ["bytes", "teacher"])
    assert "target quality" not in out and "bytes-teacher" in out
    # inspect shows student rows: a clear refusal, not a missing column
    assert audit_main(["inspect", str(no_student / "t.parquet"), "--doc", "d0"]) == 2
    assert "stores no student rows" in capsys.readouterr().err
    # the same texts and teacher: the same targets as the run with a student
    _, other = _audit(all_kinds, tmp_path / "other")
    a, b = run["kinds"], other["run"]["kinds"]
    assert a["teacher"]["tokens"] == b["teacher"]["tokens"]
    assert a["teacher"]["nats_per_byte"] == pytest.approx(b["teacher"]["nats_per_byte"], rel=1e-5)
    assert a["bytes"]["kept_mass"]["mean"] == pytest.approx(b["bytes"]["kept_mass"]["mean"])


def test_a_schema_1_shard_audits_as_before(all_kinds, tmp_path):
    """A student-only shard of schema version 1 (the student columns of the run, the
    provenance without the kinds' keys): the checks and statistics of before, and the
    same student numbers as the run it was cut from."""
    table = pq.read_table(all_kinds / "t.parquet")
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    kind_keys = ("targets", "byte_top_k", "byte_specials", "byte_eos", "teacher_eos_id")
    for key in kind_keys:
        meta.pop(key, None)
    meta["schema_version"] = 1
    student = [c for c in table.column_names if c not in ("text",)]
    student = [c for c in student if not c.startswith(("teacher_", "byte_"))]
    data = encode_parquet(table.select(student).replace_schema_metadata(None), meta, 3, 2)
    manifest = json.loads((all_kinds / "t.manifest.json").read_text())
    for key in (*kind_keys, "teacher_tokens", "text_bytes", "byte_rows"):
        manifest.pop(key, None)
    d = tmp_path / "v1"
    d.mkdir()
    (d / "t.parquet").write_bytes(data)
    manifest.update(meta, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (d / "t.manifest.json").write_text(json.dumps(manifest))
    rc, summary = _audit(d / "t.parquet", tmp_path / "report")
    assert rc == 0 and summary["ok"], summary["failures"]
    (shard,) = summary["shards"]
    assert list(_checks(shard)) == STUDENT_CHECKS
    assert "kinds" not in shard["stats"] and "bytes_by_kind" not in shard
    assert "bytes_by_kind" not in summary["run"]
    _, full = _audit(all_kinds, tmp_path / "full")
    want = {k: v for k, v in full["shards"][0]["stats"].items() if k != "kinds"}
    assert shard["stats"] == want


# ---------------------------------------------------------------------------- damage
def _damaged(run_dir: Path, tmp_path: Path, column: str, seq: int, change) -> tuple[Path, dict]:
    """A copy of the run whose shard has ``column`` of sequence ``seq`` changed by
    ``change(values) -> values``, re-encoded as the job writes it, with the manifest's
    size and checksum (and the index's) updated: only the content checks can tell."""
    d = tmp_path / "damaged"
    shutil.copytree(run_dir, d)
    table = pq.read_table(d / "t.parquet")
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    values = table.column(column).to_pylist()
    values[seq] = change(values[seq])
    i = table.schema.get_field_index(column)
    table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))
    data = encode_parquet(table.replace_schema_metadata(None), meta, 3, 2)
    (d / "t.parquet").write_bytes(data)
    manifest = json.loads((d / "t.manifest.json").read_text())
    manifest.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (d / "t.manifest.json").write_text(json.dumps(manifest))
    index = json.loads((d / "index.json").read_text())
    index["shards"][0]["sha256"] = manifest["sha256"]
    (d / "index.json").write_text(json.dumps(index))
    row = pq.read_table(d / "t.parquet", columns=["doc_id", "chunk"]).to_pylist()[seq]
    return d, row


def _live(run_dir: Path) -> dict:
    """--verify-live of every sequence of a run, whatever its other checks say (the
    command re-scores only shards that pass them)."""
    from pipeline.audit import locate
    from pipeline.audit_live import verify_live

    source = locate(str(run_dir))
    n = sum(int(r.manifest.sequences or 0) for r in source.shards if r.manifest)
    v = verify_live(source, source.shards, n)
    assert v["compared"] == n and v["not_reencoded"] == []
    return v


def test_a_damaged_teacher_logprob_fails_the_identity_and_verify_live(all_kinds, tmp_path):
    seq = 3  # d2 chunk 1: the second row group, the second chunk of a document

    def lower(v: list[int]) -> list[int]:
        v[5] += 205  # 0.05 nats less likely, still a log-prob (a step >= 0)
        return v

    d, row = _damaged(all_kinds, tmp_path, "teacher_logprob_q", seq, lower)
    assert (row["doc_id"], row["chunk"]) == ("d2", 1)
    rc, summary = _audit(d, tmp_path / "report")
    assert rc == 1 and summary["ok"] is False
    (shard,) = summary["shards"]
    assert [c for c, v in _checks(shard).items() if not v["ok"]] == ["kinds"]
    detail = _checks(shard)["kinds"]["detail"]
    assert detail.startswith(f"sequence {seq} (doc 'd2' chunk 1): teacher disagrees with ")
    assert "student and bytes (telescoping identity): student - teacher = +0.0" in detail
    match = re.search(r"student - teacher = \+([0-9.e-]+) nats", detail)
    assert match is not None
    found = float(match[1])
    assert found == pytest.approx(DAMAGE, abs=TEACHER_LOGPROB_STEP)
    pairs = summary["run"]["kinds"]["consistency"]["pairs"]
    assert {p: v["failed"] for p, v in pairs.items()} == {
        "student-bytes": 0,
        "student-teacher": 1,
        "bytes-teacher": 1,
    }
    w = pairs["bytes-teacher"]["worst"]
    assert (w["shard"], w["doc_id"], w["chunk"], w["sequence"]) == ("t", "d2", 1, seq)
    assert pairs["bytes-teacher"]["max_abs_diff_nats"] == pytest.approx(
        DAMAGE, abs=TEACHER_LOGPROB_STEP
    )
    assert any(f.startswith("t: kinds: sequence 3") for f in summary["failures"])
    # re-scored with the teacher: the damaged log-prob is off, the other kinds are not
    v = _live(d)
    assert v["ok"] is False
    k = v["kinds"]
    assert k["student"]["ok"] and k["bytes"]["ok"] and not k["teacher"]["ok"]
    assert k["teacher"]["max_abs_diff"] == pytest.approx(DAMAGE, abs=2 * TEACHER_LOGPROB_STEP)
    assert k["teacher"]["worst"] == {"shard": "t", "doc_id": "d2", "chunk": 1}
    assert v["verdict"].startswith(f"teacher: max |diff| {k['teacher']['max_abs_diff']:.6f} > ")
    assert v["verdict"].endswith(
        f"over {v['compared']} sequences (worst: shard t doc 'd2' chunk 1)"
    )


def test_damaged_byte_rows_fail_the_identity_and_the_row_check(no_student, tmp_path):
    def lower(v: list[float]) -> list[float]:
        v[2] -= 0.3  # a target log-prob: no top-k entry changes
        return v

    d, _ = _damaged(no_student, tmp_path / "target", "byte_target_logprob", 1, lower)
    rc, summary = _audit(d, tmp_path / "report")
    assert rc == 1
    checks = _checks(summary["shards"][0])
    assert [c for c, v in checks.items() if not v["ok"]] == ["kinds"]
    detail = checks["kinds"]["detail"]
    assert detail.startswith(
        "sequence 1 (doc 'd1' chunk 0): bytes and teacher disagree (telescoping identity): "
    )
    match = re.search(r"bytes - teacher = (-[0-9.e-]+) nats", detail)
    assert match is not None
    found = float(match[1])
    assert found == pytest.approx(-0.3, abs=1e-3)

    # a top-k log-prob of a byte row: its probabilities no longer sum to 1
    kb = _byte_top_k(no_student)

    def shift(v: list[int]) -> list[int]:
        v[4 * kb] += 50  # row 4's first gap: the whole row 0.09 nats less likely
        return v

    d, _ = _damaged(no_student, tmp_path / "topk", "byte_topk_logprob_dq", 1, shift)
    rc, summary = _audit(d, tmp_path / "report2")
    assert rc == 1
    checks = _checks(summary["shards"][0])
    assert [c for c, v in checks.items() if not v["ok"]] == ["bytes"]
    assert checks["bytes"]["detail"].startswith(
        "sequence 1 (doc 'd1' chunk 0): byte row 4 has probabilities + tail = 0.9"
    )
    v = _live(d)
    assert v["ok"] is False and not v["kinds"]["bytes"]["ok"] and v["kinds"]["teacher"]["ok"]
    assert v["kinds"]["bytes"]["worst"] == {"shard": "t", "doc_id": "d1", "chunk": 0}
    assert v["kinds"]["bytes"]["max_abs_diff"] == pytest.approx(50 * LOGPROB_STEP, abs=BOUND)

    # a teacher token one byte longer: the tokens no longer end where the text does
    def longer(v: list[int]) -> list[int]:
        v[0] += 1
        return v

    d, _ = _damaged(no_student, tmp_path / "len", "teacher_byte_len", 2, longer)
    rc, summary = _audit(d, tmp_path / "report3")
    checks = _checks(summary["shards"][0])
    assert rc == 1 and [c for c, v in checks.items() if not v["ok"]] == ["teacher"]
    assert checks["teacher"]["detail"].startswith(
        "sequence 2 (doc 'd2' chunk 0): teacher tokens end at byte "
    )


# ---------------------------------------------------------------------------- verify-live
@pytest.mark.parametrize("which", ["all_kinds", "no_student"])
def test_verify_live_re_scores_every_kind(which, request, tmp_path):
    run_dir = request.getfixturevalue(which)
    rc, summary = _audit(run_dir, tmp_path / "report", "--verify-live", "5")
    v = summary["verify_live"]
    assert rc == 0 and v["ok"], v["verdict"]
    assert v["compared"] == 5 and v["not_reencoded"] == [] and v["config_differences"] == {}
    kinds = ["student", "bytes", "teacher"] if which == "all_kinds" else ["bytes", "teacher"]
    assert sorted(v["kinds"]) == sorted(kinds)
    assert all(v["kinds"][k]["compared"] == 5 for k in kinds)
    assert 0 < v["max_abs_logprob_diff"] <= v["bound"] == BOUND
    assert v["kinds"]["teacher"]["max_abs_diff"] <= v["kinds"]["teacher"]["bound"]
    assert v["kinds"]["teacher"]["bound"] == TEACHER_LOGPROB_STEP + LIVE_TOLERANCE
    for s in v["sequences"]:
        assert s["bytes"]["topk_id_agreement"] > 0.9 and s["bytes"]["max_tail_mass_diff"] < 1e-4
        assert s["bytes"]["max_target_logprob_diff"] < 1e-4
        assert s["teacher"]["tokens"] > 0 and ("tokens" in s) == (which == "all_kinds")
        # error feedback: every running sum within half a step (plus float noise)
        assert s["teacher"]["max_running_sum_diff"] < TEACHER_LOGPROB_STEP / 2 + 1e-4
