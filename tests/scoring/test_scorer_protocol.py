"""The scorer interface (`pipeline.scoring.protocol`): both scorers implement it, their
student views decode what they encode, provenance keeps the values of existing runs,
and nothing outside ``pipeline/scoring`` branches on the scorer kind.

Tiny tokenizers and the perfect (float64) teacher: seconds."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import GeneralScorerConfig, load_config
from pipeline.errors import BadRecordError
from pipeline.scoring.factory import (
    COST_WARNING,
    choose_scorer,
    cost_warning,
    make_scorer,
    scorer_label,
)
from pipeline.scoring.general import GeneralPrepared, GeneralScorer
from pipeline.scoring.protocol import Prepared, Scorer, StudentView, Teacher, TreeTeacher
from pipeline.scoring.subset import PreparedDocument, SubsetExactScorer
from pipeline.tokenization import UnscorableTextError
from tests.scoring.general_assets import STUDENTS, other_byte_bpe
from tests.tiny_assets import (
    EOS,
    PerfectTeacher,
    all_strings,
    string_distribution,
    tiny_pair,
)

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["ab 1", "a  b", "1ab", ""]


def _sha(tok) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


@pytest.fixture(scope="module")
def world():
    T, S = tiny_pair(4)
    return T, S, PerfectTeacher(T, string_distribution(4, seed=1))


def _scorers(T, S):
    other = other_byte_bpe("gpt2")
    return {
        "subset": (SubsetExactScorer(T, S), S),
        "general": (GeneralScorer(T, other, "lossless", max_depth=6), other),
    }


def test_both_scorers_implement_the_interface(world):
    T, S, teacher = world
    assert isinstance(teacher, Teacher) and not isinstance(teacher, TreeTeacher)
    for kind, (sc, stu) in _scorers(T, S).items():
        assert isinstance(sc, Scorer), kind
        assert isinstance(sc.student, StudentView), kind
        prep = sc.prepare("ab 1")
        assert isinstance(prep, Prepared)
        assert isinstance(prep, PreparedDocument if kind == "subset" else GeneralPrepared)
        assert list(prep.student_ids) == stu.encode("ab 1", add_special_tokens=False).ids
        assert list(sc.student.encode("ab 1")) == list(prep.student_ids)
        # what provenance records: the values runs made before the interface recorded
        assert sc.student.fingerprint == _sha(stu)
        assert sc.student.size == stu.get_vocab_size(with_added_tokens=True)
        assert sc.student.eos_id == stu.token_to_id(EOS)
        assert sc.T.fingerprint == _sha(T)
        assert sc.context_nodes(prep) > 0
    sub, gen = (s for s, _ in _scorers(T, S).values())
    assert (sub.name, sub.params) == ("subset-exact", {})
    assert sub.tree_tokens(sub.prepare("ab 1")) == sub.prepare("ab 1").num_nodes - 1
    assert gen.tree_tokens(gen.prepare("ab 1")) is None
    # the general scorer's params are the job config's scoring.general, key for key
    cfg = GeneralScorerConfig(mode="fast", max_depth=5, beam=3, min_prob=0.02)
    g = GeneralScorer(T, other_byte_bpe("gpt2"), **cfg.model_dump())
    assert g.name == "general-fast"
    assert list(g.params.items()) == list(cfg.model_dump().items())


def test_score_prepared_equals_score_and_takes_row_masks(world):
    T, S, teacher = world
    for kind, (sc, _) in _scorers(T, S).items():
        preps = [sc.prepare(t) for t in TEXTS]
        masks = [np.arange(len(p.student_ids) + 1) % 2 == 0 for p in preps]
        full = sc.score(teacher, TEXTS, top_k=3)
        got = sc.score_prepared(teacher, preps, 3, rows=masks)
        for f, g, m in zip(full, got, masks, strict=True):
            np.testing.assert_array_equal(f.student_ids, g.student_ids)
            # the rows asked for are the same; the subset scorer computes all of them
            kept = np.ones_like(m) if kind == "subset" else m
            np.testing.assert_allclose(g.topk_logprobs[kept], f.topk_logprobs[kept], atol=1e-12)
            np.testing.assert_array_equal(g.topk_ids[kept], f.topk_ids[kept])
            assert np.all(g.unaccounted_mass[~kept] == 1.0)
        assert sc.score(teacher, TEXTS, 3, rows=masks)[0].num_rows == full[0].num_rows


def test_prepare_refuses_a_bad_record_with_the_bad_record_error(world):
    T, S, _ = world
    bad = {
        "subset": ["ab z"],  # "z": no symbol in the teacher's vocab
        "general": ["ab z", f"ab{EOS}"],  # the end-of-text token inside a text
    }
    for kind, (sc, _) in _scorers(T, S).items():
        for text in bad[kind]:
            with pytest.raises(UnscorableTextError) as err:
                sc.prepare(text)
            assert isinstance(err.value, BadRecordError), (kind, text)


@pytest.mark.parametrize("name", ["subset", *STUDENTS])
def test_student_views_decode_what_they_encode(world, name):
    """`decode_bytes` of the ids of a text gives a text with the same ids (for Metaspace
    with a prefix, " a" and "a" have the same ids: either text will do), and
    `row_offsets` are the character offsets the job masks rows by."""
    T, S, _ = world
    if name == "subset":
        view, tok = SubsetExactScorer(T, S).student, S
    else:
        tok = STUDENTS[name]()
        view = GeneralScorer(T, tok, "lossless").student
    # (the tiny teacher's byte-level student has no symbol for "é"; the others do)
    extra = [] if name == "subset" else ["é ab", "ab\n1 é", " a", "  "]
    for text in [*all_strings(3), *extra]:
        ids = list(view.encode(text))
        assert ids == tok.encode(text, add_special_tokens=False).ids
        back = view.decode_bytes(ids).decode("utf-8")
        assert list(view.encode(back)) == ids, (name, text, back)
        offs = view.row_offsets(text, ids)
        assert offs.dtype == np.int64 and len(offs) == len(ids) + 1
        assert offs[-1] == len(text) and np.all(np.diff(offs) >= 0)
        if name in ("subset", "bpe-gpt2") and text.isascii():  # one byte per character
            ends = np.cumsum([0, *(len(view.decode_bytes([i])) for i in ids)])
            np.testing.assert_array_equal(offs, ends)
    with pytest.raises(UnscorableTextError):  # an id that stands for no bytes
        view.decode_bytes([view.size + 3])


def test_the_factory_chooses_builds_and_describes(world):
    T, S, _ = world
    cfg = load_config(None, ["scoring.general.max_depth=5"])
    assert choose_scorer(cfg, T, S)[0] == "subset"
    kind, why = choose_scorer(cfg, T, other_byte_bpe("gpt2"))
    assert kind == "general" and "not a truncated-merge pair" in why
    assert isinstance(make_scorer("subset", T, S, cfg), SubsetExactScorer)
    g = make_scorer("general", T, other_byte_bpe("gpt2"), cfg)
    assert isinstance(g, GeneralScorer) and g.params == cfg.scoring.general.model_dump()
    assert (scorer_label("subset"), scorer_label("general")) == ("subset-exact", "general")
    # approx mode is the default: the measured error and cost of its setting
    assert "measured rigorous all-row TV lower bound" in cost_warning("general", cfg)
    other = load_config(None, ["scoring.general.beam=8"])
    assert "not measured at this setting" in cost_warning("general", other)
    capped = load_config(
        None,
        ["scoring.general.beam=16", "scoring.general.min_prob=0.005", "scoring.general.budget=6"],
    )
    assert "budget 6: measured for Qwen2.5" in cost_warning("general", capped)
    for mode in ("bounded", "fast"):
        bounded = load_config(None, [f"scoring.general.mode={mode}"])
        assert cost_warning("general", bounded) == COST_WARNING
    assert cost_warning("subset", cfg) is None
    lossless = load_config(None, ["scoring.general.mode=lossless"])
    assert cost_warning("general", lossless) is None
    with pytest.raises(ValueError, match=r"approx needs scoring\.general\.walk=tokens"):
        load_config(None, ["scoring.general.walk=bytes"])
    assert load_config(None, ["scoring.general.walk=bytes", "scoring.general.mode=bounded"])
    with pytest.raises(ValueError, match="scorer kind"):
        make_scorer("other", T, S, cfg)
    import pipeline.generate

    assert pipeline.generate.choose_scorer is choose_scorer  # still importable there


def test_a_tree_teacher_is_a_tree_teacher(world):
    from pipeline.teacher import HFTeacher
    from tests.tiny_assets import hf_tokenizer, tiny_causal_lm

    T, _, _ = world
    V = T.get_vocab_size(with_added_tokens=True)
    t = HFTeacher(tiny_causal_lm(V), hf_tokenizer(T), device="cpu", max_batch_tokens=64)
    assert isinstance(t, TreeTeacher) and isinstance(t, Teacher)


def test_nothing_outside_the_scoring_package_branches_on_the_scorer_kind():
    kind_check = re.compile(r"""kind\s*[!=]=\s*["'](subset|general)["']""")
    found = []
    for folder in ("pipeline", "jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.is_relative_to(ROOT / "pipeline" / "scoring"):
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if kind_check.search(line) or re.search(r"\.scorer\.S\b", line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, json.dumps(found, indent=1)
