"""Where a CPU worker's threads run (``placement``), the same rule at every N, N=1 included.

- ``core``: each process is pinned, every thread of it, to its own block of cores: ``threads``
  cores per device it holds (one core per rank with the default ``threads=1``; all the node's
  cores split evenly when ``threads`` is null). With more processes than that allows, processes
  share cores round-robin.
- ``compute``: the same block, but only for the compute threads (the main thread, where PyTorch
  runs its one intra-op thread, and TensorFlow's compute pools); every other thread (gloo's and
  Horovod's communication threads, gRPC's, W&B's) may run on any core of the node. Threads that
  start later are released again when the warm-up ends.
- ``none``: nothing pinned; the operating system places every thread.

GPU workers are never pinned (their threads feed the GPU). Linux only; elsewhere nothing is pinned.
"""
from __future__ import annotations

import os
import threading

from scaling.geometry import cpu_share, on_gpu
from scaling.protocol import Observer

PLACEMENTS = ("core", "compute", "none")
#: thread-name prefixes (as /proc shows them, 15 characters) of threads that compute
COMPUTE_THREADS = ("tf_Compute", "tf_inter_op", "tf_graph_runner")


def mode(cfg: dict) -> str:
    if cfg.get("pin_cpus") is False:  # the older switch for `none`
        return "none"
    value = cfg.get("placement") or "core"
    if value not in PLACEMENTS:
        raise ValueError(f"placement={value!r}: must be one of {', '.join(PLACEMENTS)}")
    return value


def block(cfg: dict, local_rank: int, local_world: int, cores: list[int]) -> list[int]:
    """The cores process ``local_rank`` of ``local_world`` on this node gets."""
    # the devices this process drives: all of them when it is alone on the node (one process holding
    # them, or a Slurm task per node), one each when every device has its own process
    per_process = max(1, int(cfg["devices"]) // max(1, local_world))
    threads = cfg.get("threads")
    if threads and int(threads) * per_process * local_world <= len(cores):
        per = int(threads) * per_process
        return cores[local_rank * per:(local_rank + 1) * per]
    return cpu_share(local_rank, local_world, cores)  # an even split, or round-robin when too few


def _tasks() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []


def _name(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _set(tid: int, cores: list[int]) -> bool:
    try:
        os.sched_setaffinity(tid, cores)
        return True
    except OSError:  # the thread ended meanwhile
        return False


class Placement(Observer):
    """This process's placement: applied at start (``apply``), settled again once the framework
    has started its threads (``settle``: after set-up, and when the warm-up ends)."""

    def __init__(self, cfg: dict, local_rank: int, local_world: int, warmup_steps: int = 0) -> None:
        self.mode = mode(cfg)
        self.node = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.skipped = "GPU worker" if on_gpu(cfg) else ("not Linux" if not self.node else None)
        self.cores = None if self.skipped or self.mode == "none" else block(cfg, local_rank, local_world, self.node)
        self.main = threading.main_thread().native_id
        self.warmup_steps, self._steps, self._settled_after_warmup = warmup_steps, 0, False
        self.pinned: set[int] = set()
        self.free: set[int] = set()

    def apply(self) -> list[int] | None:
        """Pin as the mode says; returns the process's cores (None: nothing pinned)."""
        if self.cores is None:
            return None
        self.settle()
        return self.cores

    def settle(self) -> None:
        if self.cores is None:
            return
        for tid in _tasks():
            compute = self.mode == "core" or tid == self.main or _name(tid).startswith(COMPUTE_THREADS)
            if _set(tid, self.cores if compute else self.node):
                (self.pinned if compute else self.free).add(tid)
                (self.free if compute else self.pinned).discard(tid)

    def advance(self, steps: int) -> None:
        self._steps += steps
        if not self._settled_after_warmup and self._steps >= self.warmup_steps:
            self._settled_after_warmup = True
            self.settle()

    def describe(self) -> dict:
        """What the record lists: the mode, this process's cores, and its threads by placement."""
        alive = set(_tasks())
        return {"mode": self.mode, "cores": self.cores, "node_cores": self.node, "skipped": self.skipped,
                "threads_pinned": len(self.pinned & alive), "threads_free": len(self.free & alive)}
