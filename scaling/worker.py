"""What one worker process does: check the config, load the data, build the backend, train under
the protocol, then build the run's record once and hand it to its sinks (``scaling.sinks``: the
launcher's report, and on rank 0 the JSON record, the config beside it and W&B)."""
from __future__ import annotations

import time

LOADED = time.time()  # this worker's first moment (scaling.cell_time)

import os
import signal
import socket
import traceback
from pathlib import Path
from typing import Any

from scaling.launch import slurm_env, warm
from scaling.cell_time import Marks
from scaling import config as config_mod
from scaling import records, settings, sinks, tracking
from scaling.naming import default_run_id
from scaling.process import announce, die_with_parent, leave, rank_info
from scaling.placement import Placement
from scaling.progress import Progress
from scaling.protocol import Measurement, ProtocolConfig, drive, process_start_time
from scaling.rank_clock import RankClock


def run_conditions(cfg: dict, env: dict, pinned: list[int] | None, backend: Any) -> dict:
    """What this rank's speed depended on besides its cell: the threads in force, the CPU placement,
    the CPUs it could run on, and the evaluation work per rank (the aggregate compares them)."""
    return {"threads": env.get("threads", cfg.get("threads")), "placement": cfg.get("placement", "default"),
            "pinned": pinned is not None,
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "evaluation": getattr(backend, "evaluation", "unrecorded"),
            "start": warm.started()}


def run(cfg: dict[str, Any]) -> dict:
    """Run one worker of one run; returns the record (rank 0 has also written it).

    Raises ConfigError before anything is loaded when the config cannot run (no record then).
    """
    marks = Marks(python=LOADED, entry=time.time())  # where the cell's time goes
    config_mod.validate(cfg)
    from scaling.workloads import parameters

    # for its width; None for a workload without a formula, until the backend builds it
    cfg = {**cfg, "workload": {**cfg["workload"], "parameters": parameters(cfg["workload"])}}
    if cfg.get("comm"):  # a collective micro-benchmark cell (`scaling comm`), launched like any cell
        from scaling.comm.worker import run as run_comm

        return run_comm(cfg)
    process_start = process_start_time()
    rank, world, local_rank, local_world = rank_info()
    if rank == 0:  # a record that cannot be written must stop the run before it trains, not after
        config_mod.check_results_dir(cfg["results_dir"], cfg.get("group") or "runs")
    pcfg = ProtocolConfig(**cfg["protocol"])
    placer = Placement(cfg, local_rank, local_world, pcfg.warmup_steps)
    pinned = placer.apply()
    group = cfg.get("group") or "runs"
    metrics = error = backend = progress = tracker = None
    rank_summary: dict[str, Any] = {}
    run_id = cfg.get("run_name") or None
    interruption: dict[str, Any] = {}
    slurm_env.set_up(cfg, rank, run_id, interruption)  # under srun: signals, the launcher's rendezvous
    try:
        from scaling.backends import RunContext, build
        from scaling.geometry import plan

        dataset = _dataset(cfg, rank)
        marks.mark("data")
        ctx = RunContext(config=cfg, dataset=dataset, geometry=plan(cfg), rank=rank, world_size=world,
                         local_rank=local_rank, local_world_size=local_world)
        backend = build(cfg["backend"], ctx)
        marks.mark("built")
        placer.settle()  # the framework's threads exist now
        announce(phase="training")
        # a backend that starts its own processes (Lightning) knows the rank only now
        rank = getattr(backend, "rank", rank)
        run_id = run_id or default_run_id(cfg, ctx.geometry.devices)
        progress = _progress(cfg, backend, run_id, pcfg) if rank == 0 else None
        tracker, tracker_start_s = _start_tracker(cfg, run_id, group) if rank == 0 else (None, None)
        marks.mark("tracker")
        clock = RankClock(pcfg.warmup_steps)  # per-rank step timestamps: waiting for the slowest rank
        clock.attach(backend)
        meter = Measurement(pcfg, global_batch=ctx.geometry.global_batch, devices=ctx.geometry.devices,
                            sync=backend.sync, device_memory_peak=backend.device_memory_peak,
                            observers=[o for o in (progress, tracker, placer, clock) if o],
                            events=getattr(backend, "step_events", lambda: None)())
        drive(backend, meter, int(cfg["train"]["epochs"]), cfg["train"].get("max_steps_per_epoch"))
        marks.mark("trained")
        if meter.train_start_wall() is not None:
            marks.mark("first_step", meter.train_start_wall())
        metrics, error = _figures(meter, backend, ctx.geometry, process_start, tracker_start_s, rank)
        digest = getattr(backend, "param_digests", None)
        rank_summary["param_digests"] = digest() if digest else None
        rank_summary["rank_clock"] = clock.series(meter.sync_every)
    except slurm_env.Interrupted as exc:
        error = f"rank {rank}: {exc}"
    except KeyboardInterrupt:
        error = "interrupted (KeyboardInterrupt)"
        raise
    except Exception as exc:  # the run failed: record why, do not lose the record
        error = f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
    finally:
        if progress:
            progress.close()
        if isinstance(tracker, tracking.History):  # the launcher logs them into its W&B run
            rank_summary["history"], tracker = tracker.rows, None
        record = build_record(cfg, run_id or default_run_id(cfg, world), group, backend, placer, metrics, error,
                              rank=rank, world=world, pinned=pinned, interruption=interruption)
        record = sinks.deliver(record, rank=rank, results_dir=cfg["results_dir"], summary=rank_summary,
                               tracker=tracker, marks=marks if rank == 0 else None)
    return record


def _dataset(cfg: dict, rank: int) -> Any:
    """The run's dataset: its data config's ``_target_`` (``scaling.data.open_dataset``, which
    fetches a real dataset first, for configs written before the key existed) called with the
    config's other keys, the run's seed and a log (rank 0 says what it does)."""
    from hydra.utils import instantiate

    from scaling.data import DEFAULT_TARGET, Dataset

    dcfg = {"_target_": DEFAULT_TARGET, **cfg["data"]}
    dataset = instantiate(dcfg, _partial_=True, _convert_="all")(seed=cfg["seed"], log=_log if rank == 0 else _quiet)
    if not isinstance(dataset, Dataset):
        raise TypeError(f"data={cfg['data']['name']}: {dcfg['_target_']} returned {type(dataset).__name__}, "
                        "not a scaling.data.Dataset")
    return dataset


def _progress(cfg: dict, backend: Any, run_id: str, pcfg: ProtocolConfig) -> Progress | None:
    """Rank 0's progress line over every step the run will train, unless ``progress=false``."""
    if not cfg.get("progress", True):
        return None
    steps = backend.steps_per_epoch
    limit = cfg["train"].get("max_steps_per_epoch")
    steps = min(steps, limit) if limit else steps
    return Progress(steps * int(cfg["train"]["epochs"]), run_id, every=pcfg.log_every)


def _start_tracker(cfg: dict, run_id: str, group: str) -> tuple[Any, float | None]:
    """Rank 0's W&B run (None unless logger=wandb) and the seconds its start took (None without one).

    When the local launcher holds the cell's W&B run (it starts it while the workers start, and
    sets ``SCALING_TRACKER_GATE``), rank 0 keeps the run's history rows instead
    (``tracking.History``, handed over in its report) and waits for the launcher's run to have
    started, so W&B's start never overlaps a timed step: the seconds are that wait's."""
    t0 = time.time()
    gate = os.environ.get("SCALING_TRACKER_GATE")
    if gate and tracking.wanted(cfg):
        lcfg = cfg.get("logger") or {}
        deadline = time.monotonic() + 2 * float(lcfg.get("init_timeout", 10)) + 30
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return tracking.History(), time.time() - t0
    tracker = tracking.make_tracker(cfg, run_id, group)
    return tracker, (time.time() - t0 if tracker else None)


def _figures(meter: Measurement, backend: Any, geometry: Any, process_start: float | None,
             tracker_start_s: float | None, rank: int) -> tuple[dict | None, str | None]:
    """(metrics, None) of a run that trained and measured, or (None, why not)."""
    metrics = meter.result(process_start)
    import_s = warm.started().get("import_s")
    if import_s and metrics["startup_s"] is not None:
        # a warm-started worker found its framework imported: the seconds its server spent on that
        # count, so startup_s stays what a fresh process takes
        metrics["startup_s"] += float(import_s)
    metrics["steps_per_epoch"] = backend.steps_per_epoch
    metrics["per_device_batch"] = geometry.per_device_batch
    metrics["lr"] = geometry.lr
    if tracker_start_s is not None and metrics["startup_s"] is not None:
        # W&B's start (bounded by logger.init_timeout) is the tracker's, not the framework's
        metrics["startup_s"] -= tracker_start_s
        metrics["tracker_start_s"] = tracker_start_s
    error = _not_measured(meter, metrics, rank)
    return (None, error) if error else (metrics, None)  # a diverged or unmeasured run's figures are no results


def build_record(cfg: dict, run_id: str, group: str, backend: Any, placer: Placement, metrics: dict | None,
                 error: str | None, *, rank: int, world: int, pinned: list[int] | None,
                 interruption: dict | None = None) -> dict:
    """The run's one record, built once: the figures (or the error), the conditions they were
    measured under, and the environment (the backend's probes, the placement, this rank)."""
    env: dict[str, Any] = {}
    if backend is not None:
        try:
            env = backend.environment()
        except Exception as exc:  # a broken probe must not cost the record, but is said
            _log(f"[worker] rank {rank}: environment probe failed ({type(exc).__name__}: {exc}); "
                 "the record has no framework versions")
    if metrics is not None:
        metrics["conditions"] = run_conditions(cfg, env, pinned, backend)
        if hasattr(backend, "fast_mode"):  # what the fast modes actually ran (graphs, XLA, steps per call)
            metrics["fast_mode"] = backend.fast_mode()
    env["settings"] = settings.of_run(cfg, backend)
    env["placement"] = placer.describe()
    environment = records.capture_environment(env.pop("frameworks", None), env.pop("gpu", None)) | env
    environment.update(rank=rank, world_size=world, pinned_cpus=pinned)
    record = records.make_record(run_id=run_id, group=group, config=cfg, environment=environment,
                                 metrics=metrics, error=error)
    if interruption:
        record["interruption"] = dict(interruption)
    return record


def _not_measured(meter: Measurement, metrics: dict, rank: int) -> str | None:
    """Why a run that finished training is no result (diverged, nothing timed), or None."""
    if meter.diverged:
        step, what = meter.diverged
        return f"rank {rank}: diverged at step {step} ({what})"
    if not metrics["timed_steps"] or metrics["samples_per_s"] is None:
        return (f"rank {rank}: no timed step after the {meter.config.warmup_steps} warm-up steps "
                f"({metrics['steps']} steps trained): nothing measured")
    bad = records.nonfinite(metrics)
    if bad:
        return f"rank {rank}: {bad} is not a finite number"
    return None




def _log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:
    pass


def print_summary(record: dict) -> None:
    """A short table of the run's figures (rank 0)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    cfg, m = record["config"], record["metrics"]
    # texts from outside (ids, error messages with "[/path]" in them) are plain text, never markup
    title = Text(f"{record['run_id']}  ").append(record["status"], style="green" if record["status"] == "ok" else "red")
    table = Table(title=title, show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("backend / workload / data", Text(f"{cfg['backend']['name']} / {cfg['workload']['name']} / {cfg['data']['name']}"))
    if m:
        st = m["step_time_s"]
        rows = [
            ("devices x per-device batch", f"{m['devices']} x {m['global_batch'] // m['devices']}"),
            ("samples/s (global)", _fmt(m["samples_per_s"], ",.0f")),
            ("samples/s per device", _fmt(m["samples_per_s_per_device"], ",.0f")),
            ("step time mean / p50 / p95 (ms)", " / ".join(_fmt(st[k] and st[k] * 1e3, ".3f") for k in ("mean", "p50", "p95"))),
            ("step time CV", _fmt(st["cv"], ".3f")),
            ("epoch time (s)", ", ".join(f"{t:.2f}" for t in m["epoch_time_s"])),
            ("startup (s)", _fmt(m["startup_s"], ".2f")),
            (f"time to {m['target_accuracy']:.0%} (s)", _fmt(m["time_to_accuracy_s"], ".2f") if m["time_to_accuracy_s"] else "not reached"),
            ("final test accuracy", _fmt(m["final_test_accuracy"], ".4f")),
            ("final test loss", _fmt(m["final_test_loss"], ".4f")),
            ("peak host RSS (MiB)", _fmt(m["peak_host_rss_bytes"] / 2**20, ".0f")),
        ]
        if m["peak_device_memory_bytes"] is not None:
            rows.append(("peak device memory (MiB)", _fmt(m["peak_device_memory_bytes"] / 2**20, ".0f")))
        for row in rows:
            table.add_row(*row)
    if record.get("error"):
        table.add_row("error", Text(record["error"].splitlines()[0]))
    if record.get("path"):
        table.add_row("record", Text(record["path"]))
    console.print(table)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    """``python -m scaling.worker --config CFG.json``: one launched worker process."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="scaling.worker")
    ap.add_argument("--config", required=True, help="the run's resolved config as JSON (written by the launcher)")
    args = ap.parse_args(argv)
    with open(args.config) as fh:
        cfg = json.load(fh)
    die_with_parent()
    announce()
    record = run(cfg)
    code = 0 if record["status"] == "ok" else 1
    if code == 0:
        leave(code)  # every rank has reported: no interpreter teardown (scaling.process.leave)
    return code


if __name__ == "__main__":
    import sys

    sys.exit(main())
