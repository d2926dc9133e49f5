"""`VocabTrie` against brute force: ranges, children and subtree sums of every prefix."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.scoring.vocab_trie import VocabTrie, _successor


def _random_vocab(rng: np.random.Generator, n: int) -> dict[int, bytes]:
    alphabet = [0x00, 0x41, 0x61, 0x62, 0xC3, 0xFE, 0xFF]
    vocab: dict[int, bytes] = {}
    while len(vocab) < n:
        b = bytes(rng.choice(alphabet, size=int(rng.integers(1, 5))).tolist())
        if b not in vocab.values():
            vocab[len(vocab) * 3 + 1] = b  # ids are not positions
    return vocab


def test_successor():
    assert _successor(b"ab") == b"ac"
    assert _successor(b"a\xff") == b"b"
    assert _successor(b"\xff\xff") is None
    assert _successor(b"") is None


def test_ranges_children_and_sums_match_brute_force():
    rng = np.random.default_rng(0)
    vocab = _random_vocab(rng, 120)
    vocab[1000] = b""  # no byte form: left out
    trie = VocabTrie(vocab)
    assert len(trie) == 120
    size = max(vocab) + 1
    probs = rng.random((3, size))
    cum = trie.cumulative(torch.as_tensor(probs)).numpy()
    prefixes = {b[:j] for b in vocab.values() for j in range(len(b) + 1)} | {b"\x62\x62\x62"}
    for prefix in sorted(prefixes):
        lo, hi = trie.range(prefix)
        ids = sorted(int(i) for i in trie.perm[lo:hi])
        want = sorted(i for i, b in vocab.items() if b and b.startswith(prefix))
        assert ids == want, prefix
        np.testing.assert_allclose(cum[:, hi] - cum[:, lo], probs[:, want].sum(1), atol=1e-12)
        kids = list(trie.children(prefix, lo, hi))
        want_kids = sorted(
            {b[: len(prefix) + 1] for i, b in vocab.items() if i in want and b != prefix}
        )
        assert [c for c, _, _ in kids] == want_kids
        for child, clo, chi in kids:
            assert (clo, chi) == trie.range(child)
        assert trie.exact.get(prefix, []) == [i for i, b in vocab.items() if b == prefix and b]
