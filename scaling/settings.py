"""The settings a backend runs with: ``variant=defaults`` (each library's own defaults, nothing
passed) or ``variant=tuned`` (the ``tuned:`` block of the backend's YAML, taken from each
project's performance documentation). Every record lists the settings in force."""
from __future__ import annotations

import os
from typing import Any

VARIANTS = ("defaults", "tuned")


def variant(cfg: dict) -> str:
    value = cfg.get("variant") or "defaults"
    if value not in VARIANTS:
        raise ValueError(f"variant={value!r}: must be one of {', '.join(VARIANTS)}")
    return value


def in_force(cfg: dict) -> dict[str, Any]:
    """The settings the backend passes to its library: {} under ``defaults`` (library defaults)."""
    if variant(cfg) == "defaults":
        return {}
    return dict(cfg["backend"].get("tuned") or {})


def apply_environment(cfg: dict) -> dict[str, str]:
    """Export the ``environment`` part of the settings in force (Horovod reads its knobs from
    the environment at ``hvd.init()``); returns what was set."""
    env = {k: str(v) for k, v in (in_force(cfg).get("environment") or {}).items()}
    os.environ.update(env)
    return env


def described(cfg: dict, read_back: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a record lists: the variant, what was passed, and what the library reports in force."""
    return {"variant": variant(cfg), "passed": in_force(cfg), "in_force": dict(read_back or {})}


#: Horovod's tuning knobs, with the defaults Horovod documents (used when a variable is unset)
HOROVOD_KNOBS = {"HOROVOD_CYCLE_TIME": "default (1 ms)", "HOROVOD_FUSION_THRESHOLD": "default (64 MiB)",
                 "HOROVOD_AUTOTUNE": "default (off)"}


def horovod_in_force() -> dict[str, str]:
    """Horovod's knobs as this process's environment sets them."""
    return {k: os.environ.get(k, default) for k, default in HOROVOD_KNOBS.items()}


def of_run(cfg: dict, backend: Any) -> dict:
    """The variant, the settings passed and what the library reports in force (scaling.settings)."""
    try:
        read_back = backend.settings_in_force() if hasattr(backend, "settings_in_force") else None
    except Exception:  # a broken probe must not cost the record
        read_back = None
    return described(cfg, read_back)
