"""`scaling results list|show|export`: what a results folder holds, the aggregate table, and the
tidy tables as CSV and Parquet for other tools."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import pandas as pd

from scaling import analysis


def _default_dir() -> str:
    return os.environ.get("SCALING_RESULTS", "results")


def _cell(value, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if spec else str(value)


def _load(results_dir: str, sweep: str | None) -> tuple[analysis.Loaded, pd.DataFrame]:
    loaded = analysis.load(results_dir)
    cells = analysis.tidy(loaded.records, loaded.paths)
    if sweep and not cells.empty:
        cells = cells[cells["sweep"] == sweep].reset_index(drop=True)
    return loaded, cells


def make_console():
    """A rich console; wide when the output is not a terminal (files, pipes, tests)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def _notes(console, loaded: analysis.Loaded) -> None:
    from rich.markup import escape

    for problem in loaded.problems:
        console.print(f"[yellow]note:[/] {escape(problem)}")


def _list(console, args) -> int:
    from rich.table import Table

    loaded, cells = _load(args.results_dir, args.sweep)
    _notes(console, loaded)
    if cells.empty:
        console.print(f"no records{f' of sweep {args.sweep}' if args.sweep else ''} in {args.results_dir}")
        return 1
    if args.sweep is None:
        table = Table(title=f"sweeps in {args.results_dir}", title_justify="left")
        for col in ("sweep", "records", "ok", "failed", "backends", "workloads", "scaling", "N", "accelerator", "last"):
            table.add_column(col, justify="right" if col in ("records", "ok", "failed") else "left")
        for r in analysis.sweeps(cells).to_dict("records"):
            table.add_row(r["sweep"], str(r["records"]), str(r["ok"]),
                          f"[red]{r['failed']}[/]" if r["failed"] else "0", r["backends"], r["workloads"],
                          r["scaling"], r["N"], r["accelerator"], _cell(r["last"]))
        console.print(table)
        console.print("[dim]cells of one sweep: scaling results list RESULTS_DIR --sweep ID[/]")
        return 0
    table = Table(title=f"cells of sweep {args.sweep}", title_justify="left")
    for col, right in (("run", False), ("status", False), ("backend", False), ("workload", False), ("N", True),
                       ("repeat", True), ("samples/s", True), ("step p50 ms", True), ("accuracy", True)):
        table.add_column(col, justify="right" if right else "left")
    for r in cells.to_dict("records"):
        status = "[green]ok[/]" if r["status"] == "ok" else "[red]failed[/]"
        table.add_row(r["run_id"], status, r["backend"], f"{r['workload']}/{r['data']}", str(r["N"]), str(r["repeat"]),
                      _cell(r["samples_per_s"], ",.0f"), _cell(r["step_time_p50_s"] * 1e3, ".3f"),
                      _cell(r["final_test_accuracy"], ".4f"))
    console.print(table)
    return 0


def _show(console, args) -> int:
    from rich.markup import escape

    loaded, cells = _load(args.results_dir, args.sweep)
    _notes(console, loaded)
    agg = analysis.aggregate(cells)
    if agg.empty:
        console.print(f"no successful runs{f' in sweep {args.sweep}' if args.sweep else ''} in {args.results_dir}: "
                      "nothing to aggregate")
        return 1
    for note in analysis.missing_baselines(agg) + analysis.condition_flags(agg):
        console.print(f"[yellow]note:[/] {escape(note)}")
    for key, grp in agg.groupby(analysis.STUDY_KEYS, sort=True):
        console.print(_study_table(key, grp))
    from scaling import decomposition, report_decomposition  # where the time goes, per cell

    report_decomposition.print_table(console, decomposition.for_results(args.results_dir, loaded, cells))
    _verdicts(console, cells)
    return 0


def _study_title(key: tuple) -> str:
    k = dict(zip(analysis.STUDY_KEYS, key))
    extra = [f"variant {k['variant']}"] + [f"{k['workload_params']}"] * bool(k["workload_params"]) + (
        [f"overrides {k['overrides']}"] if k["overrides"] else [])
    return f"sweep {k['sweep']}: {k['workload']} on {k['data']}, {k['scaling']} scaling ({'; '.join(extra)})"


def _study_table(key: tuple, grp: pd.DataFrame):
    from rich.table import Table

    table = Table(title=_study_title(key), title_justify="left")
    law = grp["serial_law"].iloc[0]
    cols = [("backend", "l"), ("settings", "l"), ("N", "r"), ("layout", "r"), ("reps", "r"), ("samples/s", "r"),
            ("min..max", "r"), ("speedup", "r"), ("efficiency", "r"), ("vs best 1-device", "r"),
            (f"{law} serial", "r"), ("step p50/p95 ms", "r"),
            ("accuracy", "r"), ("time to target", "r")]
    for name, just in cols:
        table.add_column(name, justify="right" if just == "r" else "left")
    for r in grp.to_dict("records"):
        reps = f"{r['repeats']}" + (f" [red]+{r['failed']} failed[/]" if r["failed"] else "")
        table.add_row(
            r["backend"], r["settings"] or "-", str(r["N"]), r["layout"], reps, _cell(r["throughput"], ",.0f"),
            f"{_cell(r['throughput_min'], ',.0f')}..{_cell(r['throughput_max'], ',.0f')}",
            _cell(r["speedup"], ".2f"), _cell(r["efficiency"], ".0%"), _framework_best(r), _cell(r["serial_fraction"], ".2f"),
            f"{_cell(r['step_time_p50_s'] * 1e3, '.3f')} / {_cell(r['step_time_p95_s'] * 1e3, '.3f')}",
            _cell(r["final_test_accuracy"], ".4f"),
            "not reached" if math.isnan(r["time_to_accuracy_s"]) else f"{r['time_to_accuracy_s']:.1f} s")
    return table


def _framework_best(r: dict) -> str:
    """``54% horovod_tf``: the efficiency against the framework's best single-device cell, named (its
    samples/s is that cell's own N = 1 row)."""
    if r["framework_best"] is None:
        return "-"
    return f"{_cell(r['efficiency_vs_framework_best'], '.0%')} {r['framework_best']}"


def _verdicts(console, cells: pd.DataFrame) -> None:
    from rich.markup import escape
    from rich.table import Table

    from scaling import verdicts

    found = verdicts.verdicts(cells)
    if found.empty:
        return
    table = Table(title="seed claim: TF vs PyTorch per device count (faster at N; scales better to N)",
                  title_justify="left")
    for name in ("study", "N", "layout", "question", "TF", "PyTorch", "TF / PyTorch", "95% interval", "Cliff's d",
                 "p (Holm)", "reps TF/PT", "verdict"):
        table.add_column(name, justify="left" if name in ("study", "question", "TF", "PyTorch", "verdict") else "right")
    for r in found.to_dict("records"):
        table.add_row(f"{r['sweep']} {r['workload']} {r['scaling']}", str(r["N"]), r["layout"], r["question"],
                      _cell(r["tf_backend"]), _cell(r["torch_backend"]), _cell(r["ratio"], ".2f"),
                      f"{_cell(r['ratio_low'], '.2f')}..{_cell(r['ratio_high'], '.2f')}", _cell(r["cliffs_delta"], "+.2f"),
                      "-" if _cell(r["p_value"]) == "-" else
                      f"{r['p_value']:.3f} ({r['p_adjusted']:.3f}, {r['pairs']:.0f} pairs)",
                      f"{_cell(r['tf_repeats'], '.0f')}/{_cell(r['torch_repeats'], '.0f')}", r["verdict"])
    console.print(table)
    console.print(f"[dim]{escape(verdicts.RULE)}[/]")
    if (cells["accelerator"] != "gpu").all():
        console.print("[yellow]These records have no GPU: CPU-worker results are not a multi-GPU verdict.[/]")


def export(cells: pd.DataFrame, csv: str | Path | None = None, parquet: str | Path | None = None) -> list[Path]:
    """Write a table to CSV and/or Parquet (folders created); returns the paths written."""
    written = []
    if csv:
        path = Path(csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        cells.to_csv(path, index=False)
        written.append(path)
    if parquet:
        path = Path(parquet)
        path.parent.mkdir(parents=True, exist_ok=True)
        cells.to_parquet(path, index=False)
        written.append(path)
    return written


def _export(console, args) -> int:
    if not args.csv and not args.parquet:
        print("scaling results export: give --csv FILE and/or --parquet FILE", file=sys.stderr)
        return 2
    loaded, cells = _load(args.results_dir, args.sweep)
    _notes(console, loaded)
    table = analysis.aggregate(cells) if args.table == "aggregate" else cells
    if args.table == "aggregate":  # with where the time goes, per cell
        from scaling import decomposition

        table = decomposition.join(table, decomposition.for_results(args.results_dir, loaded, cells))
    if table.empty:
        console.print(f"no records to export from {args.results_dir}")
        return 1
    for path in export(table, args.csv, args.parquet):
        print(path)
    return 0


def results_command(argv: list[str]) -> int:
    """`scaling results list [RESULTS_DIR] [--sweep ID]`, `show RESULTS_DIR [--sweep ID]`,
    `export RESULTS_DIR --csv F --parquet F [--table cells|aggregate]`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="scaling results", description="List, aggregate and export result records.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    p_list = verbs.add_parser("list", help="sweeps in a results folder, or the cells of one sweep")
    p_list.add_argument("results_dir", nargs="?", default=_default_dir(), help="default: $SCALING_RESULTS or ./results")
    p_show = verbs.add_parser("show", help="the aggregate table: median throughput, speedup, efficiency, Karp-Flatt")
    p_show.add_argument("results_dir")
    p_export = verbs.add_parser("export", help="the tidy table (one row per run) or the aggregate as CSV / Parquet")
    p_export.add_argument("results_dir")
    p_export.add_argument("--csv", help="CSV file to write")
    p_export.add_argument("--parquet", help="Parquet file to write")
    p_export.add_argument("--table", choices=("cells", "aggregate"), default="cells",
                          help="cells: one row per run (default); aggregate: one row per backend and N")
    for p in (p_list, p_show, p_export):
        p.add_argument("--sweep", help="only this sweep id")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)

    console = make_console()
    try:
        return {"list": _list, "show": _show, "export": _export}[args.verb](console, args)
    except OSError as exc:
        print(f"scaling results {args.verb}: error: {exc}", file=sys.stderr)
        return 2
