"""Audit a run of target shards: what is in them, how good the targets are, proof they are intact.

    python -m jobs.audit RUN [--shards GLOB] [--out DIR] [--executor local|ray] [--verify-live N]
    python -m jobs.audit inspect SHARD --doc ID [--pos N]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.audit s3://bucket/run --executor ray

RUN is a run directory, its ``index.json`` URL, one ``.parquet`` shard or a glob of them
(local, s3://, gs://, ...). ``run`` is the default subcommand (its options:
``python -m jobs.audit run --help``). It prints tables and
writes to ``--out`` (default ``./audit-<run folder>``): ``summary.json`` (machine
readable: ``ok``, every shard's integrity checks, the statistics), ``report.html`` (one
page with the tables and the plots embedded) and the plots as PNG files.

Per run and per shard: documents, sequences, student tokens, skipped records by reason,
bytes, bytes/token, compression ratio, integrity checks (manifest, size, sha256 of the
whole file, Parquet footer and schema version, every page's CRC, row counts vs the
manifest, file metadata vs manifest). Target quality over target rows (loss_mask): top-k
mass (mean, p5, p50), tail mass, entropy (nats; stored top-k plus the tail as one bin),
rows by regime (exact / lossless / approximate), unaccounted, unmapped and non-canonical
mass, teacher log-likelihood per token. Consistency: the provenance (teacher, revision,
tokenizer hashes, k, temperature, schema version, config hash, ...) of every shard must
equal the run index's; differences are listed per shard.

Runs with target kinds (scoring.targets with bytes and/or teacher, schema version 2) add,
per shard and run: the byte rows' kept mass (1 - tail), entropy and log-likelihood per
byte; the teacher tokens' log-likelihood per token and per text byte (nats and bits);
stored bytes per kind (per student token, text byte, teacher token); integrity checks
per kind (lengths, offsets, byte rows summing to 1, log-probs <= 0); and the telescoping
identity between every pair of kinds per sequence (check "kinds": the worst |difference|
in nats per pair, each sequence outside the tolerance named). A run without the student
kind needs no student tokenizer. See `pipeline.audit`.

--verify-live N re-scores N seeded sampled sequences with the live teacher of the run's
config.yaml and reports the largest top-k log-prob difference from the stored rows
(allowed: the storage quantisation LOGPROB_STEP/2 plus 1e-4); with target kinds, the
byte rows likewise and the teacher tokens' log-probs (allowed: one teacher quantisation
step plus 1e-4), re-scored from the stored text.

Exit status: 0 all good; 1 an integrity check failed, shards disagree in provenance,
or --verify-live is outside its bound (the audit still covers every other shard);
2 nothing could be audited as asked (no such run/shard/document, bad arguments).

--executor ray maps shards over Ray tasks (one CPU each) on the cluster of RAY_ADDRESS
(or --ray-address), else a local Ray; per-shard results merge in shard order, so the
summary is the same as with --executor local.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

log = logging.getLogger("audit")
PLOTS = {
    "topk_mass": "topk_mass.png",
    "entropy": "entropy.png",
    "target_logprob": "target_logprob.png",
    "bytes_per_token": "bytes_per_token.png",
}


# ---------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "inspect", "-h", "--help"):
        argv.insert(0, "run")
    p = argparse.ArgumentParser(
        prog="python -m jobs.audit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="audit a run or shards (the default subcommand)",
        description="Audit a run (integrity, contents, quality, consistency); see `python -m jobs.audit --help`.",
    )
    r.add_argument("run", help="run directory, index.json URL, a .parquet shard or a glob of them")
    r.add_argument("--shards", help="only shards whose name or file name matches this glob")
    r.add_argument("--out", help="report directory or URL (default ./audit-<run folder>)")
    r.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="in-process (default) or Ray tasks",
    )
    r.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    r.add_argument(
        "--verify-live",
        type=int,
        default=0,
        metavar="N",
        help="re-score N sampled sequences with the live teacher and compare",
    )
    r.add_argument("--seed", type=int, default=0, help="seed of the --verify-live sample")
    r.add_argument(
        "--config", help="run config for --verify-live (default: config.yaml beside the shards)"
    )
    r.add_argument("--device", help="teacher device for --verify-live (default: the config's)")
    r.add_argument(
        "--storage-options", type=json.loads, default=None, help="fsspec options as JSON"
    )
    r.add_argument("--quiet", action="store_true", help="no per-shard log lines")
    i = sub.add_parser(
        "inspect",
        help="a document's tokens and top targets, decoded",
        description="Print a document's student tokens and, per target row, its top targets "
        "as strings with probabilities (tokenizers from config.yaml beside the shard).",
    )
    i.add_argument("shard", help="a .parquet shard (its manifest and config.yaml beside it)")
    i.add_argument("--doc", required=True, help="document id")
    i.add_argument("--pos", type=int, help="only this target row")
    i.add_argument("--top", type=int, default=5, help="targets per row (default 5)")
    i.add_argument("--config", help="run config (default: config.yaml beside the shard)")
    i.add_argument(
        "--storage-options", type=json.loads, default=None, help="fsspec options as JSON"
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- executors
def audit_local(
    refs: list[Any], so: dict[str, Any] | None, on_result: Callable[[Any], None]
) -> None:
    from pipeline.audit import audit_shard

    for ref in refs:
        on_result(audit_shard(ref, so))


def audit_ray(
    refs: list[Any],
    so: dict[str, Any] | None,
    on_result: Callable[[Any], None],
    address: str | None = None,
) -> None:
    """One Ray task per shard (1 CPU, pyarrow single-threaded) through the project's Ray
    adapter; results are merged in shard order as they become available."""
    from pipeline.audit import audit_shard
    from pipeline.ray_executor import map_in_order

    map_in_order(
        audit_shard,
        [(f"xtok-audit-{ref.name}", (ref, so, False)) for ref in refs],
        on_result,
        address,
    )


# ---------------------------------------------------------------------------- tables
def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _contents_row(name: str, ok: str, s: dict[str, Any] | None, e: dict[str, Any]) -> list[Any]:
    st = s or {}
    return [
        name,
        ok,
        _fmt(st.get("documents")),
        _fmt(st.get("sequences")),
        _fmt(st.get("student_tokens")),
        f"{_fmt(st.get('target_rows'))}/{_fmt(st.get('rows'))}",
        _fmt(e.get("skipped")),
        _fmt(e["bytes"] / 1e6 if e.get("bytes") is not None else None, ".2f"),
        _fmt(e.get("bytes_per_token"), ".1f"),
        _fmt(e.get("compression_ratio"), ".2f"),
    ]


def _quality_row(name: str, s: dict[str, Any] | None) -> list[Any]:
    if not s or "regime_share" not in s:  # no student rows (a run without that kind)
        return [name] + ["-"] * 12
    r = s["regime_share"]
    return [
        name,
        _fmt(s["topk_mass"]["mean"]),
        _fmt(s["topk_mass"]["p5"]),
        _fmt(s["topk_mass"]["p50"]),
        _fmt(s["tail_mass"]["mean"]),
        _fmt(s["entropy_nats"]["mean"], ".3f"),
        "/".join(_fmt(r[k], ".2f") for k in ("exact", "lossless", "approximate")),
        _fmt(s["unaccounted_mass"]["mean"], ".2e"),
        _fmt(s.get("estimated_mass", {}).get("mean"), ".2e"),
        _fmt(s["unmapped_mass"]["mean"], ".2e"),
        _fmt(s["noncanonical_mass"]["mean"], ".2e"),
        _fmt(s["target_logprob"]["mean"], ".3f"),
        _fmt(s["target_logprob"]["perplexity"], ".2f"),
    ]


CONTENT_HEADERS = [
    "shard",
    "ok",
    "docs",
    "seqs",
    "tokens",
    "rows tgt/all",
    "skipped",
    "MB",
    "B/token",
    "compr.",
]
QUALITY_HEADERS = [
    "shard",
    "top-k mass",
    "p5",
    "p50",
    "tail",
    "entropy",
    "exact/lossl/approx",
    "unaccounted",
    "estimated",
    "unmapped",
    "noncanon.",
    "logP/token",
    "ppl",
]


BYTES_HEADERS = [
    "shard",
    "rows tgt/all",
    "kept mass",
    "p5",
    "entropy",
    "logP/row",
    "nats/byte",
    "bits/byte",
    "B/text byte",
    "B/teacher tok",
]
TEACHER_HEADERS = [
    "shard",
    "tokens",
    "rows tgt/all",
    "logP/token",
    "nats/byte",
    "bits/byte",
    "B/teacher tok",
    "B/text byte",
]
CONSISTENCY_HEADERS = ["pair", "sequences", "failed", "max |diff| nats", "worst: shard doc chunk"]
KINDS_NOTE = {
    "bytes": "bytes (target rows: byte_loss_mask; kept mass 1 - tail; entropy: stored top-k "
    "+ tail as one bin, nats; per byte: -log-likelihood of the target rows over their bytes)",
    "teacher": "teacher (target tokens: teacher_loss_mask; per byte: -log-likelihood of the "
    "target tokens, end of text included, over their bytes)",
}


def _kind_row(
    kind: str, name: str, s: dict[str, Any] | None, stored: dict[str, Any] | None
) -> list[Any]:
    k = ((s or {}).get("kinds") or {}).get(kind)
    b = (stored or {}).get(kind) or {}
    if kind == "bytes":
        if not k:
            return [name] + ["-"] * 9
        return [
            name,
            f"{k['target_rows']}/{k['rows']}",
            _fmt(k["kept_mass"]["mean"]),
            _fmt(k["kept_mass"]["p5"]),
            _fmt(k["entropy_nats"]["mean"], ".3f"),
            _fmt(k["target_logprob"]["mean"], ".3f"),
            _fmt(k["nats_per_byte"], ".3f"),
            _fmt(k["bits_per_byte"], ".3f"),
            _fmt(b.get("per_text_byte"), ".2f"),
            _fmt(b.get("per_teacher_token"), ".2f"),
        ]
    if not k:
        return [name] + ["-"] * 7
    return [
        name,
        _fmt(k["tokens"]),
        f"{k['target_rows']}/{k['rows']}",
        _fmt(k["logprob"]["mean"], ".3f"),
        _fmt(k["nats_per_byte"], ".3f"),
        _fmt(k["bits_per_byte"], ".3f"),
        _fmt(b.get("per_teacher_token"), ".2f"),
        _fmt(b.get("per_text_byte"), ".2f"),
    ]


def _consistency_rows(kinds: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for pair, p in ((kinds.get("consistency") or {}).get("pairs") or {}).items():
        w = p.get("worst") or {}
        rows.append(
            [
                pair,
                p["sequences"],
                p["failed"],
                _fmt(p["max_abs_diff_nats"], ".2e"),
                f"{w['shard']} {w['doc_id']!r} {w['chunk']}" if w else "-",
            ]
        )
    return rows


def kind_tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(title, headers, rows) of the target kinds' tables (none for a student-only run)."""
    run = summary["run"]
    kinds = run.get("kinds")
    if not kinds:
        return []
    out = []
    for kind, headers in (("bytes", BYTES_HEADERS), ("teacher", TEACHER_HEADERS)):
        if kind in kinds["targets"]:
            rows = [
                _kind_row(kind, s["name"], s["stats"], s.get("bytes_by_kind"))
                for s in summary["shards"]
            ]
            rows.append(_kind_row(kind, "TOTAL", run, run.get("bytes_by_kind")))
            out.append((KINDS_NOTE[kind], headers, rows))
    cons = kinds.get("consistency")
    if cons:
        title = (
            "kind consistency (telescoping identity per sequence; tolerance "
            f"{cons['tolerance']}): " + ("ok" if cons["ok"] else "FAILED")
        )
        if cons["not_applicable"]:
            title += "; not applicable (rows not exact): " + ", ".join(
                f"{k} {n} sequences" for k, n in cons["not_applicable"].items()
            )
        out.append((title, CONSISTENCY_HEADERS, _consistency_rows(kinds)))
    return out


def _kinds_line(run: dict[str, Any]) -> str:
    k = run["kinds"]
    text = (run.get("bytes_by_kind") or {}).get("text") or {}
    return (
        f"target kinds: {', '.join(k['targets'])} ({k['text_bytes']} text bytes, "
        f"{k['teacher_tokens']} teacher tokens; text stored at "
        f"{_fmt(text.get('per_text_byte'), '.2f')} B/text byte)"
    )


def render_text(summary: dict[str, Any]) -> str:
    run = summary["run"]
    student = "kinds" not in run or "student" in run["kinds"]["targets"]
    out = [
        f"audit of {summary['source']} ({summary['shards_audited']} shards"
        + (f", index {summary['index']}" if summary["index"] else ", no index")
        + ")",
        "",
        "contents",
        table(
            CONTENT_HEADERS,
            [
                _contents_row(s["name"], "ok" if s["ok"] else "FAIL", s["stats"], s)
                for s in summary["shards"]
            ]
            + [
                _contents_row(
                    f"TOTAL ({run['shards']} read)", "ok" if summary["ok"] else "FAIL", run, run
                )
            ],
        ),
    ]
    if student:
        out += [
            "",
            "target quality (target rows; entropy: stored top-k + tail as one bin, nats)",
            table(
                QUALITY_HEADERS,
                [_quality_row(s["name"], s["stats"]) for s in summary["shards"]]
                + [_quality_row("TOTAL", run)],
            ),
        ]
    if "kinds" in run:
        out += ["", _kinds_line(run)]
    for title, headers, rows in kind_tables(summary):
        out += ["", title, table(headers, rows)]
    if run["skipped_by_reason"]:
        out += [
            "",
            "skipped records by reason: "
            + ", ".join(f"{k}: {v}" for k, v in run["skipped_by_reason"].items()),
        ]
    out += [
        "",
        "integrity: " + ("ok" if not any(s["failures"] for s in summary["shards"]) else "FAILED"),
    ]
    for s in summary["shards"]:
        for f in s["failures"]:
            out.append(f"  {s['name']}: {f}")
    for p in summary["problems"]:
        out.append(f"  run: {p}")
    cons = summary["consistency"]
    out.append(f"consistency ({cons['reference']}): " + ("ok" if cons["ok"] else "DIFFERENCES"))
    for name, diff in cons["differences"].items():
        out.append(
            f"  {name}: "
            + "; ".join(f"{k} {v['found']!r} (expected {v['expected']!r})" for k, v in diff.items())
        )
    v = summary.get("verify_live")
    if v is not None:
        out.append(f"verify-live: {'ok' if v['ok'] else 'FAILED'}: {v['verdict']}")
        for n in v["not_reencoded"]:
            out.append(f"  {n['shard']} doc {n['doc_id']} chunk {n['chunk']}: {n['reason']}")
    out.append("")
    out.append(
        "RESULT: " + ("OK" if summary["ok"] else f"FAILED ({len(summary['failures'])} problems)")
    )
    return "\n".join(out)


# ---------------------------------------------------------------------------- report
def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _marks(run: dict[str, Any], key: str) -> list[tuple[str, float, str]]:
    stat = {
        "topk_mass": "topk_mass",
        "entropy": "entropy_nats",
        "target_logprob": "target_logprob",
    }[key]
    out = []
    for label, style in (("mean", "-"), ("p50", "--"), ("p5", ":")):
        x = run.get(stat, {}).get(label)
        if isinstance(x, float):
            out.append((label, x, style))
    return out


def make_plots(summary: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes per plot file name (matplotlib's Agg canvas; no display, no pyplot)."""
    from matplotlib.figure import Figure

    out: dict[str, bytes] = {}
    titles = {
        "topk_mass": ("top-k mass per target row", "1 - tail_mass"),
        "entropy": ("entropy per target row (top-k + tail bin)", "nats"),
        "target_logprob": (
            "teacher log-prob of the actual next token",
            "natural log (clipped at -30)",
        ),
    }
    for key, (title, xlabel) in titles.items():
        h = summary["histograms"][key]
        counts = h["counts"]
        n = len(counts)
        width = (h["high"] - h["low"]) / n
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        ax.bar(
            [h["low"] + (i + 0.5) * width for i in range(n)], counts, width=width, color="#4477aa"
        )
        marks = _marks(summary["run"], key)
        for label, x, style in marks:
            ax.axvline(x, color="#cc3311", linestyle=style, linewidth=1, label=f"{label} {x:.3f}")
        if marks:
            ax.legend(fontsize=8)
        if not any(counts):
            ax.text(0.5, 0.5, "no target rows", ha="center", va="center", transform=ax.transAxes)
        elif key != "entropy":
            ax.set_yscale("log")  # most rows sit at one end; the rare others matter
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("target rows")
        out[PLOTS[key]] = _png(fig)
    fig = Figure(figsize=(max(4, 0.6 * len(summary["shards"]) + 2), 3.5))
    ax = fig.add_subplot()
    names = [s["name"] for s in summary["shards"]]
    vals = [s["bytes_per_token"] or 0.0 for s in summary["shards"]]
    colors = ["#4477aa" if s["ok"] else "#cc3311" for s in summary["shards"]]
    ax.bar(range(len(names)), vals, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("bytes / student token")
    ax.set_title("bytes per student token by shard (red: integrity failed)")
    out[PLOTS["bytes_per_token"]] = _png(fig)
    return out


def render_html(summary: dict[str, Any], plots: dict[str, bytes]) -> str:
    e = html.escape

    def tab(headers: list[str], rows: list[list[Any]]) -> str:
        head = "".join(f"<th>{e(str(h))}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    run = summary["run"]
    status = "OK" if summary["ok"] else "FAILED"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>audit: {e(summary['source'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
        ".ok{color:#228833}.fail{color:#cc3311}img{max-width:48%;margin:4px}</style></head><body>",
        f"<h1>Audit of {e(summary['source'])}</h1>",
        f"<p class='{'ok' if summary['ok'] else 'fail'}'><b>{status}</b>: "
        f"{summary['shards_audited']} shards audited, {len(summary['shards_failed'])} failed"
        + (f"; index {e(summary['index'])}" if summary["index"] else "; no index")
        + "</p>",
    ]
    if summary["failures"]:
        parts.append(
            "<h2>Problems</h2><ul>"
            + "".join(f"<li>{e(f)}</li>" for f in summary["failures"])
            + "</ul>"
        )
    parts.append("<h2>Contents</h2>")
    parts.append(
        tab(
            CONTENT_HEADERS,
            [
                _contents_row(s["name"], "ok" if s["ok"] else "FAIL", s["stats"], s)
                for s in summary["shards"]
            ]
            + [_contents_row("TOTAL", status, run, run)],
        )
    )
    if "kinds" not in run or "student" in run["kinds"]["targets"]:
        parts.append(
            "<h2>Target quality</h2><p>Target rows only (loss_mask). Entropy over the stored "
            "top-k probabilities plus the tail as one bin, in nats.</p>"
        )
        parts.append(
            tab(
                QUALITY_HEADERS,
                [_quality_row(s["name"], s["stats"]) for s in summary["shards"]]
                + [_quality_row("TOTAL", run)],
            )
        )
    if "kinds" in run:
        parts.append(f"<h2>Target kinds</h2><p>{e(_kinds_line(run))}</p>")
        for title, headers, rows in kind_tables(summary):
            parts.append(f"<p>{e(title)}</p>")
            parts.append(tab(headers, rows))
    if "bytes_by_kind" in run:
        parts.append("<h2>Bytes by kind</h2>")
        parts.append(
            tab(
                ["kind", "compressed bytes", "uncompressed bytes", "per unit"],
                [
                    [
                        kind,
                        v["compressed"],
                        v["uncompressed"],
                        ", ".join(
                            f"{_fmt(x, '.2f')} B {key.removeprefix('per_').replace('_', ' ')}"
                            for key, x in v.items()
                            if key.startswith("per_")
                        ),
                    ]
                    for kind, v in run["bytes_by_kind"].items()
                ],
            )
        )
    parts.append("<h2>Bytes by column</h2>")
    parts.append(
        tab(
            ["column", "compressed bytes", "uncompressed bytes", "bytes / student token"],
            [
                [c, v["compressed"], v["uncompressed"], _fmt(v["bytes_per_token"], ".2f")]
                for c, v in run["columns"].items()
            ],
        )
    )
    parts.append("<h2>Plots</h2><div>")
    for name, data in plots.items():
        b64 = base64.b64encode(data).decode()
        parts.append(
            f"<figure style='display:inline-block'><img src='data:image/png;base64,{b64}' alt='{e(name)}'>"
            f"<figcaption>{e(name)}</figcaption></figure>"
        )
    parts.append("</div>")
    parts.append("<h2>Integrity</h2>")
    parts.append(
        tab(
            ["shard", "check", "result", "detail"],
            [
                [s["name"], c["name"], "ok" if c["ok"] else "FAIL", c["detail"]]
                for s in summary["shards"]
                for c in s["checks"]
            ],
        )
    )
    cons = summary["consistency"]
    parts.append(
        f"<h2>Consistency</h2><p>Reference: {e(cons['reference'])}: "
        + ("all shards agree" if cons["ok"] else "<b class='fail'>differences</b>")
        + "</p>"
    )
    parts.append(
        tab(["key", "value"], [[k, json.dumps(v)] for k, v in sorted(cons["provenance"].items())])
    )
    if cons["differences"]:
        parts.append(
            tab(
                ["shard", "key", "found", "expected"],
                [
                    [n, k, json.dumps(v["found"]), json.dumps(v["expected"])]
                    for n, d in cons["differences"].items()
                    for k, v in d.items()
                ],
            )
        )
    v = summary.get("verify_live")
    if v is not None:
        parts.append(
            f"<h2>Live re-score</h2><p class='{'ok' if v['ok'] else 'fail'}'>{e(v['verdict'])}</p>"
        )
        kinds = bool(v.get("kinds"))
        headers = [
            "shard",
            "doc",
            "chunk",
            "tokens",
            "max |dlogP| top-k",
            "id agreement",
            "max |d tail|",
            "max |d logP target|",
        ]
        if kinds:
            headers += [
                "bytes: max |dlogP| top-k",
                "bytes: max |d logP target|",
                "teacher: max |d logP|",
            ]

        def live_row(s: dict[str, Any]) -> list[Any]:
            row = [
                s["shard"],
                s["doc_id"],
                s["chunk"],
                _fmt(s.get("tokens")),
                _fmt(s.get("max_abs_logprob_diff"), ".6f"),
                _fmt(s.get("topk_id_agreement"), ".3f"),
                _fmt(s.get("max_tail_mass_diff"), ".2e"),
                _fmt(s.get("max_target_logprob_diff"), ".2e"),
            ]
            if kinds:
                b, t = s.get("bytes") or {}, s.get("teacher") or {}
                row += [
                    _fmt(b.get("max_abs_logprob_diff"), ".6f"),
                    _fmt(b.get("max_target_logprob_diff"), ".2e"),
                    _fmt(t.get("max_abs_logprob_diff"), ".2e"),
                ]
            return row

        parts.append(tab(headers, [live_row(s) for s in v["sequences"]]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    summary: dict[str, Any], out: str, so: dict[str, Any] | None = None
) -> dict[str, str]:
    """Write the plots (PNG), ``report.html`` (plots embedded as data URIs) and
    ``summary.json`` into ``out``; returns their URLs."""
    from pipeline import io as xio

    plots = make_plots(summary)
    written = {}
    for name, data in plots.items():
        url = xio.join(out, name)
        xio.write_bytes_atomic(url, data, so)
        written[name] = url
    summary["plots"] = sorted(plots)
    page = xio.join(out, "report.html")
    xio.write_bytes_atomic(page, render_html(summary, plots).encode("utf-8"), so)
    written["report.html"] = page
    js = xio.join(out, "summary.json")
    xio.write_json_atomic(js, summary, so)
    written["summary.json"] = js
    return written


# ---------------------------------------------------------------------------- main
def run_audit(args: argparse.Namespace) -> int:
    from pipeline.audit import AuditError, RunAudit, default_report_dir, locate
    from pipeline.audit_live import verify_live

    so = args.storage_options
    try:
        source = locate(args.run, so, args.shards)
    except AuditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    audit = RunAudit(source)
    t0 = time.perf_counter()
    n = len(source.shards)

    def on_result(a: Any) -> None:
        e = audit.add(a)
        if not args.quiet:
            rows = e["stats"].get("rows", 0) if e["stats"] else 0
            log.info(
                "[%d/%d] %s: %s (%d rows, %.2fs)%s",
                len(audit.shards),
                n,
                a.name,
                "ok" if a.ok else "FAILED",
                rows,
                a.seconds,
                "" if a.ok else ": " + "; ".join(a.failures),
            )

    if args.executor == "ray":
        audit_ray(source.shards, so, on_result, args.ray_address)
    else:
        audit_local(source.shards, so, on_result)
    seconds = time.perf_counter() - t0
    if args.verify_live > 0:
        good = [r for r, s in zip(source.shards, audit.shards, strict=True) if s["ok"]]
        try:
            audit.verify_live = verify_live(
                source, good, args.verify_live, args.seed, so, args.config, args.device
            )
        except AuditError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    summary = audit.summary()
    summary["seconds"] = round(seconds, 3)
    run_ = summary["run"]
    kinds = run_.get("kinds") or {}
    rows = run_.get("rows", 0) + sum(
        (kinds.get(k) or {}).get("rows", 0) for k in ("bytes", "teacher")
    )  # every stored row, of every kind
    summary["rows_per_second"] = round(rows / seconds, 1) if seconds > 0 else None
    print(render_text(summary))
    out = args.out or default_report_dir(source)
    written = write_report(summary, out, None if "://" not in out else so)
    print(f"report: {written['report.html']}  summary: {written['summary.json']}")
    return 0 if summary["ok"] else 1


def run_inspect(args: argparse.Namespace) -> int:
    from pipeline.audit import AuditError
    from pipeline.audit_live import inspect_document

    try:
        print(
            inspect_document(
                args.shard, args.doc, args.pos, args.storage_options, args.config, args.top
            )
        )
    except AuditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "inspect":
        return run_inspect(args)
    return run_audit(args)


if __name__ == "__main__":
    sys.exit(main())
