"""The dashboard's "Where the time goes" section: per study, a stacked bar per backend and N
(compute / transfer / waiting / overhead) with the ideal floor and the reference-loop floor
marked, the decomposition table, and the first-principles model's check against the sweep
beside the model fitted to training runs (``scaling.decomposition``, ``scaling.comm_model``)."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from scaling import analysis, comm_model, decomposition

PARTS = (("compute_s", "compute (N=1 step)", "#4c72b0"), ("transfer_s", "transfer (micro-benchmark)", "#dd8452"),
         ("waiting_s", "waiting for the slowest rank", "#c44e52"), ("overhead_s", "overhead (what is left)", "#8c8c8c"))


@dataclass
class DecompositionSection:
    table: pd.DataFrame
    validation: pd.DataFrame
    figures: list = field(default_factory=list)  # report_figures.Figure
    html: str = ""


def _v(x: Any) -> float:
    return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def figure(study: pd.DataFrame, title: str):
    """The stacked bar of one study: one bar per (backend, N), floors and the measured step marked."""
    import plotly.graph_objects as go

    distributed = set(study.loc[study["N"] > 1, "backend"])  # single-device backends add nothing here
    rows = study[study["backend"].isin(distributed)].sort_values(["backend", "N"])
    x = [f"{r.backend}<br>N={r.N}" for r in rows.itertuples()]
    fig = go.Figure()
    for col, name, colour in PARTS:
        values = [max(0.0, _v(v)) * 1e3 for v in rows[col]]
        hover = [f"{name}: {_v(v) * 1e3:.3f} ms" + (f" (overlap hid {h * 1e3:.3f} ms)" if col == "overhead_s" and h > 0 else "")
                 for v, h in zip(rows[col], rows["hidden_s"].fillna(0))]
        fig.add_trace(go.Bar(x=x, y=values, name=name, marker_color=colour, hovertext=hover, hoverinfo="text"))
    for col, name, symbol, colour in (("step_s", "measured step", "line-ew-open", "#000"),
                                      ("ideal_floor_s", "ideal floor: compute + transfer", "triangle-down", "#2ca02c"),
                                      ("ideal_overlap_floor_s", "ideal floor, full overlap: max(compute, transfer)",
                                       "triangle-up", "#98df8a"),
                                      ("reference_floor_s", "practical floor: reference loop", "diamond", "#9467bd")):
        y = [v * 1e3 if pd.notna(v) and (n > 1 or col == "step_s") else None for v, n in zip(rows[col], rows["N"])]
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", name=name,
                                 marker={"symbol": symbol, "size": 14, "color": colour, "line": {"width": 2, "color": colour}}))
    fig.update_layout(barmode="stack", title=title, yaxis_title="ms per step", height=500, legend={"orientation": "h", "y": -0.25})
    return fig


def _ms(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.3f}"


def _table_html(study: pd.DataFrame) -> str:
    esc = html.escape
    head = ("<tr><th class='l'>backend</th><th>N</th><th>step ms</th><th>compute</th><th>transfer</th><th>waiting</th>"
            "<th>overhead</th><th>ideal floor</th><th>full-overlap floor</th><th>reference floor</th>"
            "<th class='l'>notes</th></tr>")
    body = ""
    for r in study.sort_values(["backend", "N"]).itertuples():
        notes = [n for n in (r.transfer_source if r.N > 1 else None, r.waiting_note) if isinstance(n, str) and n]
        if r.hidden_s and r.hidden_s > 0:
            notes.append(f"overlap hid {r.hidden_s * 1e3:.3f} ms of communication")
        if isinstance(r.reference_backend, str) and r.N > 1:
            notes.append(f"reference loop: {r.reference_backend}" if pd.notna(r.reference_floor_s)
                         else f"no {r.reference_backend} run at this N in this study: no practical floor")
        body += (f"<tr><td class='l'>{esc(str(r.backend))}</td><td>{int(r.N)}</td><td>{_ms(r.step_s)}</td>"
                 f"<td>{_ms(r.compute_s)}</td><td>{_ms(r.transfer_s)}</td><td>{_ms(r.waiting_s)}</td>"
                 f"<td>{_ms(r.overhead_s)}</td><td>{_ms(r.ideal_floor_s)}</td><td>{_ms(r.ideal_overlap_floor_s)}</td>"
                 f"<td>{_ms(r.reference_floor_s)}</td><td class='l'>{esc('; '.join(notes))}</td></tr>")
    return f"<div class='tw'><table>{head}{body}</table></div>"


def _validation_html(v: pd.DataFrame) -> str:
    if v.empty:
        return ""
    esc = html.escape
    head = ("<tr><th class='l'>backend</th><th>N</th><th>measured ms</th><th>no overlap</th><th>full overlap</th>"
            "<th>interval</th><th class='l'>first principles</th><th class='l'>fitted to training runs (held-out N)</th></tr>")
    body = "".join(
        f"<tr><td class='l'>{esc(str(r.backend))}</td><td>{int(r.N)}{' (held out)' if r.held_out else ''}</td>"
        f"<td>{_ms(r.measured_step_s)}</td><td>{_ms(r.predicted_no_overlap_s)}</td><td>{_ms(r.predicted_full_overlap_s)}</td>"
        f"<td>{_ms(r.interval_low_s)} .. {_ms(r.interval_high_s)}</td><td class='l'>{esc(str(r.verdict))}</td>"
        f"<td class='l'>{esc(str(r.trained_verdict)) if isinstance(r.trained_verdict, str) else '-'}</td></tr>"
        for r in v.sort_values(["backend", "N"]).itertuples())
    return ("<h4>First-principles model against the sweep</h4><p>Step time predicted as the backend's own N=1 step "
            "plus the all-reduce of its gradient, t = 2(N&minus;1)&alpha; + 2(N&minus;1)/N &middot; S &middot; &beta;, "
            "with &alpha; and &beta; fitted to the micro-benchmark only (never to these runs); the interval runs from "
            "the full-overlap reading's low end to the no-overlap reading's high end (bootstrap over the comm points, "
            "widened by the fit's residual). Beside it, the model fitted to the training runs, which sees every N but "
            "the held-out one.</p>" + f"<div class='tw'><table>{head}{body}</table></div>")


def fits_html(fits: dict) -> str:
    if not fits:
        return ""
    esc = html.escape
    body = "".join(
        f"<tr><td class='l'>{esc(f.path)}</td><td class='l'>{esc(f.variant)}</td><td class='l'>{esc(f.placement)}</td>"
        f"<td>{', '.join(map(str, f.n_values))}</td><td>{f.points}</td><td>{f.alpha * 1e6:.2f}</td>"
        f"<td>{(1 / f.beta / 1e9) if f.beta > 0 else math.inf:.3f}</td><td>{f.residual_rms:.0%}</td>"
        f"<td class='l'>{esc('; '.join(f.notes))}</td></tr>" for f in fits.values())
    return ("<h3>Alpha-beta fits to the micro-benchmark</h3><p>Per collective path over every N (the fit the "
            "predictions use), then per N alone: alpha and beta that drift with N say the ring model does not hold "
            "there.</p><table><tr><th class='l'>path</th><th class='l'>variant</th>"
            "<th class='l'>placement</th><th>N</th><th>points</th><th>&alpha; us</th><th>1/&beta; GB/s</th>"
            f"<th>RMS residual</th><th class='l'>notes</th></tr>{body}</table>")


def section(loaded: analysis.Loaded, cells: pd.DataFrame, comm_rows: pd.DataFrame, figure_class: type,
            fig_html) -> DecompositionSection:
    """The section (empty when there are no distributed training cells)."""
    empty = DecompositionSection(pd.DataFrame(), pd.DataFrame())
    if cells.empty or "status" not in cells or not (cells["N"] > 1).any():
        return empty
    fits = comm_model.fit_paths(comm_rows) if not comm_rows.empty else {}
    table = decomposition.table(cells, comm_rows, decomposition.clocks_by_run(loaded.records), fits)
    validation = comm_model.validate_all(cells, comm_rows) if not comm_rows.empty else pd.DataFrame()
    if table.empty:
        return empty
    parts = ["<h2 id='decomposition'>Where the time goes</h2>",
             "<p>Each cell's step (global batch / samples/s, median over repeats) split into <b>compute</b> (the same "
             "backend's N=1 step; strong scaling: scaled by the per-device batch), <b>transfer</b> (the all-reduce of "
             "the gradient at this N from <code>scaling comm</code>), <b>waiting</b> for the slowest rank (per-rank "
             "timestamps around the collective, where the backend's collective can be marked: every multi-process "
             "backend on CPU) and <b>overhead</b>, what is left (negative when overlap hid communication; the bar then shows 0 "
             "and the table says how much was hidden). The <b>ideal floor</b> is compute + transfer (and "
             "max(compute, transfer) with full overlap); the <b>practical floor</b> is the reference loop over the "
             "same library at the same N.</p>"]
    if comm_rows.empty:
        parts.append("<div class='banner'>No <code>scaling comm</code> records: transfer and the ideal floors are "
                     "unknown, so the overhead below still contains the communication. Run "
                     "<code>scaling comm devices=D</code> with the same placement.</div>")
    figs = []
    for key, study in table.groupby(analysis.STUDY_KEYS, dropna=False, sort=True):
        k = dict(zip(analysis.STUDY_KEYS, key))
        title = f"{k['sweep']}: {k['workload']} on {k['data']}, {k['scaling']} scaling, variant {k['variant']}"
        slug = analysis.study_slug(k) + "-decomposition"
        f = figure_class(slug, f"{title}: where the time goes", figure(study, f"{title}: where the time goes"))
        figs.append(f)
        parts.append(f"<h3>{html.escape(title)}</h3>" + fig_html(f) + _table_html(study))
        if not validation.empty:
            mine = validation[(validation["sweep"] == k["sweep"]) & (validation["workload"] == k["workload"])
                              & (validation["scaling"] == k["scaling"]) & (validation["variant"] == k["variant"])]
            parts.append(_validation_html(mine))
    parts.append(fits_html(fits | comm_model.fit_paths(comm_rows, bootstrap=0, per_n=True) if fits else {}))
    return DecompositionSection(table, validation, figs, "".join(parts))


def print_table(console: Any, table: pd.DataFrame) -> None:
    """``scaling results show``: the decomposition of every distributed cell, in ms, one table per study."""
    from rich.markup import escape
    from rich.table import Table

    if table.empty or not (table["N"] > 1).any():
        return
    for key, study in table[table["N"] > 1].groupby(analysis.STUDY_KEYS, dropna=False, sort=True):
        k = dict(zip(analysis.STUDY_KEYS, key))
        t = Table(title=f"where the time goes: {k['sweep']} {k['workload']} {k['scaling']} ({k['variant']}), ms per step",
                  title_justify="left")
        for name in ("backend", "N", "step", "compute", "transfer", "waiting", "overhead", "ideal floor",
                     "full-overlap floor", "reference floor", "notes"):
            t.add_column(name, justify="left" if name in ("backend", "notes") else "right")
        for r in study.sort_values(["backend", "N"]).itertuples():
            notes = [n for n in (r.transfer_source, r.waiting_note) if isinstance(n, str) and n]
            t.add_row(escape(str(r.backend)), str(r.N), *(_ms(getattr(r, c)) for c in (
                "step_s", "compute_s", "transfer_s", "waiting_s", "overhead_s", "ideal_floor_s",
                "ideal_overlap_floor_s", "reference_floor_s")), escape("; ".join(notes)))
        console.print(t)
