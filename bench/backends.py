"""Every backend on this machine: its N=1 overhead against the plain single-device loop of its
framework, and N=1 vs N=2 workers.

Each (backend, devices, repeat) is a `scaling run` child process, one at a time, repeats
interleaved so machine drift hits every backend alike; medians are printed as Markdown tables
(the ones in BENCHMARKS.md). Run it on an otherwise idle machine:

    python bench/backends.py                    # MLP, 1 epoch, 3 repeats, N=1 and N=2
    python bench/backends.py --workload cnn --max-steps 150 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from scaling import metrics
from scaling.config import frameworks

#: each framework's plain single-device loop (its backend is named after the framework)
BASELINE = {fw: fw for fw in sorted(set(frameworks().values()))}
#: the distributed backends measured by default, and each one's framework (from its YAML)
BACKENDS = {b: frameworks()[b] for b in ("torch_ddp", "lightning_ddp", "horovod_torch",
                                         "tf_mirrored", "tf_multiworker", "horovod_tf")}


def run(backend: str, devices: int, rep: int, args: argparse.Namespace, results: Path) -> dict:
    name = f"{backend}-n{devices}-r{rep}"
    overrides = [f"backend={backend}", f"devices={devices}", f"workload={args.workload}",
                 f"train.epochs={args.epochs}", f"results_dir={results}", "progress=false", "logger=none", f"run_name={name}"]
    if args.max_steps:
        overrides.append(f"train.max_steps_per_epoch={args.max_steps}")
    proc = subprocess.run([sys.executable, "-m", "scaling", "run", *overrides], capture_output=True, text=True)
    path = results / "runs" / f"{name}.json"
    record = json.loads(path.read_text()) if path.exists() else None
    if proc.returncode != 0 or not record or record["status"] != "ok":
        raise SystemExit(f"{name} failed:\n{(record or {}).get('error') or proc.stderr[-2000:]}")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="mlp")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    args = ap.parse_args()
    backends = args.backends.split(",")
    cells = [(b, 1) for b in BASELINE] + [(b, n) for b in backends for n in (1, 2)]
    recs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for backend, n in cells:
                rec = run(backend, n, rep, args, Path(tmp))
                recs.append(rec)
                print(f"repeat {rep + 1}: {backend:15s} N={n} {rec['metrics']['samples_per_s']:12,.0f} samples/s",
                      file=sys.stderr, flush=True)
    summary = summarize(recs)
    cpu = rec["environment"]["cpu_model"]
    print(f"\n{args.workload}, per-device batch 64, {args.epochs} epoch(s)"
          f"{f', {args.max_steps} steps/epoch' if args.max_steps else ''}, median of {args.repeats} interleaved repeats; "
          f"{cpu}, {rec['environment']['cpu_count']} CPUs, {platform.python_version()}\n")
    print("| backend | N=1 samples/s | vs plain loop at N=1 | N=2 samples/s | speedup N=2/N=1 |")
    print("|---|---|---|---|---|")
    for fw, base in BASELINE.items():
        b1 = summary[(base, 1)]
        print(f"| {base} (plain single-device loop) | {b1['median']:,.0f} ({b1['min']:,.0f}-{b1['max']:,.0f}) | 1.00 | - | - |")
    for b in backends:
        one, two, base = summary[(b, 1)], summary[(b, 2)], summary[(BASELINE[frameworks()[b]], 1)]
        print(f"| {b} | {one['median']:,.0f} ({one['min']:,.0f}-{one['max']:,.0f}) | {one['median'] / base['median']:.2f} "
              f"| {two['median']:,.0f} ({two['min']:,.0f}-{two['max']:,.0f}) | {two['speedup']:.2f} |")


def summarize(records: list[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (backend, N): median, min and max samples/s of the ok records and the speedup over the
    backend's N = 1 median (``scaling.metrics``, as the aggregate, the dashboard and W&B)."""
    sps: dict[str, dict[int, list[float]]] = {}
    for rec in records:
        if rec["status"] == "ok":
            cfg = rec["config"]
            n = int(cfg["devices"]) * int(cfg["cluster"]["nodes"])
            sps.setdefault(cfg["backend"]["name"], {}).setdefault(n, []).append(rec["metrics"]["samples_per_s"])
    out = {}
    for backend, by_n in sps.items():
        speedups = metrics.cell_speedups(by_n)
        for n, values in by_n.items():
            out[(backend, n)] = {"median": metrics.median(values), "min": min(values), "max": max(values),
                                 "speedup": speedups[n]}
    return out


if __name__ == "__main__":
    main()
