"""The sweep's W&B summary run (``job_type="summary"``), logged once a sweep has finished.

Its config describes the sweep (its id, experiment, overrides and the values its cells took on each
axis); it holds a ``wandb.Table`` of every cell ("cells") and line plots of throughput, speedup and
efficiency against device count, one line per backend. Built from the sweep's records only, through
the guarded calls of ``scaling.tracking`` (W&B failing costs one warning, never the sweep).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from scaling import metrics, records
from scaling.secrets import scrub_secrets
from scaling.tracking import WandbTracker, _first_line, _warn, start_run, wandb_root


def say_sweep_runs(results_dir: str | Path) -> None:
    """A sweep's one line on its W&B runs: how many went offline and how to upload them."""
    offline = sorted(wandb_root(results_dir).glob("offline-run-*"))
    if offline:
        print(f"[sweep] W&B: {len(offline)} offline run(s) under {wandb_root(results_dir)}; upload them with "
              f"`wandb sync {wandb_root(results_dir)}/offline-run-*`", file=sys.stderr, flush=True)


TABLE_COLUMNS = ["cell", "backend", "workload", "workload_params", "data", "scaling", "variant", "settings", "devices", "nodes", "layout",
                 "total_devices", "repeat", "status", "samples_per_s", "samples_per_s_per_device", "speedup", "efficiency",
                 "step_time_p50_s", "final_test_accuracy", "time_to_accuracy_s", "error"]
#: what separates the lines of a summary plot, besides the backend, when the sweep varies it
_LINE_SPLITS = ("workload", "workload_params", "data", "scaling", "variant", "settings", "nodes")


def _series_key(c: dict) -> tuple:
    from scaling.analysis import fast_settings, workload_params

    return (c["backend"]["name"], c["workload"]["name"], workload_params(c["workload"]), c["data"]["name"],
            c.get("scaling", "weak"), str(c.get("variant") or "defaults"), fast_settings(c["backend"]))


def sweep_rows(sweep_records: list[dict]) -> list[dict]:
    """One row per record. ``speedup``: the record's throughput over the median throughput of its
    series (same backend, settings, workload, data, scaling and variant) at N = 1, None without one;
    ``efficiency``: speedup / N (``scaling.metrics``, as the aggregate and the dashboard)."""
    ok: dict[tuple, list[float]] = {}
    for rec in sweep_records:
        m, c = rec.get("metrics") or {}, rec["config"]
        if rec["status"] == "ok" and m.get("samples_per_s") and int(c["devices"]) * int(c["cluster"]["nodes"]) == 1:
            ok.setdefault(_series_key(c), []).append(float(m["samples_per_s"]))
    rows = []
    for rec in sweep_records:
        c, m = rec["config"], rec.get("metrics") or {}
        devices, nodes = int(c["devices"]), int(c["cluster"]["nodes"])
        n = devices * nodes
        speedup = efficiency = None
        base = metrics.median(ok.get(_series_key(c), []))
        if rec["status"] == "ok" and m.get("samples_per_s") and base > 0:
            speedup = metrics.speedup(float(m["samples_per_s"]), base)
            efficiency = metrics.efficiency(speedup, n)
        key = _series_key(c)
        rows.append({
            "cell": rec["run_id"], "backend": key[0], "workload": key[1], "workload_params": key[2], "data": key[3],
            "scaling": key[4], "variant": key[5], "settings": key[6], "devices": devices, "nodes": nodes,
            "layout": f"{devices}x{nodes}", "total_devices": n, "repeat": int(c.get("repeat", 0)),
            "status": rec["status"], "samples_per_s": m.get("samples_per_s"),
            "samples_per_s_per_device": m.get("samples_per_s_per_device"), "speedup": speedup,
            "efficiency": efficiency, "step_time_p50_s": (m.get("step_time_s") or {}).get("p50"),
            "final_test_accuracy": m.get("final_test_accuracy"), "time_to_accuracy_s": m.get("time_to_accuracy_s"),
            "error": (rec.get("error") or "").splitlines()[0] if rec.get("error") else None,
        })
    return sorted(rows, key=lambda r: (r["backend"], r["workload"], r["data"], r["scaling"], r["total_devices"],
                                       r["layout"], r["repeat"]))


def sweep_lines(rows: list[dict], figure: str) -> tuple[list[list[int]], list[list[float]], list[str]]:
    """(xs, ys, keys) for one line per backend: the median of ``figure`` over the repeats of ok
    cells, against total device count. Lines are also split by workload, its parameters, data,
    scaling, variant, settings and node count when the sweep varies them, so no two layouts or
    variants share a line."""
    # settings differ between backends by nature (fast=..., steps_per_call=...): split only within one
    varied = [k for k in _LINE_SPLITS if len({(r["backend"], r[k]) if k == "settings" else r[k] for r in rows})
              > (len({r["backend"] for r in rows}) if k == "settings" else 1)]
    series: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r["status"] != "ok" or r[figure] is None:
            continue
        key = "/".join([r["backend"], *(f"{r[k]} nodes" if k == "nodes" else str(r[k]) for k in varied)])
        series.setdefault(key, {}).setdefault(r["total_devices"], []).append(float(r[figure]))
    keys = sorted(series)
    xs = [sorted(series[k]) for k in keys]
    ys = [[metrics.median(series[k][n]) for n in x] for k, x in zip(keys, xs)]
    return xs, ys, keys


def log_sweep_summary(cfg: Any, sweep_id: str) -> Path | None:
    """Log the sweep's summary run (``job_type="summary"``) from its records; returns the run's
    folder, or None (logger off, no cells, or W&B failing: one warning then). ``cfg``: the
    sweep's config, a dict or Hydra's DictConfig. Never raises."""
    try:
        return _log_sweep_summary(_plain(cfg), sweep_id)
    except Exception as exc:  # a broken summary must not fail a finished sweep
        _warn(f"sweep summary not logged ({_first_line(exc)})")
        return None


def _plain(cfg: Any) -> dict:
    """The sweep's config as a dict, with the command line's overrides (the swept axes)."""
    if isinstance(cfg, dict):
        return cfg
    from omegaconf import OmegaConf

    # the hydra node resolves only inside a job; the sweep's own keys are what the summary needs
    plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    try:
        plain["overrides"] = [str(o) for o in cfg.hydra.overrides.task]
    except Exception:  # no hydra node (a plain call): the config alone
        pass
    return plain


def sweep_description(cfg: dict, sweep_id: str, recs: list[dict], rows: list[dict]) -> dict:
    """The summary run's config: the sweep (its id, experiment, command-line overrides and the
    values its cells took on each axis), not one cell's config."""
    def values(get) -> list:
        return sorted({get(r) for r in recs if get(r) is not None}, key=str)

    return {"sweep_id": sweep_id, "experiment": cfg.get("experiment"), "results_dir": str(cfg.get("results_dir")),
            "overrides": list(cfg.get("overrides") or []),
            "backends": values(lambda r: r["config"]["backend"]["name"]),
            "workloads": values(lambda r: r["config"]["workload"]["name"]),
            "data": values(lambda r: r["config"]["data"]["name"]),
            "scaling": values(lambda r: r["config"].get("scaling")),
            "devices": values(lambda r: r["config"]["devices"] * r["config"]["cluster"]["nodes"]),
            "layouts": values(lambda r: f"{r['config']['devices']}x{r['config']['cluster']['nodes']}"),
            "variants": values(lambda r: r["config"].get("variant") or "defaults"),
            "repeats": values(lambda r: r["config"].get("repeat", 0)),
            "cells": [r["cell"] for r in rows]}


def _log_sweep_summary(cfg: dict, sweep_id: str) -> Path | None:
    results_dir = cfg["results_dir"]
    recs = [rec for _, rec in records.read_records(results_dir) if rec.get("group") == sweep_id
            and records.kind(rec) == "train"] if Path(results_dir).exists() else []
    if not recs or (cfg.get("logger") or {}).get("name") != "wandb":
        return None
    rows = sweep_rows(recs)
    config = scrub_secrets(sweep_description(cfg, sweep_id, recs, rows))
    run = start_run(cfg, group=sweep_id, job_type="summary", name=f"{sweep_id}-summary", config=config,
                    tags=["summary", str(sweep_id)])
    if run is None:
        return None
    tracker = WandbTracker(run, step_axis=False)  # for its guarded calls

    def log() -> None:
        import wandb

        table = wandb.Table(columns=TABLE_COLUMNS, data=[[r[c] for c in TABLE_COLUMNS] for r in rows])
        logged: dict[str, Any] = {"cells": table}
        for figure, name, title in (("samples_per_s", "throughput", "throughput (samples/s)"),
                                    ("speedup", "speedup", "speedup"),
                                    ("efficiency", "efficiency", "scaling efficiency")):
            xs, ys, keys = sweep_lines(rows, figure)
            if keys:
                logged[f"{name}_vs_devices"] = wandb.plot.line_series(
                    xs=xs, ys=ys, keys=keys, title=f"{sweep_id}: {title} vs devices", xname="devices")
        run.log(logged)
        # (the table stays under "cells": a number there would replace it)
        run.summary.update({"cells_total": len(rows), "cells_ok": sum(r["status"] == "ok" for r in rows)})
        from scaling import decomposition  # where the time goes, per backend and N

        run.summary.update(decomposition.summary_values(decomposition.load(results_dir), sweep_id))

    tracker._call(log)
    where = tracker.run_dir
    tracker._call(run.finish)
    return where if tracker.active else None
