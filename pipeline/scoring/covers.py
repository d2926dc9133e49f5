r"""The subset scorer's tokenizer phase for one plain text segment: for every student
position, the valid exact teacher covers of the text before it.

A cover is the canonical teacher encoding up to the last pre-token boundary that no
continuation can move, followed by the teacher encoding of the rest of the prefix under
each continuation that could change its split: trailing whitespace (regex look-ahead
``\s+(?!\S)``), an apostrophe that a contraction may still complete, or a student token
that ends inside a UTF-8 character. See ``pipeline/scoring/README.md``.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any

from pipeline.scoring.unicode import completion_representatives
from pipeline.tokenization import UnscorableTokenizationError, to_byte_level

# Characters appended to a text that ends in whitespace to find the alternative exact
# cover that regex look-ahead (`\s+(?!\S)`) creates: a digit does not absorb a preceding
# space in Qwen/Llama-3 regexes, a letter and punctuation do in GPT-2's; a newline
# joins whitespace runs. Together they cover every class the regexes distinguish.
DEFAULT_PROBES: tuple[str, ...] = ("", "1", "a", ".", "\n", "'")
# GPT-2/Qwen2 contractions (Qwen2 matches them case-insensitively): an apostrophe's
# pre-token depends on up to CONTRACTION_REACH characters after it ("x'l" -> x ' l in
# GPT-2, but "x'll" -> x 'll), so boundaries that close such a character are not fixed.
CONTRACTIONS: tuple[str, ...] = ("s", "t", "re", "ve", "m", "ll", "d")
CONTRACTION_REACH = 3


def _closed_before(text: str, end: int) -> bool:
    """Whether no continuation of ``text`` past character ``end`` (>= 1) can move the
    pre-token boundaries before it: the character before is not whitespace (regex
    look-ahead) and no contraction starting before it may reach past it."""
    return (
        not text[end - 1].isspace() and "'" not in text[max(0, end - CONTRACTION_REACH + 1) : end]
    )


def _contraction_completions(w: str) -> list[str]:
    """Continuations of ``w`` that complete a contraction started in its last
    characters (every letter case: Qwen2 matches them case-insensitively)."""
    out: list[str] = []
    for j in range(max(0, len(w) - CONTRACTION_REACH + 1), len(w)):
        if w[j] != "'":
            continue
        u = w[j + 1 :].lower()
        for con in CONTRACTIONS:
            if len(con) > len(u) and con.startswith(u):
                rest = con[len(u) :]
                out.extend(
                    "".join(cs) for cs in itertools.product(*((ch, ch.upper()) for ch in rest))
                )
    return out


class Segment:
    """One plain text segment (between added tokens) and its exact covers."""

    def __init__(self, scorer: Any, text: str, teacher_ids: list[int], student_ids: list[int]):
        self.sc = scorer
        self.text = text
        self.bytes = text.encode("utf-8")
        T = scorer.T
        pieces = T.pretokenize(text)
        if "".join(pieces) != to_byte_level(self.bytes):
            raise UnscorableTokenizationError(
                "the teacher's pre-tokenizer does not cover the text byte for byte"
            )
        self.piece_starts = [0]
        for p in pieces:
            self.piece_starts.append(self.piece_starts[-1] + len(p))
        self.char_at_byte: dict[int, int] = {}
        off = 0
        for ci, ch in enumerate(text):
            self.char_at_byte[off] = ci
            off += len(ch.encode("utf-8"))
        self.char_at_byte[off] = len(text)
        self.teacher_ids = teacher_ids
        self.t_at_byte: dict[int, int] = {}
        off = 0
        for k, t in enumerate(teacher_ids):
            self.t_at_byte[off] = k
            off += len(T.token_bytes[t])
        self.t_at_byte[off] = len(teacher_ids)
        self.student_ids = student_ids
        self.s_end: list[int] = [0]  # byte offset after k student tokens
        for s in student_ids:
            self.s_end.append(self.s_end[-1] + len(scorer.S.token_bytes[s]))
        self.s_at_byte = {b: k for k, b in enumerate(self.s_end)}

    def _window_start(self, c: int) -> int:
        """Start of the text whose teacher encoding can still change: a pre-token start
        at or before the pre-token holding byte c-1, not preceded by whitespace (regex
        look-ahead after whitespace can move earlier boundaries) nor by an apostrophe
        in its last two characters (a contraction reaching past the start)."""
        p = bisect.bisect_right(self.piece_starts, c - 1) - 1
        b = self.piece_starts[p]
        while p > 0 and not _closed_before(self.text, self.char_at_byte[b]):
            p -= 1
            b = self.piece_starts[p]
        return b

    def _probe_texts(self, c: int, b: int) -> list[tuple[str, bool]]:
        """Continuations of the window text[b:c] to encode, each flagged True when it is
        the prefix itself as a complete text."""
        text = self.text
        cb = self.char_at_byte[b]
        ce = self.char_at_byte.get(c)
        probes = self.sc.probes
        if ce is not None:
            w = text[cb:ce]
            if _closed_before(text, ce):
                return [(w, True)]
            nxt = text[ce] if ce < len(text) else ""
            zs = ("", *probes, nxt, *_contraction_completions(w))
            return [(w + z, z == "") for z in dict.fromkeys(zs)]
        # c falls inside a multi-byte character: complete it every way that can change
        # the pre-token split (one character per regex class), then probe as above.
        ci = max(k for k in (self.char_at_byte.get(x) for x in range(c - 3, c)) if k is not None)
        cs = next(x for x in range(c - 3, c) if self.char_at_byte.get(x) == ci)
        partial = self.bytes[cs:c]
        actual = text[ci]
        nxt = text[ci + 1] if ci + 1 < len(text) else ""
        out: list[tuple[str, bool]] = []
        for comp in dict.fromkeys((actual, *completion_representatives(partial))):
            base = text[cb:ci] + comp
            if comp.isspace():
                zs = (*probes, nxt) if comp == actual else probes
                out.extend((base + z, False) for z in dict.fromkeys(zs))
            else:
                out.append((base, False))
        return out

    def exact_covers(self, k: int) -> list[tuple[int, tuple[int, ...], bool]]:
        """Valid exact covers of the first k student tokens of this segment, as
        (teacher tokens of the canonical encoding kept, branch suffix, is the
        encoding of the prefix as a complete text)."""
        c = self.s_end[k]
        ce = self.char_at_byte.get(c)
        if ce is not None and c in self.t_at_byte and _closed_before(self.text, ce):
            return [(self.t_at_byte[c], (), True)]  # R3: the canonical prefix is the only one
        b = self._window_start(c)
        m_b = self.t_at_byte[b]
        i_b = self.s_at_byte[b]
        want = self.student_ids[i_b:k]
        T = self.sc.T
        seen: dict[tuple[int, ...], bool] = {}
        for probe, whole in self._probe_texts(c, b):
            ids = T.encode_plain(probe)
            acc, target = 0, c - b
            n = 0
            while n < len(ids) and acc < target:
                acc += len(T.token_bytes[ids[n]])
                n += 1
            if acc == target:
                suf = tuple(ids[:n])
                seen[suf] = seen.get(suf, False) or whole
        return [(m_b, suf, whole) for suf, whole in seen.items() if self.sc._decompose(suf) == want]
