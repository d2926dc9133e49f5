"""Versioned Arrow schema of target shards (one row per scored sequence).

Schemas are code: the writer passes `targets_schema(version)` explicitly, readers check
the version stored in the file metadata, and every released version stays readable.

Version 1 (row convention: ``row i`` of a sequence predicts ``input_ids[i]`` given
``input_ids[:i]`` -- see below):

- ``doc_id`` (string): id of the input record (its ``id`` field, else
  ``<input shard name>:<record index>``).
- ``chunk`` (int32): index of the chunk of the document (documents longer than the
  teacher context are cut into overlapping chunks; see the job docs).
- ``input_ids`` (list<uint32>): the student tokens of the sequence, length ``L``.
- ``loss_mask`` (list<bool>): per target row (``L + 1``): whether the row is a training
  target (e.g. only assistant turns of chats).
- ``topk_ids`` (list<uint16> when the student vocab has at most 65,536 ids, else
  list<uint32>): ``(L + 1) * k`` student ids, row-major, most probable first within a
  row.
- ``topk_logprob_dq`` (list<uint16>): ``(L + 1) * k`` natural-log probabilities of the
  normalised student distribution (never logits; temperature in the metadata),
  quantised to ``q = round(-logprob / LOGPROB_STEP)`` (error <= LOGPROB_STEP / 2 =
  0.0009 nats) and stored as the gaps between consecutive ``q`` of a row (the first
  entry's ``q`` itself), so ``logprob = -LOGPROB_STEP * cumsum(dq)`` along the row. Rows
  are sorted, so gaps are small and compress ~25% better than ``q``. ``dq =
  LOGPROB_NONE`` marks a missing entry (log-prob -inf; only at the end of a row, when
  the student vocab is smaller than k or the rest has probability 0). Use
  `decode_topk_logprobs` / `encode_topk_logprobs`.
- ``tail_mass`` (list<float32>): ``L + 1`` probabilities outside the stored top-k.
- ``target_logprob`` (list<float32>): ``L + 1`` log P of the actual next student token
  (``input_ids[i]``; the student EOS for row ``L``) -- all ALM-style losses need.
- ``regime`` (list<uint8>): ``L + 1`` codes: 0 exact, 1 lossless, 2 approximate.
- ``unaccounted_mass`` / ``noncanonical_mass`` / ``unmapped_mass`` (list<float32>):
  ``L + 1`` each, see `pipeline.scoring.ScoredDocument`. The general scorer computes
  only the rows ``loss_mask`` keeps: the others are stored empty (no top-k entry, tail
  0, ``unaccounted_mass`` 1, regime approximate); the subset-exact scorer fills them all.

Row ``i`` is the target for the student's logits at the position whose input is
``input_ids[i - 1]`` (row 0: after the start of text). A trainer that feeds
``input_ids`` and reads logits ``[0, L)`` uses rows ``1..L``; row 0 needs a BOS input.

Version 2 (target kinds, provenance ``targets``; a v1 shard is a v2 shard with only
``student``): ``doc_id`` and ``chunk``, then the columns of each kind the run asked for.

- ``student``: the version 1 columns above, unchanged.
- ``text`` (binary; with ``bytes`` or ``teacher``): the sequence's text as scored (after
  the teacher's normalizer), UTF-8. Any student tokenizer encodes it at read time.
- ``teacher`` (``m`` canonical teacher tokens):
  ``teacher_ids`` (list<uint16|uint32> by the teacher vocab, ``m``),
  ``teacher_logprob_q`` (list<uint32>, ``m + 1``: the natural log of P(token j |
  tokens < j) at the run's temperature, entry ``m`` the end-of-text token after the
  text, quantised WITH ERROR FEEDBACK: ``q_j = R_j - R_{j-1}``, ``R_j = round(-(lp_0 +
  ... + lp_j) / TEACHER_LOGPROB_STEP)``, so each log-prob is within one step (2^-12 =
  0.00024 nats) and every sum over consecutive tokens (an ALM chunk, the whole
  sequence) within one step as well, whatever its length; use
  `decode_teacher_logprobs`), ``teacher_byte_len`` (list<uint16>, ``m``: the UTF-8
  bytes of each token in ``text``; byte ends are their running sum, the last is
  ``len(text)``), ``teacher_loss_mask`` (list<bool>, ``m + 1``: which log-probs are
  training targets, as ``loss_mask``).
- ``bytes`` (``R`` rows: one per byte of ``text``, an added token such as
  ``<|im_start|>`` being one symbol, plus end of text): ``byte_row_start``
  (list<uint32>, ``R``: the byte offset of the symbol row r predicts; the last is
  ``len(text)``), ``byte_loss_mask`` (list<bool>, ``R``), ``byte_topk_ids``
  (list<uint16>, ``R * byte_top_k``: symbols 0..255 are byte values, 256 end of text
  (and ``provenance["byte_eos"]`` when that token appears inside a text),
  ``257 + j`` the added token ``provenance["byte_specials"][j]``), ``byte_topk_logprob_dq``
  (list<uint16>, as ``topk_logprob_dq``), ``byte_tail_mass``, ``byte_target_logprob``
  (log P of the actual next symbol), ``byte_noncanonical_mass``, ``byte_unmapped_mass``
  (list<float32>, ``R`` each; as the student columns). Row r is the teacher's exact
  next-symbol distribution given the bytes before ``byte_row_start[r]``.

Version 3 (the general scorer's approximate rows): the ``student`` columns gain
``estimated_mass`` (list<float32>, ``L + 1``): the share of a row's mass placed by an
estimate rather than enumerated (`pipeline.scoring.ScoredDocument.estimated_mass`; 0
for the subset-exact scorer and wherever nothing was estimated). A row then sums to
``1 - unaccounted_mass`` as before (approximate rows: ``unaccounted_mass`` 0). Version 1
and 2 shards have no such column: read it as 0.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

CURRENT_VERSION = 3
KINDS = ("student", "bytes", "teacher")  # `pipeline.scoring.kinds.KINDS`
METADATA_KEY = b"xtok"  # JSON provenance in the Parquet key-value metadata

_LIST_FLOAT = pa.list_(pa.float32())


def id_type(student_vocab_size: int) -> pa.DataType:
    """Arrow type of student ids: uint16 when every id fits, else uint32."""
    return pa.uint16() if student_vocab_size <= 1 << 16 else pa.uint32()


def targets_schema(
    version: int = CURRENT_VERSION,
    student_vocab_size: int = 1 << 32,
    kinds: tuple[str, ...] | list[str] = ("student",),
    teacher_vocab_size: int = 1 << 32,
) -> pa.Schema:
    """The schema of a shard of ``version`` holding the target ``kinds``."""
    if version not in (1, 2, 3):
        raise ValueError(f"unknown targets schema version {version} (this code knows 1-3)")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"target kinds {list(kinds)}: choose a non-empty subset of {KINDS}")
    if version == 1 and tuple(kinds) != ("student",):
        raise ValueError("schema version 1 holds student rows only")
    fields = [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("chunk", pa.int32(), nullable=False),
    ]
    if "student" in kinds:
        fields += _student_fields(id_type(student_vocab_size), version)
    if "bytes" in kinds or "teacher" in kinds:
        fields.append(pa.field("text", pa.binary(), nullable=False))
    if "teacher" in kinds:
        fields += [
            pa.field("teacher_ids", pa.list_(id_type(teacher_vocab_size)), nullable=False),
            pa.field("teacher_logprob_q", pa.list_(pa.uint32()), nullable=False),
            pa.field("teacher_byte_len", pa.list_(pa.uint16()), nullable=False),
            pa.field("teacher_loss_mask", pa.list_(pa.bool_()), nullable=False),
        ]
    if "bytes" in kinds:
        fields += [
            pa.field("byte_row_start", pa.list_(pa.uint32()), nullable=False),
            pa.field("byte_loss_mask", pa.list_(pa.bool_()), nullable=False),
            pa.field("byte_topk_ids", pa.list_(pa.uint16()), nullable=False),
            pa.field("byte_topk_logprob_dq", pa.list_(pa.uint16()), nullable=False),
            pa.field("byte_tail_mass", _LIST_FLOAT, nullable=False),
            pa.field("byte_target_logprob", _LIST_FLOAT, nullable=False),
            pa.field("byte_noncanonical_mass", _LIST_FLOAT, nullable=False),
            pa.field("byte_unmapped_mass", _LIST_FLOAT, nullable=False),
        ]
    return pa.schema(fields)


def _student_fields(ids: pa.DataType, version: int) -> list[pa.Field]:
    estimated = [pa.field("estimated_mass", _LIST_FLOAT, nullable=False)] if version >= 3 else []
    return [
        pa.field("input_ids", pa.list_(ids), nullable=False),
        pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
        pa.field("topk_ids", pa.list_(ids), nullable=False),
        pa.field("topk_logprob_dq", pa.list_(pa.uint16()), nullable=False),
        pa.field("tail_mass", _LIST_FLOAT, nullable=False),
        pa.field("target_logprob", _LIST_FLOAT, nullable=False),
        pa.field("regime", pa.list_(pa.uint8()), nullable=False),
        pa.field("unaccounted_mass", _LIST_FLOAT, nullable=False),
        pa.field("noncanonical_mass", _LIST_FLOAT, nullable=False),
        pa.field("unmapped_mass", _LIST_FLOAT, nullable=False),
        *estimated,
    ]


LOGPROB_STEP = 0.0018  # nats per quantisation step (max error 0.0009)
LOGPROB_NONE = 65535  # dq of a missing entry (log-prob -inf)


def encode_topk_logprobs(lp: np.ndarray) -> np.ndarray:
    """Rows of log-probs [..., k] (each sorted descending; -inf only at the end) ->
    uint16 gaps of the quantised values (``topk_logprob_dq``). Saturates at -117.9 nats."""
    lp = np.asarray(lp, dtype=np.float64)
    missing = ~np.isfinite(lp)
    q = np.minimum(np.rint(-np.minimum(np.where(missing, 0.0, lp), 0.0) / LOGPROB_STEP), 65534)
    dq = np.diff(q.astype(np.int64), axis=-1, prepend=0)
    if ((dq < 0) & ~missing).any() or (missing[..., :-1] & ~missing[..., 1:]).any():
        raise ValueError("log-prob rows must be sorted descending (-inf entries last)")
    return np.where(missing, LOGPROB_NONE, dq).astype(np.uint16)


def decode_topk_logprobs(dq: np.ndarray) -> np.ndarray:
    """``topk_logprob_dq`` [..., k] -> float32 log-probs (-inf where missing)."""
    dq = np.asarray(dq)
    # missing entries only end a row, so the running sums before them are untouched;
    # int32 cannot overflow (k * 65535 < 2**31) and q < 2**24 is exact in float32
    lp = np.cumsum(dq, axis=-1, dtype=np.int32).astype(np.float32)
    lp *= np.float32(-LOGPROB_STEP)
    missing = dq == LOGPROB_NONE
    if missing.any():
        lp[missing] = -np.inf
    return lp


# List columns written with BYTE_STREAM_SPLIT (leaf paths, as Parquet names them):
# the bytes of each value are grouped, so zero high bytes and similar exponents compress
# (measured on the demo shards: ids 103 -> 85 B/row, dq 77 -> 54 B/row at k=64).
BSS_LEAVES = [
    f"{name}.list.element"
    for name in (
        "topk_ids",
        "topk_logprob_dq",
        "tail_mass",
        "target_logprob",
        "unaccounted_mass",
        "noncanonical_mass",
        "unmapped_mass",
        "estimated_mass",
        "teacher_ids",
        "teacher_logprob_q",
        "teacher_byte_len",
        "byte_topk_logprob_dq",
        "byte_tail_mass",
        "byte_target_logprob",
        "byte_noncanonical_mass",
        "byte_unmapped_mass",
    )
]
# Monotone offsets: Parquet's delta encoding stores their (small) differences.
DELTA_LEAVES = [f"{name}.list.element" for name in ("byte_row_start",)]

TEACHER_LOGPROB_STEP = 2.0**-12  # nats per step of ``teacher_logprob_q``
_TEACHER_FLOOR = -1.0e5  # log-probs below are stored as this (q stays below 2**32)


def encode_teacher_logprobs(lp: np.ndarray) -> np.ndarray:
    """One sequence's teacher log-probs [m + 1] -> ``teacher_logprob_q`` (uint32): the
    steps of the quantised running sum, so that any sum of consecutive entries decodes
    within one `TEACHER_LOGPROB_STEP`."""
    lp = np.maximum(np.asarray(lp, dtype=np.float64), _TEACHER_FLOOR)
    if np.any(lp > 0) or np.any(np.isnan(lp)):
        raise ValueError("teacher log-probs must be <= 0")
    running = np.rint(-np.cumsum(lp) / TEACHER_LOGPROB_STEP).astype(np.int64)
    return np.diff(running, prepend=0).astype(np.uint32)


def decode_teacher_logprobs(q: np.ndarray) -> np.ndarray:
    """``teacher_logprob_q`` -> float64 log-probs (see `encode_teacher_logprobs`)."""
    return -np.asarray(q, dtype=np.float64) * TEACHER_LOGPROB_STEP
