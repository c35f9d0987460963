"""`scaling report RESULTS_DIR`: one self-contained HTML dashboard (plotly.js embedded, opens
offline) and the main figures as PNG files, from the records alone.

Per study (sweep x workload x data x scaling mode): throughput vs devices with the ideal line,
efficiency, step time p50/p95, accuracy and time-to-accuracy, the two seed-claim verdicts per device
count (faster at N, scales better to N; ``scaling.report_cells``) and the scaling model (measured
points and predictions: to 1024 devices where alpha and beta are identifiable, only over the
measured device counts where not). The figures are drawn in ``scaling.report_figures``; this
module lays out the page. A folder that is empty, partial or holds other schema versions gives a
report that says what is missing.
"""
from __future__ import annotations

import argparse
import html
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from scaling import analysis, report_cells, report_comm, report_decomposition, scaling_model, verdicts
from scaling.predict import fmt_param
from scaling.report_figures import FIG_HEIGHT, Figure, PngWriter, Study, colours, figures


@dataclass
class Report:
    out_dir: Path
    html_path: Path
    pngs: list[Path]
    problems: list[str]


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


def build(results_dir: str | Path, out_dir: str | Path | None = None, png: bool = True,
          bootstrap: int = scaling_model.BOOTSTRAP) -> Report:
    """Write ``out_dir/index.html`` (default ``results_dir/report``) and the PNG figures."""
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    writer = PngWriter() if png else None  # Chromium starts while the studies are computed
    try:
        return _build(results_dir, out, writer, bootstrap)
    finally:
        if writer:
            writer.close()


def _build(results_dir: Path, out: Path, writer: PngWriter | None, bootstrap: int) -> Report:
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
    all_figures: list[Figure] = []
    for s in study_list:
        if not s.agg.empty:
            s.figures = figures(s, colour)
            all_figures += s.figures
            s.links = report_cells.run_links(s.cells, s.agg, out)
    comm = report_comm.section(results_dir, Figure, _fig_html)  # `scaling comm` records, if any
    where = report_decomposition.section(loaded, cells, comm.rows, Figure, _fig_html)  # where the time goes
    all_figures += comm.figures + where.figures
    pngs, png_problem = writer.write(all_figures, out) if writer and all_figures else ([], None)
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
    """columns: (column, header, format spec, function, or "html" for ready HTML); text columns are
    left-aligned."""
    head = "".join(f"<th class='{'l' if fmt in ('s', 'html') else ''}'>{_esc(h)}</th>" for _, h, fmt in columns)
    rows = []
    for rec in df.to_dict("records"):
        extra = row_class(rec) if row_class else {}
        tds = []
        for col, _, fmt in columns:
            v = rec.get(col)
            if fmt == "html":  # already HTML (its text escaped by whoever built it)
                tds.append(f"<td class='l'>{v or '-'}</td>")
                continue
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
        supported = fit.supported(targets)
        for n in targets:
            p = pred.loc[n]
            if n not in supported:  # beyond the measured N, a bracket would be an extrapolation
                row[f"p{n}"] = "- (not identifiable)"
            elif fit.identifiable:
                row[f"p{n}"] = f"{p['throughput']:,.0f} ({p['efficiency']:.1%})"
            else:
                row[f"p{n}"] = f"{p['throughput_low']:,.0f} .. {p['throughput_high']:,.0f}"
        rows.append(row)
    cols = [("backend", "backend", "s"), ("N", "N measured", "s"), ("t0", "T_compute [95%]", "s"),
            ("alpha", "α [95%]", "s"), ("beta", "β [95%]", "s"), ("f", "serial fraction [95%]", "s")]
    parts.append(_table(pd.DataFrame(rows), cols))
    parts.append("<p>Predicted samples/s (efficiency) from the α-β model; where α and β are not identifiable, the "
                 "bracket within the measured device counts and no prediction beyond them:</p>")
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


def _agg_table(s: Study) -> str:
    agg = s.agg.assign(runs=s.links or "", framework_best_text=[
        "-" if name is None else f"{name}: {thr:,.0f}"
        for name, thr in zip(s.agg["framework_best"], s.agg["framework_best_throughput"])])
    return _table(agg, [
        ("backend", "backend", "s"), ("settings", "settings", "s"), ("N", "N", "d"), ("layout", "layout", "s"),
        ("repeats", "repeats", "d"), ("failed", "failed", "d"),
        ("global_batch", "global batch", ",.0f"), ("throughput", "samples/s (median)", ",.0f"),
        ("throughput_min", "min", ",.0f"), ("throughput_max", "max", ",.0f"), ("throughput_spread", "spread", ".0%"),
        ("speedup", "speedup", ".2f"), ("efficiency", "efficiency", ".0%"),
        ("efficiency_vs_framework_best", "efficiency vs best 1-device of its framework", ".0%"),
        ("framework_best_text", "best 1-device of the framework: samples/s", "s"),
        ("serial_fraction", f"{agg['serial_law'].iloc[0]} serial", _serial),
        ("step_time_p50_s", "step p50 ms", lambda v: _fmt(v * 1e3 if v == v else v, ".3f")),
        ("step_time_p95_s", "step p95 ms", lambda v: _fmt(v * 1e3 if v == v else v, ".3f")),
        ("final_test_accuracy", "final accuracy", ".4f"),
        ("time_to_accuracy_s", "time to target (s)", lambda v: "not reached" if v != v else f"{v:.1f}"),
        ("runs", "runs: record, log, W&B", "html"),
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
             f"{loaded.files_seen} record files: {n_ok} ok, {n_failed} failed, {len(loaded.others)} collective "
             f"benchmarks, {loaded.files_seen - len(loaded.records) - len(loaded.others)} unreadable &middot; "
             f"{len(invalid)} grid cells skipped as invalid for their backend</p>"]
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
        parts.append("<h3>Aggregate over repeats</h3>" + _agg_table(s))
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
        "<li><b>Efficiency vs best 1-device of its framework</b> = median throughput(N) / (N &times; the highest "
        "median throughput of any N = 1 cell of the same framework in the study, named beside it): a backend "
        "with a slow N = 1 base cannot look efficient against that base alone. Dashed in the efficiency figure.</li>"
        "<li><b>Runs</b>: each repeat's record, its log (when the launcher kept one) and its W&amp;B run (when "
        "its log names one), linked relative to this page, so the results folder can be moved whole.</li>"
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
