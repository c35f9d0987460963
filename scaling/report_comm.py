"""The dashboard's collectives section: ``kind: comm`` records (``scaling comm``) as latency and
bus-bandwidth curves against message size, one line per backend path and N, and a table at each
workload's gradient size (the all-reduce a training step of that workload makes)."""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from scaling import comm, records

COLUMNS = ["sweep", "run_id", "status", "error", "backend", "library", "N", "variant", "placement", *comm.SIZE_COLUMNS]


@dataclass
class CommSection:
    rows: pd.DataFrame
    figures: list = field(default_factory=list)  # report_figures.Figure
    html: str = ""


def load(results_dir: str | Path) -> pd.DataFrame:
    """One row per (comm record, message size); a failed record is one row without sizes."""
    rows = []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        if path.name.startswith("."):
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # the training section names unreadable files
        if not isinstance(rec, dict) or records.kind(rec) != "comm":
            continue
        cfg, m = rec.get("config") or {}, rec.get("metrics") or {}
        base = {"sweep": rec.get("group"), "run_id": rec.get("run_id"), "status": rec.get("status"),
                "error": (rec.get("error") or "").strip().splitlines()[0] if rec.get("error") else None,
                "backend": (cfg.get("backend") or {}).get("name"), "library": m.get("library"),
                "N": int(cfg.get("devices", 1)) * int((cfg.get("cluster") or {}).get("nodes", 1)),
                "variant": cfg.get("variant") or "defaults", "placement": cfg.get("placement") or "core"}
        sizes = m.get("sizes") or [None]
        for s in sizes:
            rows.append(base | comm.size_row(s) if s else dict(base))
    return pd.DataFrame(rows, columns=COLUMNS)


def series_name(r: Any) -> str:
    extra = "".join(f", {v}" for v, default in ((r.variant, "defaults"), (r.placement, "core")) if v != default)
    return f"{r.backend} N={r.N}{extra}"


def figures(rows: pd.DataFrame, figure_class: type) -> list:
    """Per sweep: p50 latency and bus bandwidth against message size (log-log), median over repeats."""
    import plotly.graph_objects as go

    out = []
    ok = rows[(rows["status"] == "ok") & rows["bytes"].notna()]
    for sweep, g in ok.groupby("sweep", sort=True):
        lat, bw = go.Figure(), go.Figure()
        keyed = g.assign(series=[series_name(r) for r in g.itertuples()])
        for name, s in keyed.groupby("series", sort=True):
            med = s.groupby("bytes", sort=True)[["latency_p50_s", "latency_p95_s", "busbw_bytes_per_s"]].median()
            lat.add_trace(go.Scatter(x=med.index, y=med["latency_p50_s"] * 1e6, mode="lines+markers", name=name,
                                     error_y={"type": "data", "symmetric": False,
                                              "array": (med["latency_p95_s"] - med["latency_p50_s"]) * 1e6,
                                              "arrayminus": [0] * len(med)}))
            bw.add_trace(go.Scatter(x=med.index, y=med["busbw_bytes_per_s"] / 1e9, mode="lines+markers", name=name))
        for label, nbytes in g.dropna(subset=["label"]).groupby("label")["bytes"].first().items():
            for fig in (lat, bw):
                fig.add_vline(x=nbytes, line_dash="dot", line_color="#888", annotation_text=f"{label} gradient")
        lat.update_layout(title=f"{sweep}: all-reduce latency (p50, bar to p95)", xaxis_title="message bytes",
                          yaxis_title="latency (us)", xaxis_type="log", yaxis_type="log", height=480)
        bw.update_layout(title=f"{sweep}: all-reduce bus bandwidth, busbw = algbw x 2(N-1)/N", xaxis_title="message bytes",
                         yaxis_title="busbw (GB/s)", xaxis_type="log", height=480)
        out += [figure_class(f"{sweep}-comm-latency", lat.layout.title.text, lat),
                figure_class(f"{sweep}-comm-busbw", bw.layout.title.text, bw)]
    return out


def _fmt(value: Any, scale: float, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value * scale, spec)


def gradient_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per sweep, gradient label, backend path and N: the median over repeats at that size."""
    ok = rows[(rows["status"] == "ok") & rows["label"].notna()]
    if ok.empty:
        return ok
    ok = ok.assign(label=ok["label"].str.split(", ")).explode("label")
    keys = ["sweep", "label", "bytes", "backend", "library", "N", "variant", "placement"]
    return ok.groupby(keys, sort=True)[["latency_p50_s", "latency_mean_s", "latency_p95_s", "algbw_bytes_per_s",
                                        "busbw_bytes_per_s"]] \
        .median().reset_index()


def render(rows: pd.DataFrame, figs: list, fig_html) -> str:
    esc = html.escape
    parts = ["<h2 id='collectives'>Collectives (scaling comm)</h2>",
             "<p>The all-reduce (sum, float32) through each backend's own collective path, launched and placed as "
             "its training cells are. Latency: the slowest rank's time per call, p50, mean and p95 over the timed "
             "calls (the mean is what a loop of calls pays, slow calls included: the step decomposition and the "
             "first-principles model take it). algbw = bytes / p50; busbw = algbw &times; 2(N&minus;1)/N "
             "(nccl-tests' definition), comparable across N.</p>"]
    failed = rows[rows["status"] != "ok"].drop_duplicates("run_id")
    if not failed.empty:
        items = "".join(f"<li>{esc(str(r.sweep))}/{esc(str(r.run_id))}: {esc(str(r.error))[:300]}</li>"
                        for r in failed.itertuples())
        parts.append(f"<div class='banner missing'><b>Failed comm cells</b><ul>{items}</ul></div>")
    parts.append("<div class='grid'>" + "".join(fig_html(f) for f in figs) + "</div>")
    table = gradient_table(rows)
    if not table.empty:
        head = ("<tr><th class='l'>sweep</th><th class='l'>gradient of</th><th>bytes</th><th class='l'>backend</th>"
                "<th class='l'>library</th><th>N</th><th class='l'>variant</th><th class='l'>placement</th>"
                "<th>p50 ms</th><th>mean ms</th><th>p95 ms</th><th>algbw GB/s</th><th>busbw GB/s</th></tr>")
        body = "".join(
            f"<tr><td class='l'>{esc(str(r.sweep))}</td><td class='l'>{esc(str(r.label))}</td><td>{int(r.bytes):,}</td>"
            f"<td class='l'>{esc(str(r.backend))}</td><td class='l'>{esc(str(r.library))}</td><td>{int(r.N)}</td>"
            f"<td class='l'>{esc(str(r.variant))}</td><td class='l'>{esc(str(r.placement))}</td>"
            f"<td>{_fmt(r.latency_p50_s, 1e3, '.3f')}</td><td>{_fmt(r.latency_mean_s, 1e3, '.3f')}</td>"
            f"<td>{_fmt(r.latency_p95_s, 1e3, '.3f')}</td>"
            f"<td>{_fmt(r.algbw_bytes_per_s, 1e-9, '.3f')}</td><td>{_fmt(r.busbw_bytes_per_s, 1e-9, '.3f')}</td></tr>"
            for r in table.itertuples())
        parts.append(f"<h3>At each workload's gradient size</h3><table>{head}{body}</table>")
    return "".join(parts)


def section(results_dir: str | Path, figure_class: type, fig_html) -> CommSection:
    """The collectives section of the dashboard (empty when there are no comm records)."""
    rows = load(results_dir)
    if rows.empty:
        return CommSection(rows)
    figs = figures(rows, figure_class)
    return CommSection(rows, figs, render(rows, figs, fig_html))
