"""Every distributed backend, 2 CPU workers, real processes: ranks in sync, the same training as
one worker at the same global batch, and a killed worker ending the whole run cleanly."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scaling import records
from scaling.config import frameworks
from scaling.sharding import epoch_permutation, rank_shard

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multiprocess

# backend -> (the module it needs, its single-device twin: the tuned loop of its YAML's framework)
NEEDS = {"torch_ddp": "torch", "lightning_ddp": "pytorch_lightning", "tf_mirrored": "tensorflow",
         "tf_multiworker": "tensorflow", "horovod_torch": "horovod.torch", "horovod_tf": "horovod.tensorflow"}
BACKENDS = {name: (module, frameworks()[name]) for name, module in NEEDS.items()}
STEPS = 30
#: over the first STEPS steps, mean and max relative difference of the global-batch training loss
#: between 2 workers and 1 worker at the same global batch; dropout masks differ, nothing else
TRACK_MEAN, TRACK_MAX = 0.05, 0.15


def scaling_cmd(tmp, *overrides):
    return [sys.executable, "-m", "scaling", "run", f"results_dir={tmp}", "progress=false", *overrides]


def run_ok(tmp, name, *overrides):
    proc = subprocess.run(scaling_cmd(tmp, f"run_name={name}", *overrides), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    path = Path(tmp) / "runs" / f"{name}.json"
    assert path.exists(), proc.stderr[-3000:]
    record = json.loads(path.read_text())
    records.validate(record)
    assert proc.returncode == 0 and record["status"] == "ok", (record["error"] or "") + proc.stderr[-2000:]
    return record


def test_rank_shards_are_disjoint_and_cover_every_full_batch():
    n, G, world = 1000, 64, 4
    perm = epoch_permutation(n, 0, 3)
    shards = [rank_shard(perm, G, r, G // world) for r in range(world)]
    union = np.concatenate(shards)
    assert len(union) == len(set(union.tolist())) == (n // G) * G  # disjoint, every full batch
    assert set(union.tolist()) == set(perm[: (n // G) * G].tolist())
    # step s of rank r is the r-th slice of the one-worker run's step s
    b = G // world
    for s in (0, 7, n // G - 1):
        together = np.concatenate([sh[s * b:(s + 1) * b] for sh in shards])
        assert (together == perm[s * G:(s + 1) * G]).all()
    assert not (epoch_permutation(n, 0, 4) == perm).all()


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("workload, devices", [("mlp", 2), ("cnn", 2), ("cnn", 1)])
def test_workers_train_in_sync(tmp_path, mnist_cache, backend, workload, devices):
    pytest.importorskip(BACKENDS[backend][0])
    steps = 20 if workload == "mlp" else 8
    rec = run_ok(tmp_path, "sync", f"backend={backend}", f"devices={devices}", f"workload={workload}",
                 "train.epochs=2", f"train.max_steps_per_epoch={steps}", "protocol.warmup_steps=5")
    m = rec["metrics"]
    assert m["devices"] == devices and m["global_batch"] == 64 * devices and m["per_device_batch"] == 64
    assert m["steps"] == 2 * steps and len(m["test_accuracy_per_epoch"]) == 2
    # every replica of every rank holds the same parameters at the end
    digests = [d for r in rec["ranks"] for d in r["param_digests"]]
    assert len(digests) == devices and len(set(digests)) == 1, rec["ranks"]
    assert m["ranks_in_sync"] is (True if devices > 1 else None)  # one replica: nothing to compare
    # forked from a server holding the framework imported (Horovod's ranks through horovod_gloo)
    assert m["conditions"]["start"]["mode"] == "warm", m["conditions"]
    assert m["startup_s"] >= m["conditions"]["start"]["import_s"] > 0
    # every multi-process backend marks its collective for the rank clock, inside its step
    clock = m.get("rank_clock")
    if devices > 1 and backend != "tf_mirrored":  # Mirrored: both replicas in one process
        assert clock["note"] is None and clock["waiting_s"] >= 0 and clock["marks_outside_step"] == 0, clock
        assert (clock["in_collective_s"] is None) == (backend == "tf_multiworker"), clock  # Keras reduces unseen
    else:
        assert clock is None


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_workers_track_one_worker_at_the_same_global_batch(tmp_path, mnist_cache, backend):
    pytest.importorskip(BACKENDS[backend][0])
    common = ["train.epochs=1", f"train.max_steps_per_epoch={STEPS}", "protocol.log_every=1",
              "protocol.warmup_steps=0", "scaling=strong", "train.global_batch=64"]
    one = run_ok(tmp_path, "one", f"backend={BACKENDS[backend][1]}", "devices=1", *common)
    two = run_ok(tmp_path, "two", f"backend={backend}", "devices=2", *common)
    assert two["metrics"]["per_device_batch"] == 32 and two["metrics"]["global_batch"] == 64
    a = np.array([v for _, v in one["metrics"]["train_loss"]])
    b = np.array([v for _, v in two["metrics"]["train_loss"]])
    assert len(a) == len(b) == STEPS
    rel = np.abs(a - b) / a
    assert rel.mean() <= TRACK_MEAN and rel.max() <= TRACK_MAX, (a.round(3), b.round(3))
    assert b[-1] < b[0] * 0.8  # and it is learning


def test_strong_scaling_batch_must_divide(tmp_path):
    proc = subprocess.run(scaling_cmd(tmp_path, "backend=torch_ddp", "devices=3", "scaling=strong",
                                      "train.global_batch=64"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "global batch 64 does not divide over 3 devices" in proc.stderr
    assert not list(Path(tmp_path).rglob("*.json"))


def test_single_device_backend_refuses_two_devices(tmp_path):
    proc = subprocess.run(scaling_cmd(tmp_path, "backend=torch", "devices=2"), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "trains on 1 device(s), not 2" in proc.stderr


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_killed_worker_fails_the_run_and_leaves_nothing_behind(tmp_path, mnist_cache, backend):
    pytest.importorskip(BACKENDS[backend][0])
    victim = 0 if backend == "tf_mirrored" else 1  # tf_mirrored is one process holding both devices
    proc = subprocess.Popen(scaling_cmd(tmp_path, f"backend={backend}", "devices=2", "run_name=kill",
                                        "data=synthetic", "train.epochs=100"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    run_dir = Path(tmp_path) / "runs" / ".kill.run"
    seen: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            for f in run_dir.glob("rank*.pid.json"):
                try:
                    info = json.loads(f.read_text())
                except ValueError:
                    continue
                seen[info["rank"]] = info["pid"]
                if info["rank"] == victim and info.get("phase") == "training":
                    break
            else:
                time.sleep(0.2)
                continue
            break
        else:
            pytest.fail("the victim rank never started training")
        time.sleep(2)  # mid-run
        for f in run_dir.glob("rank*.pid.json"):
            info = json.loads(f.read_text())
            seen[info["rank"]] = info["pid"]
        killed_at = time.monotonic()
        os.kill(seen[victim], signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    rec = json.loads((Path(tmp_path) / "runs" / "kill.json").read_text())
    records.validate(rec)
    assert rec["status"] == "failed"
    assert f"rank {victim}" in rec["error"], rec["error"]
    assert (Path(tmp_path) / "runs" / "kill.hydra" / "config.yaml").is_file()  # saved even when rank 0 died
    assert not run_dir.exists()
    time.sleep(0.5)
    assert not [pid for pid in seen.values() if _alive(pid)], seen
