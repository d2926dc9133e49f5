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

--verify-live N re-scores N seeded sampled sequences with the live teacher of the run's
config.yaml and reports the largest top-k log-prob difference from the stored rows
(allowed: the storage quantisation LOGPROB_STEP/2 plus 1e-4).

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
    if not s:
        return [name] + ["-"] * 11
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
    "unmapped",
    "noncanon.",
    "logP/token",
    "ppl",
]


def render_text(summary: dict[str, Any]) -> str:
    run = summary["run"]
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
        "",
        "target quality (target rows; entropy: stored top-k + tail as one bin, nats)",
        table(
            QUALITY_HEADERS,
            [_quality_row(s["name"], s["stats"]) for s in summary["shards"]]
            + [_quality_row("TOTAL", run)],
        ),
    ]
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
    parts.append(
        "<h2>Target quality</h2><p>Target rows only (loss_mask). Entropy over the stored top-k "
        "probabilities plus the tail as one bin, in nats.</p>"
    )
    parts.append(
        tab(
            QUALITY_HEADERS,
            [_quality_row(s["name"], s["stats"]) for s in summary["shards"]]
            + [_quality_row("TOTAL", run)],
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
        parts.append(
            tab(
                [
                    "shard",
                    "doc",
                    "chunk",
                    "tokens",
                    "max |dlogP| top-k",
                    "id agreement",
                    "max |d tail|",
                    "max |d logP target|",
                ],
                [
                    [
                        s["shard"],
                        s["doc_id"],
                        s["chunk"],
                        s["tokens"],
                        _fmt(s["max_abs_logprob_diff"], ".6f"),
                        _fmt(s["topk_id_agreement"], ".3f"),
                        _fmt(s["max_tail_mass_diff"], ".2e"),
                        _fmt(s["max_target_logprob_diff"], ".2e"),
                    ]
                    for s in v["sequences"]
                ],
            )
        )
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
            rows = e["stats"]["rows"] if e["stats"] else 0
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
    summary["rows_per_second"] = round(summary["run"]["rows"] / seconds, 1) if seconds > 0 else None
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
