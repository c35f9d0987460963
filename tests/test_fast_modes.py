"""Each framework's optional fast mode runs, trains, and is recorded in the result."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path, *overrides):
    proc = subprocess.run([sys.executable, "-m", "scaling", "run", f"results_dir={tmp_path}", "progress=false",
                           "run_name=fast", "train.epochs=1", "train.max_steps_per_epoch=60",
                           "protocol.warmup_steps=10", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    record = json.loads((Path(tmp_path) / "runs" / "fast.json").read_text())
    return proc, record


@pytest.mark.parametrize("overrides", [
    ["backend=tf", "backend.steps_per_call=10"],
    ["backend=tf", "backend.jit_compile=true"],
    ["backend=tf_mirrored", "devices=2", "backend.steps_per_call=10"],
    ["backend=torch", "backend.fast=compile"],
])
def test_fast_mode_trains_and_is_recorded(tmp_path, mnist_cache, overrides):
    pytest.importorskip("tensorflow" if "tf" in overrides[0] else "torch")
    proc, rec = run(tmp_path, *overrides)
    assert proc.returncode == 0 and rec["status"] == "ok", (rec["error"] or "") + proc.stderr[-2000:]
    m = rec["metrics"]
    assert m["steps"] == 60 and m["timed_steps"] == 50
    assert m["final_test_accuracy"] > 0.8
    for key, value in (o.split("=", 1) for o in overrides[1:] if o.startswith("backend.")):
        assert str(rec["config"]["backend"][key.split(".", 1)[1]]).lower() == value


def test_xla_over_logical_cpu_devices_is_refused_with_the_reason(tmp_path, mnist_cache):
    pytest.importorskip("tensorflow")
    proc, rec = run(tmp_path, "backend=tf_mirrored", "devices=2", "backend.jit_compile=true")
    assert proc.returncode == 1 and rec["status"] == "failed"
    assert "jit_compile=true needs GPUs" in rec["error"]
