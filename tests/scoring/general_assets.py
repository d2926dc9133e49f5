"""Tiny student tokenizers for the general scorer, unrelated to the tiny teacher of
`tests.tiny_assets` (alphabet a, b, space, 1), made in-process with `tokenizers`:

- `other_byte_bpe`: (a) a byte-level BPE with different merges, a different id layout
  and a choice of regex (GPT-2 built-in, Qwen2, Llama-3);
- `sentencepiece_bpe`: (b) a SentencePiece-style BPE with ``▁``, byte fallback
  (``<0xNN>``; "1" and "é" have no piece) and the Llama-2 specials layout, either the
  "legacy" layout (Prepend + Replace normalizer, no pre-tokenizer; with or without a
  piece that crosses a space) or a Metaspace pre-tokenizer;
- `byte_student`: (c) the 256 single bytes (shuffled ids) + EOS.

Plus a teacher with all 256 byte symbols for texts with a two-byte character ("é").
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from pipeline.tokenization import LLAMA3_PATTERN, build_byte_level_bpe, bytes_to_unicode
from tests.tiny_assets import EOS, PATTERNS, all_strings

# (a) merges unrelated to tests.tiny_assets.MERGES ("Ã©" is "é" in the byte-level alphabet)
OTHER_MERGES: tuple[tuple[str, str], ...] = (
    ("1", "1"),
    ("a", "b"),
    ("Ġ", "a"),
    ("b", "a"),
    ("Ġ", "Ġ"),
    ("Ġa", "b"),
    ("11", "1"),
    ("Ġ", "b"),
    ("a", "1"),
    ("ĠĠ", "Ġ"),
    ("ba", "b"),
    ("Ġ", "1"),
    ("Ã", "©"),
    ("Ġ", "Ã©"),
)

# (b) pieces are made by merges only; "1" and "é" are left to byte fallback. "a▁" lets a
# token cross a space when there is no pre-tokenizer.
SP_MERGES: tuple[tuple[str, str], ...] = (
    ("▁", "a"),
    ("a", "b"),
    ("▁", "▁"),
    ("▁a", "b"),
    ("b", "a"),
    ("▁", "b"),
    ("▁▁", "▁"),
    ("a", "▁"),
    ("b", "b"),
)
SP_SPECIALS = ("<unk>", "<s>", EOS)

UTF8_ALPHABET = ("a", " ", "é", "1")
UTF8_MERGES: tuple[tuple[str, str], ...] = (
    ("Ã", "©"),
    ("Ġ", "a"),
    ("Ġ", "Ã©"),
    ("1", "1"),
    ("a", "a"),
    ("Ġ", "Ġ"),
    ("Ã©", "a"),
)


def _byte_symbols(shuffle: int) -> list[str]:
    """The 256 byte-level symbols, in an order that is not byte order."""
    table = bytes_to_unicode()
    return [table[b] for b in sorted(range(256), key=lambda b: (b * shuffle) % 257)]


def other_byte_bpe(pattern: str = "gpt2", eos: bool = True) -> Tokenizer:
    """(a) Byte-level BPE with `OTHER_MERGES`; pattern "gpt2" (ByteLevel's own regex),
    "qwen2" or "llama3"."""
    vocab = {s: i for i, s in enumerate(_byte_symbols(101))}
    for a, b in OTHER_MERGES:
        vocab.setdefault(a + b, len(vocab))
    regex = LLAMA3_PATTERN if pattern == "llama3" else PATTERNS[pattern]
    return build_byte_level_bpe(vocab, OTHER_MERGES, pattern=regex, added_tokens=[EOS] * eos)


def sentencepiece_bpe(
    style: str = "legacy", prepend_scheme: str = "first", cross_space: bool = True, split=True
) -> Tokenizer:
    """(b) SentencePiece-style BPE. ``style="legacy"``: Llama-2's tokenizer.json layout
    (normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer: a token may cross a
    space). ``style="metaspace"``: Metaspace pre-tokenizer (split at every ``▁``) with
    ``prepend_scheme`` ("first"/"always": NOT injective, " a" and "a" both give ``▁a``;
    "never": injective; ``split=False``: one piece, as legacy). ``cross_space=False`` leaves out the merge "a▁", so, as in
    vocabularies SentencePiece trains (Llama-2's), spaces lead every piece they are in."""
    merges = [m for m in SP_MERGES if cross_space or "▁" not in (m[0] + m[1]).lstrip("▁")]
    vocab = {s: i for i, s in enumerate(SP_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for s in ("▁", "a", "b"):
        vocab[s] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "legacy":
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        steps.append(decoders.Strip(" ", 1, 0))
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme=prepend_scheme, split=split
        )
        if prepend_scheme != "never":
            steps.append(decoders.Strip(" ", 1, 0))
    else:
        raise ValueError(style)
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens(list(SP_SPECIALS))
    return tok


def byte_student() -> Tokenizer:
    """(c) One token per byte (ids shuffled, not byte values) + EOS."""
    vocab = {s: i for i, s in enumerate(_byte_symbols(37))}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return tok


STUDENTS = {
    "bpe-gpt2": lambda: other_byte_bpe("gpt2"),
    "bpe-qwen2": lambda: other_byte_bpe("qwen2"),
    "bpe-llama3": lambda: other_byte_bpe("llama3"),
    "sp-legacy": lambda: sentencepiece_bpe("legacy"),
    "sp-llama2": lambda: sentencepiece_bpe("legacy", cross_space=False),
    "sp-metaspace-first": lambda: sentencepiece_bpe("metaspace", "first"),
    "sp-metaspace-always": lambda: sentencepiece_bpe("metaspace", "always"),
    "sp-metaspace-never": lambda: sentencepiece_bpe("metaspace", "never"),
    "sp-metaspace-nosplit": lambda: sentencepiece_bpe("metaspace", cross_space=False, split=False),
    "bytes": byte_student,
}


def utf8_teacher_tokenizer() -> Tokenizer:
    """A byte-level teacher (Qwen2 regex) with all 256 byte symbols and merges over "é"."""
    vocab = {s: i for i, s in enumerate(bytes_to_unicode().values())}
    for a, b in UTF8_MERGES:
        vocab.setdefault(a + b, len(vocab))
    return build_byte_level_bpe(vocab, UTF8_MERGES, pattern=PATTERNS["qwen2"], added_tokens=[EOS])


def utf8_strings(max_len: int) -> list[str]:
    return all_strings(max_len, UTF8_ALPHABET)
