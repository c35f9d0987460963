"""Defaults vs tuned per backend, from one sweep that ran both variants side by side (the main job
does): each backend's N=1 cost over its framework's plain loop, its N=2 throughput against the
reference loop over its collective library, and where its N=2 step goes (``scaling.decomposition``).

    scaling sweep experiment=local_cpu && scaling comm
    python bench/variants.py results --sweep local_cpu      # Markdown tables, as in BENCHMARKS.md

A sweep with other overrides beside the variants (``experiment=tuning``'s placements) gets one set
of tables per study.
"""
from __future__ import annotations

import argparse
import math

from scaling import analysis, decomposition
from scaling.comm_model import REFERENCE_OF, placement_of


def _fmt(x: float, spec: str = ",.0f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results_dir")
    ap.add_argument("--sweep", default="local_cpu")
    args = ap.parse_args()
    loaded = analysis.load(args.results_dir)
    cells = analysis.tidy(loaded.records, loaded.paths)
    cells = cells[cells["sweep"] == args.sweep]
    studies = sorted(set(cells["overrides"]))
    for overrides in studies:  # e.g. one per placement in experiment=tuning
        mine = cells[cells["overrides"] == overrides]
        if len(studies) > 1:
            placements = sorted({placement_of(c) for c in mine["conditions"]})
            print(f"\n### placement={', '.join(placements)} (overrides {overrides or 'none'})\n")
        tables(args.results_dir, loaded, mine)


def tables(results_dir: str, loaded: analysis.Loaded, cells) -> None:
    agg = analysis.untuned_in_every_variant(analysis.aggregate(cells))  # no tuned settings: defaults stand
    where = decomposition.for_results(results_dir, loaded, cells)

    def thr(backend: str, n: int, variant: str) -> float:
        row = agg[(agg["backend"] == backend) & (agg["N"] == n) & (agg["variant"] == variant)]
        return float(row["throughput"].iloc[0]) if len(row) else math.nan

    plain = {"torch": thr("torch", 1, "defaults"), "tf": thr("tf", 1, "defaults")}
    tunable = agg[agg["tunable"] & (agg["N"] == 2)]
    print("| backend | N=1 defaults | N=1 tuned | tuned N=1 / plain loop | N=2 defaults | N=2 tuned "
          "| reference loop N=2 | tuned N=2 / reference |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for backend in sorted(set(tunable["backend"])):
        fw = str(agg[agg["backend"] == backend]["framework"].iloc[0])
        ref = REFERENCE_OF.get(backend)
        ref_thr = thr(ref, 2, "tuned") if ref else math.nan
        t1, t2 = thr(backend, 1, "tuned"), thr(backend, 2, "tuned")
        print(f"| {backend} | {_fmt(thr(backend, 1, 'defaults'))} | {_fmt(t1)} | {_fmt(t1 / plain.get(fw, math.nan), '.2f')} "
              f"| {_fmt(thr(backend, 2, 'defaults'))} | {_fmt(t2)} | {ref or 'none'} {_fmt(ref_thr)} "
              f"| {_fmt(t2 / ref_thr, '.2f')} |")
    # stalls: a step's mean over its median, median over repeats; a few slow steps cost every rank
    # of a lockstep loop, so they show in the mean (samples/s) and not in the median
    stall = (cells.assign(stall=cells["step_time_mean_s"] - cells["step_time_p50_s"])
             .groupby(["backend", "variant", "N"])[["stall", "step_time_p50_s"]].median())
    print("\nWhere the N=2 step goes (ms; compute = the same backend's N=1 step; median step and stalls "
          "from the per-step times: the step's median, and its mean less its median):\n")
    print("| backend | variant | step | compute | transfer | waiting | overhead | median step | stalls "
          "| ideal floor | reference floor |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = where[where["N"] == 2].sort_values(["backend", "variant"]) if not where.empty else where
    for _, r in rows.iterrows():
        ms = lambda k: _fmt(r[k] * 1e3, ".2f")  # noqa: E731
        key = (r["backend"], r["variant"], int(r["N"]))
        p50, stalls = ((_fmt(stall.loc[key, c] * 1e3, ".2f") for c in ("step_time_p50_s", "stall"))
                       if key in stall.index else ("-", "-"))
        print(f"| {r['backend']} | {r['variant']} | {ms('step_s')} | {ms('compute_s')} | {ms('transfer_s')} "
              f"| {ms('waiting_s')} | {ms('overhead_s')} | {p50} | {stalls} | {ms('ideal_floor_s')} "
              f"| {ms('reference_floor_s')} |")

if __name__ == "__main__":
    main()
