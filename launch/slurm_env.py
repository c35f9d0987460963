"""A worker's set-up when srun started it: Slurm's signals, and the rendezvous its launcher needs.

Locally the framework's own launcher (torchrun, horovodrun, our ``TF_CONFIG`` per process) tells each
worker where the others are. Under srun nobody does, so each task works it out here from the job's
variables, the way that launcher would have: ``MASTER_ADDR``/``MASTER_PORT`` for torch.distributed,
a slot in the job's gloo rendezvous for Horovod, a ``TF_CONFIG`` for TensorFlow. Which one a run
needs is its launcher's ``rendezvous`` (``scaling.launch.launchers``). The worker calls :func:`set_up` once.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Callable

from scaling.launch import horovod_slurm, launchers, slurm_job


class Interrupted(BaseException):
    """Slurm asked this task to stop (USR2 before the time limit, TERM on scancel or pre-emption)."""


def set_up(cfg: dict, rank: int, run_id: str | None, interruption: dict | None = None) -> None:
    """Under Slurm (``SLURM_JOB_ID`` set): with ``interruption`` given, turn USR2/TERM into
    :class:`Interrupted` (noting why in it); then the rendezvous of the run's launcher. Outside Slurm
    nothing happens."""
    if "SLURM_JOB_ID" not in os.environ:
        return
    if interruption is not None:
        handle_signals(cfg, rank, run_id, interruption)
    rank_reports(cfg, run_id)
    kind = launchers.of(cfg).rendezvous
    if kind:
        RENDEZVOUS[kind](cfg, run_id)


def rank_reports(cfg: dict, run_id: str | None) -> None:
    """Where the ranks report when they finish: under srun no launcher gathers their reports (the
    rank clock's series, parameter digests), so every rank writes its own into a folder of the
    results directory, which the job's nodes share as they share the records, and rank 0 adds them
    to the record (``scaling.sinks.gather_ranks``) and removes the folder. One per job step and run;
    a launcher's own folder (``SCALING_RUN_DIR`` already set) is left as it is."""
    from scaling import sinks
    from scaling.process import rank_info

    if (rank_info()[1] < 2 or not cfg.get("results_dir")
            or (os.environ.get("SCALING_RUN_DIR") and os.environ.get(sinks.GATHER_ENV) != "1")):
        return
    step = f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    folder = Path(cfg["results_dir"]) / ".ranks" / f"{step}.{run_id or 'run'}"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["SCALING_RUN_DIR"], os.environ[sinks.GATHER_ENV] = str(folder), "1"


def torch_env(cfg: dict | None = None, run_id: str | None = None) -> None:
    """torch.distributed's env:// address under srun: rank 0's node (its NodeAddr) and a per-job
    port; and gloo's interface, the one this node reaches that address through (left to itself,
    gloo binds whatever the host name resolves to, often loopback, and the other nodes cannot
    reach it). A site's own ``GLOO_SOCKET_IFNAME`` is kept."""
    if "MASTER_ADDR" not in os.environ and "SLURM_JOB_NODELIST" in os.environ:
        import subprocess

        try:
            first = slurm_job.hosts()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return
        os.environ["MASTER_ADDR"] = slurm_job.node_addr(first)
        os.environ.setdefault("MASTER_PORT", str(slurm_job.job_port()))
    if "MASTER_ADDR" in os.environ and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = slurm_job.route_iface(os.environ["MASTER_ADDR"])


def horovod(cfg: dict, run_id: str | None) -> None:
    """Horovod's gloo rendezvous, listening on rank 0's node (``MASTER_ADDR``)."""
    torch_env()
    horovod_slurm.join(cfg, run_id)


def tf_config(cfg: dict | None = None, run_id: str | None = None) -> None:
    """The ``TF_CONFIG`` our local launcher writes, from the job: one worker per task, at its node's
    NodeAddr and a port of its own (``SCALING_TF_PORT`` + task, by default the job's port + task),
    so tasks sharing an address (emulated nodes on one host) do not collide. TensorFlow then forms
    the cluster exactly as it does locally."""
    if "TF_CONFIG" in os.environ:
        return  # a launcher already said (a local run inside an allocation)
    hosts = slurm_job.hosts()
    tasks = int(os.environ["SLURM_NTASKS"])
    per_node = max(1, tasks // len(hosts))
    base = int(os.environ.get("SCALING_TF_PORT") or slurm_job.job_port())
    addrs = {host: slurm_job.node_addr(host) for host in hosts}
    workers = [f"{addrs[hosts[min(i // per_node, len(hosts) - 1)]]}:{base + i}" for i in range(tasks)]
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers},
                                          "task": {"type": "worker", "index": int(os.environ["SLURM_PROCID"])}})


#: how the ranks of a launcher find each other under srun (``Launcher.rendezvous`` names one)
RENDEZVOUS: dict[str, Callable[[dict, str | None], None]] = {
    "torch": torch_env, "horovod": horovod, "tf": tf_config}


def handle_signals(cfg: dict, rank: int, run_id: str | None, interruption: dict) -> None:
    """On USR2/TERM: note why, write a failed record at once (rank 0; a rank blocked in a collective
    may never get back to Python before SIGKILL), requeue the job if asked, then unwind."""
    from scaling import records

    def handler(signum: int, frame: Any) -> None:
        if interruption:  # the first signal told the story (a requeue sends TERM after USR2)
            raise Interrupted(interruption["message"])
        name = signal.Signals(signum).name
        requeue = bool(cfg.get("cluster", {}).get("requeue")) and signum == signal.SIGUSR2
        action = "left for --resume"
        if requeue and rank == 0:
            import subprocess

            ok = subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], capture_output=True).returncode == 0
            action = "requeued" if ok else "requeue failed; left for --resume"
        interruption.update(signal=name, action=action, job_id=os.environ.get("SLURM_JOB_ID"))
        reason = ("pre-empted: Slurm's time-limit warning (USR2)" if signum == signal.SIGUSR2
                  else "cancelled or pre-empted by Slurm (TERM)")
        interruption["message"] = f"{reason}; {action}"
        if rank == 0 and run_id:
            record = records.make_record(run_id=run_id, group=cfg.get("group") or "runs", config=cfg,
                                         environment=records.capture_environment(), metrics=None,
                                         error=f"rank {rank}: {reason}; {action}")
            record["interruption"] = dict(interruption)
            records.write_record(record, cfg["results_dir"])
        raise Interrupted(f"{reason}; {action}")

    signal.signal(signal.SIGUSR2, handler)
    signal.signal(signal.SIGTERM, handler)
