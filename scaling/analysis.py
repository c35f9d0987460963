"""From records to numbers: a tidy table of runs, the aggregate over repeats, and the seed claim.

No framework imports (pandas and numpy only), so the CLI, the report and the tests load it at once.

Definitions (the same for weak and strong scaling; only what is held fixed differs):

* ``N`` = devices per node x nodes.
* throughput = global samples/s of the timed steps (the record's ``samples_per_s``); the median
  over repeats is the cell's figure, min and max its spread.
* speedup ``S(N) = throughput(N) / throughput(1)`` of the same backend, workload, data, scaling
  mode and variant. Weak scaling: the per-device batch is fixed, so ideal throughput grows as N.
  Strong scaling: the global batch is fixed, so the ideal step time shrinks as 1/N and again the
  ideal throughput grows as N. Either way ``efficiency = S(N) / N`` and 1 is ideal.
* Karp-Flatt serial fraction ``e = (1/S - 1/N) / (1 - 1/N)`` for N > 1: the Amdahl serial
  fraction that would explain the measured speedup; above 1 when adding devices slows a run down.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from scaling.records import SCHEMA_VERSION, loads_strict

#: what identifies one aggregate cell, apart from N (the repeats are aggregated over)
STUDY_KEYS = ["sweep", "workload", "data", "scaling", "variant"]
CELL_KEYS = STUDY_KEYS + ["backend", "framework"]
#: ``*-r<repeat>`` or ``*-r<repeat>-<hash of other overrides>`` (scaling/sweep.py's cell ids)
_CELL_ID = re.compile(r"-r\d+(?:-([0-9a-f]{8}))?$")

#: parameters per workload, for when a record's config does not carry ``workload.parameters``
WORKLOAD_PARAMETERS = {"mlp": 101_770, "cnn": 1_199_882}


@dataclass
class Loaded:
    """What a results folder held: the usable records and a plain account of everything else."""

    results_dir: Path
    records: list[dict] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    #: one human sentence per thing that is missing, skipped or odd
    problems: list[str] = field(default_factory=list)
    files_seen: int = 0

    @property
    def empty(self) -> bool:
        return not self.records


def load(results_dir: str | Path) -> Loaded:
    """Read every ``<results_dir>/<group>/*.json`` (or ``<results_dir>/*.json`` when the folder is
    one sweep). Unreadable files, other schema versions and records without a config are skipped
    and named in ``problems``; failed runs are kept (their status says so)."""
    root = Path(results_dir)
    out = Loaded(results_dir=root)
    if not root.exists():
        out.problems.append(f"results folder {root} does not exist")
        return out
    if not root.is_dir():
        out.problems.append(f"{root} is not a folder")
        return out
    paths = sorted(p for p in root.glob("*/*.json") if not p.name.startswith("."))
    if not paths:  # a sweep's own folder
        paths = sorted(p for p in root.glob("*.json") if not p.name.startswith("."))
    out.files_seen = len(paths)
    if not paths:
        out.problems.append(f"no records in {root} (expected <results_dir>/<sweep>/<run>.json): run `scaling sweep ...` first")
        return out
    versions: dict[Any, int] = {}
    for path in paths:
        rel = path.relative_to(root)
        try:
            record = loads_strict(path.read_text())  # no NaN or Infinity: records are strict JSON
        except (OSError, ValueError) as exc:
            out.problems.append(f"{rel}: not readable JSON ({exc.__class__.__name__}), skipped")
            continue
        if not isinstance(record, dict):
            out.problems.append(f"{rel}: not a record (a JSON {type(record).__name__}), skipped")
            continue
        version = record.get("schema_version")
        if version != SCHEMA_VERSION:
            versions[version] = versions.get(version, 0) + 1
            continue
        if not isinstance(record.get("config"), dict) or record.get("status") not in ("ok", "failed"):
            out.problems.append(f"{rel}: schema version {version} but no config or status, skipped")
            continue
        out.records.append(record)
        out.paths.append(path)
    for version, count in versions.items():
        what = "no schema_version" if version is None else f"schema_version {version!r}"
        out.problems.append(f"{count} record(s) with {what} skipped: this reader understands version {SCHEMA_VERSION} only")
    return out


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def accelerator(env: dict | None) -> str:
    """'gpu' when the record names a GPU, else 'cpu'."""
    env = env or {}
    gpu = env.get("gpu")
    if gpu:
        return "gpu"
    device = str(env.get("device") or "")
    return "gpu" if device.startswith(("cuda", "gpu", "GPU", "/GPU")) else "cpu"


def tidy(records: Iterable[dict], paths: Iterable[Path] | None = None) -> pd.DataFrame:
    """One row per record (one repeat of one cell), with ``N = devices x nodes``."""
    rows = []
    paths = list(paths) if paths is not None else None
    for i, r in enumerate(records):
        cfg, m, env = r.get("config") or {}, r.get("metrics") or {}, r.get("environment") or {}
        st = m.get("step_time_s") or {}
        devices = int(_get(cfg, "devices", default=m.get("devices") or 1) or 1)
        nodes = int(_get(cfg, "cluster", "nodes", default=1) or 1)
        workload = _get(cfg, "workload", "name", default="?")
        run_id = str(r.get("run_id") or "")
        match = _CELL_ID.search(run_id)
        gpu = env.get("gpu") or {}
        epoch_times = m.get("epoch_time_s") or []
        rows.append({
            "sweep": r.get("group") or _get(cfg, "sweep_id") or "runs",
            "run_id": run_id,
            "status": r.get("status"),
            "error": r.get("error"),
            "backend": _get(cfg, "backend", "name", default="?"),
            "framework": _get(cfg, "backend", "framework", default="?"),
            "workload": workload,
            "parameters": _get(cfg, "workload", "parameters", default=WORKLOAD_PARAMETERS.get(workload)),
            "data": _get(cfg, "data", "name", default="?"),
            "scaling": cfg.get("scaling", "weak"),
            "variant": (match.group(1) or "") if match else "",
            "devices_per_node": devices,
            "nodes": nodes,
            "N": devices * nodes,
            "repeat": cfg.get("repeat", 0),
            "per_device_batch": m.get("per_device_batch", _get(cfg, "train", "per_device_batch")),
            "global_batch": m.get("global_batch"),
            "samples_per_s": _num(m.get("samples_per_s")),
            "samples_per_s_per_device": _num(m.get("samples_per_s_per_device")),
            "step_time_mean_s": _num(st.get("mean")),
            "step_time_p50_s": _num(st.get("p50")),
            "step_time_p95_s": _num(st.get("p95")),
            "step_time_cv": _num(st.get("cv")),
            "timed_steps": st.get("n"),
            "train_time_s": float(sum(epoch_times)) if epoch_times else math.nan,
            "epochs": len(epoch_times),
            "startup_s": _num(m.get("startup_s")),
            "time_to_accuracy_s": _num(m.get("time_to_accuracy_s")),
            "target_accuracy": _num(m.get("target_accuracy")),
            "final_test_accuracy": _num(m.get("final_test_accuracy")),
            "final_test_loss": _num(m.get("final_test_loss")),
            "peak_host_rss_bytes": _num(m.get("peak_host_rss_bytes")),
            "peak_device_memory_bytes": _num(m.get("peak_device_memory_bytes")),
            "ranks_in_sync": m.get("ranks_in_sync"),
            "accelerator": accelerator(env),
            "gpu_model": (gpu.get("model") or gpu.get("name")) if isinstance(gpu, dict) else None,
            "host": env.get("host"),
            "cpu_model": env.get("cpu_model"),
            "cpu_count": env.get("cpu_count"),
            "frameworks": ", ".join(f"{k} {v}" for k, v in sorted((env.get("frameworks") or {}).items())),
            "python": env.get("python"),
            "created": r.get("created"),
            "path": str(paths[i]) if paths else None,
        })
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["sweep", "run_id", "status", "backend", "framework", "workload", "data",
                                     "scaling", "variant", "N", "repeat", "samples_per_s"])
    return df.sort_values(CELL_KEYS + ["N", "repeat"], kind="stable").reset_index(drop=True)


def karp_flatt(speedup: float, n: float) -> float:
    """Karp-Flatt experimentally determined serial fraction; NaN for N = 1 or no speedup."""
    if not (n > 1) or not (speedup > 0):
        return math.nan
    return (1.0 / speedup - 1.0 / n) / (1.0 - 1.0 / n)


def aggregate(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per (study, backend, N): median and spread over the ok repeats, speedup, efficiency,
    Karp-Flatt fraction, step times, time-to-accuracy and accuracy. Failed repeats are counted."""
    if cells.empty or "status" not in cells:
        return pd.DataFrame()
    keys = CELL_KEYS + ["N"]
    failed = cells[cells["status"] != "ok"].groupby(keys, dropna=False).size().rename("failed")
    ok = cells[(cells["status"] == "ok") & cells["samples_per_s"].notna()]
    if ok.empty:
        return pd.DataFrame()
    g = ok.groupby(keys, dropna=False)
    thr = g["samples_per_s"]
    agg = pd.DataFrame({
        "repeats": g.size(),
        "nodes": g["nodes"].max(),
        "global_batch": g["global_batch"].median(),
        "per_device_batch": g["per_device_batch"].median(),
        "throughput": thr.median(),
        "throughput_min": thr.min(),
        "throughput_max": thr.max(),
        "throughput_std": thr.std(ddof=1),
        "throughput_per_device": g["samples_per_s_per_device"].median(),
        "step_time_p50_s": g["step_time_p50_s"].median(),
        "step_time_p95_s": g["step_time_p95_s"].median(),
        "step_time_cv": g["step_time_cv"].median(),
        "time_to_accuracy_s": g["time_to_accuracy_s"].median(),
        "reached_target": g["time_to_accuracy_s"].count(),
        "target_accuracy": g["target_accuracy"].max(),
        "final_test_accuracy": g["final_test_accuracy"].median(),
        "final_test_accuracy_min": g["final_test_accuracy"].min(),
        "final_test_accuracy_max": g["final_test_accuracy"].max(),
        "train_time_s": g["train_time_s"].median(),
        "startup_s": g["startup_s"].median(),
        "accelerator": g["accelerator"].agg(lambda s: "gpu" if (s == "gpu").any() else "cpu"),
    })
    agg = agg.join(failed, how="left")
    agg["failed"] = agg["failed"].fillna(0).astype(int)
    agg["throughput_spread"] = (agg["throughput_max"] - agg["throughput_min"]) / agg["throughput"]
    agg = agg.reset_index()

    base = agg[agg["N"] == 1].set_index(CELL_KEYS)[["throughput", "throughput_min", "throughput_max"]]
    joined = agg.join(base.add_suffix("_1"), on=CELL_KEYS)
    agg["speedup"] = joined["throughput"] / joined["throughput_1"]
    # the repeat-range of the speedup: worst N-repeat over best 1-repeat, and the other way round
    agg["speedup_min"] = joined["throughput_min"] / joined["throughput_max_1"]
    agg["speedup_max"] = joined["throughput_max"] / joined["throughput_min_1"]
    agg["efficiency"] = agg["speedup"] / agg["N"]
    agg["karp_flatt"] = [karp_flatt(s, n) for s, n in zip(agg["speedup"], agg["N"])]
    return agg.sort_values(keys, kind="stable").reset_index(drop=True)


def missing_baselines(agg: pd.DataFrame) -> list[str]:
    """Sentences naming the backends whose speedup cannot be computed (no ok N=1 cell)."""
    if agg.empty:
        return []
    out = []
    for key, grp in agg.groupby(CELL_KEYS, dropna=False):
        if (grp["N"] == 1).any() or len(grp) == 0:
            continue
        d = dict(zip(CELL_KEYS, key))
        out.append(f"{d['backend']} ({d['workload']}, {d['data']}, {d['scaling']}, sweep {d['sweep']}): no ok N=1 run, "
                   f"so no speedup or efficiency (measured N = {', '.join(str(n) for n in sorted(grp['N']))})")
    return out


# -- the seed claim -----------------------------------------------------------------------------

SEED_CLAIM = ("TensorFlow typically outperforms in large-scale distributed systems, especially with "
              "multi-GPU setups")
SIGNIFICANCE_RULE = (
    "A difference counts only when every repeat of one framework's best backend beat every repeat of "
    "the other's, i.e. the repeat-range interval of the ratio [min TF / max PyTorch, max TF / min PyTorch] "
    "excludes 1. That is the exact Mann-Whitney rank test with U = 0 (p shown is its exact two-sided "
    "value; with 3 repeats a side it is 0.10, with 5 a side 0.008). Fewer than 2 repeats a side: no verdict. "
    "The best backend of each framework is the one with the highest median throughput at that device count."
)


def mann_whitney_exact_p(a: Iterable[float], b: Iterable[float]) -> float:
    """Exact two-sided permutation p-value of the Mann-Whitney U statistic (small samples)."""
    a, b = list(a), list(b)
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return math.nan

    def u(xs: list[float], ys: list[float]) -> float:
        return sum((x > y) + 0.5 * (x == y) for x in xs for y in ys)

    pooled = a + b
    observed = abs(u(a, b) - n * m / 2)
    total = extreme = 0
    for idx in itertools.combinations(range(n + m), n):
        chosen = set(idx)
        xs = [pooled[i] for i in idx]
        ys = [pooled[i] for i in range(n + m) if i not in chosen]
        total += 1
        extreme += abs(u(xs, ys) - n * m / 2) >= observed - 1e-12
        if total > 200_000:  # too many to enumerate; never reached with a handful of repeats
            break
    return extreme / total


def seed_claim(cells: pd.DataFrame) -> pd.DataFrame:
    """For each study and device count: best TF backend vs best PyTorch backend throughput ratio, its
    repeat-range interval, the exact rank-test p and a verdict (see ``SIGNIFICANCE_RULE``)."""
    cols = STUDY_KEYS + ["N", "tf_backend", "torch_backend", "tf_throughput", "torch_throughput", "ratio",
                         "ratio_low", "ratio_high", "p_value", "tf_repeats", "torch_repeats", "verdict"]
    ok = cells[(cells["status"] == "ok") & cells["samples_per_s"].notna()] if not cells.empty else cells
    rows = []
    if ok.empty:
        return pd.DataFrame(columns=cols)
    for key, grp in ok.groupby(STUDY_KEYS + ["N"], dropna=False):
        best = {}
        for fw in ("tf", "torch"):
            side = grp[grp["framework"] == fw]
            if side.empty:
                continue
            med = side.groupby("backend")["samples_per_s"].median()
            name = med.idxmax()
            best[fw] = (name, side.loc[side["backend"] == name, "samples_per_s"].to_numpy())
        row = dict(zip(STUDY_KEYS + ["N"], key))
        if len(best) < 2:
            have = next(iter(best), None)
            row.update(verdict=f"not comparable: only {'TF' if have == 'tf' else 'PyTorch'} measured at N={row['N']}")
            for fw in best:
                row[f"{fw}_backend"], vals = best[fw]
                row[f"{fw}_throughput"], row[f"{fw}_repeats"] = float(np.median(vals)), len(vals)
            rows.append(row)
            continue
        (tf_name, tf), (pt_name, pt) = best["tf"], best["torch"]
        ratio = float(np.median(tf) / np.median(pt))
        low, high = float(tf.min() / pt.max()), float(tf.max() / pt.min())
        p = mann_whitney_exact_p(tf, pt)
        if len(tf) < 2 or len(pt) < 2:
            verdict = "not enough repeats for a verdict"
        elif low > 1:
            verdict = "TF faster"
        elif high < 1:
            verdict = "PyTorch faster"
        else:
            verdict = "no significant difference"
        row.update(tf_backend=tf_name, torch_backend=pt_name, tf_throughput=float(np.median(tf)),
                   torch_throughput=float(np.median(pt)), ratio=ratio, ratio_low=low, ratio_high=high,
                   p_value=p, tf_repeats=len(tf), torch_repeats=len(pt), verdict=verdict)
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


# -- inventory ----------------------------------------------------------------------------------

def sweeps(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per sweep: records, ok, failed, backends, workloads, device counts."""
    if cells.empty:
        return pd.DataFrame(columns=["sweep", "records", "ok", "failed", "backends", "workloads", "scaling", "N",
                                     "accelerator", "first", "last"])
    rows = []
    for sweep, grp in cells.groupby("sweep"):
        rows.append({
            "sweep": sweep,
            "records": len(grp),
            "ok": int((grp["status"] == "ok").sum()),
            "failed": int((grp["status"] != "ok").sum()),
            "backends": ", ".join(sorted(grp["backend"].unique())),
            "workloads": ", ".join(sorted(f"{w}/{d}" for w, d in set(zip(grp["workload"], grp["data"])))),
            "scaling": ", ".join(sorted(grp["scaling"].unique())),
            "N": ", ".join(str(n) for n in sorted(grp["N"].unique())),
            "accelerator": ", ".join(sorted(grp["accelerator"].unique())),
            "first": grp["created"].min(),
            "last": grp["created"].max(),
        })
    return pd.DataFrame(rows)


def environments(records: Iterable[dict]) -> pd.DataFrame:
    """The distinct machines the records ran on (host, CPU, GPU, Python, OS), with the framework
    versions the records name and how many records each machine produced."""
    seen: dict[tuple, dict] = {}
    for r in records:
        env = r.get("environment") or {}
        gpu = env.get("gpu")
        if isinstance(gpu, dict):
            gpu_text = f"{gpu.get('count', '?')} x {gpu.get('model') or gpu.get('name') or 'GPU'}"
        else:
            gpu_text = str(gpu) if gpu else "none (CPU workers)"
        row = {
            "host": env.get("host"),
            "cpu": f"{env.get('cpu_model')} ({env.get('cpu_count')} CPUs)",
            "memory_gib": round(env["memory_bytes"] / 2**30, 1) if env.get("memory_bytes") else None,
            "gpu": gpu_text,
            "python": env.get("python"),
            "platform": env.get("platform"),
            "slurm": "yes" if env.get("slurm") else "no",
        }
        key = tuple(row.values())
        entry = seen.setdefault(key, row | {"frameworks": set(), "records": 0})
        entry["frameworks"].update(f"{k} {v}" for k, v in (env.get("frameworks") or {}).items())
        entry["records"] += 1
    rows = [e | {"frameworks": ", ".join(sorted(e["frameworks"])) or "-"} for e in seen.values()]
    return pd.DataFrame(rows)
