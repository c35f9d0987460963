"""The cells a sweep's grid holds that their backend cannot run, kept beside the sweep's records
(``<results_dir>/<sweep>/.invalid-cells.json``) with the reason: the sweep notes them, the dashboard
counts them as skipped."""
from __future__ import annotations

import json
from pathlib import Path

from scaling import records

INVALID_CELLS = ".invalid-cells.json"


def note_invalid(results_dir: str | Path, sweep_id: str, run_id: str, reason: str) -> None:
    """Keep a cell the grid holds but its backend cannot run (``<sweep>/.invalid-cells.json``),
    so the dashboard counts it as skipped, with the reason."""
    try:
        path = records.inside(results_dir, sweep_id, INVALID_CELLS)
        known = json.loads(path.read_text()) if path.exists() else {}
        if known.get(run_id) != reason:
            records.write_json_atomic(path, {**known, run_id: reason})
    except (OSError, ValueError, records.RecordError):
        pass  # only the dashboard's count depends on it


def invalid_cells(results_dir: str | Path) -> dict[str, str]:
    """Every sweep's skipped cells under ``results_dir``: ``{"<sweep>/<cell>": reason}``."""
    found: dict[str, str] = {}
    for path in sorted(Path(results_dir).glob(f"*/{INVALID_CELLS}")):
        try:
            found |= {f"{path.parent.name}/{k}": v for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            continue
    return found
