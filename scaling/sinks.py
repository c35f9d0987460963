"""Where a run's record goes once the worker has built it: one pass, secrets scrubbed once.

The worker builds its record once (``scaling.worker.build_record``) and hands it to
:func:`deliver`, which scrubs it at this one boundary (``scaling.secrets``) and gives the public
record to each sink in turn:

1. every rank: the launcher's report, ``<run dir>/rank<r>.exit.json`` (when a launcher started it,
   or under srun, where rank 0 gathers the reports itself: :func:`gather_ranks`);
2. rank 0: the JSON record, ``<results_dir>/<group>/<run_id>.json``;
3. rank 0: the config beside it, ``<run_id>.hydra/config.yaml`` and ``overrides.yaml``;
4. rank 0: the W&B run's summary, after the record is safe (never raises).

Pure Python, no framework import.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from scaling import rank_clock, records
from scaling.secrets import scrub_secrets


def deliver(record: dict, *, rank: int, results_dir: str | Path, summary: dict | None = None,
            tracker: Any = None, marks: dict | None = None) -> dict:
    """Scrub ``record`` and hand it to its sinks (the module's list); returns the public record, with
    ``path`` on rank 0. ``summary``: what this rank adds to its launcher report (parameter digests);
    ``tracker``: rank 0's W&B run (``scaling.tracking.WandbTracker``) or None; ``marks``: rank 0's
    moments (``scaling.cell_time.Marks``), reported again once the record and W&B are done."""
    record, summary = scrub_secrets((record, summary or {}))  # one pass: a secret named in either goes in both
    report_to_launcher(rank, record, summary)
    gathered = False
    if rank == 0:
        gathered = gather_ranks(record)
        record["path"] = str(records.write_record(record, results_dir))
        save_config(record, results_dir)
    if marks is not None:
        marks.mark("recorded")
    if tracker:
        tracker.finish(record)  # bounded by logger.finish_timeout; never raises
    if marks is not None:
        marks.mark("finished")
        report_to_launcher(rank, record, {**summary, "marks": dict(marks)})
    if gathered:  # every rank has reported and no one else reads the folder: nothing left to keep
        shutil.rmtree(os.environ["SCALING_RUN_DIR"], ignore_errors=True)
    return record


def ranks_in_sync(digests: list[str]) -> bool | None:
    """Whether every replica ended with the same parameters; None with fewer than two replicas,
    where there is nothing to compare (one digest always agrees with itself)."""
    if len(digests) < 2:
        return None
    return len(set(digests)) == 1


def add_rank_reports(record: dict, exits: list[dict], backend: str) -> None:
    """Every rank's report into the run's one record: the rank clock's figures (waiting for the
    slowest rank, ``scaling.rank_clock``), the reports themselves (``ranks``) and whether every
    replica ended with the same parameters (``metrics.ranks_in_sync``)."""
    rank_clock.into_record(record, exits, backend)
    record["ranks"] = exits
    digests = [tuple(e.get("param_digests") or ()) for e in exits]
    if record["metrics"] is not None and digests and all(digests):
        record["metrics"]["ranks_in_sync"] = ranks_in_sync([d for ds in digests for d in ds])


#: set (to 1) where no launcher gathers the ranks' reports, so rank 0 does (under srun:
#: ``scaling.launch.slurm_env``); ``SCALING_RUN_DIR`` is then a folder every rank can write
GATHER_ENV = "SCALING_GATHER_RANKS"
#: how long rank 0 waits for the other ranks' reports (they finish the last step with it)
GATHER_TIMEOUT_S = 20.0


def gather_ranks(record: dict, timeout: float = GATHER_TIMEOUT_S) -> bool:
    """Where no launcher does (``GATHER_ENV``), rank 0 waits for every rank's report in the run's
    folder and adds them to its record (:func:`add_rank_reports`), as the local launcher does.
    Returns whether every rank reported; one that did not within ``timeout`` is named on stderr
    and the record keeps the reports that came."""
    run_dir = os.environ.get("SCALING_RUN_DIR")
    if not run_dir or os.environ.get(GATHER_ENV) != "1":
        return False
    from scaling.process import rank_info

    world = rank_info()[1]
    deadline = time.monotonic() + timeout
    while len(paths := list(Path(run_dir).glob("rank*.exit.json"))) < world and time.monotonic() < deadline:
        time.sleep(0.02)
    exits = sorted((e for e in map(_read_report, paths) if e), key=lambda e: e.get("rank", 0))
    missing = sorted(set(range(world)) - {e.get("rank") for e in exits})
    if missing:
        print(f"scaling: rank(s) {missing} sent no report within {timeout:.0f} s; the record has the others'",
              file=sys.stderr, flush=True)
    add_rank_reports(record, exits, record["config"]["backend"]["name"])
    return not missing


def _read_report(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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
