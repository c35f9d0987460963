"""Plain sbatch scripts for the study's cells: ``scaling slurm render``.

For users who submit by hand: the same config as a run or sweep, one readable script per cell
(``slurm/cell.sbatch``) beside the cell's resolved config. The geometry is the backend's
launcher's (``launch/launchers.py``): one task per device (``--ntasks-per-node`` = devices per
node, srun starts the ranks: torch DDP, Lightning, Horovod) or one task per node holding the
node's devices (TF Mirrored and MultiWorker, single-device backends).
Every value from the config that reaches a script is shell-quoted, and a value that could break
out of an ``#SBATCH`` line (a newline) is refused.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import string
import sys
from pathlib import Path
from typing import Any

from scaling.launch import launchers
from scaling.launch.launchers import Launcher
from scaling import CHECKOUT
from scaling.config import CONF_DIR, package_dir

TEMPLATE = package_dir("scaling.templates") / "cell.sbatch"


class RenderError(ValueError):
    pass


def unrunnable(cfg: dict) -> str | None:
    """Why a cell's Slurm geometry cannot run (with what would), or None."""
    backend, devices = cfg["backend"]["name"], int(cfg["devices"])
    cpu_nodes = not cfg["cluster"].get("gpus", True) or cfg.get("device") == "cpu"
    if backend in ("tf_multiworker", "tf_reference") and cpu_nodes and devices > 1:
        nodes = int(cfg["cluster"].get("nodes", 1))
        return (f"backend={backend} devices={devices} on CPUs (cluster.gpus=false or device=cpu): one task per node, "
                f"and on a CPU node that task holds one CPU device, not {devices}. What runs: devices=1 "
                f"cluster.nodes={nodes * devices} (one worker per node), cluster.gpus=true on GPU nodes, or "
                f"backend=torch_ddp or horovod_torch for {devices} CPU workers per node")
    return None


def cpus_per_task(launcher: Launcher, devices: int, cluster: dict) -> int:
    """``cluster.cpus_per_task`` where set; else ``cpus_per_device`` for each device the task drives
    (a TF task holding a node's 4 GPUs gets 4x what one DDP rank gets)."""
    if cluster.get("cpus_per_task"):
        return int(cluster["cpus_per_task"])
    return launcher.devices_per_task(devices) * int(cluster.get("cpus_per_device") or 1)


def sbatch_options(cluster: dict) -> dict[str, Any]:
    """#SBATCH options beyond the geometry, for rendered scripts and submitit alike: the node to
    itself (a benchmark sharing a node measures its neighbours), memory, requeue as configured;
    ``extra_sbatch`` last, so a site can override any of them."""
    options: dict[str, Any] = {}
    if cluster.get("exclusive"):
        options["exclusive"] = True
    if cluster.get("mem") is not None:
        options["mem"] = str(cluster["mem"])
    options["requeue" if cluster.get("requeue") else "no-requeue"] = True
    options.update(cluster.get("extra_sbatch") or {})
    return options


def _directive(value: Any, what: str) -> str:
    text = str(value)
    if "\n" in text or "\r" in text:
        raise RenderError(f"{what}={text!r}: a newline would end the #SBATCH line and start a command")
    return shlex.quote(text)


def render_cell(cfg: dict, run_id: str, out_dir: Path) -> Path:
    """Write ``<out_dir>/<run_id>.sbatch`` and ``<run_id>.json`` (the resolved config)."""
    slurm = cfg["cluster"]
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = (out_dir / f"{run_id}.json").resolve()
    cfg = {**cfg, "run_name": run_id, "progress": False}
    from scaling.secrets import scrub_secrets

    cfg = scrub_secrets(cfg)  # the script and its config never carry an API key
    config_path.write_text(json.dumps(cfg, indent=1))
    gpus = int(cfg["devices"]) if slurm.get("gpus", True) else 0
    optional = []
    for key, flag in (("partition", "--partition"), ("account", "--account"), ("qos", "--qos"),
                      ("constraint", "--constraint")):
        if slurm.get(key):
            optional.append(f"#SBATCH {flag}={_directive(slurm[key], f'cluster.{key}')}")
    if gpus:
        optional.append(f"#SBATCH --gpus-per-node={gpus}")
    for key, value in sbatch_options(slurm).items():
        flag = "--" + _directive(key, "cluster.extra_sbatch key").replace("_", "-")
        if value is not False and value is not None:
            optional.append(f"#SBATCH {flag}" if value is True else f"#SBATCH {flag}={_directive(value, f'cluster.extra_sbatch.{key}')}")
    setup = [str(line) for line in slurm.get("env_setup") or []]
    if any("\n" in line or "\r" in line for line in setup):
        raise RenderError("cluster.env_setup: one shell line per list item, no newlines inside an item")
    worker = f"{shlex.quote(sys.executable)} -m scaling.worker --config {shlex.quote(str(config_path))}"
    launcher = launchers.of(cfg)
    tasks = launcher.tasks_per_node(cfg["devices"])
    job_files = shlex.quote(str(out_dir.resolve() / run_id))  # prefix of files the job's set-up writes
    setup_lines = launcher.batch_setup(job_files, tasks) if launcher.batch_setup else []
    values = {
        "cell_id": re.sub(r"[^A-Za-z0-9_.=-]", "_", run_id),
        "job_name": _directive(f"scaling-{run_id}"[:120], "job name"),
        "nodes": _directive(int(slurm.get("nodes", 1)), "cluster.nodes"),
        "tasks_per_node": tasks,
        "cpus_per_task": _directive(cpus_per_task(launcher, cfg["devices"], slurm), "cluster.cpus_per_task"),
        "env_setup": "\n".join(["# site set-up (cluster.env_setup)", *setup]) if setup else "",
        "time_limit": _directive(int(slurm.get("time_min") or 60), "cluster.time_min"),
        "signal_seconds": _directive(int(slurm.get("signal_seconds") or 120), "cluster.signal_seconds"),
        "log_path": _directive(str((out_dir / f"{run_id}.%j.log").resolve()), "log path"),
        "optional_sbatch": "\n".join(optional),
        # a checkout's jobs run in it (its own code first); an installed package's where it was rendered
        "workdir": shlex.quote(str(CHECKOUT or Path.cwd())),
        "launch_setup": "\n".join([f"# {launcher.srun_note}", *setup_lines]),
        "launch_command": f"srun --kill-on-bad-exit=1 {worker}",
    }
    script = string.Template(TEMPLATE.read_text()).substitute(values)
    path = out_dir / f"{run_id}.sbatch"
    path.write_text(script)
    path.chmod(0o755)
    return path


def register_resolvers() -> None:
    """The resolvers conf/cluster/slurm.yaml uses to size a cell's allocation (the launcher's entry in
    launch/launchers.py, as for rendered scripts)."""
    from omegaconf import OmegaConf

    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    OmegaConf.register_new_resolver(
        "scaling_tasks_per_node", lambda launcher, devices: launchers.get(launcher).tasks_per_node(devices), replace=True)
    OmegaConf.register_new_resolver("scaling_gpus", lambda use, devices: int(devices) if use else None, replace=True)
    OmegaConf.register_new_resolver(
        "scaling_cpus", lambda launcher, devices, cluster: cpus_per_task(launchers.get(launcher), devices, plain(cluster)),
        replace=True)
    OmegaConf.register_new_resolver("scaling_sbatch", lambda cluster: sbatch_options(plain(cluster)), replace=True)
    OmegaConf.register_new_resolver(
        "scaling_setup", lambda lines: [*(plain(lines) or []), "export SCALING_LAUNCH_TIME=$(date +%s.%N)"], replace=True)


def expand(overrides: list[str]) -> list[tuple[dict, list[str]]]:
    """Compose the config for every cell the overrides (and an experiment's sweep params) name."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        base = compose("config", overrides=[o for o in overrides if "," not in o.split("=", 1)[-1]],
                       return_hydra_config=True)
        sweep_params = base.hydra.sweeper.get("params")
        params = OmegaConf.to_container(sweep_params, resolve=False) if sweep_params else {}
        swept = [f"{k}={v}" for k, v in params.items()] + overrides
        parsed = OverridesParser.create().parse_overrides(swept)
        axes: dict[str, list[str]] = {}
        for o in parsed:
            key = o.get_key_element()
            axes[key] = ([f"{key}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
                         else [f"{key}={o.get_value_element_as_str()}"])
        cells = []
        for combo in itertools.product(*axes.values()):
            cfg = compose("config", overrides=list(combo))
            cells.append((OmegaConf.to_container(cfg, resolve=True), list(combo)))
    return cells


def render_command(argv: list[str]) -> int:
    """``scaling slurm render [OVERRIDES...] --out DIR``: one sbatch script per valid cell."""
    from scaling.config import ConfigError, validate
    from scaling.naming import cell_id

    ap = argparse.ArgumentParser(prog="scaling slurm render", description=render_command.__doc__)
    ap.add_argument("--out", default="slurm-jobs", help="folder for the scripts and configs")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    written = 0
    for cfg, combo in expand(args.overrides):
        try:
            validate(cfg)
            launchers.of(cfg)
        except ConfigError as exc:
            print(f"skipped {combo}: {exc}", file=sys.stderr)
            continue
        if unrunnable(cfg):
            print(f"skipped {combo}: {unrunnable(cfg)}", file=sys.stderr)
            continue
        cfg["group"] = cfg.get("sweep_id") or "adhoc"
        cfg["overrides"] = list(combo)  # saved beside the record, as `scaling run` and `scaling sweep` save theirs
        try:
            path = render_cell(cfg, cell_id(cfg, combo), Path(args.out))
        except RenderError as exc:
            print(f"scaling slurm render: {exc}", file=sys.stderr)
            return 2
        print(path)
        written += 1
    print(f"{written} script(s) in {args.out}; submit each with sbatch", file=sys.stderr)
    return 0 if written else 2


def slurm_command(argv: list[str]) -> int:
    if not argv or argv[0] != "render":
        print("usage: scaling slurm render [OVERRIDES...] --out DIR", file=sys.stderr)
        return 2
    return render_command(argv[1:])


def geometry(cfg: dict) -> tuple[int, int, int, int]:
    """(nodes, tasks per node, GPUs per node, CPUs per task) of a cell's allocation."""
    gpus = int(cfg["devices"]) if cfg["cluster"].get("gpus", True) else 0
    launcher = launchers.of(cfg)
    cpus = cpus_per_task(launcher, cfg["devices"], cfg["cluster"])
    return int(cfg["cluster"].get("nodes", 1)), launcher.tasks_per_node(cfg["devices"]), gpus, cpus


def split_sweep(overrides: list[str]) -> list[list[str]]:
    """A Slurm sweep as one submitit multirun per allocation geometry.

    Submitit sizes one job array for every cell of a multirun, so cells that need different
    allocations go to different multiruns. A geometry is fixed by (backend class, devices, nodes),
    so each group is again a product of axis values: the overrides returned list, per axis, the
    values the group's cells use, in the sweep's order (repeat stays first, repeats interleave).
    A cell whose geometry the backend cannot run refuses the whole sweep (RenderError) before
    anything is submitted.
    """
    from scaling.config import ConfigError, validate

    groups: dict[tuple[int, int, int, int], list[list[str]]] = {}
    refused: list[str] = []
    for cfg, combo in expand(overrides):
        try:
            validate(cfg)
            launchers.of(cfg)
        except ConfigError as exc:
            print(f"[sweep] skipped {' '.join(combo)}: {exc}", file=sys.stderr)
            continue
        if unrunnable(cfg):
            refused.append(unrunnable(cfg))
            continue
        groups.setdefault(geometry(cfg), []).append(combo)
    if refused:
        raise RenderError(f"{len(refused)} cell(s) cannot run on this allocation, nothing submitted: "
                          + "; ".join(dict.fromkeys(refused)))
    if not groups:
        raise RenderError("no valid cell (each reason is above), nothing submitted")
    runs = []
    for (nodes, tasks, gpus, cpus), combos in groups.items():
        axes: dict[str, list[str]] = {}
        for combo in combos:
            for item in combo:
                key, value = item.split("=", 1)
                values = axes.setdefault(key, [])
                if value not in values:
                    values.append(value)
        # the allocation itself, stated: the multirun's base config may name another backend
        pinned = [f"hydra.launcher.nodes={nodes}", f"hydra.launcher.tasks_per_node={tasks}",
                  f"hydra.launcher.gpus_per_node={gpus or 'null'}", f"hydra.launcher.cpus_per_task={cpus}"]
        runs.append([f"{k}={','.join(v)}" for k, v in axes.items()] + pinned)
    return runs


def sweep_config(overrides: list[str]) -> dict:
    """A sweep's base config (its fixed overrides applied) as a dict, with the overrides listed."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=[o for o in overrides if "," not in o.split("=", 1)[-1]])
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["overrides"] = list(overrides)
    return plain


def queued_jobs(name: str, states: tuple[str, ...] | None = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING",
                                                              "COMPLETING", "SUSPENDED")) -> list[str]:
    """Ids of this user's jobs named ``name`` (array tasks folded into their array) in ``states``."""
    import os
    import subprocess

    cmd = ["squeue", "--noheader", "--name", name, "--user", str(os.getuid()), "--format", "%F %T"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    jobs: list[str] = []
    for line in out.splitlines():
        job, _, state = line.strip().partition(" ")
        if job and (states is None or state in states) and job not in jobs:
            jobs.append(job)
    return jobs
