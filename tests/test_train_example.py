"""The training example end to end: a tiny run made by the real job (in-process
executor), then `jobs.train_student` streams it with the reader and trains a tiny
student on `pipeline.loss`; the loss must fall."""

from __future__ import annotations

import json
import math
import re

import pytest

from jobs.train_student import main as train_student
from pipeline import run as run_job
from tests.tiny_assets import tiny_job_config

pytestmark = pytest.mark.integration

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def _text(s: int, d: int) -> str:
    n = 4 + (7 * s + 5 * d) % 9
    return f"Doc {s}-{d}: " + " ".join(WORDS[(s + 3 * d + i) % len(WORDS)] for i in range(n)) + "."


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teacher_dir):
    """A run of 2 shards x 6 documents made by the real job."""
    root = tmp_path_factory.mktemp("train-run")
    (root / "in").mkdir()
    for s in range(2):
        recs = [{"id": f"s{s}d{d}", "text": _text(s, d)} for d in range(6)]
        (root / "in" / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = tiny_job_config(tiny_teacher_dir, f"{root}/in/*.jsonl", str(root / "out"))
    assert run_job(cfg, executor="local").stats["documents"] == 12
    return root / "out"


def test_student_learns_the_targets(run, capsys):
    rc = train_student(
        ["--run", str(run), "--steps", "40", "--batch-size", "4", "--lr", "3e-3", "--seed", "0"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    steps = [float(m) for m in re.findall(r"^step +\d+/40 .*? loss ([-\d.]+)", out, re.M)]
    assert len(steps) >= 8, out  # progress lines every 5 steps
    m = re.search(r"^loss first 10 steps ([\d.]+) -> last 10 steps ([\d.]+)$", out, re.M)
    assert m is not None, out
    first, last = float(m[1]), float(m[2])
    assert math.isfinite(first) and math.isfinite(last)
    # a random student starts near log(V) nats from the targets; 40 steps must cut that
    # substantially, not by noise
    assert last < 0.7 * first, out


def test_help_explains_the_example(capsys):
    with pytest.raises(SystemExit) as exc:
        train_student(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--run", "--steps", "--lr", "--batch-size", "--device", "--seed"):
        assert flag in out
    assert "sparse_kd_loss" in out and "temperature" in out


def test_missing_run_fails_clearly(tmp_path):
    from pipeline.reader import ShardError

    with pytest.raises(ShardError, match="no run index"):
        train_student(["--run", str(tmp_path / "nowhere"), "--steps", "1"])


# ------------------------------------------------------------------ any student (alm, bld)
# The student's tokenizer: a byte-level BPE trained on OTHER text than the teacher's
# (the tiny teacher's is trained on pydoc topics; this one on stdlib module docstrings).
def _other_text() -> str:
    import argparse
    import collections
    import functools
    import inspect
    import json as json_module
    import pathlib
    import random
    import textwrap

    modules = (argparse, collections, functools, inspect, json_module, pathlib, random, textwrap)
    return "\n\n".join(str(m.__doc__) for m in modules) + "\n\n" + " ".join(WORDS) * 3


@pytest.fixture(scope="module")
def any_run(tmp_path_factory, tiny_teacher_dir):
    """A run for any student: the teacher's byte and token targets, no student rows."""
    root = tmp_path_factory.mktemp("any-run")
    (root / "in").mkdir()
    for s in range(2):
        recs = [{"id": f"s{s}d{d}", "text": _text(s, d)} for d in range(6)]
        (root / "in" / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = tiny_job_config(
        tiny_teacher_dir, f"{root}/in/*.jsonl", str(root / "out"), "scoring.targets=[bytes,teacher]"
    )
    assert run_job(cfg, executor="local").stats["documents"] == 12
    return root / "out"


@pytest.fixture(scope="module")
def student_tokenizer(tmp_path_factory, tiny_teacher_dir):
    """tokenizer.json of a student tokenizer the run never saw, unlike the teacher's."""
    from pipeline.tokenization import load_tokenizer
    from tests.tiny_assets import trained_byte_bpe

    tok = trained_byte_bpe(320, seed_text=_other_text())
    teacher = load_tokenizer(tiny_teacher_dir)
    sample = _text(0, 1)
    assert tok.encode(sample).tokens != teacher.encode(sample).tokens
    path = tmp_path_factory.mktemp("student-tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _losses(out: str, steps: int) -> tuple[list[float], float, float]:
    logged = [float(m) for m in re.findall(rf"^step +\d+/{steps} .*? loss ([-\d.]+)", out, re.M)]
    m = re.search(r"^loss first 10 steps ([\d.]+) -> last 10 steps ([\d.]+)$", out, re.M)
    assert m is not None, out
    return logged, float(m[1]), float(m[2])


@pytest.mark.parametrize(
    ("loss", "options", "ratio"),
    [
        # binary_ce (the default) is a cross-entropy: it falls towards the teacher's
        # binarised entropy, not to 0, so it falls by a smaller fraction
        ("alm", [], 0.9),
        # binary_kl is that cross-entropy less the entropy: 0 when the student's chunk
        # likelihoods are the teacher's; with a start token, chunk 0 counts too
        ("alm", ["--alm-distance", "binary_kl", "--bos", "<|endoftext|>"], 0.5),
        # a fresh byte head starts near log(259) nats per byte
        ("bld", [], 0.4),
        ("bld", ["--byte-window", "2", "--bos", "<|endoftext|>", "--ce-weight", "0.1"], 0.5),
    ],
)
def test_any_student_learns_the_targets(any_run, student_tokenizer, loss, options, ratio, capsys):
    steps = 40
    rc = train_student(
        [
            *("--run", str(any_run), "--loss", loss),
            *("--student-tokenizer", str(student_tokenizer)),
            *("--steps", str(steps), "--batch-size", "4", "--seed", "0", *options),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    bos = "'<|endoftext|>' (id 0)" if "--bos" in options else "none"
    assert f"loss {loss}: student tokenizer {student_tokenizer} (vocab 320, BOS {bos})" in out
    logged, first, last = _losses(out, steps)
    assert len(logged) >= 6 and all(math.isfinite(x) for x in logged), out
    assert math.isfinite(first) and math.isfinite(last) and first > 0, out
    assert last < ratio * first, out


def _usage_error(capsys, argv: list[str]) -> str:
    rc = train_student(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert "step" not in captured.out  # nothing trained
    return lines[0]


def test_alm_needs_the_teacher_kind(run, student_tokenizer, capsys):
    line = _usage_error(
        capsys,
        ["--run", str(run), "--loss", "alm", "--student-tokenizer", str(student_tokenizer)],
    )
    assert "--loss alm needs the run's `teacher` kind" in line and "stores targets student" in line


def test_bld_needs_the_bytes_kind(run, student_tokenizer, capsys):
    line = _usage_error(
        capsys,
        ["--run", str(run), "--loss", "bld", "--student-tokenizer", str(student_tokenizer)],
    )
    assert "--loss bld needs the run's `bytes` kind" in line


@pytest.mark.parametrize("loss", ["alm", "bld"])
def test_any_student_needs_a_student_tokenizer(any_run, loss, capsys):
    line = _usage_error(capsys, ["--run", str(any_run), "--loss", loss])
    assert f"--loss {loss} needs --student-tokenizer" in line


def test_other_usage_errors(run, any_run, student_tokenizer, tmp_path, capsys):
    # kd reads the run's own student rows: none in an any-student run
    line = _usage_error(capsys, ["--run", str(any_run)])
    assert "--loss kd needs the run's own student rows" in line and "--loss alm" in line
    # kd has its student's vocabulary from the run
    line = _usage_error(capsys, ["--run", str(run), "--student-tokenizer", str(student_tokenizer)])
    assert "--student-tokenizer is for --loss alm/bld" in line
    line = _usage_error(capsys, ["--run", str(run), "--bos", "none"])
    assert "--bos is for --loss alm/bld" in line
    missing = tmp_path / "nowhere" / "tokenizer.json"
    line = _usage_error(
        capsys, ["--run", str(any_run), "--loss", "alm", "--student-tokenizer", str(missing)]
    )
    assert f"--student-tokenizer {missing}" in line
    line = _usage_error(
        capsys,
        [
            *("--run", str(any_run), "--loss", "bld"),
            *("--student-tokenizer", str(student_tokenizer), "--bos", "<s>"),
        ],
    )
    assert "--bos '<s>' is not a token of the student tokenizer" in line


def test_bos_choice(tmp_path):
    from tokenizers import Tokenizer, models, processors

    from jobs.train_student import student_bos

    vocab = {"<s>": 0, "<|endoftext|>": 1, "a": 2, "b": 3}
    plain = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    path = tmp_path / "tokenizer.json"
    plain.save(str(path))
    # a tokenizer.json on its own declares no start token
    assert student_bos("auto", str(path), plain) is None
    assert student_bos("none", str(path), plain) is None
    assert student_bos("<|endoftext|>", str(path), plain) == 1
    # an HF directory's tokenizer_config.json does
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert student_bos("auto", str(tmp_path), plain) == 0
    assert student_bos("auto", str(path), plain) == 0  # tokenizer.json inside one
    assert student_bos("none", str(tmp_path), plain) is None
    # a post-processor that prepends one (Llama-style)
    llama = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    llama.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 1)]
    )
    assert student_bos("auto", "elsewhere", llama) == 1


def test_help_explains_the_any_student_options(capsys):
    with pytest.raises(SystemExit) as exc:
        train_student(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--loss {kd,alm,bld}",
        "--student-tokenizer PATH_OR_ID",
        "--byte-window M",
        "--alm-distance",
        "--binarization-temp",
        "--bos auto|none|TOKEN",
        "--ce-weight",
    ):
        assert flag in out, flag
    for word in ("alm_loss", "byte_head_loss", "ByteHead", "binary_ce", "exit status"):
        assert word in out, word
