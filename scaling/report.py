"""`scaling report RESULTS_DIR`: one self-contained HTML dashboard (plotly.js embedded, opens
offline) and the main figures as PNG files, from the records alone.

Per study (sweep x workload x data x scaling mode): throughput vs devices with the ideal line,
efficiency, step time p50/p95, accuracy and time-to-accuracy, the two seed-claim verdicts per device
count (faster at N, scales better to N; ``scaling.report_cells``) and the scaling model (measured
points and predictions to 1024 devices). A folder that is empty, partial or holds other schema
versions gives a report that says what is missing.
"""
from __future__ import annotations

import argparse
import html
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from scaling import analysis, report_cells, report_comm, report_decomposition, scaling_model, verdicts
from scaling.predict import fmt_param

# TF backends in warm colours, PyTorch backends in cool ones: the seed claim reads off the hue.
_TF_COLOURS = ["#d95f02", "#e6ab02", "#a6761d", "#e7298a", "#b2182b"]
_TORCH_COLOURS = ["#1f78b4", "#1b9e77", "#7570b3", "#66a61e", "#17becf"]
FIG_WIDTH, FIG_HEIGHT = 900, 480


@dataclass
class Figure:
    name: str  # file stem, e.g. local_cpu-mlp-mnist-weak-throughput
    title: str
    fig: Any  # plotly Figure


@dataclass
class Study:
    key: dict
    cells: pd.DataFrame
    agg: pd.DataFrame
    claim: pd.DataFrame
    fits: list
    validations: list
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        k = self.key
        params = ", ".join(p for p in str(k["workload_params"]).split(", ") if not p.startswith("parameters="))
        parts = [k["sweep"], k["workload"], params, k["data"], k["scaling"],
                 "" if k["variant"] == "defaults" else k["variant"], k["overrides"]]
        return re.sub(r"[^A-Za-z0-9_.=-]", "_", "-".join(str(p) for p in parts if p))

    @property
    def title(self) -> str:
        k = self.key
        extra = ", ".join(x for x in (f"variant {k['variant']}", k["workload_params"],
                                      k["overrides"] and f"overrides {k['overrides']}") if x)
        return f"sweep {k['sweep']}: {k['workload']} on {k['data']}, {k['scaling']} scaling ({extra})"


@dataclass
class Report:
    out_dir: Path
    html_path: Path
    pngs: list[Path]
    problems: list[str]


def colours(agg_or_cells: pd.DataFrame) -> dict[str, str]:
    """A stable colour per backend: TF warm, PyTorch cool."""
    out: dict[str, str] = {}
    pairs = sorted(set(zip(agg_or_cells["framework"], agg_or_cells["backend"]))) if not agg_or_cells.empty else []
    tf = [b for f, b in pairs if f == "tf"]
    other = [b for f, b in pairs if f != "tf"]
    for i, b in enumerate(tf):
        out[b] = _TF_COLOURS[i % len(_TF_COLOURS)]
    for i, b in enumerate(other):
        out[b] = _TORCH_COLOURS[i % len(_TORCH_COLOURS)]
    return out


def _layout(fig: Any, title: str, x_title: str, y_title: str, n_values: Sequence[int], log_x: bool = False) -> None:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 16}},
        template="plotly_white", width=None, height=FIG_HEIGHT, margin={"l": 70, "r": 20, "t": 60, "b": 60},
        legend={"orientation": "v", "x": 1.01, "y": 1, "font": {"size": 11}},
        font={"family": "Helvetica, Arial, sans-serif", "size": 13},
    )
    ticks = sorted(set(int(n) for n in n_values))
    fig.update_xaxes(title=x_title, tickvals=ticks if len(ticks) <= 12 else None, type="log" if log_x else "linear",
                     showline=True, linecolor="#888", mirror=True, gridcolor="#eee")
    fig.update_yaxes(title=y_title, showline=True, linecolor="#888", mirror=True, gridcolor="#eee", rangemode="tozero")


def _figures(study: Study, colour: dict[str, str]) -> list[Figure]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    agg, slug = study.agg, study.slug
    ns = sorted(agg["N"].unique())
    log_x = max(ns) >= 8
    figs = []
    mode = study.key["scaling"]

    # throughput with the ideal line N x throughput(1)
    fig = go.Figure()
    for backend, name, g in report_cells.series(agg):
        c = colour[backend]
        fig.add_trace(go.Scatter(
            x=g["N"], y=g["throughput"], name=name, mode="lines+markers", legendgroup=name,
            line={"color": c, "width": 2}, marker={"size": 8}, customdata=g[["layout"]],
            error_y={"type": "data", "symmetric": False, "array": g["throughput_max"] - g["throughput"],
                     "arrayminus": g["throughput"] - g["throughput_min"], "thickness": 1.2, "width": 4},
            hovertemplate=report_cells.hover(name, "%{y:,.0f} samples/s")))
        base = g["base_throughput"].iloc[0]
        if base == base and len(g) > 1:
            fig.add_trace(go.Scatter(
                x=g["N"], y=base * g["N"], name=f"{name} ideal", mode="lines", legendgroup=name,
                line={"color": c, "dash": "dot", "width": 1}, showlegend=False, hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line={"color": "#777", "dash": "dot", "width": 1},
                             name="ideal (N x one-device)"))
    _layout(fig, f"Throughput vs devices ({mode} scaling; median, bars = min..max of repeats)",
            "devices N", "samples / s (global)", ns, log_x)
    figs.append(Figure(f"{slug}-throughput", "Throughput", fig))

    # efficiency
    fig = go.Figure()
    for backend, name, g in report_cells.series(agg[agg["speedup"].notna()]):
        fig.add_trace(go.Scatter(
            x=g["N"], y=g["efficiency"], name=name, mode="lines+markers", line={"color": colour[backend], "width": 2},
            marker={"size": 8},
            error_y={"type": "data", "symmetric": False,  # none at N = 1: efficiency 1 by definition
                     "array": (g["speedup_max"] / g["N"] - g["efficiency"]).where(g["N"] > 1, 0),
                     "arrayminus": (g["efficiency"] - g["speedup_min"] / g["N"]).where(g["N"] > 1, 0),
                     "thickness": 1.2, "width": 4},
            customdata=np.stack([g["layout"], g["speedup"], g["serial_fraction"]], axis=1),
            hovertemplate=report_cells.hover(name, "efficiency %{y:.1%}<br>speedup %{customdata[1]:.2f}<br>"
                                             f"{g['serial_law'].iloc[0]} serial fraction %{{customdata[2]:.2f}}")))
    fig.add_hline(y=1.0, line={"color": "#777", "dash": "dot", "width": 1}, annotation_text="ideal",
                  annotation_position="top left")
    _layout(fig, "Scaling efficiency S(N)/N (bars = repeat range)", "devices N", "efficiency", ns, log_x)
    fig.update_yaxes(tickformat=".0%")
    figs.append(Figure(f"{slug}-efficiency", "Efficiency", fig))

    # step time p50 / p95
    fig = go.Figure()
    for backend, name, g in report_cells.series(agg):
        c = colour[backend]
        fig.add_trace(go.Scatter(x=g["N"], y=g["step_time_p50_s"] * 1e3, name=name, legendgroup=name,
                                 mode="lines+markers", line={"color": c, "width": 2}, marker={"size": 8},
                                 customdata=g[["layout"]], hovertemplate=report_cells.hover(name, "p50 %{y:.3f} ms")))
        fig.add_trace(go.Scatter(x=g["N"], y=g["step_time_p95_s"] * 1e3, name=f"{name} p95", legendgroup=name,
                                 mode="lines+markers", line={"color": c, "width": 1, "dash": "dash"}, showlegend=False,
                                 marker={"size": 6, "symbol": "triangle-up"}, customdata=g[["layout"]],
                                 hovertemplate=report_cells.hover(name, "p95 %{y:.3f} ms")))
    _layout(fig, "Step time per device, p50 (solid) and p95 (dashed)", "devices N", "ms per step", ns, log_x)
    figs.append(Figure(f"{slug}-step-time", "Step time", fig))

    # final accuracy and time-to-accuracy per cell
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        "final test accuracy (whiskers = repeat range)", f"time to {agg['target_accuracy'].max():.0%} test accuracy"))
    labels = [f"{b} N={n} ({lay})" for b, n, lay in zip(agg["backend"], agg["N"], agg["layout"])]
    bar_colours = [colour[b] for b in agg["backend"]]
    # points, not bars: the axis is zoomed to the accuracies, and a bar's length would then mislead
    fig.add_trace(go.Scatter(
        x=labels, y=agg["final_test_accuracy"], mode="markers", marker={"color": bar_colours, "size": 11},
        showlegend=False,
        error_y={"type": "data", "symmetric": False,
                 "array": agg["final_test_accuracy_max"] - agg["final_test_accuracy"],
                 "arrayminus": agg["final_test_accuracy"] - agg["final_test_accuracy_min"]},
        hovertemplate="%{x}<br>%{y:.4f}<extra></extra>"), row=1, col=1)
    tta = agg["time_to_accuracy_s"]
    fig.add_trace(go.Bar(x=labels, y=tta.fillna(0), marker_color=bar_colours, showlegend=False,
                         text=["not reached" if math.isnan(v) else f"{v:.1f} s" for v in tta], textposition="outside",
                         hovertemplate="%{x}<br>%{text}<extra></extra>"), row=1, col=2)
    acc = agg["final_test_accuracy_min"].dropna()
    lo = max(0.0, float(acc.min()) - 0.02) if not acc.empty else 0.0
    fig.update_yaxes(range=[lo, 1.0], tickformat=".1%", row=1, col=1, gridcolor="#eee")
    fig.update_yaxes(title="seconds", row=1, col=2, gridcolor="#eee", rangemode="tozero")
    if tta.isna().all():
        fig.update_traces(text=None, selector={"type": "bar"}, row=1, col=2)
        fig.update_yaxes(range=[0, 1], showticklabels=False, title=None, row=1, col=2)
        fig.add_annotation(text=f"no cell reached {agg['target_accuracy'].max():.0%}<br>test accuracy in its epochs",
                           xref="x2 domain", yref="y2 domain", x=0.5, y=0.55, showarrow=False,
                           font={"size": 15, "color": "#555"})
    fig.update_xaxes(tickangle=-40, tickfont={"size": 10})
    fig.update_layout(template="plotly_white", height=FIG_HEIGHT + 40, margin={"l": 70, "r": 20, "t": 60, "b": 120},
                      title={"text": "Accuracy per cell (median of repeats)", "x": 0.01, "font": {"size": 16}},
                      font={"family": "Helvetica, Arial, sans-serif", "size": 13})
    figs.append(Figure(f"{slug}-accuracy", "Accuracy", fig))

    # the scaling model, one panel per backend: measured medians and predictions to 1024 devices
    if study.fits:
        k = len(study.fits)
        cols = min(3, k)
        rows = math.ceil(k / cols)
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f.key["backend"] for f in study.fits],
                            horizontal_spacing=0.07, vertical_spacing=0.16 if rows > 1 else 0.1,
                            shared_yaxes="all")
        grid = sorted({int(round(v)) for v in np.geomspace(1, 1024, 41)} | set(scaling_model.DEFAULT_TARGETS))
        shown: set[str] = set()
        for i, fit in enumerate(study.fits):
            r, c_ = divmod(i, cols)
            at = {"row": r + 1, "col": c_ + 1}
            backend = fit.key["backend"]
            c = colour[backend]
            pred = fit.predict(grid).drop_duplicates("N").sort_values("N")

            def line(y, name, style, legend_name):
                fig.add_trace(go.Scatter(
                    x=pred["N"], y=y, mode="lines", name=legend_name, legendgroup=legend_name, showlegend=False,
                    line=style,
                    hovertemplate=f"{backend} {name}<br>N=%{{x}}<br>%{{y:,.0f}} samples/s<extra></extra>"), **at)
                shown.add(legend_name)

            fig.add_trace(go.Scatter(x=pred["N"], y=pred["throughput_high"], mode="lines", line={"width": 0},
                                     showlegend=False, hoverinfo="skip"), **at)
            band = "α-β 95% band" if fit.identifiable else "α-β bracket (α, β not identifiable)"
            fig.add_trace(go.Scatter(x=pred["N"], y=pred["throughput_low"], mode="lines", line={"width": 0},
                                     fill="tonexty", fillcolor=_rgba(c, 0.18), name=band, legendgroup=band,
                                     showlegend=False, hoverinfo="skip"), **at)
            shown.add(band)
            if fit.identifiable:
                line(pred["throughput"], "α-β model", {"color": c, "width": 2}, "α-β model")
            else:
                line(pred["throughput_latency_only"], "all-latency", {"color": c, "width": 1.2, "dash": "dash"},
                     "all-latency reading (α only)")
                line(pred["throughput_bandwidth_only"], "all-bandwidth", {"color": c, "width": 1.2, "dash": "longdash"},
                     "all-bandwidth reading (β only)")
            if "law_throughput" in pred:
                line(pred["law_throughput"], fit.law_name, {"color": "#444", "width": 1.2, "dash": "dot"}, fit.law_name)
            meas = study.cells[(study.cells["backend"] == backend) & (study.cells["status"] == "ok")]
            fig.add_trace(go.Scatter(x=meas["N"], y=meas["samples_per_s"], mode="markers", name="measured (each repeat)",
                                     legendgroup="measured", showlegend=False,
                                     marker={"color": c, "size": 8, "line": {"color": "#222", "width": 1}},
                                     hovertemplate=f"{backend} measured<br>N=%{{x}}<br>%{{y:,.0f}} samples/s<extra></extra>"),
                          **at)
            shown.add("measured")
        # the legend in neutral grey: the panel titles say which backend a colour is
        legend_styles = {
            "measured (each repeat)": {"mode": "markers", "marker": {"color": "#888", "size": 8, "line": {"color": "#222", "width": 1}}},
            "α-β model": {"mode": "lines", "line": {"color": "#555", "width": 2}},
            "α-β 95% band": {"mode": "lines", "line": {"color": "rgba(120,120,120,0.3)", "width": 8}},
            "α-β bracket (α, β not identifiable)": {"mode": "lines", "line": {"color": "rgba(120,120,120,0.3)", "width": 8}},
            "all-latency reading (α only)": {"mode": "lines", "line": {"color": "#555", "width": 1.2, "dash": "dash"}},
            "all-bandwidth reading (β only)": {"mode": "lines", "line": {"color": "#555", "width": 1.2, "dash": "longdash"}},
            "Amdahl": {"mode": "lines", "line": {"color": "#444", "width": 1.2, "dash": "dot"}},
            "Gustafson": {"mode": "lines", "line": {"color": "#444", "width": 1.2, "dash": "dot"}},
        }
        for name, style in legend_styles.items():
            if name in shown or (name.startswith("measured") and "measured" in shown):
                fig.add_trace(go.Scatter(x=[None], y=[None], name=name, showlegend=True, hoverinfo="skip", **style))
        fig.update_xaxes(type="log", tickvals=[1, 4, 16, 64, 256, 1024], gridcolor="#eee", showline=True,
                         linecolor="#888", mirror=True)
        fig.update_yaxes(type="log", gridcolor="#eee", showline=True, linecolor="#888", mirror=True)
        for r in range(rows):
            fig.update_yaxes(title="samples / s", row=r + 1, col=1)
        for c_ in range(cols):
            fig.update_xaxes(title="devices N", row=rows, col=c_ + 1)
        fig.update_layout(
            template="plotly_white", height=120 + 330 * rows, margin={"l": 70, "r": 20, "t": 70, "b": 60},
            title={"text": "Scaling model: measured runs (dots) and predictions to 1024 devices", "x": 0.01,
                   "font": {"size": 16}},
            legend={"orientation": "h", "x": 0, "y": -0.08 if rows > 1 else -0.2, "yanchor": "top"},
            font={"family": "Helvetica, Arial, sans-serif", "size": 13})
        figs.append(Figure(f"{slug}-model", "Scaling model", fig))
    return figs


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


# -- building -----------------------------------------------------------------------------------

def studies(cells: pd.DataFrame, bootstrap: int = scaling_model.BOOTSTRAP) -> list[Study]:
    out = []
    if cells.empty:
        return out
    agg_all = analysis.aggregate(cells)
    claim_all = verdicts.verdicts(cells)
    for key, grp in cells.groupby(analysis.STUDY_KEYS, dropna=False, sort=True):
        k = dict(zip(analysis.STUDY_KEYS, key))
        sel = lambda df: df[np.logical_and.reduce([df[c] == v for c, v in k.items()])] if not df.empty else df  # noqa: E731
        agg = sel(agg_all)
        study = Study(key=k, cells=grp, agg=agg, claim=sel(claim_all), fits=[], validations=[])
        if agg.empty:
            study.notes.append("no successful runs: nothing to plot")
        else:
            try:
                study.fits = scaling_model.fit_all(grp, bootstrap=bootstrap)
                study.validations = scaling_model.validate_all(grp, bootstrap=bootstrap)
            except Exception as exc:  # the model must never cost the rest of the report
                study.notes.append(f"scaling model not fitted: {exc}")
        out.append(study)
    return out


def write_pngs(figures: list[Figure], out_dir: Path) -> tuple[list[Path], str | None]:
    """Render figures to PNG with kaleido (a local Chrome/Chromium; ``BROWSER_PATH`` picks one).
    Returns the paths written and, if it failed, why."""
    if not figures:
        return [], None
    try:
        import kaleido
    except ImportError:
        return [], "kaleido is not installed (pip install 'scaling[report]')"
    if not os.environ.get("BROWSER_PATH"):
        for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"):
            if os.access(candidate, os.X_OK):
                os.environ["BROWSER_PATH"] = candidate
                break
    specs, paths = [], []
    for f in figures:
        path = out_dir / f"{f.name}.png"
        fig = f.fig.to_dict()
        fig["layout"]["width"] = FIG_WIDTH + 200  # room for the legend
        specs.append({"fig": fig, "path": path,
                      "opts": {"format": "png", "width": FIG_WIDTH + 200, "height": fig["layout"].get("height", FIG_HEIGHT),
                               "scale": 2}})
        paths.append(path)
    import logging

    # choreographer logs (and ignores) stray non-JSON lines from Chromium's pipe as tracebacks
    pipe_log = logging.getLogger("choreographer.channels.pipe")
    level = pipe_log.level
    pipe_log.setLevel(logging.CRITICAL)
    try:
        # mathjax off: its default is a CDN, and the report must build offline
        kaleido.write_fig_from_object_sync(specs, kopts={"mathjax": False})
    except Exception as exc:  # no Chrome, a sandbox refusal, a timeout: the HTML still has every figure
        return [p for p in paths if p.exists()], (
            f"PNG figures not written ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "install Chromium (apt-get install chromium) or set BROWSER_PATH")
    finally:
        pipe_log.setLevel(level)
    return [p for p in paths if p.exists()], None


def build(results_dir: str | Path, out_dir: str | Path | None = None, png: bool = True,
          bootstrap: int = scaling_model.BOOTSTRAP) -> Report:
    """Write ``out_dir/index.html`` (default ``results_dir/report``) and the PNG figures."""
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    loaded = analysis.load(results_dir)
    cells = analysis.tidy(loaded.records, loaded.paths)
    problems = list(loaded.problems)
    if not cells.empty:
        failed = cells[cells["status"] != "ok"]
        for r in failed.itertuples():
            first = str(r.error or "no error message").strip().splitlines()
            problems.append(f"failed run {r.sweep}/{r.run_id}: {first[-1] if first else ''}"[:300])
        agg = analysis.aggregate(cells)
        problems += analysis.missing_baselines(agg) + analysis.condition_flags(agg)
    study_list = studies(cells, bootstrap=bootstrap)
    colour = colours(cells)
    figures: list[Figure] = []
    for s in study_list:
        if not s.agg.empty:
            s.figures = _figures(s, colour)
            figures += s.figures
    comm = report_comm.section(results_dir, Figure, _fig_html)  # `scaling comm` records, if any
    where = report_decomposition.section(loaded, cells, comm.rows, Figure, _fig_html)  # where the time goes
    figures += comm.figures + where.figures
    pngs, png_problem = write_pngs(figures, out) if png else ([], None)
    if png_problem:
        problems.append(png_problem)
    body = render_html(results_dir, loaded, cells, study_list, problems, pngs, extra_html=where.html + comm.html)
    html_path = out / "index.html"
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, html_path)
    return Report(out_dir=out, html_path=html_path, pngs=pngs, problems=problems)


# -- HTML ---------------------------------------------------------------------------------------

CSS = """
body { font-family: Helvetica, Arial, sans-serif; color: #222; margin: 0; background: #fafafa; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 21px; margin: 36px 0 8px; border-bottom: 2px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 17px; margin: 22px 0 6px; }
p, li { line-height: 1.45; } .meta { color: #666; font-size: 13px; }
.banner { border-left: 6px solid #e69f00; background: #fff6e0; padding: 12px 16px; margin: 16px 0; }
.banner.info { border-color: #1f78b4; background: #eef5fb; }
.banner.missing { border-color: #b2182b; background: #fdecec; }
.claim { font-style: italic; }
.tw { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; background: white; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f0f0f0; } td.l, th.l { text-align: left; }
td.v-tf { color: #b35806; font-weight: bold; } td.v-torch { color: #1f5fa0; font-weight: bold; } td.v-none { color: #555; }
.figure { background: white; border: 1px solid #e4e4e4; margin: 12px 0; padding: 4px; }
.grid { display: grid; grid-template-columns: 1fr; gap: 0; }
code { background: #f0f0f0; padding: 1px 4px; }
nav a { margin-right: 14px; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def _table(df: pd.DataFrame, columns: Sequence[tuple[str, str, str | Callable[[Any], str]]], cls: str = "",
           row_class: Callable[[dict], dict[str, str]] | None = None) -> str:
    """columns: (column, header, format spec or function); text columns are left-aligned."""
    head = "".join(f"<th class='{'l' if fmt == 's' else ''}'>{_esc(h)}</th>" for _, h, fmt in columns)
    rows = []
    for rec in df.to_dict("records"):
        extra = row_class(rec) if row_class else {}
        tds = []
        for col, _, fmt in columns:
            v = rec.get(col)
            text = fmt(v) if callable(fmt) else ("-" if v is None or (isinstance(v, float) and math.isnan(v)) else
                                                 (str(v) if fmt == "s" else _fmt(v, fmt)))
            klass = " ".join(c for c in ("l" if fmt == "s" else "", extra.get(col, "")) if c)
            tds.append(f"<td class='{klass}'>{_esc(text)}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    # in a scrolling box: a narrow window scrolls a wide table instead of cutting it off
    return (f"<div class='tw'><table class='{cls}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _fig_html(f: Figure) -> str:
    import plotly.io as pio

    div = pio.to_html(f.fig, full_html=False, include_plotlyjs=False, div_id=f.name, default_height=f"{f.fig.layout.height or FIG_HEIGHT}px",
                      config={"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2}})
    return f"<div class='figure' data-figure='{_esc(f.name)}'>{div}</div>"


def _hardware_banner(cells: pd.DataFrame) -> str:
    if cells.empty:
        return ""
    ok = cells[cells["status"] == "ok"]
    if ok.empty:
        return ""
    gpu = ok[ok["accelerator"] == "gpu"]
    if gpu.empty:
        hosts = ", ".join(sorted({f"{h} ({c}, {n} CPUs)" for h, c, n in zip(ok["host"], ok["cpu_model"], ok["cpu_count"])}))
        over = ok[ok["N"] > pd.to_numeric(ok["cpu_count"], errors="coerce")]
        extra = (f" Runs with more workers than CPU cores ({', '.join(map(str, sorted(over['N'].unique())))} workers) "
                 "share cores, so their slow-down is CPU contention as much as communication." if not over.empty else "")
        return (
            "<div class='banner'><b>No GPU in these records.</b> Every &ldquo;device&rdquo; here is a CPU worker "
            f"process on {_esc(hosts)}. These results show how each framework's distribution machinery behaves "
            "with CPU workers on one machine; <b>they are not a multi-GPU verdict</b> on the seed claim, which "
            "speaks of large-scale, multi-GPU systems. Rerun the same sweeps on GPUs (and several nodes) to test it."
            f"{_esc(extra)}</div>")
    models = ", ".join(sorted({str(m) for m in gpu["gpu_model"].dropna()})) or "GPU"
    mixed = "" if len(gpu) == len(ok) else (f" {len(ok) - len(gpu)} of the {len(ok)} ok records ran on CPU workers "
                                            "only: compare studies of the same hardware.")
    return (f"<div class='banner info'><b>GPU records:</b> {_esc(models)}; hosts "
            f"{_esc(', '.join(sorted(set(map(str, gpu['host'])))))}.{_esc(mixed)}</div>")


def _claim_section(s: Study) -> str:
    return report_cells.verdict_section(s.claim, _table)


def _model_section(s: Study) -> str:
    if not s.fits:
        distributed = s.agg.groupby("backend")["N"].nunique() if not s.agg.empty else pd.Series(dtype=int)
        why = ("no backend was measured at two or more device counts" if (distributed < 2).all()
               else "the fit failed (see the notes)")
        return f"<p>No scaling model: {why}.</p>"
    parts = ["<p>Step time <code>T(N) = T_compute(N) + 2(N-1)&alpha; + 2(N-1)/N &middot; S/&beta;</code> with "
             f"<code>S</code> = {s.fits[0].grad_bytes:,} gradient bytes (fp32) and <code>T_compute</code> constant (weak) "
             "or <code>T0/N</code> (strong), fitted by non-negative least squares of relative errors over every repeat; "
             "intervals: 95% bootstrap over repeats within each N, widened by the model's largest leave-one-N-out "
             "error (so they include model error, not only repeat noise). Beside it the scaling mode's law, fitted "
             "by least squares over the median speedups: Amdahl <code>1/S = f + (1-f)/N</code> (strong scaling), "
             "Gustafson <code>S = N - s(N-1)</code> (weak scaling).</p>"]
    rows = []
    targets = [16, 64, 256, 1024]
    for fit in s.fits:
        par = fit.parameters()
        pred = fit.predict(targets, include_measured=False).set_index("N")

        def pv(model: str, name: str) -> str:
            r = par[(par["parameter"] == name) & (par["model"] == model)]
            if r.empty:
                return "-"
            r = r.iloc[0]
            return (f"{fmt_param(name, r['value'])} [{fmt_param(name, r['low'])} .. "
                    f"{fmt_param(name, r['high'])}]")

        if fit.identifiable:
            alpha, beta, t0 = pv("fit", "alpha"), pv("fit", "beta"), pv("fit", "T_compute")
        else:
            lat, bw = par[par["model"] == "latency_only"], par[par["model"] == "bandwidth_only"]
            alpha = f"not identifiable: 0 .. {fmt_param('alpha', lat[lat['parameter'] == 'alpha']['value'].iloc[0])}" if not lat.empty else "-"
            beta = f"not identifiable: {fmt_param('beta', bw[bw['parameter'] == 'beta']['value'].iloc[0])} .. inf" if not bw.empty else "-"
            t0 = pv("latency_only", "T_compute")
        row = {"backend": fit.key["backend"], "N": ", ".join(map(str, fit.measured_n)), "t0": t0, "alpha": alpha,
               "beta": beta, "f": f"{fit.law_name}: {pv(fit.law_name.lower(), 'serial fraction')}"}
        for n in targets:
            p = pred.loc[n]
            if fit.identifiable:
                row[f"p{n}"] = f"{p['throughput']:,.0f} ({p['efficiency']:.1%})"
            else:
                row[f"p{n}"] = f"{p['throughput_low']:,.0f} .. {p['throughput_high']:,.0f}"
        rows.append(row)
    cols = [("backend", "backend", "s"), ("N", "N measured", "s"), ("t0", "T_compute [95%]", "s"),
            ("alpha", "α [95%]", "s"), ("beta", "β [95%]", "s"), ("f", "serial fraction [95%]", "s")]
    parts.append(_table(pd.DataFrame(rows), cols))
    parts.append("<p>Predicted samples/s (efficiency) from the α-β model; a range where α and β are not identifiable:</p>")
    parts.append(_table(pd.DataFrame(rows), [("backend", "backend", "s")] +
                        [(f"p{n}", f"N = {n}", "s") for n in targets]))
    by_note: dict[str, list[str]] = {}
    for fit in s.fits:
        for note in fit.notes:
            by_note.setdefault(note, []).append(fit.key["backend"])
    if by_note:
        parts.append("<ul>" + "".join(f"<li><b>{_esc(', '.join(b))}</b>: {_esc(n)}</li>" for n, b in by_note.items())
                     + "</ul>")
    parts.append("<h3>Validation: fit on the smaller device counts, predict the largest</h3>")
    if s.validations:
        parts.append("<ul>" + "".join(f"<li>{_esc(v.summary())}</li>" for v in s.validations) + "</ul>")
    else:
        parts.append("<p>Not possible here: validation needs a backend measured at three or more device counts "
                     "(two to fit, one held out).</p>")
    return "".join(parts)


def _serial(value: Any) -> str:
    """A serial fraction, flagged above 1: the cell ran slower at N than at N=1 (no law explains
    that with a fraction of the work; it is overhead that grows with N)."""
    if value is None or value != value:
        return "-"
    return f"{value:.2f} (slower than N=1)" if value > 1 else f"{value:.2f}"


def _agg_table(agg: pd.DataFrame) -> str:
    return _table(agg, [
        ("backend", "backend", "s"), ("settings", "settings", "s"), ("N", "N", "d"), ("layout", "layout", "s"),
        ("repeats", "repeats", "d"), ("failed", "failed", "d"),
        ("global_batch", "global batch", ",.0f"), ("throughput", "samples/s (median)", ",.0f"),
        ("throughput_min", "min", ",.0f"), ("throughput_max", "max", ",.0f"), ("throughput_spread", "spread", ".0%"),
        ("speedup", "speedup", ".2f"), ("efficiency", "efficiency", ".0%"), ("serial_fraction", f"{agg['serial_law'].iloc[0]} serial", _serial),
        ("step_time_p50_s", "step p50 ms", lambda v: _fmt(v * 1e3 if v == v else v, ".3f")),
        ("step_time_p95_s", "step p95 ms", lambda v: _fmt(v * 1e3 if v == v else v, ".3f")),
        ("final_test_accuracy", "final accuracy", ".4f"),
        ("time_to_accuracy_s", "time to target (s)", lambda v: "not reached" if v != v else f"{v:.1f}"),
    ])


def render_html(results_dir: Path, loaded: analysis.Loaded, cells: pd.DataFrame, study_list: list[Study],
                problems: list[str], pngs: list[Path], extra_html: str = "") -> str:
    from plotly.offline import get_plotlyjs

    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    n_ok = int((cells["status"] == "ok").sum()) if not cells.empty else 0
    n_failed = len(cells) - n_ok if not cells.empty else 0
    from scaling.invalid_cells import invalid_cells

    invalid = invalid_cells(results_dir)
    parts = [f"<h1>Scaling study report</h1><p class='meta'>{_esc(results_dir)} &middot; generated {generated} &middot; "
             f"{loaded.files_seen} record files, {n_ok} ok, {n_failed} failed, {loaded.files_seen - len(loaded.records)} "
             f"unreadable &middot; {len(invalid)} grid cells skipped as invalid for their backend</p>"]
    if invalid:
        reasons = sorted({r.split(". Fix:")[0] for r in invalid.values()})
        problems = [*problems, f"{len(invalid)} cell(s) of the sweeps' grids were not run: " + "; ".join(reasons)]
    if study_list:
        parts.append("<nav>" + "".join(f"<a href='#{_esc(s.slug)}'>{_esc(s.title)}</a>" for s in study_list) +
                     "<a href='#environment'>environment</a><a href='#definitions'>definitions</a></nav>")
    parts.append("<h2>The seed claim</h2>"
                 f"<p class='claim'>&ldquo;{_esc(analysis.SEED_CLAIM)}.&rdquo;</p>"
                 "<p>Each study below answers two questions per device count: is TensorFlow <i>faster at N</i> "
                 "(ratio of median samples/s) and does it <i>scale better to N</i> (ratio of median efficiencies); "
                 "above 1 favours TF.</p>" + report_cells.rule_paragraph())
    parts.append(_hardware_banner(cells))
    if problems or cells.empty:
        items = "".join(f"<li>{_esc(p)}</li>" for p in problems) or "<li>no records</li>"
        parts.append(f"<div class='banner missing'><b>What is missing or was skipped</b><ul>{items}</ul></div>")
    for s in study_list:
        parts.append(f"<h2 id='{_esc(s.slug)}'>{_esc(s.title)}</h2>")
        for note in s.notes:
            parts.append(f"<p><i>{_esc(note)}</i></p>")
        if s.agg.empty:
            continue
        parts.append("<h3>Seed claim: faster at N, scales better to N</h3>" + _claim_section(s))
        parts.append("<div class='grid'>" + "".join(_fig_html(f) for f in s.figures if not f.name.endswith("-model")) + "</div>")
        parts.append("<h3>Aggregate over repeats</h3>" + _agg_table(s.agg))
        parts.append("<h3>Scaling model and predictions</h3>")
        parts.append("".join(_fig_html(f) for f in s.figures if f.name.endswith("-model")))
        parts.append(_model_section(s))
    parts.append(extra_html)
    parts.append("<h2 id='environment'>Environment</h2>")
    env = analysis.environments(loaded.records)
    if env.empty:
        parts.append("<p>No records, so no environment to show.</p>")
    else:
        parts.append(_table(env, [("host", "host", "s"), ("cpu", "CPU", "s"), ("memory_gib", "memory GiB", ".1f"),
                                  ("gpu", "GPU", "s"), ("python", "Python", "s"), ("frameworks", "frameworks", "s"),
                                  ("platform", "platform", "s"), ("slurm", "Slurm", "s"), ("code", "code", "s"),
                                  ("records", "records", "d")]))
    if pngs:
        parts.append("<p class='meta'>PNG figures next to this file: " + ", ".join(_esc(p.name) for p in pngs) + "</p>")
    parts.append(
        "<h2 id='definitions'>Definitions</h2><ul>"
        "<li><b>N</b> = devices per node &times; nodes (GPUs, or CPU worker processes where there is no GPU); "
        "the <b>layout</b> <code>DxM</code> is D devices per node on M nodes. Layouts, variants, workload "
        "parameters and fast-mode settings are separate cells, never pooled.</li>"
        "<li><b>Throughput</b>: global samples/s over the timed steps (warm-up excluded); the median of repeats, "
        "with min..max as its spread.</li>"
        "<li><b>Speedup</b> S(N) = median throughput(N) / median throughput(1) of the same backend and settings; "
        "<b>efficiency</b> = S(N)/N. Weak scaling fixes the per-device batch, strong scaling the global batch; "
        "either way ideal is S = N.</li>"
        "<li><b>Karp-Flatt</b> (strong scaling) e = (1/S &minus; 1/N) / (1 &minus; 1/N): the Amdahl serial fraction "
        "that explains the speedup. <b>Gustafson</b> (weak scaling) s = (N &minus; S) / (N &minus; 1): the serial "
        "fraction of the scaled speedup S = N &minus; s (N &minus; 1). Either is above 1 when more devices make the "
        "run slower.</li>"
        "<li><b>Step time</b>: per-step wall time of one worker, p50 and p95 of the timed steps.</li>"
        "<li><b>Time to accuracy</b>: from the first step to the end of the first evaluation at or above the target.</li>"
        "</ul>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>Scaling study report</title><style>{CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head>"
            f"<body><main>{''.join(parts)}</main></body></html>")


# -- `scaling report` ---------------------------------------------------------------------------

def report_command(argv: list[str]) -> int:
    """`scaling report RESULTS_DIR [--out DIR] [--no-png]`."""
    parser = argparse.ArgumentParser(
        prog="scaling report",
        description="Write a self-contained HTML report (and PNG figures) from the records in RESULTS_DIR.")
    parser.add_argument("results_dir", nargs="?", default=os.environ.get("SCALING_RESULTS", "results"),
                        help="default: $SCALING_RESULTS or ./results")
    parser.add_argument("--out", default=None, help="output folder (default RESULTS_DIR/report)")
    parser.add_argument("--no-png", action="store_true", help="skip the PNG figures (they need Chromium)")
    parser.add_argument("--bootstrap", type=int, default=scaling_model.BOOTSTRAP,
                        help="bootstrap resamples for the model's intervals")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    found = analysis.load(args.results_dir)
    if not found.records:  # a mistyped folder: say so, and write no empty dashboard
        for problem in found.problems or [f"no records in {args.results_dir}"]:
            print(f"scaling report: error: {problem}", file=sys.stderr)
        return 2
    try:
        rep = build(args.results_dir, args.out, png=not args.no_png, bootstrap=args.bootstrap)
    except OSError as exc:
        print(f"scaling report: error: {exc}", file=sys.stderr)
        return 2
    for problem in rep.problems:
        print(f"scaling report: note: {problem}", file=sys.stderr)
    print(rep.html_path)
    for p in rep.pngs:
        print(p)
    return 0
