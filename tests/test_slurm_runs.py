"""The study's cells on a real Slurm (tests/slurm/start.sh): rendered sbatch scripts, 2-node cells
across the emulated nodes, shell-safe rendering, and a cancelled cell's record."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.slurm.cluster import (ClusterUnavailable, ensure_cluster, job_states, node_addresses,  # noqa: E402
                                 wait_for_states)

from scaling import records  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess]
QUICK = ["data=synthetic", "train.epochs=1", "train.max_steps_per_epoch=30", "protocol.warmup_steps=5"]


@pytest.fixture(scope="module")
def cluster():
    try:
        return ensure_cluster()
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))


def render(tmp_path, *overrides):
    out = tmp_path / "jobs"
    proc = subprocess.run([sys.executable, "-m", "scaling", "slurm", "render", "cluster=slurm",
                           f"results_dir={tmp_path / 'results'}", *overrides, "--out", str(out)],
                          cwd=_ROOT, capture_output=True, text=True, timeout=120)
    return proc, sorted(out.glob("*.sbatch")) if out.exists() else []


def submit(script: Path, wait: bool = True) -> tuple[int, str]:
    args = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + [str(script)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout.strip().split(";")[0]


def test_two_node_cells_through_rendered_sbatch_scripts(cluster, tmp_path):
    proc, scripts = render(tmp_path, "sweep_id=sl", "backend=torch_ddp,tf_multiworker,horovod_torch",
                           "cluster.nodes=2", *QUICK)
    assert proc.returncode == 0, proc.stderr
    assert len(scripts) == 3
    for script in scripts:
        text = script.read_text()
        assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text
        assert "#SBATCH --gpus-per-node=1" in text and "#SBATCH --signal=USR2@120" in text
        assert "torchrun" not in text
        rc, job = submit(script)
        assert rc == 0, (script.read_text(), list(tmp_path.glob("jobs/*.log")))
    found = {rec["config"]["backend"]["name"]: rec for _, rec in records.read_records(tmp_path / "results")}
    assert set(found) == {"torch_ddp", "tf_multiworker", "horovod_torch"}
    for rec in found.values():
        records.validate(rec)
        assert rec["status"] == "ok", rec["error"]
        assert rec["environment"]["world_size"] == 2
        slurm = rec["environment"]["slurm"]
        assert slurm["nnodes"] == "2" and slurm["job_nodelist"] and slurm["job_gpus"] is not None
        assert rec["metrics"]["devices"] == 2
        # no launcher under srun: rank 0 gathered every rank's report into the record itself
        assert [r["rank"] for r in rec["ranks"]] == [0, 1] and rec["metrics"]["ranks_in_sync"] is True
        clock = rec["metrics"]["rank_clock"]
        assert clock["ranks"] == 2 and clock["marks_outside_step"] == 0, clock
        if clock["hosts"] == 2 and rec["config"]["backend"]["name"] == "tf_multiworker":
            assert clock["waiting_s"] is None and "across hosts" in clock["note"]  # no leave mark, no common clock
        else:
            assert clock["waiting_s"] >= 0 and clock["note"] is None, clock
    assert not list((tmp_path / "results" / ".ranks").glob("*"))  # each run's folder removed
    addrs = node_addresses()
    if len(set(addrs.values())) == len(addrs):  # nodes in their own network namespaces (start.sh)
        # each rank bound the interface the other node reaches it through: loopback would have hung
        first = addrs[sorted(addrs)[0]]
        hvd = found["horovod_torch"]["environment"]["comm_env"]
        assert hvd["HOROVOD_GLOO_RENDEZVOUS_ADDR"] == first and hvd["HOROVOD_GLOO_IFACE"] != "lo"
        assert found["torch_ddp"]["environment"]["comm_env"]["GLOO_SOCKET_IFNAME"] != "lo"


def test_distinct_node_addresses_when_namespaces_are_possible(cluster):
    """start.sh gives every emulated node its own address where network namespaces work (root and
    iproute2, as in CI), so a multi-node cell that binds the wrong interface fails here too."""
    import os
    import shutil

    if os.geteuid() != 0 or shutil.which("ip") is None or os.environ.get("SCALING_SLURM_NETNS") == "0":
        pytest.skip("network namespaces need root and iproute2")
    addrs = node_addresses()
    assert len(addrs) >= 2 and len(set(addrs.values())) == len(addrs), addrs


def test_per_device_backends_run_one_task_per_device(tmp_path):
    proc, scripts = render(tmp_path, "backend=lightning_ddp", "devices=4", "cluster.nodes=2",
                           "cluster.partition=gpu", *QUICK)
    assert proc.returncode == 0, proc.stderr
    text = scripts[0].read_text()
    assert "#SBATCH --ntasks-per-node=4" in text and "#SBATCH --gpus-per-node=4" in text
    assert "#SBATCH --partition=gpu" in text and "srun --kill-on-bad-exit=1" in text
    _, hvd = render(tmp_path / "h", "backend=horovod_torch", "devices=4", "cluster.nodes=2", *QUICK)
    text = hvd[0].read_text()
    assert "#SBATCH --ntasks-per-node=4" in text and "-m scaling.launch.horovod_slurm serve" in text
    assert "srun --kill-on-bad-exit=1" in text
    assert not [line for line in text.splitlines() if line.startswith("horovodrun")]  # srun starts the ranks
    _, mirrored = render(tmp_path / "m", "backend=tf_mirrored", "devices=4", *QUICK)
    assert "#SBATCH --ntasks-per-node=1" in mirrored[0].read_text()


def test_hostile_values_are_quoted_or_refused(tmp_path):
    proc, scripts = render(tmp_path, "backend=torch_ddp", "cluster.partition='gpu; touch /tmp/pwned'",
                           "cluster.account='$(reboot)'", *QUICK)
    assert proc.returncode == 0, proc.stderr
    text = scripts[0].read_text()
    assert "#SBATCH --partition='gpu; touch /tmp/pwned'" in text
    assert "#SBATCH --account='$(reboot)'" in text
    assert subprocess.run(["bash", "-n", str(scripts[0])]).returncode == 0
    bad, none = render(tmp_path / "nl", "backend=torch_ddp", "cluster.qos='normal\nrm -rf /'", *QUICK)
    assert bad.returncode == 2 and "a newline would end the #SBATCH line" in bad.stderr and not none


def test_cancelled_cell_leaves_a_failed_record_while_the_other_finishes(cluster, tmp_path):
    proc, scripts = render(tmp_path, "sweep_id=c", "backend=torch_ddp", "devices=1", "cluster.nodes=1",
                           "data=synthetic", "train.epochs=1", "repeat=0,1")
    assert proc.returncode == 0, proc.stderr
    long_script, short_script = scripts
    text = long_script.read_text().replace("train.epochs", "train.epochs")
    cfg_path = Path(text.split("--config ")[1].split()[0].strip("'"))
    cfg = json.loads(cfg_path.read_text())
    cfg["train"]["epochs"] = 200  # the one to cancel trains long
    cfg_path.write_text(json.dumps(cfg))
    rc, long_job = submit(long_script, wait=False)
    assert rc == 0
    results = tmp_path / "results" / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job_states(long_job).get(long_job) != "RUNNING":
        time.sleep(0.5)
    time.sleep(8)  # into training
    rc, short_job = submit(short_script, wait=False)
    subprocess.run(["scancel", long_job], check=True, timeout=30)
    wait_for_states(long_job, {"CANCELLED", "FAILED", "COMPLETED"}, timeout=60)
    wait_for_states(short_job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
    got = {rec["run_id"]: rec for _, rec in records.read_records(tmp_path / "results")}
    cancelled = got[long_script.stem]
    assert cancelled["status"] == "failed"
    assert "cancelled or pre-empted by Slurm" in cancelled["error"]
    assert cancelled["interruption"]["signal"] == "SIGTERM"
    assert cancelled["interruption"]["action"] == "left for --resume"
    assert got[short_script.stem]["status"] == "ok"


def test_two_cell_sweep_through_submitit(cluster, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = [sys.executable, "-m", "scaling", "sweep", "--wait", "cluster=slurm", "sweep_id=sub", "backend=torch_ddp",
            "devices=1", "cluster.nodes=2", "repeat=0,1", f"results_dir={tmp_path}", *QUICK]
    proc = subprocess.run(args, cwd=_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [rec for _, rec in records.read_records(tmp_path)]
    assert sorted(r["config"]["repeat"] for r in found) == [0, 1]
    for rec in found:
        assert rec["status"] == "ok", rec["error"]
        assert rec["environment"]["slurm"]["nnodes"] == "2" and rec["environment"]["world_size"] == 2
        assert rec["metrics"]["ranks_in_sync"] is True and rec["metrics"]["rank_clock"]["waiting_s"] >= 0
    # rerunning trains nothing: each job finds its cell done (the records are not rewritten)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("sub/*.json")}
    again = subprocess.run(args, cwd=_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("sub/*.json")} == before


def test_submitit_cell_with_the_wrong_geometry_says_why(cluster, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    # forced into one multirun, one allocation (sized from the base config: 1 task per node): tf_mirrored fits
    # (one process, 2 devices); torch_ddp needs 2 tasks and must say so rather than train wrongly
    args = [sys.executable, "-m", "scaling", "sweep", "--one-geometry", "cluster=slurm", "sweep_id=geo",
            "backend=tf_mirrored,torch_ddp", "devices=2", f"results_dir={tmp_path}", *QUICK]
    subprocess.run(args, cwd=_ROOT, capture_output=True, text=True, timeout=600)
    got = {rec["config"]["backend"]["name"]: rec for _, rec in records.read_records(tmp_path)}
    assert got["tf_mirrored"]["status"] == "ok", got["tf_mirrored"]["error"]
    assert got["torch_ddp"]["status"] == "failed"
    assert "Submitit gives every cell of a multirun the same geometry" in got["torch_ddp"]["error"]


@pytest.mark.parametrize("requeue", [False, True])
def test_preemption_signal_ends_the_cell_cleanly(cluster, tmp_path, requeue):
    proc, scripts = render(tmp_path, "sweep_id=p", "backend=torch_ddp", "devices=1", "data=synthetic",
                           "train.epochs=200", f"cluster.requeue={str(requeue).lower()}")
    assert proc.returncode == 0, proc.stderr
    rc, job = submit(scripts[0], wait=False)
    assert rc == 0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job_states(job).get(job) != "RUNNING":
            time.sleep(0.5)
        time.sleep(8)  # into training
        # what Slurm sends --signal=USR2@120 before the time limit
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        path = tmp_path / "results" / "p" / f"{scripts[0].stem}.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not path.exists():
            time.sleep(0.5)
        rec = json.loads(path.read_text())
        records.validate(rec)
        assert rec["status"] == "failed" and rec["interruption"]["signal"] == "SIGUSR2"
        assert "pre-empted" in rec["error"]
        if requeue:
            assert rec["interruption"]["action"] == "requeued"
            show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
            assert "Restarts=1" in show or "REQUEUE" in show or "PENDING" in show, show
        else:
            assert rec["interruption"]["action"] == "left for --resume"
            wait_for_states(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    finally:
        subprocess.run(["scancel", job], timeout=30)


def test_mixed_geometry_sweep_is_split_into_one_job_array_per_allocation(cluster, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = [sys.executable, "-m", "scaling", "sweep", "--wait", "cluster=slurm", "sweep_id=mixed",
            "backend=tf_mirrored,torch_ddp,horovod_torch", "devices=2", f"results_dir={tmp_path}", *QUICK]
    proc = subprocess.run(args, cwd=_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "allocation 1/2" in proc.stderr and "allocation 2/2" in proc.stderr
    got = {rec["config"]["backend"]["name"]: rec for _, rec in records.read_records(tmp_path)}
    assert set(got) == {"tf_mirrored", "torch_ddp", "horovod_torch"}
    assert got["horovod_torch"]["environment"]["world_size"] == 2
    assert all(rec["status"] == "ok" for rec in got.values()), {k: r["error"] for k, r in got.items()}
    assert got["torch_ddp"]["environment"]["world_size"] == 2


def test_slurm_study_submits_every_geometry_at_once_and_returns(cluster, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    # two geometries (1 task per node for tf_mirrored, 2 for torch_ddp); one trains long enough to be
    # in the queue when the sweep is run again
    args = [sys.executable, "-m", "scaling", "sweep", "cluster=slurm", "sweep_id=nb", "backend=tf_mirrored,torch_ddp",
            "devices=2", "cluster.exclusive=false", "cluster.mem=null", f"results_dir={tmp_path}", "data=synthetic",
            "train.epochs=200", "protocol.warmup_steps=5"]
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [line.split("submitted as job ")[1].split()[0] for line in proc.stderr.splitlines() if "submitted as job" in line]
    try:
        assert len(jobs) == 2, proc.stderr[-3000:]
        assert not list(tmp_path.glob("nb/*.json"))  # it returned before any cell finished
        assert time.monotonic() - t0 < 240
        again = subprocess.run(args, cwd=_ROOT, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stderr.count("still in the queue as job") == 2 and "submitted as job" not in again.stderr
    finally:
        for job in jobs:
            subprocess.run(["scancel", job], timeout=30)
        # the drivers wait on their jobs' states, which this test cluster (no accounting) never reports
        # once a job is cancelled: end them with the test
        import psutil

        for proc in psutil.process_iter(["cmdline"]):
            if str(tmp_path) in " ".join(proc.info["cmdline"] or []) and "--one-geometry" in (proc.info["cmdline"] or []):
                proc.kill()
