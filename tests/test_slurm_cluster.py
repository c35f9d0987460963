"""Smoke test of the local Slurm (tests/slurm/start.sh): real sbatch/srun/scancel on emulated nodes.

Run: ``python -m pytest tests/test_slurm_cluster.py -q -m slurm``. The session fixture starts the
cluster when ``sinfo`` does not answer (root or password-less sudo; else the tests skip).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # `tests` is no package: make `tests.slurm` importable under plain `pytest`
    sys.path.insert(0, _ROOT)

from tests.slurm.cluster import (  # noqa: E402
    FINAL_STATES,
    ClusterUnavailable,
    SlurmCluster,
    ensure_cluster,
    jobcomp_state,
    job_states,
    sbatch,
    wait_for_states,
)

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    try:
        return ensure_cluster()
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))


def _read_kv(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_two_nodes_with_gpus(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    if len(slurm_cluster.nodes) < 2 or slurm_cluster.gpus_per_node < 2:
        pytest.skip(f"needs 2 nodes with 2 GPUs each, cluster has {slurm_cluster}")
    (tmp_path / "job.sh").write_text(
        "#!/bin/bash\n"
        "srun bash -c 'printf \"%s\\n\" "
        "\"host=$(hostname)\" \"node=$SLURMD_NODENAME\" \"nodeid=$SLURM_NODEID\" \"procid=$SLURM_PROCID\" "
        "\"cuda=$CUDA_VISIBLE_DEVICES\" \"job_gpus=$SLURM_JOB_GPUS\" \"gpus_on_node=$SLURM_GPUS_ON_NODE\" "
        "> task-$SLURM_PROCID.txt'\n"
    )
    t0 = time.monotonic()
    job_id, proc = sbatch(
        ["--wait", "-J", "smoke-2x1", "-N", "2", "--ntasks-per-node=1", "--gpus-per-node=2",
         "-t", "1", "-o", "slurm-%j.out", "job.sh"],
        cwd=tmp_path, timeout=50,
    )
    out = (tmp_path / f"slurm-{job_id}.out")
    assert proc.returncode == 0, f"{proc.stderr}\n{out.read_text() if out.exists() else ''}"
    assert time.monotonic() - t0 < 45

    tasks = [_read_kv(p) for p in sorted(tmp_path.glob("task-*.txt"))]
    assert len(tasks) == 2, tasks
    assert {t["procid"] for t in tasks} == {"0", "1"}
    assert {t["nodeid"] for t in tasks} == {"0", "1"}  # one task on each node
    assert len({t["node"] for t in tasks}) == 2 and {t["node"] for t in tasks} <= set(slurm_cluster.nodes)
    for t in tasks:
        assert len(t["cuda"].split(",")) == 2, t  # 2 (fake) GPUs visible to each task
        assert len(t["job_gpus"].split(",")) == 2, t
        assert t["gpus_on_node"] == "2", t
    assert job_states(job_id) == {str(job_id): "COMPLETED"}


def test_job_array(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id, proc = sbatch(
        ["-J", "smoke-array", "--array=0-1", "-t", "1", "-o", "cell-%A_%a.out",
         "--wrap", 'echo "cell=$SLURM_ARRAY_TASK_ID of=$SLURM_ARRAY_JOB_ID node=$SLURMD_NODENAME" '
                   '> cell-$SLURM_ARRAY_TASK_ID.txt'],
        cwd=tmp_path, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    states = wait_for_states(job_id, FINAL_STATES, timeout=40)
    assert states == {f"{job_id}_0": "COMPLETED", f"{job_id}_1": "COMPLETED"}, states
    for cell in (0, 1):
        kv = dict(f.split("=", 1) for f in (tmp_path / f"cell-{cell}.txt").read_text().split())
        assert kv["cell"] == str(cell) and kv["of"] == str(job_id), kv
        assert kv["node"] in slurm_cluster.nodes


def test_scancel_running_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id, proc = sbatch(["-J", "smoke-cancel", "-t", "2", "-o", "slurm-%j.out",
                           "--wrap", "echo $$ > pid.txt; exec sleep 300"], cwd=tmp_path, timeout=30)
    assert proc.returncode == 0, proc.stderr
    wait_for_states(job_id, {"RUNNING"}, timeout=30)
    pid_file = tmp_path / "pid.txt"
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the job never wrote pid.txt"
        time.sleep(0.1)
    pid = int(pid_file.read_text())

    subprocess.run(["scancel", str(job_id)], check=True, timeout=20)
    assert wait_for_states(job_id, FINAL_STATES, timeout=30) == {str(job_id): "CANCELLED"}

    deadline = time.monotonic() + 15  # KillWait=5: SIGTERM, then SIGKILL after 5 s
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"job process {pid} outlived scancel"
        time.sleep(0.2)

    deadline = time.monotonic() + 15  # the jobcomp record is written once the job has ended
    while (state := jobcomp_state(job_id)) is None:
        assert time.monotonic() < deadline, "no record in the job completion file (sacct -c)"
        time.sleep(0.25)
    assert state == "CANCELLED"
