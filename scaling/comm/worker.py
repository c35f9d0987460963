"""What one worker of a ``scaling comm`` cell runs: open the backend's collective path, time the
all-reduce at every message size, and (rank 0) write a ``kind: comm`` record and its W&B run.

Launched exactly as the backend's training cells are (``launch/local.py``, srun under Slurm), with
the same placement; the record goes to the same results store.
"""
from __future__ import annotations

import time
import traceback
from typing import Any, Callable

import numpy as np

from scaling.launch import slurm_env
from scaling import comm, records, sinks, tracking
from scaling import settings
from scaling.process import announce, rank_info
from scaling.naming import default_run_id
from scaling.placement import Placement


def measure(path, cfg: dict, before_each: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Every message size's figures for this cell (the same on every rank); ``before_each`` runs
    before each size (the placement settles threads the library started lazily)."""
    from scaling.config import available, runs_on
    from scaling.workloads import config_of, label

    ccfg = cfg["comm"]
    framework = runs_on(cfg["backend"]).get("framework")
    # the workloads named (default: every conf/workload YAML this framework builds) as their YAMLs
    # give them, and the cell's own workload at its width
    named = [config_of(name) for name in (ccfg.get("gradients") or available("workload"))]
    workloads = {label(w): w for w in named if ccfg.get("gradients") or framework in (w.get("build") or {})}
    workloads[label(cfg["workload"])] = cfg["workload"]
    labelled = {key: path.gradient_elements(w) * comm.ELEMENT_BYTES for key, w in workloads.items()}
    n = int(cfg["devices"]) * int(cfg["cluster"]["nodes"])
    sizes = []
    for nbytes, label in comm.message_sizes(ccfg, labelled):
        iters = comm.iterations_for(ccfg, nbytes)
        before_each()
        mine = path.time_all_reduce(nbytes // comm.ELEMENT_BYTES, int(ccfg["warmup"]), iters)
        table = np.zeros((path.processes, iters))
        table[path.rank] = mine
        table = path.exchange(table)  # every rank's times, everywhere
        sizes.append(comm.size_result(nbytes, label, comm.slowest_rank(table.tolist()), n))
    return {"collective": "all_reduce", "op": "sum", "dtype": "float32", "library": path.library,
            "devices": n, "processes": path.processes, "warmup_iters": int(ccfg["warmup"]),
            "gradient_bytes": labelled, "sizes": sizes}


def run(cfg: dict[str, Any]) -> dict:
    """One worker of one comm cell; returns the record (rank 0 has also written it)."""
    from scaling.backends import RunContext
    from scaling.geometry import plan

    rank, world, local_rank, local_world = rank_info()
    slurm_env.set_up(cfg, rank, cfg.get("run_name"))  # under srun: the launcher's rendezvous
    placer = Placement(cfg, local_rank, local_world)
    pinned = placer.apply()
    group = cfg.get("group") or "runs"
    run_id = cfg.get("run_name") or "comm_" + default_run_id(cfg, int(cfg["devices"]))
    metrics, error, env, path = None, None, {}, None
    started = time.time()
    try:
        from scaling.comm.paths import open_path

        ctx = RunContext(config=cfg, dataset=None, geometry=plan(cfg), rank=rank, world_size=world,
                         local_rank=local_rank, local_world_size=local_world)
        path = open_path(ctx)
        placer.settle()  # the library's threads exist now
        rank = path.rank
        announce(phase="measuring")
        metrics = measure(path, cfg, placer.settle)
        metrics["wall_s"] = time.time() - started
    except Exception as exc:  # the cell failed: record why
        error = f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
    finally:
        if path is not None:
            try:
                env = path.environment()
            except Exception:
                env = {}
            env["placement"] = placer.describe()
            try:
                path.close()
            except Exception:
                pass
        env["settings"] = settings.of_run(cfg, path)
        record = records.make_record(
            run_id=run_id, group=group, config=cfg,
            environment=records.capture_environment(env.pop("frameworks", None), env.pop("gpu", None)) | env,
            metrics=metrics, error=error)
        record["environment"].update(rank=rank, world_size=world, pinned_cpus=pinned)
        record = sinks.deliver(record, rank=rank, results_dir=cfg["results_dir"])
        if rank == 0:
            tracking.log_comm_run(cfg, record)  # never raises
    return record


def print_summary(record: dict) -> None:
    """The cell's sizes as a table (rank 0)."""
    from rich.console import Console
    from rich.table import Table

    m = record["metrics"]
    table = Table(title=f"{record['run_id']}  {record['status']}")
    if not m:
        table.add_column("error")
        table.add_row((record.get("error") or "").splitlines()[0])
        Console().print(table)
        return
    table.title += f"  {m['library']}, N={m['devices']}"
    for col in ("bytes", "workload", "iters", "p50 us", "mean us", "p95 us", "algbw GB/s", "busbw GB/s"):
        table.add_column(col, justify="left" if col == "workload" else "right", no_wrap=True)
    for s in m["sizes"]:
        lat = s["latency_s"]
        table.add_row(f"{s['bytes']:,}", s["label"] or "", str(s["iters"]), f"{lat['p50'] * 1e6:,.1f}",
                      f"{lat['mean'] * 1e6:,.1f}", f"{lat['p95'] * 1e6:,.1f}", f"{(s['algbw_bytes_per_s'] or 0) / 1e9:.3f}",
                      f"{(s['busbw_bytes_per_s'] or 0) / 1e9:.3f}")
    Console().print(table)
