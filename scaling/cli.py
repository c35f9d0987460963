"""The ``scaling`` command: ``scaling run|data ...``.

``scaling run`` is a Hydra application: everything after the verb is a Hydra override
(``scaling run backend=tf workload=cnn train.epochs=1``), and Hydra's own flags work too
(``--cfg job`` prints the composed config, ``--help`` lists the groups).
"""
from __future__ import annotations

import sys
from pathlib import Path

USAGE = """usage: scaling VERB [ARGS]

verbs:
  run [OVERRIDES...]         train one run under the shared protocol and write its record
                             e.g. scaling run backend=tf workload=mlp train.epochs=5
  sweep experiment=NAME [OVERRIDES...] [--resume]
                             run a study's cells (Hydra multirun), skipping finished ones
                             e.g. scaling sweep experiment=local_cpu
  comm [OVERRIDES...]        the all-reduce micro-benchmark through each backend's collective path,
                             N = 2..devices; records, dashboard section, W&B
                             e.g. scaling comm devices=2 backend=torch_ddp,horovod_torch
  results list|show|export RESULTS_DIR
                             sweeps and cells; speedup, efficiency, Karp-Flatt; CSV/Parquet export
  report RESULTS_DIR [--out DIR]
                             the self-contained HTML dashboard (and PNG figures)
  predict RESULTS_DIR [--validate]
                             fit the scaling model; predict up to 1024 devices where the fit is identifiable
  slurm render [OVERRIDES...] --out DIR
                             write one sbatch script per cell (cluster=slurm settings)
  data fetch|verify|path NAME
                             obtain, check or locate a dataset (mnist, fashion_mnist)

`scaling run --help` lists the config groups and their options.
"""


def _hydra_run() -> int:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from scaling.config import CONF_DIR, ConfigError

    status: dict = {"code": 0, "cells": 0, "invalid": 0, "failed": []}
    from scaling.slurm import register_resolvers

    register_resolvers()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def task(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from scaling import worker

        hc = HydraConfig.get()
        # the command line's overrides travel with the config; rank 0 saves both beside the record
        plain = {**OmegaConf.to_container(cfg, resolve=True), "overrides": [str(o) for o in hc.overrides.task]}
        if hc.mode == RunMode.MULTIRUN:
            from scaling.sweep import run_cell

            record = run_cell(plain, list(hc.overrides.task), int(hc.job.num))
            status["cells"] += 1
            if record is None:
                status["invalid"] += 1
            elif record["status"] != "ok":
                status["failed"].append(record["run_id"])
            return
        if plain["cluster"].get("name") == "slurm" and "SLURM_JOB_ID" not in __import__("os").environ:
            print("scaling run: cluster=slurm submits through sweeps: `scaling sweep cluster=slurm ...` "
                  "(one cell is a sweep of one) or `scaling slurm render cluster=slurm ...`", file=sys.stderr)
            status["code"] = 2
            return
        try:
            from scaling.launch import launchers

            if launchers.of(plain).in_process:
                record = worker.run(plain)
            else:
                from scaling.config import validate
                from scaling.launch.local import launch

                validate(plain)
                record = launch(plain)
        except ConfigError as exc:
            print(f"scaling run: invalid config: {exc}", file=sys.stderr)
            status["code"] = 2
            return
        if record["environment"].get("rank", 0) == 0:
            if record.get("kind") == "comm":
                from scaling.comm.worker import print_summary

                print_summary(record)
            else:
                worker.print_summary(record)
        if record["status"] != "ok":
            print(f"scaling run: run failed: {record['error']}", file=sys.stderr)
            status["code"] = 1

    task()
    if status["cells"] and status["invalid"] == status["cells"]:
        print(f"scaling sweep: none of the {status['cells']} cell(s) is valid (each reason is above); nothing ran",
              file=sys.stderr)
        return 2
    if status["failed"]:
        _say_failed(status["failed"])
        return 1
    return status["code"]


def _terminate_as_interrupt(signum, frame) -> None:
    # SIGTERM (scancel, kill) unwinds like Ctrl-C: launchers stop their workers and record why
    raise KeyboardInterrupt(f"signal {signum}")


def _say_failed(cells: list[str]) -> None:
    print(f"scaling sweep: {len(cells)} cell(s) failed: {', '.join(cells)} "
          "(their records say why; rerunning the sweep reruns them)", file=sys.stderr)


def _slurm_base(overrides: list[str]):
    """The sweep's base config when it goes to Slurm, else None. Hydra's flags (--help, --cfg job,
    --info) and overrides that do not compose are left to Hydra's own multirun, which answers them
    as `scaling run` does."""
    from hydra import compose, initialize_config_dir

    from scaling.config import CONF_DIR
    from scaling.slurm import register_resolvers

    if any(o.startswith("-") for o in overrides):
        return None
    register_resolvers()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose("config", overrides=[o for o in overrides if "," not in o.split("=", 1)[-1]])
    except Exception:  # a typo: Hydra names it in one line below
        return None
    return cfg if cfg.cluster.name == "slurm" else None


def _slurm_sweep(overrides: list[str], wait: bool = False) -> int:
    """All of a study's geometry groups submitted at once, one submitit job array each.

    Each group is its own multirun (submitit sizes one allocation per multirun), driven by a
    background process that outlives this command; the command returns once every group's job
    array is in the queue, with the job ids. ``--wait`` waits for all of them, then prints the table
    and writes the dashboard. Rerunning submits only missing or failed cells, and never a group
    whose job array is still queued or running.
    """
    import os
    import subprocess

    from scaling.slurm import RenderError, queued_jobs, split_sweep, sweep_config

    try:
        groups = split_sweep(overrides)
    except RenderError as exc:
        print(f"scaling sweep: {exc}", file=sys.stderr)
        return 2
    if not groups:
        print("[sweep] no valid cell to submit", file=sys.stderr)
        return 2
    cfg = sweep_config(overrides)
    sweep_id, results_dir = cfg.get("sweep_id") or "adhoc", str(cfg["results_dir"])
    logs = Path(results_dir) / ".hydra" / sweep_id
    logs.mkdir(parents=True, exist_ok=True)
    drivers = []
    for i, group in enumerate(groups, 1):
        name = f"scaling-{sweep_id}-g{i}"
        tag = f"[sweep] allocation {i}/{len(groups)}"
        busy = queued_jobs(name)
        if busy:
            print(f"{tag}: still in the queue as job {', '.join(busy)}; not submitted again "
                  f"(rerun when it has ended, or scancel it)", file=sys.stderr, flush=True)
            continue
        fixed = [o for o in overrides if o.split("=", 1)[0] not in {g.split("=", 1)[0] for g in group}]
        cmd = [sys.executable, "-m", "scaling", "sweep", "--one-geometry", *fixed, *group, f"hydra.launcher.name={name}"]
        log = logs / f"driver-g{i}.log"
        print(f"{tag}: {' '.join(group)}", file=sys.stderr, flush=True)
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=not wait, env={**os.environ, "SCALING_SWEEP_PART": "1"})
        drivers.append((tag, name, log, proc))
    if wait:
        code = 0
        for tag, _, log, proc in drivers:
            code = code or proc.wait()
        from scaling.sweep import build_dashboard, summary_table

        from scaling.sweep import failed_cells

        summary_table(results_dir, sweep_id)
        build_dashboard(results_dir)
        if (cfg.get("logger") or {}).get("name") == "wandb":
            from scaling.tracking_sweep import log_sweep_summary, say_sweep_runs

            log_sweep_summary(cfg, sweep_id)  # never raises
            say_sweep_runs(results_dir)
        failed = failed_cells(results_dir, sweep_id)  # the cells ran in Slurm jobs: their records say how
        if failed:
            _say_failed(failed)
            return code or 1
        return code
    return _report_submissions(drivers, results_dir, sweep_id)


def _report_submissions(drivers: list, results_dir: str, sweep_id: str, timeout: float = 120) -> int:
    """Wait until each driver's job array is in the queue and say its id (or why it is not)."""
    import time

    from scaling.slurm import queued_jobs

    code = 0
    for tag, name, log, proc in drivers:
        deadline = time.monotonic() + timeout
        jobs: list[str] = []
        while time.monotonic() < deadline and not jobs:
            jobs = queued_jobs(name, states=None)
            if not jobs and proc.poll() is not None:
                break
            time.sleep(0.5)
        if jobs:
            print(f"{tag}: submitted as job {', '.join(jobs)} (driver log {log})", file=sys.stderr, flush=True)
        elif proc.poll() is not None and proc.returncode == 0:
            print(f"{tag}: nothing to submit (every cell has an ok record)", file=sys.stderr, flush=True)
        else:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
            print(f"{tag}: no job in the queue after {timeout:.0f} s; see {log}:\n  " + "\n  ".join(tail),
                  file=sys.stderr, flush=True)
            code = 1
    print(f"[sweep] records land in {Path(results_dir) / sweep_id} as the jobs finish: follow with "
          f"`squeue --me`, then `scaling report {results_dir}`; rerunning the sweep submits only missing or "
          "failed cells (add --wait to wait for the jobs)", file=sys.stderr, flush=True)
    return code


COMPLETION_FLAGS = ("-sc", "--shell-completion", "--shell_completion")
VERBS = ("run", "sweep", "results", "report", "predict", "slurm", "data")


def _shell_completion(args: list[str]) -> int:
    """Hydra's shell completion for ``scaling``: ``eval "$(scaling -sc install=bash)"`` installs it
    (``scaling run -sc install=bash`` too); the installed function then asks ``scaling -sc
    query=bash`` with the command line in ``COMP_LINE``, where the verb is completed here and the
    overrides after ``run``/``sweep`` by Hydra."""
    import os

    request = args[1] if len(args) > 1 else (args[0].split("=", 1)[1] if "=" in args[0] else "")
    if request.startswith("query="):
        words = os.environ.get("COMP_LINE", "").split()
        typing_verb = len(words) == 1 or (len(words) == 2 and not os.environ.get("COMP_LINE", "").endswith(" "))
        if typing_verb:
            prefix = words[1] if len(words) == 2 else ""
            print(" ".join(v for v in VERBS if v.startswith(prefix)))
            return 0
        if words[1] not in ("run", "sweep"):
            print("")
            return 0
        line = os.environ["COMP_LINE"]
        os.environ["COMP_LINE"] = line[:line.index(words[1])] + line[line.index(words[1]) + len(words[1]):].lstrip()
    sys.argv = ["scaling", "--shell-completion", request]
    return _hydra_run()


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb in COMPLETION_FLAGS or (verb in ("run", "sweep") and rest and rest[0] in COMPLETION_FLAGS):
        return _shell_completion(argv if verb in COMPLETION_FLAGS else rest)
    if verb == "run":
        sys.argv = ["scaling run", *rest]
        return _hydra_run()
    if verb == "sweep":
        # a multirun; rerunning skips finished cells, so --resume is the default behaviour
        wait = "--wait" in rest
        rest = [a for a in rest if a not in ("--resume", "--wait")]
        if "--one-geometry" not in rest and _slurm_base(rest) is not None:
            return _slurm_sweep(rest, wait=wait)
        rest = [a for a in rest if a != "--one-geometry"]
        # Hydra's --cfg/--info/--shell-completion only inspect: they refuse to be combined with --multirun
        inspect = any(a in ("--cfg", "-c", "--info", "-i", "--shell-completion", "-sc") or a.startswith("--info=")
                      for a in rest)
        sys.argv = ["scaling sweep", *([] if inspect else ["--multirun"]), *rest]
        if not inspect:
            from scaling.sweep import compose_covering_cells_only

            compose_covering_cells_only()
        return _hydra_run()
    if verb == "comm":
        from scaling.comm.cli import sweep_overrides

        return main(["sweep", *sweep_overrides(rest)])
    if verb in ("results", "report", "predict"):
        import importlib

        module, func = {"results": ("scaling.results", "results_command"), "report": ("scaling.report", "report_command"),
                        "predict": ("scaling.predict", "predict_command")}[verb]
        return getattr(importlib.import_module(module), func)(rest)
    if verb == "slurm":
        from scaling.slurm import slurm_command

        return slurm_command(rest)
    if verb == "data":
        from scaling.data import data_command

        return data_command(rest)
    print(f"scaling: unknown verb {verb!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
