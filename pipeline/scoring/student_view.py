"""An arbitrary student tokenizer as the general scorer sees it (`StudentView`): the
encoding of complete texts, the stable tokens of a text prefix (the decision rule: which
pre-token boundaries no continuation can move, per pre-tokenizer; documented with the
scorer in `pipeline.scoring.general`), the byte prefixes a token prefix stands for, and
what the job and the audit read of a student (`pipeline.scoring.protocol.StudentView`).
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from pipeline.scoring.unicode import completion_representatives
from pipeline.tokenization import (
    BYTE_FALLBACK_PIECE,
    DOC_END_TOKENS,
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    TokenizerError,
    UnscorableTextError,
    unicode_to_bytes,
)

# Pre-tokenizer regexes whose stable boundaries `StudentView` knows (see `pipeline.scoring.general`).
KNOWN_PATTERNS = {GPT2_PATTERN: "gpt2", QWEN2_PATTERN: "qwen2", LLAMA3_PATTERN: "llama3"}
REGEX_LOOKAHEAD = 2  # characters after a boundary the regex matcher may read (contractions)


def _utf8_split(y: bytes) -> tuple[str, bytes] | None:
    """``(decoded text, trailing partial character)`` of ``y``, or None when no
    continuation makes ``y`` valid UTF-8."""
    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        text = dec.decode(y, final=False)
    except UnicodeDecodeError:
        return None
    partial = dec.getstate()[0]
    if partial and not completion_representatives(partial):
        return None  # e.g. a surrogate or > U+10FFFF: no character completes it
    return text, partial


def _flatten(component: Any, key: str) -> list[dict[str, Any]]:
    if component is None:
        return []
    if component.get("type") == "Sequence":
        out: list[dict[str, Any]] = []
        for c in component.get(key, []):
            out.extend(_flatten(c, key))
        return out
    return [component]


def _spaces_only_lead(vocab: dict[str, int], spaces: tuple[str, ...]) -> bool:
    """Whether every token's spaces form a prefix of it (no token holds a space after
    another character): then no BPE merge joins a character to a following space, so a
    text splits before each space run into pieces BPE encodes independently."""
    lead = "".join(spaces)
    return not any(c in s.lstrip(lead) for s in vocab for c in spaces)


class StudentView:
    """An arbitrary student tokenizer as the general scorer sees it: encodings of
    complete texts, stable tokens of a text prefix (the decision rule, see
    `pipeline.scoring.general`), and the byte prefixes a token prefix stands for.

    Supported: BPE models (byte-level or with ``▁`` and ``byte_fallback``), normalizers
    NFC / Prepend / Replace(" " -> replacement), pre-tokenizers none, ByteLevel,
    Split(regex) + ByteLevel, Metaspace, and Gemma's Split(" ") after a Replace(" ", "▁")
    normalizer (which leaves it nothing to split). Anything else raises `TokenizerError`. For a
    ``▁`` student a literal "▁" in a text cannot be told from a space: such documents
    are refused, and branches that contain one stay undecided until end of text.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token: str, name: str = "student") -> None:
        """``eos_token``: content of the student's end-of-text token; when the student
        has no such added token, the first of ``DOC_END_TOKENS`` it has."""
        self.tokenizer = tokenizer
        self.name = name
        spec = json.loads(tokenizer.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"{name}: model type {model.get('type')!r} is not BPE")
        vocab: dict[str, int] = dict(model.get("vocab") or {})
        if not vocab:
            raise TokenizerError(f"{name}: empty vocabulary")
        for opt in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(opt):
                raise TokenizerError(f"{name}: BPE option {opt}={model.get(opt)!r} unsupported")
        added = {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
        if eos_token not in added:
            # the student's own end of text carries the teacher's end-of-text mass
            eos_token = next((c for c in DOC_END_TOKENS if c in added), eos_token)
        if eos_token not in added:
            raise TokenizerError(
                f"{name} has no added token {eos_token!r} (nor any of {DOC_END_TOKENS}) to "
                "carry the end-of-text mass; pass student_eos_token="
            )
        self.eos_token = eos_token
        self.eos_id = added[eos_token]
        self.added_contents = tuple(added)
        self.added_by_content: dict[str, int] = added
        self.added_ids = set(added.values())
        self._added_content = {i: c for c, i in added.items()}
        self.size = tokenizer.get_vocab_size(with_added_tokens=True)

        self.nfc = False
        self.space_char: str | None = None
        prepend: str | None = None
        for n in _flatten(spec.get("normalizer"), "normalizers"):
            kind = n.get("type")
            if kind == "NFC":
                self.nfc = True
            elif kind == "Prepend":
                prepend = n["prepend"]
            elif kind == "Replace" and n.get("pattern") == {"String": " "}:
                self.space_char = n["content"]
            else:
                raise TokenizerError(f"{name}: normalizer {n!r} is not supported")

        pres = _flatten(spec.get("pre_tokenizer"), "pretokenizers")
        if (
            self.space_char
            and [p.get("type") for p in pres] == ["Split"]
            and (pres[0].get("pattern") or {}).get("String") == " "
            and not pres[0].get("invert")
        ):
            # Gemma's layout: Replace(" ", "▁") leaves no " " for this Split to match
            pres = []
        kinds = [p.get("type") for p in pres]
        self.byte_level = "ByteLevel" in kinds
        self.rule = "none"
        self.regex = ""  # name of the known regex (KNOWN_PATTERNS) when rule == "regex"
        self.prefix_mode = "prepend" if prepend else "none"
        for p in pres:
            if p.get("type") == "ByteLevel" and p.get("add_prefix_space"):
                raise TokenizerError(f"{name}: ByteLevel add_prefix_space=True is unsupported")
        if kinds == ["ByteLevel"]:
            self.rule = "regex" if pres[0].get("use_regex", True) else "none"
            self.regex = "gpt2"
        elif kinds == ["Split", "ByteLevel"]:
            split, bl = pres
            if split.get("behavior") != "Isolated" or split.get("invert") or bl.get("use_regex"):
                raise TokenizerError(f"{name}: unsupported Split pre-tokenizer {split!r}")
            pattern = (split.get("pattern") or {}).get("Regex")
            self.rule = "regex" if pattern in KNOWN_PATTERNS else "none"
            self.regex = KNOWN_PATTERNS.get(pattern or "", "")
        elif kinds == ["Metaspace"]:
            meta = pres[0]
            self.space_char = meta["replacement"]
            scheme = meta.get("prepend_scheme") or (
                "always" if meta.get("add_prefix_space") else "never"
            )
            if scheme != "never":
                if prepend:
                    raise TokenizerError(f"{name}: Prepend normalizer and Metaspace prefix")
                self.prefix_mode = "metaspace"
                prepend = meta["replacement"]
            self.rule = "metaspace" if meta.get("split", True) else "none"
        elif kinds:
            raise TokenizerError(f"{name}: pre-tokenizer {kinds} is not supported")
        if self.rule == "none" and self.byte_level and not model.get("merges"):
            self.rule = "every-char"
        if (
            self.rule == "none"
            and kinds in ([], ["Metaspace"])
            and self.space_char in vocab  # else an unknown space may fuse with an unknown
            and _spaces_only_lead(vocab, (" ", self.space_char))
        ):
            self.rule = "word-start"
        self.lookahead = REGEX_LOOKAHEAD if self.rule == "regex" else 0

        # The bytes each token stands for (None: no byte form, e.g. specials, unk).
        self.token_bytes: dict[int, bytes | None] = {}
        inv = unicode_to_bytes()
        fallback = bool(model.get("byte_fallback"))
        for s, i in vocab.items():
            if self.byte_level:
                try:
                    self.token_bytes[i] = bytes(inv[c] for c in s)
                except KeyError as err:
                    raise TokenizerError(f"{name}: token {s!r} is not byte-level") from err
            elif fallback and BYTE_FALLBACK_PIECE.fullmatch(s):
                self.token_bytes[i] = bytes((int(s[3:5], 16),))
            else:
                t = s.replace(self.space_char, " ") if self.space_char else s
                self.token_bytes[i] = t.encode("utf-8")
        for i in [*added.values(), vocab.get(model.get("unk_token") or "", -1)]:
            self.token_bytes[i] = None
        self.prefix_bytes = b""
        if prepend:
            self.prefix_bytes = (
                prepend.replace(self.space_char, " ") if self.space_char else prepend
            ).encode("utf-8")
        self.clear_cache()

    def clear_cache(self) -> None:
        self._enc: dict[str, tuple[int, ...]] = {}
        self._stable: dict[bytes, tuple[int, tuple[int, ...]]] = {}

    # ----- what the job and the audit read (`pipeline.scoring.protocol.StudentView`)
    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer's JSON (provenance ``student_tokenizer_sha256``)."""
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes of a text whose encoding is ``ids``: the tokens' bytes, less the
        prefix the student puts before a text (a Prepend normalizer, a Metaspace prefix;
        Metaspace puts none before a text that starts with a space, so " a" and "a" have
        the same ids: the text without the prefix is taken when it encodes to ``ids``).
        `UnscorableTextError` for a token without bytes."""
        d = b"".join(self.bytes_of(int(t)) for t in ids)
        if self.prefix_mode == "none" or not d.startswith(self.prefix_bytes):
            return d
        rest = d[len(self.prefix_bytes) :]
        if self.prefix_mode == "metaspace":
            try:
                if self.encode(rest.decode("utf-8")) != tuple(int(t) for t in ids):
                    return d
            except UnicodeDecodeError:
                return d
        return rest

    def token_repr(self, i: int) -> str:
        """A readable rendering of one token (``<id N>`` for one without bytes)."""
        try:
            b = self.bytes_of(int(i))
        except UnscorableTextError:
            return f"<id {i}>"
        return b.decode("utf-8", errors="backslashreplace")

    def row_offsets(self, text: str, ids: Sequence[int]) -> np.ndarray:
        """The tokenizer's own start offsets (characters) of the tokens, then ``len(text)``."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        if list(enc.ids) != [int(t) for t in ids]:
            raise AssertionError("student encoding changed between scoring and masking")
        return np.asarray([o[0] for o in enc.offsets] + [len(text)], dtype=np.int64)

    @property
    def decision_rule(self) -> str:
        return self.rule + ("+nfc" if self.nfc else "")

    def encode(self, text: str) -> tuple[int, ...]:
        """Student ids of a complete text."""
        ids = self._enc.get(text)
        if ids is None:
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False).ids)
            self._enc[text] = ids
        return ids

    def bytes_of(self, token: int) -> bytes:
        """The bytes a token stands for in a text: its byte form, or an added token's
        content (`UnscorableTextError` for a token with neither, e.g. unknown)."""
        if token in self.added_ids:
            return self._added_content[token].encode("utf-8")
        got = self.token_bytes.get(int(token))
        if got is None:
            raise UnscorableTextError(f"{self.name} token {token} has no byte form")
        return got

    def roots(self, prefix_ids: Sequence[int]) -> list[bytes]:
        """Byte prefixes such that every text whose encoding starts with ``prefix_ids``
        starts with exactly one of them (none is a prefix of another)."""
        if not prefix_ids:
            return [b""]
        parts = [self.token_bytes.get(int(t)) for t in prefix_ids]
        if any(p is None for p in parts):
            raise UnscorableTextError(
                f"{self.name} encoding has a token without a byte form (special or unknown)"
            )
        d = b"".join(p for p in parts if p is not None)
        if self.prefix_mode == "none":
            return [d]
        if not d.startswith(self.prefix_bytes):
            raise TokenizerError(f"{self.name}: encoding does not start with its prefix {d!r}")
        rest = d[len(self.prefix_bytes) :]
        if self.prefix_mode == "prepend":  # every non-empty text gets the prefix
            return [rest]
        # Metaspace prepends "▁" only to texts that do not start with one: a text
        # starting with a space stands for itself, any other text t for " " + t.
        if not rest:
            return [b""]
        if rest.startswith(b" "):
            return [d]
        return [d, rest]

    def stable_tokens(self, y: bytes) -> tuple[int, ...]:
        """Tokens that the encoding of every complete text starting with ``y`` starts with."""
        return self.stable_split(y)[1]

    def stable_split(self, y: bytes) -> tuple[int, tuple[int, ...]]:
        """``(byte offset q, tokens)``: the last stable boundary of ``y`` and the stable
        tokens, the encoding of ``y[:q]`` (``(0, ())`` when there is none)."""
        got = self._stable.get(y)
        if got is None:
            got = self._stable_split(y)
            self._stable[y] = got
        return got

    def local_offset(self, y: bytes) -> tuple[int, int]:
        """``(byte offset q, token count n)`` such that for every text ``t`` starting
        with ``y`` the encoding of ``t`` is the stable tokens of ``y`` (``n`` of them,
        the encoding of ``y[:q]``) followed by the encoding of ``t[q:]`` encoded alone.
        Decisions on continuations of ``y`` can then be made on ``t[q:]`` only.

        At a stable boundary the pieces after it are the pre-tokenization of the rest
        (no regex here looks behind; Metaspace splits before every space and adds no
        prefix to a text starting with one). Not with a Prepend normalizer (it would
        prefix the rest too): ``(0, 0)`` there."""
        if self.prefix_mode == "prepend":
            return 0, 0
        q, toks = self.stable_split(y)
        return q, len(toks)

    def _stable_split(self, y: bytes) -> tuple[int, tuple[int, ...]]:
        split = _utf8_split(y)
        if split is None or self.rule == "none":
            return 0, ()
        s = split[0]
        if not s or (self.nfc and not unicodedata.is_normalized("NFC", s)):
            return 0, ()
        q = self._boundary(s)
        if q == 0:
            return 0, ()
        qb = len(s[:q].encode("utf-8"))
        # the tokens before a stable boundary are those of the text before it
        ids = self.encode(s[:q])
        parts = [self.token_bytes.get(t) for t in ids]
        if any(p is None for p in parts):
            return 0, ()
        got = sum(len(p) for p in parts if p is not None)
        if got - qb not in (0, len(self.prefix_bytes)):
            return 0, ()  # e.g. a literal "▁" in the text: no byte accounting, stay undecided
        return qb, ids

    def _closed_digits(self, piece: str) -> bool:
        """Whether the regex piece ``piece`` (ASCII digits) ends where it is whatever
        follows: Qwen2 splits digits one by one, Llama-3 in groups of at most three."""
        if not piece.isascii() or not piece.isdigit():
            return False
        return (self.regex == "qwen2" and len(piece) == 1) or (
            self.regex == "llama3" and len(piece) == 3
        )

    def _boundary(self, s: str) -> int:
        """Largest stable boundary (character index) of the text prefix ``s``; 0 if none."""
        n = len(s)
        if self.rule == "every-char":
            cands: Iterable[int] = range(n, 0, -1)
        elif self.rule == "metaspace":
            cands = (q for q in range(n - 1, 0, -1) if s[q] in (" ", self.space_char))
        elif self.rule == "word-start":
            sp = (" ", self.space_char)
            cands = (q for q in range(n - 1, 0, -1) if s[q] in sp and s[q - 1] not in sp)
        else:  # regex
            pieces = self.tokenizer.pre_tokenizer.pre_tokenize_str(s)
            char_at_byte = {}
            off = 0
            for ci, ch in enumerate(s):
                char_at_byte[off] = ci
                off += len(ch.encode("utf-8"))
            starts = []
            off = 0
            for piece, _ in pieces:
                starts.append(char_at_byte.get(off, -1))
                off += len(piece)  # byte-level pieces: one character per byte
            if off != len(s.encode("utf-8")):
                raise TokenizerError(f"{self.name}: pre-tokens do not cover {s!r}")
            if starts and self._closed_digits(s[starts[-1] :]) and "'" not in s[max(0, n - 3) : n]:
                # the last piece is closed whatever follows, and no NFC composition
                # starts with an ASCII digit: the end of the text is stable
                return n
            for q in reversed(starts):
                if q < 1 or s[q - 1].isspace():
                    continue
                # characters after q the matcher reads to close the pieces before q:
                # one (the character that ends a class run), two when a contraction may
                # start among the last three characters before q
                need = REGEX_LOOKAHEAD if "'" in s[max(0, q - 3) : q] else 1
                if q + need > n:
                    continue
                if not self.nfc or any(ord(c) < 128 for c in s[q + need :]):
                    return q
            return 0
        for q in cands:
            if not self.nfc or any(ord(c) < 128 for c in s[q + self.lookahead :]):
                return q
        return 0
