"""What runs are called: a sweep cell's stable id and a lone run's default id.

Read by the sweep, the Slurm renderer, the local launcher and the worker alike, so it sits below
all of them and imports none of them.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import time

#: overrides that name the cell in its id, in this order
NAMED = ("backend", "workload", "data", "scaling", "devices", "cluster.nodes", "repeat", "variant")
#: overrides that say where or how a sweep runs, not what a cell measures
BOOKKEEPING = {"experiment", "sweep_id", "results_dir", "progress", "cluster", "logger", "hydra.mode"}


def cell_id(cfg: dict, task_overrides: list[str]) -> str:
    """A readable, stable id: the named axes, plus a short hash of any other override."""
    base = ("comm-" if cfg.get("comm") else "") + (f"{cfg['backend']['name']}-{cfg['workload']['name']}-{cfg['data']['name']}-{cfg.get('scaling', 'weak')}"
            f"-n{cfg['devices']}x{cfg['cluster']['nodes']}-r{cfg.get('repeat', 0)}")
    if (cfg.get("variant") or "defaults") != "defaults":
        base += f"-{cfg['variant']}"
    extra = sorted(o.lstrip("+~") for o in task_overrides if not _bookkeeping(o.lstrip("+~").split("=", 1)[0]))
    if extra:
        base += "-" + hashlib.sha1("\n".join(extra).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", base)


def _bookkeeping(key: str) -> bool:
    """Keys that name the cell already, or say where and how it runs rather than what it measures."""
    if key in NAMED or key in BOOKKEEPING or key.startswith(("hydra.", "logger.")):
        return True
    return key.startswith("cluster.")  # partition, account, time...: where, not what (nodes is NAMED)


def default_run_id(cfg: dict, devices: int) -> str:
    """The id of a run started without ``run_name``: what ran, when, and where (host and process)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (f"{cfg['backend']['name']}_{cfg['workload']['name']}_{cfg['data']['name']}"
            f"_n{devices}_{stamp}_{socket.gethostname()}-{os.getpid()}")
