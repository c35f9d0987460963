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

import os
import sys
import time
from pathlib import Path
from typing import Any

from scaling import cell_time, records
from scaling.invalid_cells import note_invalid
from scaling.naming import cell_id


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
    """Run one cell unless it already has an ok record. Returns its record (None if not runnable).
    Every cell runs in fresh processes, a single-process backend's too."""
    from scaling.launch import launchers
    from scaling.launch.local import launch
    from scaling.config import ConfigError, check_results_dir, validate

    sweep_id = cfg.get("sweep_id") or "adhoc"
    run_id = cell_id(cfg, task_overrides)
    cfg = {**cfg, "group": sweep_id, "run_name": run_id, "progress": False}
    total = f"/{PROGRESS['cells']}" if PROGRESS.get("cells") else ""
    tag = f"[sweep {sweep_id}] cell {job_num + 1}{total} {run_id}"
    try:
        validate(cfg)
        launchers.of(cfg)
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
    print(f"{tag}: running", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    record = launch(cfg)
    took = time.monotonic() - t0
    clock = _elapsed_and_eta(job_num + 1)
    if record["status"] == "ok":
        cost = cell_time.line(record["metrics"].get("cell_time_s")) or f"{took:.1f} s"
        print(f"{tag}: ok, {headline(record)} ({cost}){clock}", file=sys.stderr, flush=True)
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


def covering_cells(batch: list[list[str]], is_group) -> list[int]:
    """The cells of a multirun worth composing before any runs: every cell whose config-group
    choices (``is_group(key)``) are a combination not seen yet, or that holds an override not seen
    yet. For the main job that is 14 of 120 cells: one per backend, plus the first of each other
    value. A value that cannot compose (a typo, a missing group option) is in one of them."""
    seen_overrides: set[str] = set()
    seen_choices: set[tuple[str, ...]] = set()
    picked = []
    for i, overrides in enumerate(batch):
        choices = tuple(sorted(o for o in overrides if "=" in o and is_group(_override_key(o))))
        if choices not in seen_choices or not seen_overrides.issuperset(overrides):
            picked.append(i)
            seen_choices.add(choices)
            seen_overrides.update(overrides)
    return picked


def _override_key(override: str) -> str:
    """``backend`` of ``backend=torch``, ``+backend@pkg=torch`` or ``~backend``."""
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def compose_covering_cells_only() -> None:
    """Make Hydra's sweeper check a multirun by composing :func:`covering_cells` up front rather
    than every cell (about 80 ms each; 10 s for the main job's 120 cells, which the launcher then
    composes again one by one as it runs them). Only the driver of ``scaling sweep`` calls this,
    for Hydra's basic sweeper (the one every study uses); a composition error that only a
    particular pairing of values would raise then stops the sweep at that cell, not before it."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.plugins.sweeper import Sweeper

    def validate_batch_is_legal(self, batch):  # noqa: ANN001, ANN202 (Hydra's signature)
        repo = self.hydra_context.config_loader.repository
        cells = [batch[i] for i in covering_cells([list(b) for b in batch], repo.group_exists)]
        Sweeper.validate_batch_is_legal(self, cells)

    BasicSweeper.validate_batch_is_legal = validate_batch_is_legal


def headline(record: dict) -> str:
    """A finished cell in a few words: throughput and accuracy, or what a comm cell measured."""
    m = record["metrics"]
    if records.kind(record) == "comm":
        return f"{len(m['sizes'])} message sizes over {m['library']}"
    return f"{m['samples_per_s']:,.0f} samples/s, accuracy {m['final_test_accuracy']:.4f}"


def _run_in_slurm_task(cfg: dict, tag: str) -> dict | None:
    """Inside a submitit job: this task is one rank; check the allocation fits the cell, then train."""
    from scaling.launch import launchers, slurm_job
    from scaling import worker

    want_nodes, want_tasks = int(cfg["cluster"]["nodes"]), launchers.of(cfg).tasks_per_node(cfg["devices"])
    got_nodes, got_tasks = slurm_job.nodes(), slurm_job.tasks_per_node()
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
    comms = [rec for rec in loaded.others if rec.get("group") == sweep_id and records.kind(rec) == "comm"]
    if runs or not comms:
        console.print(table)
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
        from scaling.launch.local import settle_trackers

        settle_trackers()  # the last cell's W&B run
        summary_table(config.results_dir, config.get("sweep_id") or "adhoc")
        if os.environ.get("SCALING_SWEEP_PART"):
            return  # one geometry group of a Slurm study: the study's dashboard is built over all groups
        if not os.environ.get("SLURM_JOB_ID"):
            build_dashboard(config.results_dir)
        if (config.get("logger") or {}).get("name") == "wandb":
            from scaling.tracking_sweep import log_sweep_summary, say_sweep_runs

            log_sweep_summary(config, config.get("sweep_id") or "adhoc")  # never raises
            say_sweep_runs(config.results_dir)
