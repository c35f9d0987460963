"""Every way the study starts a run's workers, in one table.

A backend names its launcher in ``conf/backend/<name>.yaml`` (``launcher: torchrun``); everything
that depends on that name reads the launcher's entry here and nowhere else:

- ``launch/local.py`` starts ``local(devices, worker)`` on this machine;
- ``scaling run`` runs an ``in_process`` backend in its own process (no launcher at all);
- ``scaling/slurm.py`` sizes the allocation (``tasks_per_node``, ``devices_per_task``) for rendered
  scripts, the submitit resolvers and the sweep's geometry check, and writes ``batch_setup`` (a
  server the launcher would have run) and ``srun_note`` into the batch script before srun;
- ``launch/slurm_env.py`` gives each srun task the ``rendezvous`` the launcher would have given it.

Adding a launcher is one :func:`register` call: nothing else names launchers.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from typing import Callable

from scaling.launch import horovod_slurm
from scaling.config import ConfigError
from scaling.config import launcher as launcher_name

#: the processes to start for one run: (argv, extra environment) each
Commands = list[tuple[list[str], dict[str, str]]]


@dataclass(frozen=True)
class Launcher:
    name: str
    #: under Slurm: one task per device (srun starts every rank), or one task holding the node's devices
    task_per_device: bool
    #: the processes to start on this machine for ``devices`` workers; ``worker`` is the python
    #: arguments of one worker (``-m scaling.worker --config PATH``)
    local: Callable[[int, list[str]], Commands]
    #: how srun-started tasks find each other: a key of ``scaling.launch.slurm_env.RENDEZVOUS``; None: one task
    rendezvous: str | None = None
    #: ``scaling run`` runs the backend in its own process (a sweep still starts each cell afresh)
    in_process: bool = False
    #: batch-script lines before srun, from (a shell-quoted path prefix for the job's files, tasks per node)
    batch_setup: Callable[[str, int], list[str]] | None = None
    #: the batch script's comment on how srun starts the tasks
    srun_note: str = ""

    def tasks_per_node(self, devices: int) -> int:
        """Slurm tasks on each node for a cell of ``devices`` devices per node."""
        return int(devices) if self.task_per_device else 1

    def devices_per_task(self, devices: int) -> int:
        """Devices one Slurm task drives (its share of CPUs is sized by it)."""
        return int(devices) // self.tasks_per_node(devices)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(devices: int, worker: list[str]) -> Commands:
    """One worker process, holding every device of the run."""
    return [([sys.executable, *worker], {})]


#: set to 1: start torch and Horovod ranks through the torchrun and horovodrun programs themselves
FRAMEWORK_PROGRAMS = "SCALING_FRAMEWORK_LAUNCHERS"


def _programs() -> bool:
    return os.environ.get(FRAMEWORK_PROGRAMS, "") not in ("", "0")


def torchrun(devices: int, worker: list[str]) -> Commands:
    """torch.distributed's ranks, each with the variables ``torchrun --standalone`` gives it (env://
    at a free local port; ``OMP_NUM_THREADS=1`` with several ranks unless set, as torchrun does).
    torchrun itself imports torch before it starts a rank, about 1.5 s of every cell, and its agent
    adds as much again on the way out; with ``SCALING_FRAMEWORK_LAUNCHERS=1`` it starts them."""
    if _programs():
        return [([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
                  "--max-restarts=0", *worker], {})]
    port = str(free_port())
    threads = {} if devices == 1 or "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": "1"}
    return [([sys.executable, *worker], {
        "RANK": str(i), "WORLD_SIZE": str(devices), "LOCAL_RANK": str(i), "LOCAL_WORLD_SIZE": str(devices),
        "GROUP_RANK": "0", "ROLE_RANK": str(i), "ROLE_WORLD_SIZE": str(devices),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **threads,
    }) for i in range(devices)]


def horovodrun(devices: int, worker: list[str]) -> Commands:
    """Horovod's gloo ranks as ``horovodrun --gloo -np N -H localhost:N`` starts them, through
    Horovod's own rendezvous server (``horovod_gloo``), without horovodrun's check of the build,
    which imports TensorFlow in a subprocess (about 3 s of every cell); with
    ``SCALING_FRAMEWORK_LAUNCHERS=1`` horovodrun starts them."""
    if _programs():
        exe = shutil.which("horovodrun") or "horovodrun"
        return [([exe, "--gloo", "-np", str(devices), "-H", f"localhost:{devices}", sys.executable, *worker], {})]
    return [([sys.executable, "-m", "scaling.launch.horovod_gloo", "-np", str(devices), "--", sys.executable, *worker], {})]


def tf_config(devices: int, worker: list[str]) -> Commands:
    """One process per worker, each with its ``TF_CONFIG`` (and the rank variables our worker reads)."""
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(devices)]}
    return [([sys.executable, *worker], {
        "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
        "RANK": str(i), "WORLD_SIZE": str(devices), "LOCAL_RANK": str(i), "LOCAL_WORLD_SIZE": str(devices),
    }) for i in range(devices)]


LAUNCHERS: dict[str, Launcher] = {}


def register(launcher: Launcher) -> Launcher:
    """Add (or replace) a launcher in the table."""
    LAUNCHERS[launcher.name] = launcher
    return launcher


def get(name: str) -> Launcher:
    try:
        return LAUNCHERS[name]
    except KeyError:
        raise ConfigError(f"backend.runs_on.launcher={name!r}: unknown. Fix: one of {', '.join(LAUNCHERS)} "
                          "(or register one in launch/launchers.py)") from None


def of(cfg: dict) -> Launcher:
    """The launcher of a run's config (a backend that names none runs in one process)."""
    return get(launcher_name(cfg) or "inprocess")


register(Launcher("inprocess", task_per_device=False, local=one_process, in_process=True,
                  srun_note="one task per node holding the node's devices"))
register(Launcher("process", task_per_device=False, local=one_process,
                  srun_note="one task per node holding the node's devices"))
register(Launcher("torchrun", task_per_device=True, local=torchrun, rendezvous="torch",
                  srun_note="srun starts one rank per device; they meet at rank 0's node (MASTER_ADDR, env://)"))
register(Launcher("horovodrun", task_per_device=True, local=horovodrun, rendezvous="horovod",
                  batch_setup=horovod_slurm.batch_lines,
                  srun_note="Horovod (gloo): its rendezvous server runs here (horovodrun's job), "
                            "srun starts one rank per device"))
register(Launcher("tf_config", task_per_device=False, local=tf_config, rendezvous="tf",
                  srun_note="srun starts one TensorFlow worker per node holding the node's devices; "
                            "each writes its TF_CONFIG from the job"))
