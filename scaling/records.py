"""Result records: one JSON file per run, a versioned schema, written atomically.

A record is plain data. The report, W&B and the tests all read these files, never a framework.
Layout: ``<results_dir>/<group>/<run_id>.json`` (``group`` is the sweep id, or ``runs``), and beside
it ``<run_id>.hydra/`` with the run's composed config and its overrides, as Hydra names them in its
own output folder (``config.yaml``, ``overrides.yaml``). Only ``*/*.json`` files are records.
"""
from __future__ import annotations

import functools
import getpass
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

SCHEMA_VERSION = 1

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_STATS = {
    "type": "object",
    "required": ["n", "mean", "p50", "p95", "min", "max", "cv"],
    "properties": {k: _NUMBER_OR_NULL for k in ("mean", "p50", "p95", "min", "max", "cv")} | {"n": {"type": "integer"}},
}

#: what a record measures: a training run, or the collective micro-benchmark (``scaling comm``)
KINDS = ("train", "comm")

_COMM_SIZE = {
    "type": "object",
    "required": ["bytes", "elements", "iters", "latency_s", "algbw_bytes_per_s", "busbw_bytes_per_s"],
    "properties": {"bytes": {"type": "integer", "minimum": 1}, "elements": {"type": "integer"},
                   "label": {"type": ["string", "null"]}, "iters": {"type": "integer", "minimum": 1},
                   "latency_s": _STATS, "algbw_bytes_per_s": _NUMBER_OR_NULL, "busbw_bytes_per_s": _NUMBER_OR_NULL},
}
#: metrics of a ``kind: comm`` record: one entry per message size
COMM_METRICS: dict[str, Any] = {
    "type": "object",
    "required": ["collective", "library", "devices", "processes", "gradient_bytes", "sizes"],
    "properties": {"collective": {"const": "all_reduce"}, "library": {"type": "string"},
                   "devices": {"type": "integer", "minimum": 1}, "processes": {"type": "integer", "minimum": 1},
                   "gradient_bytes": {"type": "object", "additionalProperties": {"type": "integer"}},
                   "sizes": {"type": "array", "minItems": 1, "items": _COMM_SIZE}},
}

RECORD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "scaling result record",
    "type": "object",
    "required": ["schema_version", "run_id", "group", "status", "created", "config", "environment", "metrics", "error"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "run_id": {"type": "string", "minLength": 1},
        "group": {"type": "string", "minLength": 1},
        "status": {"enum": ["ok", "failed"]},
        # train (a training run; records without the key are train records) or comm (scaling comm)
        "kind": {"enum": list(KINDS)},
        "created": {"type": "string"},
        "config": {"type": "object"},
        "environment": {
            "type": "object",
            "required": ["python", "host", "cpu_model", "cpu_count", "frameworks", "gpu", "slurm"],
        },
        "error": {"type": ["string", "null"]},
        "interruption": {"type": "object", "properties": {"signal": {"type": "string"}, "action": {"type": "string"}}},
        "metrics": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": [
                        "samples_per_s", "samples_per_s_per_device", "global_batch", "devices",
                        "step_time_s", "epoch_time_s", "startup_s", "time_to_accuracy_s",
                        "target_accuracy", "final_test_accuracy", "final_test_loss",
                        "peak_host_rss_bytes", "peak_device_memory_bytes",
                    ],
                    "properties": {
                        "samples_per_s": _NUMBER_OR_NULL,
                        "samples_per_s_per_device": _NUMBER_OR_NULL,
                        "global_batch": {"type": "integer", "minimum": 1},
                        "devices": {"type": "integer", "minimum": 1},
                        "step_time_s": _STATS,
                        "epoch_time_s": {"type": "array", "items": {"type": "number"}},
                        "startup_s": _NUMBER_OR_NULL,
                        "tracker_start_s": {"type": "number", "minimum": 0},
                        "time_to_accuracy_s": _NUMBER_OR_NULL,
                        "target_accuracy": {"type": "number"},
                        "final_test_accuracy": _NUMBER_OR_NULL,
                        "final_test_loss": _NUMBER_OR_NULL,
                        "test_accuracy_per_epoch": {"type": "array", "items": {"type": "number"}},
                        "peak_host_rss_bytes": {"type": "integer"},
                        "peak_device_memory_bytes": {"type": ["integer", "null"]},
                        "rank_clock": {"type": "object"},  # optional: scaling.rank_clock.merge
                        "cell_time_s": {"type": ["object", "null"]},  # optional: scaling.cell_time.phases
                    },
                },
                COMM_METRICS,
            ]
        },
    },
}


class RecordError(ValueError):
    pass


@functools.lru_cache(maxsize=1)
def _schema_validator():
    """The schema's validator, made once: ``jsonschema.validate`` checks the schema itself against
    its metaschema on every call, which took 50 times longer than checking a record."""
    import jsonschema

    cls = jsonschema.validators.validator_for(RECORD_SCHEMA)
    cls.check_schema(RECORD_SCHEMA)
    return cls(RECORD_SCHEMA)


def validate(record: dict) -> None:
    """Raise RecordError naming the first schema violation (the one ``jsonschema.validate``
    would raise)."""
    import jsonschema

    exc = jsonschema.exceptions.best_match(_schema_validator().iter_errors(record))
    if exc is not None:
        where = "/".join(str(p) for p in exc.absolute_path) or "<root>"
        raise RecordError(f"record {record.get('run_id', '?')}: {where}: {exc.message}") from None
    bad = nonfinite(record)
    if bad:
        raise RecordError(f"record {record.get('run_id', '?')}: {bad} is {_at(record, bad)}: records are strict JSON "
                          "(no NaN or Infinity)")
    if record["status"] == "ok" and record["metrics"] is None:
        raise RecordError(f"record {record['run_id']}: status ok but no metrics")
    if record["status"] == "failed" and not record["error"]:
        raise RecordError(f"record {record['run_id']}: status failed but no error message")
    if record["metrics"] is not None and ("sizes" in record["metrics"]) != (kind(record) == "comm"):
        raise RecordError(f"record {record['run_id']}: kind {kind(record)} but metrics of another kind")


def kind(record: dict) -> str:
    """What the record measures (records written before kinds existed are training runs)."""
    return record.get("kind") or "train"


def nonfinite(body: Any, where: str = "") -> str | None:
    """The dotted path of the first NaN or infinite number in ``body``, or None."""
    if isinstance(body, float) and not math.isfinite(body):
        return where or "<root>"
    if isinstance(body, dict):
        items = body.items()
    elif isinstance(body, (list, tuple)):
        items = enumerate(body)
    else:
        return None
    for key, value in items:
        found = nonfinite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def _at(body: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        body = body[int(key)] if isinstance(body, (list, tuple)) else body[key]
    return body


def make_record(
    *, run_id: str, group: str, config: dict, environment: dict, metrics: dict | None, error: str | None,
    kind: str | None = None,
) -> dict:
    """A record; its kind defaults to the config's (a config with a ``comm`` block is a comm cell)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "group": group,
        "status": "failed" if error else "ok",
        "kind": kind or ("comm" if config.get("comm") else "train"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "environment": environment,
        "metrics": metrics,
        "error": error,
    }


def inside(results_dir: str | Path, *parts: str) -> Path:
    """``results_dir/parts...``, refused (RecordError) unless it lies inside results_dir."""
    root = Path(results_dir).resolve()
    path = root.joinpath(*parts).resolve()
    if path == root or root not in path.parents:
        raise RecordError(f"{'/'.join(parts)!r}: would be written outside the results folder {root}")
    return Path(results_dir).joinpath(*parts)


def record_path(results_dir: str | Path, group: str, run_id: str) -> Path:
    return inside(results_dir, group, f"{run_id}.json")


def write_record(record: dict, results_dir: str | Path) -> Path:
    """Validate, then write atomically (see write_json_atomic)."""
    validate(record)
    path = record_path(results_dir, record["group"], record["run_id"])
    write_json_atomic(path, record)
    return path


#: the folder beside a record holding its config, named as Hydra names its own (``.hydra``)
CONFIG_SUFFIX = ".hydra"


def config_folder(results_dir: str | Path, group: str, run_id: str) -> Path:
    """``<results_dir>/<group>/<run_id>.hydra``: where the run's config and overrides are saved."""
    return inside(results_dir, group, f"{run_id}{CONFIG_SUFFIX}")


def write_run_config(record: dict, results_dir: str | Path) -> Path:
    """Save the config the record ran with beside it, as Hydra saves a job's: ``config.yaml`` (the
    composed, resolved config) and ``overrides.yaml`` (the command line's overrides, the config's
    ``overrides`` key; an empty list when none were given). Returns the folder."""
    folder = config_folder(results_dir, record["group"], record["run_id"])
    config = dict(record["config"])
    overrides = list(config.pop("overrides", None) or [])
    write_yaml_atomic(folder / "config.yaml", config)
    write_yaml_atomic(folder / "overrides.yaml", overrides)
    return folder


def write_json_atomic(path: Path, body: Any) -> None:
    """Write ``body`` as strict JSON (no NaN or Infinity), atomically (see _write_atomic)."""
    def dump(clean: Any, fh: Any) -> None:
        json.dump(clean, fh, indent=1, sort_keys=False, default=_json_default, allow_nan=False)
        fh.write("\n")

    _write_atomic(path, body, dump)


def write_yaml_atomic(path: Path, body: Any) -> None:
    """Write ``body`` as YAML in its own key order, as Hydra writes configs, atomically."""
    import yaml

    def dump(clean: Any, fh: Any) -> None:
        plain = json.loads(json.dumps(clean, default=_json_default, allow_nan=False))  # numpy scalars, paths
        yaml.safe_dump(plain, fh, sort_keys=False, default_flow_style=False, allow_unicode=True)

    _write_atomic(path, body, dump)


def _write_atomic(path: Path, body: Any, dump: Callable[[Any, Any], None]) -> None:
    """A temp file in the same folder, fsync, rename over the target: a reader (or a crash) sees
    either no file or the whole file, never half of one. ``body`` is scrubbed of secrets first,
    whoever writes (the worker's record has been scrubbed already; the launcher's config has not)."""
    from scaling.secrets import scrub_secrets

    body = scrub_secrets(body)  # no API key reaches a record, a config snapshot or a report input
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            dump(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; records are for every reader of the results
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _json_default(obj: Any) -> Any:
    # numpy scalars and paths reach records through configs and metrics
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses NaN and Infinity (ValueError), as strict parsers and W&B do."""
    return json.loads(text, parse_constant=_no_constant)


def load_record(path: str | Path) -> dict:
    """One record, parsed as strict JSON (no NaN or Infinity) and checked against the schema;
    RecordError (or OSError) when it cannot be used."""
    try:
        record = loads_strict(Path(path).read_text())
    except ValueError as exc:
        raise RecordError(f"{path}: not a JSON record ({exc})") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path}: not a record (a JSON {type(record).__name__})")
    validate(record)
    return record


def read_records(results_dir: str | Path) -> Iterator[tuple[Path, dict]]:
    """Every valid record under ``results_dir`` (temp files skipped), in path order; a file that
    is no valid record is skipped with a note on stderr."""
    for path in sorted(Path(results_dir).glob("*/*.json")):
        if path.name.startswith("."):
            continue
        try:
            record = load_record(path)
        except (OSError, RecordError) as exc:
            print(f"note: {path}: skipped ({exc})", file=sys.stderr)
            continue
        yield path, record


# -- environment ------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slurm_environment() -> dict | None:
    if "SLURM_JOB_ID" not in os.environ:
        return None
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST",
            "SLURM_NNODES", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_PARTITION", "SLURM_JOB_GPUS")
    return {k.removeprefix("SLURM_").lower(): os.environ[k] for k in keys if k in os.environ}


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version, where one is loaded."""
    try:
        with open("/proc/driver/nvidia/version") as fh:
            first = fh.readline()
    except OSError:
        return None
    for word in first.split():
        if word.count(".") >= 1 and word.replace(".", "").isdigit():
            return word
    return None


def capture_environment(frameworks: dict[str, str] | None = None, gpu: dict | None = None) -> dict:
    """Where and with what a run ran. Backends add their framework versions and GPU facts."""
    if gpu is not None:
        gpu = {**gpu, "driver": gpu.get("driver") or nvidia_driver()}
    try:
        import psutil

        mem = psutil.virtual_memory().total
    except Exception:
        mem = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "user": _user(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": mem,
        "frameworks": dict(frameworks or {}),
        "gpu": gpu,
        "slurm": slurm_environment(),
        "comm_env": comm_environment(),
        "code": code_version(),
        "argv": sys.argv,
    }


#: variables that change how collectives run: recorded with every run, set or not by the site
COMM_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_", "HOROVOD_", "TF_COLLECTIVE", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def code_version() -> dict[str, Any]:
    """The study's own version: the package's, and in a clone the git commit and whether the
    working tree had changes (a figure must be traceable to the code that measured it)."""
    import subprocess

    out: dict[str, Any] = {"package": _package_version(), "git_commit": None, "git_dirty": None}
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            git = ["git", "-C", str(root)]
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
            status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, timeout=5)
            if commit.returncode == 0:
                out["git_commit"] = commit.stdout.strip()
                out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def _package_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("scaling")
    except Exception:
        return None


def comm_environment() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(COMM_ENV_PREFIXES)}


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:
        return None
