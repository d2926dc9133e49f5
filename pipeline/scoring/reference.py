"""Straightforward sequential subset scorer: the test reference and the speed baseline.

It follows scoring.md §2 literally, one student token at a time: an explicit frontier
of covers (exact covers with their weights, pending covers as boolean masks over the
teacher vocab), one teacher call per new exact-cover context, and validity of exact
covers decided by re-encoding the WHOLE text prefix with probe continuations (no
windows, no tree). It shares nothing with `SubsetExactScorer`'s cover search or row
assembly, so agreement between the two is evidence for both. Slow by design
(O(L^2) tokenization and one forward per context).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.scoring.common import Regime, ScoredDocument
from pipeline.scoring.protocol import Teacher
from pipeline.scoring.subset import DEFAULT_PROBES
from pipeline.scoring.subset_pair import _decompositions, check_subset_pair
from pipeline.scoring.unicode import completion_representatives
from pipeline.tokenization import ByteLevelBPE, load_tokenizer

# Every way to finish a GPT-2/Qwen2 contraction ('s 't 're 've 'm 'll 'd, any letter
# case) once its apostrophe is in the prefix: probes for boundaries that a contraction
# can still move.
CONTRACTION_TAILS: tuple[str, ...] = tuple(
    sorted(
        {
            "".join(c.upper() if (mask >> i) & 1 else c for i, c in enumerate(con[k:]))
            for con in ("s", "t", "re", "ve", "m", "ll", "d")
            for k in range(len(con))
            for mask in range(2 ** (len(con) - k))
        }
    )
)


class SequentialSubsetScorer:
    """Reference implementation of the subset-exact scorer (same `score` contract)."""

    def __init__(
        self,
        teacher_tokenizer: Any,
        student_tokenizer: Any,
        *,
        eos_token: str | None = None,
        probes: Sequence[str] = DEFAULT_PROBES,
    ) -> None:
        self.T = ByteLevelBPE(load_tokenizer(teacher_tokenizer), "teacher")
        self.S = ByteLevelBPE(load_tokenizer(student_tokenizer), "student")
        check_subset_pair(self.T, self.S)
        self.probes = tuple(probes)
        decomp = _decompositions(self.T, self.S)
        self.vt = self.T.size
        self.vs = self.S.size
        depth = max(len(d) for d in decomp.values())
        self.D = np.full((self.vt, depth + 1), -1, dtype=np.int64)
        self.lens = np.zeros(self.vt, dtype=np.int64)
        for t, d in decomp.items():
            self.D[t, : len(d)] = d
            self.lens[t] = len(d)
        self.is_bpe = self.lens > 0
        self.spec_t2s = self.T.added_map(self.S.added_by_content)
        self.student_eos = self.S.added_by_content[self.T.end_of_text(eos_token)]
        self.teacher_calls = 0

    # -- validity: is ctx a prefix of the canonical encoding of some continuation? -------
    def _continuations(self, prefix: bytes, rest: str) -> list[str]:
        try:
            text = prefix.decode("utf-8")
            partial = b""
        except UnicodeDecodeError:
            cut = max(i for i in range(len(prefix) - 3, len(prefix)) if (prefix[i] & 0xC0) != 0x80)
            text, partial = prefix[:cut].decode("utf-8"), prefix[cut:]
        if partial:
            actual = rest[0]
            comps = dict.fromkeys((actual, *completion_representatives(partial)))
            base = [(text + c, rest[1:] if c == actual else "") for c in comps]
        else:
            base = [(text, rest)]
        out = []
        for t, r in base:
            out.append(t + r)
            out.extend(t + z for z in self.probes)
            if "'" in t[-2:]:
                out.extend(t + z for z in CONTRACTION_TAILS)
        return out

    def _valid(self, ctx: tuple[int, ...], prefix: bytes, rest: str) -> bool:
        for cont in self._continuations(prefix, rest):
            ids = self.T.tokenizer.encode(cont, add_special_tokens=False).ids
            if tuple(ids[: len(ctx)]) == ctx:
                return True
        return False

    def _lp(self, teacher: Teacher, ctx: tuple[int, ...], cache: dict) -> np.ndarray:
        if ctx not in cache:
            self.teacher_calls += 1
            row = np.asarray(
                _to_numpy(teacher.next_token_logprobs([ctx]))[0, : self.vt], dtype=np.float64
            )
            m = row.max()
            cache[ctx] = row - (m + np.log(np.exp(row - m).sum()))
        return cache[ctx]

    def score(
        self, teacher: Teacher, texts: Sequence[str], top_k: int | None = None
    ) -> list[ScoredDocument]:
        return [self._score_one(teacher, t, top_k) for t in texts]

    def _score_one(self, teacher: Teacher, text: str, top_k: int | None) -> ScoredDocument:
        norm = self.T.normalize(text)
        S = self.S.tokenizer.encode(text, add_special_tokens=False).ids
        canonical = self.T.tokenizer.encode(text, add_special_tokens=False).ids
        L = len(S)
        cache: dict[tuple[int, ...], np.ndarray] = {}
        exact: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
        pending: list[tuple[tuple[int, ...], float, np.ndarray, int]] = []
        rows = np.full((L + 1, self.vs), -np.inf)
        consumed = b""
        full = norm.encode("utf-8")
        for i in range(L + 1):
            # the only exact cover a special (or EOS) may follow: the canonical encoding
            # of the prefix as a complete text
            try:
                whole = tuple(
                    self.T.tokenizer.encode(consumed.decode("utf-8"), add_special_tokens=False).ids
                )
            except UnicodeDecodeError:
                whole = None
            lws = [lw for _, lw in exact] + [lw for _, lw, _, _ in pending]
            shift = max(lws) if lws else 0.0
            J = np.zeros(self.vs)
            for ctx, lw in exact:
                p = np.exp(self._lp(teacher, ctx, cache))
                w = np.exp(lw - shift)
                J += w * np.bincount(
                    self.D[self.is_bpe, 0], weights=p[self.is_bpe], minlength=self.vs
                )
                if ctx == whole:
                    for t, s in self.spec_t2s.items():
                        J[s] += w * p[t]
            for ctx, lw, mask, k in pending:
                p = np.exp(self._lp(teacher, ctx, cache))
                sel = mask & (self.lens > k)
                J += np.exp(lw - shift) * np.bincount(
                    self.D[sel, k], weights=p[sel], minlength=self.vs
                )
            tot = J.sum()
            with np.errstate(divide="ignore"):
                rows[i] = np.log(J) - np.log(tot)
            if i == L:
                break
            a = S[i]
            consumed += self.S.token_bytes[a]
            rest = full[len(consumed) :].decode("utf-8", errors="ignore")
            new_exact: list[tuple[tuple[int, ...], float]] = []
            new_pending = []
            if a in self.S.added_ids:  # a special: follows exact covers only, collapses them
                nth = sum(1 for x in S[:i] if x in self.S.added_ids)
                at = [k for k, x in enumerate(canonical) if x in self.T.added_ids][nth]
                t = canonical[at]
                ctx = tuple(canonical[: at + 1])
                assert whole is not None, "a special token follows a complete text"
                lw0 = next(lw for e, lw in exact if e == whole)
                new_exact = [(ctx, lw0 + self._lp(teacher, whole, cache)[t])]
            else:
                for ctx, lw, mask, k in pending:
                    p = self._lp(teacher, ctx, cache)
                    m2 = mask & (self.D[:, k] == a)
                    for tid in np.nonzero(m2 & (self.lens == k + 1))[0]:
                        new_exact.append(((*ctx, int(tid)), lw + p[tid]))
                    if (m2 & (self.lens > k + 1)).any():
                        new_pending.append((ctx, lw, m2, k + 1))
                for ctx, lw in exact:
                    p = self._lp(teacher, ctx, cache)
                    m1 = self.is_bpe & (self.D[:, 0] == a)
                    for tid in np.nonzero(m1 & (self.lens == 1))[0]:
                        new_exact.append(((*ctx, int(tid)), lw + p[tid]))
                    if (m1 & (self.lens > 1)).any():
                        new_pending.append((ctx, lw, m1, 1))
                new_exact = [(c, lw) for c, lw in new_exact if self._valid(c, consumed, rest)]
            exact, pending = new_exact, new_pending
        return _result(norm, S, canonical, rows, top_k, self.student_eos)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().double().numpy()
    return np.asarray(x)


def _result(
    text: str, S: list[int], canonical: list[int], rows: np.ndarray, top_k: int | None, eos: int
) -> ScoredDocument:
    L = len(S)
    nxt = np.asarray([*S, eos])
    target = rows[np.arange(L + 1), nxt]
    zeros = np.zeros(L + 1)
    if top_k is None:
        ids = lps = None
        tail = zeros
    else:
        ids = np.argsort(-rows, axis=1, kind="stable")[:, :top_k]
        lps = np.take_along_axis(rows, ids, axis=1)
        tail = np.clip(1.0 - np.exp(lps).sum(1), 0.0, None)
    return ScoredDocument(
        text=text,
        student_ids=np.asarray(S, dtype=np.int64),
        teacher_ids=np.asarray(canonical, dtype=np.int64),
        topk_ids=ids,
        topk_logprobs=lps,
        logprobs=rows if top_k is None else None,
        tail_mass=tail,
        target_logprobs=target,
        unmapped_mass=zeros,
        unaccounted_mass=zeros,
        noncanonical_mass=zeros,
        regime=np.full(L + 1, int(Regime.EXACT), dtype=np.uint8),
        prefix_logprob=zeros,
    )
