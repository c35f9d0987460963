"""W&B tracking: secrets scrubbed, modes, a failing W&B never fails a run, and what offline runs
logged (read back with ``wandb leet inspect --json``) equals the local records."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scaling import records, tracking, tracking_sweep

ROOT = Path(__file__).resolve().parent.parent
#: 40 characters like a real W&B key; offline runs never send it anywhere
PLANTED_KEY = "plantedkey0123456789abcdef0123456789abcd"
#: a second secret, typed into a config override (so it reaches argv and the config)
PLANTED_OVERRIDE = "plantedoverride9876543210fedcba98765432"
QUICK = ["train.epochs=1", "train.max_steps_per_epoch=100", "protocol.log_every=10"]


# ---- helpers --------------------------------------------------------------------------------

def scaling(verb, tmp, *overrides, env=None, timeout=600):
    env = dict(os.environ if env is None else env, COLUMNS="120")
    cmd = [sys.executable, "-m", "scaling", verb, f"results_dir={tmp}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def clean_env(**extra):
    """This process's environment without any W&B settings (no real key, mode or server), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["NETRC"] = os.devnull  # a developer's `wandb login` must not switch these runs online
    env.update(extra)
    return env


class Logged:
    """What one W&B run directory holds, from ``wandb leet inspect --json``."""

    def __init__(self, run_dir: Path) -> None:
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        self.dir = run_dir
        self.items = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        runs = [i["run"] for i in self.items if i["type"] == "run"]
        assert len(runs) == 1
        self.run = runs[0]
        self.config = dict(self.run.get("config", {}).get("update", {}))
        self.summary: dict = {}
        self.history: list[dict] = []
        self.exit_code = None
        for item in self.items:
            if item["type"] == "config":
                self.config.update(item["config"].get("update", {}))
            elif item["type"] == "summary":
                self.summary.update(item["summary"].get("update", {}))
            elif item["type"] == "history":
                self.history.append(item["history"]["item"])
            elif item["type"] == "exit":
                self.exit_code = item["exit"]["exit_code"]

    def rows(self, key: str) -> list[dict]:
        return [r for r in self.history if key in r]


def wandb_runs(results_dir: Path, pattern: str = "offline-run-*") -> dict[str, Logged]:
    """Every offline run under ``<results_dir>/wandb``, by display name."""
    found = {}
    for d in sorted((results_dir / "wandb").glob(pattern)):
        if list(d.glob("*.wandb")):
            logged = Logged(d)
            assert logged.run["display_name"] not in found, f"two runs named {logged.run['display_name']}"
            found[logged.run["display_name"]] = logged
    return found


def files_containing(root: Path, needle: str) -> list[str]:
    """Every regular file under ``root`` (symlinks not followed) whose bytes contain ``needle``."""
    hits = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                continue
            if needle.encode() in path.read_bytes():
                hits.append(str(path.relative_to(root)))
    return hits


def only_record(results_dir: Path) -> dict:
    found = list(records.read_records(results_dir))
    assert len(found) == 1, [str(p) for p, _ in found]
    records.validate(found[0][1])
    return found[0][1]


# ---- secrets, modes, summaries (no processes) -----------------------------------------------

def test_scrub_secrets_redacts_named_values_known_values_and_assignments(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", PLANTED_KEY)
    monkeypatch.setenv("NETRC", os.devnull)
    obj = {
        "logger": {"api_key": "abc123secretvalue", "project": "scaling", "tokens_per_s": 5.0, "max_tokens": "all"},
        "environment": {"argv": ["scaling run", f"+logger.api_key={PLANTED_OVERRIDE}", "backend=torch",
                                 f"WANDB_API_KEY={PLANTED_KEY}"], "password": ""},
        "error": f"auth failed for key {PLANTED_KEY}",
        "again": "abc123secretvalue appears here too",
        "metrics": {"samples_per_s": 1.5, "steps": 3, "tokenizer": "none"},
        "pairs": [(1, 0.5)],
    }
    out = tracking.scrub_secrets(obj)
    text = json.dumps(out)
    for secret in (PLANTED_KEY, PLANTED_OVERRIDE, "abc123secretvalue"):
        assert secret not in text
    assert out["logger"] == {"api_key": "***", "project": "scaling", "tokens_per_s": 5.0, "max_tokens": "all"}
    assert out["environment"]["argv"] == ["scaling run", "+logger.api_key=***", "backend=torch", "WANDB_API_KEY=***"]
    assert out["environment"]["password"] == ""
    assert out["metrics"] == obj["metrics"] and out["pairs"] == [(1, 0.5)]
    assert obj["logger"]["api_key"] == "abc123secretvalue"  # a copy: the input is untouched


def test_mode_auto_is_offline_without_a_key_and_online_with_one(monkeypatch, tmp_path):
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.resolve_mode("auto") == "offline"
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {PLANTED_KEY}\n")
    (tmp_path / "netrc").chmod(0o600)
    assert tracking.resolve_mode("auto") == "online"
    assert PLANTED_KEY in tracking.known_secrets()  # the netrc key is scrubbed too
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", PLANTED_KEY)
    assert tracking.resolve_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode("auto") == "disabled"
    assert tracking.resolve_mode("offline") == "offline"  # an explicit mode wins
    with pytest.raises(ValueError, match="logger.mode"):
        tracking.resolve_mode("sometimes")


def test_no_tracker_without_logger_wandb():
    cfg = {"logger": {"name": "none"}, "backend": {"name": "torch"}, "results_dir": "/nonexistent"}
    assert tracking.make_tracker(cfg, "r", "g") is None
    assert tracking.make_tracker({**cfg, "logger": {"name": "wandb", "mode": "disabled"}}, "r", "g") is None


class _BrokenRun:
    """A W&B run that starts, then fails on every call, as when its service dies mid-run."""

    dir = "/nonexistent/files"

    def __init__(self):
        self.calls = []

    def define_metric(self, *a, **k):
        self.calls.append("define_metric")

    def __getattr__(self, name):
        def fail(*a, **k):
            self.calls.append(name)
            raise ConnectionError("server error 500")
        return fail


def test_a_run_failing_mid_training_warns_once_and_never_raises(capsys):
    run = _BrokenRun()
    tracker = tracking.WandbTracker(run)
    assert tracker.active
    tracker.logged(10, {"step_time_s": 0.1, "samples_per_s": 640.0})
    tracker.logged(20, {"step_time_s": 0.1, "samples_per_s": 640.0})
    tracker.evaluated(0, 0.5, 0.9)
    tracker.finish({"status": "ok", "metrics": {"samples_per_s": 1.0}, "environment": {}, "error": None})
    tracker.close()
    err = capsys.readouterr().err
    assert err.count("scaling: W&B:") == 1 and "server error 500" in err and "local record is kept" in err
    # off after the first failure: no retries that could stall training
    assert run.calls == ["define_metric", "define_metric", "log"]
    assert not tracker.active


def _rec(backend, devices, thr, repeat=0, status="ok", workload="mlp"):
    return {"run_id": f"{backend}-n{devices}-r{repeat}", "status": status, "error": None if status == "ok" else "boom",
            "config": {"backend": {"name": backend}, "workload": {"name": workload}, "data": {"name": "mnist"},
                       "scaling": "weak", "devices": devices, "cluster": {"nodes": 1}, "repeat": repeat},
            "metrics": {"samples_per_s": thr, "samples_per_s_per_device": thr / devices,
                        "step_time_s": {"p50": 0.01}, "final_test_accuracy": 0.9, "time_to_accuracy_s": None}
            if status == "ok" else None}


def test_sweep_rows_speedup_and_efficiency_against_the_median_at_one_device():
    recs = [_rec("ddp", 1, 100.0), _rec("ddp", 1, 300.0, repeat=1), _rec("ddp", 1, 150.0, repeat=2),
            _rec("ddp", 2, 300.0), _rec("ddp", 4, 400.0),
            _rec("ddp", 4, 0.0, repeat=1, status="failed"), _rec("hvd", 2, 50.0), _rec("hvd", 4, 75.0)]
    rows = {r["cell"]: r for r in tracking_sweep.sweep_rows(recs)}
    assert len(rows) == 8 and list(tracking_sweep.TABLE_COLUMNS) == list(next(iter(rows.values())))
    assert rows["ddp-n2-r0"]["speedup"] == pytest.approx(2.0)  # 300 / median(100, 300, 150)
    assert rows["ddp-n2-r0"]["efficiency"] == pytest.approx(1.0)
    assert rows["ddp-n4-r0"]["efficiency"] == pytest.approx(400 / 150 / 4)
    assert rows["hvd-n4-r0"]["speedup"] is None  # no N = 1 run: no speedup (not one over its fewest devices)
    assert rows["ddp-n4-r1"]["speedup"] is None and rows["ddp-n4-r1"]["error"] == "boom"
    assert rows["ddp-n2-r0"]["layout"] == "2x1" and rows["ddp-n2-r0"]["variant"] == "defaults"
    xs, ys, keys = tracking_sweep.sweep_lines(list(rows.values()), "samples_per_s")
    # the median of the repeats, never their mean (rates)
    assert keys == ["ddp", "hvd"] and xs == [[1, 2, 4], [2, 4]] and ys == [[150.0, 300.0, 400.0], [50.0, 75.0]]
    # a layout of its own: 2 devices on 2 nodes is a line apart from 4 devices on 1 node
    two_nodes = _rec("ddp", 2, 380.0, repeat=0)
    two_nodes["config"]["cluster"]["nodes"] = 2
    two_nodes["run_id"] = "ddp-n2x2-r0"
    _, _, keys = tracking_sweep.sweep_lines(tracking_sweep.sweep_rows(recs + [two_nodes]), "speedup")
    assert keys == ["ddp/1 nodes", "ddp/2 nodes"]
    # a second workload splits the lines
    _, _, keys = tracking_sweep.sweep_lines(tracking_sweep.sweep_rows(recs + [_rec("ddp", 1, 10.0, workload="cnn")]), "speedup")
    assert keys == ["ddp/cnn", "ddp/mlp"]  # hvd has no N = 1 run, so no speedup line


def test_flatten_names_nested_figures_in_wandb_sections():
    flat = tracking.flatten({"step_time_s": {"p50": 1.0, "n": 3}, "train_loss": [(10, 0.5)], "x": None})
    assert flat == {"step_time_s/p50": 1.0, "step_time_s/n": 3, "train_loss": [[10, 0.5]], "x": None}


def test_cell_runs_are_tagged_with_what_they_are():
    cfg = {"backend": {"name": "torch_ddp", "framework": "torch"}, "device": "cpu", "variant": "tuned",
           "workload": {"name": "mlp"}}
    assert tracking.run_tags(cfg) == ["torch_ddp", "torch", "cpu", "tuned", "mlp"]
    assert tracking.run_tags({**cfg, "device": "cuda", "variant": None})[2:4] == ["gpu", "defaults"]


# ---- real offline runs, read back -----------------------------------------------------------

@pytest.fixture(scope="module", params=["torch", "torch_ddp"])
def offline_run(request, tmp_path_factory, mnist_cache):
    """One offline-logged run with a planted API key in the environment and another in an override:
    torch runs in the command's own process (rank 0 holds the W&B run), torch_ddp under torchrun
    (the local launcher holds it while rank 0 keeps its history rows)."""
    pytest.importorskip("torch")
    pytest.importorskip("wandb")
    tmp = tmp_path_factory.mktemp("wandb_run")
    home = tmp_path_factory.mktemp("home")  # to see that W&B writes nothing into the home directory
    repo_wandb = (ROOT / "wandb").exists()
    env = clean_env(WANDB_API_KEY=PLANTED_KEY, HOME=str(home), SCALING_CACHE=str(mnist_cache))
    proc = scaling("run", tmp, f"backend={request.param}", "logger=wandb", "logger.mode=offline", "progress=false",
                   f"+logger.api_key={PLANTED_OVERRIDE}", *QUICK, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [str(p) for p in home.rglob("*") if "wandb" in p.name.lower()] == []
    assert (ROOT / "wandb").exists() == repo_wandb, "W&B wrote into the working directory"
    return tmp, proc


@pytest.mark.multiprocess
def test_offline_run_logs_what_the_record_holds(offline_run):
    tmp, proc = offline_run
    rec = only_record(tmp)
    m = rec["metrics"]
    runs = wandb_runs(tmp)
    assert list(runs) == [rec["run_id"]], "one W&B run, named after the cell, under <results_dir>/wandb"
    logged = runs[rec["run_id"]]
    assert str(logged.dir.name).startswith("offline-run-")
    backend = rec["config"]["backend"]["name"]
    # where it is and how to upload it: on the console, or in the run's log when a quiet launcher held it
    said = proc.stderr if backend == "torch" else (tmp / "runs" / f"{rec['run_id']}.log").read_text()
    assert f"wandb sync {logged.dir}" in said
    assert logged.run["run_group"] == rec["group"] == "runs" and logged.run["job_type"] == backend
    assert logged.config["backend"]["name"] == backend and logged.config["protocol"]["log_every"] == 10
    assert logged.config["environment"]["host"] == rec["environment"]["host"]
    assert logged.config["environment"]["frameworks"] == rec["environment"]["frameworks"]
    assert logged.exit_code == 0 and logged.summary["status"] == "ok"

    # summary: every protocol figure, equal to the record's; the loss curve is history only
    assert logged.summary["samples_per_s"] == m["samples_per_s"]
    assert logged.summary["final_test_accuracy"] == m["final_test_accuracy"]
    # (the cell's wall time, cell_time_s, is taken as W&B's own finish begins: the record's is later)
    for key, value in tracking.flatten({k: v for k, v in m.items() if k not in ("train_loss", "cell_time_s")}).items():
        assert logged.summary[key] == value, key
    if "cell_time_s" in m:
        assert 0 < logged.summary["cell_time_s/wall"] <= m["cell_time_s"]["wall"]
    assert "train_loss" not in logged.summary and "step_time_s/p50" in logged.summary
    assert {backend, "torch", "cpu", "defaults", "mlp"} <= set(logged.run.get("tags") or [])

    # history: step time and throughput every log_every steps once warm (20 warm-up steps)
    timing = logged.rows("perf/step_time_s")
    assert [r["step"] for r in timing] == list(range(30, 101, 10))
    for r in timing:
        assert r["perf/samples_per_s"] == pytest.approx(m["global_batch"] / r["perf/step_time_s"])
        assert r["epoch"] == 0
    # equal windows of 10 steps: their mean is the record's mean step time
    assert sum(r["perf/step_time_s"] for r in timing) / len(timing) == pytest.approx(m["step_time_s"]["mean"], rel=1e-9)
    loss = logged.rows("train/loss")
    assert [[r["step"], r["train/loss"]] for r in loss] == [list(p) for p in m["train_loss"]]
    evals = logged.rows("test/accuracy")
    assert [r["test/accuracy"] for r in evals] == m["test_accuracy_per_epoch"]
    assert [r["test/loss"] for r in evals] == m["test_loss_per_epoch"]
    assert [r["step"] for r in evals] == [100]


@pytest.mark.multiprocess
def test_api_key_is_in_no_file_and_no_output(offline_run):
    tmp, proc = offline_run
    rec = only_record(tmp)
    # the check can see inside W&B's transaction log: a harmless logged string is there
    assert files_containing(tmp / "wandb", rec["run_id"])
    for secret in (PLANTED_KEY, PLANTED_OVERRIDE):
        assert files_containing(tmp, secret) == [], secret
        assert secret not in proc.stdout and secret not in proc.stderr
    assert rec["config"]["logger"]["api_key"] == "***"
    if rec["config"]["backend"]["name"] == "torch":  # run in the command's process: its argv is the command's
        assert "+logger.api_key=***" in rec["environment"]["argv"]
    # the config and overrides saved beside the record are scrubbed too
    folder = records.config_folder(tmp, rec["group"], rec["run_id"])
    assert "+logger.api_key=***" in yaml.safe_load((folder / "overrides.yaml").read_text())
    assert yaml.safe_load((folder / "config.yaml").read_text())["logger"]["api_key"] == "***"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_unreachable_wandb_does_not_fail_or_stall_the_run(tmp_path, mnist_cache):
    pytest.importorskip("torch")
    pytest.importorskip("wandb")
    env = clean_env(WANDB_API_KEY=PLANTED_KEY, WANDB_MODE="online", WANDB_BASE_URL=f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    proc = scaling("run", tmp_path, "backend=torch", "logger=wandb", "logger.init_timeout=3", "progress=false", *QUICK,
                   env=env, timeout=300)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = only_record(tmp_path)
    assert rec["status"] == "ok" and rec["metrics"]["final_test_accuracy"] is not None
    assert proc.stderr.count("scaling: W&B:") == 1, proc.stderr[-3000:]  # warned once
    assert "could not start an online run" in proc.stderr
    assert took < 120, f"a dead W&B server stalled the run for {took:.0f} s"
    # the wait for W&B is measured apart, bounded by init_timeout (then the offline start), and
    # not part of the startup figure
    m = rec["metrics"]
    assert 0 < m["tracker_start_s"] < 3 + 30, m["tracker_start_s"]
    assert m["startup_s"] + m["tracker_start_s"] < took
    # the data is kept offline, for `wandb sync` once the server is back
    logged = wandb_runs(tmp_path)[rec["run_id"]]
    assert logged.summary["samples_per_s"] == rec["metrics"]["samples_per_s"]
    assert files_containing(tmp_path, PLANTED_KEY) == []


@pytest.mark.multiprocess
def test_sweep_logs_rank0_cell_runs_and_a_summary_run(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("wandb")
    proc = scaling("sweep", tmp_path, "sweep_id=w", "backend=torch,torch_ddp", "devices=1,2", "data=synthetic",
                   "train.epochs=1", "train.max_steps_per_epoch=20", "protocol.warmup_steps=5", "logger=wandb",
                   env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {rec["run_id"]: rec for _, rec in records.read_records(tmp_path) if rec["group"] == "w"}
    assert len(recs) == 3  # torch on 2 devices is not a valid cell
    runs = wandb_runs(tmp_path)
    # one run per cell (the 2-process DDP cell logs from rank 0 only), plus the summary run
    assert set(runs) == set(recs) | {"w-summary"}
    for run_id, rec in recs.items():
        logged = runs[run_id]
        assert logged.run["run_group"] == "w" and logged.run["job_type"] == rec["config"]["backend"]["name"]
        assert logged.summary["samples_per_s"] == rec["metrics"]["samples_per_s"]

    # the console says once where the runs are and how to upload them (each cell's note stays in its log)
    assert "scaling: W&B offline run" not in proc.stderr
    assert f"[sweep] W&B: {len(runs)} offline run(s) under" in proc.stderr and "wandb sync" in proc.stderr
    summary = runs["w-summary"]
    assert summary.run["run_group"] == "w" and summary.run["job_type"] == "summary" and summary.exit_code == 0
    assert summary.summary["cells_total"] == 3 and summary.summary["cells_ok"] == 3
    # where the time goes (scaling.decomposition): torch_ddp's N=2 step and its N=1 compute
    [ddp1] = [r["metrics"] for r in recs.values() if r["config"]["backend"]["name"] == "torch_ddp" and r["config"]["devices"] == 1]
    assert summary.summary["where/torch_ddp/N2/compute_s"] == pytest.approx(ddp1["global_batch"] / ddp1["samples_per_s"])
    # the table stays the "cells" key (a count logged there would replace it in W&B's summary)
    assert "cells" not in summary.summary and summary.summary["cells._type"] == "table-file"
    assert summary.config["backends"] == ["torch", "torch_ddp"] and summary.config["devices"] == [1, 2]
    assert "backend" not in summary.config  # the sweep, not one cell's config
    [row] = summary.rows("cells._type")
    table = json.loads((summary.dir / "files" / row["cells.path"]).read_text())
    cells = {r[0]: dict(zip(table["columns"], r)) for r in table["data"]}
    assert set(cells) == set(recs)
    for run_id, rec in recs.items():
        assert cells[run_id]["samples_per_s"] == rec["metrics"]["samples_per_s"]
        assert cells[run_id]["total_devices"] == rec["config"]["devices"]
    ddp = {c["total_devices"]: c for c in cells.values() if c["backend"] == "torch_ddp"}
    assert ddp[1]["speedup"] == 1.0 and ddp[1]["efficiency"] == 1.0
    assert ddp[2]["speedup"] == pytest.approx(ddp[2]["samples_per_s"] / ddp[1]["samples_per_s"])
    assert ddp[2]["efficiency"] == pytest.approx(ddp[2]["speedup"] / 2)
    for plot in ("throughput", "speedup", "efficiency"):
        assert f"_wandb.visualize.{plot}_vs_devices" in summary.config, plot
        [row] = summary.rows(f"{plot}_vs_devices_table._type")
        lines = json.loads((summary.dir / "files" / row[f"{plot}_vs_devices_table.path"]).read_text())
        assert lines["columns"] == ["step", "lineKey", "lineVal"]
        assert {key for _, key, _ in lines["data"]} == {"torch", "torch_ddp"}  # one line per backend
        assert {(key, x) for x, key, _ in lines["data"]} == {("torch", 1), ("torch_ddp", 1), ("torch_ddp", 2)}
