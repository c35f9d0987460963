"""Bookkeeping: the worker's record goes once, scrubbed, to every sink (the JSON file, its config
beside it, the launcher's report, W&B), and the saved config is no record to any reader."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaling import records, sinks, tracking

ROOT = Path(__file__).resolve().parent.parent
#: only the config's ``logger.api_key`` names it as a secret; a library's error repeats it
NAMED_SECRET = "plantednamed0123456789abcdef0123456789ab"
#: W&B's key, from the environment
ENV_SECRET = "plantedenv9876543210fedcba9876543210fedc"


class RecordingRun:
    """A W&B run that keeps everything it is handed: the payload of the cell's W&B run."""

    dir = "/nonexistent/files"

    def __init__(self) -> None:
        self.payload: list = []
        self.summary = _Keeper(self.payload, "summary")
        self.config = _Keeper(self.payload, "config")

    def define_metric(self, *args, **kwargs) -> None:
        pass

    def log(self, *args, **kwargs) -> None:
        self.payload.append(("log", args, kwargs))

    def finish(self, *args, **kwargs) -> None:
        self.payload.append(("finish", args, kwargs))


class _Keeper:
    def __init__(self, payload: list, name: str) -> None:
        self.payload, self.name = payload, name

    def update(self, *args, **kwargs) -> None:
        self.payload.append((self.name, args, kwargs))


def _config(results_dir: Path, overrides: list[str]) -> dict:
    return {"backend": {"name": "torch"}, "workload": {"name": "mlp"}, "data": {"name": "synthetic"},
            "devices": 1, "cluster": {"nodes": 1}, "logger": {"name": "wandb", "api_key": NAMED_SECRET},
            "results_dir": str(results_dir), "overrides": overrides}


def _files_containing(root: Path, needle: str) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_every_sink_gets_the_scrubbed_record(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)
    monkeypatch.setenv("NETRC", os.devnull)
    monkeypatch.setenv("SCALING_RUN_DIR", str(tmp_path / "run"))
    results = tmp_path / "results"
    overrides = ["backend=torch", f"+logger.api_key={NAMED_SECRET}", "train.epochs=1"]
    record = records.make_record(
        run_id="r1", group="runs", config=_config(results, overrides),
        environment=records.capture_environment({"torch": "x"}), metrics=None,
        error=f"rank 0: AuthError: the server refused {NAMED_SECRET} (WANDB_API_KEY {ENV_SECRET})")
    run = RecordingRun()

    public = sinks.deliver(record, rank=0, results_dir=results, summary={"param_digests": ["abc"]},
                           tracker=tracking.WandbTracker(run))

    folder = results / "runs" / "r1.hydra"
    written = {"record": results / "runs" / "r1.json", "config": folder / "config.yaml",
               "overrides": folder / "overrides.yaml", "launcher report": tmp_path / "run" / "rank0.exit.json"}
    for sink, path in written.items():
        assert path.is_file(), sink
    sent = {"W&B payload": repr(run.payload), "returned record": json.dumps(public)}
    for secret in (NAMED_SECRET, ENV_SECRET):
        assert _files_containing(tmp_path, secret) == [], secret
        for sink, text in sent.items():
            assert secret not in text, sink
    # each sink got the record, scrubbed, not something else
    assert public["path"] == str(written["record"])
    assert records.load_record(written["record"])["error"].startswith("rank 0: AuthError: the server refused ***")
    report = json.loads(written["launcher report"].read_text())
    assert report["status"] == "failed" and "refused ***" in report["error"] and report["param_digests"] == ["abc"]
    [summary] = [args[0] for name, args, _ in run.payload if name == "summary"]
    assert summary["status"] == "failed" and "refused ***" in summary["error"]
    assert ("finish", (), {"exit_code": 1}) in run.payload
    assert yaml.safe_load(written["overrides"].read_text()) == ["backend=torch", "+logger.api_key=***", "train.epochs=1"]
    saved = yaml.safe_load(written["config"].read_text())
    assert saved["logger"] == {"name": "wandb", "api_key": "***"} and "overrides" not in saved


def test_a_rank_other_than_0_reports_to_its_launcher_only(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_RUN_DIR", str(tmp_path / "run"))
    record = records.make_record(run_id="r1", group="runs", config=_config(tmp_path / "results", []),
                                 environment=records.capture_environment(), metrics=None, error="rank 1: boom")
    public = sinks.deliver(record, rank=1, results_dir=tmp_path / "results")
    assert "path" not in public
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["rank1.exit.json"]


@pytest.mark.multiprocess
def test_a_two_process_cell_saves_its_config_and_overrides_beside_its_record(tmp_path):
    pytest.importorskip("torch")
    overrides = ["sweep_id=h", "backend=torch_ddp", "devices=2", "data=synthetic", "train.epochs=1",
                 "train.max_steps_per_epoch=12", "protocol.warmup_steps=2", "logger=none"]
    proc = subprocess.run([sys.executable, "-m", "scaling", "sweep", f"results_dir={tmp_path}", *overrides],
                          cwd=ROOT, env=dict(os.environ, COLUMNS="120"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [(path, rec)] = list(records.read_records(tmp_path))
    assert rec["status"] == "ok" and rec["environment"]["world_size"] == 2
    folder = path.with_suffix(".hydra")
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "overrides.yaml"]
    # Hydra's task overrides, as the command line gave them
    assert yaml.safe_load((folder / "overrides.yaml").read_text()) == [f"results_dir={tmp_path}", *overrides]
    assert rec["config"]["overrides"] == [f"results_dir={tmp_path}", *overrides]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config == {k: v for k, v in rec["config"].items() if k != "overrides"}
    assert config["devices"] == 2 and config["backend"]["name"] == "torch_ddp" and config["group"] == "h"
