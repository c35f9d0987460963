"""A sweep cell's fixed cost (its wall time minus training and evaluation), this checkout against
another revision of the study, measured side by side in one run.

For each repeat, the main job's cells (``experiment=local_cpu``, one repeat of every cell) run as
a sweep of each code version in turn, the order alternating between repeats so machine drift hits
both alike. A cell's wall time is what its sweep line reports (the launcher's start to its end),
its training and evaluation time the protocol's (``train_time_s``, ``eval_time_s``); W&B logs
offline as in the main job. Run it on an otherwise idle machine:

    python bench/cell_cost.py --baseline 5829c7a            # 2 repeats of the main job's 18 cells
    python bench/cell_cost.py --baseline v0.1 --repeats 3 --out cost.json
    python bench/cell_cost.py --baseline 5829c7a --whole    # the whole main job, each version once

``--whole`` runs each version's whole main job (every repeat, as the README's command does) into
its own results folder (``--results DIR`` keeps them: ``DIR/baseline-whole``, ``DIR/this-whole``),
the baseline first (``--this-first``: the other way round), and reports each one's wall time and runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the sweep's line for a finished cell: its id, then its wall time in the parenthesis
CELL_LINE = re.compile(r"cell \d+/\d+ (\S+): ok, .*\((\d+\.\d+) s[,)]")


def sweep(checkout: Path, results: Path, repeat: int | None, extra: list[str]) -> tuple[dict[str, float], float]:
    """Run one repeat of the main job (every repeat: ``repeat=None``) with ``checkout``'s code:
    (wall time per cell id, sweep seconds)."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    cmd = [sys.executable, "-m", "scaling", "sweep", "experiment=local_cpu",
           *([] if repeat is None else [f"repeat={repeat}"]), f"results_dir={results}", *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sweep with {checkout} failed:\n{proc.stderr[-3000:]}")
    walls = {m.group(1): float(m.group(2)) for m in CELL_LINE.finditer(proc.stderr)}
    return walls, took


def fixed_costs(results: Path, walls: dict[str, float]) -> dict[str, dict]:
    """Per cell: wall, training + evaluation, fixed (wall minus them), from the sweep's records."""
    out = {}
    for cell, wall in walls.items():
        m = json.loads((results / "local_cpu" / f"{cell}.json").read_text())["metrics"]
        worked = m["train_time_s"] + sum(m["eval_time_s"])
        out[cell] = {"wall": wall, "worked": worked, "fixed": wall - worked}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="a git revision of this repository to compare with")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write every cell's figures here as JSON")
    ap.add_argument("--whole", action="store_true", help="time each version's whole main job instead")
    ap.add_argument("--this-first", action="store_true", help="with --whole: run this checkout's main job first")
    ap.add_argument("--results", type=Path, default=None,
                    help="with --whole: keep each version's results under this folder (default: a temporary one)")
    ap.add_argument("overrides", nargs="*", help="more overrides for both sweeps (e.g. logger=none)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.baseline],
                       check=True, capture_output=True)
        try:
            versions = {"baseline": old, "this": ROOT}
            if args.whole and args.this_first:
                versions = {"this": ROOT, "baseline": old}
            if args.whole:
                whole(versions, args.results.resolve() if args.results else Path(tmp), args.baseline, args.overrides,
                      args.out)
                return
            cells: dict[str, dict[str, list[dict]]] = {v: {} for v in versions}
            sweeps: dict[str, list[float]] = {v: [] for v in versions}
            for rep in range(args.repeats):
                order = list(versions) if rep % 2 == 0 else list(versions)[::-1]
                for version in order:
                    results = Path(tmp) / f"{version}-r{rep}"
                    walls, took = sweep(versions[version], results, rep, args.overrides)
                    sweeps[version].append(took)
                    for cell, figures in fixed_costs(results, walls).items():
                        cells[version].setdefault(re.sub(r"-r\d+", "", cell), []).append(figures)
                    print(f"repeat {rep} {version}: {len(walls)} cells in {took:.0f} s", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    report(cells, sweeps, args.baseline)
    if args.out:
        args.out.write_text(json.dumps({"baseline": args.baseline, "cells": cells, "sweeps": sweeps}, indent=1))


def whole(versions: dict[str, Path], tmp: Path, baseline: str, extra: list[str], out: Path | None) -> None:
    """Each version's whole main job, one after the other: its wall time, cells run, and the
    per-cell wall time of its first and last tenth (does a cell get slower as the sweep goes on?)."""
    figures = {}
    for version, checkout in versions.items():
        walls, took = sweep(checkout, tmp / f"{version}-whole", None, extra)
        ordered = list(walls.values())
        tenth = max(1, len(ordered) // 10)
        figures[version] = {"sweep_s": took, "runs": len(walls), "cell_s_first_tenth": statistics.median(ordered[:tenth]),
                            "cell_s_last_tenth": statistics.median(ordered[-tenth:]), "walls": walls}
        print(f"{version}: {len(walls)} runs in {took:.0f} s", file=sys.stderr, flush=True)
    print(f"| main job | runs | wall (min:s) | median cell, first tenth (s) | median cell, last tenth (s) |")
    print("|---|---:|---:|---:|---:|")
    for version, f in figures.items():
        name = baseline if version == "baseline" else "this checkout"
        print(f"| {name} | {f['runs']} | {int(f['sweep_s'] // 60)}:{f['sweep_s'] % 60:04.1f} | "
              f"{f['cell_s_first_tenth']:.1f} | {f['cell_s_last_tenth']:.1f} |")
    if out:
        out.write_text(json.dumps({"baseline": baseline, "whole": figures}, indent=1))


def report(cells: dict, sweeps: dict, baseline: str) -> None:
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    print(f"| cell | wall {baseline} (s) | wall this (s) | fixed {baseline} (s) | fixed this (s) | fixed this/{baseline} |")
    print("|---|---:|---:|---:|---:|---:|")
    totals = {v: {"wall": 0.0, "fixed": 0.0} for v in cells}
    for cell in sorted(cells["baseline"]):
        if cell not in cells["this"]:
            continue
        a, b = cells["baseline"][cell], cells["this"][cell]
        for v, rows in (("baseline", a), ("this", b)):
            totals[v]["wall"] += med(rows, "wall")
            totals[v]["fixed"] += med(rows, "fixed")
        print(f"| {cell} | {med(a, 'wall'):.1f} | {med(b, 'wall'):.1f} | {med(a, 'fixed'):.1f} | {med(b, 'fixed'):.1f} "
              f"| {med(b, 'fixed') / med(a, 'fixed'):.2f} |")
    n = len([c for c in cells["baseline"] if c in cells["this"]])
    a, b = totals["baseline"], totals["this"]
    print(f"| **all {n} cells** | {a['wall']:.1f} | {b['wall']:.1f} | {a['fixed']:.1f} | {b['fixed']:.1f} "
          f"| **{b['fixed'] / a['fixed']:.2f}** |")
    print(f"\nsweep of one repeat (median): {baseline} {statistics.median(sweeps['baseline']):.0f} s, "
          f"this {statistics.median(sweeps['this']):.0f} s")


if __name__ == "__main__":
    main()
