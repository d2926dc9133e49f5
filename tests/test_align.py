"""`pipeline.align`: student byte ends, ALM chunks, byte windows and the batch arrays,
against brute force (Python loops over every byte offset) with real tokenizers made
in-process: byte-level BPEs trained on different small corpora, hand-made byte-level BPEs
(GPT-2 / Qwen2 regex, no added token at all), SentencePiece-style BPEs with ``▁`` and
byte fallback (legacy Prepend layout, Metaspace first / always / never), one token per byte.
"""

from __future__ import annotations

import json
import re
import zlib

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.align import (
    BYTE_EOS,
    IGNORE_INDEX,
    StudentBytes,
    alm_batch_arrays,
    alm_chunks,
    byte_batch_arrays,
    byte_windows,
    student_byte_ends,
)
from tests.scoring.general_assets import byte_student, other_byte_bpe, sentencepiece_bpe
from tests.tiny_assets import EOS

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

CORPUS_A = (
    "le café au lait, un café noir, la crème brûlée, déjà vu, à la carte, très élevé.\n"
    "中文 中文字 中国 文字 中文中文 我们 中文 文化 中国中文\n"
    "smile 😀 grin 😀😀 heart 😍 😀 cat 😺 😀\n"
) * 20
CORPUS_B = (
    "def f(x):\n    return x + 12345\n\n\nclass A:\n    pass\n"
    "total = 678 + 90 - 12345 * 2\n  indented  text   with   runs\t\ttabs\n"
) * 20

FIXED_TEXTS = [
    "a  \n\n  b",
    "12345 678",
    "café 中文 😀",
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "x",
    "",
    "é",
    "😀😀",
    "ab ba  ab\tb\n\n",
    "1 é 中 😀 1",
    "return x + 12345\n",
    f"{IM_START}user\nhé 😀{IM_END}\n",
    f"a{EOS}b",
    f"a {EOS}  b",
]
FRAGMENTS = (
    "a", "b", "ab", "ba", " ", "  ", "\n", "\n\n", "\t", "1", "23", "456", "é", "è", "à",
    "中", "文", "😀", "😺", "café", "the", ".", ",", "'s", " x", "+", "def", IM_START, EOS,
)  # fmt: skip


def random_texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        "".join(rng.choice(FRAGMENTS) for _ in range(rng.integers(0, 14))) for _ in range(count)
    ]


TEXTS = FIXED_TEXTS + random_texts(30, seed=0)


def trained_byte_bpe(corpus: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE (ByteLevel pre-tokenizer, all 256 bytes) trained on ``corpus``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus], trainer=trainer)
    return tok


def stripping_special() -> Tokenizer:
    """A byte-level BPE whose added token strips the whitespace around it."""
    tok = other_byte_bpe("gpt2")
    tok.add_special_tokens([AddedToken("<X>", lstrip=True, rstrip=True)])
    return tok


FACTORIES = {
    "bpe-a": lambda: trained_byte_bpe(CORPUS_A, 330),
    "bpe-b": lambda: trained_byte_bpe(CORPUS_B, 300),
    "bpe-qwen2": lambda: other_byte_bpe("qwen2"),
    "bpe-gpt2-no-added": lambda: other_byte_bpe("gpt2", eos=False),
    "bytes": byte_student,
    "sp-legacy": lambda: sentencepiece_bpe("legacy"),
    "sp-metaspace-first": lambda: sentencepiece_bpe("metaspace", "first"),
    "sp-metaspace-always": lambda: sentencepiece_bpe("metaspace", "always"),
    "sp-metaspace-never": lambda: sentencepiece_bpe("metaspace", "never"),
    "bpe-stripping-special": stripping_special,
}
TEACHERS = ("bpe-a", "bpe-b", "bpe-qwen2", "bytes")
_TOKS: dict[str, Tokenizer] = {}


def tok(name: str) -> Tokenizer:
    if name not in _TOKS:
        _TOKS[name] = FACTORIES[name]()
    return _TOKS[name]


# ------------------------------------------------------------------ brute force
def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, written out again (not imported)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


BYTE_DECODER = _gpt2_byte_decoder()


def brute_ends(t: Tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Ids and byte ends with explicit loops: each token's bytes from its vocabulary
    string; an added token covers its offsets; a leading " " of the first token of a run
    (after an added token or at the start) is left out when the run is one byte longer
    than its text."""
    spec = json.loads(t.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    added = {a["id"] for a in spec["added_tokens"]}
    enc = t.encode(text, add_special_tokens=False)
    raw = text.encode("utf-8")
    char_byte = [len(text[:i].encode("utf-8")) for i in range(len(text) + 1)]
    pieces: list[bytes] = []
    for i, s in zip(enc.ids, enc.tokens, strict=True):
        if i in added:
            a, b = enc.offsets[len(pieces)]
            pieces.append(raw[char_byte[a] : char_byte[b]])
        elif byte_level:
            pieces.append(bytes(BYTE_DECODER[c] for c in s))
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", s):
            pieces.append(bytes([int(s[3:5], 16)]))
        else:
            pieces.append(s.replace("▁", " ").encode("utf-8"))
    # runs between added tokens
    runs, start = [], 0
    for k, i in enumerate([*enc.ids, None]):
        if i is None or i in added:
            runs.append((start, k))
            start = k + 1
    ends, pos = [], 0
    for a, b in runs:
        nxt = len(raw) if b == len(pieces) else char_byte[enc.offsets[b][0]]
        length = sum(len(p) for p in pieces[a:b])
        drop = 1 if a < b and length == nxt - pos + 1 and pieces[a][:1] == b" " else 0
        for k in range(a, b):
            pos += len(pieces[k]) - (drop if k == a else 0)
            ends.append(pos)
        if b < len(pieces):
            pos += len(pieces[b])
            ends.append(pos)
    assert pos == len(raw), (text, enc.tokens)
    return list(enc.ids), ends


def brute_chunks(te: list[int], lp: np.ndarray, se: list[int]) -> list[tuple]:
    """(b0, b1, s0, s1, t0, t1, logprob) per chunk, by enumerating byte offsets."""
    n = te[-1] if te else 0
    tset, sset = {0, *te}, {0, *se}
    shared = [o for o in range(n + 1) if o in tset and o in sset]
    out = []
    for c in range(len(shared) - 1):
        b0, b1 = shared[c], shared[c + 1]
        tt = [j for j in range(len(te)) if b0 < te[j] <= b1]
        ss = [i for i in range(len(se)) if b0 < se[i] <= b1 or (c == 0 and se[i] == 0)]
        assert tt == list(range(tt[0], tt[-1] + 1)) and ss == list(range(ss[0], ss[-1] + 1))
        total = 0.0
        for j in tt:
            total += float(lp[j])
        out.append((b0, b1, ss[0], ss[-1] + 1, tt[0], tt[-1] + 1, total))
    return out


def chunk_tuples(ch) -> list[tuple]:
    return list(
        zip(
            ch.byte_start.tolist(),
            ch.byte_end.tolist(),
            ch.student_start.tolist(),
            ch.student_end.tolist(),
            ch.teacher_start.tolist(),
            ch.teacher_end.tolist(),
            ch.logprob.tolist(),
            strict=True,
        )
    )


def assert_chunks_equal(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g[:6] == w[:6]
        assert abs(g[6] - w[6]) <= 1e-12


def is_char_boundary(raw: bytes, o: int) -> bool:
    return o == len(raw) or (raw[o] & 0xC0) != 0x80


# ------------------------------------------------------------------ student_byte_ends
@pytest.mark.parametrize("name", list(FACTORIES))
def test_student_byte_ends_reproduce_text(name):
    t = tok(name)
    sb = StudentBytes(t)
    inside_char = 0
    for text in [*TEXTS, "a <X>  ba<X>"]:
        ids, ends = student_byte_ends(t, text)
        assert ids.dtype == np.int64 and ends.dtype == np.int64
        want_ids, want_ends = brute_ends(t, text)
        assert ids.tolist() == want_ids, text
        assert ends.tolist() == want_ends, (name, text)
        assert sb.encode(text)[1].tolist() == want_ends  # a prebuilt StudentBytes agrees
        raw = text.encode("utf-8")
        # the spans tile the text, and each is the token's bytes (less a prepended " ")
        starts = [0, *ends.tolist()][: len(ends)]
        assert b"".join(raw[a:b] for a, b in zip(starts, ends.tolist(), strict=True)) == raw
        for i, (a, b) in enumerate(zip(starts, ends.tolist(), strict=True)):
            if int(ids[i]) in sb.view.added_ids:
                assert sb.view.bytes_of(int(ids[i])).strip() == raw[a:b].strip()
            else:
                piece = sb.view.bytes_of(int(ids[i]))
                assert piece in (raw[a:b], b" " + raw[a:b]), (name, text, i)
        inside_char += sum(not is_char_boundary(raw, e) for e in ends.tolist())
    if name != "bpe-stripping-special":
        assert inside_char > 0, f"{name}: no token ends inside a multi-byte character"


def test_trained_bpe_token_ends_inside_character():
    """A trained byte-level BPE with a token that ends inside a multi-byte character."""
    t = tok("bpe-b")  # trained on ASCII: no merge completes "中"
    text = "x 中文 😀"
    _, ends = student_byte_ends(t, text)
    raw = text.encode("utf-8")
    assert [e for e in ends.tolist() if not is_char_boundary(raw, e)]
    assert ends[-1] == len(raw) and np.all(np.diff(ends) > 0)


def test_student_byte_ends_prefix():
    """SentencePiece's prepended "▁" is not in the text: ends exclude it, and a token that
    is only the prefix ends at byte 0."""
    legacy = tok("sp-legacy")
    ids, ends = student_byte_ends(legacy, " ab")
    assert [legacy.id_to_token(i) for i in ids] == ["▁", "▁ab"]
    assert ends.tolist() == [0, 3]
    first = tok("sp-metaspace-first")
    assert student_byte_ends(first, "ab")[1].tolist() == [2]  # "▁ab" = prefix + "ab"
    assert student_byte_ends(first, " ab")[1].tolist() == [3]  # "▁ab" = " ab", no prefix
    # Metaspace "always" and the legacy layout put a prefix after every added token
    for name in ("sp-metaspace-always", "sp-legacy"):
        t = tok(name)
        ids, ends = student_byte_ends(t, f"a{EOS}b")
        assert [t.id_to_token(i) for i in ids] == ["▁a", EOS, "▁b"]
        assert ends.tolist() == [1, 1 + len(EOS), 2 + len(EOS)]


def test_student_byte_ends_errors():
    sp = tok("sp-legacy")
    with pytest.raises(ValueError, match=r"first difference at byte 2 of 7 \(student token 1"):
        student_byte_ends(sp, "ab▁ab")  # a literal "▁" reads as a space
    with pytest.raises(ValueError, match="first difference at byte"):
        student_byte_ends(tok("sp-metaspace-never"), "▁")


def test_student_without_added_token_is_supported():
    t = tok("bpe-gpt2-no-added")
    assert t.get_added_tokens_decoder() == {}
    ids, ends = student_byte_ends(t, "café 中文")
    assert ids.tolist() == t.encode("café 中文", add_special_tokens=False).ids
    assert ends[-1] == len("café 中文".encode())
    assert t.get_added_tokens_decoder() == {}  # the tokenizer itself is left alone


# ------------------------------------------------------------------ alm_chunks
def _pair_cases():
    for teacher in TEACHERS:
        for student in FACTORIES:
            if student != "bpe-stripping-special":
                yield teacher, student


@pytest.mark.parametrize(("teacher", "student"), list(_pair_cases()))
def test_alm_chunks_bruteforce(teacher, student):
    rng = np.random.default_rng(zlib.crc32(f"{teacher}|{student}".encode()))
    nonempty = 0
    for text in TEXTS:
        _, te = brute_ends(tok(teacher), text)
        _, se = brute_ends(tok(student), text)
        m = len(te)
        lp = rng.uniform(-9.0, -1e-3, m + 1).astype(np.float32)
        got = alm_chunks(np.asarray(te), lp, np.asarray(se))
        want = brute_chunks(te, lp, se)
        assert_chunks_equal(chunk_tuples(got), want)
        assert got.mask.dtype == bool and got.mask.all()
        assert got.eos_logprob == float(lp[m]) and got.eos_target
        if m:
            nonempty += 1
            # the chunks tile both tokenizations and the text
            assert got.byte_start[0] == 0 and got.byte_end[-1] == len(text.encode())
            assert got.student_end[-1] == len(se) and got.teacher_end[-1] == m
            assert np.array_equal(got.student_start[1:], got.student_end[:-1])
            # property: chunk log-likelihoods sum to the total minus EOS
            total = sum(float(x) for x in lp[:m])
            assert abs(float(got.logprob.sum()) - total) <= 1e-9 * max(1.0, abs(total))
            spans = zip(got.student_start.tolist(), got.student_end.tolist(), strict=True)
            per_token = [c for c, (s0, s1) in enumerate(spans) for _ in range(s0, s1)]
            assert got.student_chunk().tolist() == per_token
    assert nonempty > 30


def test_alm_chunks_same_tokenizer_is_one_token_per_chunk():
    t = tok("bpe-a")
    text = "le café 中文 😀 12345"
    _, te = student_byte_ends(t, text)
    lp = np.linspace(-3, -0.1, len(te) + 1)
    ch = alm_chunks(te, lp, te)
    assert len(ch) == len(te)
    assert np.array_equal(ch.teacher_start, np.arange(len(te)))
    assert np.array_equal(ch.student_start, ch.teacher_start)
    assert np.array_equal(ch.logprob, lp[:-1])


def test_alm_chunks_targets():
    rng = np.random.default_rng(5)
    for text in TEXTS:
        _, te = brute_ends(tok("bpe-b"), text)
        _, se = brute_ends(tok("sp-legacy"), text)
        m, n = len(te), len(text.encode())
        lp = rng.normal(-2, 1, m + 1)
        tgt = rng.random(m + 1) < 0.8
        tb = rng.random(n) < 0.9
        want = brute_chunks(te, lp, se)
        by_tok = alm_chunks(te, lp, se, target=tgt)
        by_tok_m = alm_chunks(te, lp, se, target=tgt[:m])
        by_bytes = alm_chunks(te, lp, se, target_bytes=tb)
        both = alm_chunks(te, lp, se, target=tgt, target_bytes=tb)
        want_tok = [all(tgt[j] for j in range(w[4], w[5])) for w in want]
        want_bytes = [all(tb[b] for b in range(w[0], w[1])) for w in want]
        assert by_tok.mask.tolist() == want_tok
        assert by_tok_m.mask.tolist() == want_tok and by_tok_m.eos_target
        assert by_tok.eos_target == bool(tgt[m])
        assert by_bytes.mask.tolist() == want_bytes
        assert both.mask.tolist() == [a and b for a, b in zip(want_tok, want_bytes, strict=True)]
        assert_chunks_equal(chunk_tuples(both), want)


def test_alm_chunks_rejects_bad_input():
    with pytest.raises(ValueError, match="not the same text"):
        alm_chunks([2, 5], np.zeros(3), [1, 4])
    with pytest.raises(ValueError, match="shape"):
        alm_chunks([2, 5], np.zeros(2), [1, 5])
    with pytest.raises(ValueError, match="strictly increasing"):
        alm_chunks([2, 2, 5], np.zeros(4), [1, 5])
    with pytest.raises(ValueError, match="nondecreasing"):
        alm_chunks([2, 5], np.zeros(3), [3, 1, 5])
    with pytest.raises(ValueError, match="target"):
        alm_chunks([2, 5], np.zeros(3), [1, 5], target=[True])
    empty = alm_chunks(np.zeros(0, int), np.array([-0.5]), np.zeros(0, int))
    assert len(empty) == 0 and empty.eos_logprob == -0.5


# ------------------------------------------------------------------ byte windows
def byte_rows_for(text: str, specials: tuple[str, ...]) -> list[int]:
    """Row starts: one per byte, one per special (its bytes are one symbol), one at the end."""
    raw = text.encode("utf-8")
    rows, o = [], 0
    while o < len(raw):
        rows.append(o)
        sp = next((s.encode() for s in specials if raw.startswith(s.encode(), o)), None)
        o += len(sp) if sp else 1
    rows.append(len(raw))
    return rows


def brute_windows(rs: list[int], e: list[int], m: int) -> list[list[int]]:
    out = []
    for o in e:
        r0 = next((r for r in range(len(rs)) if rs[r] == o), None)
        out.append([-1 if r0 is None or r0 + j >= len(rs) else r0 + j for j in range(m)])
    return out


SPECIAL_TEXTS = [
    f"{IM_START}user\nhé 😀{IM_END}\n",
    f"a{IM_START}b",
    f"{IM_START}{IM_END}",
    "no special here 中",
    "",
]


@pytest.mark.parametrize("student", ["bpe-a", "bpe-b", "bytes", "sp-legacy", "sp-metaspace-first"])
def test_byte_windows_bruteforce(student):
    t = tok(student)
    minus = 0
    for text in SPECIAL_TEXTS:
        rs = byte_rows_for(text, (IM_START, IM_END))
        _, e = student_byte_ends(t, text)
        for m in (1, 3, 5):
            rows, starts = byte_windows(np.asarray(rs), e, m)
            assert rows.shape == (len(e), m) and rows.dtype == np.int64
            assert rows.tolist() == brute_windows(rs, e.tolist(), m)
            assert starts.tolist() == [
                [rs[r] if r >= 0 else -1 for r in row] for row in rows.tolist()
            ]
        rows, _ = byte_windows(np.asarray(rs), e, 4)
        if len(e):
            # the last position (after the last token) is the end-of-text row, then nothing
            assert rows[-1].tolist() == [len(rs) - 1, -1, -1, -1]
        minus += int((rows[:, 0] == -1).sum())
    # the trained BPEs have the specials as added tokens; the others split them into
    # pieces, which end inside the special's bytes (no row there)
    has_specials = IM_START in {a.content for a in t.get_added_tokens_decoder().values()}
    assert (minus == 0) == has_specials


def test_byte_windows_duplicate_rows_and_errors():
    rows, starts = byte_windows([0, 1, 1, 2], [1, 2, 0], 2)
    assert rows.tolist() == [[1, 2], [3, -1], [0, 1]]
    assert starts.tolist() == [[1, 1], [2, -1], [0, 1]]
    with pytest.raises(ValueError):
        byte_windows([0, 2, 1], [1], 2)
    with pytest.raises(ValueError):
        byte_windows([0, 1], [1], 0)


# ------------------------------------------------------------------ batch arrays
def brute_alm_batch(want, ids, bos_id, length):
    x = ([bos_id] if bos_id is not None else []) + list(ids)
    if length is not None:
        x = x[:length]
    off = 0 if bos_id is None else 1
    P = len(x)
    labels = [x[t + 1] if t + 1 < P else IGNORE_INDEX for t in range(P)]
    kept = []
    for c, w in enumerate(want):
        pos = [s + off - 1 for s in range(w[2], w[3])]
        if all(0 <= q < P - 1 for q in pos):
            kept.append(c)
    chunk = [-1] * P
    for k, c in enumerate(kept):
        for s in range(want[c][2], want[c][3]):
            chunk[s + off - 1] = k
    return x, labels, chunk, kept


@pytest.mark.parametrize("student", ["bpe-qwen2", "sp-legacy", "sp-metaspace-first", "bytes"])
def test_alm_batch_arrays_bruteforce(student):
    rng = np.random.default_rng(3)
    for text in TEXTS[:24]:
        _, te = brute_ends(tok("bpe-a"), text)
        ids, se = student_byte_ends(tok(student), text)
        lp = rng.normal(-2, 1, len(te) + 1)
        tgt = rng.random(len(te)) < 0.7
        ch = alm_chunks(te, lp, se, target=tgt)
        want = brute_chunks(te, lp, se.tolist())
        for bos_id in (None, 999):
            for length in (None, 1, 3, 7, len(ids) + 1):
                out = alm_batch_arrays(ch, ids, length=length, bos_id=bos_id)
                x, labels, chunk, kept = brute_alm_batch(want, ids.tolist(), bos_id, length)
                assert out["input_ids"].tolist() == x
                assert out["alm_labels"].tolist() == labels
                assert out["alm_chunk"].tolist() == chunk
                assert out["alm_chunk_index"].tolist() == kept
                assert out["alm_chunk_logprob"].tolist() == [ch.logprob[c] for c in kept]
                assert out["alm_chunk_mask"].tolist() == [bool(ch.mask[c]) for c in kept]
                if bos_id is None:
                    assert 0 not in kept  # the chunk of token 0 cannot be scored
                elif length is None and len(ids):
                    assert kept == list(range(len(ch)))  # a BOS scores every chunk
                # the labels at a chunk's positions are exactly its student tokens
                for k, c in enumerate(kept):
                    at = out["alm_chunk"] == k
                    assert (
                        out["alm_labels"][at].tolist()
                        == ids[ch.student_start[c] : ch.student_end[c]].tolist()
                    )


def symbol_at(raw: bytes, o: int, specials: dict[bytes, int]) -> int:
    if o == len(raw):
        return BYTE_EOS
    for s, i in specials.items():
        if raw.startswith(s, o):
            return i
    return raw[o]


@pytest.mark.parametrize("student", ["bpe-a", "bpe-b", "sp-metaspace-first"])
def test_byte_batch_arrays_bruteforce(student):
    rng = np.random.default_rng(11)
    specials = {IM_START.encode(): 257, IM_END.encode(): 258}
    k, m = 4, 3
    for text in SPECIAL_TEXTS:
        raw = text.encode("utf-8")
        rs = byte_rows_for(text, (IM_START, IM_END))
        R = len(rs)
        bids = rng.integers(0, 259, (R, k))
        blp = rng.normal(-3, 1, (R, k)).astype(np.float32)
        tail = rng.normal(-5, 1, R).astype(np.float32)
        lmask = rng.random(R) < 0.8
        _, e = student_byte_ends(tok(student), text)
        for bos_id, length in ((None, None), (1, None), (1, 4), (None, 2)):
            out = byte_batch_arrays(
                np.asarray(rs),
                bids,
                blp,
                tail,
                lmask,
                raw,
                e,
                m,
                length=length,
                bos_id=bos_id,
                specials=specials,
            )
            pos = ([0] if bos_id is not None else []) + e.tolist()
            if length is not None:
                pos = pos[:length]
            P = len(pos)
            want_rows = brute_windows(rs, pos, m)
            assert out["byte_rows"].tolist() == want_rows
            assert out["byte_ids"].shape == (P, m, k) and out["byte_tail"].shape == (P, m)
            for t in range(P):
                for j in range(m):
                    r = want_rows[t][j]
                    if r < 0:
                        assert out["byte_ids"][t, j].tolist() == [-1] * k
                        assert not out["byte_mask"][t, j] and out["byte_next"][t, j] == -1
                        assert out["byte_tail"][t, j] == 0 and not out["byte_logprobs"][t, j].any()
                        continue
                    assert out["byte_ids"][t, j].tolist() == bids[r].tolist()
                    assert out["byte_logprobs"][t, j].tolist() == blp[r].tolist()
                    assert out["byte_tail"][t, j] == tail[r]
                    assert out["byte_mask"][t, j] == lmask[r]
                    assert out["byte_next"][t, j] == symbol_at(raw, rs[r], specials)
            # column 0 is the symbol that follows each position in the text
            for t in range(P):
                if want_rows[t][0] >= 0:
                    assert out["byte_next"][t, 0] == symbol_at(raw, pos[t], specials)


def test_byte_batch_arrays_specials_mapping():
    text = f"a{IM_START}b"
    raw = text.encode()
    rs = np.asarray(byte_rows_for(text, (IM_START,)))
    R = len(rs)
    args = (rs, np.zeros((R, 2), int), np.zeros((R, 2)), np.zeros(R), np.ones(R, bool), raw)
    e = np.asarray([1, 1 + len(IM_START), len(raw)])
    out = byte_batch_arrays(*args, e, 2, bos_id=0)
    assert out["byte_next"].tolist() == [[97, -1], [-1, 98], [98, 256], [256, -1]]
    with pytest.raises(ValueError, match="not in specials"):
        byte_batch_arrays(*args, e, 2, specials={b"<x>": 300})
    out = byte_batch_arrays(*args, e, 2, specials={IM_START.encode(): 300})
    assert out["byte_next"][0].tolist() == [300, 98] and out["byte_mask"].sum() == 5
