"""Students made by SentencePiece itself: BPE trained with Llama-2's and Gemma's options
(byte fallback, digits split, whitespace-only pieces, no whitespace clean-up) and
converted by transformers, in the tokenizer.json layouts those checkpoints ship with:
Llama's Metaspace(split=False) as transformers 5 converts it, Llama-2's older
Prepend("▁") + Replace(" ", "▁") normalizer without a pre-tokenizer, and Gemma's
Replace(" ", "▁") normalizer with a Split(" ") that then never matches. SentencePiece
never puts a space after another character inside a piece, so the general scorer has a
stable boundary before every word ("word-start"); checked against continuations of real
text, and on the brute-force world its lossless rows equal the enumerated truth."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from pipeline.assets import generated_texts
from pipeline.scoring import GeneralScorer
from pipeline.scoring.general import StudentView
from tests.scoring.test_general_bruteforce import DOCS, TOL, _check_against_truth, _world
from tests.tiny_assets import (
    ALPHABET,
    EOS,
    all_strings,
    string_distribution,
    student_truth,
    tiny_teacher_tokenizer,
)

spm = pytest.importorskip("sentencepiece")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# continuations that move boundaries in other layouts: spaces, newlines, digits, an
# apostrophe, a two-byte character, byte fallback (the emoji has no piece)
CONTINUATIONS = ("", " ", "  x", "\n", "\n\n ", "1", "12 ", "'s", "é", "\U0001f600", "ab", "a b")


LAYOUTS = ("llama-metaspace", "llama-prepend-replace", "gemma")


def _train(folder, **options) -> None:
    folder.mkdir()
    corpus = folder / "corpus.txt"
    # real English plus the world's alphabet, so pieces over a, b, space and 1 exist
    world = [" ".join(all_strings(3)[1:]), "ab ba aab bba a1 b 11 ab  ab"]
    corpus.write_text("\n".join(generated_texts(200) + world * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=1200,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        eos_piece=EOS,
        minloglevel=2,
        **options,
    )


@pytest.fixture(scope="module")
def spm_students(tmp_path_factory) -> dict[str, Tokenizer]:
    import transformers

    d = tmp_path_factory.mktemp("spm")
    _train(d / "llama", unk_id=0, bos_id=1, eos_id=2)
    # Gemma: <pad> <eos> <bos> <unk> first (GemmaConverter expects them), no dummy prefix
    _train(d / "gemma", pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False)
    gemma = transformers.GemmaTokenizer.from_pretrained(str(d / "gemma")).backend_tokenizer
    assert json.loads(gemma.to_str())["pre_tokenizer"]["type"] == "Split"
    converted = transformers.LlamaTokenizer.from_pretrained(str(d / "llama")).backend_tokenizer
    spec = json.loads(converted.to_str())
    assert spec["pre_tokenizer"]["type"] == "Metaspace" and not spec["pre_tokenizer"]["split"]
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    return {
        "llama-metaspace": converted,
        "llama-prepend-replace": Tokenizer.from_str(json.dumps(spec)),
        "gemma": gemma,
    }


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stable_boundaries_before_words_hold_on_real_text(spm_students, layout):
    tok = spm_students[layout]
    vocab = tok.get_vocab()
    assert "▁" in vocab and not [s for s in vocab if "▁" in s.lstrip("▁")]
    view = StudentView(tok, EOS)
    assert view.decision_rule == "word-start"
    decided = 0
    for text in generated_texts(3):
        text = text[:160]
        for cut in range(1, len(text) + 1):
            y = text[:cut]
            stable = view.stable_tokens(y.encode())
            if not stable:
                continue
            decided += 1
            q, n = view.local_offset(y.encode())
            for c in (text[cut:], *CONTINUATIONS):
                ids = tuple(tok.encode(y + c, add_special_tokens=False).ids)
                assert ids[: len(stable)] == stable, (layout, y, c)
                if n:  # decisions are made on the text after the boundary alone
                    rest = (y + c).encode()[q:].decode()
                    assert ids == stable + tuple(tok.encode(rest, add_special_tokens=False).ids)
    assert decided > 300  # most prefixes of real text have a word before them


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lossless_rows_equal_enumerated_truth(spm_students, layout):
    S = spm_students[layout]
    assert all(S.token_to_id(c) is not None for c in ALPHABET if c != " ")
    world = _world(tiny_teacher_tokenizer("qwen2"), string_distribution(5, seed=0))
    scorer = GeneralScorer(world.T, S, max_depth=8, byte_model=world.bytes)
    results = scorer.score(world.teacher, DOCS, top_k=None)
    assert scorer.S.decision_rule == "word-start"
    assert _check_against_truth(results, student_truth(S, world.dist)) < TOL
