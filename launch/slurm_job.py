"""What a Slurm job's own variables and ``scontrol`` say about it: its nodes, their addresses, the
tasks on each node, a port of its own, and the interface the other nodes reach this one through.
Read by every rendezvous under srun (``scaling.launch.slurm_env``, ``scaling.launch.horovod_slurm``),
so each fact is looked up one way."""
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


def route_iface(addr: str, ip=None) -> str:
    """The interface gloo (torch.distributed's, Horovod's) binds to on this node, for a job whose
    rendezvous is ``addr``.

    Other nodes reach this one the way this one reaches ``addr``: the device of ``ip route get``.
    On the rendezvous node itself that route is ``lo`` (its own address), but the other nodes
    reach it through the interface that holds ``addr``, so that one is chosen there.
    """
    ip = ip or _ip
    try:
        words = ip("route", "get", addr).split()
        dev = words[words.index("dev") + 1]
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return "lo" if addr.startswith("127.") else "eth0"
    if dev != "lo" or addr.startswith("127."):
        return dev
    try:  # `ip -o addr show to ADDR`: "2: eth0    inet 10.0.0.5/24 ..."
        owner = ip("addr", "show", "to", addr).split()
        return owner[1].rstrip(":") if len(owner) > 1 else dev
    except (OSError, subprocess.SubprocessError):
        return dev


def _ip(*args: str) -> str:
    return subprocess.run(["ip", "-o", *args], capture_output=True, text=True, timeout=10).stdout
