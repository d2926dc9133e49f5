"""Unicode facts the scorers need when a student token ends inside a UTF-8 character."""

from __future__ import annotations

import functools
import unicodedata

import numpy as np

# The regexes of byte-level BPE pre-tokenizers only distinguish these classes of
# non-ASCII characters (every multi-byte character is non-ASCII).
_CLASSES = ("letter", "number", "space", "other")


def char_of_bytes(text: str) -> np.ndarray:
    """[len(text.encode()) + 1] int64: the index of the character holding each UTF-8 byte
    of ``text`` (a continuation byte belongs to the character it continues), then
    ``len(text)`` for the end."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    starts = (raw & 0xC0) != 0x80
    return np.append(np.cumsum(starts, dtype=np.int64) - 1, len(text))


def char_class(ch: str) -> str:
    if ch.isspace():
        return "space"
    cat = unicodedata.category(ch)
    if cat.startswith("L"):
        return "letter"
    if cat.startswith("N"):
        return "number"
    return "other"


def _codepoint_range(partial: bytes) -> tuple[int, int] | None:
    """Code points whose UTF-8 encoding starts with ``partial`` (a proper prefix)."""
    if not partial:
        return None
    lead = partial[0]
    if lead >= 0xF8 or 0x80 <= lead < 0xC2:
        return None
    if lead >= 0xF0:
        n, value, low = 4, lead & 0x07, 0x10000
    elif lead >= 0xE0:
        n, value, low = 3, lead & 0x0F, 0x800
    elif lead >= 0xC0:
        n, value, low = 2, lead & 0x1F, 0x80
    else:
        return None
    if len(partial) >= n:
        return None
    for b in partial[1:]:
        if b & 0xC0 != 0x80:
            return None
        value = (value << 6) | (b & 0x3F)
    rem = n - len(partial)
    lo = max(value << (6 * rem), low)
    hi = min(((value + 1) << (6 * rem)) - 1, 0x10FFFF)
    return (lo, hi) if lo <= hi else None


@functools.lru_cache(maxsize=8192)
def completion_representatives(partial: bytes) -> tuple[str, ...]:
    """One character of each regex class whose UTF-8 encoding starts with ``partial``.

    Used to enumerate the pre-token groupings a text ending in the middle of a
    character can continue into (a letter joins a preceding word, a space does not).
    """
    rng = _codepoint_range(partial)
    if rng is None:
        return ()
    found: dict[str, str] = {}
    for cp in range(rng[0], rng[1] + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        ch = chr(cp)
        cls = char_class(ch)
        if cls not in found:
            found[cls] = ch
            if len(found) == len(_CLASSES):
                break
    return tuple(found[c] for c in _CLASSES if c in found)
