"""How a run spreads over devices: batch sizes under weak and strong scaling, the learning-rate
rule, and which CPU cores a worker gets. Plain arithmetic, no framework imports."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass


class GeometryError(ValueError):
    pass


@dataclass(frozen=True)
class Geometry:
    devices: int  # all devices of the run (nodes x devices per node)
    per_device_batch: int
    global_batch: int
    base_lr: float
    lr: float  # after the scaling rule
    lr_scaling: str
    lr_warmup_steps: int

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based): linear warm-up from base_lr to lr."""
        if step >= self.lr_warmup_steps or self.lr == self.base_lr:
            return self.lr
        return self.base_lr + (self.lr - self.base_lr) * (step + 1) / self.lr_warmup_steps


def on_gpu(cfg: dict) -> bool:
    """Whether a run's workers drive GPUs: ``device=cuda``, or ``auto`` on a machine with NVIDIA's
    driver."""
    device = cfg.get("device", "auto")
    return device == "cuda" or (device == "auto" and os.path.exists("/dev/nvidiactl"))


def plan(cfg: dict) -> Geometry:
    """The geometry a config asks for; GeometryError (with the fix) when it cannot be met."""
    devices = int(cfg.get("devices", 1)) * int(cfg.get("cluster", {}).get("nodes", 1))
    train = cfg["train"]
    mode = cfg.get("scaling", "weak")
    if mode == "weak":
        per_device = int(train["per_device_batch"])
        global_batch = per_device * devices
    elif mode == "strong":
        global_batch = int(train.get("global_batch") or train["per_device_batch"])
        if global_batch % devices:
            raise GeometryError(
                f"scaling=strong: global batch {global_batch} does not divide over {devices} devices. "
                f"Fix: choose train.global_batch as a multiple of {devices}, or another device count")
        per_device = global_batch // devices
    else:
        raise GeometryError(f"scaling={mode!r}: must be weak or strong")
    rule = train.get("lr_scaling") or "none"
    base_batch = int(train.get("lr_base_batch") or train["per_device_batch"])
    factor = {"none": 1.0, "linear": global_batch / base_batch, "sqrt": math.sqrt(global_batch / base_batch)}.get(rule)
    if factor is None:
        raise GeometryError(f"train.lr_scaling={rule!r}: must be none, linear or sqrt")
    base_lr = float(train["lr"])
    return Geometry(devices=devices, per_device_batch=per_device, global_batch=global_batch,
                    base_lr=base_lr, lr=base_lr * factor, lr_scaling=rule,
                    lr_warmup_steps=int(train.get("lr_warmup_steps") or 0))


def cpu_share(local_rank: int, local_world: int, cores: list[int] | None = None) -> list[int]:
    """The cores worker ``local_rank`` of ``local_world`` on this node is pinned to.

    Cores are split into equal contiguous blocks; with more workers than cores, workers share
    cores round-robin (each still gets one).
    """
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if local_world <= len(cores):
        per = len(cores) // local_world
        return cores[local_rank * per:(local_rank + 1) * per]
    return [cores[local_rank % len(cores)]]
