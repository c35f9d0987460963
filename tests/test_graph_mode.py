"""``backend.fast=graph``: the whole-step CUDA graph. Capture needs a GPU (bench/gpu_check.sh);
here the step it captures is checked eagerly against the plain loop, and CPU runs are refused."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _steps(kind, geometry, x, y, n):
    import torch

    from scaling.backends import torch_common as tc
    from scaling.workloads import torch_models

    torch.manual_seed(0)
    model = torch_models.build("mlp", 10)
    optimizer = tc.make_adam(model.parameters(), geometry, x.device, graph=kind == "graph")
    if kind == "graph":
        steps = tc.GraphedSteps(model, optimizer, x, y, geometry, seed=3, rank=1, capture=False)
    else:
        steps = tc.ShardedSteps(model, optimizer, x, y, geometry, seed=3, rank=1)
    losses = []
    torch.manual_seed(1)  # the same dropout masks in both loops
    for epoch in range(2):
        steps.begin_epoch(epoch)
        for _ in range(n):
            steps.run(1)
            losses.append(float(steps.last_loss.detach()))
    return model, losses, optimizer


def test_graphed_step_trains_the_same_batches_and_learning_rates_as_the_eager_loop():
    torch = pytest.importorskip("torch")
    from scaling.geometry import Geometry

    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (512,), generator=g)
    # 2 ranks x 16, a learning-rate warm-up over 5 steps: rank 1's slices, the schedule inside the step
    geometry = Geometry(devices=2, per_device_batch=16, global_batch=32, base_lr=1e-3, lr=4e-3,
                        lr_scaling="linear", lr_warmup_steps=5)
    eager_model, eager_losses, eager_opt = _steps("eager", geometry, x, y, 12)
    graph_model, graph_losses, graph_opt = _steps("graph", geometry, x, y, 12)
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    for a, b in zip(eager_model.parameters(), graph_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(graph_opt.param_groups[0]["lr"]) == pytest.approx(eager_opt.param_groups[0]["lr"]) == 4e-3


def test_graph_capture_is_refused_on_a_cpu_tensor():
    torch = pytest.importorskip("torch")
    from scaling.backends import torch_common as tc
    from scaling.geometry import Geometry

    geometry = Geometry(devices=1, per_device_batch=4, global_batch=4, base_lr=1e-3, lr=1e-3,
                        lr_scaling="none", lr_warmup_steps=0)
    model = torch.nn.Linear(4, 2)
    opt = tc.make_adam(model.parameters(), geometry, torch.device("cpu"), graph=True)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        tc.GraphedSteps(model, opt, torch.zeros(8, 4), torch.zeros(8, dtype=torch.long), geometry, seed=0)


def _run(tmp_path, *overrides):
    return subprocess.run([sys.executable, "-m", "scaling", "run", f"results_dir={tmp_path}", "progress=false",
                           "logger=none", "run_name=graph", "train.epochs=1", "train.max_steps_per_epoch=30",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_graph_mode_on_a_cpu_machine_fails_with_the_reason_instead_of_training_eagerly(tmp_path, mnist_cache):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu_check.sh measures the graphed step there")
    proc = _run(tmp_path, "backend=torch", "backend.fast=graph")  # device=auto finds no GPU
    assert proc.returncode == 1
    record = json.loads((tmp_path / "runs" / "graph.json").read_text())
    assert record["status"] == "failed" and record["metrics"] is None
    assert "needs a CUDA device" in record["error"]


@pytest.mark.parametrize("overrides, message", [
    (["backend=torch", "backend.fast=graph", "device=cpu"], "needs a GPU, not device=cpu"),
    (["backend=torch_ddp", "backend.fast=turbo"], "offers none, compile, graph"),
    (["backend=torch", "protocol.sync_every=0"], "protocol.sync_every=0"),
])
def test_fast_modes_and_sync_interval_are_checked_before_anything_runs(tmp_path, overrides, message):
    proc = _run(tmp_path, *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_every_torch_record_says_which_step_loop_ran(tmp_path, mnist_cache):
    pytest.importorskip("torch")
    proc = _run(tmp_path, "backend=torch")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "runs" / "graph.json").read_text())
    evidence = record["metrics"]["fast_mode"]
    assert evidence["mode"] == "none" and evidence["ran"] == "eager" and evidence["compiled_graphs"] == 0
    assert record["metrics"]["sync_every"] == 1 and record["metrics"]["syncs"] == 30
