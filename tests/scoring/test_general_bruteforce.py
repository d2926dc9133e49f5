"""Brute force (scoring.md §3, §4): the general scorer against the enumerated truth.

A perfect teacher (the tiny byte-level BPE of `tests.tiny_assets`, Qwen2 regex) over ALL
strings up to length 5 on a, b, space, 1 induces a distribution over student
encodings that `student_truth` enumerates for any student. Students of the three kinds
in `general_assets` (other byte-level BPEs with GPT-2 / Qwen2 / Llama-3 regexes,
SentencePiece-style BPEs with byte fallback, pure bytes) must get every row within 1e-9
in lossless mode; depth limits and pruning must report exactly the mass they lose.

Tiers: the lossless sweep runs every student with the token walk (the default) by
default, and with the byte walk for a representative few (`QUICK_BYTE_WALK`); the other
byte-walk cases and the longer stability sweeps are marked ``slow`` (``pytest -m "not
slow"`` skips them; the plain ``pytest`` runs all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer, normalizers, pre_tokenizers

from pipeline.scoring import GeneralScorer, Regime, SubsetExactScorer
from pipeline.scoring.general import ByteModel, StudentView
from pipeline.tokenization import TokenizerError, UnscorableTextError, truncate_merges
from tests.scoring.general_assets import (
    STUDENTS,
    byte_student,
    other_byte_bpe,
    sentencepiece_bpe,
    utf8_strings,
    utf8_teacher_tokenizer,
)
from tests.tiny_assets import (
    EOS,
    MERGES,
    PerfectTeacher,
    PrefixTable,
    all_strings,
    encode,
    string_distribution,
    student_truth,
    tiny_teacher_tokenizer,
)

TOL = 1e-9
# Whitespace runs, trailing spaces, digits after spaces, the empty text.
SPECIAL_DOCS = ["", " ", "  ", "    ", "a  ", " 1", "a  1", "1 1 1", "ab  ", "  ab", "11111"]
SPECIAL_DOCS += ["b 1 a", "a 1  ", " a b", "ab ab", "1a  b", "   1 "]
# Every string up to length 3 and every 5th one of length 4-5: 338 documents.
DOCS = list(dict.fromkeys([*SPECIAL_DOCS, *all_strings(3), *all_strings(5)[85::5]]))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class World:
    T: Tokenizer
    dist: dict[str, float]
    teacher: PerfectTeacher
    bytes: ByteModel  # shared by all students of this teacher


def _world(T: Tokenizer, dist: dict[str, float]) -> World:
    return World(T, dist, PerfectTeacher(T, dist), ByteModel(T))


@pytest.fixture(scope="module")
def world() -> World:
    return _world(tiny_teacher_tokenizer("qwen2"), string_distribution(5, seed=0))


@pytest.fixture(scope="module")
def utf8_world() -> World:
    strings = utf8_strings(4)
    w = np.exp(np.random.default_rng(7).normal(0.0, 1.5, len(strings)))
    return _world(utf8_teacher_tokenizer(), dict(zip(strings, (w / w.sum()).tolist(), strict=True)))


def _rows(r: Any) -> np.ndarray:
    return np.exp(r.logprobs)


def _check_against_truth(results, truth: PrefixTable) -> float:
    """Every row of every document equals the truth; returns the max abs error."""
    worst = 0.0
    for r in results:
        ids = list(r.student_ids)
        rows = _rows(r)
        for i in range(len(ids) + 1):
            want = truth.dist(ids[:i])
            assert want is not None, f"{r.text!r}: row {i} outside the support"
            worst = max(worst, float(np.abs(rows[i] - want).max()))
        assert np.all(r.regime == Regime.LOSSLESS)
        assert np.all(r.unaccounted_mass == 0.0)
        np.testing.assert_allclose(rows.sum(1), 1.0, atol=TOL)
    return worst


def _alias_logprob(student: Tokenizer, dist: dict[str, float], text: str) -> float:
    """log P(the student encoding of the text = that of ``text``) under ``dist``."""
    ids = encode(student, text)
    return math.log(sum(p for s, p in dist.items() if encode(student, s) == ids))


# --------------------------------------------------------------------------- truth
# Students also run with the byte walk in the quick tier: a byte-level BPE, a
# SentencePiece layout with two roots per row (not injective), the byte student.
QUICK_BYTE_WALK = ("bpe-qwen2", "sp-metaspace-first", "bytes")
LOSSLESS_CASES = [
    (name, walk)
    if walk == "tokens" or name in QUICK_BYTE_WALK
    else pytest.param(name, walk, marks=pytest.mark.slow)
    for name in sorted(STUDENTS)
    for walk in ("tokens", "bytes")
]


@pytest.mark.parametrize(("name", "walk"), LOSSLESS_CASES)
def test_lossless_rows_equal_enumerated_truth(world, name, walk):
    S = STUDENTS[name]()
    scorer = GeneralScorer(world.T, S, max_depth=8, byte_model=world.bytes, walk=walk)
    results = scorer.score(world.teacher, DOCS, top_k=None)
    assert [list(r.student_ids) for r in results] == [list(encode(S, d)) for d in DOCS]
    worst = _check_against_truth(results, student_truth(S, world.dist))
    assert worst < TOL, worst
    injective = all(S.decode(list(encode(S, d))) == d for d in DOCS)
    for r in results[:40]:
        # telescoping: the row log-probs through EOS sum to log P(this student encoding),
        # which for an injective student is the teacher's log-likelihood of the text
        want = _alias_logprob(S, world.dist, r.text)
        assert abs(r.target_logprobs.sum() - want) < 1e-9
        assert abs(r.prefix_logprob[0]) < 1e-12
        assert np.all(r.noncanonical_mass < 1e-9)
        if injective:
            assert abs(r.stats["text_logprob"] - want) < 1e-9
    assert injective == (
        name not in ("sp-metaspace-first", "sp-metaspace-always", "sp-metaspace-nosplit")
    )


@pytest.mark.parametrize(
    "name", ["bytes", "sp-legacy", "sp-llama2", "sp-metaspace-first", "bpe-qwen2"]
)
def test_two_byte_characters_and_rows_inside_them(utf8_world, name):
    """A teacher with all 256 bytes over strings with "é": byte fallback and the byte
    student split it, so rows sit between its two bytes (byte model rows through
    texts that complete the character)."""
    S = STUDENTS[name]()
    scorer = GeneralScorer(utf8_world.T, S, max_depth=10, byte_model=utf8_world.bytes)
    docs = utf8_strings(3)
    results = scorer.score(utf8_world.teacher, docs, top_k=None)
    assert _check_against_truth(results, student_truth(S, utf8_world.dist)) < TOL
    if name in ("bytes", "sp-legacy", "sp-llama2"):
        r = results[docs.index("é")]
        assert len(r.student_ids) >= 2  # a row after the lead byte 0xC3


def test_decision_rule_stable_under_continuation():
    """The decision rule itself: the stable tokens of every short string (and of every
    string followed by half of "é") start the encoding of every continuation, and the
    rest of that encoding is the encoding of the text after the stable boundary alone
    (`StudentView.local_offset`, what decisions are made on)."""
    _check_stability(all_strings(3, RICH), all_strings(2, RICH))


@pytest.mark.slow
def test_decision_rule_stable_under_longer_continuation():
    _check_stability(all_strings(3, RICH), all_strings(3, RICH))


RICH = ("a", "l", "'", " ", "1", "\n", "é")


def _check_stability(prefixes: list[str], continuations: list[str]) -> None:
    for name, make in STUDENTS.items():
        tok = make()
        view = StudentView(tok, EOS)
        decided = 0
        for y in prefixes:
            for yb, head in ((y.encode(), y), ((y + "é").encode()[:-1], y + "é")):
                stable = view.stable_tokens(yb)
                if not stable:
                    continue
                decided += 1
                q, n = view.local_offset(yb)
                assert n in (0, len(stable)) and (n or view.prefix_mode == "prepend")
                texts = [head + d for d in continuations]
                rests = [(t.encode()[q:]).decode() for t in texts]
                for d, e, r in zip(
                    continuations,
                    tok.encode_batch(texts, add_special_tokens=False),
                    tok.encode_batch(rests, add_special_tokens=False),
                    strict=True,
                ):
                    assert tuple(e.ids[: len(stable)]) == stable, (name, y, d)
                    if n:
                        assert tuple(e.ids) == stable + tuple(r.ids), (name, y, d)
        assert decided > 0 or view.rule == "none", name


def _piece_starts(tok: Tokenizer, text: str) -> list[int]:
    starts, off = [], 0
    for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text):
        starts.append(off)
        off += len(piece)
    return starts


@pytest.mark.parametrize(
    ("name", "prefix", "continuation"),
    [("bpe-qwen2", "\n ", "\n"), ("bpe-llama3", "\n ", "\n"), ("bpe-gpt2", "x'l", "l")],
)
def test_naive_boundaries_are_not_stable(name, prefix, continuation):
    """The traps are real: a pre-token boundary that is not the last one moves when the
    text goes on (whitespace runs re-grouped by ``\\s*[\\r\\n]+``; GPT-2 contractions),
    and the rule does not take it."""
    tok = STUDENTS[name]()
    naive = _piece_starts(tok, prefix)[-1]  # every boundary but the text end
    assert naive not in _piece_starts(tok, prefix + continuation)
    assert StudentView(tok, EOS)._boundary(prefix) < naive


def test_legacy_layout_decides_at_word_starts_only_when_no_piece_crosses_a_space():
    """Llama-2's layout (no pre-tokenizer): with a piece "a▁" BPE may join a word to the
    next space, so nothing before the end of text is stable; without one (SentencePiece
    vocabularies), every space after a non-space starts a piece no later text changes
    (checked against continuations in `test_decision_rule_stable_under_continuation`)."""
    crossing = StudentView(STUDENTS["sp-legacy"](), EOS)
    assert crossing.rule == "none" and crossing.stable_split(b"ab  ba b") == (0, ())
    view = StudentView(STUDENTS["sp-llama2"](), EOS)
    assert view.rule == "word-start"
    assert view._boundary("ab  ba b") == 6 and view._boundary("ab  ") == 2
    assert view._boundary("  ab") == 0  # the leading space run is not after a word
    q, toks = view.stable_split(b"ab  ba b")
    assert q == 6 and toks == tuple(encode(STUDENTS["sp-llama2"](), "ab  ba"))


@pytest.mark.parametrize(
    ("max_len", "cont_len"), [(3, 2), pytest.param(4, 3, marks=pytest.mark.slow)]
)
def test_regex_rule_boundaries_never_move(max_len, cont_len):
    """Every boundary the regex rule accepts in a string of up to ``max_len`` characters
    (7-letter alphabet with apostrophe, newline, punctuation) is a pre-token boundary of
    every continuation of up to ``cont_len`` characters, for the GPT-2, Qwen2 and
    Llama-3 regexes."""
    alphabet = ("a", "l", "'", " ", "1", "\n", ".")
    continuations = all_strings(cont_len, alphabet)
    for name in ("bpe-gpt2", "bpe-qwen2", "bpe-llama3"):
        tok = STUDENTS[name]()
        view = StudentView(tok, EOS)
        accepted = 0
        for y in all_strings(max_len, alphabet):
            q = view._boundary(y)
            if q == 0:
                continue
            accepted += 1
            for d in continuations:
                assert q in [*_piece_starts(tok, y + d), len(y + d)], (name, y, d, q)
        assert accepted > 0


def test_regex_rule_boundaries_never_move_random():
    """The same on 30,000 random (string, continuation) pairs over every class the
    regexes tell apart (contraction letters in both cases, digits, whitespace kinds,
    punctuation, non-ASCII letters, a combining mark): a boundary with one character
    after it (two near an apostrophe) never moves, and the pieces before it stay."""
    import random

    alphabet = [*"'stredvmlSTREDVMLa12 \n\r\t.$", "é", "中", "\u0301", "\u00a0"]
    rng = random.Random(0)
    pairs = [
        (
            "".join(rng.choices(alphabet, k=rng.randint(2, 7))),
            "".join(rng.choices(alphabet, k=rng.randint(1, 4))),
        )
        for _ in range(30_000)
    ]
    for name in ("bpe-gpt2", "bpe-qwen2", "bpe-llama3"):
        tok = STUDENTS[name]()
        view = StudentView(tok, EOS)
        pre = tok.pre_tokenizer
        accepted = 0
        for y, d in pairs:
            q = view._boundary(y)
            if q == 0:
                continue
            accepted += 1
            # (offsets are in characters)
            head = [p for p, (a, b) in pre.pre_tokenize_str(y) if b <= q]
            full = pre.pre_tokenize_str(y + d)
            assert q in [a for _, (a, _) in full], (name, y, d, q)
            assert [p for p, (a, b) in full if b <= q] == head, (name, y, d, q)
        assert accepted > 1000, (name, accepted)


def test_no_nfc_composition_starts_with_an_ascii_digit():
    """What the end-of-text boundary after a closed digit piece relies on for NFC
    students: no canonical decomposition starts with an ASCII digit, so no continuation
    composes with a digit (letters and "<=>;`" do have compositions)."""
    import unicodedata

    firsts = set()
    for cp in range(0x110000):
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<"):
            firsts.add(chr(int(d.split()[0], 16)))
    assert not firsts & set("0123456789")
    assert {"e", "=", "A"} <= firsts


# --------------------------------------------------------------------------- limits
@pytest.mark.parametrize(("name", "depth"), [("sp-legacy", 2), ("bpe-gpt2", 1), ("bytes", 1)])
def test_depth_limit_reports_exactly_the_missing_mass(world, name, depth):
    S = STUDENTS[name]()
    truth = student_truth(S, world.dist)
    scorer = GeneralScorer(world.T, S, max_depth=depth, byte_model=world.bytes)
    results = scorer.score(world.teacher, DOCS, top_k=None)
    n_cut = 0
    for r in results:
        rows = _rows(r)
        ids = list(r.student_ids)
        # the unaccounted mass is exactly what the row is missing
        np.testing.assert_allclose(r.unaccounted_mass, 1.0 - rows.sum(1), atol=1e-12)
        for i in range(len(ids) + 1):
            want = truth.dist(ids[:i])
            u = r.unaccounted_mass[i]
            # row(g) <= truth(g) <= row(g) + unaccounted (decided mass is exact; the cut
            # mass is in the denominator and may belong to any token or be inconsistent)
            assert np.all(rows[i] <= want + 1e-12)
            assert np.all(want <= rows[i] + u + 1e-12)
            if u > 0:
                n_cut += 1
                assert r.regime[i] == Regime.APPROXIMATE
            else:
                assert r.regime[i] == Regime.LOSSLESS
                np.testing.assert_allclose(rows[i], want, atol=TOL)
    if name == "bytes":
        assert n_cut == 0  # a byte student decides after one byte
    else:
        assert n_cut > 0


def test_fast_mode_bounds_and_convergence(world):
    S = STUDENTS["sp-legacy"]()  # no pre-tokenizer: every row needs the end of text
    truth = student_truth(S, world.dist)
    docs = DOCS[::5]

    def run(min_prob: float, beam: int):
        sc = GeneralScorer(
            world.T, S, "fast", max_depth=8, beam=beam, min_prob=min_prob, byte_model=world.bytes
        )
        return sc.score(world.teacher, docs, top_k=None)

    lossless = GeneralScorer(world.T, S, max_depth=8, byte_model=world.bytes).score(
        world.teacher, docs, top_k=None
    )
    prev_err = prev_unacc = None
    for min_prob in (0.3, 0.05, 0.005, 1e-4, 0.0):
        res = run(min_prob, beam=10**9)
        err = np.concatenate(
            [np.abs(_rows(r) - _rows(x)).max(1) for r, x in zip(res, lossless, strict=True)]
        )
        unacc = np.concatenate([r.unaccounted_mass for r in res])
        for r in res:
            rows = _rows(r)
            assert np.all(r.unaccounted_mass >= 0)
            np.testing.assert_allclose(r.unaccounted_mass, 1 - rows.sum(1), atol=1e-12)
            assert np.all((r.regime == Regime.APPROXIMATE) == (r.unaccounted_mass > 0))
            for i in range(len(r.student_ids) + 1):
                want = truth.dist(list(r.student_ids[:i]))
                assert np.all(rows[i] <= want + 1e-12)
                assert np.all(want <= rows[i] + r.unaccounted_mass[i] + 1e-12)
        if prev_err is not None:
            # a lower floor explores a superset: every row entry can only grow
            assert np.all(err <= prev_err + 1e-12) and np.all(unacc <= prev_unacc + 1e-12)
        prev_err, prev_unacc = err, unacc
        if min_prob == 0.3:
            assert unacc.max() > 0.1
    assert prev_err.max() < 1e-12 and prev_unacc.max() == 0.0
    worst_by_beam = []
    for beam in (1, 4, 32, 10**9):
        res = run(0.0, beam)
        worst_by_beam.append(max(float(r.unaccounted_mass.max()) for r in res))
        for r, x in zip(res, lossless, strict=True):
            assert np.all(_rows(r) <= _rows(x) + 1e-12)
            assert np.all(_rows(x) <= _rows(r) + r.unaccounted_mass[:, None] + 1e-12)
    assert worst_by_beam[0] > 0.1 and worst_by_beam[-1] == 0.0


# --------------------------------------------------------------------------- subset
@pytest.mark.parametrize("pattern", ["qwen2", "gpt2"])
def test_subset_pair_matches_subset_exact_scorer(world, pattern):
    """Student = the teacher's truncated merges (incl. 0 and all): same rows, prefix
    probabilities and targets as the subset-exact scorer."""
    if pattern == "qwen2":
        w, docs = world, DOCS[::2]
    else:  # GPT-2 teacher: a smaller world (strings up to length 4) keeps this fast
        w = _world(tiny_teacher_tokenizer("gpt2"), string_distribution(4, seed=2))
        docs = all_strings(4)[::2]
    for n in (0, 4, len(MERGES)):
        S = truncate_merges(w.T, n)
        exact = SubsetExactScorer(w.T, S).score(w.teacher, docs, top_k=None)
        general = GeneralScorer(w.T, S, max_depth=8, byte_model=w.bytes).score(
            w.teacher, docs, top_k=None
        )
        for a, b in zip(exact, general, strict=True):
            np.testing.assert_array_equal(a.student_ids, b.student_ids)
            np.testing.assert_array_equal(a.teacher_ids, b.teacher_ids)
            np.testing.assert_allclose(_rows(a), _rows(b), atol=1e-12)
            np.testing.assert_allclose(a.prefix_logprob, b.prefix_logprob, atol=1e-9)
            np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=1e-9)


# --------------------------------------------------------------------------- contract
def test_topk_rows_match_dense_rows(world):
    S = STUDENTS["sp-legacy"]()
    sc = GeneralScorer(world.T, S, "fast", max_depth=8, beam=4, min_prob=0.01)
    sc.bytes = world.bytes
    docs = ["ab 1 ", "11  b", "", " a"]
    dense = sc.score(world.teacher, docs, top_k=None)
    sparse = sc.score(world.teacher, docs, top_k=3)
    for d, s in zip(dense, sparse, strict=True):
        assert s.logprobs is None and s.topk_ids.shape == (len(d.student_ids) + 1, 3)
        np.testing.assert_allclose(
            s.topk_logprobs, np.take_along_axis(d.logprobs, s.topk_ids, axis=1), atol=1e-15
        )
        kth = np.sort(d.logprobs, axis=1)[:, -3]
        np.testing.assert_allclose(s.topk_logprobs[:, -1], kth, atol=1e-15)
        # stored top-k + tail + unaccounted = 1
        total = np.exp(s.topk_logprobs).sum(1) + s.tail_mass + s.unaccounted_mass
        np.testing.assert_allclose(total, 1.0, atol=1e-12)
        np.testing.assert_array_equal(s.regime, d.regime)
        np.testing.assert_allclose(s.target_logprobs, d.target_logprobs)


def test_cost_counters_are_the_teachers_own(world):
    """The reported teacher contexts are what the teacher was asked for (cold cache)."""
    teacher = PerfectTeacher(world.T, world.dist)
    sc = GeneralScorer(world.T, STUDENTS["bpe-gpt2"](), max_depth=8)
    sc.score(teacher, DOCS[:20], top_k=4)
    st = sc.last_stats
    assert st["teacher_contexts"] == teacher.contexts and st["batches"] == teacher.calls
    assert st["rows_expanded"] >= st["row_jobs"] > 0 and st["rows"] >= st["row_jobs"]


def test_clear_errors(world):
    T = world.T
    with pytest.raises(TokenizerError, match="empty vocabulary"):
        GeneralScorer(T, Tokenizer(__import__("tokenizers").models.BPE()))
    with pytest.raises(TokenizerError, match="not a byte-level BPE"):
        GeneralScorer(Tokenizer(__import__("tokenizers").models.BPE()), byte_student())
    with pytest.raises(TokenizerError, match="student_eos_token"):
        GeneralScorer(T, other_byte_bpe("qwen2", eos=False))
    lower = sentencepiece_bpe("legacy")
    lower.normalizer = normalizers.Lowercase()
    with pytest.raises(TokenizerError, match="normalizer"):
        GeneralScorer(T, lower)
    for kwargs in ({"mode": "greedy"}, {"max_depth": 0}, {"beam": 0}, {"min_prob": 1.0}):
        with pytest.raises(ValueError):
            GeneralScorer(T, byte_student(), **kwargs)
    with pytest.raises(ValueError, match="another teacher"):
        GeneralScorer(utf8_teacher_tokenizer(), byte_student(), byte_model=world.bytes)
    sc = GeneralScorer(T, byte_student(), byte_model=world.bytes)
    with pytest.raises(ValueError, match="top_k"):
        sc.score(world.teacher, ["ab"], top_k=0)
    with pytest.raises(UnscorableTextError, match=r"teacher's encode/decode.*\['é'\]"):
        sc.score(world.teacher, ["ab é"], top_k=None)  # no symbol for é's bytes
    with pytest.raises(UnscorableTextError, match="end-of-text added token"):
        sc.score(world.teacher, [f"ab{EOS}"], top_k=None)
    with pytest.raises(UnscorableTextError, match="byte walk does not support added tokens"):
        GeneralScorer(T, byte_student(), walk="bytes").check_text(f"ab{EOS}")
    with pytest.raises(ValueError, match="walk"):
        GeneralScorer(T, byte_student(), walk="chars")


def test_student_end_of_text_token(world):
    """The teacher's end-of-text mass goes to the student's own end-of-text token: the
    teacher's content when the student has it, else the first known one it has (Llama-3
    and DeepSeek students have no "<|endoftext|>"), or the one named."""
    T = world.T
    plain = other_byte_bpe("qwen2", eos=False)
    plain.add_special_tokens(["<s>", "</s>"])
    sc = GeneralScorer(T, plain, byte_model=world.bytes)
    assert sc.S.eos_token == "</s>" and sc.S.eos_id == plain.token_to_id("</s>")
    own = GeneralScorer(T, plain, student_eos_token="<s>", byte_model=world.bytes)
    assert own.S.eos_id == plain.token_to_id("<s>")
    ref = GeneralScorer(T, other_byte_bpe("qwen2"), byte_model=world.bytes)
    a = _rows(sc.score(world.teacher, ["ab 1"], top_k=None)[0])
    b = _rows(ref.score(world.teacher, ["ab 1"], top_k=None)[0])
    # same rows, the end-of-text column renamed
    eos_a, eos_b = sc.S.eos_id, ref.S.eos_id
    assert np.allclose(a[:, eos_a], b[:, eos_b], atol=1e-12) and a[-1, eos_a] > 0.0
    keep = [i for i in range(min(a.shape[1], b.shape[1])) if i not in (eos_a, eos_b)]
    assert np.allclose(a[:, keep], b[:, keep], atol=1e-12)


def test_token_walk_teacher_without_known_boundaries():
    """A teacher whose pre-tokenizer the decision rule does not know (Digits before
    ByteLevel): the token walk has no teacher context and enumerates teacher tokens from
    the start of the text; rows still equal the enumerated truth, and the byte walk's."""
    T = tiny_teacher_tokenizer("gpt2")
    T.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    w = _world(T, string_distribution(5, seed=3))
    S = STUDENTS["bpe-qwen2"]()
    docs = [*SPECIAL_DOCS, *all_strings(5)[300::41]]
    scorer = GeneralScorer(w.T, S, max_depth=8, byte_model=w.bytes)
    assert scorer.TV is None
    tokens = scorer.score(w.teacher, docs, top_k=None)
    assert _check_against_truth(tokens, student_truth(S, w.dist)) < TOL
    byte_walk = GeneralScorer(w.T, S, max_depth=8, byte_model=w.bytes, walk="bytes")
    for a, b in zip(tokens, byte_walk.score(w.teacher, docs, top_k=None), strict=True):
        np.testing.assert_allclose(np.exp(a.logprobs), np.exp(b.logprobs), atol=TOL)
        np.testing.assert_allclose(a.prefix_logprob, b.prefix_logprob, atol=TOL)


def test_fast_beam_one_with_two_roots(world):
    """Metaspace with a prefix space: rows with two roots (" a" and "a" both encode to
    "▁a"). Beam 1 must keep both roots (their weights come with the first teacher
    call) and the rows must still bound the truth."""
    S = STUDENTS["sp-metaspace-first"]()
    truth = student_truth(S, world.dist)
    sc = GeneralScorer(
        world.T, S, "fast", max_depth=8, beam=1, min_prob=0.0, byte_model=world.bytes
    )
    res = sc.score(world.teacher, DOCS[::7], top_k=None)
    assert any(_max_roots(sc, r) == 2 for r in res)
    for r in res:
        rows = _rows(r)
        assert np.all(np.isfinite(r.unaccounted_mass)) and np.all(r.unaccounted_mass >= 0)
        for i in range(len(r.student_ids) + 1):
            want = truth.dist(list(r.student_ids[:i]))
            assert np.all(rows[i] <= want + 1e-12)
            assert np.all(want <= rows[i] + r.unaccounted_mass[i] + 1e-12)


def _max_roots(sc: GeneralScorer, r: Any) -> int:
    """The largest number of roots among the rows of a scored document."""
    ids = list(r.student_ids)
    return max(len(sc.S.roots(ids[:i])) for i in range(len(ids) + 1))


SEP = "<|sep|>"


@pytest.fixture(scope="module")
def sep_world() -> World:
    """The tiny teacher with one more added token (a chat-template-like separator) over
    plain strings and strings ``a + SEP + b``."""
    T = tiny_teacher_tokenizer("qwen2")
    T.add_special_tokens([SEP])
    short = all_strings(2)
    strings = list(dict.fromkeys([*all_strings(3), *(a + SEP + b for a in short for b in short)]))
    w = np.exp(np.random.default_rng(11).normal(0.0, 1.5, len(strings)))
    return _world(T, dict(zip(strings, (w / w.sum()).tolist(), strict=True)))


@pytest.mark.parametrize("name", ["bpe-gpt2", "bpe-llama3", "sp-metaspace-never", "bytes"])
def test_token_walk_texts_with_added_tokens(sep_world, name):
    """Texts holding an added token both tokenizers have (as chat templates do): rows
    after it continue from the teacher's ids up to it, rows before it give the
    teacher's mass on it to the student's token of the same content; every row equals
    the enumerated truth. A student without the token, or that prepends a space to each
    segment, is refused per text with the reason."""
    S = STUDENTS[name]()
    S.add_special_tokens([SEP])
    sep_id = S.token_to_id(SEP)
    docs = [SEP, "a" + SEP, SEP + "1", "ab" + SEP + " a", "1 " + SEP + "b", *all_strings(3)[::7]]
    docs += [s for s in sep_world.dist if SEP in s][::13]
    sc = GeneralScorer(sep_world.T, S, max_depth=8)
    results = sc.score(sep_world.teacher, docs, top_k=None)
    assert _check_against_truth(results, student_truth(S, sep_world.dist)) < TOL
    before_sep = [
        float(np.exp(r.logprobs[i, sep_id]))
        for r in results
        for i in range(len(r.student_ids))
        if r.student_ids[i] == sep_id
    ]
    assert before_sep and all(p > 0.0 for p in before_sep)
    for r in results[:12]:  # telescoping through the added token
        assert abs(r.target_logprobs.sum() - _alias_logprob(S, sep_world.dist, r.text)) < 1e-9
    lacking = STUDENTS[name]()
    with pytest.raises(UnscorableTextError, match="student does not have"):
        GeneralScorer(sep_world.T, lacking).check_text("a" + SEP)
    prefixed = STUDENTS["sp-metaspace-first"]()
    prefixed.add_special_tokens([SEP])
    with pytest.raises(UnscorableTextError, match="prefix space"):
        GeneralScorer(sep_world.T, prefixed).check_text("a" + SEP + "b")
