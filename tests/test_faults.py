"""Bad inputs and faults: each one refused up front or ended with a clear message and a whole,
strict record, and nothing written outside the results folder (RELIABILITY.md lists them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaling import records
from scaling.config import CONF_DIR, ConfigError, validate

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["data=synthetic", "train.epochs=1", "train.max_steps_per_epoch=30", "protocol.warmup_steps=5",
         "progress=false", "logger=none"]


def compose(*overrides: str) -> dict:
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return OmegaConf.to_container(hydra_compose("config", overrides=list(overrides)), resolve=True)


def scaling(verb: str, *args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="120", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "scaling", verb, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---- names and paths ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../outside", "../../x", "/some/dir/x", "a/b", "x" * 300, "[red]x", ""])
def test_run_names_that_are_paths_or_too_long_are_refused(name):
    with pytest.raises(ConfigError, match="run_name="):
        validate(compose(f"run_name='{name}'"))


def test_record_paths_stay_inside_the_results_folder(tmp_path):
    with pytest.raises(records.RecordError, match="outside the results folder"):
        records.record_path(tmp_path / "results", "runs", "../../outside")
    assert records.record_path(tmp_path, "runs", "ok-name") == tmp_path / "runs" / "ok-name.json"


def test_run_name_outside_is_refused_by_the_command_before_anything_runs(tmp_path):
    results = tmp_path / "results"
    proc = scaling("run", f"results_dir={results}", "run_name=../outside", *QUICK, timeout=120)
    assert proc.returncode == 2 and "run_name='../outside'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.json"))


def test_results_dir_that_is_a_file_fails_before_training(tmp_path):
    pytest.importorskip("torch")
    from scaling import worker

    blocker = tmp_path / "results"
    blocker.write_text("not a folder\n")
    cfg = compose(f"results_dir={blocker}", *QUICK)
    with pytest.raises(ConfigError, match="cannot write records"):
        worker.run(cfg)
    from scaling.launch.local import launch

    with pytest.raises(ConfigError, match="cannot write records"):
        launch(compose(f"results_dir={blocker}", "backend=torch_ddp", "devices=2", *QUICK))
    assert blocker.read_text() == "not a folder\n"


# ---- runs that trained or measured nothing, diverged runs, strict records --------------------

@pytest.mark.parametrize("overrides, message", [
    (["train.per_device_batch=70000"], "larger than the 60,000 training images"),
    (["train.epochs=1", "train.max_steps_per_epoch=10"], "no step would be timed"),
    (["train.lr=nan"], "train.lr=nan"),
])
def test_runs_that_would_train_or_measure_nothing_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(*overrides))


def test_a_run_without_a_timed_step_is_failed_not_ok():
    from scaling.protocol import Measurement, ProtocolConfig
    from scaling.worker import _not_measured

    meter = Measurement(ProtocolConfig(warmup_steps=5), global_batch=8, devices=1)
    meter.epoch_begin(0)
    for _ in range(3):
        meter.step_begin()
        meter.step_end()
    meter.epoch_end(0)
    assert "no timed step after the 5 warm-up steps" in _not_measured(meter, meter.result(), 0)


def test_diverged_run_is_failed_and_its_record_is_strict_json(tmp_path):
    pytest.importorskip("torch")
    from scaling import worker

    cfg = compose(f"results_dir={tmp_path}", "backend=torch", "train.lr=1e30", "protocol.log_every=5",
                  "run_name=diverged", *QUICK)
    rec = worker.run(cfg)
    assert rec["status"] == "failed" and "diverged at step" in rec["error"], rec["error"]
    text = (tmp_path / "runs" / "diverged.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a record"))
    assert records.load_record(tmp_path / "runs" / "diverged.json")["status"] == "failed"


def test_records_with_nan_are_refused_on_write_and_skipped_on_read(tmp_path, capsys):
    from test_records import _record

    rec = _record()
    rec["metrics"]["final_test_loss"] = float("nan")
    with pytest.raises(records.RecordError, match="metrics.final_test_loss"):
        records.write_record(rec, tmp_path)
    bad = tmp_path / "runs" / "bad.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(rec))  # Python's json writes a bare NaN
    assert list(records.read_records(tmp_path)) == []
    assert "bad.json: skipped" in capsys.readouterr().err
    from scaling import analysis

    loaded = analysis.load(tmp_path)  # what `results show` and `report` read
    assert loaded.records == [] and "runs/bad.json: not readable JSON (ValueError), skipped" in loaded.problems


def test_a_sweep_never_takes_an_old_record_without_throughput_as_done(tmp_path):
    from scaling.sweep import finished
    from test_records import _record

    rec = _record(run_id="cell")
    rec["metrics"]["samples_per_s"] = rec["metrics"]["samples_per_s_per_device"] = None
    records.write_record(rec, tmp_path)
    assert finished(tmp_path, "runs", "cell") is None


# ---- console, Horovod ------------------------------------------------------------------

def test_error_text_with_brackets_is_printed_as_text(capsys):
    from scaling import worker
    from test_records import _record

    error = "rank 1: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"
    rec = _record(run_id="r[/x]", metrics=None, error=error)
    rec["config"] |= {"workload": {"name": "mlp"}, "data": {"name": "mnist"}}
    worker.print_summary(rec)
    assert "[/__w/pytorch/pytorch/third_party/gloo" in capsys.readouterr().out


@pytest.mark.parametrize("module, cls", [("horovod_torch", "HorovodTorch"), ("horovod_tf", "HorovodTF")])
def test_horovod_environment_after_shutdown_names_its_version(module, cls):
    pytest.importorskip("horovod")
    import importlib

    backend_cls = getattr(importlib.import_module(f"scaling.backends.{module}"), cls)
    backend = backend_cls.__new__(backend_cls)  # as after train(): Horovod shut down, size known
    backend.world = 2
    if module == "horovod_torch":
        import torch

        backend.device = torch.device("cpu")
    else:
        import horovod.tensorflow as hvd

        backend.hvd = hvd
    env = backend.environment()
    assert env["frameworks"]["horovod"] and env["horovod"]["size"] == 2 and env["horovod"]["gloo"] is not None


# ---- the sweep and report commands -----------------------------------------------------------

@pytest.mark.parametrize("args, code, says", [
    (["--help"], 0, "Powered by Hydra"),
    (["--cfg", "job"], 0, "backend:"),
    (["experiment=nope"], 1, "Could not find 'experiment/nope'"),
    (["train.epoch=1"], 1, "Could not override 'train.epoch'"),
    # a typo in a later cell's value still stops the sweep before any cell runs
    (["backend=torch,torch_ddp,nope", "devices=1,2"], 1, "Could not find 'backend/nope'"),
])
def test_sweep_answers_flags_and_typos_like_run(tmp_path, args, code, says):
    proc = scaling("sweep", *args, cwd=tmp_path, timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert says in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert ": running" not in proc.stderr  # no cell started


def test_only_a_composing_sweep_without_flags_goes_to_slurm():
    from scaling.cli import _slurm_base

    assert _slurm_base(["cluster=slurm", "backend=torch_ddp,tf_multiworker"]).cluster.name == "slurm"
    for args in (["cluster=slurm", "--cfg", "job"], ["cluster=slurm", "experiment=nope"], ["backend=torch"]):
        assert _slurm_base(args) is None


def test_sweep_without_a_valid_cell_exits_non_zero_and_leaves_no_log(tmp_path):
    proc = scaling("sweep", f"results_dir={tmp_path / 'results'}", "sweep_id=none", "backend=torch",
                   "devices=2,3", *QUICK, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "none of the 2 cell(s) is valid" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("*.log")) and not (tmp_path / "results" / "report").exists()


@pytest.mark.multiprocess
def test_sweep_with_a_failed_cell_exits_1_naming_it(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = scaling("sweep", f"results_dir={tmp_path}", "sweep_id=f", "backend=torch", "device=cuda", *QUICK,
                   cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1 cell(s) failed: torch-mlp-synthetic-weak-n1x1-r0" in proc.stderr


def test_failed_cells_are_those_with_a_failed_record(tmp_path):
    from scaling.sweep import failed_cells
    from test_records import _record

    assert failed_cells(tmp_path, "s") == []
    records.write_record(_record(run_id="good", group="s"), tmp_path)
    records.write_record(_record(run_id="bad", group="s", metrics=None, error="rank 0: boom"), tmp_path)
    records.write_record(_record(run_id="other", group="t", metrics=None, error="rank 0: boom"), tmp_path)
    assert failed_cells(tmp_path, "s") == ["bad"]


def test_report_on_a_folder_without_records_says_so_and_writes_nothing(tmp_path):
    proc = scaling("report", str(tmp_path / "mistyped"), timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "mistyped").exists()


def test_slurm_sweep_with_a_geometry_the_backend_cannot_run_is_refused_before_submission():
    from scaling.slurm import RenderError, split_sweep

    sweep = ["cluster=slurm", "cluster.gpus=false", "device=cpu", "backend=torch_ddp,tf_multiworker",
             "devices=2", "cluster.nodes=1,2", "train.epochs=1"]
    with pytest.raises(RenderError, match=r"nothing submitted.*tf_multiworker.*devices=1 cluster.nodes=2"):
        split_sweep(sweep)
    # what the message proposes does run: one CPU worker per node
    groups = split_sweep(["cluster=slurm", "cluster.gpus=false", "device=cpu", "backend=tf_multiworker",
                          "devices=1", "cluster.nodes=2,4", "train.epochs=1"])
    assert len(groups) == 2


# ---- leftovers -------------------------------------------------------------------------------

@pytest.mark.multiprocess
def test_a_killed_launcher_leaves_nothing_behind_after_the_next_run(tmp_path):
    pytest.importorskip("torch")
    from scaling.launch.local import launch

    group = tmp_path / "runs"
    # what a launcher killed with SIGKILL leaves: its hidden folder and an empty log
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = group / ".killed.run"
    stale.mkdir(parents=True)
    records.write_json_atomic(stale / "launcher.json", {"pid": dead.pid, "host": os.uname().nodename})
    (group / "killed.log").write_text("")
    rec = launch(compose(f"results_dir={tmp_path}", "backend=torch", "run_name=next", *QUICK))
    assert rec["status"] == "ok", rec["error"]
    left = sorted(p.name for p in group.iterdir())
    assert "next.json" in left and not [n for n in left if n.startswith(".") or "killed" in n], left
    assert all((group / n).stat().st_size for n in left if n.endswith(".log")), left
