"""`scaling predict RESULTS_DIR`: the scaling model's fits, predictions and validations in the
terminal (``scaling.scaling_model`` fits, this module prints)."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

from scaling import analysis
from scaling.scaling_model import BOOTSTRAP, DEFAULT_TARGETS, Fit, fit_all, validate_all


def _parse_targets(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of device counts: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("device counts must be positive")
    return values


def predict_command(argv: list[str]) -> int:
    """`scaling predict RESULTS_DIR [--sweep ID] [--backend B] [--workload W] [--devices 16,...] [--validate]`."""
    parser = argparse.ArgumentParser(
        prog="scaling predict",
        description="Fit T(N) = T_compute + ring all-reduce (alpha, beta), and Amdahl's (strong) or Gustafson's "
                    "(weak) law, to measured step times; "
                    "predict throughput and efficiency at larger device counts.")
    parser.add_argument("results_dir", nargs="?", default=os.environ.get("SCALING_RESULTS", "results"),
                        help="default: $SCALING_RESULTS or ./results")
    parser.add_argument("--sweep", help="only this sweep id")
    parser.add_argument("--backend", action="append", help="only this backend (repeatable)")
    parser.add_argument("--workload", help="only this workload")
    parser.add_argument("--devices", type=_parse_targets, default=list(DEFAULT_TARGETS),
                        help="device counts to predict (default 16,32,...,1024)")
    parser.add_argument("--validate", action="store_true",
                        help="also fit on the smaller device counts and predict the largest measured one")
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help="bootstrap resamples for the intervals")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)

    from rich.markup import escape

    from scaling.results import make_console

    console = make_console()
    loaded = analysis.load(args.results_dir)
    for problem in loaded.problems:
        console.print(f"[yellow]note:[/] {escape(problem)}")
    cells = analysis.tidy(loaded.records, loaded.paths)
    if not cells.empty:
        if args.sweep:
            cells = cells[cells["sweep"] == args.sweep]
        if args.backend:
            cells = cells[cells["backend"].isin(args.backend)]
        if args.workload:
            cells = cells[cells["workload"] == args.workload]
    fits = fit_all(cells, bootstrap=args.bootstrap) if not cells.empty else []
    if not fits:
        print("scaling predict: nothing to fit: need ok runs of a backend at two or more device counts"
              + (f" in {args.results_dir}" if loaded.records else ""), file=sys.stderr)
        return 1
    for fit in fits:
        console.print(render_fit(fit, args.devices))
    if args.validate:
        validations = validate_all(cells, bootstrap=args.bootstrap)
        if not validations:
            console.print("[yellow]validation:[/] needs a backend measured at 3 or more device counts")
        for v in validations:
            console.print(f"[bold]validation[/] {escape(v.summary())}")
    return 0


def render_fit(fit: Fit, targets: Sequence[int] = DEFAULT_TARGETS):
    """A rich renderable: parameters with intervals, notes, predictions."""
    from rich.console import Group
    from rich.table import Table

    params = Table(title=f"{fit.label}  (sweep {fit.key['sweep']}, N measured {fit.measured_n}, "
                         f"S = {fit.grad_bytes:,} B)", title_justify="left")
    for col in ("model", "parameter", "value", "95% interval"):
        params.add_column(col, justify="right" if col != "parameter" else "left")
    for row in fit.parameters().itertuples():
        params.add_row(row.model, row.parameter, fmt_param(row.parameter, row.value),
                       f"{fmt_param(row.parameter, row.low)} .. {fmt_param(row.parameter, row.high)}")
    shown = fit.supported(targets)  # a fit that cannot tell alpha from beta predicts no further than it measured
    pred = fit.predict(shown)
    table = Table(title="predicted", title_justify="left")
    table.add_column("N", justify="right")
    table.add_column("samples/s (model)", justify="right")
    table.add_column("95% / bracket", justify="right")
    table.add_column("efficiency", justify="right")
    table.add_column(f"{fit.law_name} samples/s", justify="right")
    table.add_column(f"{fit.law_name} eff.", justify="right")
    for r in pred.to_dict("records"):
        eff = (f"{r['efficiency']:.1%}" if "efficiency" in r and not math.isnan(r["efficiency"])
               else f"{r.get('efficiency_low', math.nan):.1%} .. {r.get('efficiency_high', math.nan):.1%}")
        table.add_row(str(r["N"]), _f(r["throughput"]), f"{_f(r['throughput_low'])} .. {_f(r['throughput_high'])}", eff,
                      _f(r.get("law_throughput", math.nan)), _pct(r.get("law_efficiency", math.nan)))
    from rich.markup import escape

    notes = [f"[dim]- {escape(n)}[/]" for n in fit.notes]
    beyond = sorted(set(targets) - set(shown))
    if beyond:
        notes.append(f"[dim]- no prediction at N = {', '.join(map(str, beyond))}: beyond the measured N = "
                     f"{max(fit.measured_n)}, alpha and beta not identifiable[/]")
    return Group(params, *notes, table, "")


def fmt_param(name: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf"
    if name == "beta":
        return f"{value / 1e9:.3g} GB/s"
    if name in ("alpha", "T_compute"):
        return _seconds(value)
    return f"{value:.3g}"


def _seconds(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value * 1e6:.3g} us"
    if abs(value) < 1:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"


def _f(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.0f}"


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"
