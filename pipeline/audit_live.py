"""The audit's checks that need the run's tokenizers or teacher: `inspect_document` (a
document's targets decoded for a person to read) and `verify_live` (re-score sampled
sequences with the teacher and compare with what is stored), and the run config they
load. `pipeline.audit` (integrity and statistics) needs neither and stays light.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import io as xio
from pipeline.audit import TEACHER_FLOOR, AuditError, Source, live_tolerance
from pipeline.shards import (
    ShardError,
    ShardRef,
    decode_kinds_row_group,
    decode_row_group,
    flat_list,
    folder_of,
    open_shard,
    shard_ref,
)
from schemas.run import Provenance
from schemas.targets import (
    LOGPROB_NONE,
    LOGPROB_STEP,
    METADATA_KEY,
    TEACHER_LOGPROB_STEP,
)


# ---------------------------------------------------------------------------- config
def load_run_config(
    base: str, storage_options: dict[str, Any] | None = None, url: str | None = None
) -> Any:
    """The run's resolved ``config.yaml`` (beside the shards, or ``url``) as a `JobConfig`."""
    import yaml

    from pipeline.config import JobConfig

    url = url or xio.join(base, "config.yaml")
    try:
        data = yaml.safe_load(xio.read_bytes(url, storage_options))
        return JobConfig.model_validate(data or {})
    except xio.StorageError as err:
        raise AuditError(f"cannot read the run config {url}: {err} (pass --config)") from err
    except Exception as err:
        raise AuditError(f"the run config {url} is not a valid job config: {err}") from err


def student_tokenizer(cfg: Any, provenance: dict[str, Any] | Provenance) -> Any:
    """The student tokenizer of a run (a `TokenPrinter`: any student), checked against
    the tokenizer hash recorded in the shard."""
    from pipeline.generate import tokenizer_pair
    from pipeline.tokenization import TokenPrinter

    S = TokenPrinter(tokenizer_pair(cfg)[1])
    want = Provenance.parse(provenance).student_tokenizer_sha256
    if want is not None and S.fingerprint != want:
        raise AuditError(
            f"the run config gives a student tokenizer with sha256 {S.fingerprint[:16]}..., "
            f"the shard was made with {str(want)[:16]}... (wrong config.yaml?)"
        )
    return S


# ---------------------------------------------------------------------------- inspect
def inspect_document(
    shard_url: str,
    doc_id: str,
    pos: int | None = None,
    storage_options: dict[str, Any] | None = None,
    config_url: str | None = None,
    top: int = 5,
) -> str:
    """A document's student tokens and, per target row, its ``top`` targets decoded to
    strings with their probabilities (for a person to read)."""
    ref = shard_ref(shard_url.rstrip("/"), storage_options)
    if ref.manifest is None:
        raise AuditError(f"shard {ref.name}: {ref.problem}")
    try:
        opened = open_shard(ref, storage_options)
    except ShardError as err:
        raise AuditError(str(err)) from err
    pf, groups, meta = opened.file, opened.row_groups, opened.provenance
    try:
        if "student" not in meta.kinds:
            raise AuditError(
                f"shard {ref.name} stores no student rows (target kinds {meta.kinds}); "
                "inspect shows student rows"
            )
        if meta.top_k is None:
            raise AuditError(f"shard {ref.name}: its provenance has no top_k")
        k = meta.top_k
        eos = -1 if meta.student_eos_id is None else meta.student_eos_id
        doc_ids = pf.read(columns=["doc_id"])["doc_id"].to_pylist()
        where = [i for i, d in enumerate(doc_ids) if d == doc_id]
        if not where:
            firsts = list(dict.fromkeys(doc_ids))[:5]
            raise AuditError(
                f"doc {doc_id!r} is not in shard {ref.name} ({len(set(doc_ids))} documents"
                + (f", e.g. {', '.join(map(repr, firsts))}" if firsts else "")
                + ")"
            )
        S = student_tokenizer(
            load_run_config(folder_of(ref.url), storage_options, config_url), meta
        )
        starts = np.cumsum([0, *groups])
        out = [
            f"shard {ref.name}, doc {doc_id!r}: {len(where)} sequence(s), k={k}",
            "row i is the target for the token after tokens[:i] (its actual next token is "
            "tokens[i]; the last row predicts the student EOS); * = loss_mask (a training target)",
        ]
        ranges: list[str] = []  # chunks that do not hold row ``pos``
        for i in where:
            g = int(np.searchsorted(starts, i, side="right") - 1)
            table = pf.read_row_group(g).slice(i - int(starts[g]), 1)
            chunk = int(table["chunk"][0].as_py())
            u = decode_row_group(table, k)
            ids = u.ids.tolist()
            L = len(ids)
            if pos is not None and not 0 <= pos <= L:  # rows count from 0 in each chunk
                ranges.append(f"chunk {chunk}: rows 0..{L}")
                continue
            text = S.decode_bytes(ids).decode("utf-8", errors="replace")
            out.append(f"--- chunk {chunk}: {L} student tokens, {L + 1} target rows")
            first = 0
            if pos is None:
                out.append(f"text: {text!r}")
            else:  # the tokens just before the row
                first = max(0, pos - 12)
            shown = range(first, L if pos is None else pos)
            out.append("tokens: " + " ".join(f"[{j}]{S.token_repr(ids[j])!r}" for j in shown))
            rows = range(L + 1) if pos is None else [pos]
            for r in rows:
                nxt = S.token_repr(ids[r]) if r < L else f"<eos {eos}>"
                tops = "  ".join(
                    f"{S.token_repr(int(t))!r} {float(np.exp(lp)):.4f}"
                    for t, lp in zip(u.topk_ids[r][:top], u.topk_lp[r][:top], strict=True)
                    if np.isfinite(lp)
                )
                out.append(
                    f"{'*' if u.loss_mask[r] else ' '} row {r:4d}  next {nxt!r:<14} "
                    f"logP {float(u.target_lp[r]):8.3f} | {tops} | tail {float(u.tail[r]):.4f}"
                )
        if pos is not None and len(ranges) == len(where):
            raise AuditError(
                f"--pos {pos} is in no chunk of doc {doc_id!r} (" + "; ".join(ranges) + ")"
            )
        return "\n".join(out)
    finally:
        opened.close()


# ---------------------------------------------------------------------------- verify-live
# the provenance keys --verify-live compares between the shards and the run config
_LIVE_KEYS = (
    "teacher",
    "teacher_revision",
    "teacher_tokenizer_sha256",
    "student_tokenizer_sha256",
    "top_k",
    "temperature",
)
# and for shards with target kinds (a schema 1 shard has none of them)
_LIVE_KIND_KEYS = ("targets", "byte_top_k", "byte_specials", "byte_eos", "teacher_eos_id")


def verify_live(
    source: Source,
    shards: Sequence[ShardRef],
    n: int,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    config_url: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Re-score ``n`` sequences sampled with ``seed`` from ``shards`` with the live teacher
    of the run's config and compare with the stored rows.

    A student-only shard (schema version 1) stores no text: each sequence's student
    ``input_ids`` are decoded with the student tokenizer and must re-encode to the same
    ids (else it is reported and not compared). The top-k log-probs are compared position
    by position (both rows are sorted, so a tie swapped between two ids does not count);
    the audit passes when the largest difference is within ``LOGPROB_STEP / 2`` (storage
    quantisation) plus ``LIVE_TOLERANCE``. Tail mass and target log-prob differences are
    reported too. Works through the `pipeline.scoring.protocol.Scorer` interface, for
    either scorer; the rows re-scored are those the shard's loss mask kept (the ones the
    job computed: the general scorer computes no others, and leaves them empty in both).

    A shard with target kinds (``bytes``, ``teacher``; with or without ``student``) is
    re-scored from its stored ``text`` through `pipeline.scoring.kinds.TargetKinds`, every
    kind it stores from the same forwards as the job (the text must encode to the stored
    student ids and teacher tokens, else it is reported and not compared). Student rows
    are compared as above; byte rows the same way (their top-k log-probs are quantised
    alike: same bound; tail and target log-prob differences reported); the teacher
    tokens' log-probs are stored each within one ``TEACHER_LOGPROB_STEP`` (quantised
    with error feedback), so they must agree within that step plus ``LIVE_TOLERANCE``
    (the largest difference of their running sums is reported too). The result
    then has ``kinds`` (per kind: compared, max |diff|, bound, ok, worst sequence), and
    each sequence its ``bytes`` and ``teacher`` comparisons; ``max_abs_logprob_diff`` is
    over the quantised rows (student and bytes)."""
    from pipeline.generate import GenerateStep

    cfg = load_run_config(source.base, storage_options, config_url)
    if device:
        cfg.teacher.device = device
    # like with like: re-score in the dtype the run resolved (``auto`` is bfloat16 on a
    # GPU, float32 on a CPU auditor)
    stored_dtype = next(
        (r.manifest.get("teacher_dtype") for r in shards if r.manifest is not None),
        None,
    )
    if stored_dtype in ("float32", "bfloat16", "float16") and cfg.teacher.dtype == "auto":
        cfg.teacher.dtype = stored_dtype
    step = GenerateStep(cfg)
    step.setup()
    tol_max, tol_p99 = live_tolerance(str(step.provenance.get("teacher_dtype")))
    bound = LOGPROB_STEP / 2 + tol_max
    p99_bound = LOGPROB_STEP / 2 + tol_p99
    diffs: list[np.ndarray] = []  # every compared top-k entry's |diff| (student, bytes)
    result: dict[str, Any] = {
        "requested": n,
        "seed": seed,
        "bound": bound,
        "p99_bound": p99_bound,
        "teacher_dtype": step.provenance.get("teacher_dtype"),
        "logprob_step": LOGPROB_STEP,
        "config": xio.join(source.base, "config.yaml") if config_url is None else config_url,
        "config_differences": {},
        "sequences": [],
        "not_reencoded": [],
    }
    sizes = [int(r.manifest.get("sequences") or 0) if r.manifest else 0 for r in shards]
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(total, size=min(n, total), replace=False).tolist()) if total else []
    starts = np.cumsum([0, *sizes])
    wanted: dict[int, list[int]] = {}
    for p in picks:
        s = int(np.searchsorted(starts, p, side="right") - 1)
        wanted.setdefault(s, []).append(p - int(starts[s]))
    todo: list[tuple[dict[str, Any], Any, np.ndarray, dict[str, np.ndarray]]] = []
    kind_todo: list[_KindItem] = []
    for s, seqs in wanted.items():
        ref = shards[s]
        opened = open_shard(ref, storage_options)
        pf, groups = opened.file, opened.row_groups
        try:
            meta = json.loads((pf.schema_arrow.metadata or {}).get(METADATA_KEY, b"{}"))
            kinds = Provenance.parse(meta).kinds
            with_kinds = kinds != ["student"]
            keys = _LIVE_KEYS + (_LIVE_KIND_KEYS if "targets" in meta else ())
            diff = {
                key: {"shard": meta.get(key), "config": step.provenance.get(key)}
                for key in keys
                if meta.get(key) != step.provenance.get(key)
            }
            if diff:
                result["config_differences"][ref.name] = diff
            missing = [k for k in kinds if k not in step.targets.kinds]
            if missing:
                raise AuditError(
                    f"shard {ref.name} stores the target kinds {kinds}, the run config "
                    f"scores {list(step.targets.kinds)} (wrong config.yaml?)"
                )
            gstart = np.cumsum([0, *groups])
            by_group: dict[int, list[int]] = {}
            for i in seqs:
                g = int(np.searchsorted(gstart, i, side="right") - 1)
                by_group.setdefault(g, []).append(i - int(gstart[g]))
            for g, rows in by_group.items():
                table = pf.read_row_group(g)
                if with_kinds:
                    kind_todo += _kind_items(step, ref.name, meta, kinds, table, rows, result)
                else:
                    todo += _student_items(step, ref.name, int(meta["top_k"]), table, rows, result)
        finally:
            opened.close()
    worst = 0.0
    scorer, teacher = step.scorer, step.teacher
    for k in sorted({t[3]["topk_lp"].shape[1] for t in todo}):
        assert scorer is not None
        batch = [t for t in todo if t[3]["topk_lp"].shape[1] == k]
        live = scorer.score_prepared(
            teacher, [t[1] for t in batch], top_k=k, rows=[t[3]["loss_mask"] for t in batch]
        )
        for (info, _, _, stored), doc in zip(batch, live, strict=True):
            entry = _compare_student(stored, doc, k, diffs)
            worst = max(worst, entry["max_abs_logprob_diff"])
            result["sequences"].append({**info, **entry})
    per_kind: dict[str, dict[str, Any]] = {}
    if kind_todo:
        worst = max(worst, _score_kinds(step, kind_todo, result, per_kind, bound, tol_max, diffs))
    compared = len(result["sequences"])
    every = np.concatenate(diffs) if diffs else np.zeros(0)
    every = every[np.isfinite(every)]
    quant = {
        q: float(np.quantile(every, v)) if every.size else None
        for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
    }
    result["diff_quantiles"] = {
        **quant,
        "max": float(every.max()) if every.size else None,
        "entries": int(every.size),
    }
    p99_ok = quant["p99"] is None or quant["p99"] <= p99_bound
    result["compared"] = compared
    result["max_abs_logprob_diff"] = worst if compared else None
    if per_kind:
        result["kinds"] = per_kind
    kinds_ok = all(v["ok"] for v in per_kind.values())
    ok = compared > 0 and not result["not_reencoded"] and worst <= bound and kinds_ok and p99_ok
    result["ok"] = ok
    if ok:
        verdict = f"{compared} sequences re-scored, max |diff| {worst:.6f} <= {bound:.6f}"
        if per_kind:
            verdict += (
                " ("
                + ", ".join(
                    f"{kind} {v['max_abs_diff']:.6f} <= {v['bound']:.6f}"
                    for kind, v in per_kind.items()
                )
                + ")"
            )
    elif compared == 0 and not result["not_reencoded"]:
        verdict = "no sequence to re-score"
    else:
        parts = []
        if per_kind:
            for kind, v in per_kind.items():
                if not v["ok"]:
                    w = v["worst"]
                    parts.append(
                        f"{kind}: max |diff| {v['max_abs_diff']:.6f} > {v['bound']:.6f} over "
                        f"{v['compared']} sequences (worst: shard {w['shard']} doc "
                        f"{w['doc_id']!r} chunk {w['chunk']})"
                    )
        elif worst > bound:
            parts.append(f"max |diff| {worst:.6f} > {bound:.6f} over {compared} sequences")
        if result["not_reencoded"]:
            parts.append(f"{len(result['not_reencoded'])} sequences do not re-encode")
        if result["config_differences"]:
            parts.append(
                "the config differs from the shards in "
                + ", ".join(sorted({k for d in result["config_differences"].values() for k in d}))
            )
        verdict = "; ".join(parts)
    result["verdict"] = verdict
    return result


def _student_items(
    step: Any, shard: str, k: int, table: Any, rows: list[int], result: dict[str, Any]
) -> list[tuple[dict[str, Any], Any, np.ndarray, dict[str, np.ndarray]]]:
    """The sampled sequences of a student-only row group, decoded from their student ids
    and prepared by the run's scorer (those that do not re-encode go to the result's
    ``not_reencoded``)."""
    from pipeline.tokenization import UnscorableTextError

    scorer = step.scorer
    if scorer is None:
        raise AuditError(
            f"shard {shard} stores student rows, the run config asks for none (wrong config.yaml?)"
        )
    out = []
    u = decode_row_group(table, k)
    for r in rows:
        a, z = int(u.id_off[r]), int(u.id_off[r + 1])
        ra, rz = int(u.row_off[r]), int(u.row_off[r + 1])
        info = {
            "shard": shard,
            "doc_id": table["doc_id"][r].as_py(),
            "chunk": int(table["chunk"][r].as_py()),
            "tokens": z - a,
        }
        ids = u.ids[a:z]
        stored = {
            "topk_ids": u.topk_ids[ra:rz],
            "topk_lp": u.topk_lp[ra:rz],
            "tail": u.tail[ra:rz],
            "target_lp": u.target_lp[ra:rz],
            "loss_mask": u.loss_mask[ra:rz],
        }
        try:
            text = scorer.student.decode_bytes(ids.tolist()).decode("utf-8")
            prep = scorer.prepare(text)
        except (UnscorableTextError, UnicodeDecodeError) as err:
            # ids without bytes, bytes that are not UTF-8, a text the scorer
            # refuses; anything else is a bug and propagates
            result["not_reencoded"].append({**info, "reason": str(err)})
            continue
        if list(prep.student_ids) != ids.tolist():
            result["not_reencoded"].append(
                {**info, "reason": "the decoded text re-encodes to different student ids"}
            )
            continue
        out.append((info, prep, ids, stored))
    return out


def _compare_topk(
    want_lp: np.ndarray,
    want_ids: np.ndarray,
    live_lp: Any,
    live_ids: Any,
    k: int,
    sink: list[np.ndarray] | None = None,
) -> tuple[float, int, float]:
    """Stored vs live top-k rows: (max |log-prob difference| over the entries both have,
    inf when a row count or a missing entry differs; entries missing in one only; share
    of top-k slots holding the same id)."""
    lk = np.asarray(live_lp, dtype=np.float64)
    if lk.ndim != 2 or lk.shape[0] != want_lp.shape[0]:
        return float("inf"), abs(int(lk.shape[0]) - int(want_lp.shape[0])) * k, 0.0
    got = np.full((lk.shape[0], k), -np.inf, dtype=np.float64)
    got[:, : lk.shape[1]] = lk[:, :k]
    # storage saturates at q = 65534 steps (a missing entry, -inf, stays missing)
    floor = -(LOGPROB_NONE - 1) * LOGPROB_STEP
    got = np.where(np.isfinite(got), np.maximum(got, floor), got)
    want = want_lp.astype(np.float64)
    fin_w, fin_g = np.isfinite(want), np.isfinite(got)
    missing = int((fin_w != fin_g).sum())
    both = fin_w & fin_g
    d = float(np.abs(want[both] - got[both]).max()) if both.any() else 0.0
    if sink is not None:
        sink.append(np.abs(want[both] - got[both]))
    if missing:
        d = float("inf")
    ids_live = np.zeros((lk.shape[0], k), dtype=np.int64)
    ids_live[:, : lk.shape[1]] = np.asarray(live_ids)[:, :k]
    return d, missing, float((ids_live == want_ids).mean()) if want_ids.size else 1.0


def _compare_student(
    stored: dict[str, np.ndarray], doc: Any, k: int, sink: list[np.ndarray] | None = None
) -> dict[str, Any]:
    """The per-sequence comparison of student rows (the keys of a student-only run)."""
    d, missing, agree = _compare_topk(
        stored["topk_lp"], stored["topk_ids"], doc.topk_logprobs, doc.topk_ids, k, sink
    )
    return {
        "max_abs_logprob_diff": d,
        "missing_mismatch": missing,
        "max_tail_mass_diff": _max_diff(stored["tail"], doc.tail_mass),
        "max_target_logprob_diff": _finite_diff(stored["target_lp"], doc.target_logprobs),
        # share of top-k slots holding the same id (near-ties may swap)
        "topk_id_agreement": agree,
    }


@dataclass
class _KindItem:
    """A sampled sequence of a shard with target kinds, prepared for the re-score."""

    info: dict[str, Any]
    prep: Any  # `pipeline.scoring.kinds.KindsPrepared`
    kinds: list[str]
    top_k: int | None
    byte_top_k: int | None
    student: dict[str, np.ndarray] | None = None
    teacher_logprob: np.ndarray | None = None
    byte_ids: np.ndarray | None = None
    byte_lp: np.ndarray | None = None
    byte_tail: np.ndarray | None = None
    byte_target_lp: np.ndarray | None = None


def _kind_items(
    step: Any,
    shard: str,
    meta: dict[str, Any],
    kinds: list[str],
    table: Any,
    rows: list[int],
    result: dict[str, Any],
) -> list[_KindItem]:
    """The sampled sequences of a row group with target kinds, prepared from their stored
    text by the run's `TargetKinds` (those whose text does not encode to the stored
    student ids or teacher tokens go to the result's ``not_reencoded``)."""
    from pipeline.tokenization import UnscorableTextError

    k = int(meta["top_k"]) if "student" in kinds else None
    kb = int(meta["byte_top_k"]) if "bytes" in kinds else None
    seqs = decode_kinds_row_group(table, kb)
    u = decode_row_group(table, k) if k is not None else None
    tids = flat_list(table["teacher_ids"]) if "teacher" in kinds else None
    btlp = flat_list(table["byte_target_logprob"]) if "bytes" in kinds else None
    out = []
    for r in rows:
        ks = seqs[r]
        info: dict[str, Any] = {
            "shard": shard,
            "doc_id": table["doc_id"][r].as_py(),
            "chunk": int(table["chunk"][r].as_py()),
            "text_bytes": len(ks.text),
        }
        item = _KindItem(info, None, kinds, k, kb)
        ids = None
        if u is not None:
            a, z = int(u.id_off[r]), int(u.id_off[r + 1])
            ra, rz = int(u.row_off[r]), int(u.row_off[r + 1])
            info["tokens"] = z - a
            ids = u.ids[a:z]
            item.student = {
                "topk_ids": u.topk_ids[ra:rz],
                "topk_lp": u.topk_lp[ra:rz],
                "tail": u.tail[ra:rz],
                "target_lp": u.target_lp[ra:rz],
                "loss_mask": u.loss_mask[ra:rz],
            }
        teacher_ids = None
        if tids is not None:
            values, off = tids
            teacher_ids = values[off[r] : off[r + 1]].astype(np.int64)
            info["teacher_tokens"] = len(teacher_ids)
            item.teacher_logprob = ks.teacher_logprob
        if btlp is not None:
            values, off = btlp
            item.byte_target_lp = values[off[r] : off[r + 1]]
            item.byte_ids, item.byte_lp, item.byte_tail = (
                ks.byte_ids,
                ks.byte_logprobs,
                ks.byte_tail,
            )
        try:
            prep = step.targets.prepare(ks.text.decode("utf-8"))
        except (UnscorableTextError, UnicodeDecodeError) as err:
            result["not_reencoded"].append({**info, "reason": str(err)})
            continue
        if ids is not None and prep.student_ids != ids.tolist():
            result["not_reencoded"].append(
                {**info, "reason": "the stored text encodes to different student ids"}
            )
            continue
        if teacher_ids is not None and prep.teacher_ids != teacher_ids.tolist():
            result["not_reencoded"].append(
                {**info, "reason": "the stored text encodes to different teacher tokens"}
            )
            continue
        item.prep = prep
        out.append(item)
    return out


def _score_kinds(
    step: Any,
    items: list[_KindItem],
    result: dict[str, Any],
    per_kind: dict[str, dict[str, Any]],
    bound: float,
    tolerance: float,
    sink: list[np.ndarray] | None = None,
) -> float:
    """Re-score the items with the run's `TargetKinds`, append each sequence's comparison
    to ``result["sequences"]`` and fill ``per_kind``; returns the max |diff| of the
    quantised rows (student, bytes)."""
    worst = 0.0
    teacher_bound = TEACHER_LOGPROB_STEP + tolerance

    def note(kind: str, d: float, limit: float, info: dict[str, Any], ok: bool) -> None:
        v = per_kind.setdefault(
            kind, {"compared": 0, "max_abs_diff": 0.0, "bound": limit, "ok": True, "worst": None}
        )
        v["compared"] += 1
        v["ok"] = v["ok"] and ok
        if v["worst"] is None or d > v["max_abs_diff"]:
            v["max_abs_diff"] = d
            v["worst"] = {key: info[key] for key in ("shard", "doc_id", "chunk")}

    for key in sorted({(i.top_k or 0, i.byte_top_k or 0) for i in items}):
        batch = [i for i in items if (i.top_k or 0, i.byte_top_k or 0) == key]
        live = step.targets.score_prepared(
            step.teacher,
            [i.prep for i in batch],
            batch[0].top_k,
            byte_top_k=batch[0].byte_top_k,
            rows=[i.student["loss_mask"] if i.student is not None else None for i in batch],
        )
        for item, res in zip(batch, live, strict=True):
            entry: dict[str, Any] = dict(item.info)
            if item.student is not None:
                assert item.top_k is not None
                cmp = _compare_student(item.student, res.student, item.top_k, sink)
                entry.update(cmp)
                d = cmp["max_abs_logprob_diff"]
                worst = max(worst, d)
                note("student", d, bound, item.info, d <= bound)
            if item.byte_lp is not None:
                assert item.byte_top_k is not None and item.byte_ids is not None
                assert item.byte_tail is not None and item.byte_target_lp is not None
                scored = res.bytes.scored
                d, missing, agree = _compare_topk(
                    item.byte_lp,
                    item.byte_ids,
                    scored.topk_logprobs,
                    scored.topk_ids,
                    item.byte_top_k,
                    sink,
                )
                same = item.byte_lp.shape[0] == len(scored.tail_mass)
                entry["bytes"] = {
                    "rows": int(item.byte_lp.shape[0]),
                    "max_abs_logprob_diff": d,
                    "missing_mismatch": missing,
                    "max_tail_mass_diff": _max_diff(item.byte_tail, scored.tail_mass)
                    if same
                    else float("inf"),
                    "max_target_logprob_diff": _finite_diff(
                        item.byte_target_lp, scored.target_logprobs
                    )
                    if same
                    else float("inf"),
                    "topk_id_agreement": agree,
                }
                worst = max(worst, d)
                note("bytes", d, bound, item.info, d <= bound)
            if item.teacher_logprob is not None:
                # teacher_logprob_q keeps each log-prob within one quantisation step (and
                # each running sum within half a step: reported)
                want = np.asarray(item.teacher_logprob, dtype=np.float64)
                got = np.minimum(np.asarray(res.teacher.logprob, dtype=np.float64), 0.0)
                got = np.maximum(got, TEACHER_FLOOR)  # storage saturates there
                if want.shape != got.shape:
                    d = running = float("inf")
                else:
                    d = _finite_diff(want, got)
                    running = float(np.abs(np.cumsum(want) - np.cumsum(got)).max())
                entry["teacher"] = {
                    "tokens": int(len(want) - 1),
                    "max_abs_logprob_diff": d,
                    "max_running_sum_diff": running,
                }
                note("teacher", d, teacher_bound, item.info, d <= teacher_bound)
            result["sequences"].append(entry)
    return worst


def _max_diff(a: np.ndarray, b: Any) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max()) if a.size else 0.0


def _finite_diff(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    if (np.isfinite(a) != np.isfinite(b)).any():
        return float("inf")
    return float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0
