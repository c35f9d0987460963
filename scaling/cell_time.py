"""Where a cell's wall time goes: the fixed cost around its training and evaluation.

A sweep cell is worth its training and evaluation; everything else (starting processes, imports,
opening the data, building the backend, W&B, writing the record, leaving) is its fixed cost. Rank 0
marks wall-clock moments as it goes (:class:`Marks`); the local launcher adds its own start and the
moment every worker had exited, and :func:`phases` turns them into consecutive phases that add up to
the cell's wall time. The record keeps them as ``metrics.cell_time_s``::

    wall            the launcher's start to its end (what the sweep waits for)
    fixed           wall - training - evaluation (train_time_s and eval_time_s of the protocol)
    launcher        the launcher's start to rank 0's worker module loading (torchrun or horovodrun
                    and their imports, the interpreter's own start)
    imports         the worker module's imports (the study's modules) to the worker's entry
    data            opening the dataset
    build           the backend built: the framework's import, its process group, the model
    tracker_start   W&B: the wait for the run the launcher starts while the workers start (rank 0's own
                    run's start where no launcher holds it; metrics.tracker_start_s)
    setup           what is left before the first step (progress line, meters)
    training        the first step to the end of the loop: training, evaluation, leaving the group
    record          the record built and written
    tracker_finish  rank 0's own W&B run finished (none where the launcher holds the run)
    exit            rank 0's last mark to every worker gone
    closing         the launcher's reports merged and the record written (the launcher's W&B run
                    finishes in the background while the next cell starts, so it is in no wall)

Only a cell started by the local launcher has them (a run inside ``scaling run``'s own process or a
Slurm task has no launcher to see it exit). Pure Python, no framework import.
"""
from __future__ import annotations

import time
from typing import Any

#: rank 0's marks, in the order they are taken
MARKS = ("python", "entry", "data", "built", "tracker", "first_step", "trained", "recorded", "finished")
#: the phases of a cell's wall time, each between two consecutive moments
PHASES = ("launcher", "imports", "data", "build", "tracker_start", "setup", "training", "record",
          "tracker_finish", "exit", "closing")


class Marks(dict):
    """Rank 0's moments (epoch seconds) by name; ``mark`` takes now unless given a moment."""

    def mark(self, name: str, at: float | None = None) -> None:
        if at is not None or name not in self:
            self[name] = time.time() if at is None else float(at)


def phases(marks: dict[str, float], launched: float, exited: float, metrics: dict[str, Any] | None,
           closed: float | None = None) -> dict | None:
    """The cell's wall time split into :data:`PHASES` (seconds), plus ``wall`` and ``fixed``.

    Where rank 0 did not reach a moment (a failed run), the phase it was in holds the time up to
    the next moment it reached and the phases skipped are None. None without rank 0's marks."""
    if not marks or exited < launched:
        return None
    closed = exited if closed is None else closed
    moments = [launched] + [marks.get(name) for name in MARKS] + [exited, closed]
    out: dict[str, Any] = {"wall": closed - launched, **dict.fromkeys(PHASES)}
    known = [(i, t) for i, t in enumerate(moments) if t is not None]
    for (i, a), (_, b) in zip(known, known[1:]):
        out[PHASES[i]] = max(b - a, 0.0)  # after a failure: the phase that did not finish holds the gap
    m = metrics or {}
    if m.get("train_time_s") is not None:
        worked = float(m["train_time_s"]) + sum(float(e) for e in (m.get("eval_time_s") or []))
        out["fixed"] = max(out["wall"] - worked, 0.0)
    else:
        out["fixed"] = None
    return out


def line(cell: dict | None) -> str:
    """``7.3 s, 5.1 s fixed`` for the sweep's progress line (the wall alone without phases)."""
    if not cell:
        return ""
    fixed = cell.get("fixed")
    return f"{cell['wall']:.1f} s" + (f", {fixed:.1f} s fixed" if fixed is not None else "")
