"""The dashboard's figures (plotly) and their PNG copies: per study throughput, efficiency, step
time, accuracy and the scaling model against devices (``scaling.report`` lays out the page).

TF backends are drawn in warm colours and PyTorch backends in cool ones, so the seed claim reads
off the hue.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from scaling import analysis, report_cells, scaling_model

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
    #: per ``agg`` row: HTML links to its runs' records, logs and W&B runs
    links: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return analysis.study_slug(self.key)

    @property
    def title(self) -> str:
        k = self.key
        extra = ", ".join(x for x in (f"variant {k['variant']}", k["workload_params"],
                                      k["overrides"] and f"overrides {k['overrides']}") if x)
        return f"sweep {k['sweep']}: {k['workload']} on {k['data']}, {k['scaling']} scaling ({extra})"


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


def figures(study: Study, colour: dict[str, str]) -> list[Figure]:
    """Every figure of one study with ok runs: throughput, efficiency, step time, accuracy, model."""
    agg, slug = study.agg, study.slug
    ns = sorted(agg["N"].unique())
    log_x = max(ns) >= 8
    out = [make(agg, slug, colour, ns, log_x) for make in (_throughput, _efficiency, _step_time, _accuracy)]
    model = _model(study, colour)
    return out + ([model] if model is not None else [])


def _throughput(agg: pd.DataFrame, slug: str, colour: dict[str, str], ns: list[int], log_x: bool) -> Figure:
    """Throughput with the ideal line N x throughput(1)."""
    import plotly.graph_objects as go

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
    _layout(fig, f"Throughput vs devices ({agg['scaling'].iloc[0]} scaling; median, bars = min..max of repeats)",
            "devices N", "samples / s (global)", ns, log_x)
    return Figure(f"{slug}-throughput", "Throughput", fig)


def _efficiency(agg: pd.DataFrame, slug: str, colour: dict[str, str], ns: list[int], log_x: bool) -> Figure:
    """Efficiency S(N)/N with the repeat range."""
    import plotly.graph_objects as go

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
    # the same cells against the best single-device cell of their framework (scaling.metrics), dashed
    for backend, name, g in report_cells.series(agg[agg["efficiency_vs_framework_best"].notna()]):
        fig.add_trace(go.Scatter(
            x=g["N"], y=g["efficiency_vs_framework_best"], name=f"{name} vs best 1-device", legendgroup=name,
            mode="lines+markers", line={"color": colour[backend], "width": 1.2, "dash": "dash"},
            marker={"size": 6, "symbol": "diamond"}, showlegend=False,
            customdata=np.stack([g["layout"], g["framework_best"], g["framework_best_throughput"]], axis=1),
            hovertemplate=report_cells.hover(name, "efficiency vs best 1-device of its framework %{y:.1%}<br>"
                                             "(%{customdata[1]}, %{customdata[2]:,.0f} samples/s)")))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line={"color": "#777", "dash": "dash", "width": 1.2},
                             name="vs best 1-device of the framework"))
    fig.add_hline(y=1.0, line={"color": "#777", "dash": "dot", "width": 1}, annotation_text="ideal",
                  annotation_position="top left")
    _layout(fig, "Scaling efficiency S(N)/N (bars = repeat range; dashed: against the framework's best 1-device)",
            "devices N", "efficiency", ns, log_x)
    fig.update_yaxes(tickformat=".0%")
    return Figure(f"{slug}-efficiency", "Efficiency", fig)


def _step_time(agg: pd.DataFrame, slug: str, colour: dict[str, str], ns: list[int], log_x: bool) -> Figure:
    """Step time per device, p50 and p95."""
    import plotly.graph_objects as go

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
    return Figure(f"{slug}-step-time", "Step time", fig)


def _accuracy(agg: pd.DataFrame, slug: str, colour: dict[str, str], ns: list[int], log_x: bool) -> Figure:
    """Final accuracy and time-to-accuracy per cell."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

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
    return Figure(f"{slug}-accuracy", "Accuracy", fig)


def _model(study: Study, colour: dict[str, str]) -> Figure | None:
    """The scaling model, one panel per backend: each repeat measured and the predictions."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not study.fits:
        return None
    slug = study.slug
    k = len(study.fits)
    cols = min(3, k)
    rows = math.ceil(k / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f.key["backend"] for f in study.fits],
                        horizontal_spacing=0.07, vertical_spacing=0.16 if rows > 1 else 0.1,
                        shared_yaxes="all")
    top = max(scaling_model.DEFAULT_TARGETS)
    grid = sorted({int(round(v)) for v in np.geomspace(1, top, 41)} | set(scaling_model.DEFAULT_TARGETS))
    shown: set[str] = set()
    for i, fit in enumerate(study.fits):
        r, c_ = divmod(i, cols)
        at = {"row": r + 1, "col": c_ + 1}
        backend = fit.key["backend"]
        c = colour[backend]
        # a fit that cannot tell alpha from beta is drawn only over the measured device counts
        pred = fit.predict(fit.supported(grid)).drop_duplicates("N").sort_values("N")

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
    reach = max(max(fit.supported(grid) or fit.measured_n) for fit in study.fits)
    fig.update_xaxes(type="log", tickvals=[v for v in (1, 2, 4, 8, 16, 64, 256, 1024) if v <= reach],
                     gridcolor="#eee", showline=True, linecolor="#888", mirror=True)
    fig.update_yaxes(type="log", gridcolor="#eee", showline=True, linecolor="#888", mirror=True)
    for r in range(rows):
        fig.update_yaxes(title="samples / s", row=r + 1, col=1)
    for c_ in range(cols):
        fig.update_xaxes(title="devices N", row=rows, col=c_ + 1)
    fig.update_layout(
        template="plotly_white", height=120 + 330 * rows, margin={"l": 70, "r": 20, "t": 70, "b": 60},
        title={"text": f"Scaling model: measured runs (dots) and predictions to {top} devices where α and β are "
                       "identifiable (else only over the measured N)", "x": 0.01, "font": {"size": 16}},
        legend={"orientation": "h", "x": 0, "y": -0.08 if rows > 1 else -0.2, "yanchor": "top"},
        font={"family": "Helvetica, Arial, sans-serif", "size": 13})
    return Figure(f"{slug}-model", "Scaling model", fig)


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


class PngWriter:
    """Renders figures to PNG with kaleido (a local Chrome/Chromium; ``BROWSER_PATH`` picks one).

    Chromium takes about 2 s to start, so it starts in a background thread when the writer is made,
    while the report computes its studies and figures on the main thread; :meth:`write` then hands
    it the figures and waits. :meth:`close` (also on an error before ``write``) lets it go."""

    def __init__(self, timeout: float = 300) -> None:
        import queue
        import threading

        self.timeout = timeout
        self._figures: queue.Queue = queue.Queue(maxsize=1)
        self._error: str | None = None
        try:
            import kaleido  # noqa: F401
        except ImportError:
            self._error = "kaleido is not installed (pip install 'scaling[report]')"
            self._thread = None
            return
        if not os.environ.get("BROWSER_PATH"):
            for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"):
                if os.access(candidate, os.X_OK):
                    os.environ["BROWSER_PATH"] = candidate
                    break
        self._thread = threading.Thread(target=self._run, name="png-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import asyncio
        import logging

        # choreographer logs (and ignores) stray non-JSON lines from Chromium's pipe as tracebacks
        logging.getLogger("choreographer.channels.pipe").setLevel(logging.CRITICAL)
        try:
            asyncio.run(self._render())
        except Exception as exc:  # no Chrome, a sandbox refusal, a timeout: the HTML still has every figure
            self._error = (f"PNG figures not written ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); "
                           "install Chromium (apt-get install chromium) or set BROWSER_PATH")

    async def _render(self) -> None:
        import asyncio

        import kaleido

        # mathjax off: its default is a CDN, and the report must build offline
        async with kaleido.Kaleido(mathjax=False) as k:
            specs = await asyncio.to_thread(self._figures.get)
            if specs:
                await k.write_fig_from_object(specs)

    def write(self, figures: list[Figure], out_dir: Path) -> tuple[list[Path], str | None]:
        """The figures as ``out_dir/<name>.png``: the paths written and, if it failed, why."""
        specs, paths = [], []
        for f in figures:
            path = out_dir / f"{f.name}.png"
            fig = f.fig.to_dict()
            fig["layout"]["width"] = FIG_WIDTH + 200  # room for the legend
            specs.append({"fig": fig, "path": path,
                          "opts": {"format": "png", "width": FIG_WIDTH + 200,
                                   "height": fig["layout"].get("height", FIG_HEIGHT), "scale": 2}})
            paths.append(path)
        if self._thread is None:
            return [], self._error if figures else None
        self._figures.put(specs)
        self._thread.join(self.timeout)
        if self._thread.is_alive():
            self._error = f"PNG figures not written within {self.timeout:.0f} s"
        written = [p for p in paths if p.exists()]
        if len(written) == len(paths):
            return written, None
        return written, self._error or f"{len(paths) - len(written)} of {len(paths)} PNG figures not written"

    def close(self) -> None:
        """Let Chromium go without writing (a report that failed before its figures)."""
        if self._thread is not None and self._thread.is_alive():
            try:
                self._figures.put_nowait([])
            except Exception:  # figures handed over already
                pass
            self._thread.join(30)

