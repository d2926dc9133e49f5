"""Stream target shards into a trainer: a `torch.utils.data.IterableDataset` over a run.

    from pipeline.reader import TargetDataset, TargetLoader

    ds = TargetDataset("s3://bucket/run", batch_size=8, seed=0, bos_id=None)
    loader = TargetLoader(ds, num_workers=2)          # a DataLoader that can resume
    for batch in loader:
        logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = sparse_kd_loss(logits, batch)         # pipeline.loss
    state = loader.state_dict()                       # tiny; restore with load_state_dict

**Alignment** (the off-by-one other tools get wrong). A stored sequence of ``L`` student
tokens ``s_0..s_{L-1}`` has ``L + 1`` target rows; row ``i`` is the teacher's
distribution of the token after ``s_0..s_{i-1}`` (row ``L``: after the whole text, where
the student EOS carries the end-of-text mass). The reader aligns rows to positions, so
``batch["topk_ids"][b, t]`` is the target for the logits the student computes at
position ``t`` (after reading ``input_ids[b, :t + 1]``):

- ``bos_id=None`` (default): ``input_ids = s_0..s_{L-1}``, position ``t`` gets row
  ``t + 1``; row 0 (the first token, which has no input position) is not used.
- ``bos_id=X``: ``input_ids = X, s_0..s_{L-1}`` (``L + 1`` positions), position ``t``
  gets row ``t``.

``labels[b, t]`` is the actual next student token (``s_{t+1}``, or the student EOS
after the last token), ``-100`` where ``loss_mask`` is False (padding, prompts, chunk
overlaps), so ``F.cross_entropy(logits.flatten(0, 1), labels.flatten())`` mixes in
directly.

**Batches** (dict of CPU tensors; ``k`` = the run's top-k, ``T`` = padded length):
``input_ids`` [B, T] int64, ``attention_mask`` [B, T] bool, ``loss_mask`` [B, T] bool,
``labels`` [B, T] int64, ``topk_ids`` [B, T, k] int32 (``.long()`` them on the device
before ``gather``), ``topk_logprobs`` [B, T, k] float32 natural-log probabilities of
the normalised student-vocab distribution (``-inf`` for missing entries),
``tail_mass`` [B, T] float32 (probability outside the top-k), ``target_logprob`` [B, T]
float32 (teacher log P of ``labels``). With ``pack_length=N`` sequences are packed
into rows of exactly ``N`` positions (a sequence that does not fit is split and its
remainder starts the next row as a new segment); packed batches add
``position_ids`` [B, N] (restarting at 0 for every segment) and ``segment_ids``
[B, N] int32 (1, 2, ... per segment in a row, 0 for padding) so attention can be kept
within segments; ``attention_mask`` is then False only on padding.

**Sharding.** Work units are (shard, row group). Each epoch the unit list is shuffled
with ``(seed, epoch)`` and dealt round-robin to the ``world_size x num_workers`` global
workers (rank and world size from ``torch.distributed`` unless given), so ranks and
workers read disjoint row groups that together cover the run exactly once. Within a
worker a seeded shuffle buffer mixes sequences across its units. Everything is a pure
function of ``(seed, epoch, rank, world_size, num_workers)``, the run's shards and the
batching settings, which is what makes exact resumption possible: a loader state
records them, and a reader built with other ones refuses to resume from it.

**Integrity.** Every shard in the index must exist with its manifest; the file size
and the schema version are checked before any row group is read, Parquet page
checksums (CRC32, written by the pipeline) are verified on every page read, and row
counts must match the manifest. A failure raises `ShardError` naming the shard and
what failed; nothing is ever skipped quietly.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shards import (
    DECODE_COLUMNS,
    ShardError,
    ShardInfo,
    decode_kinds_row_group,
    decode_row_group,
    folder_of,
    index_url_of,
    kind_columns,
    open_shard,
    read_run_index,
    run_shards,
)
from schemas.run import Provenance, RunIndex

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------- the run
@dataclass
class Run:
    """A committed run: its index, provenance and shards (footers read lazily)."""

    url: str
    provenance: Provenance
    shards: list[ShardInfo]
    storage_options: dict[str, Any] | None = None
    index: RunIndex | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.provenance, Provenance):
            self.provenance = Provenance.parse(self.provenance)

    @property
    def top_k(self) -> int:
        return int(self._need("top_k"))

    @property
    def student_eos_id(self) -> int:
        return int(self._need("student_eos_id"))

    def _need(self, key: str) -> Any:
        value = self.provenance.get(key)
        if value is None:
            raise ShardError(f"{self.url}: the run's provenance has no {key}")
        return value

    def load_footers(self) -> None:
        for s in self.shards:
            if not s.row_groups:
                opened = open_shard(s, self.storage_options)
                opened.close()
                s.row_groups = opened.row_groups


def open_run(run: str, storage_options: dict[str, Any] | None = None) -> Run:
    """Open a run by its directory or ``index.json`` URL (local, s3://, ...). Every shard
    the index lists must have its manifest, matching the index's checksum."""
    index_url = index_url_of(run)
    index = read_run_index(index_url, storage_options)
    shards = []
    for ref in run_shards(index, folder_of(index_url), storage_options):
        if ref.manifest is None or ref.problem is not None:
            raise ShardError(f"shard {ref.name}: {ref.problem}")
        shards.append(ShardInfo(ref.name, ref.url, ref.manifest))
    return Run(index_url, index.provenance, shards, storage_options, index)


# ---------------------------------------------------------------------------- planning
Ref = tuple[int, int]  # (unit index, sequence within the unit)
Piece = tuple[Ref, int, int]  # a sequence's positions [start, end)


def _shuffle_stream(refs: list[Ref], buffer: int, rng: np.random.Generator) -> list[Ref]:
    """The order a shuffle buffer of ``buffer`` sequences emits ``refs`` in (indices
    only, so a resumed reader can replay it without reading data)."""
    if buffer <= 1:
        return list(refs)
    out: list[Ref] = []
    buf: list[Ref] = []
    draws = rng.integers(0, buffer, size=max(0, len(refs) - buffer))
    for n, ref in enumerate(refs):
        if len(buf) < buffer:
            buf.append(ref)
            continue
        j = int(draws[n - buffer])
        out.append(buf[j])
        buf[j] = ref
    out.extend(buf[i] for i in rng.permutation(len(buf)))
    return out


# ---------------------------------------------------------------------------- dataset
class TargetDataset(IterableDataset):
    """Batches of aligned targets from a run (see the module docstring).

    Args:
        run: run directory or ``index.json`` URL, or an opened `Run`.
        batch_size: sequences per batch (rows per batch when packing).
        pack_length: pack sequences into rows of exactly this many positions.
        bos_id: prepend this id to every sequence and use row 0 (see Alignment).
        pad_id: input id at padded positions (masked everywhere).
        shuffle: shuffle units per epoch and sequences within a buffer.
        shuffle_buffer: sequences in the within-worker shuffle buffer.
        seed, epoch: the shuffle is a pure function of both (`set_epoch` per epoch).
        rank, world_size: this process's share (default: torch.distributed, else 0/1).
        drop_last: drop a worker's last incomplete batch.
        prefetch: row groups read ahead in a background thread per worker.
        storage_options: fsspec options (credentials, ``endpoint_url``).
        student_tokenizer: read the run's ``teacher`` / ``bytes`` kinds for THIS
            student (any HF tokenizer: `tokenizers.Tokenizer`, transformers fast
            tokenizer, tokenizer.json, dir or hub id), chosen now, not when the run was
            made: each stored text is encoded with it and the targets are aligned to its
            positions (see "Any student" in the module docstring). None: the run's own
            student rows.
        targets: with ``student_tokenizer``: which of the run's kinds to align,
            ``teacher`` (ALM chunks) and/or ``bytes`` (byte-head windows); default all
            the run has.
        byte_window: with ``bytes``: the ``m`` byte rows each position gets.
    """

    def __init__(
        self,
        run: str | Run,
        batch_size: int = 8,
        *,
        pack_length: int | None = None,
        bos_id: int | None = None,
        pad_id: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        prefetch: int = 2,
        storage_options: dict[str, Any] | None = None,
        student_tokenizer: Any = None,
        targets: Sequence[str] | None = None,
        byte_window: int = 4,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if byte_window < 1:
            raise ValueError("byte_window must be >= 1")
        if pack_length is not None and pack_length < 2:
            raise ValueError("pack_length must be >= 2")
        self.run = run if isinstance(run, Run) else open_run(run, storage_options)
        self.run.load_footers()
        self.byte_window = byte_window
        self._setup_student(student_tokenizer, targets)
        self.batch_size = batch_size
        self.pack_length = pack_length
        self.bos_id = bos_id
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.seed = seed
        self.epoch = epoch
        if rank is None or world_size is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank, world_size = dist.get_rank(), dist.get_world_size()
            else:
                rank, world_size = 0, 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.units: list[tuple[int, int]] = [
            (s, g) for s, shard in enumerate(self.run.shards) for g in range(len(shard.row_groups))
        ]
        # resume: batches already consumed per logical stream, and the stream rotation
        self._skip: dict[int, int] = {}
        self._rotation = 0

    def _setup_student(self, student_tokenizer: Any, targets: Sequence[str] | None) -> None:
        prov = self.run.provenance
        stored = prov.kinds
        self.align_kinds: tuple[str, ...] = ()
        self.student_tok: Any = None
        if student_tokenizer is None:
            if targets is not None:
                raise ValueError("targets= selects kinds to align: pass student_tokenizer= too")
            if "student" not in stored:
                raise ValueError(
                    f"run {self.run.url} stores targets for any student ({', '.join(stored)}) "
                    "and no student rows: pass student_tokenizer= (the trainer's tokenizer)"
                )
            return
        any_student = [k for k in ("teacher", "bytes") if k in stored]
        if not any_student:
            raise ValueError(
                f"run {self.run.url} stores student rows only (schema version "
                f"{prov.schema_version}, targets {stored}): it can be read for its own "
                "student only (leave student_tokenizer unset); generate with "
                "scoring.targets=[student,bytes,teacher] to serve any student"
            )
        want = tuple(targets) if targets is not None else tuple(any_student)
        bad = [k for k in want if k not in any_student]
        if bad or not want:
            raise ValueError(
                f"targets={list(want)}: this run can align {any_student} (stored {stored})"
            )
        from pipeline.align import student_bytes
        from pipeline.tokenization import load_tokenizer

        self.student_tok = load_tokenizer(student_tokenizer)
        self._student_bytes = student_bytes(self.student_tok)
        self.align_kinds = want
        self.byte_specials = {
            c.encode("utf-8"): 257 + j for j, c in enumerate(prov.byte_specials or [])
        }
        if prov.byte_eos:  # the end-of-text token inside a text (symbol 256)
            self.byte_specials[prov.byte_eos.encode("utf-8")] = 256

    def __getstate__(self) -> dict[str, Any]:
        # open files stay in the process that opened them (spawned DataLoader workers)
        state = dict(self.__dict__)
        state.pop("_files", None)
        state.pop("_files_pid", None)
        return state

    # ------------------------------------------------------------------ public state
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._skip, self._rotation = {}, 0

    def resume(self, skip: dict[int, int], rotation: int) -> None:
        """Skip ``skip[stream]`` batches of each logical stream this epoch; DataLoader
        worker ``w`` plays stream ``(w + rotation) % num_workers``. Used by
        `TargetLoader.load_state_dict`."""
        self._skip, self._rotation = dict(skip), rotation

    def resume_settings(self) -> dict[str, Any]:
        """The settings that decide which sequences each batch holds and in what order
        (with the loader's ``num_workers``): a saved loader state is only valid for a
        dataset with the same ones. ``shards`` identifies the run's shards (names,
        manifest checksums, row groups), not where they are stored."""
        shards = [[s.name, s.manifest.sha256, s.row_groups] for s in self.run.shards]
        digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]
        sequences = sum(sum(s.row_groups) for s in self.run.shards)
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "pack_length": self.pack_length,
            "bos_id": self.bos_id,  # a BOS lengthens every packed sequence by one
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "drop_last": self.drop_last,
            "rank": self.rank,
            "world_size": self.world_size,
            "shards": f"{len(shards)} shards, {sequences} sequences, sha256 {digest}",
            # how any-student runs are read (None for the run's own student rows)
            "student_tokenizer": None
            if self.student_tok is None
            else hashlib.sha256(self.student_tok.to_str().encode()).hexdigest()[:16],
            "targets": list(self.align_kinds) or None,
            "byte_window": self.byte_window if "bytes" in self.align_kinds else None,
        }

    # ------------------------------------------------------------------ planning
    def stream_units(self, stream: int, num_streams: int) -> list[int]:
        """Unit indices (into ``self.units``) of one logical stream this epoch."""
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        g = self.rank * num_streams + stream
        return [int(u) for u in order[g :: self.world_size * num_streams]]

    def _refs(self, stream: int, num_streams: int) -> list[Ref]:
        refs = [
            (u, r)
            for u in self.stream_units(stream, num_streams)
            for r in range(self.run.shards[self.units[u][0]].row_groups[self.units[u][1]])
        ]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, stream, num_streams])
        return _shuffle_stream(refs, self.shuffle_buffer, rng)

    def _plans(self, refs: list[Ref], length: Any) -> Iterator[list[list[Piece]]]:
        """Batch plans: a batch is a list of rows, a row a list of pieces."""
        extra = 1 if self.bos_id is not None else 0
        B = self.batch_size
        if self.pack_length is None:
            for i in range(0, len(refs), B):
                chunk = refs[i : i + B]
                if len(chunk) < B and self.drop_last:
                    return
                yield [[(ref, 0, -1)] for ref in chunk]  # -1: to the end (no length needed)
            return
        N = self.pack_length
        rows: list[list[Piece]] = []
        row: list[Piece] = []
        used = 0
        for ref in refs:
            n = length(ref) + extra
            start = 0
            while start < n:
                take = min(n - start, N - used)
                row.append((ref, start, start + take))
                used += take
                start += take
                if used == N:
                    rows.append(row)
                    row, used = [], 0
                    if len(rows) == B:
                        yield rows
                        rows = []
        if row:
            rows.append(row)
        if rows and not (self.drop_last and len(rows) < B):
            yield rows

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_streams = info.num_workers if info is not None else 1
        worker = info.id if info is not None else 0
        stream = (worker + self._rotation) % num_streams
        refs = self._refs(stream, num_streams)
        yield from self._stream(refs, stream, self._skip.get(stream, 0))

    def _stream(self, refs: list[Ref], stream: int, skip: int) -> Iterator[dict[str, Any]]:
        aligned = self.student_tok is not None
        k = 0 if aligned else self.run.top_k
        # open files are kept across epochs, per process (DataLoader workers fork: a
        # file handle inherited from the parent would share its read offset)
        if getattr(self, "_files_pid", None) != os.getpid():
            self._files: dict[int, pq.ParquetFile] = {}
            self._files_pid = os.getpid()
        files = self._files
        lengths: dict[int, np.ndarray] = {}

        def pfile(s: int) -> pq.ParquetFile:
            if s not in files:
                files[s] = open_shard(self.run.shards[s], self.run.storage_options).file
            return files[s]

        lock = threading.Lock()  # one file handle per shard, shared with the prefetch thread

        def read(u: int, columns: list[str]) -> pa.Table:
            s, g = self.units[u]
            try:
                with lock:
                    return pfile(s).read_row_group(g, columns=columns)
            except Exception as err:
                raise ShardError(
                    f"shard {self.run.shards[s].name}: row group {g} failed to read: {err}"
                ) from err

        def length(ref: Ref) -> int:
            u, r = ref
            if u in decoded or aligned:  # any student: the text must be encoded first
                return get(u).length(r)
            if u in decoded:
                return decoded[u].length(r)
            if u not in lengths:
                col = read(u, ["input_ids"])["input_ids"].combine_chunks()
                lengths[u] = np.diff(col.offsets.to_numpy())
            return int(lengths[u][r])

        decoded: dict[int, Any] = {}  # DecodedRows | AlignedRows
        pending: dict[int, Future[Any]] = {}
        # when each unit is first needed and last needed, in stream order
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for i, (u, _) in enumerate(refs):
            first.setdefault(u, i)
            last[u] = i
        upcoming = sorted(first, key=first.__getitem__)  # units in order of first use
        ahead = 0  # index into upcoming of the next unit to prefetch
        pool = ThreadPoolExecutor(max_workers=1) if self.prefetch > 0 else None

        def load(u: int) -> Any:
            if aligned:
                return self._align_unit(read(u, kind_columns(self.align_kinds)))
            return decode_row_group(read(u, list(DECODE_COLUMNS)), k)

        def get(u: int) -> Any:
            if u not in decoded:
                fut = pending.pop(u, None)
                decoded[u] = fut.result() if fut is not None else load(u)
            return decoded[u]

        pos = {ref: i for i, ref in enumerate(refs)}
        try:
            for b, plan in enumerate(self._plans(refs, length)):
                if b < skip:
                    continue
                cursor = pos[plan[0][0][0]]
                for u in [u for u in decoded if last[u] < cursor]:
                    del decoded[u]
                while pool is not None and ahead < len(upcoming) and len(pending) < self.prefetch:
                    u = upcoming[ahead]
                    ahead += 1
                    if last[u] >= cursor and u not in decoded:
                        pending[u] = pool.submit(load, u)
                batch = self._collate_aligned(plan, get) if aligned else self._collate(plan, get)
                batch["_stream"] = stream
                batch["_batch"] = b
                yield batch
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _collate(self, plan: list[list[Piece]], get: Any) -> dict[str, Any]:
        k = self.run.top_k
        eos = self.run.student_eos_id
        bos = self.bos_id
        packed = self.pack_length is not None
        extra = 1 if bos is not None else 0
        plan = [
            [(ref, a, e if e >= 0 else get(ref[0]).length(ref[1]) + extra) for ref, a, e in row]
            for row in plan
        ]
        B = len(plan)
        T = self.pack_length if packed else max(sum(e - s for _, s, e in row) for row in plan)
        assert T is not None
        input_ids = np.full((B, T), self.pad_id, np.int64)
        labels = np.full((B, T), IGNORE_INDEX, np.int64)
        attn = np.zeros((B, T), bool)
        loss_mask = np.zeros((B, T), bool)
        topk_ids = np.zeros((B, T, k), np.int32)
        topk_lp = np.full((B, T, k), -np.inf, np.float32)
        tail = np.zeros((B, T), np.float32)
        target_lp = np.zeros((B, T), np.float32)
        position_ids = np.zeros((B, T), np.int64)
        segment_ids = np.zeros((B, T), np.int32)
        for b, row in enumerate(plan):
            t = 0
            for seg, ((u, r), start, end) in enumerate(row, 1):
                unit = get(u)
                a, z = int(unit.id_off[r]), int(unit.id_off[r + 1])
                ids = unit.ids[a:z]
                if bos is not None:
                    ids = np.concatenate([[bos], ids])
                # position p of the (possibly BOS-prefixed) sequence reads ids[p] and is
                # the target of row p + 1 (no BOS) or row p (BOS)
                row0 = int(unit.row_off[r]) + (0 if bos is not None else 1)
                n = end - start
                sl = slice(t, t + n)
                input_ids[b, sl] = ids[start:end]
                rows = slice(row0 + start, row0 + end)
                nxt = np.append(unit.ids[a:z], eos)  # next token of row i is nxt[i]
                lab = nxt[
                    (start if bos is not None else start + 1) : (
                        end if bos is not None else end + 1
                    )
                ]
                m = unit.loss_mask[rows]
                labels[b, sl] = np.where(m, lab, IGNORE_INDEX)
                attn[b, sl] = True
                loss_mask[b, sl] = m
                topk_ids[b, sl] = unit.topk_ids[rows]
                topk_lp[b, sl] = unit.topk_lp[rows]
                tail[b, sl] = unit.tail[rows]
                target_lp[b, sl] = unit.target_lp[rows]
                position_ids[b, sl] = np.arange(n)
                segment_ids[b, sl] = seg
                t += n
        out: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attn),
            "loss_mask": torch.from_numpy(loss_mask),
            "labels": torch.from_numpy(labels),
            "topk_ids": torch.from_numpy(topk_ids),
            "topk_logprobs": torch.from_numpy(topk_lp),
            "tail_mass": torch.from_numpy(tail),
            "target_logprob": torch.from_numpy(target_lp),
        }
        if packed:
            out["position_ids"] = torch.from_numpy(position_ids)
            out["segment_ids"] = torch.from_numpy(segment_ids)
        return out

    # ------------------------------------------------------------------ any student
    def _align_unit(self, table: pa.Table) -> AlignedRows:
        """A row group's sequences encoded with the student and aligned (`pipeline.align`)."""
        from pipeline.align import alm_batch_arrays, alm_chunks, byte_batch_arrays

        prov = self.run.provenance
        missing = [c for c in kind_columns(self.align_kinds) if c not in table.column_names]
        if missing:
            raise ShardError(
                f"run {self.run.url}: a shard lacks the columns {missing} of the kinds "
                f"{list(self.align_kinds)} its provenance lists (written by another version?)"
            )
        seqs = decode_kinds_row_group(table, prov.byte_top_k)
        out = AlignedRows([])
        for seq in seqs:
            ids, ends = self._student_bytes.encode(seq.text.decode("utf-8"))
            x = ids if self.bos_id is None else np.concatenate([[self.bos_id], ids])
            labels = np.full(len(x), IGNORE_INDEX, np.int64)
            labels[:-1] = x[1:]
            per_pos: dict[str, np.ndarray] = {"input_ids": x.astype(np.int64), "labels": labels}
            target = np.zeros(len(x), bool)
            chunk_lp = np.zeros(0)
            chunk_mask = np.zeros(0, bool)
            if "teacher" in self.align_kinds:
                assert seq.teacher_byte_end is not None and seq.teacher_logprob is not None
                chunks = alm_chunks(
                    seq.teacher_byte_end, seq.teacher_logprob, ends, target=seq.teacher_loss_mask
                )
                a = alm_batch_arrays(chunks, ids, bos_id=self.bos_id)
                per_pos["alm_labels"] = a["alm_labels"]
                per_pos["alm_chunk"] = a["alm_chunk"]
                chunk_lp, chunk_mask = a["alm_chunk_logprob"], a["alm_chunk_mask"]
                target |= (a["alm_chunk"] >= 0) & chunk_mask[np.maximum(a["alm_chunk"], 0)]
            if "bytes" in self.align_kinds:
                b = byte_batch_arrays(
                    seq.byte_row_start,
                    seq.byte_ids,
                    seq.byte_logprobs,
                    seq.byte_tail,
                    seq.byte_loss_mask,
                    seq.text,
                    ends,
                    self.byte_window,
                    bos_id=self.bos_id,
                    specials=self.byte_specials,
                )
                for key in ("byte_ids", "byte_logprobs", "byte_tail", "byte_mask", "byte_next"):
                    per_pos[key] = b[key]
                target |= b["byte_mask"][:, 0]
            per_pos["labels"] = np.where(target, labels, IGNORE_INDEX)
            per_pos["loss_mask"] = target
            out.seqs.append(AlignedSequence(len(ids), per_pos, chunk_lp, chunk_mask))
        return out

    def _collate_aligned(self, plan: list[list[Piece]], get: Any) -> dict[str, Any]:
        """A batch for a student of the trainer's choosing (any-student runs)."""
        extra = 1 if self.bos_id is not None else 0
        plan = [
            [(ref, a, e if e >= 0 else get(ref[0]).length(ref[1]) + extra) for ref, a, e in row]
            for row in plan
        ]
        B = len(plan)
        packed = self.pack_length is not None
        T = self.pack_length if packed else max(sum(e - s for _, s, e in row) for row in plan)
        assert T is not None
        first = get(plan[0][0][0][0]).seqs[plan[0][0][0][1]].per_pos
        fill = {
            "input_ids": self.pad_id,
            "labels": IGNORE_INDEX,
            "alm_labels": IGNORE_INDEX,
            "alm_chunk": -1,
            "byte_ids": -1,
            "byte_next": -1,
        }
        arrays = {
            key: np.full((B, T, *v.shape[1:]), fill.get(key, 0), dtype=v.dtype)
            for key, v in first.items()
        }
        attn = np.zeros((B, T), bool)
        position_ids = np.zeros((B, T), np.int64)
        segment_ids = np.zeros((B, T), np.int32)
        chunk_lps: list[list[np.ndarray]] = [[] for _ in range(B)]
        chunk_masks: list[list[np.ndarray]] = [[] for _ in range(B)]
        for b, row in enumerate(plan):
            t = 0
            n_chunks = 0
            for seg, ((u, r), start, end) in enumerate(row, 1):
                seq = get(u).seqs[r]
                n = end - start
                sl = slice(t, t + n)
                for key, v in seq.per_pos.items():
                    arrays[key][b, sl] = v[start:end]
                if "alm_chunk" in seq.per_pos:
                    # a chunk counts in this row only if all its positions are here
                    ch = seq.per_pos["alm_chunk"]
                    size = np.bincount(ch[ch >= 0], minlength=len(seq.chunk_logprob))
                    here = ch[start:end]
                    inside = np.bincount(here[here >= 0], minlength=len(seq.chunk_logprob))
                    whole = np.flatnonzero(size == inside)
                    whole = whole[size[whole] > 0]
                    renum = np.full(len(seq.chunk_logprob), -1, np.int64)
                    renum[whole] = n_chunks + np.arange(len(whole))
                    arrays["alm_chunk"][b, sl] = np.where(here >= 0, renum[np.maximum(here, 0)], -1)
                    chunk_lps[b].append(seq.chunk_logprob[whole])
                    chunk_masks[b].append(seq.chunk_mask[whole])
                    n_chunks += len(whole)
                attn[b, sl] = True
                position_ids[b, sl] = np.arange(n)
                segment_ids[b, sl] = seg
                t += n
        out: dict[str, Any] = {key: torch.from_numpy(v) for key, v in arrays.items()}
        out["attention_mask"] = torch.from_numpy(attn)
        if "alm_chunk" in arrays:
            C = max(1, max(sum(len(x) for x in row) for row in chunk_lps))
            lp = np.zeros((B, C), np.float32)
            cm = np.zeros((B, C), bool)
            for b in range(B):
                if chunk_lps[b]:
                    vals = np.concatenate(chunk_lps[b])
                    lp[b, : len(vals)] = vals
                    cm[b, : len(vals)] = np.concatenate(chunk_masks[b])
            out["alm_chunk_logprob"] = torch.from_numpy(lp)
            out["alm_chunk_mask"] = torch.from_numpy(cm)
        if packed:
            out["position_ids"] = torch.from_numpy(position_ids)
            out["segment_ids"] = torch.from_numpy(segment_ids)
        return out

    def __len__(self) -> int:  # batches per epoch over all ranks' workers is not fixed
        raise TypeError("TargetDataset streams; count batches by iterating")


@dataclass
class AlignedSequence:
    """A stored sequence encoded with the trainer's student and aligned to its positions."""

    length_: int  # student tokens
    per_pos: dict[str, np.ndarray]  # [P, ...] per position (P = tokens + BOS)
    chunk_logprob: np.ndarray  # [C] teacher log-likelihood of each ALM chunk
    chunk_mask: np.ndarray  # [C] which chunks count


@dataclass
class AlignedRows:
    seqs: list[AlignedSequence]

    def length(self, r: int) -> int:
        return self.seqs[r].length_


# ---------------------------------------------------------------------------- loader
class TargetLoader:
    """A `DataLoader` over a `TargetDataset` that records how far each worker stream got,
    so ``state_dict()`` / ``load_state_dict()`` resume mid-epoch exactly (the same
    remaining batches, in the same order, as an uninterrupted run with the same
    ``num_workers``). The state records every setting that decides which sequences go
    into which batch (`TargetDataset.resume_settings` and ``num_workers``), and
    ``load_state_dict`` refuses a state saved with other ones: counted in other batches,
    the skipped part would not be what was delivered. Extra keyword arguments go to
    `DataLoader` (``pin_memory``, ``prefetch_factor``, ``persistent_workers`` ...)."""

    def __init__(self, dataset: TargetDataset, num_workers: int = 0, **kwargs: Any) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.kwargs = kwargs
        self._consumed: dict[int, int] = {}
        self._last_stream: int | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, **self.kwargs
        )
        for batch in loader:
            stream = int(batch.pop("_stream"))
            self._consumed[stream] = int(batch.pop("_batch")) + 1
            self._last_stream = stream
            yield batch
        # a finished epoch: the next one starts fresh
        self.dataset.set_epoch(self.dataset.epoch + 1)
        self._consumed, self._last_stream = {}, None

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self._consumed, self._last_stream = {}, None

    def _settings(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, **self.dataset.resume_settings()}

    def state_dict(self) -> dict[str, Any]:
        streams = max(1, self.num_workers)
        nxt = 0 if self._last_stream is None else (self._last_stream + 1) % streams
        return {
            "epoch": self.dataset.epoch,
            "consumed": {str(s): n for s, n in sorted(self._consumed.items())},
            "next_stream": nxt,
            **self._settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` (from `state_dict`) stopped. Raises `ValueError` when
        the dataset or loader was built with settings other than the saved ones."""
        self._check_settings(state)
        self.dataset.epoch = int(state["epoch"])
        self._consumed = {int(s): int(n) for s, n in state["consumed"].items()}
        # DataLoader serves workers round-robin from worker 0: rotate the streams so
        # worker 0 plays the stream that was due next
        rotation = int(state["next_stream"])
        self.dataset.resume(self._consumed, rotation)
        self._last_stream = (
            None if not self._consumed else (rotation - 1) % max(1, self.num_workers)
        )

    def _check_settings(self, state: dict[str, Any]) -> None:
        current = self._settings()
        epoch = int(state["epoch"])
        started = any(int(n) > 0 for n in state["consumed"].values())
        # to change settings, start an epoch afresh instead of resuming inside one
        fresh = f"loader.set_epoch({epoch + 1 if started else epoch})"
        differ = [
            f"{key}: saved {state[key]!r}, current {now!r}"
            for key, now in current.items()
            if key in state
            and state[key] != now
            # without packing, a BOS changes no batch's sequences
            and not (
                key == "bos_id"
                and state.get("pack_length") is None
                and self.dataset.pack_length is None
            )
        ]
        if differ:
            raise ValueError(
                "cannot resume from this loader state: it was saved by a reader with other "
                "settings, and resuming with these would skip or repeat sequences ("
                + "; ".join(differ)
                + "). To resume epoch "
                f"{epoch}, construct the TargetDataset (over the same run, on the same rank) "
                "and the TargetLoader with the saved settings; to use the new settings, start "
                f"a new epoch instead of resuming: {fresh}"
            )
        missing = [key for key in current if key not in state]
        if missing and started:  # an older state: nothing to check these against
            raise ValueError(
                "cannot resume from this loader state: it was saved by an older reader that "
                f"did not record {', '.join(missing)}, so it cannot be checked that this "
                "dataset and loader batch the run as the saved one did (other settings "
                "would skip or repeat sequences). If you are sure they are built with the "
                "same settings, load it with the current ones filled in: "
                "loader.load_state_dict({**loader.state_dict(), **state}); otherwise start "
                f"a new epoch: {fresh}"
            )


__all__: Sequence[str] = [
    "IGNORE_INDEX",
    "Run",
    "ShardError",
    "ShardInfo",
    "TargetDataset",
    "TargetLoader",
    "open_run",
]
