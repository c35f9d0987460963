"""A sweep: a Hydra multirun over the study's axes, one *cell* (one run) per job.

``scaling sweep experiment=local_cpu`` composes ``conf/experiment/local_cpu.yaml``, whose
``hydra.sweeper.params`` list the axes with ``repeat`` first, so all cells of repeat 0 run, then
all of repeat 1, ...: machine drift cannot favour one backend. Every cell has a stable id and its
record lives at ``<results_dir>/<sweep_id>/<cell_id>.json``; a cell with an ``ok`` record is
skipped, so rerunning a sweep (or ``--resume``) runs only failed or missing cells. Cells are
started through the launch layer in fresh processes, so a crash in one cannot take the sweep
down, and an interrupted cell leaves a ``failed`` record, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from scaling import records

#: overrides that name the cell in its id, in this order
NAMED = ("backend", "workload", "data", "scaling", "devices", "cluster.nodes", "repeat", "variant")
#: overrides that say where or how a sweep runs, not what a cell measures
BOOKKEEPING = {"experiment", "sweep_id", "results_dir", "progress", "cluster", "logger", "hydra.mode"}


def cell_id(cfg: dict, task_overrides: list[str]) -> str:
    """A readable, stable id: the named axes, plus a short hash of any other override."""
    base = ("comm-" if cfg.get("comm") else "") + (f"{cfg['backend']['name']}-{cfg['workload']['name']}-{cfg['data']['name']}-{cfg.get('scaling', 'weak')}"
            f"-n{cfg['devices']}x{cfg['cluster']['nodes']}-r{cfg.get('repeat', 0)}")
    if (cfg.get("variant") or "defaults") != "defaults":
        base += f"-{cfg['variant']}"
    extra = sorted(o.lstrip("+~") for o in task_overrides if not _bookkeeping(o.lstrip("+~").split("=", 1)[0]))
    if extra:
        base += "-" + hashlib.sha1("\n".join(extra).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", base)


def _bookkeeping(key: str) -> bool:
    """Keys that name the cell already, or say where and how it runs rather than what it measures."""
    if key in NAMED or key in BOOKKEEPING or key.startswith(("hydra.", "logger.")):
        return True
    return key.startswith("cluster.")  # partition, account, time...: where, not what (nodes is NAMED)


def finished(results_dir: str | Path, group: str, run_id: str) -> dict | None:
    """The cell's record if it finished ok (a damaged or failed record does not count)."""
    try:
        record = records.load_record(records.record_path(results_dir, group, run_id))
    except (OSError, ValueError, records.RecordError):
        return None
    # an older record that measured nothing (no throughput) is no finished cell either
    return record if record["status"] == "ok" and record["metrics"].get("samples_per_s") is not None else None


def failed_cells(results_dir: str | Path, sweep_id: str) -> list[str]:
    """The ids of the sweep's cells whose record is ``failed`` (a rerun retries exactly these)."""
    folder = Path(results_dir) / sweep_id
    if not folder.is_dir():
        return []
    return [rec["run_id"] for _, rec in records.read_records(results_dir)
            if rec["group"] == sweep_id and rec["status"] == "failed"]


def run_cell(cfg: dict[str, Any], task_overrides: list[str], job_num: int) -> dict | None:
    """Run one cell unless it already has an ok record. Returns its record (None if not runnable)."""
    from scaling.launch.local import launch
    from scaling.config import ConfigError, check_results_dir, validate

    sweep_id = cfg.get("sweep_id") or "adhoc"
    run_id = cell_id(cfg, task_overrides)
    cfg = {**cfg, "group": sweep_id, "run_name": run_id, "progress": False}
    total = f"/{PROGRESS['cells']}" if PROGRESS.get("cells") else ""
    tag = f"[sweep {sweep_id}] cell {job_num + 1}{total} {run_id}"
    try:
        validate(cfg)
        check_results_dir(cfg["results_dir"], sweep_id)
    except ConfigError as exc:
        print(f"{tag}: not a valid cell, skipped ({exc})", file=sys.stderr, flush=True)
        note_invalid(cfg["results_dir"], sweep_id, run_id, str(exc))
        return None
    done = finished(cfg["results_dir"], sweep_id, run_id)
    if done:
        print(f"{tag}: done already ({headline(done)}), skipped", file=sys.stderr, flush=True)
        return done
    if cfg["cluster"].get("name") == "slurm":
        return _run_in_slurm_task(cfg, tag)
    if cfg["backend"].get("launcher", "inprocess") == "inprocess":
        cfg["backend"] = {**cfg["backend"], "launcher": "process"}  # each cell in a fresh process
    print(f"{tag}: running", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    record = launch(cfg)
    took = time.monotonic() - t0
    clock = _elapsed_and_eta(job_num + 1)
    if record["status"] == "ok":
        print(f"{tag}: ok, {headline(record)} ({took:.1f} s){clock}", file=sys.stderr, flush=True)
    else:
        print(f"{tag}: FAILED ({took:.1f} s): {record['error'].splitlines()[0]}{clock}", file=sys.stderr, flush=True)
    return record


#: the running sweep's size and start (set when Hydra starts the multirun, in the driver process)
PROGRESS: dict[str, float] = {}


def _elapsed_and_eta(done: int) -> str:
    """`` | 3:05 elapsed, ~7:40 left`` from the cells done so far (skipped ones are quick, so the
    estimate errs long early on), or nothing outside a local sweep."""
    if not PROGRESS.get("cells"):
        return ""
    elapsed = time.monotonic() - PROGRESS["start"]
    left = elapsed / max(done, 1) * max(PROGRESS["cells"] - done, 0)
    return f" | {_mmss(elapsed)} elapsed, ~{_mmss(left)} left"


def _mmss(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"{minutes}:{secs:02d}"


def count_cells(params: dict[str, str], overrides: list[str]) -> int:
    """How many cells a multirun makes: the product of every swept axis (an experiment's
    ``hydra.sweeper.params``, which command-line overrides of the same key replace)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = {k: f"{k}={v}" for k, v in params.items()}
    axes.update({o.split("=", 1)[0]: o for o in overrides if "=" in o})
    total = 1
    for parsed in OverridesParser.create().parse_overrides(list(axes.values())):
        if parsed.is_sweep_override():
            total *= len(list(parsed.sweep_string_iterator()))
    return total


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


def headline(record: dict) -> str:
    """A finished cell in a few words: throughput and accuracy, or what a comm cell measured."""
    m = record["metrics"]
    if records.kind(record) == "comm":
        return f"{len(m['sizes'])} message sizes over {m['library']}"
    return f"{m['samples_per_s']:,.0f} samples/s, accuracy {m['final_test_accuracy']:.4f}"


def _run_in_slurm_task(cfg: dict, tag: str) -> dict | None:
    """Inside a submitit job: this task is one rank; check the allocation fits the cell, then train."""
    import os

    from scaling import worker
    from scaling.slurm import tasks_per_node

    want_nodes, want_tasks = int(cfg["cluster"]["nodes"]), tasks_per_node(cfg)
    got_nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))
    got_tasks = int(os.environ.get("SLURM_NTASKS", "1")) // max(1, got_nodes)
    if (got_nodes, got_tasks) != (want_nodes, want_tasks):
        message = (f"this cell needs {want_nodes} node(s) x {want_tasks} task(s); the sweep's allocation has "
                   f"{got_nodes} x {got_tasks}. Submitit gives every cell of a multirun the same geometry: "
                   "sweep one backend geometry at a time (or use scaling slurm render)")
        if os.environ.get("SLURM_PROCID", "0") == "0":
            record = records.make_record(run_id=cfg["run_name"], group=cfg["group"], config=cfg,
                                         environment=records.capture_environment(), metrics=None, error=message)
            records.write_record(record, cfg["results_dir"])
        print(f"{tag}: FAILED: {message}", file=sys.stderr, flush=True)
        return None
    record = worker.run(cfg)
    if record["environment"].get("rank", 0) == 0:
        print(f"{tag}: {record['status']}", file=sys.stderr, flush=True)
    return record


def summary_table(results_dir: str | Path, sweep_id: str) -> None:
    """Print a sweep's cells as the study reads them: per backend, settings, N and layout, the median
    over repeats with its spread, speedup and efficiency over the same backend's N=1
    (``scaling.metrics``), accuracy, and the repeats that failed."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from scaling import analysis

    loaded = analysis.load(results_dir)
    cells = analysis.tidy(loaded.records, loaded.paths)
    cells = cells[cells["sweep"] == sweep_id] if not cells.empty else cells
    agg = analysis.aggregate(cells) if not cells.empty else cells
    runs = len(cells)
    failed = int((cells["status"] != "ok").sum()) if runs else 0
    table = Table(title=f"sweep {sweep_id}: {runs} runs ({failed} failed) in {Path(results_dir) / sweep_id}")
    for col in ("backend", "settings", "N", "layout", "reps", "samples/s", "min..max", "speedup", "efficiency", "accuracy"):
        table.add_column(col, justify="left" if col in ("backend", "settings") else "right")
    for _, r in (agg.iterrows() if len(agg) else []):
        row = (r["backend"], r["settings"] or "-", r["N"], r["layout"],
               f"{r['repeats']}" + (f" (+{r['failed']} failed)" if r["failed"] else ""),
               _fmt(r["throughput"], ",.0f"), f"{_fmt(r['throughput_min'], ',.0f')}..{_fmt(r['throughput_max'], ',.0f')}",
               _fmt(r["speedup"], ".2f"), _fmt(r["efficiency"], ".0%"), _fmt(r["final_test_accuracy"], ".4f"))
        table.add_row(*(Text(str(v)) for v in row))  # values as text, never as markup
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)  # a log keeps whole columns
    console.print(table)
    comms = [rec for rec in loaded.records if rec.get("group") == sweep_id and records.kind(rec) == "comm"]
    if comms:
        console.print(f"{len(comms)} collective benchmark cell(s): `scaling report {results_dir}` plots them", markup=False)


def _fmt(value: Any, spec: str) -> str:
    try:
        return "-" if value is None or value != value else format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def build_dashboard(results_dir: str | Path) -> None:
    """The local dashboard of everything under results_dir, at <results_dir>/report/index.html."""
    if not any(not p.name.startswith(".") for p in Path(results_dir).glob("*/*.json")):
        return  # nothing recorded: no empty dashboard
    try:
        from scaling.report import build

        build(results_dir)
        print(f"[sweep] dashboard: {Path(results_dir) / 'report' / 'index.html'}", file=sys.stderr, flush=True)
    except Exception as exc:  # the records are the result; a report problem must not hide them
        print(f"[sweep] dashboard not built ({type(exc).__name__}: {exc}); run `scaling report {results_dir}`",
              file=sys.stderr, flush=True)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a core dependency
    Callback = object


class SweepSummary(Callback):
    """Hydra callback: count the cells when a multirun starts (for the progress line); after it,
    print the sweep's table."""

    def on_multirun_start(self, config, **kwargs) -> None:
        try:
            params = dict(config.hydra.sweeper.get("params") or {})
            overrides = [str(o) for o in config.hydra.overrides.task]
            PROGRESS.update(cells=count_cells({k: str(v) for k, v in params.items()}, overrides),
                            start=time.monotonic())
        except Exception:  # the count only feeds the progress line
            PROGRESS.clear()

    def on_multirun_end(self, config, **kwargs) -> None:
        summary_table(config.results_dir, config.get("sweep_id") or "adhoc")
        if os.environ.get("SCALING_SWEEP_PART"):
            return  # one geometry group of a Slurm study: the study's dashboard is built over all groups
        if not os.environ.get("SLURM_JOB_ID"):
            build_dashboard(config.results_dir)
        if (config.get("logger") or {}).get("name") == "wandb":
            from scaling.tracking import log_sweep_summary

            from scaling.tracking import say_sweep_runs

            log_sweep_summary(config, config.get("sweep_id") or "adhoc")  # never raises
            say_sweep_runs(config.results_dir)
