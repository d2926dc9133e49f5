"""Aligning stored teacher targets to an arbitrary student tokenizer (trainer side).

The job stores, per sequence, the text's UTF-8 bytes and one of two target kinds:

- teacher kind: ``teacher_byte_end`` [m] (byte end offset of each of the teacher's
  canonical tokens, strictly increasing, the last is ``len(text)``) and
  ``teacher_logprob`` [m + 1] (natural-log P(token j | tokens < j); entry ``m`` is the
  teacher's end-of-text token);
- byte kind: rows of next-symbol distributions, row ``r`` for the symbol that starts at
  byte ``byte_row_start[r]`` (a special token such as ``<|im_start|>`` is ONE symbol over
  several bytes; the last row starts at ``len(text)`` and predicts end-of-text), each with
  top-k ``byte_ids`` / ``byte_logprobs``, ``byte_tail`` and ``byte_loss_mask``.

A trainer picks any student tokenizer, tokenizes the text itself and needs targets at its
own positions. This module (numpy + ``tokenizers`` only; no torch, no IO) provides:

- `student_byte_ends`: the student's ids and each token's byte END offset in the text;
- `alm_chunks`: ALM chunk alignment (Approximate Likelihood Matching, Minixhofer et al.
  2025; tokenkit's "unconstrained" alignment) of the teacher kind to the student tokens;
- `byte_windows`: for each student position, the byte rows of the next ``m`` symbols;
- `alm_batch_arrays` / `byte_batch_arrays`: the per-position arrays a trainer feeds its
  loss, for one sequence, with an optional BOS and a truncation length.

Positions. The student model reads ``x = [bos_id] + ids`` (or ``ids`` without a BOS),
truncated to ``length``; the logits at position ``t`` predict ``x[t + 1]``. Position
``t`` therefore predicts the text from byte ``e[t]`` on, where ``e = [0] + byte_end``
with a BOS and ``e = byte_end`` without one.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from pipeline.scoring.student_view import StudentView
from pipeline.tokenization import DOC_END_TOKENS, TokenizerError

IGNORE_INDEX = -100
BYTE_EOS = 256  # the byte kind's end-of-text symbol
# Content of the added token given to a copy of a student that has no added token at
# all (`StudentView` needs one for its end of text; this module never uses it).
_PLACEHOLDER_EOS = "<|xtok-align-placeholder-eos|>"


# ----------------------------------------------------------------- student byte ends
class StudentBytes:
    """The bytes of every token of a student tokenizer, as flat numpy tables, built once
    from `pipeline.scoring.student_view.StudentView` (what it supports is supported here:
    BPE, byte-level or SentencePiece-style with ``▁`` and byte fallback, see there).

    ``token_len[i]``: number of bytes token ``i`` stands for in a text (an added token:
    its content; a byte-fallback piece ``<0xNN>``: one byte; ``▁``: a space), ``-1`` for a
    token without a byte form (unknown). ``prefix``: the bytes the student may put before
    a text (a Prepend normalizer or a Metaspace prefix: ``b" "``; else ``b""``).

    A student with no added token at all gets a placeholder end-of-text token on a private
    copy used only to read token bytes; ids are always those of ``tokenizer`` itself.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token: str | None = None) -> None:
        self.tokenizer = tokenizer
        added = {a.content for a in tokenizer.get_added_tokens_decoder().values()}
        if eos_token is None or eos_token not in added:
            eos_token = next((c for c in DOC_END_TOKENS if c in added), None) or next(
                iter(sorted(added)), None
            )
        view_tok = tokenizer
        if eos_token is None:
            view_tok = Tokenizer.from_str(tokenizer.to_str())
            view_tok.add_special_tokens([_PLACEHOLDER_EOS])
            eos_token = _PLACEHOLDER_EOS
        self.view = StudentView(view_tok, eos_token)
        self.prefix: bytes = self.view.prefix_bytes if self.view.prefix_mode != "none" else b""
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        size = max([self.vocab_size, *(i + 1 for i in self.view.token_bytes)])
        lens = np.full(size, -1, dtype=np.int64)
        pieces: list[bytes] = []
        for i in range(size):
            try:
                b = self.view.bytes_of(i)
            except ValueError:  # no byte form (unknown) or not a token of this view
                pieces.append(b"")
                continue
            lens[i] = len(b)
            pieces.append(b)
        self.token_len = lens
        self.is_added = np.zeros(size, dtype=bool)
        self.is_added[[i for i in self.view.added_ids if i < size]] = True
        self.token_start = np.concatenate([[0], np.cumsum(np.maximum(lens, 0))[:-1]])
        self.buffer = np.frombuffer(b"".join(pieces), dtype=np.uint8)

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """See `student_byte_ends`."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int64)
        raw = text.encode("utf-8")
        data = np.frombuffer(raw, dtype=np.uint8)
        n, L = len(data), len(ids)
        if L == 0:
            if n:
                raise ValueError(f"student encodes a non-empty text ({n} bytes) to no tokens")
            return ids, np.zeros(0, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= len(self.token_len):
            raise ValueError(f"student id outside its vocabulary in {ids.tolist()[:20]}")
        lens = self.token_len[ids]
        bad = np.flatnonzero(lens < 0)
        if len(bad):
            t = int(bad[0])
            raise ValueError(
                f"student token {t} (id {int(ids[t])}) has no byte form (unknown token)"
            )
        eff = lens.copy()  # bytes of the text each token covers
        skip = np.zeros(L, dtype=np.int64)  # leading token bytes not in the text (prefix)
        added = np.flatnonzero(self.is_added[ids])
        # runs of ordinary tokens and the text span each covers: [a, b) <-> [u, v)
        runs: list[tuple[int, int, int, int]] = []
        if len(added) == 0:
            runs.append((0, L, 0, n))
        else:
            # an added token's text span comes from the tokenizer's offsets (exact: added
            # tokens match whole characters); it may hold whitespace it strips (lstrip/rstrip)
            cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            width = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
            byte_of_char = np.concatenate([[0], np.cumsum(width, dtype=np.int64)])
            offs = np.asarray(enc.offsets, dtype=np.int64)[added]
            spans = byte_of_char[offs]
            prev_tok, prev_byte = 0, 0
            for k, i in enumerate(added.tolist()):
                u, v = int(spans[k, 0]), int(spans[k, 1])
                content = self.view.bytes_of(int(ids[i]))
                j = raw.find(content, u, v)
                if j < 0 or raw[u:j].strip() or raw[j + len(content) : v].strip():
                    raise ValueError(
                        f"student added token {i} (id {int(ids[i])}, {content!r}) is not at "
                        f"its offsets: bytes {u}..{v} of the text are {raw[u:v]!r}"
                    )
                eff[i] = v - u
                runs.append((prev_tok, i, prev_byte, u))
                prev_tok, prev_byte = i + 1, v
            runs.append((prev_tok, L, prev_byte, n))
        p = len(self.prefix)
        if p:
            for a, b, u, v in runs:
                if a >= b:
                    continue
                first = int(self.token_start[ids[a]])
                has_prefix = bytes(self.buffer[first : first + p]) == self.prefix
                got = int(lens[a:b].sum())
                # a prefix is put before each run (before the first only, for some
                # tokenizers): the run's length says whether it is there
                if has_prefix and (
                    got == v - u + p
                    or (got != v - u and not raw.startswith(self.prefix, u))  # for the error
                ):
                    skip[a] = p
        eff -= skip
        ends = np.cumsum(eff)
        starts = ends - eff
        # compare the ordinary tokens' bytes with the text, all at once
        plain = np.ones(L, dtype=bool)
        plain[added] = False
        cnt = np.where(plain, eff, 0)
        within = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        src = np.repeat(self.token_start[ids] + skip, cnt) + within
        dst = np.repeat(starts, cnt) + within
        inside = dst < n
        wrong = np.flatnonzero(~inside | (self.buffer[src] != data[np.minimum(dst, n - 1)]))
        pos = -1
        if len(wrong):
            pos = int(dst[wrong[0]])
        elif int(ends[-1]) != n:
            pos = min(int(ends[-1]), n)
        if pos >= 0:
            t = min(int(np.searchsorted(ends, pos, side="right")), L - 1)
            raise ValueError(
                f"student tokens do not reproduce the text: first difference at byte {pos} of "
                f"{n} (student token {t}, id {int(ids[t])}, {self.view.token_repr(int(ids[t]))!r}; "
                f"text there {raw[pos : pos + 8]!r})"
            )
        return ids, ends


_CACHE: weakref.WeakKeyDictionary[Tokenizer, StudentBytes] = weakref.WeakKeyDictionary()


def student_bytes(tokenizer: Tokenizer | StudentBytes) -> StudentBytes:
    """The (cached, per tokenizer object) `StudentBytes` of a tokenizer."""
    if isinstance(tokenizer, StudentBytes):
        return tokenizer
    got = _CACHE.get(tokenizer)
    if got is None or got.vocab_size != tokenizer.get_vocab_size(with_added_tokens=True):
        got = StudentBytes(tokenizer)
        _CACHE[tokenizer] = got
    return got


def student_byte_ends(
    tokenizer: Tokenizer | StudentBytes, text: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, byte_end)``, both int64 [L]: the student's encoding of ``text`` (no special
    tokens added; added tokens that occur literally in the text are matched, as the
    tokenizer does) and the byte END offset of each token in ``text.encode("utf-8")``.

    Token ``i`` covers bytes ``[byte_end[i - 1], byte_end[i])`` (``byte_end[-1] = 0``), so
    ``byte_end`` is nondecreasing and its last entry is the text's byte length. A byte-
    level token may end inside a multi-byte character (as may a byte-fallback piece
    ``<0xNN>``, one byte). The prefix a student puts before a text (SentencePiece's
    prepended ``▁``) is not in the text: the first token's bytes start with it and its end
    is counted without it, so a token that is only that prefix has ``byte_end == 0``.
    Some students put the prefix before the text after each added token too (a Prepend
    normalizer, Metaspace "always"): it is left out there in the same way. An added token
    that occurs in the text covers its content and any whitespace it strips around it
    (``lstrip`` / ``rstrip``), as its offsets say.

    ``ValueError`` (naming the first byte and the token) when the tokens' bytes do not
    concatenate to the text, after removing the prefix (e.g. a literal ``▁`` in a text for
    a ``▁`` student, a text that is not NFC for an NFC student, an unknown token);
    `pipeline.tokenization.TokenizerError` (a ValueError) for a tokenizer kind that
    `StudentView` does not support. Pass a `StudentBytes` (or rely on the per-object
    cache) to build the byte tables once per tokenizer.
    """
    return student_bytes(tokenizer).encode(text)


# ----------------------------------------------------------------- ALM chunks
@dataclass(frozen=True)
class AlmChunks:
    """Chunks of an ALM alignment (all arrays [C], int64 unless said).

    Chunk ``c`` spans text bytes ``[byte_start[c], byte_end[c])``; its boundaries are
    consecutive byte offsets that end a token in BOTH tokenizations (0 and ``len(text)``
    included). It holds student tokens ``[student_start[c], student_end[c])`` and teacher
    tokens ``[teacher_start[c], teacher_end[c])``; both token ranges tile their sequence in
    order (a student token with no bytes, e.g. a prepended ``▁``, is in chunk 0).

    - ``logprob`` float64: teacher log-likelihood of the chunk, the sum of
      ``teacher_logprob`` over its teacher tokens accumulated in float64;
    - ``mask`` bool: the chunk counts (all True without a target mask; see `alm_chunks`);
    - ``eos_logprob``: the teacher's end-of-text entry ``teacher_logprob[m]``, in no chunk;
    - ``eos_target``: whether that entry is a target (``target[m]`` when given, else True).
    """

    byte_start: np.ndarray
    byte_end: np.ndarray
    student_start: np.ndarray
    student_end: np.ndarray
    teacher_start: np.ndarray
    teacher_end: np.ndarray
    logprob: np.ndarray
    mask: np.ndarray
    eos_logprob: float
    eos_target: bool

    def __len__(self) -> int:
        return len(self.byte_start)

    def student_chunk(self) -> np.ndarray:
        """int64 [L]: the chunk of each student token."""
        return np.repeat(
            np.arange(len(self), dtype=np.int64), self.student_end - self.student_start
        )


def _check_ends(ends: Any, name: str, strict: bool) -> np.ndarray:
    a = np.asarray(ends)
    if a.ndim != 1 or (len(a) and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D integer array, got {a.dtype} {a.shape}")
    a = a.astype(np.int64, copy=False)
    if len(a):
        d = np.diff(a)
        bad = np.flatnonzero(d <= 0 if strict else d < 0)
        if len(bad) or a[0] < (1 if strict else 0):
            at = int(bad[0]) + 1 if len(bad) else 0
            kind = "strictly increasing and > 0" if strict else "nondecreasing and >= 0"
            raise ValueError(f"{name} must be {kind}; not at index {at}")
    return a


def _all_true_per_segment(ok: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Whether ``ok[start[c]:end[c]]`` is all True, for every c (vectorised)."""
    bad = np.concatenate([[0], np.cumsum(~ok, dtype=np.int64)])
    return bad[end] - bad[start] == 0


def alm_chunks(
    teacher_byte_end: Any,
    teacher_logprob: Any,
    student_byte_end: Any,
    *,
    target: Any = None,
    target_bytes: Any = None,
) -> AlmChunks:
    """ALM chunk alignment of the teacher kind to a student tokenization (see `AlmChunks`).

    ``teacher_byte_end`` [m] (strictly increasing, > 0), ``teacher_logprob`` [m + 1],
    ``student_byte_end`` [L] (nondecreasing, >= 0, from `student_byte_ends`); both end at
    the text's byte length n (``ValueError`` otherwise). An empty text (m = L = 0) has no
    chunk.

    Targets (both optional, combined with AND):

    - ``target``: bool per teacher token, [m] or [m + 1] (entry m: the end-of-text token,
      reported as ``eos_target``). A chunk counts when ALL its teacher tokens are targets.
    - ``target_bytes``: bool per text byte, [n]. A chunk counts when ALL its bytes are.
    """
    te = _check_ends(teacher_byte_end, "teacher_byte_end", strict=True)
    se = _check_ends(student_byte_end, "student_byte_end", strict=False)
    lp = np.asarray(teacher_logprob, dtype=np.float64)
    m = len(te)
    if lp.shape != (m + 1,):
        raise ValueError(f"teacher_logprob has shape {lp.shape}, expected ({m + 1},)")
    n_t = int(te[-1]) if m else 0
    n_s = int(se[-1]) if len(se) else 0
    if n_t != n_s:
        raise ValueError(
            f"teacher tokens end at byte {n_t} but student tokens at byte {n_s}: not the same text"
        )
    n = n_t
    eos_target = True
    tmask = np.ones(m, dtype=bool)
    if target is not None:
        tg = np.asarray(target, dtype=bool)
        if tg.shape not in ((m,), (m + 1,)):
            raise ValueError(f"target has shape {tg.shape}, expected ({m},) or ({m + 1},)")
        tmask = tg[:m]
        if len(tg) == m + 1:
            eos_target = bool(tg[m])
    if target_bytes is not None:
        tb = np.asarray(target_bytes, dtype=bool)
        if tb.shape != (n,):
            raise ValueError(f"target_bytes has shape {tb.shape}, expected ({n},)")

    if m == 0:
        z = np.zeros(0, dtype=np.int64)
        return AlmChunks(z, z, z, z, z, z, np.zeros(0), np.zeros(0, bool), float(lp[0]), eos_target)
    # shared token boundaries (0 and n are in both sets)
    shared = np.intersect1d(te, se)
    shared = np.concatenate([[0], shared[shared > 0]])
    b0, b1 = shared[:-1], shared[1:]
    t1 = np.searchsorted(te, b1, side="right")
    s1 = np.searchsorted(se, b1, side="right")
    t0 = np.concatenate([[0], t1[:-1]])
    s0 = np.concatenate([[0], s1[:-1]])
    # every chunk holds >= 1 teacher token (b1 ends one), so reduceat sees no empty segment
    logprob = np.add.reduceat(lp[:m], t0)
    mask = _all_true_per_segment(tmask, t0, t1)
    if target_bytes is not None:
        mask &= _all_true_per_segment(tb, b0, b1)
    return AlmChunks(
        byte_start=b0.astype(np.int64),
        byte_end=b1.astype(np.int64),
        student_start=s0.astype(np.int64),
        student_end=s1.astype(np.int64),
        teacher_start=t0.astype(np.int64),
        teacher_end=t1.astype(np.int64),
        logprob=logprob,
        mask=mask,
        eos_logprob=float(lp[m]),
        eos_target=eos_target,
    )


# ----------------------------------------------------------------- byte windows
def byte_windows(
    byte_row_start: Any, student_byte_end: Any, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, starts)``, both int64 [L, m], for L = len(student_byte_end).

    Position t (the logits after student token t) predicts the text from byte
    ``student_byte_end[t]`` on. ``rows[t, 0]`` is the byte row that starts exactly there
    (the first such row if several do), ``rows[t, j]`` the j-th row after it: the rows of
    the next m symbols, never past the last row (end-of-text). ``-1`` where there is no
    such row: no row starts exactly at ``student_byte_end[t]`` (e.g. a student token that
    ends inside a special token's bytes) or fewer than m rows are left.

    ``starts[t, j]`` = ``byte_row_start[rows[t, j]]``, the byte where that symbol starts
    (``-1`` where ``rows`` is -1); a symbol ends where the next row starts (the last row,
    end-of-text, covers no byte).
    """
    rs = _check_ends(byte_row_start, "byte_row_start", strict=False)
    e = np.asarray(student_byte_end, dtype=np.int64).reshape(-1)
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    R = len(rs)
    if R == 0:
        full = np.full((len(e), m), -1, dtype=np.int64)
        return full, full.copy()
    r0 = np.searchsorted(rs, e, side="left")
    exact = (r0 < R) & (rs[np.minimum(r0, R - 1)] == e)
    rows = r0[:, None] + np.arange(m, dtype=np.int64)[None, :]
    rows[~exact] = -1
    rows[rows >= R] = -1
    starts = np.where(rows >= 0, rs[np.maximum(rows, 0)], -1)
    return rows, starts


# ----------------------------------------------------------------- batch arrays
def _positions(n_ids: int, length: int | None, bos: bool) -> int:
    n = n_ids + int(bos)
    return n if length is None else min(n, int(length))


def alm_batch_arrays(
    chunks: AlmChunks,
    ids: Any,
    *,
    length: int | None = None,
    bos_id: int | None = None,
) -> dict[str, np.ndarray]:
    """The ALM arrays of one sequence, for a student that reads ``x = [bos_id] + ids``
    (``ids`` alone when ``bos_id`` is None) truncated to ``length`` (None: no truncation).
    P = len(x) positions; position t's logits predict ``x[t + 1]``.

    Returns:

    - ``input_ids`` int64 [P]: x;
    - ``alm_labels`` int64 [P]: ``x[t + 1]``, -100 at the last position;
    - ``alm_chunk`` int64 [P]: index (into the arrays below) of the chunk of the student
      token predicted at position t, -1 if none (the last position, or a token of a
      chunk that is left out);
    - ``alm_chunk_logprob`` float64 [C]: the teacher log-likelihood of each kept chunk;
    - ``alm_chunk_mask`` bool [C]: the chunk counts (`AlmChunks.mask`);
    - ``alm_chunk_index`` int64 [C]: the kept chunks' indices in ``chunks``.

    Kept chunks: those whose student tokens are ALL predicted at positions of x, i.e. a
    contiguous range of ``chunks``. Without a BOS, token 0 is never predicted, so the
    chunk that holds it (chunk 0) is always left out; with ``bos_id`` every chunk is kept
    up to the truncation. A chunk cut by the truncation is left out. The student's chunk
    log-likelihood is the sum over positions with ``alm_chunk == c`` of its log-prob of
    ``alm_labels``; ALM compares it with ``alm_chunk_logprob[c]`` where the mask is set.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    L = len(ids)
    if len(chunks) and int(chunks.student_end[-1]) != L:
        raise ValueError(f"chunks cover {int(chunks.student_end[-1])} student tokens, ids {L}")
    if not len(chunks) and L:
        raise ValueError(f"no chunks for {L} student tokens")
    off = 0 if bos_id is None else 1
    x = ids if bos_id is None else np.concatenate([[int(bos_id)], ids])
    P = _positions(L, length, bos_id is not None)
    x = x[:P]
    labels = np.full(P, IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = x[1:]
    # chunk c is kept when its first token is predicted (position s0 + off - 1 >= 0) and
    # its last (position s1 + off - 2) is a position that has a label (< P - 1)
    keep = (chunks.student_start + off >= 1) & (chunks.student_end + off <= P)
    kept = np.flatnonzero(keep)
    new_index = np.full(len(chunks), -1, dtype=np.int64)
    new_index[kept] = np.arange(len(kept), dtype=np.int64)
    chunk_of_pos = np.full(P, -1, dtype=np.int64)
    if P > 1:
        tok = np.arange(P - 1, dtype=np.int64) + 1 - off  # student token predicted at t
        chunk_of_pos[:-1] = new_index[chunks.student_chunk()[tok]]
    return {
        "input_ids": x.astype(np.int64, copy=False),
        "alm_labels": labels,
        "alm_chunk": chunk_of_pos,
        "alm_chunk_logprob": chunks.logprob[kept],
        "alm_chunk_mask": chunks.mask[kept],
        "alm_chunk_index": kept.astype(np.int64),
    }


def _row_symbols(
    byte_row_start: np.ndarray, text: bytes, specials: Mapping[bytes, int] | None
) -> np.ndarray:
    """int64 [R]: the symbol each row's distribution is over the truth of: the byte value
    for a one-byte symbol, `BYTE_EOS` for a row at the end of the text, the special's id
    (``specials[content]``) for a multi-byte symbol, -1 when it is not known."""
    rs = byte_row_start
    R, n = len(rs), len(text)
    if R == 0:
        return np.zeros(0, dtype=np.int64)
    if int(rs[-1]) > n:
        raise ValueError(f"byte_row_start ends at {int(rs[-1])} past the text ({n} bytes)")
    data = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    nxt = np.concatenate([rs[1:], [-1]])  # where the symbol ends (unknown for the last row)
    width = nxt - rs
    sym = np.full(R, -1, dtype=np.int64)
    one = width == 1
    sym[one] = data[rs[one]]
    sym[rs == n] = BYTE_EOS
    multi = np.flatnonzero(width > 1)
    for r in multi.tolist():  # specials: few per text
        content = text[int(rs[r]) : int(nxt[r])]
        if specials is not None:
            if content not in specials:
                raise ValueError(
                    f"byte row {r} covers the multi-byte symbol {content!r} (bytes "
                    f"{int(rs[r])}..{int(nxt[r])}), which is not in specials"
                )
            sym[r] = int(specials[content])
    last = R - 1
    if int(rs[last]) < n:  # a truncated byte kind: the last symbol's width is unknown
        s = int(rs[last])
        sym[last] = data[s]  # a byte, unless a special's content starts there
        found = [c for c in (specials or {}) if c and text.startswith(c, s)]
        if specials is not None and found:
            sym[last] = int(specials[max(found, key=len)])
    return sym


def byte_batch_arrays(
    byte_row_start: Any,
    byte_ids: Any,
    byte_logprobs: Any,
    byte_tail: Any,
    byte_loss_mask: Any,
    text: bytes,
    student_byte_end: Any,
    m: int,
    *,
    length: int | None = None,
    bos_id: int | None = None,
    specials: Mapping[bytes, int] | None = None,
) -> dict[str, np.ndarray]:
    """The byte-kind arrays of one sequence at the student's positions (the same P
    positions as `alm_batch_arrays` with the same ``length`` and ``bos_id``; only whether
    ``bos_id`` is None matters here). Position t predicts the text from byte ``e[t]`` on,
    ``e = [0] + student_byte_end`` with a BOS, ``student_byte_end`` without; its window is
    `byte_windows` (the rows of the next ``m`` symbols).

    Returns:

    - ``byte_rows`` int64 [P, m]: the row indices (-1: none);
    - ``byte_ids`` int64 [P, m, k]: the rows' top-k symbol ids (-1 where no row);
    - ``byte_logprobs`` float32 [P, m, k]: their log-probs (0.0 where no row);
    - ``byte_tail`` float32 [P, m]: the rows' tail entries (0.0 where no row);
    - ``byte_mask`` bool [P, m]: the row exists and its ``byte_loss_mask`` is True;
    - ``byte_next`` int64 [P, m]: the symbol that actually follows at that row: the byte
      value (0..255) for a one-byte symbol, 256 for the end-of-text row (the row starting
      at ``len(text)``), ``specials[content]`` for a multi-byte symbol (its content bytes
      ``text[start:next start]``; ``ValueError`` if ``specials`` is given and lacks it, -1
      when ``specials`` is None); -1 where no row.
    """
    rs = _check_ends(byte_row_start, "byte_row_start", strict=False)
    ids = np.asarray(byte_ids).astype(np.int64, copy=False)
    lps = np.asarray(byte_logprobs)
    tail = np.asarray(byte_tail)
    lmask = np.asarray(byte_loss_mask, dtype=bool)
    R = len(rs)
    if ids.ndim != 2 or len(ids) != R or lps.shape != ids.shape:
        raise ValueError(f"byte_ids {ids.shape} / byte_logprobs {lps.shape} for {R} rows")
    if tail.shape != (R,) or lmask.shape != (R,):
        raise ValueError(f"byte_tail {tail.shape} / byte_loss_mask {lmask.shape} for {R} rows")
    se = np.asarray(student_byte_end, dtype=np.int64).reshape(-1)
    e = se if bos_id is None else np.concatenate([[0], se])
    P = _positions(len(se), length, bos_id is not None)
    rows, _ = byte_windows(rs, e[:P], m)
    has = rows >= 0
    r = np.maximum(rows, 0)
    out_ids = np.where(has[..., None], ids[r] if R else -1, -1)
    out_lp = np.where(has[..., None], lps[r] if R else 0.0, 0.0).astype(np.float32)
    out_tail = np.where(has, tail[r] if R else 0.0, 0.0).astype(np.float32)
    out_mask = has & (lmask[r] if R else False)
    sym = _row_symbols(rs, bytes(text), specials)
    out_next = np.where(has, sym[r] if R else -1, -1).astype(np.int64)
    return {
        "byte_rows": rows,
        "byte_ids": out_ids,
        "byte_logprobs": out_lp,
        "byte_tail": out_tail,
        "byte_mask": out_mask,
        "byte_next": out_next,
    }


__all__ = [
    "BYTE_EOS",
    "IGNORE_INDEX",
    "AlmChunks",
    "StudentBytes",
    "TokenizerError",
    "alm_batch_arrays",
    "alm_chunks",
    "byte_batch_arrays",
    "byte_windows",
    "student_byte_ends",
    "student_bytes",
]
