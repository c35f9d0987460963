"""The local Slurm of ``tests/slurm/start.sh``, for tests that submit real jobs.

Use from any test file (``tests/`` is not a package; this works under ``python -m pytest`` from the
repository root, and test files can put the root on ``sys.path`` first, as
``tests/test_slurm_cluster.py`` does)::

    from tests.slurm.cluster import ClusterUnavailable, ensure_cluster

    @pytest.fixture(scope="session")
    def slurm_cluster():
        try:
            return ensure_cluster()
        except ClusterUnavailable as exc:
            pytest.skip(str(exc))

``ensure_cluster()`` returns at once when ``sinfo`` answers and every node is usable; otherwise it runs
``start.sh`` (which installs Slurm with apt the first time, ~10-30 s, then ~1 s). Set
``SCALING_SLURM_AUTOSTART=0`` to never start it from tests (unavailable clusters then skip).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
START_SH = HERE / "start.sh"
STOP_SH = HERE / "stop.sh"
STATE_DIR = Path(os.environ.get("SCALING_SLURM_DIR", "/tmp/scaling-slurm"))

# sinfo %T states in which a node takes (or is running) jobs
USABLE_STATES = frozenset({"idle", "mixed", "allocated", "completing", "planned"})
# scontrol JobState values after which a job will not change any more
FINAL_STATES = frozenset(
    {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
     "BOOT_FAIL", "DEADLINE"}
)


class ClusterUnavailable(RuntimeError):
    """No cluster answers and this process may not start one (callers usually skip)."""


@dataclass(frozen=True)
class SlurmCluster:
    nodes: tuple[str, ...]  # node names, e.g. ("node1", "node2")
    cpus_per_node: int
    gpus_per_node: int  # fake GPUs (gres gpu) on each node, 0 when none
    partition: str  # the default partition
    state_dir: Path  # logs, spool, jobcomp.txt
    started: bool  # True when this call ran start.sh


def _run(cmd: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str] | None:
    """Run a Slurm client command; None when it is missing or hangs (slurmctld down: ~10 s)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _slurmd_alive(node: str) -> bool:
    """False when start.sh's pid file for this node names no live slurmd (True if there is no
    such file: a cluster not started by start.sh, or another state dir)."""
    pid_file = STATE_DIR / "run" / f"slurmd-{node}.pid"
    if not (STATE_DIR / "run" / "slurmctld.pid").exists():
        return True
    try:
        pid = int(pid_file.read_text().strip())
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, ValueError):
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return fields.get("Name", "").strip() == "slurmd" and not fields.get("State", "").strip().startswith(("Z", "X"))


def describe() -> SlurmCluster | None:
    """The running cluster if ``sinfo`` answers and all its nodes are usable, else None."""
    if shutil.which("sinfo") is None:
        return None
    proc = _run(["sinfo", "-h", "-N", "-o", "%N|%T|%c|%G|%P"], timeout=15)
    if proc is None or proc.returncode != 0 or not proc.stdout.strip():
        return None
    if not all(_slurmd_alive(line.split("|", 1)[0]) for line in proc.stdout.splitlines()):
        return None  # slurmctld reports a killed slurmd as idle until SlurmdTimeout (60 s)
    nodes: dict[str, tuple[int, int]] = {}
    default_partition = ""
    for line in proc.stdout.splitlines():
        name, state, cpus, gres, partition = line.strip().split("|")
        if state not in USABLE_STATES:
            return None
        gpus = re.search(r"gpu(?::[^:(,]+)?:(\d+)", gres)
        nodes[name] = (int(cpus), int(gpus.group(1)) if gpus else 0)
        if partition.endswith("*"):
            default_partition = partition.rstrip("*")
    return SlurmCluster(
        nodes=tuple(sorted(nodes)),
        cpus_per_node=min(c for c, _ in nodes.values()),
        gpus_per_node=min(g for _, g in nodes.values()),
        partition=default_partition,
        state_dir=STATE_DIR,
        started=False,
    )


def node_addresses() -> dict[str, str]:
    """Each node's NodeAddr (``scontrol show node``): 127.0.0.1 for all when the nodes share the
    host's network, one 10.78.0.1I address each when start.sh put them in network namespaces."""
    proc = _run(["scontrol", "show", "node", "-o"])
    found = {}
    for line in (proc.stdout if proc and proc.returncode == 0 else "").splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "NodeName" in fields:
            found[fields["NodeName"]] = fields.get("NodeAddr", fields["NodeName"])
    return found


def cluster_answers() -> bool:
    return describe() is not None


def ensure_cluster(*, start: bool | None = None, timeout: float = 600) -> SlurmCluster:
    """Return the local cluster, running ``tests/slurm/start.sh`` first when it does not answer.

    start: run start.sh when needed (default: unless ``SCALING_SLURM_AUTOSTART=0``).
    Raises ClusterUnavailable when it is down and may not be started here (not root and no
    password-less sudo, or autostart off), RuntimeError when start.sh fails (with its output).
    """
    found = describe()
    if found is not None:
        return found
    if start is None:
        start = os.environ.get("SCALING_SLURM_AUTOSTART", "1") != "0"
    if not start:
        raise ClusterUnavailable(f"no local Slurm answers; run {START_SH}")
    cmd = ["bash", str(START_SH)]
    if os.geteuid() != 0:
        sudo = _run(["sudo", "-n", "true"], timeout=10) if shutil.which("sudo") else None
        if sudo is None or sudo.returncode != 0:
            raise ClusterUnavailable(f"no local Slurm answers and starting one needs root: sudo {START_SH}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{START_SH} did not finish in {timeout:.0f} s:\n{exc.stdout or ''}{exc.stderr or ''}") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"{START_SH} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    found = describe()
    if found is None:
        raise RuntimeError(f"{START_SH} succeeded but sinfo shows no usable nodes:\n{proc.stdout}")
    return SlurmCluster(**{**found.__dict__, "started": True})


# ---- job helpers -------------------------------------------------------------------------------
def sbatch(args: list[str], *, cwd: Path | str, timeout: float = 60) -> tuple[int, subprocess.CompletedProcess[str]]:
    """``sbatch --parsable ARGS`` in cwd; returns (job id, process). With ``--wait`` in args the
    return code is the job's exit code (and sbatch polls every 2, then 8, then 10 s)."""
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)
    first = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    if not first:
        raise RuntimeError(f"sbatch {args} gave no job id ({proc.returncode}): {proc.stderr}")
    return int(first.split(";")[0].split("_")[0]), proc


def job_states(job_id: int | str) -> dict[str, str]:
    """JobState per job (an array job gives one entry per task, keyed ``<array>_<task>``), from
    ``scontrol show job`` (kept MinJobAge=3600 s after the end); {} when unknown."""
    proc = _run(["scontrol", "show", "job", "-o", str(job_id)], timeout=15)
    if proc is None or proc.returncode != 0:
        return {}
    states: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "JobState" not in fields:
            continue
        key = fields["JobId"]
        if fields.get("ArrayTaskId", "N/A") not in ("N/A", ""):
            key = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
        states[key] = fields["JobState"]
    return states


def wait_for_states(job_id: int | str, wanted: set[str] | frozenset[str], timeout: float = 30,
                    poll: float = 0.25) -> dict[str, str]:
    """Poll until every job (or array task) of job_id is in one of ``wanted``; returns the states.
    Raises TimeoutError with the last states seen."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = job_states(job_id)
        if states and all(s in wanted for s in states.values()):
            return states
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout} s: {states}")


def jobcomp_state(job_id: int | str) -> str | None:
    """The job's final state from the job completion file (``sacct -c``; plain sacct needs slurmdbd)."""
    proc = _run(["sacct", "-c", "-n", "-P", "-j", str(job_id), "-o", "jobid,state"], timeout=15)
    if proc is None:
        return None
    for line in proc.stdout.splitlines():
        jid, _, state = line.partition("|")
        if jid.strip() == str(job_id):
            return state.strip()
    return None
