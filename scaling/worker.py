"""What one worker process does: check the config, load the data, build the backend, train under
the protocol, and (rank 0) write the record and print the summary."""
from __future__ import annotations

import os
import signal
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from scaling import config as config_mod
from scaling import records, tracking
from scaling.placement import Placement
from scaling.protocol import Measurement, Progress, ProtocolConfig, process_start_time


def rank_info() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from the launcher's variables.

    torchrun and our own launchers set RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE, horovodrun its
    HOROVOD_* variables, srun SLURM_*; a lone process is (0, 1, 0, 1).
    """
    env = os.environ
    for r, w, lr, lw in (("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
                         ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
                         ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")):
        if r in env and w in env:
            local_world = env.get(lw, "1").split("(")[0]  # SLURM_NTASKS_PER_NODE may read "2(x2)"
            return int(env[r]), int(env[w]), int(env.get(lr, 0)), int(local_world or 1)
    return 0, 1, 0, 1


def default_run_id(cfg: dict, devices: int) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (f"{cfg['backend']['name']}_{cfg['workload']['name']}_{cfg['data']['name']}"
            f"_n{devices}_{stamp}_{socket.gethostname()}-{os.getpid()}")


def run_conditions(cfg: dict, env: dict, pinned: list[int] | None, backend: Any) -> dict:
    """What this rank's speed depended on besides its cell: the threads in force, the CPU placement,
    the CPUs it could run on, and the evaluation work per rank (the aggregate compares them)."""
    return {"threads": env.get("threads", cfg.get("threads")), "placement": cfg.get("placement", "default"),
            "pinned": pinned is not None,
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "evaluation": getattr(backend, "evaluation", "unrecorded")}


def run(cfg: dict[str, Any]) -> dict:
    """Run one worker of one run; returns the record (rank 0 has also written it).

    Raises ConfigError before anything is loaded when the config cannot run (no record then).
    """
    config_mod.validate(cfg)
    from scaling.workloads import parameters

    cfg = {**cfg, "workload": {**cfg["workload"], "parameters": parameters(cfg["workload"])}}  # for its width
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
    env: dict[str, Any] = {}
    metrics = None
    error = None
    backend = None
    progress = None
    tracker = None
    rank_summary: dict[str, Any] = {}
    run_id = cfg.get("run_name") or None
    interruption: dict[str, Any] = {}
    if "SLURM_JOB_ID" in os.environ:
        _handle_slurm_signals(cfg, rank, run_id, interruption)
        slurm_rendezvous()
        if cfg["backend"].get("launcher") == "horovodrun" and "HOROVOD_RANK" not in os.environ:
            _horovod_under_srun(cfg, run_id)
    try:
        from scaling import data
        from scaling.backends import RunContext, load_backend
        from scaling.geometry import plan

        dcfg = cfg["data"]
        log = _log if rank == 0 else _quiet
        if dcfg["name"] in data.REAL_DATASETS:
            data.fetch(dcfg["name"], dcfg.get("cache_dir"), offline=dcfg.get("offline") or None, log=log)
        dataset = data.load(dcfg["name"], cache_dir=dcfg.get("cache_dir"), seed=cfg["seed"], log=log)
        ctx = RunContext(config=cfg, dataset=dataset, geometry=plan(cfg), rank=rank, world_size=world,
                         local_rank=local_rank, local_world_size=local_world)
        backend = load_backend(cfg["backend"]["_target_"])(ctx)
        placer.settle()  # the framework's threads exist now
        announce(phase="training")
        # a backend that starts its own processes (Lightning) knows the rank only now
        rank = getattr(backend, "rank", rank)
        run_id = run_id or default_run_id(cfg, ctx.geometry.devices)
        if rank == 0 and cfg.get("progress", True):
            steps = backend.steps_per_epoch
            limit = cfg["train"].get("max_steps_per_epoch")
            steps = min(steps, limit) if limit else steps
            progress = Progress(steps * int(cfg["train"]["epochs"]), run_id, every=pcfg.log_every)
        tracker_start_s = None
        if rank == 0:
            t0 = time.time()
            tracker = tracking.make_tracker(cfg, run_id, group)  # None unless logger=wandb
            tracker_start_s = time.time() - t0 if tracker else None
        meter = Measurement(pcfg, global_batch=ctx.geometry.global_batch, devices=ctx.geometry.devices,
                            sync=backend.sync, device_memory_peak=backend.device_memory_peak,
                            observers=[o for o in (progress, tracker, placer) if o],
                            events=getattr(backend, "step_events", lambda: None)())
        backend.train(meter)
        metrics = meter.result(process_start)
        metrics["steps_per_epoch"] = backend.steps_per_epoch
        metrics["per_device_batch"] = ctx.geometry.per_device_batch
        metrics["lr"] = ctx.geometry.lr
        if tracker_start_s is not None and metrics["startup_s"] is not None:
            # W&B's start (bounded by logger.init_timeout) is the tracker's, not the framework's
            metrics["startup_s"] -= tracker_start_s
            metrics["tracker_start_s"] = tracker_start_s
        digest = getattr(backend, "param_digests", None)
        rank_summary["param_digests"] = digest() if digest else None
        error = _not_measured(meter, metrics, rank)
        if error:
            metrics = None  # the figures of a diverged or unmeasured run are not results
    except Interrupted as exc:
        error = f"rank {rank}: {exc}"
    except KeyboardInterrupt:
        error = "interrupted (KeyboardInterrupt)"
        raise
    except Exception as exc:  # the run failed: record why, do not lose the record
        error = f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
    finally:
        if progress:
            progress.close()
        if backend is not None:
            try:
                env = backend.environment()
            except Exception as exc:  # a broken probe must not cost the record, but is said
                _log(f"[worker] rank {rank}: environment probe failed ({type(exc).__name__}: {exc}); "
                     "the record has no framework versions")
                env = {}
        if metrics is not None:
            metrics["conditions"] = run_conditions(cfg, env, pinned, backend)
            if hasattr(backend, "fast_mode"):  # what the fast modes actually ran (graphs, XLA, steps per call)
                metrics["fast_mode"] = backend.fast_mode()
        env["settings"] = settings_of(cfg, backend)
        env["placement"] = placer.describe()
        record = records.make_record(
            run_id=run_id or default_run_id(cfg, world),
            group=group,
            config=cfg,
            environment=records.capture_environment(env.pop("frameworks", None), env.pop("gpu", None)) | env,
            metrics=metrics,
            error=error,
        )
        record["environment"].update(rank=rank, world_size=world, pinned_cpus=pinned)
        if interruption:
            record["interruption"] = dict(interruption)
        record = tracking.scrub_secrets(record)  # no API key in a record (argv, config overrides)
        _report_to_launcher(rank, record, rank_summary)
        if rank == 0:
            path = records.write_record(record, cfg["results_dir"])
            record["path"] = str(path)
        if tracker:
            tracker.finish(record)  # after the record is safe; never raises, bounded by finish_timeout
    return record


def settings_of(cfg: dict, backend: Any) -> dict:
    """The variant, the settings passed and what the library reports in force (scaling.settings)."""
    from scaling import settings

    try:
        read_back = backend.settings_in_force() if hasattr(backend, "settings_in_force") else None
    except Exception:  # a broken probe must not cost the record
        read_back = None
    return settings.described(cfg, read_back)


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


def slurm_rendezvous() -> None:
    """torch.distributed's env:// address under srun: rank 0's node (its NodeAddr) and a per-job port."""
    if "MASTER_ADDR" in os.environ or "SLURM_JOB_NODELIST" not in os.environ:
        return
    import subprocess

    try:
        first = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, timeout=30).stdout.split()[0]
        node = subprocess.run(["scontrol", "show", "node", first, "-o"], capture_output=True, text=True, timeout=30).stdout
        addr = next((f.split("=", 1)[1] for f in node.split() if f.startswith("NodeAddr=")), first)
    except (OSError, IndexError, subprocess.SubprocessError):
        return
    os.environ["MASTER_ADDR"] = addr
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000))


def _horovod_under_srun(cfg: dict, run_id: str | None) -> None:
    """srun started this Horovod rank: join the job's gloo rendezvous (the batch script's server,
    or under submitit one that rank 0 runs in a thread), as horovodrun would have arranged."""
    from scaling.launch import horovod_slurm

    port_file = os.environ.get("SCALING_HOROVOD_PORT_FILE")
    if not port_file:
        port_file = str(Path(cfg["results_dir"]) / (cfg.get("group") or "runs") /
                        f".{run_id or 'run'}.{os.environ['SLURM_JOB_ID']}.rendezvous")
        if os.environ.get("SLURM_PROCID", "0") == "0":
            tasks = int(os.environ["SLURM_NTASKS"]) // int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))
            horovod_slurm.serve_in_process(Path(port_file), tasks)
    addr = os.environ["MASTER_ADDR"]
    iface = os.environ.get("HOROVOD_GLOO_IFACE") or horovod_slurm.route_iface(addr)
    os.environ.update(horovod_slurm.horovod_env(Path(port_file), addr, iface))


class Interrupted(BaseException):
    """Slurm asked this task to stop (USR2 before the time limit, TERM on scancel or pre-emption)."""


def _handle_slurm_signals(cfg: dict, rank: int, run_id: str | None, interruption: dict) -> None:
    """On USR2/TERM: note why, write a failed record at once (rank 0; a rank blocked in a collective
    may never get back to Python before SIGKILL), requeue the job if asked, then unwind."""

    def handler(signum: int, frame: Any) -> None:
        if interruption:  # the first signal told the story (a requeue sends TERM after USR2)
            raise Interrupted(interruption["message"])
        name = signal.Signals(signum).name
        requeue = bool(cfg.get("cluster", {}).get("requeue")) and signum == signal.SIGUSR2
        action = "left for --resume"
        if requeue and rank == 0:
            import subprocess

            ok = subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], capture_output=True).returncode == 0
            action = "requeued" if ok else "requeue failed; left for --resume"
        interruption.update(signal=name, action=action, job_id=os.environ.get("SLURM_JOB_ID"))
        reason = ("pre-empted: Slurm's time-limit warning (USR2)" if signum == signal.SIGUSR2
                  else "cancelled or pre-empted by Slurm (TERM)")
        interruption["message"] = f"{reason}; {action}"
        if rank == 0 and run_id:
            record = records.make_record(run_id=run_id, group=cfg.get("group") or "runs", config=cfg,
                                         environment=records.capture_environment(), metrics=None,
                                         error=f"rank {rank}: {reason}; {action}")
            record["interruption"] = dict(interruption)
            records.write_record(record, cfg["results_dir"])
        raise Interrupted(f"{reason}; {action}")

    signal.signal(signal.SIGUSR2, handler)
    signal.signal(signal.SIGTERM, handler)


def _report_to_launcher(rank: int, record: dict, summary: dict) -> None:
    """Tell the launcher (when there is one) this rank finished, and how: ``rank<r>.exit.json``."""
    run_dir = os.environ.get("SCALING_RUN_DIR")
    if not run_dir:
        return
    m = record["metrics"] or {}
    body = {"rank": rank, "status": record["status"], "error": record["error"], "host": socket.gethostname(),
            "pid": os.getpid(), "samples_per_s": m.get("samples_per_s"), **summary}
    records.write_json_atomic(Path(run_dir) / f"rank{rank}.exit.json", body)


def announce(phase: str = "starting") -> None:
    """Write ``rank<r>.pid.json`` so the launcher can watch this worker (and name it if it dies)."""
    run_dir = os.environ.get("SCALING_RUN_DIR")
    if not run_dir:
        return
    rank = rank_info()[0]
    records.write_json_atomic(Path(run_dir) / f"rank{rank}.pid.json",
                              {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "phase": phase})


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent (launcher, torchrun, horovodrun) dies, so a
    killed sweep driver leaves no orphan training behind."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the launcher's own cleanup still applies
        pass


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
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
