"""Each framework's optional fast mode runs, trains, and is recorded in the result."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path, *overrides, steps=60):
    proc = subprocess.run([sys.executable, "-m", "scaling", "run", f"results_dir={tmp_path}", "progress=false",
                           "run_name=fast", "train.epochs=1", f"train.max_steps_per_epoch={steps}",
                           "protocol.warmup_steps=10", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    record = json.loads((Path(tmp_path) / "runs" / "fast.json").read_text())
    return proc, record


# what each run must leave in the record as evidence that its fast mode ran (or did not)
EVIDENCE = {
    # 61 steps in calls of 10: the final call runs 1 step through the same traced graph (no tracing
    # inside the timed region), so one graph is traced in all
    "tf spc": ({"steps_per_call": 10, "steps_per_call_run": [1, 10], "calls": 7, "graphs_traced": 1,
                "xla_compiled_calls": 0}, 61),
    "tf xla": ({"steps_per_call": 1, "steps_per_call_run": [1], "calls": 60, "graphs_traced": 1}, 60),
    "tf plain": ({"steps_per_call": 1, "steps_per_call_run": [1], "graphs_traced": 1, "xla_compiled_calls": 0}, 60),
    "mirrored spc": ({"steps_per_call": 10, "steps_per_call_run": [1, 10], "graphs_traced": 1,
                      "xla_compiled_calls": 0}, 61),
    "torch compile": ({}, 60),
}


@pytest.mark.parametrize("name, overrides", [
    ("tf spc", ["backend=tf", "backend.steps_per_call=10"]),
    ("tf xla", ["backend=tf", "backend.jit_compile=true"]),
    ("tf plain", ["backend=tf"]),
    ("mirrored spc", ["backend=tf_mirrored", "devices=2", "backend.steps_per_call=10"]),
    ("torch compile", ["backend=torch", "backend.fast=compile"]),
])
def test_fast_mode_trains_and_leaves_evidence(tmp_path, mnist_cache, name, overrides):
    pytest.importorskip("tensorflow" if "tf" in overrides[0] else "torch")
    expected, steps = EVIDENCE[name]
    proc, rec = run(tmp_path, *overrides, steps=steps)
    assert proc.returncode == 0 and rec["status"] == "ok", (rec["error"] or "") + proc.stderr[-2000:]
    m = rec["metrics"]
    assert m["steps"] == steps and m["timed_steps"] == steps - 10
    assert m["final_test_accuracy"] > 0.8
    evidence = m["fast_mode"]
    for key, value in expected.items():
        assert evidence[key] == value, (key, evidence)
    if name == "tf xla":
        assert evidence["jit_compile"] is True and evidence["xla_compiled_calls"] >= 1
    if name == "torch compile":
        assert evidence["compiled_graphs"] >= 1
    # every backend evaluates a shard per rank, with the config's threads
    assert m["conditions"]["evaluation"] == "shard" and m["conditions"]["threads"] == 1


def test_xla_over_logical_cpu_devices_is_refused_with_the_reason(tmp_path, mnist_cache):
    pytest.importorskip("tensorflow")
    proc, rec = run(tmp_path, "backend=tf_mirrored", "devices=2", "backend.jit_compile=true")
    assert proc.returncode == 1 and rec["status"] == "failed"
    assert "jit_compile=true needs GPUs" in rec["error"]
