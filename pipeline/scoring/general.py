"""General scorer: student targets for an arbitrary student tokenizer
(``../shared/spec/scoring.md`` §3). Correct (brute-force checked) but far costlier than
the subset-exact scorer (see "Cost" below).

Rows are found by enumerating continuations of each row's text prefix, in one of two
walks over the same decision rule:

- ``walk="tokens"`` (default, `GeneralScorer._run_tokens`): whole teacher tokens. A root
  ``r`` (a text prefix a row's student prefix stands for) is split at its last stable
  TEACHER boundary (the decision rule below, applied to the teacher's own pre-tokenizer):
  every canonical teacher encoding of a text starting with ``r`` starts with the
  canonical encoding ``C`` of the head ``r[:q]``. From ``C`` the walk enumerates teacher
  token sequences ``sigma`` whose bytes agree with ``u = r[q:]``; a node costs one
  teacher distribution ``P_T(. | C + sigma)``, and ALL its next tokens are decided at
  once by walking the teacher's vocabulary as a byte trie (`VocabTrie`: tokens sorted by
  bytes, a byte prefix is a contiguous range, its mass a difference of cumulative sums):
  a trie prefix ``b`` whose branch ``head + z(sigma) + b`` is decided (stable student
  tokens) is accounted whole, an undecided one queues the token equal to ``b`` as a new
  node and descends. A node's weight is ``P_T(C + sigma)`` (from the teacher call's own
  path log-probs). The texts so weighted are the teacher's marginal over ALL its token
  sequences after the canonical head (non-canonical ones included); for a teacher
  without non-canonical mass (the brute-force teacher) that is the byte model's
  distribution, and rows equal the byte walk's. Cost per row: a few teacher
  distributions per open word (about 30 at the default beam with SmolLM2).
- ``walk="bytes"`` (the first implementation, kept as a reference): one byte at a time
  through the two stages below. Cost per row: one byte-model row per trie node of every
  word it follows (several teacher contexts each).

Two stages of the byte walk:

1. `ByteModel`: the teacher's exact next-byte distributions, from the subset-exact
   scorer with the teacher's own byte base as student (``truncate_merges(T, 0)``).
   Scoring one text gives the row after every byte prefix of it, so rows are cached by
   byte prefix. A prefix that ends inside a UTF-8 character is scored through a text
   that completes the character (the row at a byte position depends only on the bytes
   before it).
2. Rows. For a document with student encoding ``s_1..s_L``, row ``i`` is
   ``P(token i of the student encoding of the complete text = g | the encoding starts
   with s_1..s_i)`` (``g`` = the student's EOS when the encoding has exactly ``i``
   tokens), under the distribution over complete texts that the byte model defines.
   It is found by enumerating byte continuations of the text prefix(es) that
   ``s_1..s_i`` stand for (`StudentView.roots`), weighted by the byte model, level by
   level, until every branch is decided; branches whose encoding does not start with
   ``s_1..s_i`` leave numerator and denominator (conditioning).

Decision rule (`StudentView.stable_tokens`). A branch is a byte string ``y``. Its
stable tokens are tokens that EVERY complete text starting with ``y`` encodes to
first: the encoding of ``y`` up to its last stable boundary ``q``, a pre-token boundary
that no continuation can move (BPE never crosses a pre-token boundary). The branch is
decided when its stable tokens disagree with ``s_1..s_i`` (excluded) or number more
than ``i`` (the token at index ``i`` is known); at end of text the complete text's own
encoding decides. Stable boundaries by pre-tokenizer:

- GPT-2 / Qwen2 / Llama-3 regex: a pre-token start ``q`` whose previous character is
  not whitespace and that has at least one more character after it in ``y`` (two when
  an apostrophe is among the three characters before ``q``). The matcher decides each
  pre-token before ``q`` from characters up to ``q``: class runs stop at the first
  character outside the class, and a whitespace run ends before the non-whitespace
  character ``y[q-1]``; only contractions read further (at most three characters from
  their start). Whitespace before ``q`` is excluded because of ``\\s+(?!\\S)``
  (``"a  "`` -> ``[a, "  "]`` but ``"a  1"`` -> ``[a, " ", " ", 1]``), and the second
  character near an apostrophe because of contractions (GPT-2 ``"x'l"`` ->
  ``[x, ', l]`` but ``"x'll"`` -> ``[x, 'll]``). The end of ``y`` itself is stable when
  its last piece is closed whatever follows: one digit (Qwen2 splits digits one by
  one) or three (Llama-3); no NFC composition starts with an ASCII digit.
- Metaspace with ``split=True``: before every space at ``q >= 1`` (a new piece starts
  at every ``▁`` whatever follows).
- Byte-level BPE without merges: every byte boundary (every byte is a token).
- No pre-tokenizer or Metaspace with ``split=False`` (SentencePiece "legacy" layouts
  such as Llama-2's Prepend + Replace normalizer; Gemma's Replace normalizer, whose
  Split(" ") then never matches), when every vocabulary token's spaces
  lead it (as in vocabularies SentencePiece trains, which split at whitespace): before
  every space at ``q >= 1`` whose previous character is not a space ("word-start"). No
  merge can join a character to a following space, so BPE over the whole text equals
  BPE over its pieces split there.
- Those layouts with a token holding a space after another character, or an unknown
  regex: no stable boundary; only end of text decides. Correct, but exponential in the
  rest of the text (in ``fast`` mode such rows end up wholly unaccounted).
- An NFC normalizer additionally needs an ASCII character at index ``>= q + r`` (regex,
  ``r`` = the characters it reads after ``q``) or ``>= q`` (others) in an NFC-normalized
  ``y``: NFC never composes an ASCII character with what precedes it, so no
  continuation can change the text before it.

The rule is checked by brute force in ``tests/scoring/test_general_bruteforce.py``:
stable tokens of every short string are a prefix of the encoding of every
continuation, and all rows equal the enumerated truth.

Roots. Usually ``s_1..s_i`` stand for one text prefix. Metaspace with
``prepend_scheme="first"|"always"`` is not injective (``" a"`` and ``"a"`` both encode
to ``▁a``), so a row may have two roots, weighted by their byte-model prefix
probabilities (byte walk) or by the teacher's own probability of their contexts and
tokens (token walk) (`StudentView.roots`).

Added tokens (token walk). A text may hold added tokens that both tokenizers have
(chat templates). BPE and pre-tokenization restart after an added token, so a row whose
student prefix holds one is computed on the text after the last one (the root), with
the teacher's ids of everything up to it in front of every context (the frame); a
teacher added token that follows a branch ends its segment and is followed by the
student's token of the same content (end of text: the student's EOS; a teacher special
the student lacks: unmapped). Students that prepend a space per segment (Metaspace
with a prefix, a Prepend normalizer) are refused for such texts.

Modes. ``lossless``: enumerate until decided or ``max_depth`` continuation bytes; the
mass of branches still undecided there is the row's unaccounted mass. ``fast``:
additionally drop undecided branches below ``min_prob`` (relative to the row's
starting mass) and keep at most ``beam`` branches per depth (byte walk) or ``beam``
nodes per level (token walk, which also drops trie branches below
``DECIDE_FLOOR * min_prob`` without deciding them). A dropped token-walk node counts
its whole weight, an upper bound on the mass it would have brought. Rows are
``m(g) / Z`` with ``Z`` = consistent decided mass + unaccounted mass, so a row sums to
``1 - unaccounted_mass``; ``row(g) <= truth(g) <= row(g) + unaccounted_mass``.

Cost of the byte walk. Per distinct student prefix: one byte-model row per expanded branch (each
``max_depth``-limited tree node), i.e. exponential in the look-ahead (up to 256 children
per node with a real teacher). An uncached byte-model row is computed locally (see
`ByteModel`): from the last byte boundary of its text that no teacher token crosses,
with the canonical encoding before it as teacher context, so it costs a few teacher
contexts and a few rows of row work whatever the document length; all rows of one
enumeration level go to the teacher as merged prefix trees (one call while they fit).
What remains per student token is the enumeration itself (hundreds of byte-model rows
and ~10^4 student-side decisions with a real teacher, in Python).

Cost of the token walk, and why it stays far above the subset scorer. A student token is
decided once the student's current pre-token has ended, so a row must follow the
teacher's mass to one character past the end of the NEXT word: one teacher
distribution for the root, one per way of ending the current word, one per next word
(to see whether it ends). A real teacher's next-word distribution is flat: with
SmolLM2 on two GSM8K texts at the default setting, a row loses on average 0.21 of its
mass to branches below the 0.1% floor and 0.12 to the beam, and every further word
costs one teacher position (the full model, not just its head), so a row's unaccounted
mass falls slowly with the beam (README, "General scorer error table").
"""

from __future__ import annotations

import codecs
import json
import math
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from tokenizers import Tokenizer

from pipeline.scoring.common import Regime, ScoredDocument
from pipeline.scoring.subset import (
    PreparedDocument,
    SubsetExactScorer,
    merge_context_trees,
    teacher_tree_logprobs,
)
from pipeline.scoring.unicode import _codepoint_range, completion_representatives
from pipeline.scoring.vocab_trie import VocabTrie
from pipeline.tokenization import (
    BYTE_FALLBACK_PIECE,
    DOC_END_TOKENS,
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    ByteLevelBPE,
    TokenizerError,
    UnscorableTextError,
    load_tokenizer,
    truncate_merges,
    unicode_to_bytes,
)

# Columns of a byte-model row: bytes 0..255, end of text, teacher specials other than
# end of text (mass the student cannot see).
EOS_COL = 256
UNMAPPED_COL = 257
ROW_WIDTH = 258

# Pre-tokenizer regexes whose stable boundaries `StudentView` knows (see module doc).
KNOWN_PATTERNS = {GPT2_PATTERN: "gpt2", QWEN2_PATTERN: "qwen2", LLAMA3_PATTERN: "llama3"}
REGEX_LOOKAHEAD = 2  # characters after a boundary the regex matcher may read (contractions)

# Fast mode, token walk: trie branches below this share of ``min_prob`` are dropped
# (unaccounted) without deciding them; most trie branches weigh far less than that.
DECIDE_FLOOR = 0.01

_T = TypeVar("_T")


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


def _completions(p: bytes) -> Iterator[str]:
    """Valid texts whose UTF-8 starts with ``p`` (``p`` itself when it is valid):
    one character per regex class first, then other completing characters."""
    split = _utf8_split(p)
    if split is None:
        return
    text, partial = split
    if not partial:
        yield text
        return
    reps = completion_representatives(partial)
    yield from (text + ch for ch in reps)
    rng = _codepoint_range(partial)
    if rng is not None:
        for cp in range(rng[0], min(rng[1], rng[0] + 512) + 1):
            ch = chr(cp)
            if ch not in reps and not 0xD800 <= cp <= 0xDFFF:
                yield text + ch


class ByteModel:
    """The teacher's exact next-byte distributions, cached by byte prefix.

    ``row(prefix)`` is a float64 array ``[258]``: P(next byte = b | the text starts
    with ``prefix``) for b in 0..255, then P(the text ends here), then the mass on
    teacher specials other than end of text. It sums to 1 (to 0 for a prefix the
    teacher never produces). Rows depend on the teacher: `reset` between teachers.

    Local rows (``local=True``). The row after a prefix ``y`` of a text ``t`` is the
    subset scorer's row at byte ``len(y)`` of ``t``. It is computed from the LAST byte
    boundary ``b < len(y)`` of ``t`` such that (`local_boundary`):

    - ``b`` starts a teacher pre-token of ``t`` and the character before it is not
      whitespace. With the GPT-2 / Qwen2 / Llama-3 regexes (no look-behind; the only
      look-ahead is ``\\s+(?!\\S)``, which needs whitespace before ``b``), the pieces
      of ``t`` are then those of ``t[:b]`` followed by those of ``t[b:]``: the
      canonical encoding of ``t`` is ``canonical(t[:b]) + canonical(t[b:])``, and
      every exact cover the scorer keeps at a byte ``>= b`` is ``canonical(t[:b])``
      followed by a cover of the local text (its windows start at or after ``b``);
    - no teacher token crosses ``b``: for no ``j < b`` is ``t[j:b+1]`` a proper prefix
      of a teacher token's bytes. So no cover from before ``b`` reaches a row
      ``> b``, not even a non-canonical one (which carries mass with a real teacher).

    Rows at bytes ``b + 1 .. len(t)`` are then computed from ``t[b:]`` with
    ``canonical(t[:b])`` as teacher context (`SubsetExactScorer.prepare` with
    ``context``): the same covers, the same teacher contexts, weights differing only by
    the common factor ``P_T(canonical(t[:b]))``, which the row normalisation cancels.
    No look-ahead past ``b`` is needed because the rows are those of the concrete
    text ``t``, exactly as the whole-text path computes them. ``b = 0`` (empty context)
    is the whole-text path; it is used when the teacher's pre-tokenizer is not one of
    those layouts (or the text holds an added token, or normalization is not stable
    on the local text). All local texts of one `ensure` call go to the teacher as merged
    prefix trees (`SubsetExactScorer.score_prepared_shared`): one teacher call per
    enumeration level while it fits ``max_batch_nodes``.

    Args:
        teacher_tokenizer: the teacher's byte-level BPE (any form `load_tokenizer` takes).
        eos_token: content of the teacher's end-of-text token (default: the first of
            ``DOC_END_TOKENS`` it has).
        local: compute rows from the last local boundary (False: from the start of
            the text, the reference path).
        max_tree_nodes, max_batch_nodes: see `SubsetExactScorer.score_prepared_shared`.
    """

    def __init__(
        self,
        teacher_tokenizer: Any,
        eos_token: str | None = None,
        *,
        local: bool = True,
        max_tree_nodes: int | None = None,
        max_batch_nodes: int | None = None,
    ) -> None:
        tok = load_tokenizer(teacher_tokenizer)
        model = json.loads(tok.to_str()).get("model") or {}
        if not model.get("vocab"):
            raise TokenizerError("teacher tokenizer has an empty vocabulary")
        self.scorer = SubsetExactScorer(tok, truncate_merges(tok, 0), eos_token=eos_token)
        self.eos_token = self.scorer.eos_token
        self.max_tree_nodes = max_tree_nodes
        self.max_batch_nodes = max_batch_nodes
        S = self.scorer.S
        col = np.full(S.size, UNMAPPED_COL, dtype=np.int64)
        for i in range(S.size):
            if i == self.scorer.student_eos:
                col[i] = EOS_COL
            elif i not in S.added_ids:
                b = S.token_bytes.get(i)
                if b is None or len(b) != 1:
                    raise TokenizerError(f"teacher byte symbol id {i} is not one byte: {b!r}")
                col[i] = b[0]
        # [V_bytes, 258] 0/1 matrix: byte-student columns -> byte-model columns
        self._to_row = np.zeros((S.size, ROW_WIDTH))
        self._to_row[np.arange(S.size), col] = 1.0
        T = self.scorer.T
        self.local = local and _local_pretokenizer(T)
        # proper prefixes of teacher token bytes (the crossing test of `local_boundary`)
        self._proper: set[bytes] = set()
        self._max_token = 1
        if self.local:
            for t in self.scorer.decomp:
                tb = T.token_bytes[t]
                self._max_token = max(self._max_token, len(tb))
                self._proper.update(tb[:k] for k in range(1, len(tb)))
        self.reset()

    def reset(self) -> None:
        """Forget cached rows and counters."""
        self.rows: dict[bytes, np.ndarray] = {}
        self.stats = {
            "texts_scored": 0,
            "teacher_contexts": 0,
            "batches": 0,
            "local_texts": 0,  # texts scored after a non-empty context
            "local_bytes": 0,  # bytes of the texts scored (local part only)
        }
        self._contexts: dict[bytes, list[int]] = {}
        self._teacher: Any = None

    def bind(self, teacher: Any) -> None:
        """Use ``teacher`` from now on; cached rows survive only for the same object."""
        if teacher is not self._teacher:
            self.reset()
            self._teacher = teacher

    def prepare_texts(self, teacher: Any, texts: Sequence[str]) -> list[PreparedDocument]:
        """Tokenizer phase of whole texts (raises `UnscorableTextError` for a text the
        teacher cannot encode); makes the rows of all their prefixes available."""
        prepared = [self.scorer.prepare(t) for t in texts]
        todo = {p.text: p for p in prepared if p.text.encode("utf-8") not in self.rows}
        if todo:
            self._score(teacher, list(todo.values()))
        return prepared

    def ensure(self, teacher: Any, prefixes: Iterable[bytes], closed: bool = False) -> None:
        """Make ``row(p)`` available for every ``p`` (one batched teacher call while the
        trees fit ``max_batch_nodes``). ``closed``: also for every prefix of every ``p``
        (what `log_prefix` needs)."""
        want = set(prefixes)
        if closed:
            want = {p[:j] for p in want for j in range(len(p) + 1)}
        missing = sorted(p for p in want if p not in self.rows)
        if not missing:
            return
        if not self.local:
            self._ensure_whole(teacher, missing)
            return
        # In sorted order, a prefix of another missing prefix is a prefix of the next one:
        # the text chosen for the longest serves the shorter ones down to its boundary.
        jobs: list[tuple[bytes, int, PreparedDocument]] = []  # (text bytes, boundary, doc)
        for p in reversed(missing):
            if jobs:
                tb, b, _ = jobs[-1]
                if tb.startswith(p) and len(p) >= b + (b > 0):
                    continue
            jobs.append(self._local_job(p))
        self._score_local(teacher, jobs)

    def _ensure_whole(self, teacher: Any, missing: list[bytes]) -> None:
        """The reference path: every row from a text scored from its start, one tree per
        text (`SubsetExactScorer.score_prepared`)."""
        prepared: dict[str, PreparedDocument] = {}
        for k, p in enumerate(missing):
            # In sorted order, a prefix of another missing prefix is a prefix of the next one,
            # whose text gives its row too.
            if k + 1 < len(missing) and missing[k + 1].startswith(p):
                continue
            for text in _completions(p):
                if text in prepared:
                    break
                try:
                    prep = self.scorer.prepare(text)
                except UnscorableTextError:
                    continue
                if prep.text.encode("utf-8").startswith(p):  # normalization kept the bytes
                    prepared[text] = prep
                    break
            else:
                raise UnscorableTextError(
                    f"no text the teacher can encode starts with the bytes {p[-12:]!r} "
                    "(needed for a next-byte distribution)"
                )
        if prepared:
            self._score(teacher, list(prepared.values()))

    def _local_job(self, p: bytes) -> tuple[bytes, int, PreparedDocument]:
        """A text starting with ``p``, its local boundary ``b < len(p)`` (0: none) and
        the prepared local text (``b``: onwards, with the context before it)."""
        for text in _completions(p):
            norm = self.scorer.T.normalize(text)
            tb = norm.encode("utf-8")
            if not tb.startswith(p):  # normalization changed the bytes
                continue
            b = self.local_boundary(norm, len(p) - 1)
            try:
                if b > 0:
                    local = tb[b:].decode("utf-8")
                    prep = self.scorer.prepare(local, context=self._context(tb[:b]))
                    if prep.text == local:
                        return tb, b, prep
                return tb, 0, self.scorer.prepare(text)
            except UnscorableTextError:
                continue
        raise UnscorableTextError(
            f"no text the teacher can encode starts with the bytes {p[-12:]!r} "
            "(needed for a next-byte distribution)"
        )

    def _context(self, head: bytes) -> list[int]:
        """Canonical teacher ids of the text ``head`` (cached)."""
        ids = self._contexts.get(head)
        if ids is None:
            ids = self.scorer.T.encode_exact(head.decode("utf-8"))
            self._contexts[head] = ids
        return ids

    def local_boundary(self, text: str, limit: int) -> int:
        """The largest byte offset ``b <= limit`` of ``text`` (normalized) from which rows
        past ``b`` can be computed locally (see the class docstring); 0 if none."""
        if not self.local or limit < 1:
            return 0
        T = self.scorer.T
        if T.added and len(T.split_added(text)) != 1:
            return 0
        tb = text.encode("utf-8")
        starts = [0]
        for piece in T.pretokenize(text):
            starts.append(starts[-1] + len(piece))  # byte-level pieces: 1 char per byte
        for b in reversed(starts[:-1]):
            if b > limit:
                continue
            if b == 0:
                break
            k = b - 1
            while k > 0 and tb[k] & 0xC0 == 0x80:
                k -= 1
            if tb[k:b].decode("utf-8").isspace():
                continue
            if any(
                tb[j : b + 1] in self._proper for j in range(max(0, b + 2 - self._max_token), b)
            ):
                continue
            return b
        return 0

    def row(self, prefix: bytes) -> np.ndarray:
        return self.rows[prefix]

    def log_prefix(self, prefix: bytes) -> float:
        """log P(the text starts with ``prefix``); the rows of its prefixes must be cached
        (`ensure` with ``closed=True``)."""
        total = 0.0
        for j in range(len(prefix)):
            p = float(self.rows[prefix[:j]][prefix[j]])
            if p <= 0.0:
                return -math.inf
            total += math.log(p)
        return total

    def _byte_rows(self, doc: ScoredDocument) -> np.ndarray:
        assert doc.logprobs is not None
        probs = np.exp(doc.logprobs) * (1.0 - doc.unmapped_mass)[:, None]
        rows = probs @ self._to_row
        rows[:, UNMAPPED_COL] += doc.unmapped_mass
        return rows

    def _score(self, teacher: Any, prepared: list[PreparedDocument]) -> list[ScoredDocument]:
        self.stats["texts_scored"] += len(prepared)
        self.stats["teacher_contexts"] += sum(p.tree_size for p in prepared)
        self.stats["batches"] += 1
        self.stats["local_bytes"] += sum(len(p.text.encode("utf-8")) for p in prepared)
        docs = self.scorer.score_prepared(teacher, prepared, top_k=None)
        for doc in docs:
            b = doc.text.encode("utf-8")
            assert len(doc.student_ids) == len(b)
            rows = self._byte_rows(doc)
            # The cache stays prefix-closed: stop at the first prefix already cached.
            for j in range(len(b), -1, -1):
                if b[:j] in self.rows:
                    break
                self.rows[b[:j]] = rows[j]
        return docs

    def _score_local(self, teacher: Any, jobs: list[tuple[bytes, int, PreparedDocument]]) -> None:
        # rows at bytes b+1.. of each text (all of them for b = 0), each computed once
        claimed: set[bytes] = set()
        wanted: list[list[int]] = []
        for tb, b, _ in jobs:
            want = []
            for j in range(b + (b > 0), len(tb) + 1):
                if tb[:j] not in self.rows and tb[:j] not in claimed:
                    claimed.add(tb[:j])
                    want.append(j - b)
            wanted.append(want)
        probs, unmapped, st = self.scorer.dense_rows_shared(
            teacher,
            [prep for _, _, prep in jobs],
            wanted,
            max_tree_nodes=self.max_tree_nodes,
            max_batch_nodes=self.max_batch_nodes,
        )
        self.stats["texts_scored"] += len(jobs)
        self.stats["teacher_contexts"] += st["teacher_contexts"]
        self.stats["batches"] += st["teacher_calls"]
        self.stats["local_texts"] += sum(b > 0 for _, b, _ in jobs)
        for (tb, b, prep), want, pr, un in zip(jobs, wanted, probs, unmapped, strict=True):
            self.stats["local_bytes"] += len(tb) - b
            assert len(prep.student_ids) == len(tb) - b
            rows = pr @ self._to_row
            rows[:, UNMAPPED_COL] += un
            for k, j in enumerate(want):
                self.rows[tb[: b + j]] = rows[k]


def _local_pretokenizer(T: ByteLevelBPE) -> bool:
    """Whether the teacher's pre-tokenizer splits a text at a pre-token start that
    follows a non-whitespace character into the pieces of the two parts (see
    `ByteModel`): ByteLevel with its GPT-2 regex, or Split with a known regex followed
    by ByteLevel without regex, no prefix space either way."""
    steps = _flatten(T.component("pre_tokenizer"), "pretokenizers")
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"]:
        bl = steps[0]
        return bool(bl.get("use_regex", True)) and not bl.get("add_prefix_space")
    if kinds == ["Split", "ByteLevel"]:
        split, bl = steps
        pattern = (split.get("pattern") or {}).get("Regex")
        return (
            pattern in KNOWN_PATTERNS
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
            and not bl.get("use_regex")
            and not bl.get("add_prefix_space")
        )
    return False


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
    complete texts, stable tokens of a text prefix (the decision rule, see the module
    docstring), and the byte prefixes a token prefix stands for.

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


@dataclass
class _RowJob:
    """Enumeration state of one row, shared by every document with this student prefix."""

    key: tuple[int, ...]
    roots: list[bytes]
    # the row's student tokens after the last added token in ``key`` (all of ``key``
    # when it has none); the roots stand for them and decisions compare against them
    lkey: tuple[int, ...] = ()
    frame: tuple[int, ...] = ()  # teacher ids of the text up to that added token
    frame_bytes: bytes = b""  # and its bytes
    log_shift: float = 0.0  # weights are relative to exp(log_shift) (max root prefix prob)
    start: float = 0.0  # starting mass: the fast mode's scale (see the walks)
    # per root: (byte offset q, token count n) of `StudentView.local_offset`; a branch
    # from root k is decided on its bytes from q against key[n:]
    local: list[tuple[int, int]] = field(default_factory=list)
    frontier: list[tuple[bytes, float, int]] = field(default_factory=list)  # (y, w, root)
    mass: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    excluded: float = 0.0  # inconsistent with the prefix: out of numerator and denominator
    unmapped: float = 0.0  # specials the student lacks, texts that are not valid UTF-8
    cut: float = 0.0  # undecided at max_depth
    pruned: float = 0.0  # dropped by min_prob / beam (fast mode)
    expanded: int = 0  # byte-model rows (byte walk) or teacher rows (token walk) used
    # token walk, per root: the teacher context (canonical ids of the text before the
    # root's last stable teacher boundary) and the bytes it stands for
    contexts: list[tuple[int, ...]] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)
    nodes: list[_Node] = field(default_factory=list)  # token walk: to expand next


@dataclass(frozen=True)
class _ContextPath:
    """A bare teacher context (a `TeacherTree` without local nodes): the token walk asks
    for the distribution after it."""

    context: tuple[int, ...]
    tokens: tuple[int, ...] = (-1,)
    parents: tuple[int, ...] = (-1,)
    num_nodes: int = 1


@dataclass
class _Node:
    """A node of the token walk: teacher tokens ``sigma`` after root ``k``'s context,
    standing for the bytes ``z`` after its head, with weight ``w`` (relative)."""

    k: int
    sigma: tuple[int, ...]
    z: bytes
    w: float  # NaN for a root node (sigma empty) until its context's P_T is known


class GeneralScorer:
    """Student targets for an arbitrary student tokenizer (scoring.md §3).

    Args:
        teacher_tokenizer: the teacher's byte-level BPE tokenizer (any form
            `load_tokenizer` takes).
        student_tokenizer: the student's tokenizer (see `StudentView` for what is
            supported); it must have an added token with the teacher's end-of-text content.
        mode: ``"lossless"`` (enumerate until decided or ``max_depth``) or ``"fast"``
            (also prune by ``min_prob`` and ``beam``).
        max_depth: at most this many bytes are appended to a row's text prefix; a
            branch still undecided there is cut and its mass is unaccounted.
        beam: fast mode: undecided branches kept per depth (byte walk) or nodes expanded
            per level (token walk), highest weight first.
        min_prob: fast mode: undecided branches below this share of the row's starting
            mass are dropped (unaccounted).
        eos_token: content of the teacher's end-of-text token (default: the first of
            ``DOC_END_TOKENS`` the teacher has).
        student_eos_token: content of the student's end-of-text token, which receives
            the teacher's end-of-text mass (default: the teacher's, else the first of
            ``DOC_END_TOKENS`` the student has).
        byte_model: a `ByteModel` of the same teacher tokenizer to share (its rows are
            reused while the same teacher object is passed to `score`).
        walk: ``"tokens"`` (whole teacher tokens, default) or ``"bytes"`` (one byte at a
            time through the byte model; the reference walk). See the module docstring.
        max_batch_nodes: token walk: teacher tree nodes per call (default: the
            teacher's ``max_batch_tokens``).

    ``tail_mass`` is the row's mass outside the stored top-k, so top-k + tail +
    ``unaccounted_mass`` = 1. Texts are normalized once with the teacher's normalizer.
    `check_text` says which texts are refused and why (texts the teacher cannot encode;
    added tokens, except those both tokenizers have with the token walk).
    After `score`, ``last_stats`` holds the call's cost counters.
    """

    def __init__(
        self,
        teacher_tokenizer: Any,
        student_tokenizer: Any,
        mode: str = "lossless",
        max_depth: int = 24,
        beam: int = 16,
        min_prob: float = 1e-3,
        *,
        eos_token: str | None = None,
        student_eos_token: str | None = None,
        byte_model: ByteModel | None = None,
        walk: str = "tokens",
        max_batch_nodes: int | None = None,
    ) -> None:
        if mode not in ("lossless", "fast"):
            raise ValueError(f"mode must be 'lossless' or 'fast', not {mode!r}")
        if not isinstance(max_depth, int) or max_depth < 1:
            raise ValueError(f"max_depth must be an int >= 1, not {max_depth!r}")
        if beam < 1:
            raise ValueError(f"beam must be >= 1, not {beam!r}")
        if not 0.0 <= min_prob < 1.0:
            raise ValueError(f"min_prob must be in [0, 1), not {min_prob!r}")
        self.mode = mode
        self.max_depth = max_depth
        self.beam = beam
        self.min_prob = min_prob
        self.regime = Regime.LOSSLESS if mode == "lossless" else Regime.APPROXIMATE
        if walk not in ("tokens", "bytes"):
            raise ValueError(f"walk must be 'tokens' or 'bytes', not {walk!r}")
        self.walk = walk
        self.max_batch_nodes = max_batch_nodes
        T = ByteLevelBPE(load_tokenizer(teacher_tokenizer), "teacher")
        if not T.bpe_ids:
            raise TokenizerError("teacher tokenizer has an empty vocabulary")
        if byte_model is not None and (
            byte_model.scorer.T.fingerprint != T.fingerprint
            or (eos_token is not None and eos_token != byte_model.eos_token)
        ):
            raise ValueError("byte_model was built for another teacher tokenizer or EOS token")
        eos_token = T.end_of_text(eos_token)
        self._bytes = byte_model  # the byte walk's (built on first use)
        self.T = T
        self.eos_token = eos_token
        self.S = StudentView(load_tokenizer(student_tokenizer), student_eos_token or self.eos_token)
        self.teacher_eos = T.added_by_content[eos_token]
        # teacher added tokens other than end of text: the student's token of the same
        # content (the token walk lets texts hold them), else no student token (unmapped)
        self.special_map = {
            i: s for i, s in T.added_map(self.S.added_by_content).items() if i != self.teacher_eos
        }
        self.teacher_unmapped = np.asarray(
            sorted(T.added_ids - {self.teacher_eos} - set(self.special_map)), dtype=np.int64
        )
        if walk == "tokens":
            self.trie = VocabTrie({i: b for i, b in T.token_bytes.items() if i not in T.added_ids})
            try:  # the teacher's own stable boundaries give each root its context
                self.TV: StudentView | None = StudentView(T.tokenizer, eos_token, "teacher")
            except TokenizerError:
                self.TV = None  # contexts start at the start of the text (or an added token)
        self.last_stats: dict[str, Any] = {}
        self.walk_stats = {"teacher_contexts": 0, "teacher_calls": 0}

    @property
    def byte_model(self) -> ByteModel:
        """The byte walk's exact next-byte model of the teacher (built on first use)."""
        if self._bytes is None:
            self._bytes = ByteModel(self.T.tokenizer, self.eos_token)
        return self._bytes

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        teacher: Any,
        texts: Sequence[str],
        top_k: int | None = 64,
        rows: Sequence[np.ndarray | None] | None = None,
    ) -> list[ScoredDocument]:
        """Score ``texts``; rows as in `ScoredDocument` (``top_k=None``: dense rows).

        ``rows``: per text, a boolean mask over its ``L + 1`` rows (or None: all): only
        those rows are computed (a job that trains on some positions only, e.g. assistant
        turns, saves the rest); the others come back empty with ``unaccounted_mass`` 1
        and the approximate regime."""
        if top_k is not None and top_k < 1:
            raise ValueError("top_k must be >= 1 or None")
        if rows is not None and len(rows) != len(texts):
            raise ValueError(f"rows has {len(rows)} masks for {len(texts)} texts")
        self.S.clear_cache()
        self.walk_stats = {"teacher_contexts": 0, "teacher_calls": 0}
        norm = [self.check_text(text) for text in texts]
        before: dict[str, int] = {}
        if self.walk == "bytes":
            self.byte_model.bind(teacher)
            before = dict(self.byte_model.stats)
            byte_docs = self.byte_model.prepare_texts(teacher, norm)  # raises for unencodable texts
            teacher_ids = [list(bd.teacher_ids) for bd in byte_docs]
        else:
            teacher_ids = [self.T.tokenizer.encode(x, add_special_tokens=False).ids for x in norm]
        jobs: dict[tuple[int, ...], _RowJob] = {}
        student_ids: list[tuple[int, ...]] = []
        for d, (text, x) in enumerate(zip(texts, norm, strict=True)):
            ids = self.S.encode(x)
            if x != text and ids != self.S.encode(text):
                raise UnscorableTextError(
                    "the teacher's normalization changes the student's encoding of the text"
                )
            want = None if rows is None or rows[d] is None else np.asarray(rows[d], dtype=bool)
            if want is not None and want.shape != (len(ids) + 1,):
                raise ValueError(
                    f"rows[{d}] has shape {want.shape}; the text has {len(ids) + 1} rows"
                )
            xb = x.encode("utf-8")
            for i in range(len(ids) + 1):
                if want is not None and not want[i]:
                    continue
                key = ids[:i]
                job = jobs.get(key)
                if job is None:
                    job = jobs[key] = self._new_job(key)
                if not any(xb.startswith(job.frame_bytes + r) for r in job.roots):
                    raise UnscorableTextError(
                        f"student tokens {list(key)} do not align with the text bytes {xb!r}"
                    )
            student_ids.append(ids)
        if self.walk == "tokens":
            self._run_tokens(teacher, list(jobs.values()))
        else:
            self._run(teacher, list(jobs.values()))
        out = [
            self._document(x, ids, tids, jobs, top_k)
            for x, ids, tids in zip(norm, student_ids, teacher_ids, strict=True)
        ]
        self.last_stats = {
            "documents": len(texts),
            "rows": sum(len(ids) + 1 for ids in student_ids),
            "row_jobs": len(jobs),
            "walk": self.walk,
            # rows the walk read: byte-model rows (bytes) or teacher distributions (tokens)
            "rows_expanded": sum(j.expanded for j in jobs.values()),
            "decision_rule": self.S.decision_rule,
            "teacher_contexts": self.walk_stats["teacher_contexts"],
            "batches": self.walk_stats["teacher_calls"],
        }
        if self.walk == "bytes":
            self.last_stats["byte_rows_cached"] = len(self.byte_model.rows)
            for k, v in self.byte_model.stats.items():
                self.last_stats[k] = self.last_stats.get(k, 0) + v - before[k]
        return out

    def _new_job(self, key: tuple[int, ...]) -> _RowJob:
        """The row after the student tokens ``key``: its roots are the text after the last
        added token in ``key`` (the frame: the teacher's ids of the text up to it)."""
        last = max((j for j, t in enumerate(key) if t in self.S.added_ids), default=-1)
        if last < 0:
            return _RowJob(key, self.S.roots(key), lkey=key)
        frame = b"".join(self.S.bytes_of(t) for t in key[: last + 1])
        lkey = key[last + 1 :]
        return _RowJob(
            key,
            self.S.roots(lkey),
            lkey=lkey,
            frame=tuple(
                self.T.tokenizer.encode(frame.decode("utf-8"), add_special_tokens=False).ids
            ),
            frame_bytes=frame,
        )

    def check_text(self, text: str) -> str:
        """The teacher-normalized ``text``, or `UnscorableTextError` saying why the
        general scorer cannot score it (bytes that do not survive the teacher's
        encode/decode; an added token inside it that the other tokenizer lacks, the
        end-of-text token, or any added token for the byte walk). Cheap: no model, no
        enumeration."""
        x = self.T.normalize(text)
        parts = self.T.split_added(x)
        specials = [p for p in parts if isinstance(p, int)]
        for t in specials:
            content = self.T.token_bytes[t].decode("utf-8")
            if self.walk == "bytes":
                raise UnscorableTextError(
                    f"text contains the added token {content!r}; the byte walk does not "
                    "support added tokens inside texts (walk='tokens' does)"
                )
            if t == self.teacher_eos:
                raise UnscorableTextError(f"text contains the end-of-text added token {content!r}")
            if t not in self.special_map:
                raise UnscorableTextError(
                    f"text contains the teacher's added token {content!r}, which the "
                    "student does not have"
                )
        if specials and self.S.prefix_mode != "none":
            raise UnscorableTextError(
                "texts with added tokens need a student that adds no prefix space "
                f"({self.S.name} prepends one)"
            )
        for content in self.S.added_by_content:
            if content in x and content not in self.T.added_by_content:
                raise UnscorableTextError(
                    f"text contains the student's added token {content!r}, which the "
                    "teacher does not have"
                )
        got = [i for i in self.S.encode(x) if i in self.S.added_ids]
        if got != [self.special_map[t] for t in specials]:
            raise UnscorableTextError("the student splits the text's added tokens differently")
        for part in parts:
            if isinstance(part, str):
                self.T.encode_exact(part)
        return x

    def _roots(
        self, teacher: Any, jobs: list[_RowJob]
    ) -> Iterator[tuple[_RowJob, int, bytes, float]]:
        """Start of the byte walk: every row's roots weighted by the byte model (relative to
        the heaviest, ``log_shift``), with their local offsets and the starting mass.
        Yields ``(job, root index, root, weight)`` for every root of every row the
        teacher can produce."""
        self.byte_model.ensure(teacher, [r for job in jobs for r in job.roots], closed=True)
        for job in jobs:
            lps = [self.byte_model.log_prefix(r) for r in job.roots]
            job.log_shift = max(lps)
            if job.log_shift == -math.inf:
                continue  # the teacher never produces this prefix: an all-zero row
            for k, (r, lp) in enumerate(zip(job.roots, lps, strict=True)):
                self._add_local(job, r)
                w = math.exp(lp - job.log_shift)
                job.start += w
                yield job, k, r, w

    def _add_local(self, job: _RowJob, r: bytes) -> None:
        """Record where decisions on branches of root ``r`` start (`StudentView.local_offset`)."""
        q, n = self.S.local_offset(r)
        if job.lkey[:n] != self.S.stable_tokens(r):
            q, n = 0, 0  # this root's stable tokens disagree with the key
        job.local.append((q, n))

    def _run(self, teacher: Any, jobs: list[_RowJob]) -> None:
        """The byte walk: level-by-level enumeration of all rows together (one teacher
        batch per level)."""
        for job, k, r, w in self._roots(teacher, jobs):
            if w > 0.0:
                self._place(job, r, w, k)
        depth = 0
        while True:
            active = [job for job in jobs if job.frontier]
            if not active:
                break
            for job in active:
                if depth >= self.max_depth:
                    job.cut += sum(w for _, w, _ in job.frontier)
                    job.frontier = []
                elif self.mode == "fast":
                    self._prune(job)
            active = [job for job in active if job.frontier]
            self.byte_model.ensure(teacher, {y for job in active for y, _, _ in job.frontier})
            for job in active:
                frontier, job.frontier = job.frontier, []
                for y, w, k in frontier:
                    self._expand(job, y, w, k)
            depth += 1

    def _prune(self, job: _RowJob) -> None:
        job.frontier = self._keep(job, job.frontier, lambda n: n[1])

    def _keep(self, job: _RowJob, items: list[_T], weight: Callable[[_T], float]) -> list[_T]:
        """Fast mode: the items at or above the row's floor, at most ``beam`` of them
        (heaviest first); the weight of the others is added to ``job.pruned``."""
        floor = self.min_prob * job.start
        keep = [x for x in items if weight(x) >= floor]
        job.pruned += sum(weight(x) for x in items if weight(x) < floor)
        if len(keep) > self.beam:
            keep.sort(key=lambda x: -weight(x))
            job.pruned += sum(weight(x) for x in keep[self.beam :])
            keep = keep[: self.beam]
        return keep

    def _place(self, job: _RowJob, y: bytes, w: float, k: int) -> None:
        """Account a branch that has just been reached, or queue it for expansion."""
        if not self._decide(job, y, w, k):
            job.frontier.append((y, w, k))

    def _decide(self, job: _RowJob, y: bytes, w: float, k: int) -> bool:
        """Account the mass ``w`` of every text starting with ``y`` (from root ``k``)
        when the student's token at the row's index is known for all of them (or they
        are inconsistent with the row's prefix, or not valid UTF-8); False: undecided."""
        q, n = job.local[k]
        if _utf8_split(y[q:]) is None:  # (y[:q] is whole characters)
            job.unmapped += w  # no valid text starts with y: the student cannot see it
            return True
        key = job.lkey
        i = len(key) - n
        toks = self.S.stable_tokens(y[q:])
        m = min(len(toks), i)
        if toks[:m] != key[n : n + m]:
            job.excluded += w
        elif len(toks) > i:
            job.mass[toks[i]] += w
        else:
            return False
        return True

    def _expand(self, job: _RowJob, y: bytes, w: float, k: int) -> None:
        row = self.byte_model.row(y)
        job.expanded += 1
        if row[EOS_COL] > 0.0:
            self._end(job, y, w * float(row[EOS_COL]), k, self.S.eos_id)
        if row[UNMAPPED_COL] > 0.0:
            self._end(job, y, w * float(row[UNMAPPED_COL]), k, None)
        for b in np.flatnonzero(row[:256]):
            self._place(job, y + bytes((int(b),)), w * float(row[b]), k)

    # ------------------------------------------------------------------ token walk
    def _run_tokens(self, teacher: Any, jobs: list[_RowJob]) -> None:
        """The token walk (see the module docstring): level by level, every open node
        of every row gets one teacher distribution (one batched call per level), and all
        its next tokens are decided at once by walking the teacher's byte trie."""
        for job in jobs:
            job.log_shift = math.nan  # set by the row's first root node
            for k, r in enumerate(job.roots):
                self._add_local(job, r)
                qt, ctx = self.TV.stable_split(r) if self.TV is not None else (0, ())
                job.contexts.append((*job.frame, *ctx))
                job.heads.append(r[:qt])
                # a root inconsistent with the row's prefix (another Metaspace reading)
                # carries no mass the row counts; the others start a node whose weight,
                # P_T(context) relative to exp(log_shift), comes with its teacher call
                if not self._decide(job, r, 0.0, k):
                    job.nodes.append(_Node(k, (), b"", math.nan))
        while True:
            active = [job for job in jobs if job.nodes]
            if not active:
                break
            work: list[tuple[_RowJob, _Node]] = []
            for job in active:
                if self.mode == "fast":
                    self._prune_nodes(job)
                work.extend((job, node) for node in job.nodes)
                job.nodes = []
            for chunk, probs, cum, path_lp in self._node_probs(teacher, work):
                for (job, node), lp in zip(chunk, path_lp, strict=True):
                    if not node.sigma and (math.isnan(job.log_shift) or lp > job.log_shift):
                        self._shift(job, lp)  # weights stay relative to the heaviest root
                for (job, node), p, c, lp in zip(chunk, probs, cum, path_lp, strict=True):
                    if not node.sigma:
                        node.w = math.exp(lp - job.log_shift) if lp > -math.inf else 0.0
                    self._expand_node(job, node, p, c)

    @staticmethod
    def _shift(job: _RowJob, log_shift: float) -> None:
        """Make ``log_shift`` the job's reference weight, rescaling what it holds."""
        if not math.isnan(job.log_shift) and job.log_shift > -math.inf:
            f = math.exp(job.log_shift - log_shift)
            for g in job.mass:
                job.mass[g] *= f
            job.excluded *= f
            job.unmapped *= f
            job.cut *= f
            job.pruned *= f
            job.start *= f
            for n in job.nodes:
                n.w *= f
        job.log_shift = log_shift

    def _prune_nodes(self, job: _RowJob) -> None:
        """Fast mode: drop nodes below the floor, keep the ``beam`` heaviest (root nodes,
        whose weight is not known yet, always stay)."""
        roots = [n for n in job.nodes if not n.sigma]
        rest = [n for n in job.nodes if n.sigma]
        job.nodes = roots + self._keep(job, rest, lambda n: n.w)

    def _node_probs(
        self, teacher: Any, work: list[tuple[_RowJob, _Node]]
    ) -> Iterator[tuple[list[tuple[_RowJob, _Node]], np.ndarray, np.ndarray, list[float]]]:
        """Teacher next-token probabilities (float64, ``[n, teacher ids]``) after each
        node's context + tokens, their cumulative sums in trie order (computed on the
        teacher's device) and log P_T(context + tokens), one merged prefix tree (one
        teacher call) at a time."""
        docs = [_ContextPath((*job.contexts[node.k], *node.sigma)) for job, node in work]
        mbt = int(getattr(teacher, "max_batch_tokens", 1024))
        cap = self.max_batch_nodes or max(2, mbt - len(getattr(teacher, "start_ids", [0])) + 1)
        trees, where = merge_context_trees(docs, cap)
        members: list[list[int]] = [[] for _ in trees]
        for j, (t, _) in enumerate(where):
            members[t].append(j)
        width = self.T.size
        for t, tree in enumerate(trees):
            (lp,) = teacher_tree_logprobs(teacher, [tree])
            self.walk_stats["teacher_contexts"] += len(tree[0])
            self.walk_stats["teacher_calls"] += 1
            rows = [where[j][1][0] for j in members[t]]
            tokens, parents = tree
            steps = lp[parents[1:], tokens[1:]].double().cpu().numpy()
            path = np.zeros(len(tokens))  # log P_T of every tree node's path (parents first)
            for v in range(1, len(tokens)):
                path[v] = path[parents[v]] + steps[v - 1]
            sel = lp.index_select(0, torch.as_tensor(rows, device=lp.device)).double()
            if sel.shape[1] < width:  # ids the teacher has no logit for: probability 0
                sel = torch.nn.functional.pad(sel, (0, width - sel.shape[1]), value=-math.inf)
            probs = torch.exp(sel[:, :width])
            cum = self.trie.cumulative(probs)
            yield (
                [work[j] for j in members[t]],
                probs.cpu().numpy(),
                cum.cpu().numpy(),
                [float(path[v]) for v in rows],
            )

    def _expand_node(self, job: _RowJob, node: _Node, p: np.ndarray, cum: np.ndarray) -> None:
        """Account or queue every next teacher token of ``node`` (``p``: its teacher
        distribution, ``cum``: its cumulative sums in trie order)."""
        job.expanded += 1
        k = node.k
        head = job.heads[k]
        u = job.roots[k][len(head) :]  # the root's bytes after its head
        y = head + node.z
        if not u and not node.sigma:
            job.start += node.w  # every text from this root's context starts with it
        if len(node.z) >= len(u):  # node.z starts with u: the texts start with the root
            pe = float(p[self.teacher_eos])
            if pe > 0.0:
                self._end(job, y, node.w * pe, k, self.S.eos_id)
            for t, sid in self.special_map.items():
                if p[t] > 0.0:
                    self._end(job, y, node.w * float(p[t]), k, sid)
            pu = float(p[self.teacher_unmapped].sum()) if self.teacher_unmapped.size else 0.0
            if pu > 0.0:
                self._end(job, y, node.w * pu, k, None)
            self._descend(job, node, y, b"", p, cum)
            return
        # inside the root: tokens ending within u (or at its end) are nodes to expand;
        # tokens running past its end are branches; the rest do not start with the root
        rem = u[len(node.z) :]
        # the row's starting mass (the fast mode's scale) gathers, over the nodes inside
        # the root, the mass of their next tokens that reach its end: every token
        # sequence of a text starting with the root crosses that end exactly once
        lo, hi = self.trie.range(rem)
        job.start += node.w * float(cum[hi] - cum[lo])
        for j in range(1, len(rem) + 1):
            for v in self.trie.exact.get(rem[:j], ()):
                pv = float(p[v])
                if pv > 0.0:
                    job.nodes.append(_Node(k, (*node.sigma, v), node.z + rem[:j], node.w * pv))
        self._descend(job, node, y, rem, p, cum)

    def _descend(
        self, job: _RowJob, node: _Node, y: bytes, beta: bytes, p: np.ndarray, cum: np.ndarray
    ) -> None:
        """Walk the trie below ``beta``: a byte prefix ``b`` of next tokens is the branch
        ``y + b`` holding the mass of every token starting with it. A decided branch is
        accounted whole; an undecided one queues the token equal to ``b`` (if any) and
        goes on into the next byte (pruned or cut where the limits say)."""
        floor = self.min_prob * job.start if self.mode == "fast" else 0.0
        tiny = floor * DECIDE_FLOOR
        end_depth = len(job.roots[node.k]) + self.max_depth
        w = node.w
        stack = [beta]
        while stack:
            kids, los, his = self.trie.kids(stack.pop())
            if not kids:
                continue
            ms = w * (cum[his] - cum[los])
            small = ms <= tiny
            if tiny > 0.0 and small.any():
                job.pruned += float(ms[small].sum())  # fast mode: not worth a decision
            for c in np.flatnonzero(~small if tiny > 0.0 else ms > 0.0).tolist():
                b, m = kids[c], float(ms[c])
                yb = y + b
                if self._decide(job, yb, m, node.k):
                    continue
                if m < floor:
                    job.pruned += m
                    continue
                if len(yb) >= end_depth:
                    job.cut += m
                    continue
                for v in self.trie.exact.get(b, ()):
                    pv = float(p[v])
                    if pv > 0.0:
                        job.nodes.append(_Node(node.k, (*node.sigma, v), node.z + b, w * pv))
                stack.append(b)

    def _end(self, job: _RowJob, y: bytes, p: float, k: int, end_id: int | None) -> None:
        """The text (segment) ends after ``y``, followed by the student token ``end_id``
        (its end of text, or an added token), or by a teacher special the student lacks
        (None: unmapped)."""
        q, n = job.local[k]
        try:
            text = y[q:].decode("utf-8")
        except UnicodeDecodeError:
            job.unmapped += p
            return
        if n and self.S.nfc and not unicodedata.is_normalized("NFC", text):
            q = n = 0  # normalization of the rest alone may differ: encode the whole text
            text = y.decode("utf-8")
        ids = self.S.encode(text)
        i = len(job.lkey) - n
        if len(ids) < i or ids[:i] != job.lkey[n:]:
            job.excluded += p
        elif end_id is None:
            job.unmapped += p
        else:
            job.mass[ids[i] if len(ids) > i else end_id] += p

    # ------------------------------------------------------------------ assembly
    def _text_logprob(self, text: str, encoding_lp: float) -> float:
        """log P(the text is exactly ``text``): under the byte model (byte walk; for a
        teacher without non-canonical mass, log P_T(canonical encoding + EOS)), or
        log P(the student encoding is exactly this one) (token walk; the same for an
        injective student)."""
        if self.walk == "tokens":
            return float(encoding_lp)
        tb = text.encode("utf-8")
        eos = float(self.byte_model.row(tb)[EOS_COL])
        return self.byte_model.log_prefix(tb) + math.log(max(eos, 1e-300))

    def _document(
        self,
        text: str,
        ids: tuple[int, ...],
        teacher_ids: Sequence[int],
        jobs: dict[tuple[int, ...], _RowJob],
        top_k: int | None,
    ) -> ScoredDocument:
        L = len(ids)
        vs = self.S.size
        dense = np.full((L + 1, vs), -np.inf)
        unacc = np.zeros(L + 1)
        unmapped = np.zeros(L + 1)
        prefix_lp = np.full(L + 1, -np.inf)
        regime = np.full(L + 1, int(Regime.LOSSLESS), dtype=np.uint8)
        expanded = 0
        for i in range(L + 1):
            job = jobs.get(ids[:i])
            if job is None:  # a row not asked for: not computed, all of it unaccounted
                regime[i] = int(Regime.APPROXIMATE)
                unacc[i] = 1.0
                continue
            expanded += job.expanded
            lost = job.cut + job.pruned
            z = sum(job.mass.values()) + lost
            if lost > 0.0:
                regime[i] = int(Regime.APPROXIMATE)
            if z > 0.0:
                for g, m in job.mass.items():
                    if m > 0.0:
                        dense[i, g] = math.log(m / z)
                unacc[i] = lost / z
            if z + job.unmapped > 0.0:
                unmapped[i] = job.unmapped / (z + job.unmapped)
                prefix_lp[i] = job.log_shift + math.log(z + job.unmapped)
        next_ids = np.asarray([*ids, self.S.eos_id], dtype=np.int64)
        target = dense[np.arange(L + 1), next_ids]
        # Share of the mass reaching row i that the byte model lost between rows (its
        # dropped non-canonical teacher mass); only meaningful between lossless rows.
        noncanon = np.zeros(L + 1)
        for i in range(1, L + 1):
            if regime[i] == regime[i - 1] == Regime.LOSSLESS:
                incoming = prefix_lp[i - 1] + math.log1p(-unmapped[i - 1]) + target[i - 1]
                if np.isfinite(incoming) and np.isfinite(prefix_lp[i]):
                    noncanon[i] = max(0.0, -math.expm1(prefix_lp[i] - incoming))
        topk_ids = topk_lp = None
        tail = np.zeros(L + 1)
        if top_k is not None:
            k = min(top_k, vs)
            topk_ids = np.argsort(-dense, axis=1, kind="stable")[:, :k]
            topk_lp = np.take_along_axis(dense, topk_ids, axis=1)
            tail = np.clip(np.exp(dense).sum(1) - np.exp(topk_lp).sum(1), 0.0, None)
        return ScoredDocument(
            text=text,
            student_ids=np.asarray(ids, dtype=np.int64),
            teacher_ids=np.asarray(teacher_ids, dtype=np.int64),
            topk_ids=topk_ids,
            topk_logprobs=topk_lp,
            logprobs=dense if top_k is None else None,
            tail_mass=tail,
            target_logprobs=target,
            unmapped_mass=unmapped,
            unaccounted_mass=unacc,
            noncanonical_mass=noncanon,
            regime=regime,
            prefix_logprob=prefix_lp,
            stats={
                "text_logprob": self._text_logprob(text, prefix_lp[L] + target[L]),
                "decision_rule": self.S.decision_rule,
                "rows_expanded": expanded,
                "max_unaccounted": float(unacc.max()),
            },
        )
