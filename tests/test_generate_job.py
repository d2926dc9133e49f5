"""The generate job end to end on a real local Ray: shards, manifests, index, resume,
bad input and clear errors. Teacher: a tiny random Llama with a trained byte-level BPE."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from jobs.generate import main
from pipeline.config import ConfigError, load_config
from pipeline.scoring import SubsetExactScorer
from pipeline.shards import read_table
from pipeline.teacher import HFTeacher
from pipeline.tokenization import load_tokenizer, truncate_merges
from schemas.targets import decode_topk_logprobs

pytestmark = pytest.mark.integration

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers 12 and 345, then  two spaces and a tab\there.",
    "Python's bundled documentation is a fine source of English text.",
    "Short one.",
    "A longer document " * 30,
]


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text(
        "".join(json.dumps({"id": f"a{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS[:2]))
    )
    raw = "".join(json.dumps({"id": f"b{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS[2:4]))
    (d / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw.encode()))
    pq.write_table(pa.table({"id": ["c0"], "text": [TEXTS[4]]}), d / "c.parquet")
    return d


def _args(tiny_teacher_dir, inp, out, *extra):
    return [
        f"teacher.model={tiny_teacher_dir}",
        "teacher.device=cpu",
        "teacher.max_batch_tokens=512",
        "student.merges=60",
        "scoring.top_k=16",
        f"input.paths=[{inp}/*]",
        f"output.path={out}",
        "ray.num_actors=2",
        "input.messages_field=null",
        "input.loss_on=all",
        *extra,
    ]


def test_end_to_end_equals_in_process_scorer_and_resumes(
    ray_local, tiny_teacher_dir, corpus, tmp_path, capsys
):
    out = tmp_path / "out"
    assert (
        main(["--show", "0", *_args(tiny_teacher_dir, corpus, out, "teacher.max_context=512")]) == 0
    )
    index = json.loads((out / "index.json").read_text())
    assert [s["name"] for s in index["shards"]] == ["a", "b", "c"]
    assert index["totals"]["documents"] == len(TEXTS)
    for f in ("stats.json", "config.yaml", "run_config.json"):
        assert (out / f).is_file()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"] == len(TEXTS) and 0.0 < stats["mean_topk_mass"] <= 1.0
    # shards read back equal the scorer's in-process output for the same documents
    teacher = HFTeacher(str(tiny_teacher_dir), device="cpu", max_batch_tokens=512)
    t_tok = load_tokenizer(tiny_teacher_dir)
    scorer = SubsetExactScorer(t_tok, truncate_merges(t_tok, 60))
    rows = []
    for s in index["shards"]:
        m = json.loads((out / s["manifest"]).read_text())
        assert m["records_in"] == m["documents"] and not m["skipped"]
        rows += read_table(str(out / s["file"]), manifest=m).to_pylist()
    assert [r["doc_id"] for r in rows] == ["a0", "a1", "b0", "b1", "c0"]
    # scored as the job scored them: each shard's documents in one call, one torch
    # thread (an actor's), so the float32 forwards add in the same order and the rows
    # are the same numbers on any machine (packed otherwise, they differ by rounding)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = [
            w
            for part in (TEXTS[:2], TEXTS[2:4], TEXTS[4:])
            for w in scorer.score(teacher, part, top_k=16)
        ]
    finally:
        torch.set_num_threads(threads)
    for r, w in zip(rows, want, strict=True):
        np.testing.assert_array_equal(r["input_ids"], w.student_ids)
        np.testing.assert_array_equal(np.reshape(r["topk_ids"], (-1, 16)), w.topk_ids)
        got = decode_topk_logprobs(np.reshape(r["topk_logprob_dq"], (-1, 16)))
        np.testing.assert_allclose(got, w.topk_logprobs, atol=1e-3 + 1e-6)  # quantised to 1e-3 nats
        np.testing.assert_allclose(r["target_logprob"], w.target_logprobs, atol=1e-5)
        assert all(r["loss_mask"])
    # a rerun of the same config is a no-op: it leaves the run's record (stats.json with
    # the real run's tokens/s and placement, config.yaml, run_config.json) as it was
    record = ("stats.json", "config.yaml", "run_config.json", "index.json")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    kept = {f: (out / f).read_bytes() for f in record}
    assert json.loads(kept["stats.json"])["student_tokens_per_second"] > 0
    assert (
        main(["--show", "0", *_args(tiny_teacher_dir, corpus, out, "teacher.max_context=512")]) == 0
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before
    assert {f: (out / f).read_bytes() for f in record} == kept
    assert "0 this run" in capsys.readouterr().out
    # a different config is refused without --overwrite, and accepted with it
    assert main(["--show", "0", *_args(tiny_teacher_dir, corpus, out, "scoring.top_k=8")]) == 2
    assert (
        main(
            ["--show", "0", "--overwrite", *_args(tiny_teacher_dir, corpus, out, "scoring.top_k=8")]
        )
        == 0
    )
    assert len(read_table(str(out / "c.parquet"))) == 2  # max_context now 256: c0 is chunked
    assert len(read_table(str(out / "a.parquet")).to_pylist()[0]["topk_ids"]) % 8 == 0


def test_a_resumed_run_redoes_only_uncommitted_shards(
    ray_local, tiny_teacher_dir, corpus, tmp_path
):
    out = tmp_path / "out"
    assert main(["--show", "0", *_args(tiny_teacher_dir, corpus, out)]) == 0
    (out / "b.manifest.json").unlink()  # as if the run died before committing shard b
    (out / "index.json").unlink()
    a_before = (out / "a.parquet").stat().st_mtime_ns
    assert main(["--show", "0", *_args(tiny_teacher_dir, corpus, out)]) == 0
    assert (out / "a.parquet").stat().st_mtime_ns == a_before
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards_this_run"] == 1
    assert json.loads((out / "index.json").read_text())["totals"]["documents"] == len(TEXTS)
    # both invocations are on record, with where each shard ran
    assert [r["shards"] for r in stats["runs"]] == [3, 1]
    assert set(stats["runs"][0]["ray_node_of_shard"]) == {"a", "b", "c"}
    assert set(stats["ray_node_of_shard"]) == {"a", "b", "c"}


def test_the_resume_guard_covers_every_setting_that_changes_the_targets(
    ray_local, tiny_teacher_dir, corpus, tmp_path, capsys
):
    """teacher.max_batch_tokens (the default max_context, so the chunking), teacher.dtype
    and teacher.device change stored numbers: a rerun with another value used to say
    "already committed" and redo a missing shard with the new value. It is refused,
    naming the keys, and leaves the run's files as they were; the resolved values are in
    the provenance, and the audit sees a shard made with another dtype."""
    out = tmp_path / "out"
    args = _args(tiny_teacher_dir, corpus, out, "teacher.dtype=float32")
    assert main(["--show", "0", *args]) == 0
    m = json.loads((out / "a.manifest.json").read_text())
    assert (m["teacher_dtype"], m["teacher_device"], m["max_context"]) == ("float32", "cpu", 256)
    assert m["max_batch_tokens"] == 512
    (out / "b.manifest.json").unlink()
    kept = {f: (out / f).read_bytes() for f in ("config.yaml", "run_config.json")}
    for change, named in [
        ("teacher.max_batch_tokens=1024", "teacher.max_batch_tokens: 512 -> 1024"),
        ("teacher.dtype=bfloat16", "teacher.dtype: 'float32' -> 'bfloat16'"),
        ("teacher.device=auto", "teacher.device: 'cpu' -> 'auto'"),
    ]:
        capsys.readouterr()
        assert main(["--show", "0", *args, change]) == 2, change
        assert named in capsys.readouterr().err
        assert {f: (out / f).read_bytes() for f in kept} == kept
        assert not (out / "b.manifest.json").exists()
    # the same settings resume
    assert main(["--show", "0", *args]) == 0 and (out / "b.manifest.json").exists()
    # a shard made in bfloat16 mixed into the run: the audit's consistency check names it
    other = tmp_path / "bf16"
    assert (
        main(["--show", "0", *_args(tiny_teacher_dir, corpus, other, "teacher.dtype=bfloat16")])
        == 0
    )
    for f in ("c.parquet", "c.manifest.json"):
        (out / f).write_bytes((other / f).read_bytes())
    from pipeline.audit import RunAudit, audit_shard, locate

    source = locate(str(out))
    audit = RunAudit(source)
    for ref in source.shards:
        audit.add(audit_shard(ref))
    diff = audit.consistency()["differences"]["c"]
    assert diff["teacher_dtype"] == {"expected": "float32", "found": "bfloat16"}


def test_bad_records_are_skipped_counted_and_named(ray_local, tiny_teacher_dir, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    lines = [
        json.dumps({"id": "ok1", "text": "Fine text."}).encode(),
        b'{"id": "broken", "text": "no end',
        b'{"id": "bad-utf8", "text": "caf\xe9"}',
        json.dumps({"id": "empty", "text": "   "}).encode(),
        json.dumps({"id": "notext", "body": "x"}).encode(),
        json.dumps({"id": "number", "text": 42}).encode(),
        json.dumps({"id": "ok2", "text": "More fine text."}).encode(),
    ]
    (inp / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    assert main(["--show", "0", *_args(tiny_teacher_dir, inp, out)]) == 0
    m = json.loads((out / "mixed.manifest.json").read_text())
    assert m["records_in"] == 7 and m["documents"] == 2
    reasons = {s["index"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {1, 2, 3, 4, 5}
    assert "malformed JSON" in reasons[1]
    assert "invalid UTF-8" in reasons[2]
    assert reasons[3] == "empty document"
    assert "missing text field" in reasons[4]
    assert "not a string" in reasons[5]
    assert [r["doc_id"] for r in read_table(str(out / "mixed.parquet")).to_pylist()] == [
        "ok1",
        "ok2",
    ]


def test_help_config_lists_every_key_with_default_and_meaning(capsys):
    from pipeline.config import GeneralScorerConfig, JobConfig

    assert main(["--help-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [line.split(":", 1)[0] for line in lines]
    sections = JobConfig.model_fields
    want = [
        f"{sec}.{k}"
        for sec, f in sections.items()
        for k in f.annotation.model_fields  # type: ignore[union-attr]
        if k != "general"
    ] + [f"scoring.general.{k}" for k in GeneralScorerConfig.model_fields]
    assert sorted(keys) == sorted(want)
    by_key = dict(zip(keys, lines, strict=True))
    assert by_key["ray.storage_retry_seconds"].startswith("ray.storage_retry_seconds: float = 15.0")
    assert "scoring.general.beam: int = 64" in by_key["scoring.general.beam"]
    assert all("(" in line for line in lines), [x for x in lines if "(" not in x]  # all explained
    # every key it lists takes its listed default as an override, and has that default
    for line in lines:
        key, rest = line.split(": ", 1)
        default = rest.split(" = ", 1)[1].split("  (", 1)[0]
        value: object = load_config(None, [f"{key}={default}"]).model_dump(mode="json")
        for part in key.split("."):
            value = value[part]  # type: ignore[index]
        assert json.dumps(value) == default, key


def test_config_errors_come_before_any_model(tiny_teacher_dir, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="unknown_key"):
        load_config(None, ["scoring.unknown_key=1"])
    # found when the config loads, not in every actor's set-up (it was a ValueError there)
    with pytest.raises(ConfigError, match=r"max_context \(1024\) must not exceed max_batch_tokens"):
        load_config(None, ["teacher.max_context=1024", "teacher.max_batch_tokens=512"])
    # missing input, unwritable output, not a subset pair: exit code 2 and a clear message
    assert main(["--show", "0", *_args(tiny_teacher_dir, tmp_path / "nope", out)]) == 2
    assert "matches no file" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jsonl").write_text('{"text": "a"}\n')
    assert main(["--show", "0", *_args(tiny_teacher_dir, tmp_path / "in", blocker / "out")]) == 2
    assert "not writable" in capsys.readouterr().err
    from tests.tiny_assets import trained_byte_bpe

    other = tmp_path / "other.json"
    trained_byte_bpe(300, seed_text="completely different text " * 50).save(str(other))
    assert (
        main(
            [
                "--show",
                "0",
                *_args(
                    tiny_teacher_dir,
                    tmp_path / "in",
                    out,
                    f"student.tokenizer={other}",
                    "scoring.scorer=subset",  # asked for explicitly: refused
                ),
            ]
        )
        == 2
    )
    assert "not a truncated-merge" in capsys.readouterr().err
    assert not any(out.iterdir())  # a refused run leaves nothing that claims output.path
    # a student whose pieces may join a word to the next space (no pre-tokenizer): no
    # row is decided before the end of text, so approx (and bounded) mode is refused and
    # lossless warned
    from tests.scoring.general_assets import sentencepiece_bpe

    crossing = tmp_path / "crossing.json"
    sentencepiece_bpe("legacy", cross_space=True).save(str(crossing))
    base = _args(tiny_teacher_dir, tmp_path / "in", out, f"student.tokenizer={crossing}")
    assert main(["--show", "0", *base]) == 2
    assert (
        "cannot use this student in approx mode: no pre-token boundary" in capsys.readouterr().err
    )
    assert main(["--show", "0", *base, "scoring.general.mode=bounded"]) == 2
    assert "in bounded mode: no pre-token boundary" in capsys.readouterr().err
    cfg = load_config(None, [*base, "scoring.general.mode=lossless"])
    with caplog.at_level("WARNING", logger="pipeline.generate"):
        from pipeline.generate import choose_scorer, tokenizer_pair

        kind, why = choose_scorer(cfg, *tokenizer_pair(cfg))
    assert kind == "general" and "student decision rule none" in why
    assert "cost grows exponentially" in caplog.text


def test_a_missing_model_or_tokenizer_path_says_no_such_file(tiny_teacher_dir, tmp_path, capsys):
    """A path that does not exist used to get the hub's "Repo id must be in the form
    'repo_name'..." error."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jsonl").write_text('{"text": "a"}\n')
    out = tmp_path / "out"
    for override, key in [
        (f"teacher.model={tmp_path}/models/teacher-v2", "teacher.model"),
        ("student.tokenizer=./students/llama3/tokenizer.json", "student.tokenizer"),
        ("student.tokenizer=~/no-such-dir/tok", "student.tokenizer"),
    ]:
        assert main(["--show", "0", *_args(tiny_teacher_dir, tmp_path / "in", out, override)]) == 2
        err = capsys.readouterr().err
        assert f"error: {key}: " in err and "no such file or directory" in err, err
        assert "Repo id" not in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
    # the nearest folder that exists is named
    assert (
        main(
            [
                "--show",
                "0",
                *_args(
                    tiny_teacher_dir, tmp_path / "in", out, f"teacher.model={tmp_path}/models/t"
                ),
            ]
        )
        == 2
    )
    assert f"nearest existing folder is {tmp_path}" in capsys.readouterr().err
    # a string that may be a hub id: not local, not in the offline cache, said so
    assert (
        main(
            [
                "--show",
                "0",
                *_args(
                    tiny_teacher_dir, tmp_path / "in", out, "student.tokenizer=nobody/no-such-model"
                ),
            ]
        )
        == 2
    )
    assert "is not a local path, and not in the Hugging Face cache" in capsys.readouterr().err
    # the teacher class itself (library use)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        HFTeacher(str(tmp_path / "nope"), device="cpu")


def test_chat_records_get_assistant_only_loss_mask(ray_local, tiny_teacher_dir, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    chat = {
        "id": "c",
        "messages": [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi there."},
        ],
    }
    (inp / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    out = tmp_path / "out"
    args = _args(
        tiny_teacher_dir, inp, out, "input.messages_field=messages", "input.loss_on=assistant"
    )
    assert main(["--show", "0", *args]) == 0
    (row,) = read_table(str(out / "chat.parquet")).to_pylist()
    S = load_tokenizer(tiny_teacher_dir)
    stu = truncate_merges(S, 60)
    mask = np.asarray(row["loss_mask"])
    ids = row["input_ids"]
    # the targets are exactly the rows that predict the assistant's text and its end marker
    predicted = "".join(stu.decode([t]) if m else "|" for t, m in zip([*ids, 0], mask, strict=True))
    assert "Hi there.<|im_end|>" in predicted.replace("|", "") or "Hi there." in predicted
    assert "Say hi" not in predicted.replace("|", "")
    assert mask.sum() < len(mask)


def test_long_documents_are_chunked_and_every_position_is_a_target_once(tiny_teacher_dir):
    from pipeline.config import load_config
    from pipeline.generate import GenerateStep

    cfg = load_config(
        None,
        [
            f"teacher.model={tiny_teacher_dir}",
            "teacher.device=cpu",
            "teacher.max_batch_tokens=512",
            "teacher.max_context=64",
            "student.merges=60",
            "scoring.chunk_overlap=16",
            "input.messages_field=null",
            "input.loss_on=all",
        ],
    )
    step = GenerateStep(cfg)
    step.setup()
    text = " ".join(f"Sentence {i} of a long document, with words." for i in range(40))
    chunks = step.chunks(text)
    assert len(chunks) > 3 and chunks[-1].final and not any(c.final for c in chunks[:-1])
    covered = []
    for c in chunks:
        assert text[c.start : c.start + len(c.text)] == c.text
        (r,) = step.scorer.score(step.teacher, [c.text], top_k=4)
        assert len(r.teacher_ids) + 1 <= 64
        mask = step._student_mask(type("D", (), {"target_spans": None})(), c, r)
        # char offset each target row predicts, in document coordinates
        offs = np.cumsum([0, *(len(step.scorer.S.token_bytes[int(t)]) for t in r.student_ids)])
        covered += [c.start + int(o) for o, m in zip(offs, mask, strict=True) if m]
    # ASCII text: byte offsets are char offsets. Each token start (and the end) once.
    assert covered == sorted(set(covered))
    full = step.scorer.prepare(text)
    starts = np.cumsum([0, *(len(step.scorer.S.token_bytes[int(t)]) for t in full.student_ids)])
    assert set(covered) == set(int(x) for x in starts)


def test_chunks_are_sized_by_context_tree_not_canonical_tokens(tiny_teacher_dir, tmp_path):
    """A byte-level student (0 merges) makes each context tree ~3x its canonical teacher
    tokens; chunking by canonical tokens alone would overflow one forward row."""
    from pipeline.config import load_config
    from pipeline.generate import GenerateStep

    cfg = load_config(
        None,
        [
            f"teacher.model={tiny_teacher_dir}",
            "teacher.device=cpu",
            "teacher.max_batch_tokens=128",
            "teacher.max_context=128",
            "student.merges=0",
            "scoring.top_k=4",
            "scoring.chunk_overlap=8",
            "input.messages_field=null",
            "input.loss_on=all",
            f"output.path={tmp_path}/out",
        ],
    )
    step = GenerateStep(cfg)
    step.setup()
    text = " ".join(f"Sentence {i} of a long document, with words." for i in range(12))
    naive = step.chunks(text)  # by canonical teacher tokens
    assert max(step.scorer.prepare(c.text).num_nodes for c in naive) > 128
    pieces = step.prepared_chunks(text)
    assert len(pieces) > len(naive)
    assert all(step.targets.tree_tokens(p) + len(step.teacher.start_ids) <= 128 for _, p in pieces)
    assert step.prepared_chunks(text) == pieces  # deterministic
    # and the shard scores end to end, every student position a target exactly once
    (tmp_path / "long.jsonl").write_text(json.dumps({"id": "d", "text": text}) + "\n")
    m = step.process_shard(str(tmp_path / "long.jsonl"))
    assert m["documents"] == 1 and not m["skipped"]
    assert m["target_rows"] == len(step.scorer.prepare(text).student_ids) + 1


def test_unrelated_student_gets_the_general_scorer(tiny_teacher_dir, tmp_path, caplog):
    """scoring.scorer=auto picks the general scorer for a student that is not a
    truncated-merge of the teacher, says so, and its rows are stored with their regime
    and unaccounted mass (top-k + tail + unaccounted = 1)."""
    import logging

    from tests.tiny_assets import trained_byte_bpe

    other = tmp_path / "other.json"
    trained_byte_bpe(300, seed_text="completely different text, 12 and 345. " * 50).save(str(other))
    (tmp_path / "in").mkdir()
    texts = ["ab 12", "a text.", "b  1"]
    bad = "ab<|endoftext|>1"  # an added token inside: this document alone is skipped
    (tmp_path / "in" / "g.jsonl").write_text(
        "".join(json.dumps({"id": f"g{i}", "text": t}) + "\n" for i, t in enumerate(texts))
        + json.dumps({"id": "bad", "text": bad})
        + "\n"
    )
    out = tmp_path / "out"
    args = _args(
        tiny_teacher_dir,
        tmp_path / "in",
        out,
        f"student.tokenizer={other}",
        "scoring.top_k=8",
        "scoring.general.max_depth=3",
        "scoring.general.min_prob=0.01",
    )
    with caplog.at_level(logging.INFO):
        assert main(["--show", "0", "--executor", "local", *args]) == 0
    assert (
        "scorer: general (approx mode, tokens walk, student decision rule regex; not a "
        "truncated-merge pair" in caplog.text
    )
    # the job states what approx mode's rows are worth at this setting (not measured)
    assert "approx mode, beam 64, min_prob 0.01: error and cost not measured" in caplog.text
    m = json.loads((out / "g.manifest.json").read_text())
    assert m["scorer"] == "general-approx" and m["scorer_params"]["max_depth"] == 3
    assert [(k["doc_id"], "added token" in k["reason"]) for k in m["skipped"]] == [("bad", True)]
    rows = read_table(str(out / "g.parquet")).to_pylist()
    stu = load_tokenizer(str(other))
    assert [r["input_ids"] for r in rows] == [stu.encode(t).ids for t in texts]
    for r in rows:
        lp = decode_topk_logprobs(np.reshape(r["topk_logprob_dq"], (-1, 8)))
        total = np.exp(lp).sum(1) + np.asarray(r["tail_mass"]) + np.asarray(r["unaccounted_mass"])
        assert np.abs(total - 1).max() < 5e-3  # quantised log-probs: 0.1% per entry
        assert set(r["regime"]) <= {1, 2} and all(r["loss_mask"])


def test_sentencepiece_student_targets_print_and_inspect(tiny_teacher_dir, tmp_path, capsys):
    """A SentencePiece-style student (``▁`` pieces, byte fallback for "1"): the job's
    closing print-out and the audit's per-document view decode its pieces (both read
    tokens as byte-level BPE before, and the job crashed after committing)."""
    from pipeline.audit_live import inspect_document
    from tests.scoring.general_assets import sentencepiece_bpe

    student = tmp_path / "sp.json"
    sentencepiece_bpe("metaspace", "never").save(str(student))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "s.jsonl").write_text(json.dumps({"id": "d0", "text": "ba ab1"}) + "\n")
    out = tmp_path / "out"
    args = _args(
        tiny_teacher_dir,
        tmp_path / "in",
        out,
        f"student.tokenizer={student}",
        "scoring.top_k=4",
        "scoring.general.max_depth=3",
    )
    assert main(["--show", "3", "--executor", "local", *args]) == 0
    shown = capsys.readouterr().out
    assert "=== d0: top targets at the first 3 target rows" in shown
    tok = load_tokenizer(str(student))
    assert tok.encode("ba ab1", add_special_tokens=False).tokens == ["ba", "▁ab", "<0x31>"]
    assert "'ba ab'" in shown  # the context of the last row shown, "▁" printed as a space
    view = inspect_document(str(out / "s.parquet"), "d0")
    assert "text: 'ba ab1'" in view  # the byte-fallback piece "<0x31>" decoded to "1"
    assert "[0]'ba' [1]' ab' [2]'1'" in view


def test_general_scorer_scores_chats_and_only_the_target_rows(tiny_teacher_dir, tmp_path):
    """Chat records (added tokens from the chat template, which the student has too)
    are scored by the general scorer, not skipped; only the rows the loss mask keeps are
    computed (the rest are stored empty, all unaccounted), and the kept rows are the
    same as when every row is computed."""
    from pipeline.scoring import GeneralScorer
    from pipeline.teacher import HFTeacher
    from tests.tiny_assets import trained_byte_bpe

    other = tmp_path / "other.json"
    trained_byte_bpe(300, seed_text="completely different text, 12 and 345. " * 50).save(str(other))
    inp = tmp_path / "in"
    inp.mkdir()
    chats = [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ],
        }
        for i, (q, a) in enumerate([("Say hi.", "Hi there."), ("2 + 2?", "It is 4.")])
    ]
    (inp / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    out = tmp_path / "out"
    args = _args(
        tiny_teacher_dir,
        inp,
        out,
        "input.messages_field=messages",
        "input.loss_on=assistant",
        f"student.tokenizer={other}",
        "scoring.scorer=general",
        "scoring.top_k=8",
        "scoring.general.max_depth=4",
        "scoring.general.min_prob=0.01",
    )
    # the default mode, approx: target rows sum to 1, what was estimated is stored
    assert main(["--show", "0", "--executor", "local", *args]) == 0
    for r in read_table(str(out / "chat.parquet")).to_pylist():
        mask = np.asarray(r["loss_mask"])
        unacc, est = np.asarray(r["unaccounted_mass"]), np.asarray(r["estimated_mass"])
        assert np.all(unacc[mask] == 0.0) and np.all(unacc[~mask] == 1.0)
        assert np.all((est >= 0.0) & (est <= 1.0)) and np.all(est[~mask] == 0.0)
        stored = np.exp(decode_topk_logprobs(np.reshape(r["topk_logprob_dq"], (-1, 8))))
        total = stored.sum(1) + np.asarray(r["tail_mass"])
        assert np.abs(total[mask] - 1.0).max() < 5e-3  # quantised log-probs
        assert np.all(np.isfinite(np.asarray(r["target_logprob"])[mask]))  # gold never 0
    # bounded mode: the rows of the scorer run alone
    shutil.rmtree(out)
    args = [*args, "scoring.general.mode=bounded"]
    assert main(["--show", "0", "--executor", "local", *args]) == 0
    m = json.loads((out / "chat.manifest.json").read_text())
    assert m["documents"] == 2 and m["skipped"] == []
    rows = read_table(str(out / "chat.parquet")).to_pylist()
    stu = load_tokenizer(str(other))
    teacher = HFTeacher(str(tiny_teacher_dir), device="cpu", max_batch_tokens=512)
    g = load_config(None, args).scoring.general  # the job's settings (beam: its default)
    full = GeneralScorer(
        load_tokenizer(tiny_teacher_dir), stu, "fast", max_depth=4, beam=g.beam, min_prob=0.01
    )
    for r in rows:
        mask = np.asarray(r["loss_mask"])
        unacc = np.asarray(r["unaccounted_mass"])
        assert 0 < mask.sum() < len(mask)
        assert np.all(unacc[~mask] == 1.0) and np.any(unacc[mask] < 1.0)
        stored = np.exp(decode_topk_logprobs(np.reshape(r["topk_logprob_dq"], (-1, 8))))
        assert np.all(stored[~mask].sum(1) == 0.0)  # rows not computed: nothing stored
        text = stu.decode(r["input_ids"], skip_special_tokens=False)
        assert "<|im_start|>" in text
        (doc,) = full.score(teacher, [text], top_k=8)
        assert list(doc.student_ids) == r["input_ids"]
        want = decode_topk_logprobs(np.reshape(r["topk_logprob_dq"], (-1, 8)))[mask]
        np.testing.assert_allclose(np.exp(want), np.exp(doc.topk_logprobs[mask]), atol=2e-3)
        np.testing.assert_allclose(unacc[mask], doc.unaccounted_mass[mask], atol=1e-6)


def test_overrides_may_follow_or_surround_the_flags():
    """`--show 0 --executor local input.limit=1` was refused ("unrecognized arguments")."""
    from jobs.generate import parse_args

    args = parse_args(["a.b=1", "--show", "0", "c.d=2", "--executor", "local", "e.f=[x, y]"])
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=[x, y]"]
    assert (args.show, args.executor) == (0, "local")
