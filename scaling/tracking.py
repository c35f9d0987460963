"""W&B tracking (``logger=wandb``): one W&B run per cell from rank 0, one summary run per sweep.

The tracker only transports numbers the protocol has measured; the JSON record stays the truth.
- per cell: ``group`` = sweep id, ``job_type`` = backend, run name = the cell's run id, tags =
  backend, framework, device kind, variant, workload; config = the resolved config plus the
  environment; history in W&B sections against the ``step`` metric (optimizer steps):
  ``perf/step_time_s``, ``perf/samples_per_s`` every ``protocol.log_every`` steps, ``train/loss``,
  ``test/accuracy`` and ``test/loss`` after every epoch; summary = every protocol figure of the
  record but the loss curve (nested ones flattened into sections: ``step_time_s/p50``) and the
  record's ``status``; W&B's system metrics (``logger.system_metrics``).
- per sweep (``scaling.tracking_sweep``): a run with ``job_type="summary"`` whose config
  describes the sweep (axes and their values, overrides), holding a ``wandb.Table`` of all cells
  ("cells") and line plots of throughput, speedup and efficiency against device count, one line
  per backend.

W&B must never cost a run: every call is wrapped, the first failure prints one warning and turns
the tracker off, ``wandb.init`` and ``finish`` run under timeouts, and an online run that cannot
start falls back to an offline one. Every W&B file goes under ``<results_dir>/wandb`` (offline
runs would otherwise land in the working directory and the home directory); upload offline runs
later with ``wandb sync <results_dir>/wandb/offline-run-*``.

Secrets: a cell's config and argv pass through :func:`scrub_secrets` when its run starts, and the
record it finishes with has been scrubbed by ``scaling.sinks.deliver``, so an API key never lands
in a file. The sweep's summary run lives in ``scaling.tracking_sweep``.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from scaling import comm, records
from scaling.config import runs_on
from scaling.geometry import on_gpu
from scaling.protocol import Observer

from scaling.secrets import REDACTED, _netrc_key, known_secrets, scrub_secrets  # noqa: F401  (re-exported)


# -- modes and directories --------------------------------------------------------------------

MODES = ("auto", "online", "offline", "disabled")


def api_key_configured() -> bool:
    return bool(os.environ.get("WANDB_API_KEY")) or bool(_netrc_key())


def resolve_mode(mode: str | None) -> str:
    """``auto``: $WANDB_MODE when set, else online with an API key configured, else offline."""
    mode = (mode or "auto").lower()
    if mode == "auto":
        if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
            return "disabled"
        env = os.environ.get("WANDB_MODE", "").lower()
        if env:
            return {"dryrun": "offline", "run": "online", "disable": "disabled"}.get(env, env)
        return "online" if api_key_configured() else "offline"
    if mode not in MODES:
        raise ValueError(f"logger.mode={mode!r}: must be one of {', '.join(MODES)}")
    return mode


def wandb_root(results_dir: str | Path) -> Path:
    """Where W&B writes: ``<results_dir>/wandb`` (runs in ``offline-run-*`` / ``run-*`` below it)."""
    return Path(results_dir).resolve() / "wandb"


def use_results_dir(results_dir: str | Path) -> Path:
    """Point every W&B directory (runs, cache, config, staging data, artifacts) under the results
    directory; W&B reads these variables, and would otherwise write into the home directory."""
    root = wandb_root(results_dir)
    dirs = {"WANDB_DIR": root.parent, "WANDB_CACHE_DIR": root / ".cache", "WANDB_CONFIG_DIR": root / ".config",
            "WANDB_DATA_DIR": root / ".data", "WANDB_ARTIFACT_DIR": root / ".artifacts"}
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)
    return root


@contextlib.contextmanager
def _scrubbed_argv() -> Iterator[None]:
    """W&B copies ``sys.argv`` into the run's metadata at init: show it a scrubbed one."""
    saved = sys.argv
    sys.argv = [str(a) for a in scrub_secrets(list(saved))]
    try:
        yield
    finally:
        sys.argv = saved


# -- warnings ---------------------------------------------------------------------------------

def _warn(msg: str) -> None:
    print(f"scaling: W&B: {scrub_secrets(msg)}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _init(lcfg: dict, mode: str, results_dir: str | Path, tags: list[str] | None = None, **kwargs: Any):
    """``wandb.init`` under the logger config's timeouts, quiet, never touching stdout; ``tags``
    join the logger config's own."""
    import wandb

    stats_pid = kwargs.pop("stats_pid", None)
    settings = wandb.Settings(
        init_timeout=float(lcfg.get("init_timeout", 10)),
        finish_timeout=float(lcfg.get("finish_timeout", 60)),
        console="off",  # the launcher keeps the run's log; W&B need not wrap stdout
        silent=True,  # one line of ours instead (make_tracker, start_run's warnings)
        x_disable_stats=not lcfg.get("system_metrics", True),
        disable_git=True,
        save_code=False,
        x_save_requirements=False,
        **({"x_stats_pid": int(stats_pid)} if stats_pid else {}),
    )
    with _scrubbed_argv():
        return wandb.init(project=lcfg.get("project") or "scaling", entity=lcfg.get("entity") or None,
                          tags=list(dict.fromkeys([*(lcfg.get("tags") or []), *(tags or [])])) or None, mode=mode,
                          dir=str(wandb_root(results_dir).parent), settings=settings, reinit="create_new", **kwargs)


def start_run(cfg: dict, **kwargs: Any):
    """Start a W&B run for ``cfg`` (its ``logger`` and ``results_dir``), or None (logger off,
    W&B missing, or W&B failing: one warning then). An online run that cannot start (no network,
    bad key, server error) is retried offline, so the data can still be synced later."""
    lcfg = cfg.get("logger") or {}
    if lcfg.get("name", "none") != "wandb":
        return None
    try:
        mode = resolve_mode(lcfg.get("mode"))
    except ValueError as exc:
        _warn(f"{exc}; not logging this run")
        return None
    if mode == "disabled":
        return None
    try:
        use_results_dir(cfg["results_dir"])
        import wandb  # noqa: F401
    except Exception as exc:
        _warn(f"unavailable ({_first_line(exc)}); not logging this run, the local record is kept")
        return None
    try:
        return _init(lcfg, mode, cfg["results_dir"], **kwargs)
    except Exception as exc:
        if mode != "online":
            _warn(f"could not start a run ({_first_line(exc)}); not logging this run, the local record is kept")
            return None
        first = _first_line(exc)
    try:
        run = _init(lcfg, "offline", cfg["results_dir"], **kwargs)
    except Exception as exc:
        _warn(f"could not start an online run ({first}) nor an offline one ({_first_line(exc)}); "
              "not logging this run, the local record is kept")
        return None
    _warn(f"could not start an online run ({first}); logging offline instead")
    return run


# -- one run per cell -------------------------------------------------------------------------

def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"step_time_s": {"p50": x}}`` -> ``{"step_time_s/p50": x}`` (W&B groups keys by ``/``
    into sections); lists and scalars kept."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + "/")
        else:
            out[key] = [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, (list, tuple)) else v
    return out


#: history series, in W&B sections: performance every log_every steps, the train loss, the test set
HISTORY_KEYS = {"step_time_s": "perf/step_time_s", "samples_per_s": "perf/samples_per_s",
                "samples_per_s_per_device": "perf/samples_per_s_per_device", "train_loss": "train/loss"}
#: record figures kept out of the run summary (they are series, logged as history)
HISTORY_ONLY = ("train_loss",)


def history_row(step: int, values: dict[str, float]) -> dict:
    """A W&B history row of the protocol's periodic figures (``Observer.logged``)."""
    return {"step": step, **{HISTORY_KEYS.get(k, k): v for k, v in values.items()}}


def evaluation_row(step: int, epoch: int, loss: float, accuracy: float) -> dict:
    """A W&B history row of an epoch's test result (``Observer.evaluated``)."""
    return {"step": step, "epoch": epoch, "test/accuracy": float(accuracy), "test/loss": float(loss)}


class History(Observer):
    """The history rows a cell's W&B run gets, kept in rank 0's memory when the launcher holds the
    run (``scaling.launch.local``): the launcher logs them once the workers are done."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._steps = 0

    def advance(self, steps: int) -> None:
        self._steps += steps

    def logged(self, step: int, values: dict[str, float]) -> None:
        self._steps = step
        self.rows.append(history_row(step, values))

    def evaluated(self, epoch: int, loss: float, accuracy: float) -> None:
        self.rows.append(evaluation_row(self._steps, epoch, loss, accuracy))


class WandbTracker(Observer):
    """Rank 0's W&B run for one cell; a protocol observer, finished with the run's record."""

    def __init__(self, run: Any, *, step_axis: bool = True) -> None:
        self.run = run
        self._steps = 0
        self._off = False
        if step_axis:
            self._call(self._define_metrics)

    @property
    def active(self) -> bool:
        return not self._off

    @property
    def run_dir(self) -> Path | None:
        """The run's folder (``.../wandb/offline-run-<time>-<id>``), what ``wandb sync`` takes."""
        try:
            return Path(self.run.dir).parent
        except Exception:
            return None

    def _call(self, fn, *args: Any, **kwargs: Any) -> Any:
        if self._off:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # whatever W&B raises, training goes on
            self._off = True
            _warn(f"logging failed ({_first_line(exc)}); W&B is off for the rest of this run, "
                  "the local record is kept")
            return None

    def _define_metrics(self) -> None:
        # every series against optimizer steps, so rows from logged() and evaluated() share an axis
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def advance(self, steps: int) -> None:
        self._steps += steps

    def logged(self, step: int, values: dict[str, float]) -> None:
        self._steps = step
        self._call(self.run.log, history_row(step, values))

    def evaluated(self, epoch: int, loss: float, accuracy: float) -> None:
        self._call(self.run.log, evaluation_row(self._steps, epoch, loss, accuracy))

    def log_rows(self, rows: list[dict]) -> None:
        """Log history rows kept by a :class:`History` (a run the launcher tracks)."""
        for row in rows:
            self._call(self.run.log, row)

    def finish(self, record: dict) -> None:
        """Put every figure of ``record`` and its status into the summary, then finish the run
        (bounded by ``logger.finish_timeout``). ``record`` is public: ``scaling.sinks.deliver``,
        which hands it over, has scrubbed it."""
        if self._off:
            return
        # every figure of the record but the loss curve, which is the history's ("train/loss")
        summary = flatten({k: v for k, v in (record.get("metrics") or {}).items() if k not in HISTORY_ONLY})
        summary["status"] = record["status"]
        if record.get("error"):
            summary["error"] = record["error"].splitlines()[0]
        self._call(self.run.summary.update, summary)
        self._call(self.run.config.update, {"environment": record.get("environment") or {}}, allow_val_change=True)
        self._call(self.run.finish, exit_code=0 if record["status"] == "ok" else 1)
        self._off = True

    def close(self) -> None:
        """Finish without a record (the run ends some other way); finish(record) is the normal end."""
        if not self._off:
            self._call(self.run.finish, exit_code=1)
            self._off = True


def make_tracker(cfg: dict, run_id: str, group: str, *, stats_pid: int | None = None,
                 say: Callable[[str], None] | None = None) -> WandbTracker | None:
    """The cell's W&B run, or None when ``logger`` is not wandb or W&B fails. Rank 0 calls this, or
    the local launcher while the workers start (``stats_pid``: rank 0's process, whose resources
    the system metrics follow; ``say``: where the note on the run's whereabouts goes)."""
    config = scrub_secrets({**cfg, "environment": records.capture_environment()})
    run = start_run(cfg, group=group, job_type=cfg["backend"]["name"], name=run_id, config=config, tags=run_tags(cfg),
                    stats_pid=stats_pid)
    if run is None:
        return None
    tracker = WandbTracker(run)
    _say_where(run, tracker.run_dir, say)
    return tracker


def wanted(cfg: dict) -> bool:
    """Whether ``cfg`` asks for a W&B run (its logger is wandb, not disabled)."""
    lcfg = cfg.get("logger") or {}
    return lcfg.get("name", "none") == "wandb" and str(lcfg.get("mode") or "auto") != "disabled"


def run_tags(cfg: dict) -> list[str]:
    """What a cell is, as W&B tags to filter by: backend, framework, device kind, variant, workload."""
    kind = "gpu" if on_gpu(cfg) else "cpu"
    backend = cfg.get("backend") or {}
    return [str(t) for t in (backend.get("name"), runs_on(backend).get("framework"), kind, cfg.get("variant") or "defaults",
                             (cfg.get("workload") or {}).get("name")) if t]


#: how the note on where a run went starts (a sweep keeps these in each cell's log and says it once)
WHERE_NOTE = "scaling: W&B "
WHERE_NOTES = (f"{WHERE_NOTE}offline run ", f"{WHERE_NOTE}run ")


def _say_where(run: Any, run_dir: Path | None, say: Callable[[str], None] | None = None) -> None:
    try:
        where = f"offline run {run_dir} (upload: wandb sync {run_dir})" if run.offline else f"run {run.url}"
    except Exception:
        where = f"run {run_dir}"
    if say is not None:
        say(f"{WHERE_NOTE}{where}")
    else:
        print(f"{WHERE_NOTE}{where}", file=sys.stderr, flush=True)


# -- one run per comm cell --------------------------------------------------------------------

COMM_COLUMNS = comm.SIZE_COLUMNS


def comm_rows(metrics: dict) -> list[dict]:
    """One row per message size of a comm record's metrics."""
    return [comm.size_row(s) for s in metrics.get("sizes") or []]


def log_comm_run(cfg: dict, record: dict) -> None:
    """A comm cell's W&B run (``job_type="comm"``): history against ``bytes``, a table of every
    size, and each workload's gradient-size figures in the summary (``mlp.latency_p50_s``...).
    Never raises."""
    try:
        config = scrub_secrets({**cfg, "environment": record.get("environment") or {}})
        run = start_run(cfg, group=record["group"], job_type="comm", name=record["run_id"], config=config)
    except Exception as exc:
        _warn(f"comm run not logged ({_first_line(exc)})")
        return
    if run is None:
        return
    tracker = WandbTracker(run, step_axis=False)
    rows = comm_rows(record.get("metrics") or {})

    def log() -> None:
        import wandb

        run.define_metric("bytes")
        run.define_metric("*", step_metric="bytes")
        for row in rows:
            run.log({k: v for k, v in row.items() if k != "label"})
        run.log({"sizes": wandb.Table(columns=COMM_COLUMNS, data=[[r[c] for c in COMM_COLUMNS] for r in rows])})
        summary: dict[str, Any] = {"status": record["status"], "library": (record.get("metrics") or {}).get("library")}
        for row in rows:
            for label in (row["label"] or "").split(", "):
                if label:
                    summary |= {f"{label}.{k}": v for k, v in row.items() if k != "label"}
        run.summary.update(scrub_secrets(summary))

    tracker._call(log)
    if tracker.active:
        _say_where(run, tracker.run_dir)
    tracker._call(run.finish, exit_code=0 if record["status"] == "ok" else 1)
