"""What a launched worker process knows of itself and tells its launcher: its rank (from whichever
launcher started it), that it is alive (``rank<r>.pid.json``), and that it dies with its parent."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from scaling import records


def rank_info() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from the launcher's variables.

    torchrun and our own launchers set RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE, horovodrun its
    HOROVOD_* variables, srun SLURM_*; a lone process is (0, 1, 0, 1).
    """
    env = os.environ
    for r, w, lr, lw in (("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
                         ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
                         ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")):
        if r in env and w in env:
            local_world = env.get(lw, "1").split("(")[0]  # SLURM_NTASKS_PER_NODE may read "2(x2)"
            return int(env[r]), int(env[w]), int(env.get(lr, 0)), int(local_world or 1)
    return 0, 1, 0, 1


def announce(phase: str = "starting") -> None:
    """Write ``rank<r>.pid.json`` so the launcher can watch this worker (and name it if it dies)."""
    run_dir = os.environ.get("SCALING_RUN_DIR")
    if not run_dir:
        return
    rank = rank_info()[0]
    records.write_json_atomic(Path(run_dir) / f"rank{rank}.pid.json",
                              {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "phase": phase})


def _resolve_prctl():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


#: resolved at import, in the parent: a child between fork and exec only calls it (a launcher runs
#: threads, W&B's among them, so its child must not import or load anything there)
_PRCTL = _resolve_prctl()


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies, however it dies: a worker when its launcher
    (the study's, torchrun, horovodrun, a warm-start server) dies, so a killed sweep driver leaves
    no orphan training behind. Also a launcher's ``preexec_fn``: ``prctl`` was resolved at import,
    so a child between fork and exec only calls it. Not Linux: nothing (the launcher's own cleanup
    still applies)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def leave(code: int, timeout: float = 30.0) -> None:
    """End a launched worker whose rank has reported, without the interpreter's teardown.

    Tearing down a process that imported a framework takes about a second here (modules, thread
    pools, process-group objects), all of it fixed cost of the cell, none of it measured. Once every
    rank of the run has written its report (``rank<r>.exit.json``) no rank calls its framework again,
    so each leaves at once (``os._exit``) after flushing its output. Outside a launched run, or when
    the other ranks do not report within ``timeout`` seconds, this returns and the process ends the
    usual way."""
    import sys
    import time

    run_dir = os.environ.get("SCALING_RUN_DIR")
    if not run_dir:
        return
    world = rank_info()[1]
    deadline = time.monotonic() + timeout
    while sum(1 for _ in Path(run_dir).glob("rank*.exit.json")) < world:
        if time.monotonic() > deadline or not Path(run_dir).is_dir():  # gone: rank 0 gathered and cleaned up
            return
        time.sleep(0.01)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
