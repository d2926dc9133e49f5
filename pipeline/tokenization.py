"""Byte-level BPE tokenizers as the scorers see them.

Everything the scorers need is derived from the tokenizer's own vocab, merge list,
pre-tokenizer and added tokens; nothing assumes that ids 0-255 are bytes or that merge
``i`` makes id ``256 + i`` (SmolLM2 has its specials at 0-16 and merge ``i`` -> 252 + i).

`ByteLevelBPE` wraps a `tokenizers.Tokenizer` and exposes:
- the byte string of every token id (`token_bytes`),
- the merge list as pairs of token strings, and the added (special) tokens,
- `normalize` (the tokenizer's normalizer, applied ONCE to a whole text: NFC is not
  prefix-stable, so prefixes are never re-normalized),
- `split_added` (text -> plain segments and added-token ids, as HF does),
- `pretokenize` (a plain segment -> pre-token strings in the byte-level alphabet),
- `bpe` (one pre-token -> ids, the BPE model only).

`load_tokenizer` accepts a `tokenizers.Tokenizer`, a transformers fast tokenizer, a
tokenizer.json path, a local HF directory, or a hub id (resolved offline if
``HF_HUB_OFFLINE`` is set).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from pipeline.errors import UnscorableTextError as UnscorableTextError  # defined there too

# Pre-tokenizer regexes of common byte-level BPE families.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Added tokens that conventionally end a document, in order of preference.
DOC_END_TOKENS = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|end|>",
    "<｜end▁of▁sentence｜>",  # DeepSeek (incl. its Llama-3 distills)
)


class TokenizerError(ValueError):
    """A tokenizer cannot be used the way it was asked to be used."""


class UnscorableTokenizationError(TokenizerError, UnscorableTextError):
    """A text the tokenizers cannot encode the way scoring needs (e.g. it holds an added
    token the student lacks): a bad record (`UnscorableTextError`: the record is
    skipped), and a `TokenizerError` for the callers that catch that."""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character map used by every ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def to_byte_level(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def from_byte_level(s: str) -> bytes:
    table = unicode_to_bytes()
    return bytes(table[c] for c in s)


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool


def _has_byte_level(pre: Any) -> bool:
    if pre is None:
        return False
    if pre.get("type") == "ByteLevel":
        return True
    if pre.get("type") == "Sequence":
        return any(_has_byte_level(p) for p in pre.get("pretokenizers", []))
    return False


class ByteLevelBPE:
    """Read-only view of a byte-level BPE `tokenizers.Tokenizer` (see module docstring)."""

    def __init__(self, tokenizer: Tokenizer, name: str = "tokenizer") -> None:
        self.tokenizer = tokenizer
        self.name = name
        spec = json.loads(tokenizer.to_str())
        self.spec = spec
        model = spec["model"]
        if model.get("type") != "BPE":
            raise TokenizerError(f"{name}: model type is {model.get('type')!r}, not BPE")
        if not _has_byte_level(spec.get("pre_tokenizer")):
            raise TokenizerError(
                f"{name}: pre-tokenizer has no ByteLevel step (not a byte-level BPE)"
            )
        self.model_spec = model
        self.vocab: dict[str, int] = dict(model["vocab"])
        merges = model["merges"]
        self.merges: list[tuple[str, str]] = [
            tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1])  # type: ignore[misc]
            for m in merges
        ]
        self.added: list[AddedToken] = [
            AddedToken(a["id"], a["content"], bool(a["special"]))
            for a in spec.get("added_tokens", [])
        ]
        self.added_by_content = {a.content: a.id for a in self.added}
        self.added_ids = {a.id for a in self.added}
        # Size of the id space, specials included (teacher logits are sliced to this).
        self.size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.id_to_str: dict[int, str] = {i: s for s, i in self.vocab.items()}
        inv = unicode_to_bytes()
        self.token_bytes: dict[int, bytes] = {}
        for s, i in self.vocab.items():
            if i in self.added_ids:
                continue
            try:
                self.token_bytes[i] = bytes(inv[c] for c in s)
            except KeyError as err:
                raise TokenizerError(
                    f"{name}: vocab entry {s!r} (id {i}) is not in the byte-level alphabet"
                ) from err
        for a in self.added:
            self.token_bytes[a.id] = a.content.encode("utf-8")
        self.bpe_ids = sorted(i for i in self.id_to_str if i not in self.added_ids)
        self._added_re = (
            re.compile(
                "|".join(re.escape(c) for c in sorted(self.added_by_content, key=len, reverse=True))
            )
            if self.added
            else None
        )

    # ----- structural facts -------------------------------------------------------
    def component(self, key: str) -> Any:
        """A component of the tokenizer.json (normalizer, pre_tokenizer, ...), as JSON."""
        return self.spec.get(key)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer's JSON: identifies the exact tokenizer in provenance."""
        return hashlib.sha256(self.tokenizer.to_str().encode("utf-8")).hexdigest()

    def special_id(self, candidates: Sequence[str]) -> int | None:
        for c in candidates:
            if c in self.added_by_content:
                return self.added_by_content[c]
        return None

    def end_of_text(self, eos_token: str | None = None) -> str:
        """Content of the end-of-text token: ``eos_token`` when given (it must be an
        added token), else the first of ``DOC_END_TOKENS`` this tokenizer has."""
        if eos_token is None:
            eos_token = next((c for c in DOC_END_TOKENS if c in self.added_by_content), None)
            if eos_token is None:
                raise TokenizerError(
                    f"{self.name} has no end-of-text token among {DOC_END_TOKENS}; "
                    "pass eos_token= explicitly"
                )
        if eos_token not in self.added_by_content:
            raise TokenizerError(
                f"eos_token {eos_token!r} is not an added token of the {self.name}"
            )
        return eos_token

    def added_map(self, other_by_content: Mapping[str, int]) -> dict[int, int]:
        """Added-token id -> the other tokenizer's id of the same content (ids the other
        lacks are left out), in id order."""
        return {
            i: other_by_content[self.token_bytes[i].decode("utf-8")]
            for i in sorted(self.added_ids)
            if self.token_bytes[i].decode("utf-8") in other_by_content
        }

    # ----- text processing --------------------------------------------------------
    def normalize(self, text: str) -> str:
        norm = self.tokenizer.normalizer
        return norm.normalize_str(text) if norm is not None else text

    def split_added(self, text: str) -> list[str | int]:
        """Split a (normalized) text into plain segments (str) and added-token ids (int)."""
        if self._added_re is None:
            return [text] if text else []
        out: list[str | int] = []
        pos = 0
        for m in self._added_re.finditer(text):
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(self.added_by_content[m.group(0)])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def pretokenize(self, segment: str) -> list[str]:
        """Pre-tokens of a plain segment, in the byte-level alphabet (1 char = 1 byte)."""
        pre = self.tokenizer.pre_tokenizer
        if pre is None:
            return [to_byte_level(segment.encode("utf-8"))] if segment else []
        return [p for p, _ in pre.pre_tokenize_str(segment)]

    def bpe(self, piece: str) -> list[int]:
        """BPE ids of one pre-token (byte-level string), the model step only."""
        return [t.id for t in self.tokenizer.model.tokenize(piece)]

    def encode_plain(self, segment: str) -> list[int]:
        """Canonical ids of a plain (already normalized) segment."""
        ids: list[int] = []
        for p in self.pretokenize(segment):
            ids.extend(self.bpe(p))
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes[i] for i in ids)

    def encode_exact(self, segment: str) -> list[int]:
        """`encode_plain`, checked to decode back to ``segment``'s bytes; else
        `UnscorableTextError` naming the characters the vocab has no symbol for."""
        ids = self.encode_plain(segment)
        if self.decode_bytes(ids) != segment.encode("utf-8"):
            lost = sorted(
                {
                    ch
                    for ch in segment
                    if self.decode_bytes(self.encode_plain(ch)) != ch.encode("utf-8")
                }
            )
            raise UnscorableTextError(
                f"text does not survive the {self.name}'s encode/decode; characters "
                f"without a symbol in its vocab: {lost[:10]!r}"
            )
        return ids

    def token_repr(self, i: int) -> str:
        """A readable rendering of one token (for demos and audits)."""
        b = self.token_bytes.get(int(i))
        if b is None:
            return f"<id {i}>"
        return b.decode("utf-8", errors="backslashreplace")


# A SentencePiece byte-fallback piece ("<0x0A>") and the byte it stands for.
BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenPrinter:
    """Readable tokens and decoded bytes of ids for any student tokenizer (demos,
    audits): byte-level BPEs through `ByteLevelBPE`; others (SentencePiece-style pieces
    with ``▁`` for a space and ``<0xNN>`` byte-fallback pieces) from the piece strings."""

    def __init__(self, tokenizer: Tokenizer, name: str = "student") -> None:
        self.tokenizer = tokenizer
        self.fingerprint = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
        try:
            self.byte_level: ByteLevelBPE | None = ByteLevelBPE(tokenizer, name)
        except TokenizerError:
            self.byte_level = None

    def token_bytes(self, i: int) -> bytes | None:
        if self.byte_level is not None:
            return self.byte_level.token_bytes.get(int(i))
        piece = self.tokenizer.id_to_token(int(i))
        if piece is None:
            return None
        byte = BYTE_FALLBACK_PIECE.fullmatch(piece)
        if byte:
            return bytes((int(byte[1], 16),))
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_repr(self, i: int) -> str:
        """A readable rendering of one token."""
        b = self.token_bytes(i)
        if b is None:
            return f"<id {i}>"
        return b.decode("utf-8", errors="backslashreplace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes the ids stand for (an id without bytes shows as ``<id N>``)."""
        return b"".join(self.token_bytes(i) or f"<id {i}>".encode() for i in ids)


# ------------------------------------------------------------------------------------
# Loading


def load_tokenizer(source: Any, **kwargs: Any) -> Tokenizer:
    """Return a `tokenizers.Tokenizer` from any of the usual sources.

    ``source`` may be a `tokenizers.Tokenizer`, a transformers fast tokenizer, a
    `ByteLevelBPE`, a path to tokenizer.json, a local HF directory (tokenizer.json, or
    vocab.json + merges.txt with ``pattern``/``normalizer`` keyword arguments), or a
    hub id resolved by transformers (offline when ``HF_HUB_OFFLINE=1``).
    """
    if isinstance(source, Tokenizer):
        return source
    if isinstance(source, ByteLevelBPE):
        return source.tokenizer
    backend = getattr(source, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            return Tokenizer.from_file(str(path))
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return Tokenizer.from_file(str(path / "tokenizer.json"))
            if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return byte_level_bpe_from_files(path / "vocab.json", path / "merges.txt", **kwargs)
            raise TokenizerError(f"{path}: no tokenizer.json nor vocab.json + merges.txt")
        from pipeline.assets import hub_problem, model_source_problem

        problem = model_source_problem(source, "tokenizer")
        if problem:
            raise TokenizerError(problem)
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(source), **kwargs)
        except (OSError, ValueError) as err:
            raise TokenizerError(hub_problem(str(source), "tokenizer", err)) from err
        backend = getattr(tok, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise TokenizerError(
                f"{source}: transformers returned a slow tokenizer; a fast one is needed"
            )
        return backend
    raise TokenizerError(f"cannot load a tokenizer from {type(source).__name__}")


def byte_level_bpe_from_files(
    vocab_path: str | os.PathLike[str],
    merges_path: str | os.PathLike[str],
    pattern: str = QWEN2_PATTERN,
    normalizer: str | None = "NFC",
    added_tokens: Sequence[str] = (),
) -> Tokenizer:
    """Build a byte-level BPE tokenizer from vocab.json + merges.txt.

    ``pattern`` is the pre-tokenizer regex (default: Qwen2's), applied by a Split step
    followed by ByteLevel without its own regex, as Qwen2's tokenizer.json does.
    ``added_tokens`` are appended as special tokens after the vocab.
    """
    vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
    merges: list[tuple[str, str]] = []
    for line in lines:
        if line and not line.startswith("#version"):
            a, b = line.split(" ", 1)
            merges.append((a, b))
    return build_byte_level_bpe(
        vocab, merges, pattern=pattern, normalizer=normalizer, added_tokens=added_tokens
    )


def build_byte_level_bpe(
    vocab: dict[str, int],
    merges: Sequence[tuple[str, str]],
    pattern: str | None = QWEN2_PATTERN,
    normalizer: str | None = None,
    added_tokens: Sequence[str] = (),
) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from its parts.

    ``pattern=None`` uses ByteLevel's built-in GPT-2 regex.
    """
    tok = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False))
    if normalizer == "NFC":
        tok.normalizer = normalizers.NFC()
    elif normalizer is not None:
        raise TokenizerError(f"unsupported normalizer {normalizer!r}")
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    if added_tokens:
        tok.add_special_tokens(list(added_tokens))
    return tok


def truncate_merges(tokenizer: Any, n_merges: int) -> Tokenizer:
    """The student made by keeping the first ``n_merges`` merges of a byte-level BPE.

    Its vocab is the teacher's base symbols plus the first ``n_merges`` merge
    products, with ids renumbered densely in the teacher's id order, and the added
    tokens re-appended after them (as in ``../shared/data/qwen2-subsets``).
    """
    src = ByteLevelBPE(load_tokenizer(tokenizer), "teacher")
    if not 0 <= n_merges <= len(src.merges):
        raise TokenizerError(f"n_merges={n_merges} outside 0..{len(src.merges)}")
    products = {a + b for a, b in src.merges}
    keep_strs = {s for s in src.vocab if s not in products and src.vocab[s] not in src.added_ids}
    keep_strs |= {a + b for a, b in src.merges[:n_merges]}
    ordered = sorted(keep_strs, key=lambda s: src.vocab[s])
    vocab = {s: i for i, s in enumerate(ordered)}
    spec = json.loads(src.tokenizer.to_str())
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [[a, b] for a, b in src.merges[:n_merges]]
    n = len(vocab)
    added = []
    for k, a in enumerate(sorted(spec.get("added_tokens", []), key=lambda a: a["id"])):
        a = dict(a)
        a["id"] = n + k
        added.append(a)
    spec["added_tokens"] = added
    # Template post-processors may name special ids; specials moved, so drop them.
    if spec.get("post_processor") and spec["post_processor"].get("type") == "TemplateProcessing":
        pp = spec["post_processor"]
        for st in pp.get("special_tokens", {}).values():
            st["ids"] = [n + [x["content"] for x in added].index(t) for t in st.get("tokens", [])]
    return Tokenizer.from_str(json.dumps(spec))
