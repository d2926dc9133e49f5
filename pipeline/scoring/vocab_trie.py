"""The teacher's vocabulary as a byte trie over one sorted array.

Tokens sorted by their bytes put every byte prefix's tokens in one contiguous range, so
the mass of all tokens starting with ``beta`` is a difference of a cumulative sum of the
probabilities in that order (`VocabTrie.cumulative`), and the trie is walked with
bisections, without building nodes. The general scorer's token walk uses it to decide
all next teacher tokens of a branch at once.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping

import numpy as np
import torch


def _successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``prefix``
    (None: there is none, ``prefix`` is all 0xFF)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes((stripped[-1] + 1,))


class VocabTrie:
    """Tokens with a byte form, sorted by bytes (empty byte strings are left out).

    Args:
        token_bytes: id -> bytes of every token the trie should hold.
    """

    def __init__(self, token_bytes: Mapping[int, bytes]) -> None:
        items = sorted((b, i) for i, b in token_bytes.items() if b)
        self.keys: list[bytes] = [b for b, _ in items]
        self.perm = np.asarray([i for _, i in items], dtype=np.int64)
        self.exact: dict[bytes, list[int]] = {}
        for b, i in items:
            self.exact.setdefault(b, []).append(i)
        self._kids: dict[bytes, tuple[list[bytes], np.ndarray, np.ndarray]] = {}
        self._perm: dict[torch.device, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def cumulative(self, probs: torch.Tensor) -> torch.Tensor:
        """``[..., len + 1]`` cumulative sums of ``probs[..., ids]`` in trie order, with a
        leading 0, on the device of ``probs`` (a teacher's GPU does this work): the mass
        of range ``[lo, hi)`` is ``cum[hi] - cum[lo]``."""
        perm = self._perm.get(probs.device)
        if perm is None:
            perm = self._perm[probs.device] = torch.as_tensor(self.perm, device=probs.device)
        sums = torch.cumsum(probs.index_select(-1, perm), dim=-1)
        return torch.cat([sums.new_zeros((*sums.shape[:-1], 1)), sums], dim=-1)

    def range(self, prefix: bytes, lo: int = 0, hi: int | None = None) -> tuple[int, int]:
        """``[lo, hi)``: the tokens whose bytes start with ``prefix`` (within the given
        range, which must hold them all)."""
        hi = len(self.keys) if hi is None else hi
        start = bisect.bisect_left(self.keys, prefix, lo, hi)
        succ = _successor(prefix)
        end = hi if succ is None else bisect.bisect_left(self.keys, succ, start, hi)
        return start, end

    def children(self, prefix: bytes, lo: int, hi: int) -> Iterator[tuple[bytes, int, int]]:
        """``(prefix + one byte, lo, hi)`` for every byte that some token in the range
        ``[lo, hi)`` of ``prefix`` has next, in byte order."""
        n = len(prefix)
        j = lo
        while j < hi and len(self.keys[j]) == n:  # the token(s) equal to the prefix
            j += 1
        while j < hi:
            child = self.keys[j][: n + 1]
            succ = _successor(child)
            end = hi if succ is None else bisect.bisect_left(self.keys, succ, j, hi)
            yield child, j, end
            j = end

    def kids(self, prefix: bytes) -> tuple[list[bytes], np.ndarray, np.ndarray]:
        """`children` of ``prefix`` as (child prefixes, their ``lo``, their ``hi``),
        memoized: walks visit the same few prefixes again and again."""
        got = self._kids.get(prefix)
        if got is None:
            lo, hi = self.range(prefix)
            ch = list(self.children(prefix, lo, hi))
            got = (
                [c for c, _, _ in ch],
                np.asarray([a for _, a, _ in ch], dtype=np.int64),
                np.asarray([b for _, _, b in ch], dtype=np.int64),
            )
            self._kids[prefix] = got
        return got
