"""Start the workers of one run on this machine the framework's own way, watch them, and turn
their exits into one status and one record.

What starts them is the backend's launcher's ``local`` command (``launch/launchers.py``): one
process per rank with the variables ``torchrun --standalone`` gives it (torch DDP, Lightning), one
process per worker with its ``TF_CONFIG`` (TF MultiWorkerMirrored), Horovod's gloo ranks as
``horovodrun --gloo -np N -H localhost:N`` starts them (``horovod_gloo``), or one worker process
(single-device backends, TF Mirrored over N devices). ``SCALING_FRAMEWORK_LAUNCHERS=1`` runs the
torchrun and horovodrun programs themselves instead (slower to start, the same ranks).

Every worker runs ``python -m scaling.worker --config <run dir>/config.json``: on CPUs forked
from a server that holds its framework imported (``scaling.launch.warm``), else as a fresh
interpreter. It announces itself in ``rank<r>.pid.json`` and reports in ``rank<r>.exit.json``.
A rank whose process is gone without a report is dead: the launcher then stops every other
worker (SIGTERM, then SIGKILL), so a killed worker ends the run in seconds rather than at a
collective's timeout, and writes a ``failed`` record naming the dead rank.

The launcher also holds the cell's W&B run (``logger=wandb``): it starts it while the workers
import and build, rank 0 waits for that start before its first step and keeps the run's history
rows, which the launcher logs with the final record once every worker is done, finishing the run
in the background while the next cell's workers start (the next run starts only after it). W&B's
start and finish thus stay off rank 0's path, and the cell's wall time is split into its phases
(``scaling.cell_time``, the record's ``metrics.cell_time_s``).
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaling.launch import launchers, warm
from scaling import cell_time, records, sinks, tracking
from scaling.config import runs_on
from scaling.process import die_with_parent
from scaling.naming import default_run_id
from scaling.tracking import WHERE_NOTES

#: after the first dead rank, how long the framework's own launcher gets to stop the rest
GRACE_S = 3.0
#: after SIGTERM, how long before SIGKILL
TERM_TIMEOUT_S = 10.0
#: how often the launcher looks at its workers (each look costs a few stat calls); a worker whose
#: output ends (it exited) wakes it at once
POLL_S = 0.2


def worker_commands(cfg: dict, config_path: Path) -> launchers.Commands:
    """(argv, extra environment) of each process to start for this run: its launcher's local command."""
    return launchers.of(cfg).local(int(cfg["devices"]), ["-m", "scaling.worker", "--config", str(config_path)])


@dataclass
class _Proc:
    popen: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=60))
    reader: threading.Thread | None = None
    #: set when the process's output ends (it exited): wakes the supervisor
    ended: threading.Event | None = None


#: what a quiet run still shows on the console: the study's own warnings (W&B falling back, ...),
#: but not each cell's note on where its W&B run went (the sweep says that once)
STUDY_LINES = ("scaling:", "scaling ")


def _pump(proc: _Proc, log, echo_all: bool = True) -> None:
    """Copy a process's output into the run log, keeping the last lines for errors; on the console
    everything (a single run, with its progress bar) or only the study's own lines (a sweep's cell:
    framework banners and library INFO stay in the cell's log)."""
    for line in iter(proc.popen.stdout.readline, ""):
        proc.tail.append(line.rstrip("\n"))
        log.write(line)
        log.flush()
        if echo_all or (line.startswith(STUDY_LINES) and not line.startswith(WHERE_NOTES)):
            sys.stderr.write(line)
            sys.stderr.flush()
    if proc.ended is not None:
        proc.ended.set()


def _start(framework: str | None, argv: list[str], env: dict[str, str]) -> Any:
    """One process of the run: a worker forked warm from its framework's server
    (``scaling.launch.warm``), else a fresh one; a framework launcher (Horovod's) is told the
    server, so that it can start its ranks warm."""
    process = warm.start(framework, argv, env)
    if process is not None:
        return process
    env = warm.launcher_env(framework, argv, env)
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=die_with_parent)


def _alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # NoSuchProcess, AccessDenied: gone for our purposes
        return False


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stop(procs: list[_Proc], run_dir: Path) -> None:
    """SIGTERM every process group we started and every announced rank, SIGKILL what remains."""
    pids = {p["pid"] for p in map(_read_json, run_dir.glob("rank*.pid.json")) if p}
    for proc in procs:
        if proc.popen.poll() is None:
            try:
                os.killpg(proc.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + TERM_TIMEOUT_S
    while time.monotonic() < deadline and (any(p.popen.poll() is None for p in procs) or any(_alive(x) for x in pids)):
        time.sleep(0.1)
    for proc in procs:
        if proc.popen.poll() is None:
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in procs:
        proc.popen.wait()


def _dead_ranks(run_dir: Path) -> list[dict]:
    """Announced ranks whose process is gone without an exit report."""
    dead = []
    for path in sorted(run_dir.glob("rank*.pid.json")):
        info = _read_json(path)
        if info and not (run_dir / f"rank{info['rank']}.exit.json").exists() and not _alive(info["pid"]):
            dead.append(info)
    return dead


def launch(cfg: dict[str, Any]) -> dict:
    """Run one multi-process (or isolated single-process) run; returns its final record."""
    from scaling.config import check_results_dir
    from scaling.geometry import plan

    launched = time.time()
    run_id = cfg.get("run_name") or default_run_id(cfg, plan(cfg).devices)
    cfg = {**cfg, "run_name": run_id}
    group = cfg.get("group") or "runs"
    results = Path(cfg["results_dir"])
    check_results_dir(results, group)  # ConfigError before any worker starts
    run_dir = records.inside(results, group, f".{run_id}.run")
    _clean_leftovers(results / group)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    records.write_json_atomic(run_dir / "launcher.json", {"pid": os.getpid(), "host": socket.gethostname()})
    config_path = run_dir / "config.json"
    records.write_json_atomic(config_path, cfg)
    # a stale record of the same id would be mistaken for this run's
    records.record_path(results, group, run_id).unlink(missing_ok=True)

    env = dict(os.environ, SCALING_RUN_DIR=str(run_dir), SCALING_LAUNCH_TIME=repr(time.time()),
               PYTHONUNBUFFERED="1")
    if tracking.wanted(cfg) and not cfg.get("comm"):  # this launcher holds the training cell's W&B run
        # (a comm cell logs its own once measured); rank 0 waits for its start
        env["SCALING_TRACKER_GATE"] = str(run_dir / "tracker.ready")
    log_path = records.inside(results, group, f"{run_id}.log")
    procs: list[_Proc] = []
    failure: str | None = None
    tracker = None
    rank0: dict[str, Any] = {}  # rank 0's marks and history rows, from its report
    with open(log_path, "w") as log:
        try:
            framework = runs_on(cfg["backend"]).get("framework") if warm.suits(cfg) else None
            for argv, extra in worker_commands(cfg, config_path):
                procs.append(_Proc(_start(framework, argv, env | extra)))
            ended = threading.Event()
            for proc in procs:  # threads only after every fork
                proc.ended = ended
                proc.reader = threading.Thread(target=_pump, args=(proc, log, bool(cfg.get("progress", True))),
                                               daemon=True)
                proc.reader.start()
            if "SCALING_TRACKER_GATE" in env:
                tracker = _start_tracker(cfg, run_id, group, procs, run_dir, log, bool(cfg.get("progress", True)))
            failure = _supervise(procs, run_dir)
        except BaseException:
            # workers that had all finished on their own before the interrupt made a whole run
            finished = bool(procs) and all(p.popen.poll() == 0 for p in procs)
            try:  # a second interrupt while stopping must still leave no hidden folder behind
                _stop(procs, run_dir)
                if not finished:
                    failure = failure or "launcher interrupted"
                record = _finish(cfg, run_id, group, results, run_dir, procs, failure, rank0)
                if tracker:
                    tracker.finish(record)
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)
                _drop_if_empty(log_path)
            raise
        if failure:
            _stop(procs, run_dir)
        exited = time.time()
        for proc in procs:
            if proc.reader:
                proc.reader.join(timeout=5)
    record = _finish(cfg, run_id, group, results, run_dir, procs, failure, rank0)
    _note_cell_time(record, rank0, launched, exited, results)
    if tracker:
        _finish_tracker(tracker, rank0.get("history") or [], json.loads(json.dumps(record)))
    _drop_if_empty(log_path)
    return record


#: W&B runs finishing in the background (at most one: the last cell's)
_FINISHING: list[threading.Thread] = []


def _finish_tracker(tracker: Any, history: list[dict], record: dict) -> None:
    """Log the history rows and the final record into the cell's W&B run and finish it, in a thread:
    the next cell's workers start meanwhile, and its W&B run starts only once this one is done
    (``settle_trackers``), before that cell's rank 0 may take its first step, so a finishing run
    never overlaps a timed step. The process waits for it before it exits."""
    def finish() -> None:
        tracker.log_rows(history)
        tracker.finish(record)  # bounded by logger.finish_timeout; never raises

    thread = threading.Thread(target=finish, name="scaling-wandb-finish")
    thread.start()
    _FINISHING.append(thread)


def settle_trackers() -> None:
    """Wait until every W&B run this process holds has finished."""
    while _FINISHING:
        _FINISHING.pop(0).join()


def _note_cell_time(record: dict, rank0: dict, launched: float, exited: float, results: Path) -> None:
    """Where the cell's wall time went (``scaling.cell_time``), into its record, written again."""
    if record["metrics"] is None:
        return
    record["metrics"]["cell_time_s"] = cell_time.phases(rank0.get("marks") or {}, launched, exited,
                                                        record["metrics"], closed=time.time())
    path = record.pop("path", None)
    records.write_record(record, results)
    if path:
        record["path"] = path


def _start_tracker(cfg: dict, run_id: str, group: str, procs: list[_Proc], run_dir: Path, log,
                   echo: bool) -> Any:
    """The cell's W&B run, started here while the workers import and build, in this process rather
    than on rank 0's critical path; its system metrics follow rank 0's process. Whatever happens,
    the gate opens (``tracker.ready``) so rank 0 can take its first step."""
    def say(line: str) -> None:
        log.write(line + "\n")
        log.flush()
        if echo:
            print(line, file=sys.stderr, flush=True)

    tracker = None
    try:
        settle_trackers()  # the previous cell's run first: one W&B run at a time, none during timed steps
        pid = None
        deadline = time.monotonic() + 30
        while pid is None and time.monotonic() < deadline and any(p.popen.poll() is None for p in procs):
            pid = (_read_json(run_dir / "rank0.pid.json") or {}).get("pid")
            if pid is None:
                time.sleep(0.01)
        tracker = tracking.make_tracker(cfg, run_id, group, stats_pid=pid, say=say)
    except Exception as exc:  # W&B never costs a run
        say(f"scaling: W&B could not start a run ({type(exc).__name__}: {exc}); the local record is kept")
    finally:
        records.write_json_atomic(run_dir / "tracker.ready", {"tracking": tracker is not None})
    return tracker


def _drop_if_empty(path: Path) -> None:
    try:
        if path.stat().st_size == 0:
            path.unlink()
    except OSError:
        pass


def _clean_leftovers(folder: Path) -> None:
    """Remove the hidden run folders (and empty logs) of launchers on this host that are gone
    (killed with SIGKILL, a lost node): nothing of a dead run stays behind."""
    for run_dir in folder.glob(".*.run"):
        owner = _read_json(run_dir / "launcher.json")
        if owner is None and time.time() - run_dir.stat().st_mtime < 3600:
            continue  # being created right now, or by an older launcher: leave it an hour
        if owner is not None and (owner.get("host") != socket.gethostname() or _alive(owner["pid"])):
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        _drop_if_empty(folder / f"{run_dir.name[1:-len('.run')]}.log")


def _wait(procs: list[_Proc], seconds: float) -> None:
    """Sleep up to ``seconds``, less when a worker's output ends (it exited)."""
    ended = next((p.ended for p in procs if p.ended is not None), None)
    if ended is None:
        time.sleep(seconds)
    elif ended.wait(seconds):
        ended.clear()
        deadline = time.monotonic() + seconds  # a process outlives its closed output by a moment
        while time.monotonic() < deadline and any(
                p.popen.poll() is None for p in procs if p.reader is not None and not p.reader.is_alive()):
            time.sleep(0.005)


def _supervise(procs: list[_Proc], run_dir: Path) -> str | None:
    """Wait for the workers; the first sign of a dead or failed worker, as a message (None if none)."""
    first_dead_at = None
    dead: list[dict] = []
    while True:
        codes = [p.popen.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        now_dead = _dead_ranks(run_dir)
        if now_dead and first_dead_at is None:
            dead, first_dead_at = now_dead, time.monotonic()
        if first_dead_at is not None and time.monotonic() - first_dead_at > GRACE_S:
            break
        if any(c not in (None, 0) for c in codes) and first_dead_at is None:
            first_dead_at = time.monotonic()  # a launcher failed: give the others a moment, then stop them
        _wait(procs, POLL_S)
    dead = dead or _dead_ranks(run_dir)
    if dead:
        return "; ".join(f"rank {d['rank']} (pid {d['pid']} on {d['host']}) died without finishing (killed or crashed)"
                         for d in dead)
    bad = [(i, p.popen.returncode) for i, p in enumerate(procs) if p.popen.returncode not in (0, None)]
    if bad:
        return "; ".join(f"launcher process {i} exited with code {code}" for i, code in bad)
    return None


def _finish(cfg: dict, run_id: str, group: str, results: Path, run_dir: Path, procs: list[_Proc],
            failure: str | None, rank0: dict) -> dict:
    """One record for the run: rank 0's, with every rank's report added; a failed one otherwise.
    Rank 0's marks (``scaling.cell_time``) and history rows go from its report into ``rank0``."""
    exits = sorted((e for e in map(_read_json, run_dir.glob("rank*.exit.json")) if e), key=lambda e: e["rank"])
    failed_ranks = [e for e in exits if e["status"] != "ok"]
    path = records.record_path(results, group, run_id)
    record = _read_json(path)
    if failed_ranks:
        worst = "; ".join((e["error"] or "").splitlines()[0] for e in failed_ranks)
        failure = f"{failure}; {worst}" if failure else worst
    if record is None or failure:
        tail = "\n".join(line for p in procs for line in list(p.tail)[-15:])
        error = failure or "rank 0 wrote no record"
        record = records.make_record(
            run_id=run_id, group=group, config=cfg,
            environment=(record or {}).get("environment") or records.capture_environment(),
            metrics=None, error=f"{error}\n--- last output ---\n{tail}")
    for e in exits:
        if e.get("rank") == 0:
            rank0.update(marks=e.pop("marks", None), history=e.pop("history", None))
        e.pop("history", None)
    sinks.add_rank_reports(record, exits, cfg["backend"]["name"])  # waiting for the slowest rank, in sync
    records.write_record(record, results)
    sinks.save_config(record, results)  # again: rank 0 may have died before it saved the config
    record["path"] = str(path)
    shutil.rmtree(run_dir, ignore_errors=True)
    return record
