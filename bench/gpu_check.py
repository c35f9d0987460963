"""The GPU check: every torch backend and fast mode on this node's first GPU, one table.

Runs, each a `scaling run` child (MLP, per-device batch 64, real MNIST, records under OUT/results):
the textbook loop, the tuned loop, torch.compile and the whole-step CUDA graph, each also with the
host waiting only every K steps (the protocol's own cost); the hand-written graphed loop
(bench/graphed_loop.py) as the reference; torch_ddp, lightning_ddp (and horovod_torch when Horovod
is built for GPUs) at N=1 over NCCL; torch_ddp and lightning_ddp with 2 and 4 ranks sharing the GPU
over gloo (NCCL refuses two ranks on one GPU); and the tuned loop on the CPU, for the accuracy.

    python bench/gpu_check.py [--out results/gpu_check] [--epochs 2] [--sync-every 100] [--only a,b]

bench/gpu_check.sh is the way in on a GPU node (requirements, offline bundle, what it installs).
Writes, under OUT only: gpu_check.md (the table and the PASS/FAIL checks, also printed), a log per
run (<run>.log), the runs' records (results/runs/<run>.json) and the reference loop's figures
(graphed_loop.json). Exit status 1 if a run, or the reference loop, failed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def runs(k: int, horovod: bool) -> list[tuple[str, list[str]]]:
    table = [
        ("cpu_tuned", ["backend=torch", "device=cpu"]),
        ("textbook", ["backend=torch_textbook"]),
        ("tuned", ["backend=torch"]),
        (f"tuned_sync{k}", ["backend=torch", f"protocol.sync_every={k}"]),
        ("compile", ["backend=torch", "backend.fast=compile"]),
        ("graph", ["backend=torch", "backend.fast=graph"]),
        (f"graph_sync{k}", ["backend=torch", "backend.fast=graph", f"protocol.sync_every={k}"]),
        ("ddp_n1", ["backend=torch_ddp", "devices=1"]),
        ("ddp_n1_graph", ["backend=torch_ddp", "devices=1", "backend.fast=graph"]),
        ("lightning_n1", ["backend=lightning_ddp", "devices=1"]),
        ("ddp_n2_gloo", ["backend=torch_ddp", "devices=2", "backend.process_group=gloo"]),
        ("ddp_n4_gloo", ["backend=torch_ddp", "devices=4", "backend.process_group=gloo"]),
        ("lightning_n2_gloo", ["backend=lightning_ddp", "devices=2", "backend.process_group=gloo"]),
        ("lightning_n4_gloo", ["backend=lightning_ddp", "devices=4", "backend.process_group=gloo"]),
    ]
    if horovod:
        table.append(("horovod_n1", ["backend=horovod_torch", "devices=1"]))
    return table


def horovod_on_gpu() -> bool:
    probe = "import horovod.torch as h; raise SystemExit(0 if h.nccl_built() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def scaling_run(name: str, overrides: list[str], out: Path, epochs: int) -> dict:
    device = [] if any(o.startswith("device=") for o in overrides) else ["device=cuda"]
    cmd = [sys.executable, "-m", "scaling", "run", f"results_dir={out / 'results'}", f"run_name={name}",
           "progress=false", "logger=none", f"train.epochs={epochs}", *device, *overrides]
    t0 = time.time()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    path = out / "results" / "runs" / f"{name}.json"
    record = json.loads(path.read_text()) if path.exists() else {"status": "no record", "metrics": None,
                                                                 "error": f"exit {proc.returncode}, see {name}.log"}
    print(f"[gpu_check] {name:18s} {record['status']:9s} {time.time() - t0:6.1f}s", file=sys.stderr, flush=True)
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/gpu_check")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sync-every", type=int, default=100)
    ap.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    k = args.sync_every
    wanted = set(args.only.split(",")) if args.only else None
    recs: dict[str, dict] = {}
    for name, overrides in runs(k, horovod_on_gpu()):
        if wanted is None or name in wanted:
            recs[name] = scaling_run(name, overrides, out, args.epochs)
    ref_path = out / "graphed_loop.json"
    ref = subprocess.run([sys.executable, str(ROOT / "bench" / "graphed_loop.py"), "--epochs", str(args.epochs),
                          "--json", str(ref_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    reference = json.loads(ref_path.read_text()) if ref.returncode == 0 else None

    def sps(name: str) -> float | None:
        m = (recs.get(name) or {}).get("metrics") or {}
        return m.get("samples_per_s")

    lines = ["| run | status | samples/s | step p50 (us) | accuracy | fast mode ran | error |", "|---|---|---|---|---|---|---|"]
    for name, r in recs.items():
        m = r.get("metrics") or {}
        fast = m.get("fast_mode") or {}
        p50 = (m.get("step_time_s") or {}).get("p50")
        err = (r.get("error") or "").splitlines()[:1]
        lines.append(f"| {name} | {r['status']} | {_f(m.get('samples_per_s'), ',.0f')} | {_f(p50 and p50 * 1e6, '.0f')} | "
                     f"{_f(m.get('final_test_accuracy'), '.4f')} | {fast.get('ran', '-')} "
                     f"{'(' + str(fast.get('graph_replays')) + ' replays)' if fast.get('graph_replays') else ''} | "
                     f"{err[0][:120] if err else ''} |")
    if reference:
        lines.append(f"| graphed_loop (hand-written reference) | ok | {reference['samples_per_s']:,.0f} | "
                     f"{reference['step_time_s'] * 1e6:.0f} | {reference['final_test_accuracy']:.4f} | graph | |")
    else:
        lines.append(f"| graphed_loop (hand-written reference) | failed | - | - | - | - | {ref.stderr.strip()[-200:]} |")

    checks = []

    def check(label: str, value: float | None, ok) -> None:
        checks.append(f"- {'PASS' if value is not None and ok(value) else 'FAIL'}: {label}: "
                      f"{'not measured' if value is None else f'{value:,.3f}'}")

    ref_sps = reference and reference["samples_per_s"]
    check("fast=graph samples/s >= 250,000", sps("graph"), lambda v: v >= 250_000)
    check("fast=graph / hand-written graphed loop >= 0.90",
          sps("graph") / ref_sps if sps("graph") and ref_sps else None, lambda v: v >= 0.90)
    check("torch_ddp fast=graph at N=1 samples/s >= 200,000", sps("ddp_n1_graph"), lambda v: v >= 200_000)
    check("tuned / textbook >= 4", sps("tuned") / sps("textbook") if sps("tuned") and sps("textbook") else None,
          lambda v: v >= 4)
    for base in ("tuned", "graph"):
        a, b = sps(base), sps(f"{base}_sync{k}")
        check(f"protocol overhead of a sync every step ({base}: 1 - sync1/sync{k}) <= 0.02",
              1 - a / b if a and b else None, lambda v: v <= 0.02)
    cpu_acc = ((recs.get("cpu_tuned") or {}).get("metrics") or {}).get("final_test_accuracy")
    for name, r in recs.items():
        acc = (r.get("metrics") or {}).get("final_test_accuracy")
        if name != "cpu_tuned" and name != "textbook" and cpu_acc is not None:
            check(f"{name}: |accuracy - CPU tuned loop's| <= 0.005", abs(acc - cpu_acc) if acc is not None else None,
                  lambda v: v <= 0.005)
    gpu = next(((r.get("environment") or {}).get("gpu") or {} for r in recs.values()
                if (r.get("environment") or {}).get("gpu")), {})
    head = (f"GPU check: {gpu.get('model', '?')}, CUDA {gpu.get('cuda', '?')}; MLP, per-device batch 64, "
            f"{args.epochs} epoch(s) of real MNIST; `python bench/gpu_check.py --epochs {args.epochs} --sync-every {k}`")
    text = "\n".join([head, "", *lines, "", *checks, ""])
    (out / "gpu_check.md").write_text(text)
    print(text)
    return 0 if all(r["status"] == "ok" for r in recs.values()) and reference else 1


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    sys.exit(main())
