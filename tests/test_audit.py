"""The audit on shards produced by the real pipeline: numbers against an independent
recomputation, corrupted shards named while the others are still audited, a shard of
another config flagged, the report (plots, HTML, JSON), inspect, the live re-score,
and the same summary from Ray tasks."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.audit import PLOTS
from jobs.audit import main as audit_main
from jobs.generate import main as generate
from pipeline.audit import HISTOGRAMS, LIVE_TOLERANCE
from pipeline.shards import read_table
from schemas.targets import LOGPROB_STEP, decode_topk_logprobs
from tests.tiny_assets import tiny_job_args

K = 8
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW_LINE = re.compile(r"^[* ] row +\d+ ")


def _text(s: int, d: int, n: int | None = None) -> str:
    n = n or 3 + (7 * s + 5 * d) % 11
    return f"Doc {s}-{d}: " + " ".join(WORDS[(s + d + i) % len(WORDS)] for i in range(n)) + "."


def _write_inputs(folder: Path, shards: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in shards.items():
        (folder / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teacher_dir):
    """3 shards x 6 documents by the real job (in-process executor), 2 sequences per row
    group; part-1 also has a malformed and an empty record (skipped), part-2 a document
    long enough to be cut into chunks (so sequences > documents, rows > target rows)."""
    root = tmp_path_factory.mktemp("audit-run")
    texts: dict[str, str] = {}
    shards: dict[str, list[str]] = {}
    for s in range(3):
        recs = [{"id": f"s{s}d{d}", "text": _text(s, d)} for d in range(6)]
        if s == 2:
            recs[3]["text"] = _text(s, 3, n=150)
        texts.update({r["id"]: r["text"] for r in recs})
        lines = [json.dumps(r) for r in recs]
        if s == 1:
            lines[2:2] = ["{not json", json.dumps({"id": "empty", "text": ""})]
        shards[f"part-{s}"] = lines
    _write_inputs(root / "in", shards)
    args = tiny_job_args(
        tiny_teacher_dir, f"{root}/in/*.jsonl", str(root / "out"), "output.row_group_rows=2"
    )
    assert generate([*args, "--executor", "local"]) == 0
    return {"dir": root / "out", "texts": texts, "teacher": tiny_teacher_dir}


@pytest.fixture(scope="module")
def other_run(tmp_path_factory, tiny_teacher_dir):
    """One shard of the same corpus style made with another config (k=4, temperature 2)."""
    root = tmp_path_factory.mktemp("audit-other")
    _write_inputs(
        root / "in",
        {"other-0": [json.dumps({"id": f"o{d}", "text": _text(5, d)}) for d in range(3)]},
    )
    args = tiny_job_args(
        tiny_teacher_dir,
        f"{root}/in/*.jsonl",
        str(root / "out"),
        "scoring.top_k=4",
        "teacher.temperature=2.0",
    )
    assert generate([*args, "--executor", "local"]) == 0
    return root / "out"


def _audit(target, out: Path, *extra: str) -> tuple[int, dict]:
    rc = audit_main([str(target), "--out", str(out), "--quiet", *extra])
    return rc, json.loads((out / "summary.json").read_text())


def _copy(run_dir: Path, tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    shutil.copytree(run_dir, d)
    return d


def _hist_bin(name: str) -> float:
    lo, hi, n = HISTOGRAMS[name]
    return (hi - lo) / n


def _recompute(path: Path) -> dict:
    """Shard statistics straight from `pyarrow.parquet.read_table`, row by row."""
    t = pq.read_table(path).to_pylist()
    topk, ent, tlp, regimes, unmapped, unacc = [], [], [], [], [], []
    for r in t:
        mask = np.asarray(r["loss_mask"], bool)
        lp = decode_topk_logprobs(np.asarray(r["topk_logprob_dq"]).reshape(-1, K))
        tail = np.asarray(r["tail_mass"], np.float64)
        for i in np.flatnonzero(mask):
            p = np.exp(lp[i][np.isfinite(lp[i])].astype(np.float64))
            h = -float((p * np.log(p)).sum()) if len(p) else 0.0
            if tail[i] > 0:
                h -= tail[i] * math.log(tail[i])
            ent.append(h)
            topk.append(1.0 - tail[i])
            tlp.append(r["target_logprob"][i])
            regimes.append(r["regime"][i])
            unmapped.append(r["unmapped_mass"][i])
            unacc.append(r["unaccounted_mass"][i])
    md = pq.ParquetFile(path).metadata
    comp = raw = 0
    for g in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(g).column(c)
            comp += col.total_compressed_size
            raw += col.total_uncompressed_size
    return {
        "sequences": len(t),
        "documents": sum(r["chunk"] == 0 for r in t),
        "student_tokens": sum(len(r["input_ids"]) for r in t),
        "rows": sum(len(r["loss_mask"]) for r in t),
        "target_rows": sum(sum(r["loss_mask"]) for r in t),
        "topk": np.asarray(topk),
        "entropy": np.asarray(ent),
        "target_logprob": np.asarray(tlp, np.float64),
        "regime": np.asarray(regimes),
        "unmapped": np.asarray(unmapped, np.float64),
        "unaccounted": np.asarray(unacc, np.float64),
        "bytes": path.stat().st_size,
        "compression_ratio": raw / comp,
    }


def _near_order_statistic(q_hist: float, values: np.ndarray, q: float, width: float) -> bool:
    """A histogram quantile lies in the bin of the ceil(q N)-th smallest value."""
    x = np.sort(values)
    rank = max(1, math.ceil(q * len(x)))
    return abs(q_hist - x[rank - 1]) <= width + 1e-12


# ---------------------------------------------------------------------------- the run
def test_audit_matches_an_independent_recomputation(run, tmp_path, capsys):
    rc, summary = _audit(run["dir"], tmp_path / "report")
    out = capsys.readouterr().out
    assert rc == 0 and summary["ok"] is True and summary["failures"] == []
    assert [s["name"] for s in summary["shards"]] == ["part-0", "part-1", "part-2"]
    assert summary["totals_cover"] == ["part-0", "part-1", "part-2"]
    expected_checks = ["manifest", "size", "sha256", "parquet", "metadata", "pages", "counts"]
    all_rows: dict[str, list] = {"topk": [], "entropy": [], "target_logprob": []}
    for shard in summary["shards"]:
        assert [c["name"] for c in shard["checks"]] == expected_checks
        assert all(c["ok"] for c in shard["checks"]), shard["checks"]
        path = run["dir"] / f"{shard['name']}.parquet"
        manifest = json.loads((run["dir"] / f"{shard['name']}.manifest.json").read_text())
        want = _recompute(path)
        st = shard["stats"]
        for key in ("sequences", "documents", "student_tokens", "rows", "target_rows"):
            assert st[key] == want[key], key
        assert (
            st["documents"] == manifest["documents"]
            and st["student_tokens"] == manifest["student_tokens"]
        )
        assert shard["bytes"] == want["bytes"] == manifest["bytes"]
        assert shard["bytes_per_token"] == pytest.approx(want["bytes"] / want["student_tokens"])
        assert shard["compression_ratio"] == pytest.approx(want["compression_ratio"])
        # quality over target rows: exact means, quantiles within a histogram bin
        assert st["topk_mass"]["mean"] == pytest.approx(want["topk"].mean(), abs=1e-9)
        assert st["topk_mass"]["mean"] == pytest.approx(manifest["mean_topk_mass"], abs=1e-6)
        assert st["tail_mass"]["mean"] == pytest.approx(1 - want["topk"].mean(), abs=1e-9)
        assert st["entropy_nats"]["mean"] == pytest.approx(want["entropy"].mean(), abs=1e-5)
        assert st["target_logprob"]["mean"] == pytest.approx(
            want["target_logprob"].mean(), abs=1e-6
        )
        assert st["unmapped_mass"]["mean"] == pytest.approx(want["unmapped"].mean(), abs=1e-9)
        assert st["unaccounted_mass"]["mean"] == pytest.approx(want["unaccounted"].mean(), abs=1e-9)
        shares = [float((want["regime"] == c).mean()) for c in range(3)]
        assert [
            st["regime_share"][r] for r in ("exact", "lossless", "approximate")
        ] == pytest.approx(shares)
        for q, key in ((0.05, "p5"), (0.5, "p50")):
            assert _near_order_statistic(
                st["topk_mass"][key], want["topk"], q, _hist_bin("topk_mass")
            )
        assert _near_order_statistic(
            st["entropy_nats"]["p50"], want["entropy"], 0.5, _hist_bin("entropy")
        )
        for key in all_rows:
            all_rows[key].append(want[key])
    # the subset scorer's rows are all exact, and entropies are real spreads
    assert summary["run"]["regime_share"]["exact"] == 1.0
    assert 0 < summary["run"]["entropy_nats"]["mean"] < math.log(K + 1)
    # documents longer than the context are chunked: sequences > documents, masked rows
    long = summary["shards"][2]["stats"]
    assert long["sequences"] > long["documents"] == 6 and long["rows"] > long["target_rows"]
    # skipped records by reason (from the manifest), per shard and in the run totals
    assert summary["shards"][1]["skipped_by_reason"] == {"empty document": 1, "malformed JSON": 1}
    assert summary["run"]["skipped_by_reason"] == {"empty document": 1, "malformed JSON": 1}
    # run totals are the merged shards
    run_ = summary["run"]
    for key in ("sequences", "documents", "student_tokens", "rows", "target_rows", "bytes"):
        assert run_[key] == sum(
            s["stats"][key] if key != "bytes" else s["bytes"] for s in summary["shards"]
        )
    topk_all = np.concatenate(all_rows["topk"])
    assert run_["topk_mass"]["mean"] == pytest.approx(topk_all.mean(), abs=1e-9)
    stats_json = json.loads((run["dir"] / "stats.json").read_text())
    assert run_["topk_mass"]["mean"] == pytest.approx(stats_json["mean_topk_mass"], abs=5e-5)
    assert _near_order_statistic(run_["topk_mass"]["p5"], topk_all, 0.05, _hist_bin("topk_mass"))
    assert sum(summary["histograms"]["topk_mass"]["counts"]) == run_["target_rows"]
    assert summary["consistency"]["ok"] and summary["consistency"]["differences"] == {}
    # the printed tables
    assert "part-2" in out and "TOTAL" in out and "RESULT: OK" in out
    assert "malformed JSON: 1" in out


def test_report_has_plots_and_an_html_page_that_embeds_them(run, tmp_path):
    from PIL import Image

    out = tmp_path / "report"
    rc, summary = _audit(run["dir"], out)
    assert rc == 0
    assert sorted(summary["plots"]) == sorted(PLOTS.values())
    pngs = {}
    for name in PLOTS.values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name
        with Image.open(out / name) as im:
            im.verify()  # a complete, valid PNG
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200
            # not a blank canvas: a plot has many colours
            assert len(im.convert("RGB").getcolors(1 << 20) or []) > 20
        pngs[name] = data

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images: list[dict] = []
            self.cells: list[str] = []
            self._in_td = False

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs))
            self._in_td = tag == "td"

        def handle_data(self, data):
            if self._in_td:
                self.cells.append(data)

    page = Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    page.close()
    assert len(page.images) == len(PLOTS)
    embedded = {}
    for img in page.images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        embedded[img["alt"]] = base64.b64decode(src.split(",", 1)[1], validate=True)
    assert embedded == pngs  # every plot, byte for byte
    for name in ("part-0", "part-1", "part-2", "TOTAL"):
        assert name in page.cells
    assert str(summary["run"]["student_tokens"]) in page.cells


# ---------------------------------------------------------------------------- integrity
def test_corrupted_shards_are_named_and_the_others_still_audited(run, tmp_path, capsys):
    _, clean = _audit(run["dir"], tmp_path / "clean")
    d = _copy(run["dir"], tmp_path, "corrupt")
    f = d / "part-1.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x5A  # inside the data pages, same size
    f.write_bytes(bytes(data))
    f = d / "part-2.parquet"
    f.write_bytes(f.read_bytes()[:-100])  # truncated
    rc, summary = _audit(d, tmp_path / "report")
    out = capsys.readouterr().out
    assert rc == 1 and summary["ok"] is False
    assert summary["shards_failed"] == ["part-1", "part-2"]
    by = {s["name"]: s for s in summary["shards"]}
    failed = {n: {c["name"] for c in s["checks"] if not c["ok"]} for n, s in by.items()}
    assert failed["part-0"] == set()
    assert "sha256" in failed["part-1"] and failed["part-1"] & {"pages", "counts"}
    assert {"size", "sha256", "parquet"} <= failed["part-2"]
    size = next(c for c in by["part-2"]["checks"] if c["name"] == "size")
    assert "truncated" in size["detail"]
    # the intact shard is audited as before and alone makes the totals
    assert by["part-0"]["stats"] == clean["shards"][0]["stats"]
    assert summary["totals_cover"] == ["part-0"]
    assert summary["run"]["student_tokens"] == by["part-0"]["stats"]["student_tokens"]
    assert "part-1: sha256" in out and "part-2: size" in out and "RESULT: FAILED" in out

    d = _copy(run["dir"], tmp_path, "missing")
    (d / "part-0.manifest.json").unlink()
    (d / "part-2.parquet").unlink()
    rc, summary = _audit(d, tmp_path / "report2")
    assert rc == 1 and summary["shards_failed"] == ["part-0", "part-2"]
    by = {s["name"]: s for s in summary["shards"]}
    assert "manifest missing" in by["part-0"]["failures"][0]
    assert by["part-2"]["failures"] == [f"size: data file {d}/part-2.parquet is missing"]
    assert by["part-1"]["ok"] and summary["totals_cover"] == ["part-1"]


def test_a_shard_of_another_config_is_flagged(run, other_run, tmp_path, capsys):
    d = _copy(run["dir"], tmp_path, "mixed")
    for suffix in (".parquet", ".manifest.json"):
        shutil.copy(other_run / f"other-0{suffix}", d / f"other-0{suffix}")
    index = json.loads((d / "index.json").read_text())
    m = json.loads((d / "other-0.manifest.json").read_text())
    index["shards"].append(
        {
            "name": "other-0",
            "file": m["file"],
            "manifest": "other-0.manifest.json",
            "sha256": m["sha256"],
        }
    )
    (d / "index.json").write_text(json.dumps(index))
    rc, summary = _audit(d, tmp_path / "report")
    out = capsys.readouterr().out
    assert rc == 1 and summary["ok"] is False
    by = {s["name"]: s for s in summary["shards"]}
    assert by["other-0"]["ok"]  # intact: read with its own k
    assert by["other-0"]["stats"]["target_rows"] > 0
    cons = summary["consistency"]
    assert cons["ok"] is False and cons["reference"] == "run index"
    assert list(cons["differences"]) == ["other-0"]
    diff = cons["differences"]["other-0"]
    assert {"top_k", "temperature", "config_hash"} <= set(diff)
    assert diff["top_k"] == {"expected": K, "found": 4}
    assert diff["temperature"] == {"expected": 1.0, "found": 2.0}
    assert not {"teacher", "teacher_tokenizer_sha256", "student_tokenizer_sha256"} & set(diff)
    assert any(f.startswith("other-0: provenance differs in") for f in summary["failures"])
    assert "other-0: " in out.split("consistency")[1] and "top_k 4 (expected 8)" in out
    # the same shards without an index: the odd one out is flagged against the majority
    rc, summary = _audit(f"{d}/*.parquet", tmp_path / "report2")
    assert rc == 1
    assert summary["consistency"]["reference"] == "most common provenance"
    assert list(summary["consistency"]["differences"]) == ["other-0"]
    # --shards keeps the run's own shards: consistent again
    rc, summary = _audit(d, tmp_path / "report3", "--shards", "part-*")
    assert rc == 0 and [s["name"] for s in summary["shards"]] == ["part-0", "part-1", "part-2"]


def test_a_run_without_index_fails_and_bad_paths_exit_2(run, tmp_path, capsys):
    d = _copy(run["dir"], tmp_path, "noindex")
    (d / "index.json").unlink()
    rc, summary = _audit(d, tmp_path / "report")
    assert rc == 1 and summary["index"] is None and len(summary["shards"]) == 3
    assert all(s["ok"] for s in summary["shards"])
    assert "no index.json" in summary["problems"][0]
    assert audit_main([str(tmp_path / "nothing-here"), "--out", str(tmp_path / "r")]) == 2
    assert audit_main([str(run["dir"]), "--shards", "nope-*", "--out", str(tmp_path / "r")]) == 2
    assert "matches --shards" in capsys.readouterr().err


# ---------------------------------------------------------------------------- inspect
def test_inspect_prints_decoded_tokens_and_top_targets(run, capsys):
    from pipeline.tokenization import ByteLevelBPE, load_tokenizer, truncate_merges

    S = ByteLevelBPE(truncate_merges(load_tokenizer(run["teacher"]), 60))
    shard = run["dir"] / "part-0.parquet"
    assert audit_main(["inspect", str(shard), "--doc", "s0d2"]) == 0
    out = capsys.readouterr().out
    row = next(r for r in pq.read_table(shard).to_pylist() if r["doc_id"] == "s0d2")
    ids = row["input_ids"]
    assert f"text: {run['texts']['s0d2']!r}" in out
    assert "tokens: " + " ".join(f"[{j}]{S.token_repr(t)!r}" for j, t in enumerate(ids)) in out
    lines = [line for line in out.splitlines() if ROW_LINE.match(line)]
    assert len(lines) == len(ids) + 1
    lp = decode_topk_logprobs(np.asarray(row["topk_logprob_dq"]).reshape(-1, K))
    tk = np.asarray(row["topk_ids"]).reshape(-1, K)
    for i in (0, 3, len(ids)):
        want = "  ".join(
            f"{S.token_repr(int(t))!r} {math.exp(x):.4f}"
            for t, x in zip(tk[i][:5], lp[i][:5], strict=True)
        )
        assert want in lines[i], (i, lines[i])
    assert f"next {S.token_repr(ids[3])!r}" in lines[3]

    assert audit_main(["inspect", str(shard), "--doc", "s0d2", "--pos", "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if ROW_LINE.match(line)]
    assert len(rows) == 1 and rows[0] == lines[3]
    assert audit_main(["inspect", str(shard), "--doc", "nope"]) == 2
    assert "'nope' is not in shard part-0" in capsys.readouterr().err
    assert audit_main(["inspect", str(shard), "--doc", "s0d2", "--pos", "999"]) == 2
    assert "--pos 999 is in no chunk of doc 's0d2' (chunk 0: rows 0.." in capsys.readouterr().err
    # a chunked document: --pos is a row of whichever chunks have it (it was checked
    # against the last chunk only, so a row of a longer first chunk was refused)
    chunked = run["dir"] / "part-2.parquet"
    lengths = {
        r["chunk"]: len(r["input_ids"])
        for r in read_table(str(chunked)).to_pylist()
        if r["doc_id"] == "s2d3"
    }
    assert len(lengths) > 1 and lengths[0] > lengths[max(lengths)]
    pos = lengths[0]  # the first chunk's last row (it predicts past the chunk)
    assert audit_main(["inspect", str(chunked), "--doc", "s2d3", "--pos", str(pos)]) == 0
    shown = capsys.readouterr().out
    assert "--- chunk 0:" in shown and f"--- chunk {max(lengths)}:" not in shown
    assert len([line for line in shown.splitlines() if ROW_LINE.match(line)]) == sum(
        1 for L in lengths.values() if pos <= L
    )


# ---------------------------------------------------------------------------- live re-score
def test_verify_live_is_within_the_quantisation_bound(run, tmp_path):
    bound = LOGPROB_STEP / 2 + LIVE_TOLERANCE
    rc, summary = _audit(run["dir"], tmp_path / "report", "--verify-live", "4", "--seed", "3")
    v = summary["verify_live"]
    assert rc == 0 and v["ok"], v
    assert v["compared"] == 4 and len(v["sequences"]) == 4 and v["not_reencoded"] == []
    assert 0 < v["max_abs_logprob_diff"] <= bound
    assert all(
        s["max_tail_mass_diff"] < 1e-4 and s["topk_id_agreement"] > 0.9 for s in v["sequences"]
    )
    # the same seed picks the same sequences
    _, again = _audit(run["dir"], tmp_path / "report2", "--verify-live", "4", "--seed", "3")
    pick = [(s["shard"], s["doc_id"], s["chunk"]) for s in v["sequences"]]
    assert [
        (s["shard"], s["doc_id"], s["chunk"]) for s in again["verify_live"]["sequences"]
    ] == pick
    # a teacher that is not the one that made the shards (another temperature) fails it
    d = _copy(run["dir"], tmp_path, "hot")
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["teacher"]["temperature"] = 3.0
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc, summary = _audit(d, tmp_path / "report3", "--verify-live", "2")
    v = summary["verify_live"]
    assert rc == 1 and v["ok"] is False and v["max_abs_logprob_diff"] > bound
    assert all("temperature" in diff for diff in v["config_differences"].values())
    assert any(f.startswith("verify-live:") for f in summary["failures"])


# ---------------------------------------------------------------------------- Ray
def _comparable(summary: dict) -> dict:
    s = json.loads(json.dumps(summary))
    for key in ("seconds", "rows_per_second"):
        s.pop(key, None)
    for shard in s["shards"]:
        shard.pop("seconds")
    return s


@pytest.mark.integration
def test_ray_executor_gives_the_same_summary(run, ray_local, tmp_path):
    d = _copy(run["dir"], tmp_path, "ray")
    f = d / "part-1.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    rc_local, local = _audit(d, tmp_path / "local")
    rc_ray, remote = _audit(d, tmp_path / "ray-report", "--executor", "ray")
    assert rc_local == rc_ray == 1 and local["shards_failed"] == ["part-1"]
    assert _comparable(remote) == _comparable(local)
    assert ray_local.is_initialized()  # an existing cluster is left running


@pytest.mark.integration
def test_audit_of_a_run_on_s3_matches_the_local_audit(run, moto_s3, tmp_path):
    """Through fsspec (s3fs on a real S3 server, behind a loopback proxy that counts what
    it serves): the run, its report, and inspect. Each shard is downloaded once."""
    import s3fs

    from tests.test_s3_faults import FaultProxy

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **moto_s3["options"])
    proxy = FaultProxy((moto_s3["host"], moto_s3["port"]))
    opts = {**moto_s3["options"], "endpoint_url": proxy.endpoint}
    prefix = f"{moto_s3['bucket']}/audit-run"
    fs.put(f"{run['dir']}/", f"{prefix}/", recursive=True)
    _, local = _audit(run["dir"], tmp_path / "local")
    try:
        rc = audit_main(
            [
                f"s3://{prefix}",
                "--storage-options",
                json.dumps(opts),
                "--out",
                f"s3://{prefix}-report",
                "--quiet",
            ]
        )
        for data in sorted(Path(run["dir"]).glob("*.parquet")):
            got = proxy.bytes_sent("GET", f"/{prefix}/{data.name}")
            assert got == data.stat().st_size, (data.name, got)  # read once, whole
    finally:
        proxy.stop()
    opts = moto_s3["options"]
    remote = json.loads(fs.cat(f"{prefix}-report/summary.json"))
    assert rc == 0 and remote["ok"]
    assert fs.cat(f"{prefix}-report/topk_mass.png").startswith(PNG_SIGNATURE)
    assert remote["run"] == local["run"]
    assert [s["stats"] for s in remote["shards"]] == [s["stats"] for s in local["shards"]]
    assert (
        audit_main(
            [
                "inspect",
                f"s3://{prefix}/part-0.parquet",
                "--doc",
                "s0d1",
                "--storage-options",
                json.dumps(opts),
            ]
        )
        == 0
    )


# ---------------------------------------------------------------------------- either scorer
def _tiny_run(root: Path, teacher_dir, records: list[dict], *extra: str) -> Path:
    """A one-shard run of ``records`` by the real job (in-process executor)."""
    _write_inputs(root / "in", {"t": [json.dumps(r) for r in records]})
    args = tiny_job_args(teacher_dir, f"{root}/in/*.jsonl", str(root / "out"), *extra)
    assert generate([*args, "--executor", "local"]) == 0
    return root / "out"


def _verified(out: Path, report: Path, n: int) -> dict:
    """``--verify-live n`` on a run of n sequences: every one re-encodes and is compared
    within the quantisation bound."""
    rc, summary = _audit(out, report, "--verify-live", str(n))
    v = summary["verify_live"]
    assert rc == 0 and v["ok"], v
    assert v["compared"] == n and len(v["sequences"]) == n and v["not_reencoded"] == []
    assert v["config_differences"] == {}
    assert v["max_abs_logprob_diff"] <= v["bound"] == LOGPROB_STEP / 2 + LIVE_TOLERANCE
    assert all(s["topk_id_agreement"] > 0.9 for s in v["sequences"])
    return v


def test_verify_live_on_a_subset_scorer_run(tiny_teacher_dir, tmp_path):
    recs = [{"id": f"d{d}", "text": _text(7, d)} for d in range(3)]
    out = _tiny_run(tmp_path, tiny_teacher_dir, recs)
    m = json.loads((out / "t.manifest.json").read_text())
    assert m["scorer"] == "subset-exact" and m["sequences"] == 3
    _verified(out, tmp_path / "report", 3)


def test_verify_live_on_a_general_scorer_run(tiny_teacher_dir, tmp_path):
    """A student unrelated to the teacher (the general scorer), chat records whose loss
    covers the assistant turns only: the job computed those rows only, and the live
    re-score computes the same ones (the rest are empty in both)."""
    from tests.tiny_assets import trained_byte_bpe

    other = tmp_path / "other.json"
    trained_byte_bpe(300, seed_text="completely different text, 12 and 345. " * 50).save(str(other))
    chats = [
        {
            "id": f"c{i}",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        }
        for i, (q, a) in enumerate([("Say hi.", "Hi there."), ("2 + 2?", "It is 4.")])
    ]
    out = _tiny_run(
        tmp_path,
        tiny_teacher_dir,
        chats,
        f"student.tokenizer={other}",
        "input.messages_field=messages",
        "input.loss_on=assistant",
        "scoring.general.max_depth=3",
        "scoring.general.min_prob=0.01",
    )
    m = json.loads((out / "t.manifest.json").read_text())
    assert m["scorer"] == "general-approx" and m["sequences"] == 2
    rows = read_table(str(out / "t.parquet")).to_pylist()
    assert all(0 < sum(r["loss_mask"]) < len(r["loss_mask"]) for r in rows)
    _verified(out, tmp_path / "report", 2)
