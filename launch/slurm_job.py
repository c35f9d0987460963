"""What a Slurm job's own variables and ``scontrol`` say about it: its nodes, their addresses, the
tasks on each node, a port of its own. Read by every rendezvous under srun (``scaling.launch.slurm_env``,
``scaling.launch.horovod_slurm``), so each fact is looked up one way."""
from __future__ import annotations

import os
import subprocess


def hosts() -> list[str]:
    """The job's node names in Slurm's order (task ``i`` of a block layout runs on node ``i // per_node``)."""
    out = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return out.split()


def node_addr(host: str) -> str:
    """The address other nodes reach ``host`` at: its ``NodeAddr`` (the name itself when Slurm gives none).

    Node names need not resolve (emulated nodes sharing one machine, sites whose node names are not in
    DNS); ``NodeAddr`` is what slurmd itself is reached at."""
    try:
        out = subprocess.run(["scontrol", "show", "node", host, "-o"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return host
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith("NodeAddr=")), host)


def nodes() -> int:
    return int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))


def tasks_per_node() -> int:
    """Tasks on each node (the study's jobs place the same number on every node)."""
    return int(os.environ.get("SLURM_NTASKS", "1")) // max(1, nodes())


def job_port() -> int:
    """A port of this job's own (20000..39999 by job id): two jobs sharing a node do not collide."""
    return 20000 + int(os.environ["SLURM_JOB_ID"]) % 20000
