"""The ``scaling`` command: ``scaling run|data ...``.

``scaling run`` is a Hydra application: everything after the verb is a Hydra override
(``scaling run backend=tf workload=cnn train.epochs=1``), and Hydra's own flags work too
(``--cfg job`` prints the composed config, ``--help`` lists the groups).
"""
from __future__ import annotations

import sys

USAGE = """usage: scaling VERB [ARGS]

verbs:
  run [OVERRIDES...]         train one run under the shared protocol and write its record
                             e.g. scaling run backend=tf workload=mlp train.epochs=5
  sweep experiment=NAME [OVERRIDES...] [--resume]
                             run a study's cells (Hydra multirun), skipping finished ones
                             e.g. scaling sweep experiment=local_cpu
  results list|show|export RESULTS_DIR
                             sweeps and cells; speedup, efficiency, Karp-Flatt; CSV/Parquet export
  report RESULTS_DIR [--out DIR]
                             the self-contained HTML dashboard (and PNG figures)
  predict RESULTS_DIR [--validate]
                             fit the scaling model and predict 16..1024 devices
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
    # resolvers conf/cluster/submitit.yaml uses to size a cell's allocation
    OmegaConf.register_new_resolver(
        "scaling_tasks_per_node", lambda launcher, devices: 1 if launcher in ("process", "inprocess", "tf_config", "horovodrun")
        else int(devices), replace=True)
    OmegaConf.register_new_resolver("scaling_gpus", lambda use, devices: int(devices) if use else None, replace=True)

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def task(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from scaling import worker

        plain = OmegaConf.to_container(cfg, resolve=True)
        hc = HydraConfig.get()
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
            if plain["backend"].get("launcher", "inprocess") == "inprocess":
                record = worker.run(plain)
            else:
                from scaling.config import validate
                from launch.local import launch

                validate(plain)
                record = launch(plain)
        except ConfigError as exc:
            print(f"scaling run: invalid config: {exc}", file=sys.stderr)
            status["code"] = 2
            return
        if record["environment"].get("rank", 0) == 0:
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


def _say_failed(cells: list[str]) -> None:
    print(f"scaling sweep: {len(cells)} cell(s) failed: {', '.join(cells)} "
          "(their records say why; rerunning the sweep reruns them)", file=sys.stderr)


def _terminate_as_interrupt(signum, frame) -> None:
    # SIGTERM (scancel, kill) unwinds like Ctrl-C: launchers stop their workers and record why
    raise KeyboardInterrupt(f"signal {signum}")


def _slurm_base(overrides: list[str]):
    """The sweep's base config when it goes to Slurm, else None. Hydra's flags (--help, --cfg job,
    --info) and overrides that do not compose are left to Hydra's own multirun, which answers them
    as `scaling run` does."""
    from hydra import compose, initialize_config_dir

    from scaling.config import CONF_DIR

    if any(o.startswith("-") for o in overrides):
        return None
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose("config", overrides=[o for o in overrides if "," not in o.split("=", 1)[-1]])
    except Exception:  # a typo: Hydra names it in one line below
        return None
    return cfg if cfg.cluster.name == "slurm" else None


def _slurm_sweep(overrides: list[str], base) -> int:
    """One submitit multirun per allocation geometry, one after another."""
    import subprocess

    from scaling.slurm import RenderError, split_sweep
    from scaling.sweep import failed_cells

    try:
        groups = split_sweep(overrides)
    except RenderError as exc:
        print(f"scaling sweep: {exc}", file=sys.stderr)
        return 2
    code = 0
    for i, group in enumerate(groups, 1):
        print(f"[sweep] allocation {i}/{len(groups)}: {' '.join(group)}", file=sys.stderr, flush=True)
        fixed = [o for o in overrides if o.split("=", 1)[0] not in {g.split("=", 1)[0] for g in group}]
        done = subprocess.run([sys.executable, "-m", "scaling", "sweep", "--one-geometry", *fixed, *group])
        code = code or done.returncode
    # the cells ran in Slurm jobs, not here: their records say how they ended
    failed = failed_cells(base.results_dir, base.sweep_id or "adhoc")
    if failed:
        _say_failed(failed)
        return code or 1
    return code


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb == "run":
        sys.argv = ["scaling run", *rest]
        return _hydra_run()
    if verb == "sweep":
        # a multirun; rerunning skips finished cells, so --resume is the default behaviour
        rest = [a for a in rest if a != "--resume"]
        base = None if "--one-geometry" in rest else _slurm_base(rest)
        if base is not None:
            return _slurm_sweep(rest, base)
        rest = [a for a in rest if a != "--one-geometry"]
        # Hydra's --cfg/--info/--shell-completion only inspect: they refuse to be combined with --multirun
        inspect = any(a in ("--cfg", "-c", "--info", "-i", "--shell-completion", "-sc") or a.startswith("--info=")
                      for a in rest)
        sys.argv = ["scaling sweep", *([] if inspect else ["--multirun"]), *rest]
        return _hydra_run()
    if verb in ("results", "report", "predict"):
        import importlib

        module, func = {"results": ("scaling.results", "results_command"), "report": ("scaling.report", "report_command"),
                        "predict": ("scaling.scaling_model", "predict_command")}[verb]
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
