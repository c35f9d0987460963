"""From records to numbers: a tidy table of runs, the aggregate over repeats, and the seed claim.

No framework imports (pandas and numpy only), so the CLI, the report and the tests load it at once.

A cell is (study, backend, settings, layout): the study is (sweep, workload and its parameters but
its ``build`` block, data, scaling mode, variant, other overrides), the settings are the backend's fast modes
(``fast``, ``steps_per_call``, ``jit_compile``), the layout is ``<devices per node>x<nodes>``.
Records that differ in any of them are never pooled; ``N`` = devices per node x nodes is the x
axis, the layout is shown beside it.

throughput = global samples/s of the timed steps (the record's ``samples_per_s``); the median over
repeats is the cell's figure, min and max its spread. Speedup, efficiency and the serial fractions
(Karp-Flatt for strong scaling, Gustafson for weak) are defined in ``scaling.metrics``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from scaling import metrics
from scaling.config import runs_on
from scaling.records import SCHEMA_VERSION, loads_strict

#: what identifies one study (the backends compared with each other)
STUDY_KEYS = ["sweep", "workload", "workload_params", "data", "scaling", "variant", "overrides"]
#: one backend's series in a study (N = 1 is its speedup base)
CELL_KEYS = STUDY_KEYS + ["backend", "framework", "settings"]
#: one aggregate cell: the repeats of a series at one layout
AGG_KEYS = CELL_KEYS + ["N", "layout"]
#: backend options that change how fast a step runs; a record's values are part of its cell
FAST_SETTINGS = ("fast", "steps_per_call", "jit_compile")


def overrides_of(run_id: str, variant: str = "defaults") -> str:
    """The hash of a sweep cell's other overrides in its id (``scaling.naming.cell_id``:
    ``*-r<repeat>[-<variant>][-<hash>]``), or "" (none, or not a sweep cell's id)."""
    tail = "" if variant == "defaults" else f"(?:-{re.escape(variant)})?"
    match = re.search(rf"-r\d+{tail}(?:-([0-9a-f]{{8}}))?$", run_id)
    return (match.group(1) or "") if match else ""


def study_slug(key: dict) -> str:
    """A study's file-name stem: sweep, workload (its parameters but the derived count), data,
    scaling, the variant unless ``defaults``, and overrides; the same for every figure of a study."""
    params = ", ".join(p for p in str(key["workload_params"]).split(", ") if not p.startswith("parameters="))
    parts = [key["sweep"], key["workload"], params, key["data"], key["scaling"],
             "" if key["variant"] == "defaults" else key["variant"], key["overrides"]]
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", "-".join(str(p) for p in parts if p))


@dataclass
class Loaded:
    """What a results folder held: the usable records and a plain account of everything else."""

    results_dir: Path
    records: list[dict] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    #: one human sentence per thing that is missing, skipped or odd
    problems: list[str] = field(default_factory=list)
    files_seen: int = 0
    #: records of other kinds of measurement (``scaling comm``), kept apart from the training runs
    others: list[dict] = field(default_factory=list)

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
        if record.get("kind", "train") != "train":
            out.others.append(record)  # another kind of measurement (`scaling comm`): scaling.report_comm reads those
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


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


#: workload config keys that are no part of a study's identity: the name has its own column, and
#: the ``build`` block says how each framework builds the network, not which network it is (records
#: written before the block existed belong to the same studies)
_NOT_WORKLOAD_PARAMS = ("name", "build")


def workload_params(workload: dict) -> str:
    """The workload's parameters other than its name and build block, e.g. ``hidden=128, parameters=101770``."""
    return ", ".join(f"{k}={_text(v)}" for k, v in sorted((workload or {}).items()) if k not in _NOT_WORKLOAD_PARAMS)


def fast_settings(backend: dict) -> str:
    """The backend's fast-mode settings in force, e.g. ``jit_compile=false, steps_per_call=10``."""
    return ", ".join(f"{k}={_text(backend[k])}" for k in FAST_SETTINGS if k in (backend or {}))


def framework(cfg: dict) -> str:
    """The framework (``tf``, ``torch``) of a record's backend: the one place that reads it from
    the config, so the verdicts, the colours and the framework's best single device follow it."""
    return str(runs_on(_get(cfg, "backend", default=None) or {}).get("framework", "?"))


def run_conditions(record: dict) -> str:
    """What a run's speed depends on besides its cell: threads per rank, CPU placement and the
    evaluation work per rank. Records written before these were recorded fall back to the threads
    the environment saw in force (else the config's) and the environment's pinned CPUs."""
    cfg, m, env = record.get("config") or {}, record.get("metrics") or {}, record.get("environment") or {}
    cond = dict(m.get("conditions") or {})
    threads = cond.get("threads", env.get("threads", cfg.get("threads")))  # the threads in force, then the asked
    placement = cond.get("placement", cfg.get("placement", "default"))
    pinned = cond.get("pinned", bool(env.get("pinned_cpus")))
    evaluation = cond.get("evaluation", "unrecorded")
    return f"threads={threads}, placement={placement}, pinned={_text(bool(pinned))}, evaluation={evaluation}"


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
        gpu = env.get("gpu") or {}
        epoch_times = m.get("epoch_time_s") or []
        rows.append({
            "sweep": r.get("group") or _get(cfg, "sweep_id") or "runs",
            "run_id": run_id,
            "status": r.get("status"),
            "error": r.get("error"),
            "backend": _get(cfg, "backend", "name", default="?"),
            "framework": framework(cfg),
            "workload": workload,
            "workload_params": workload_params(_get(cfg, "workload", default={})),
            "settings": fast_settings(_get(cfg, "backend", default={})),
            "parameters": (_get(cfg, "workload", "parameters")
                           or workload_parameters(_get(cfg, "workload", default={}))),
            "data": _get(cfg, "data", "name", default="?"),
            "scaling": cfg.get("scaling", "weak"),
            "variant": str(cfg.get("variant") or "defaults"),
            # a backend with no tuned settings runs the same in both variants (its defaults cells stand for it)
            "tunable": bool(_get(cfg, "backend", "tuned", default=None)),
            "overrides": overrides_of(run_id, str(_get(cfg, "variant", default="defaults") or "defaults")),
            "devices_per_node": devices,
            "nodes": nodes,
            "N": devices * nodes,
            "layout": f"{devices}x{nodes}",
            "conditions": run_conditions(r),
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
        return pd.DataFrame(columns=AGG_KEYS + ["run_id", "status", "repeat", "samples_per_s"])
    return df.sort_values(AGG_KEYS + ["repeat"], kind="stable").reset_index(drop=True)


def aggregate(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (study, backend, settings, N, layout): median and spread over the ok repeats,
    speedup over the backend's own N = 1 cell, efficiency, the serial fraction of the scaling mode's
    law (``scaling.metrics``), step times, time-to-accuracy and accuracy. Failed repeats are
    counted; ``conditions_note`` says when the repeats, or the cell and its N = 1 base, ran under
    different conditions (threads, CPU placement, evaluation work). ``efficiency_vs_framework_best``
    is the efficiency against the best single-device cell of the same framework
    (``framework_best``, ``framework_best_throughput``)."""
    if cells.empty or "status" not in cells:
        return pd.DataFrame()
    keys = AGG_KEYS
    failed = cells[cells["status"] != "ok"].groupby(keys, dropna=False).size().rename("failed")
    ok = cells[(cells["status"] == "ok") & cells["samples_per_s"].notna()]
    if ok.empty:
        return pd.DataFrame()
    g = ok.groupby(keys, dropna=False)
    thr = g["samples_per_s"]
    agg = pd.DataFrame({
        "repeats": g.size(),
        "nodes": g["nodes"].max(),
        "devices_per_node": g["devices_per_node"].max(),
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
        "conditions": g["conditions"].agg(lambda s: " | ".join(sorted(set(s)))),
        "tunable": g["tunable"].any() if "tunable" in ok else False,
    })
    agg = agg.join(failed, how="left")
    agg["failed"] = agg["failed"].fillna(0).astype(int)
    agg["throughput_spread"] = (agg["throughput_max"] - agg["throughput_min"]) / agg["throughput"]
    agg = agg.reset_index()

    base = agg[agg["N"] == 1].set_index(CELL_KEYS)[["throughput", "throughput_min", "throughput_max", "conditions"]]
    joined = agg.join(base.add_suffix("_1"), on=CELL_KEYS)
    agg["base_throughput"] = joined["throughput_1"]
    agg["speedup"] = [metrics.speedup(t, b) for t, b in zip(joined["throughput"], joined["throughput_1"])]
    # the repeat-range of the speedup: worst N-repeat over best 1-repeat, and the other way round
    agg["speedup_min"] = joined["throughput_min"] / joined["throughput_max_1"]
    agg["speedup_max"] = joined["throughput_max"] / joined["throughput_min_1"]
    agg["efficiency"] = [metrics.efficiency(s, n) for s, n in zip(agg["speedup"], agg["N"])]
    agg["serial_fraction"] = [metrics.serial_fraction(s, n, sc) for s, n, sc in zip(agg["speedup"], agg["N"], agg["scaling"])]
    agg["serial_law"] = [metrics.serial_law(sc) for sc in agg["scaling"]]
    agg["conditions_note"] = [_conditions_note(c, c1) for c, c1 in zip(joined["conditions"], joined["conditions_1"])]
    agg = _framework_best(agg)
    return agg.sort_values(keys, kind="stable").reset_index(drop=True)


def untuned_in_every_variant(rows: pd.DataFrame, variants: Any = None) -> pd.DataFrame:
    """``rows`` plus, for every variant other than ``defaults`` present (or in ``variants``), the defaults rows of
    backends with no tuned settings (the plain loops, torch_reference): they run the same in every
    variant, so they stand as baselines of the tuned study too (``variant=tuned`` is no valid cell
    for them)."""
    if "tunable" not in rows or rows.empty:
        return rows
    plain = rows[(rows["variant"] == "defaults") & ~rows["tunable"].astype(bool)]
    wanted = rows["variant"].unique() if variants is None else variants
    extra = [plain.assign(variant=v) for v in wanted if v != "defaults"]
    return pd.concat([rows, *extra], ignore_index=True) if extra else rows


def _framework_best(agg: pd.DataFrame) -> pd.DataFrame:
    """Each cell's efficiency against the best single-device cell of its framework in its study
    (``metrics.best_single_device``), with that cell's name and samples/s beside it."""
    several = agg.groupby(STUDY_KEYS + ["backend"], dropna=False)["settings"].transform("nunique") > 1
    label = [f"{b} [{s}]" if many and s else b for b, s, many in zip(agg["backend"], agg["settings"], several)]
    ones = untuned_in_every_variant(agg.assign(label=label)[agg["N"] == 1])
    best = {key: metrics.best_single_device(dict(zip(g["label"], g["throughput"])))
            for key, g in ones.groupby(STUDY_KEYS + ["framework"], dropna=False)}
    found = [best.get(tuple(r), (None, math.nan)) for r in agg[STUDY_KEYS + ["framework"]].itertuples(index=False)]
    agg["framework_best"] = [name for name, _ in found]
    agg["framework_best_throughput"] = [thr for _, thr in found]
    agg["efficiency_vs_framework_best"] = [metrics.efficiency_vs_best(t, n, b) for t, n, b in
                                           zip(agg["throughput"], agg["N"], agg["framework_best_throughput"])]
    return agg


def _conditions_note(conditions: str, base: Any) -> str:
    notes = []
    if " | " in conditions:
        notes.append(f"repeats ran under different conditions ({conditions})")
    elif isinstance(base, str) and " | " not in base and base != conditions:
        here, there = (dict(kv.split("=", 1) for kv in c.split(", ")) for c in (conditions, base))
        diff = [k for k in here if here[k] != there.get(k)]
        notes.append("the N=1 base ran under other conditions: "
                     + ", ".join(f"{k}={there.get(k)} there, {here[k]} here" for k in diff))
    elif isinstance(base, str) and base != conditions:
        notes.append(f"the N=1 base's repeats ran under different conditions ({base})")
    return "; ".join(notes)


def condition_flags(agg: pd.DataFrame) -> list[str]:
    """Sentences naming the cells whose repeats or N = 1 base ran under different conditions."""
    if agg.empty or "conditions_note" not in agg:
        return []
    return [f"{r['backend']} N={r['N']} ({r['layout']}, {r['workload']}, sweep {r['sweep']}): {r['conditions_note']}"
            for r in agg.to_dict("records") if r["conditions_note"]]


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
            extras = [f"{k} {gpu[k]}" for k in ("driver", "cuda", "nccl") if gpu.get(k)]
            gpu_text += f" ({', '.join(extras)})" if extras else ""
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
            "code": _code_text(env.get("code")),
        }
        key = tuple(row.values())
        entry = seen.setdefault(key, row | {"frameworks": set(), "records": 0})
        entry["frameworks"].update(f"{k} {v}" for k, v in (env.get("frameworks") or {}).items())
        entry["records"] += 1
    rows = [e | {"frameworks": ", ".join(sorted(e["frameworks"])) or "-"} for e in seen.values()]
    return pd.DataFrame(rows)


def _code_text(code: dict | None) -> str:
    """``scaling 0.1.0 @ 1a2b3c4d (+changes)``, or what of it the record has."""
    if not code:
        return "-"
    text = f"scaling {code.get('package') or '?'}"
    if code.get("git_commit"):
        text += f" @ {code['git_commit'][:10]}" + (" (+uncommitted changes)" if code.get("git_dirty") else "")
    return text


def workload_parameters(workload: dict | str) -> int | None:
    """A workload's parameter count from its formula (``scaling.workloads``), for records that do
    not carry it; None for a workload without one."""
    from scaling.workloads import parameters

    try:
        return parameters(workload)
    except (KeyError, TypeError, ValueError):
        return None
