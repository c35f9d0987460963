"""End-to-end single-device runs through the real CLI: config -> real MNIST -> framework -> record."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaling import records
from scaling.config import frameworks

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["torch", "tf", "torch_textbook", "tf_textbook"]


def scaling_run(tmp_path, *overrides, timeout=600):
    env = dict(os.environ, COLUMNS="120")
    cmd = [sys.executable, "-m", "scaling", "run", f"results_dir={tmp_path}", "progress=false", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def only_record(results_dir):
    found = list(records.read_records(results_dir))
    assert len(found) == 1, [str(p) for p, _ in found]
    path, record = found[0]
    records.validate(record)
    return record


def _framework_available(backend):
    pytest.importorskip({"tf": "tensorflow", "torch": "torch"}[frameworks()[backend]])


@pytest.mark.parametrize("backend", ["torch", "tf"])
def test_one_epoch_reaches_93_percent(tmp_path, mnist_cache, backend):
    _framework_available(backend)
    proc = scaling_run(tmp_path, f"backend={backend}", "train.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = only_record(tmp_path)
    m = rec["metrics"]
    assert rec["status"] == "ok" and rec["error"] is None
    assert m["final_test_accuracy"] >= 0.93
    assert m["steps"] == 60000 // 64 == m["steps_per_epoch"]
    assert m["timed_steps"] == m["steps"] - 20
    assert m["samples_per_s"] > 0 and m["step_time_s"]["p95"] >= m["step_time_s"]["p50"] > 0
    assert m["startup_s"] > 0
    assert rec["config"]["backend"]["name"] == backend
    assert rec["environment"]["cpu_count"] >= 1
    assert rec["environment"]["threads"] == 1  # threads pinned, not the framework default
    assert "samples/s" in proc.stdout  # the summary table


@pytest.mark.parametrize("backend", ["torch_textbook", "tf_textbook"])
def test_textbook_baselines_run_and_record(tmp_path, mnist_cache, backend):
    _framework_available(backend)
    proc = scaling_run(tmp_path, f"backend={backend}", "train.epochs=1", "train.max_steps_per_epoch=60")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = only_record(tmp_path)["metrics"]
    assert m["steps"] == 60 and m["timed_steps"] == 40
    assert m["final_test_accuracy"] > 0.5


@pytest.mark.parametrize("backend", ["torch", "tf"])
def test_cnn_short_run(tmp_path, mnist_cache, backend):
    _framework_available(backend)
    proc = scaling_run(tmp_path, f"backend={backend}", "workload=cnn", "train.epochs=1",
                       "train.max_steps_per_epoch=40", "protocol.warmup_steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = only_record(tmp_path)
    assert rec["config"]["workload"]["parameters"] == 1_199_882
    assert rec["metrics"]["timed_steps"] == 35


def test_synthetic_data_needs_no_cache(tmp_path):
    pytest.importorskip("torch")
    proc = scaling_run(tmp_path, "data=synthetic", "data.cache_dir=/nonexistent/never", "train.epochs=1",
                       "train.max_steps_per_epoch=30", "protocol.warmup_steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert only_record(tmp_path)["config"]["data"]["name"] == "synthetic"


@pytest.mark.parametrize("override, message", [
    ("backend=nope", "Could not find 'backend/nope'"),
    ("data=imagenet", "Could not find 'data/imagenet'"),
    ("workload=resnet", "Could not find 'workload/resnet'"),
    ("train.per_device_batch=0", "train.per_device_batch=0: must be a positive integer"),
    ("train.per_device_batch=-64", "train.per_device_batch=-64: must be a positive integer"),
    ("train.epochs=0", "train.epochs=0"),
    ("train.lr=-1", "train.lr=-1"),
    ("device=tpu", "device='tpu'"),
    ("protocol.target_accuracy=1.5", "protocol.target_accuracy=1.5"),
])
def test_bad_overrides_fail_before_training_and_write_nothing(tmp_path, override, message):
    proc = scaling_run(tmp_path, override, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Available options" in proc.stderr or "Fix" in proc.stderr or "must be" in proc.stderr
    assert not list(Path(tmp_path).rglob("*.json"))


def test_failure_writes_failed_record(tmp_path, mnist_cache):
    pytest.importorskip("torch")
    # A CUDA run on a machine without CUDA fails inside the backend: the record says why.
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = scaling_run(tmp_path, "device=cuda", "train.epochs=1")
    assert proc.returncode == 1
    rec = only_record(tmp_path)
    assert rec["status"] == "failed" and rec["metrics"] is None
    assert "no CUDA device" in rec["error"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "tf"])
def test_five_epochs_reach_97_percent(tmp_path, mnist_cache, backend):
    _framework_available(backend)
    proc = scaling_run(tmp_path, f"backend={backend}", "train.epochs=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = only_record(tmp_path)["metrics"]
    assert len(m["test_accuracy_per_epoch"]) == 5
    assert m["final_test_accuracy"] >= 0.97
    assert m["time_to_accuracy_s"] is not None and m["epochs_to_accuracy"] <= 5
