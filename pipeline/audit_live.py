"""The audit's checks that need the run's tokenizers or teacher: `inspect_document` (a
document's targets decoded for a person to read) and `verify_live` (re-score sampled
sequences with the teacher and compare with what is stored), and the run config they
load. `pipeline.audit` (integrity and statistics) needs neither and stays light.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline import io as xio
from pipeline.audit import LIVE_TOLERANCE, AuditError, Source
from pipeline.shards import (
    ShardError,
    ShardRef,
    decode_row_group,
    folder_of,
    open_shard,
    shard_ref,
)
from schemas.run import Provenance
from schemas.targets import (
    LOGPROB_NONE,
    LOGPROB_STEP,
    METADATA_KEY,
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

    A shard stores no text: each sequence's student ``input_ids`` are decoded with the
    student tokenizer and must re-encode to the same ids (else it is reported and not
    compared). The top-k log-probs are compared position by position (both rows are
    sorted, so a tie swapped between two ids does not count); the audit passes when the
    largest difference is within ``LOGPROB_STEP / 2`` (storage quantisation) plus
    ``LIVE_TOLERANCE``. Tail mass and target log-prob differences are reported too.
    Works through the `pipeline.scoring.protocol.Scorer` interface, for either scorer;
    the rows re-scored are those the shard's loss mask kept (the ones the job computed:
    the general scorer computes no others, and leaves them empty in both)."""
    from pipeline.generate import GenerateStep
    from pipeline.tokenization import UnscorableTextError

    cfg = load_run_config(source.base, storage_options, config_url)
    if device:
        cfg.teacher.device = device
    step = GenerateStep(cfg)
    step.setup()
    scorer, teacher = step.scorer, step.teacher
    bound = LOGPROB_STEP / 2 + LIVE_TOLERANCE
    result: dict[str, Any] = {
        "requested": n,
        "seed": seed,
        "bound": bound,
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
    for s, seqs in wanted.items():
        ref = shards[s]
        opened = open_shard(ref, storage_options)
        pf, groups = opened.file, opened.row_groups
        try:
            meta = json.loads((pf.schema_arrow.metadata or {}).get(METADATA_KEY, b"{}"))
            diff = {
                key: {"shard": meta.get(key), "config": step.provenance.get(key)}
                for key in (
                    "teacher",
                    "teacher_revision",
                    "teacher_tokenizer_sha256",
                    "student_tokenizer_sha256",
                    "top_k",
                    "temperature",
                )
                if meta.get(key) != step.provenance.get(key)
            }
            if diff:
                result["config_differences"][ref.name] = diff
            k = int(meta["top_k"])
            gstart = np.cumsum([0, *groups])
            by_group: dict[int, list[int]] = {}
            for i in seqs:
                g = int(np.searchsorted(gstart, i, side="right") - 1)
                by_group.setdefault(g, []).append(i - int(gstart[g]))
            for g, rows in by_group.items():
                table = pf.read_row_group(g)
                u = decode_row_group(table, k)
                for r in rows:
                    a, z = int(u.id_off[r]), int(u.id_off[r + 1])
                    ra, rz = int(u.row_off[r]), int(u.row_off[r + 1])
                    info = {
                        "shard": ref.name,
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
                            {
                                **info,
                                "reason": "the decoded text re-encodes to different student ids",
                            }
                        )
                        continue
                    todo.append((info, prep, ids, stored))
        finally:
            opened.close()
    worst = 0.0
    for k in sorted({t[3]["topk_lp"].shape[1] for t in todo}):
        batch = [t for t in todo if t[3]["topk_lp"].shape[1] == k]
        live = scorer.score_prepared(
            teacher, [t[1] for t in batch], top_k=k, rows=[t[3]["loss_mask"] for t in batch]
        )
        for (info, _, _, stored), doc in zip(batch, live, strict=True):
            got = np.full((len(doc.student_ids) + 1, k), -np.inf, dtype=np.float64)
            lk = np.asarray(doc.topk_logprobs, dtype=np.float64)
            got[:, : lk.shape[1]] = lk[:, :k]
            # storage saturates at q = 65534 steps (a missing entry, -inf, stays missing)
            floor = -(LOGPROB_NONE - 1) * LOGPROB_STEP
            got = np.where(np.isfinite(got), np.maximum(got, floor), got)
            want = stored["topk_lp"].astype(np.float64)
            fin_w, fin_g = np.isfinite(want), np.isfinite(got)
            missing = int((fin_w != fin_g).sum())
            both = fin_w & fin_g
            d = float(np.abs(want[both] - got[both]).max()) if both.any() else 0.0
            if missing:
                d = float("inf")
            ids_live = np.zeros((len(doc.student_ids) + 1, k), dtype=np.int64)
            ids_live[:, : lk.shape[1]] = np.asarray(doc.topk_ids)[:, :k]
            worst = max(worst, d)
            result["sequences"].append(
                {
                    **info,
                    "max_abs_logprob_diff": d,
                    "missing_mismatch": missing,
                    "max_tail_mass_diff": float(
                        np.abs(stored["tail"].astype(np.float64) - doc.tail_mass).max()
                    ),
                    "max_target_logprob_diff": _finite_diff(
                        stored["target_lp"], doc.target_logprobs
                    ),
                    # share of top-k slots holding the same id (near-ties may swap)
                    "topk_id_agreement": float((ids_live == stored["topk_ids"]).mean()),
                }
            )
    compared = len(result["sequences"])
    result["compared"] = compared
    result["max_abs_logprob_diff"] = worst if compared else None
    ok = compared > 0 and not result["not_reencoded"] and worst <= bound
    result["ok"] = ok
    if ok:
        verdict = f"{compared} sequences re-scored, max |diff| {worst:.6f} <= {bound:.6f}"
    elif compared == 0 and not result["not_reencoded"]:
        verdict = "no sequence to re-score"
    else:
        parts = []
        if worst > bound:
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


def _finite_diff(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    if (np.isfinite(a) != np.isfinite(b)).any():
        return float("inf")
    return float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0
