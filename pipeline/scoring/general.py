"""General scorer: student targets for an arbitrary student tokenizer
(``../shared/spec/scoring.md`` §3). Correct (brute-force checked) but far costlier than
the subset-exact scorer (see "Cost" below).

Modules: this one holds the scorer and its two walks (`GeneralScorer`);
`pipeline.scoring.student_view` the student tokenizer and the decision rule
(`StudentView`); `pipeline.scoring.byte_model` the byte walk's next-byte model
(`ByteModel`); `pipeline.scoring.vocab_trie` the token walk's byte trie of the teacher
vocabulary (`VocabTrie`). Their names stay importable from here.

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
  rest of the text (in ``bounded`` mode such rows end up wholly unaccounted).
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
mass of branches still undecided there is the row's unaccounted mass. ``bounded``
(``fast``, its former name, is still accepted and gives the same rows):
additionally drop undecided branches below ``min_prob`` (relative to the row's
starting mass) and keep at most ``beam`` branches per depth (byte walk) or ``beam``
nodes per level (token walk, which also drops trie branches below
``DECIDE_FLOOR * min_prob`` without deciding them). A dropped token-walk node counts
its whole weight, an upper bound on the mass it would have brought. Rows are
``m(g) / Z`` with ``Z`` = consistent decided mass + unaccounted mass, so a row sums to
``1 - unaccounted_mass``; ``row(g) <= truth(g) <= row(g) + unaccounted_mass``.

``approx`` (token walk only; issue 17): the bounded walk with the same teacher calls,
but no mass is left unplaced. (a) Every branch the bounded walk would drop (a node
pruned by the floor or the beam, a trie branch below the floor, a branch cut at
``max_depth``) is placed by the word-end estimate (`GeneralScorer._estimate`): on the
student token at the row's index in the encoding of the text that ends right after the
branch's heaviest teacher token (a node: its own last token; a trie branch: the
heaviest token of its range). Where that encoding does not start with the row's prefix
(or has no token at the index), the mass joins the row's remainder, which
renormalisation spreads over the row. Trie branches below ``DECIDE_FLOOR * min_prob``
are placed so without a decision: for a branch that is decided, the text closed after
its heaviest token starts with the branch's stable tokens, so the estimate gives the
decided token (its mass is only counted as estimated), at a third of a decision's cost
(about 10^4 such branches per row with SmolLM2). (b) The
document's own continuation is never pruned: the nodes whose teacher tokens are a prefix
of the canonical teacher encoding of the document after the root's context, and the
trie branches leading to the next of those tokens, are kept outside the beam and the
floor (their mass summed directly rather than from the cumulative sums, which lose a
range far lighter than what precedes it), so the document's next token gets at least
the mass of its own path. Row jobs are then per student prefix AND document
continuation (a row depends on its own document only, not on the batch). (c) Rows
``(decided + placed)(g) / (decided + placed)`` sum to 1. (d) ``estimated_mass`` =
(placed + remainder) / ``Z``: the share not enumerated; the decided part is a bounded
row, so ``TV(row, truth) <= estimated_mass`` (checked by brute force). Regime
approximate on every row, unaccounted mass 0.

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
SmolLM2 on two GSM8K texts at beam 16, min_prob 1e-3, a row loses on average 0.21 of
its mass to branches below the 0.1% floor and 0.12 to the beam, and every further word
costs one teacher position (the full model, not just its head), so a row's unaccounted
mass falls slowly with the beam (README, "General scorer error table").

What keeps the teacher positions down (`_node_probs`):

- The document's forward. Every teacher context of a row is its document's canonical
  teacher ids up to some point, followed by a few tokens. Contexts are sent as
  `PrefixTree` items on those ids: the document is forwarded once (its rows give every
  root context's distribution and the path log-probs, and in approx mode the gold
  path's distributions, kept for later levels up to `PRE_ROWS_BYTES`), and a teacher
  with a native ``prefix_tree_logprobs`` (`pipeline.teacher.HFTeacher`, which keeps the
  document's keys and values) forwards only the new tokens of each level; other
  teachers get the same contexts as prefix trees (`prefix_tree_logprobs`' fallback).
  A new node's ancestors off the document are forwarded again at each level.
- ``budget``: at most this many nodes expanded per row over all levels, off the
  document's own path (heaviest first, still within ``beam`` per level). The rest are
  dropped like the beam's (bounded: unaccounted; approx: placed by the estimate).
- Approx mode places a dropped trie branch token by token (`SPLIT_TOKENS` heaviest
  tokens, each at its own word end), so that a branch such as `` tw...`` below the floor
  does not send `` twice`` and `` twelve`` to `` two``: at no teacher cost, this cut
  the rigorous TV lower bound at beam 4 by 1.3-2.3x (jobs/bench/README.md).
"""

from __future__ import annotations

import bisect
import math
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.scoring.byte_model import EOS_COL, UNMAPPED_COL, ByteModel
from pipeline.scoring.common import Regime, ScoredDocument
from pipeline.scoring.protocol import Teacher
from pipeline.scoring.student_view import StudentView, _utf8_split
from pipeline.scoring.trees import PrefixTree, prefix_tree_logprobs
from pipeline.scoring.vocab_trie import VocabTrie
from pipeline.tokenization import (
    ByteLevelBPE,
    TokenizerError,
    UnscorableTextError,
    load_tokenizer,
)

# Bounded mode, token walk: trie branches below this share of ``min_prob`` are dropped
# (unaccounted) without deciding them; most trie branches weigh far less than that
# (approx mode places them by the word-end estimate instead).
DECIDE_FLOOR = 0.01

# Approx mode: a dropped trie branch is placed token by token, its heaviest tokens (at
# most this many, each above the tiny-branch floor) each at its own word end.
SPLIT_TOKENS = 16

# Token walk: the document-forward rows kept for later levels (root and gold-path
# contexts) take at most this many bytes in all per `score` call (float32 rows, on the
# teacher's device); a context past it is asked of the teacher again (one position with
# a native prefix forward).
PRE_ROWS_BYTES = 512 << 20

_T = TypeVar("_T")

MODES = ("lossless", "bounded", "approx")
MODE_ALIASES = {"fast": "bounded"}  # deprecated spelling (configs, manifests before approx)


@dataclass(frozen=True)
class GeneralPrepared:
    """A text after `GeneralScorer.prepare`: checked (`GeneralScorer.check_text`) and
    encoded by the student; the scorer builds its teacher contexts when it scores."""

    text: str  # as given
    student_ids: tuple[int, ...]


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
    start: float = 0.0  # starting mass: the pruning modes' scale (see the walks)
    # per root: (byte offset q, token count n) of `StudentView.local_offset`; a branch
    # from root k is decided on its bytes from q against key[n:]
    local: list[tuple[int, int]] = field(default_factory=list)
    frontier: list[tuple[bytes, float, int]] = field(default_factory=list)  # (y, w, root)
    mass: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    excluded: float = 0.0  # inconsistent with the prefix: out of numerator and denominator
    unmapped: float = 0.0  # specials the student lacks, texts that are not valid UTF-8
    cut: float = 0.0  # undecided at max_depth
    pruned: float = 0.0  # dropped by min_prob / beam (bounded mode)
    expanded: int = 0  # byte-model rows (byte walk) or teacher rows (token walk) used
    # token walk, per root: the teacher context (canonical ids of the text before the
    # root's last stable teacher boundary) and the bytes it stands for
    contexts: list[tuple[int, ...]] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)
    nodes: list[_Node] = field(default_factory=list)  # token walk: to expand next
    # approx mode: the document's own continuation (the gold path). ``gold_text``: the
    # document's bytes after the frame, cut ``max_depth`` bytes past the longest root;
    # ``gold_sigma[k]``: its canonical teacher ids after root k's context (empty when
    # the text does not start with root k); ``gold_token``: the document's next token
    gold_text: bytes | None = None
    gold_sigma: list[tuple[int, ...]] = field(default_factory=list)
    gold_token: int | None = None
    # token walk: the canonical teacher ids of the (first) document of this row, whose
    # forward the row's teacher contexts hang off (`GeneralScorer._node_probs`)
    doc_ids: tuple[int, ...] = ()
    spent: int = 0  # nodes kept for expansion off the gold path (``budget``)
    placed: float = 0.0  # approx: dropped mass placed on a token by the word-end estimate
    remainder: float = 0.0  # approx: dropped mass the estimate could not place


@dataclass
class _Node:
    """A node of the token walk: teacher tokens ``sigma`` after root ``k``'s context,
    standing for the bytes ``z`` after its head, with weight ``w`` (relative)."""

    k: int
    sigma: tuple[int, ...]
    z: bytes
    w: float  # NaN for a root node (sigma empty) until its context's P_T is known
    gold: bool = False  # approx: sigma is a prefix of the document's own continuation


class GeneralScorer:
    """Student targets for an arbitrary student tokenizer (scoring.md §3).

    Args:
        teacher_tokenizer: the teacher's byte-level BPE tokenizer (any form
            `load_tokenizer` takes).
        student_tokenizer: the student's tokenizer (see `StudentView` for what is
            supported); it must have an added token with the teacher's end-of-text content.
        mode: ``"lossless"`` (enumerate until decided or ``max_depth``), ``"bounded"``
            (also prune by ``min_prob`` and ``beam``; the pruned mass is unaccounted, so
            rows are rigorous lower bounds) or ``"approx"`` (the bounded walk, but the
            pruned mass is placed by an estimate and the document's own continuation is
            never pruned; rows sum to 1, ``estimated_mass`` says how much was not
            enumerated; token walk only). ``"fast"``: deprecated alias of ``"bounded"``
            (same rows; the name and params keep the spelling given).
        max_depth: at most this many bytes are appended to a row's text prefix; a
            branch still undecided there is cut and its mass is unaccounted.
        beam: bounded/approx: undecided branches kept per depth (byte walk) or nodes expanded
            per level (token walk), highest weight first.
        min_prob: bounded/approx: undecided branches below this share of the row's
            starting mass are dropped (bounded: unaccounted; approx: placed by estimate).
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
        budget: token walk, bounded/approx: at most this many nodes expanded per row
            over all levels (heaviest first, within ``beam`` per level), not counting
            the row's roots and (approx) its document's own continuation, whose teacher
            distributions come with the document's forward. None: no cap.

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
        budget: int | None = None,
    ) -> None:
        if mode not in MODES and mode not in MODE_ALIASES:
            raise ValueError(f"mode must be one of {MODES} (or 'fast'), not {mode!r}")
        if not isinstance(max_depth, int) or max_depth < 1:
            raise ValueError(f"max_depth must be an int >= 1, not {max_depth!r}")
        if beam < 1:
            raise ValueError(f"beam must be >= 1, not {beam!r}")
        if not 0.0 <= min_prob < 1.0:
            raise ValueError(f"min_prob must be in [0, 1), not {min_prob!r}")
        if budget is not None and (not isinstance(budget, int) or budget < 0):
            raise ValueError(f"budget must be None or an int >= 0, not {budget!r}")
        if budget is not None and walk != "tokens":
            raise ValueError("budget needs walk='tokens'")
        self.budget = budget
        self.mode = mode  # as given (provenance: name, params)
        self.kind = MODE_ALIASES.get(mode, mode)  # what the walk does
        self.max_depth = max_depth
        self.beam = beam
        self.min_prob = min_prob
        self.regime = Regime.LOSSLESS if mode == "lossless" else Regime.APPROXIMATE
        if walk not in ("tokens", "bytes"):
            raise ValueError(f"walk must be 'tokens' or 'bytes', not {walk!r}")
        if self.kind == "approx" and walk != "tokens":
            raise ValueError("mode 'approx' needs walk='tokens'")
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
        self._chains: dict[tuple[int, ...], np.ndarray] = {}  # per `score` call
        self._rows: dict[tuple[int, ...], dict[int, torch.Tensor]] = {}  # (`_node_probs`)
        self._flip = False  # (`_node_probs`)

    # ------------------------------------------------------------------ the Scorer interface
    # (`pipeline.scoring.protocol.Scorer`)
    @property
    def name(self) -> str:
        return f"general-{self.mode}"

    @property
    def params(self) -> dict[str, Any]:
        """Settings that change the targets (the job config's ``scoring.general``)."""
        return {
            "mode": self.mode,
            "walk": self.walk,
            "max_depth": self.max_depth,
            "beam": self.beam,
            "min_prob": self.min_prob,
            "budget": self.budget,
        }

    @property
    def student(self) -> StudentView:
        return self.S

    def prepare(self, text: str) -> GeneralPrepared:
        """`check_text` and the student's encoding (`UnscorableTextError` for a text the
        scorer refuses, or whose student encoding the teacher's normalizer changes)."""
        x = self.check_text(text)
        ids = self.S.encode(x)
        if x != text and ids != self.S.encode(text):
            raise UnscorableTextError(
                "the teacher's normalization changes the student's encoding of the text"
            )
        return GeneralPrepared(text, ids)

    def tree_tokens(self, prepared: GeneralPrepared) -> None:
        """None: the scorer builds its own teacher contexts (and splits them to fit)."""
        return None

    def context_nodes(self, prepared: GeneralPrepared) -> int:
        return 3 * len(prepared.text)

    def score_prepared(
        self,
        teacher: Teacher,
        prepared: Sequence[GeneralPrepared],
        top_k: int | None = 64,
        *,
        rows: Sequence[np.ndarray | None] | None = None,
    ) -> list[ScoredDocument]:
        """`score` of the prepared texts (only the ``rows`` asked for)."""
        return self.score(teacher, [p.text for p in prepared], top_k, rows=rows)

    @property
    def byte_model(self) -> ByteModel:
        """The byte walk's exact next-byte model of the teacher (built on first use)."""
        if self._bytes is None:
            self._bytes = ByteModel(self.T.tokenizer, self.eos_token)
        return self._bytes

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        teacher: Teacher,
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
        self._chains = {}
        self._rows = {}
        norm = [self.check_text(text) for text in texts]
        before: dict[str, int] = {}
        if self.walk == "bytes":
            self.byte_model.bind(teacher)
            before = dict(self.byte_model.stats)
            byte_docs = self.byte_model.prepare_texts(teacher, norm)  # raises for unencodable texts
            teacher_ids = [list(bd.teacher_ids) for bd in byte_docs]
        else:
            teacher_ids = [self.T.tokenizer.encode(x, add_special_tokens=False).ids for x in norm]
        # row jobs by student prefix (approx: by prefix and the document's continuation,
        # whose path the walk never prunes: a row depends on its own document only)
        jobs: dict[Any, _RowJob] = {}
        student_ids: list[tuple[int, ...]] = []
        row_jobs: list[list[_RowJob | None]] = []
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
            mine: list[_RowJob | None] = []
            for i in range(len(ids) + 1):
                if want is not None and not want[i]:
                    mine.append(None)
                    continue
                key = ids[:i]
                jkey: Any = key
                job = jobs.get(key) if self.kind != "approx" else None
                if self.kind == "approx":
                    job = self._new_job(key)
                    base = len(job.frame_bytes)
                    gold = xb[base : base + max(map(len, job.roots)) + self.max_depth]
                    jkey = (key, gold)
                    if jkey in jobs:
                        job = jobs[jkey]
                    else:
                        job.gold_text = gold
                        job.gold_token = ids[i] if i < len(ids) else self.S.eos_id
                        jobs[jkey] = job
                elif job is None:
                    job = jobs[key] = self._new_job(key)
                if not any(xb.startswith(job.frame_bytes + r) for r in job.roots):
                    raise UnscorableTextError(
                        f"student tokens {list(key)} do not align with the text bytes {xb!r}"
                    )
                if not job.doc_ids:
                    job.doc_ids = tuple(teacher_ids[d])
                mine.append(job)
            student_ids.append(ids)
            row_jobs.append(mine)
        if self.walk == "tokens":
            self._run_tokens(teacher, list(jobs.values()))
            self._rows = {}  # (the document-forward rows kept for the walk)
        else:
            self._run(teacher, list(jobs.values()))
        out = [
            self._document(x, ids, tids, mine, top_k)
            for x, ids, tids, mine in zip(norm, student_ids, teacher_ids, row_jobs, strict=True)
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
        self, teacher: Teacher, jobs: list[_RowJob]
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

    def _run(self, teacher: Teacher, jobs: list[_RowJob]) -> None:
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
                elif self.kind != "lossless":
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

    def _keep(
        self, job: _RowJob, items: list[_T], weight: Callable[[_T], float], cap: int | None = None
    ) -> list[_T]:
        """Bounded mode: `_split` with ``cap`` (default ``beam``); the weight of the
        dropped items is added to ``job.pruned``."""
        keep, low, over = self._split(job, items, weight, self.beam if cap is None else cap)
        job.pruned += sum(weight(x) for x in low)
        job.pruned += sum(weight(x) for x in over)
        return keep

    def _split(
        self, job: _RowJob, items: list[_T], weight: Callable[[_T], float], cap: int
    ) -> tuple[list[_T], list[_T], list[_T]]:
        """The items at or above the row's floor, at most ``cap`` of them (heaviest
        first); then those below the floor, and those over the cap."""
        floor = self.min_prob * job.start
        keep = [x for x in items if weight(x) >= floor]
        low = [x for x in items if weight(x) < floor]
        over: list[_T] = []
        if len(keep) > cap:
            keep.sort(key=lambda x: -weight(x))
            keep, over = keep[:cap], keep[cap:]
        return keep, low, over

    def _node_cap(self, job: _RowJob) -> int:
        """Nodes a row may still keep at this level: ``beam``, within what is left of its
        ``budget``."""
        if self.budget is None:
            return self.beam
        return min(self.beam, max(0, self.budget - job.spent))

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
    def _run_tokens(self, teacher: Teacher, jobs: list[_RowJob]) -> None:
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
                if job.gold_text is not None:
                    job.gold_sigma.append(self._gold_sigma(job.gold_text, r, r[:qt], ctx))
                # a root inconsistent with the row's prefix (another Metaspace reading)
                # carries no mass the row counts; the others start a node whose weight,
                # P_T(context) relative to exp(log_shift), comes with its teacher call
                if not self._decide(job, r, 0.0, k):
                    gold = bool(job.gold_sigma) and bool(job.gold_sigma[k])
                    job.nodes.append(_Node(k, (), b"", math.nan, gold))
        while True:
            active = [job for job in jobs if job.nodes]
            if not active:
                break
            work: list[tuple[_RowJob, _Node]] = []
            for job in active:
                if self.kind != "lossless":
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
            job.placed *= f
            job.remainder *= f
            job.start *= f
            for n in job.nodes:
                n.w *= f
        job.log_shift = log_shift

    def _prune_nodes(self, job: _RowJob) -> None:
        """Bounded mode: drop nodes below the floor, keep the ``beam`` heaviest (root
        nodes, whose weight is not known yet, always stay). Approx mode: the same, but
        the gold path's nodes always stay too (outside the beam), and each dropped
        node's weight is placed where the word would end after its last token."""
        cap = self._node_cap(job)
        if self.kind != "approx":
            roots = [n for n in job.nodes if not n.sigma]
            rest = self._keep(job, [n for n in job.nodes if n.sigma], lambda n: n.w, cap)
            job.spent += len(rest)
            job.nodes = roots + rest
            return
        stay = [n for n in job.nodes if not n.sigma or n.gold]
        rest = [n for n in job.nodes if n.sigma and not n.gold]
        keep, low, over = self._split(job, rest, lambda n: n.w, cap)
        job.spent += len(keep)
        for n in (*low, *over):
            self._estimate(job, job.heads[n.k] + n.z, n.w, n.k)
        job.nodes = stay + keep

    def _gold_sigma(
        self, gold: bytes, r: bytes, head: bytes, ctx: tuple[int, ...]
    ) -> tuple[int, ...]:
        """Approx mode: the canonical teacher ids of the document's continuation ``gold``
        after the context ``ctx`` (the encoding of ``head``) of root ``r``; empty when
        the document does not start with ``r`` or its encoding does not start with
        ``ctx``."""
        if not gold.startswith(r):
            return ()
        if head and self.TV is not None and self.TV.prefix_mode != "prepend":
            # ``head`` ends at a stable teacher boundary: the pieces after it are the
            # pre-tokenization of the rest alone (`StudentView.local_offset`), so the
            # rest is encoded alone (not the whole text again for every row)
            split = _utf8_split(gold[len(head) :])
            if split is None:
                return ()
            return tuple(self.T.tokenizer.encode(split[0], add_special_tokens=False).ids)
        split = _utf8_split(gold)
        if split is None:
            return ()
        ids = self.T.tokenizer.encode(split[0], add_special_tokens=False).ids
        if tuple(ids[: len(ctx)]) != ctx:
            return ()
        return tuple(ids[len(ctx) :])

    def _gold_child(self, job: _RowJob, node: _Node, v: int) -> bool:
        """Approx mode: whether ``node`` + the teacher token ``v`` is on the gold path."""
        if not node.gold:
            return False
        gs = job.gold_sigma[node.k]
        return len(node.sigma) < len(gs) and gs[len(node.sigma)] == v

    def _estimate(self, job: _RowJob, y: bytes, w: float, k: int) -> None:
        """Approx mode: place the mass ``w`` of a dropped branch on the student token at
        the row's index in the encoding of the text that ends after ``y`` (its heaviest
        teacher token): the word-end estimate. Where that encoding contradicts the row's
        prefix, or has no token at the index, ``w`` joins the row's remainder (spread by
        renormalisation)."""
        if w <= 0.0:
            return
        q, n = job.local[k]
        try:
            text = y[q:].decode("utf-8")
        except UnicodeDecodeError:
            split = _utf8_split(y[q:])  # a partial last character is left out
            if split is None:
                job.remainder += w
                return
            text = split[0]
        if n and self.S.nfc and not unicodedata.is_normalized("NFC", text):
            q = n = 0
            split = _utf8_split(y)
            if split is None:
                job.remainder += w
                return
            text = split[0]
        ids = self.S.encode(text)
        i = len(job.lkey) - n
        if len(ids) > i and ids[:i] == job.lkey[n:]:
            job.mass[ids[i]] += w
            job.placed += w
        else:
            job.remainder += w

    def _node_probs(
        self, teacher: Teacher, work: list[tuple[_RowJob, _Node]]
    ) -> Iterator[tuple[list[tuple[_RowJob, _Node]], np.ndarray, np.ndarray, list[float]]]:
        """Teacher next-token probabilities (float64, ``[n, teacher ids]``) after each
        node's context + tokens, their cumulative sums in trie order (computed on the
        teacher's device) and, for root nodes (``sigma`` empty), log P_T(context) (NaN
        for the others), a chunk of nodes at a time.

        Nodes are sent as `PrefixTree` items hanging off their document's canonical
        teacher ids (``job.doc_ids``): a node's context shares its longest common prefix
        with them (all of it for the row's own context, which is a canonical prefix of
        the document), and only the rest are new tree nodes, deduplicated within an item.
        A teacher with a native ``prefix_tree_logprobs`` (`pipeline.teacher.HFTeacher`)
        forwards each document's ids once and then only the new nodes; the root nodes'
        distributions and path log-probs are read off that forward
        (`_chain_logprobs`)."""
        mbt = int(getattr(teacher, "max_batch_tokens", 1024))
        cap = self.max_batch_nodes or max(2, mbt - len(getattr(teacher, "start_ids", [0])) + 1)
        by_doc: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for j, (job, _) in enumerate(work):
            by_doc[job.doc_ids].append(j)
        width = self.T.size
        # documents in the order opposite to the previous call's: a teacher that keeps
        # fewer documents' keys/values than the batch holds (least recently used out)
        # still finds the last ones of the previous level (a fixed order would miss all)
        order = list(by_doc.items())
        if self._flip:
            order.reverse()
        self._flip = not self._flip
        for D, members in order:
            pre = self._rows.setdefault(D, {})
            if D not in self._chains:
                # root contexts on the document, and (approx) every context of the gold
                # path after them: their rows come with the document's forward
                want: set[int] = set()
                for j in members:
                    job, node = work[j]
                    c = job.contexts[node.k]
                    if not node.sigma and len(c) <= len(D) and D[: len(c)] == c:
                        gs = job.gold_sigma[node.k] if job.gold_sigma else ()
                        want.update(range(len(c), min(len(D), len(c) + len(gs)) + 1))
                held = sum(len(r) for r in self._rows.values())
                keep = max(0, PRE_ROWS_BYTES // (4 * width) - held)
                want = set(sorted(want)[:keep])
                self._chains[D] = self._chain_logprobs(teacher, D, want, pre)
            chain = self._chains[D]
            start = 0
            while start < len(members):
                item, sel, paths, stop = self._prefix_item(work, members, start, D, chain, cap, pre)
                chunk = [work[j] for j in members[start:stop]]
                start = stop
                if item.rows:
                    (lp,) = self._prefix_call(teacher, [item])
                else:
                    lp = torch.empty((0, width))
                steps: dict[int, float] = {}  # log P_T of each new node's context
                if any(
                    math.isnan(x) for x, (_, n) in zip(paths, chunk, strict=True) if not n.sigma
                ):
                    point_row = {p: r for r, p in enumerate(item.points)}
                    npts = len(item.points)
                    par_rows = [
                        point_row[a] if q == -1 else npts + q
                        for q, a in zip(item.parents, item.attach, strict=True)
                    ]
                    ids = torch.as_tensor(par_rows, dtype=torch.long, device=lp.device)
                    tok = torch.as_tensor(item.tokens, dtype=torch.long, device=lp.device)
                    sv = lp[ids, tok].double().cpu().numpy()
                    for v, (q, a) in enumerate(zip(item.parents, item.attach, strict=True)):
                        steps[v] = (float(chain[a]) if q == -1 else steps[q]) + float(sv[v])
                path_lp = []
                for (_, node), x, (_, r) in zip(chunk, paths, sel, strict=True):
                    if node.sigma:
                        path_lp.append(math.nan)
                    elif not math.isnan(x):
                        path_lp.append(x)
                    else:
                        path_lp.append(steps[r - len(item.points)])
                sel_lp = torch.stack([pre[r] if kind == "q" else lp[r] for kind, r in sel]).double()
                if sel_lp.shape[1] < width:  # ids the teacher has no logit for: probability 0
                    sel_lp = torch.nn.functional.pad(
                        sel_lp, (0, width - sel_lp.shape[1]), value=-math.inf
                    )
                probs = torch.exp(sel_lp[:, :width])
                cum = self.trie.cumulative(probs)
                yield chunk, probs.cpu().numpy(), cum.cpu().numpy(), path_lp

    def _prefix_item(
        self,
        work: list[tuple[_RowJob, _Node]],
        members: list[int],
        start: int,
        D: tuple[int, ...],
        chain: np.ndarray,
        cap: int,
        pre: dict[int, torch.Tensor],
    ) -> tuple[PrefixTree, list[tuple[str, int]], list[float], int]:
        """The `PrefixTree` of the nodes ``members[start:stop]`` (at most ``cap`` new
        tree nodes) on the document ids ``D``: per node where its row is (``("p", i)``
        or ``("n", i)``: an index into the item's rows; ``("q", p)``: ``pre[p]``, a row
        the document's forward gave), and for root nodes whose context is a prefix of
        ``D`` their path log-prob from ``chain`` (NaN for the others: computed from the
        call's rows)."""
        points: dict[int, int] = {}
        index: dict[tuple[int, int, int], int] = {}  # (parent node or -1, attach, token)
        tokens: list[int] = []
        parents: list[int] = []
        attach: list[int] = []
        where: list[tuple[str, int]] = []
        paths: list[float] = []
        stop = start
        for j in members[start:]:
            job, node = work[j]
            c = (*job.contexts[node.k], *node.sigma)
            a = 0
            n = min(len(c), len(D))
            while a < n and c[a] == D[a]:
                a += 1
            if len(tokens) + len(c) - a > cap and stop > start:
                break
            stop += 1
            if a == len(c):  # a context on the document: a point (or a row it gave)
                where.append(("q", a) if a in pre else ("p", points.setdefault(a, len(points))))
                paths.append(float(chain[a]) if not node.sigma else math.nan)
                continue
            q = -1
            for t in c[a:]:
                key = (q, a if q == -1 else -1, int(t))
                v = index.get(key)
                if v is None:
                    v = index[key] = len(tokens)
                    tokens.append(int(t))
                    parents.append(q)
                    attach.append(a if q == -1 else 0)
                q = v
            where.append(("n", q))
            paths.append(math.nan)
        for v, q in enumerate(parents):  # attach points' rows: for path log-probs
            if q == -1:
                points.setdefault(attach[v], len(points))
        pts = tuple(sorted(points, key=points.__getitem__))
        npts = len(pts)
        sel = [(kind, npts + r if kind == "n" else r) for kind, r in where]
        item = PrefixTree(D, pts, tuple(tokens), tuple(parents), tuple(attach))
        return item, sel, paths, stop

    def _prefix_call(self, teacher: Teacher, items: list[PrefixTree]) -> list[torch.Tensor]:
        stats: dict[str, int] = {}
        out = prefix_tree_logprobs(teacher, items, stats)
        self.walk_stats["teacher_contexts"] += stats.get("positions", 0)
        self.walk_stats["teacher_calls"] += 1
        return out

    def _chain_logprobs(
        self, teacher: Teacher, D: tuple[int, ...], want: set[int], pre: dict[int, torch.Tensor]
    ) -> np.ndarray:
        """``log P_T(D[:p])`` for p = 0..len(D) (float64); the log-prob rows after
        ``D[:p]`` for ``p`` in ``want`` go into ``pre``: one forward of the document's
        canonical ids, its rows read in slices (a native teacher forwards the ids once;
        a slice after the first asks the kept prefix for one position per row)."""
        out = np.zeros(len(D) + 1)
        step = max(1024, (1 << 30) // (4 * self.T.size))  # rows of 1 GiB of float32
        for a in range(0, len(D) + 1, step):
            b = min(len(D) + 1, a + step)
            (lp,) = self._prefix_call(teacher, [PrefixTree(D, tuple(range(a, b)))])
            m = min(b, len(D)) - a  # rows followed by a token of D
            tok = torch.as_tensor(D[a : a + m], dtype=torch.long, device=lp.device)
            sv = lp[:m].gather(1, tok[:, None]).squeeze(1).double().cpu().numpy()
            out[a + 1 : a + m + 1] = sv
            for p in want:
                if a <= p < b:
                    pre[p] = lp[p - a].clone()
        return np.cumsum(out)

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
        # the row's starting mass (the pruning modes' scale) gathers, over the nodes inside
        # the root, the mass of their next tokens that reach its end: every token
        # sequence of a text starting with the root crosses that end exactly once
        lo, hi = self.trie.range(rem)
        job.start += node.w * float(cum[hi] - cum[lo])
        for j in range(1, len(rem) + 1):
            for v in self.trie.exact.get(rem[:j], ()):
                pv = float(p[v])
                if pv > 0.0:
                    job.nodes.append(
                        _Node(
                            k,
                            (*node.sigma, v),
                            node.z + rem[:j],
                            node.w * pv,
                            self._gold_child(job, node, v),
                        )
                    )
        self._descend(job, node, y, rem, p, cum)

    def _descend(
        self, job: _RowJob, node: _Node, y: bytes, beta: bytes, p: np.ndarray, cum: np.ndarray
    ) -> None:
        """Walk the trie below ``beta``: a byte prefix ``b`` of next tokens is the branch
        ``y + b`` holding the mass of every token starting with it. A decided branch is
        accounted whole; an undecided one queues the token equal to ``b`` (if any) and
        goes on into the next byte (pruned or cut where the limits say).

        Approx mode: a branch the bounded walk would drop (below the floor, tiny, or cut)
        is placed by `_estimate` at the end of its heaviest token; the branch of the
        gold path's next token is never pruned."""
        if self.kind == "approx":
            self._descend_approx(job, node, y, beta, p, cum)
            return
        floor = self.min_prob * job.start if self.kind == "bounded" else 0.0
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
                job.pruned += float(ms[small].sum())  # bounded mode: not worth a decision
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

    def _descend_approx(
        self, job: _RowJob, node: _Node, y: bytes, beta: bytes, p: np.ndarray, cum: np.ndarray
    ) -> None:
        """`_descend` in approx mode (see there)."""
        floor = self.min_prob * job.start
        tiny = floor * DECIDE_FLOOR
        end_depth = len(job.roots[node.k]) + self.max_depth
        w = node.w
        gs = job.gold_sigma[node.k] if node.gold else ()
        # the bytes of the gold path's next token: its trie branches are never pruned
        gb = self.T.token_bytes[gs[len(node.sigma)]] if len(gs) > len(node.sigma) else None
        pt: np.ndarray | None = None  # p in trie order (for the heaviest token of a range)
        stack = [beta]
        while stack:
            cur = stack.pop()
            kids, los, his = self.trie.kids(cur)
            if not kids:
                continue
            ms = w * (cum[his] - cum[los])
            gk = -1  # the kid on the gold path, its mass summed directly: a difference
            # of cumulative sums loses a range far lighter than the mass before it
            if gb is not None and len(gb) > len(cur) and gb.startswith(cur):
                c = bisect.bisect_left(kids, gb[: len(cur) + 1])
                if c < len(kids) and kids[c] == gb[: len(cur) + 1]:
                    if pt is None:
                        pt = p[self.trie.perm]
                    gk = c
                    ms[c] = w * float(pt[int(los[c]) : int(his[c])].sum())
            for c in np.flatnonzero(ms > 0.0).tolist():
                b, m = kids[c], float(ms[c])
                yb = y + b
                gold = c == gk
                # a tiny branch is placed without deciding it (the estimate gives a
                # decided branch its decided token: the text closed after its heaviest
                # token starts with the branch's stable tokens), at a third of the cost
                if (gold or m > tiny) and self._decide(job, yb, m, node.k):
                    continue
                if len(yb) >= end_depth or (not gold and (m <= tiny or m < floor)):
                    if pt is None:
                        pt = p[self.trie.perm]
                    lo, hi = int(los[c]), int(his[c])
                    if m > tiny and hi - lo > 1:
                        self._estimate_range(job, y, pt, lo, hi, m, w, tiny, node.k)
                    else:
                        heavy = self.trie.keys[lo + int(np.argmax(pt[lo:hi]))]
                        self._estimate(job, y + heavy, m, node.k)
                    continue
                for v in self.trie.exact.get(b, ()):
                    pv = float(p[v])
                    if pv > 0.0:
                        job.nodes.append(
                            _Node(
                                node.k,
                                (*node.sigma, v),
                                node.z + b,
                                w * pv,
                                self._gold_child(job, node, v),
                            )
                        )
                stack.append(b)

    def _estimate_range(
        self,
        job: _RowJob,
        y: bytes,
        pt: np.ndarray,
        lo: int,
        hi: int,
        m: float,
        w: float,
        tiny: float,
        k: int,
    ) -> None:
        """Approx mode: place a dropped trie branch (tokens ``[lo, hi)`` in trie order
        after ``y``, mass ``m``) token by token: each of its heaviest tokens above
        ``tiny`` (at most `SPLIT_TOKENS`) at its own word end, the rest at the heaviest's
        (placing the whole branch at its heaviest token's word end sends, e.g., every
        word of `` tw...`` to `` two``)."""
        seg = pt[lo:hi]
        n = hi - lo
        kk = min(SPLIT_TOKENS, n)
        top = np.argpartition(-seg, kk - 1)[:kk] if kk < n else np.arange(n)
        top = top[np.argsort(-seg[top], kind="stable")]
        rest = m
        first = True
        for t in top.tolist():
            mt = w * float(seg[t])
            if not first and mt <= tiny:
                break
            first = False
            self._estimate(job, y + self.trie.keys[lo + t], mt, k)
            rest -= mt
        if rest > 0.0:
            self._estimate(job, y + self.trie.keys[lo + int(top[0])], rest, k)

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
        row_jobs: Sequence[_RowJob | None],
        top_k: int | None,
    ) -> ScoredDocument:
        L = len(ids)
        vs = self.S.size
        dense = np.full((L + 1, vs), -np.inf)
        unacc = np.zeros(L + 1)
        unmapped = np.zeros(L + 1)
        prefix_lp = np.full(L + 1, -np.inf)
        regime = np.full(L + 1, int(Regime.LOSSLESS), dtype=np.uint8)
        estimated = np.zeros(L + 1)
        enumerated = np.zeros(L + 1, dtype=bool)  # rows with nothing pruned or estimated
        expanded = 0
        for i in range(L + 1):
            job = row_jobs[i]
            if job is None:  # a row not asked for: not computed, all of it unaccounted
                regime[i] = int(Regime.APPROXIMATE)
                unacc[i] = 1.0
                continue
            expanded += job.expanded
            if self.kind == "approx":
                estimated[i] = self._approx_row(job, dense[i])
                regime[i] = int(Regime.APPROXIMATE)
                enumerated[i] = estimated[i] == 0.0
                z = sum(job.mass.values()) + job.remainder + job.cut + job.pruned
            else:
                lost = job.cut + job.pruned
                z = sum(job.mass.values()) + lost
                if lost > 0.0:
                    regime[i] = int(Regime.APPROXIMATE)
                else:
                    enumerated[i] = True
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
        # dropped non-canonical teacher mass); only meaningful between enumerated rows.
        noncanon = np.zeros(L + 1)
        for i in range(1, L + 1):
            if enumerated[i] and enumerated[i - 1]:
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
                **({"max_estimated": float(estimated.max())} if self.kind == "approx" else {}),
            },
            estimated_mass=estimated,
        )

    @staticmethod
    def _approx_row(job: _RowJob, out: np.ndarray) -> float:
        """Approx mode: write the row's log-probs into ``out`` (the enumerated and placed
        mass, renormalised to 1) and return its estimated mass: the share of the mass
        reaching the row that was not enumerated (placed by the word-end estimate, or
        left as the remainder that renormalisation spreads). The enumerated part bounds
        the truth as a bounded row does: ``enum(g) <= truth(g) <= enum(g) + estimated``.
        A row whose every branch ended in the remainder (none with a real teacher: the
        gold path is never pruned) puts it all on the document's own next token."""
        lost = job.remainder + job.cut + job.pruned  # (cut, pruned: 0 in approx mode)
        mass: dict[int, float] = job.mass
        e = sum(mass.values())
        z = e + lost
        if z <= 0.0:
            return 0.0  # the teacher never produces this prefix: an empty row
        if e <= 0.0 and job.gold_token is not None:
            mass, e = {job.gold_token: lost}, lost
        for g, m in mass.items():
            if m > 0.0:
                out[g] = math.log(m / e)
        return min(1.0, (job.placed + lost) / z)
