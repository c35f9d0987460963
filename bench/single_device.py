"""Textbook loop vs tuned single-device loop, per framework, on this machine.

Runs `scaling run` for each (backend, repeat) as child processes of this one, one at a time,
repeats interleaved so drift hits every backend alike, and prints the median samples/s and the
tuned/textbook ratio per framework. Run it on an otherwise idle machine:

    python bench/single_device.py                       # MLP, 1 epoch, 3 repeats
    python bench/single_device.py --workload cnn --max-steps 200 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from scaling.config import frameworks

#: framework -> (its textbook loop, its tuned loop), the single-device backends of each framework
PAIRS = {fw: (f"{fw}_textbook", fw) for fw in sorted(set(frameworks().values()))}


def run(backend: str, args: argparse.Namespace, results: Path, rep: int) -> dict:
    overrides = [f"backend={backend}", f"workload={args.workload}", f"train.epochs={args.epochs}",
                 f"results_dir={results}", "progress=false", "logger=none", f"run_name={backend}-{rep}",
                 f"device={args.device}"]
    if args.max_steps:
        overrides.append(f"train.max_steps_per_epoch={args.max_steps}")
    proc = subprocess.run([sys.executable, "-m", "scaling", "run", *overrides], capture_output=True, text=True)
    record = json.loads((results / "runs" / f"{backend}-{rep}.json").read_text())
    if proc.returncode != 0 or record["status"] != "ok":
        raise SystemExit(f"{backend} failed:\n{proc.stderr[-2000:]}")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="mlp")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--frameworks", default="torch,tf")
    args = ap.parse_args()
    frameworks = args.frameworks.split(",")
    throughput: dict[str, list[float]] = {}
    env = None
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for fw in frameworks:
                for backend in PAIRS[fw]:
                    rec = run(backend, args, Path(tmp), rep)
                    env = env or rec["environment"]
                    sps = rec["metrics"]["samples_per_s"]
                    throughput.setdefault(backend, []).append(sps)
                    print(f"repeat {rep + 1}: {backend:15s} {sps:12,.0f} samples/s", file=sys.stderr, flush=True)
    print(f"\n{args.workload}, batch 64, {args.epochs} epoch(s){f', {args.max_steps} steps/epoch' if args.max_steps else ''}, "
          f"{args.repeats} repeats, on {env['cpu_model']} ({env['cpu_count']} CPUs), device={env.get('device')}")
    print(f"{'framework':10s} {'textbook samples/s':>20s} {'tuned samples/s':>18s} {'tuned/textbook':>15s}")
    for fw in frameworks:
        textbook, tuned = (statistics.median(throughput[b]) for b in PAIRS[fw])
        print(f"{fw:10s} {textbook:20,.0f} {tuned:18,.0f} {tuned / textbook:14.2f}x")


if __name__ == "__main__":
    main()
