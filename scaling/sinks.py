"""Where a run's record goes once the worker has built it: one pass, secrets scrubbed once.

The worker builds its record once (``scaling.worker.build_record``) and hands it to
:func:`deliver`, which scrubs it at this one boundary (``scaling.secrets``) and gives the public
record to each sink in turn:

1. every rank: the launcher's report, ``<run dir>/rank<r>.exit.json`` (when a launcher started it);
2. rank 0: the JSON record, ``<results_dir>/<group>/<run_id>.json``;
3. rank 0: the config beside it, ``<run_id>.hydra/config.yaml`` and ``overrides.yaml``;
4. rank 0: the W&B run's summary, after the record is safe (never raises).

Pure Python, no framework import.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from scaling import records
from scaling.secrets import scrub_secrets


def deliver(record: dict, *, rank: int, results_dir: str | Path, summary: dict | None = None,
            tracker: Any = None, marks: dict | None = None) -> dict:
    """Scrub ``record`` and hand it to its sinks (the module's list); returns the public record, with
    ``path`` on rank 0. ``summary``: what this rank adds to its launcher report (parameter digests);
    ``tracker``: rank 0's W&B run (``scaling.tracking.WandbTracker``) or None; ``marks``: rank 0's
    moments (``scaling.cell_time.Marks``), reported again once the record and W&B are done."""
    record, summary = scrub_secrets((record, summary or {}))  # one pass: a secret named in either goes in both
    report_to_launcher(rank, record, summary)
    if rank == 0:
        record["path"] = str(records.write_record(record, results_dir))
        save_config(record, results_dir)
    if marks is not None:
        marks.mark("recorded")
    if tracker:
        tracker.finish(record)  # bounded by logger.finish_timeout; never raises
    if marks is not None:
        marks.mark("finished")
        report_to_launcher(rank, record, {**summary, "marks": dict(marks)})
    return record


def save_config(record: dict, results_dir: str | Path) -> Path | None:
    """The record's config and overrides beside it (``records.write_run_config``); a folder that
    cannot be written costs a note on stderr, never the run: the record holds the config too."""
    try:
        return records.write_run_config(record, results_dir)
    except (OSError, records.RecordError) as exc:
        print(f"scaling: the config of {record['run_id']} was not saved beside its record ({exc})",
              file=sys.stderr, flush=True)
        return None


def report_to_launcher(rank: int, record: dict, summary: dict) -> None:
    """Tell the launcher (when there is one) this rank finished, and how: ``rank<r>.exit.json``."""
    run_dir = os.environ.get("SCALING_RUN_DIR")
    if not run_dir:
        return
    m = record["metrics"] or {}
    body = {"rank": rank, "status": record["status"], "error": record["error"], "host": socket.gethostname(),
            "pid": os.getpid(), "samples_per_s": m.get("samples_per_s"), **summary}
    records.write_json_atomic(Path(run_dir) / f"rank{rank}.exit.json", body)
