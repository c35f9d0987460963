"""The hand-written reference for ``backend.fast=graph``: the MLP's whole training step (batch
gather from GPU-resident MNIST, forward, loss, backward, Adam) captured as one CUDA graph and
replayed, with nothing else around it. It shares only the network with the project, so it bounds
what the project's graphed loop could reach on this GPU.

    python bench/graphed_loop.py --epochs 2 --batch 64 [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from scaling import data
from scaling.workloads import torch_models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=20, help="steps excluded from the timing, as in the protocol")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("graphed_loop: needs a CUDA device")
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    ds = data.load("mnist")
    x = torch.from_numpy(np.array(ds.train_x)).to(dev, torch.float32).div_(255)
    y = torch.from_numpy(np.array(ds.train_y)).to(dev, torch.int64)
    tx = torch.from_numpy(np.array(ds.test_x)).to(dev, torch.float32).div_(255)
    ty = torch.from_numpy(np.array(ds.test_y)).to(dev, torch.int64)
    model = torch_models.build("mlp", 10).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    b, steps = args.batch, x.shape[0] // args.batch
    idx = torch.zeros(b, dtype=torch.int64, device=dev)

    def step() -> torch.Tensor:
        loss = F.nll_loss(model(x.index_select(0, idx)), y.index_select(0, idx))
        loss.backward()
        opt.step()
        return loss

    perm = torch.randperm(x.shape[0], device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: allocator and Adam state, off the capture stream
        for i in range(3):
            idx.copy_(perm[i * b:(i + 1) * b])
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    done, timed, t0 = 3, 0, None
    start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(x.shape[0], device=dev)
        for i in range(3 if epoch == 0 else 0, steps):
            idx.copy_(perm[i * b:(i + 1) * b])
            graph.replay()
            done += 1
            if done == args.warmup:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            elif done > args.warmup:
                timed += 1
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = float((model(tx).argmax(1) == ty).float().mean())
    out = {"samples_per_s": timed * b / wall, "timed_steps": timed, "step_time_s": wall / timed,
           "final_test_accuracy": acc, "final_loss": float(static_loss), "total_s": time.perf_counter() - start,
           "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
