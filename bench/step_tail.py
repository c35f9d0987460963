"""Where the reference loop's N=2 step loses time beyond compute + transfer, on CPU.

Two processes over gloo run the reference loop's step on the MLP (batch 64 per rank, one
thread each): forward, backward, Adam on gradients that are views of one flat buffer, and one
``all_reduce`` of that buffer. Three modes, each on both ranks at once:

- ``compute``: the step without the all-reduce (both cores busy, no communication);
- ``comm``: the all-reduce alone, back to back (the micro-benchmark's view);
- ``both``: the reference loop's step.

Per step and rank it keeps the time in compute, the time in the all-reduce, and the involuntary
context switches of the rank's main thread (``getrusage(RUSAGE_THREAD)``: another thread or
process took its core). It prints, per mode and placement, the median, mean and p95 of each
part, the stall (mean minus median: a few slow steps, which in lockstep cost every rank), and how
many of the slow steps (over twice the median) had an involuntary switch on a rank. Run on an
otherwise idle machine:

    python bench/step_tail.py                       # placements core, compute, none; 2000 steps
    python bench/step_tail.py --placements core --steps 4000 --json tail.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from scaling.workloads import torch_models

MODES = ("compute", "comm", "both")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pin(placement: str, rank: int, when: str) -> None:
    """``core``: the whole process (set before the process group, so gloo's threads inherit it);
    ``compute``: only the main thread, after the group exists; ``none``: nothing."""
    cores = sorted(os.sched_getaffinity(0))
    core = {cores[rank % len(cores)]}
    if placement == "core" and when == "before":
        os.sched_setaffinity(0, core)
    elif placement == "compute" and when == "after":
        os.sched_setaffinity(threading.get_native_id(), core)


def _nivcsw() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw


def worker(rank: int, world: int, port: int, args: argparse.Namespace, placement: str, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _pin(placement, rank, "before")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _pin(placement, rank, "after")
    torch.manual_seed(0)
    model = torch_models.build("mlp", 10)
    params = [p for p in model.parameters()]
    flat = torch.zeros(sum(p.numel() for p in params))
    off = 0
    for p in params:
        p.grad = flat[off:off + p.numel()].view_as(p)
        off += p.numel()
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    data_x = torch.rand(4096, 28, 28, generator=gen)
    data_y = torch.randint(0, 10, (4096,), generator=gen)
    out = {}
    for mode in MODES:
        rows = []
        for i in range(args.warmup + args.steps):
            j = (i * args.batch) % (4096 - args.batch)
            dist.barrier() if i == 0 else None
            c0 = _nivcsw()
            t0 = time.perf_counter()
            if mode != "comm":
                flat.zero_()
                loss = F.nll_loss(model(data_x[j:j + args.batch]), data_y[j:j + args.batch])
                loss.backward()
            t1 = time.perf_counter()
            if mode != "compute":
                dist.all_reduce(flat)
                flat.div_(world)
            t2 = time.perf_counter()
            if mode != "comm":
                opt.step()
            t3 = time.perf_counter()
            if i >= args.warmup:
                rows.append((t3 - t0, (t1 - t0) + (t3 - t2), t2 - t1, _nivcsw() - c0))
        out[mode] = rows
    queue.put((rank, out))
    dist.destroy_process_group()


def summarize(per_rank: dict[int, dict], placement: str) -> list[dict]:
    lines = []
    for mode in MODES:
        ranks = [np.array(per_rank[r][mode]) for r in sorted(per_rank)]
        # a lockstep step lasts as long as its slowest rank's (mode compute has no lockstep: its
        # own stall per rank, rank_stall_ms, is the figure to read)
        step = np.max([r[:, 0] for r in ranks], axis=0)
        compute = np.median([r[:, 1] for r in ranks], axis=0)
        coll = np.median([r[:, 2] for r in ranks], axis=0)
        switched = np.max([r[:, 3] for r in ranks], axis=0) > 0
        p50 = float(np.median(step))
        slow = step > 2 * p50
        own = [float(r[:, 0].mean() - np.median(r[:, 0])) for r in ranks]
        lines.append({
            "placement": placement, "mode": mode, "steps": int(step.size),
            "step_p50_ms": p50 * 1e3, "step_mean_ms": float(step.mean()) * 1e3,
            "step_p95_ms": float(np.percentile(step, 95)) * 1e3,
            "stall_ms": (float(step.mean()) - p50) * 1e3,
            "rank_stall_ms": statistics.mean(own) * 1e3,
            "compute_p50_ms": float(np.median(compute)) * 1e3, "compute_mean_ms": float(compute.mean()) * 1e3,
            "allreduce_p50_ms": float(np.median(coll)) * 1e3, "allreduce_mean_ms": float(coll.mean()) * 1e3,
            "slow_steps": int(slow.sum()),
            "slow_with_switch": int((slow & switched).sum()),
            "steps_with_switch": int(switched.sum()),
        })
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--placements", default="core,compute,none")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    lines = []
    for placement in args.placements.split(","):
        queue = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=worker, args=(r, 2, port, args, placement, queue)) for r in range(2)]
        for p in procs:
            p.start()
        per_rank = dict(queue.get() for _ in procs)
        for p in procs:
            p.join()
        lines += summarize(per_rank, placement)
    cols = ["placement", "mode", "step_p50_ms", "step_mean_ms", "step_p95_ms", "stall_ms", "rank_stall_ms", "compute_p50_ms",
            "compute_mean_ms", "allreduce_p50_ms", "allreduce_mean_ms", "slow_steps", "slow_with_switch",
            "steps_with_switch"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for line in lines:
        print("| " + " | ".join(f"{line[c]:.2f}" if isinstance(line[c], float) else str(line[c]) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(lines, fh, indent=1)


if __name__ == "__main__":
    main()
