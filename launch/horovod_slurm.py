"""Horovod ranks started by srun, with the gloo controller.

``horovodrun`` normally runs Horovod's rendezvous server and starts every rank itself (over ssh on
other nodes). Under Slurm, srun starts the ranks instead: the batch script runs this module's
server on the first node (``python -m scaling.launch.horovod_slurm serve``), which writes its port to a
file, and each srun task (``join``) derives its Horovod slot (rank, local and cross ranks, host) from the
Slurm variables with Horovod's own host-assignment code (``horovod_env``), so the plan the server
holds and the slots the tasks claim are the same.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from scaling.launch import slurm_job
from scaling.launch.slurm_job import route_iface


def host_plan(hosts: list[str], tasks_per_node: int):
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    spec = ",".join(f"{h}:{tasks_per_node}" for h in hosts)
    return get_host_assignments(parse_hosts(spec), len(hosts) * tasks_per_node)


_servers: list = []  # keeps an in-process server (and its thread) alive for the run


def start_server(port_file: Path, tasks_per_node: int) -> None:
    """Start the rendezvous server for this job in a thread of this process and publish its port
    in ``port_file`` (the batch script's ``serve``, or rank 0 of a submitit job)."""
    from horovod.runner.http.http_server import RendezvousServer

    server = RendezvousServer()
    port = server.start()
    server.init(host_plan(slurm_job.hosts(), tasks_per_node))
    _servers.append(server)
    port_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(port_file)


def serve(port_file: Path, tasks_per_node: int) -> None:
    """Run the rendezvous server for this job until killed (the batch script ends it)."""
    start_server(port_file, tasks_per_node)
    while True:
        time.sleep(3600)


def batch_lines(job_files: str, tasks_per_node: int) -> list[str]:
    """What a batch script runs before srun: the server horovodrun would have run, on the first node,
    stopped when the script ends; its port goes to ``<job_files>.<job id>.rendezvous`` (``job_files``
    is a shell-quoted path prefix)."""
    return [f'export SCALING_HOROVOD_PORT_FILE={job_files}."$SLURM_JOB_ID".rendezvous',
            "# (each rank finds the interface its own node reaches the others through: no HOROVOD_GLOO_IFACE here)",
            f"{shlex.quote(sys.executable)} -m scaling.launch.horovod_slurm serve --port-file \"$SCALING_HOROVOD_PORT_FILE\" "
            f"--tasks-per-node {tasks_per_node} &",
            "rendezvous=$!",
            "trap 'kill $rendezvous 2>/dev/null; rm -f \"$SCALING_HOROVOD_PORT_FILE\"' EXIT"]


def join(cfg: dict, run_id: str | None) -> None:
    """srun started this Horovod rank: join the job's gloo rendezvous (the batch script's server,
    or under submitit one that rank 0 runs in a thread), as horovodrun would have arranged.
    ``MASTER_ADDR`` (rank 0's node) is where the server listens."""
    if "HOROVOD_RANK" in os.environ:
        return  # horovodrun started this rank (a local run inside an allocation)
    port_file = os.environ.get("SCALING_HOROVOD_PORT_FILE")
    if not port_file:
        port_file = str(Path(cfg["results_dir"]) / (cfg.get("group") or "runs") /
                        f".{run_id or 'run'}.{os.environ['SLURM_JOB_ID']}.rendezvous")
        if os.environ.get("SLURM_PROCID", "0") == "0":
            start_server(Path(port_file), slurm_job.tasks_per_node())
    addr = os.environ["MASTER_ADDR"]
    iface = os.environ.get("HOROVOD_GLOO_IFACE") or route_iface(addr)
    os.environ.update(horovod_env(Path(port_file), addr, iface))


def horovod_env(port_file: Path, rendezvous_addr: str, iface: str, timeout: float = 120) -> dict[str, str]:
    """This srun task's Horovod variables: its slot in the plan, and where the rendezvous is."""
    from horovod.runner.gloo_run import create_slot_env_vars

    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no Horovod rendezvous port in {port_file} after {timeout:.0f} s")
        time.sleep(0.2)
    hosts = slurm_job.hosts()
    tasks_per_node = int(os.environ["SLURM_NTASKS"]) // len(hosts)
    slot = host_plan(hosts, tasks_per_node)[int(os.environ["SLURM_PROCID"])]
    env = create_slot_env_vars(slot)
    env.update(HOROVOD_GLOO_RENDEZVOUS_ADDR=rendezvous_addr, HOROVOD_GLOO_RENDEZVOUS_PORT=port_file.read_text().strip(),
               HOROVOD_CONTROLLER="gloo", HOROVOD_CPU_OPERATIONS="gloo", HOROVOD_GLOO_IFACE=iface)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scaling.launch.horovod_slurm")
    ap.add_argument("verb", choices=["serve"])
    ap.add_argument("--port-file", required=True, type=Path)
    ap.add_argument("--tasks-per-node", required=True, type=int)
    args = ap.parse_args(argv)
    serve(args.port_file, args.tasks_per_node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
