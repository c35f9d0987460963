"""Checks on a composed run config, made before any framework is imported or any data is read.

Hydra already rejects unknown config groups (``backend=nope`` lists the available backends); this
module rejects values that compose but cannot run, each with the key, the value and the fix.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any



def package_dir(package: str) -> Path:
    """The folder holding a data package's files (``scaling.conf``, ``scaling.templates``), found
    through the import system: inside the installed wheel, or the checkout's top-level folder."""
    from importlib import resources

    folder = resources.files(package)
    if not isinstance(folder, Path):  # e.g. a zipped install: Hydra and sbatch need real files
        raise RuntimeError(f"{package} is not on the file system ({folder}): install scaling from its wheel or a clone")
    return folder


#: Hydra's config folder (an absolute path: Hydra, initialize_config_dir and the group listings read it)
CONF_DIR = package_dir("scaling.conf")


class ConfigError(ValueError):
    pass


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


#: a backend YAML's placement facts, in its ``runs_on`` block (not constructor arguments)
RUNS_ON = ("framework", "launcher", "max_devices", "max_nodes", "fast_modes")


def runs_on(backend: dict) -> dict:
    """A backend config's placement facts: its ``runs_on`` block (records written before the block
    existed kept these keys at the backend's top level; they read the same)."""
    facts = backend.get("runs_on")
    if isinstance(facts, dict):
        return facts
    return {k: backend[k] for k in RUNS_ON if k in backend}


def launcher(cfg: dict) -> str | None:
    """How a run's workers start: ``runs_on.launcher``, None when the YAML says nothing
    (``scaling.launch.launchers`` then starts one process)."""
    return runs_on(cfg["backend"]).get("launcher")


def backends() -> dict[str, dict]:
    """Every backend YAML in ``conf/backend``, by name, as written (the one place benches and tests
    learn a backend's framework and limits from)."""
    import yaml

    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted((CONF_DIR / "backend").glob("*.yaml"))}


def frameworks() -> dict[str, str]:
    """Each backend's framework (``tf``, ``torch``), from its YAML."""
    return {name: runs_on(b)["framework"] for name, b in backends().items()}


def _positive_int(cfg: dict, dotted: str, allow_none: bool = False) -> None:
    value: Any = cfg
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{dotted}={value!r}: must be a positive integer. Fix: override it, e.g. {dotted}=64")


#: what a run, group or sweep name may hold: it becomes a file name under results_dir
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")
#: longest name: "<name>.json" and the temp files beside it stay under the 255-byte file name limit
NAME_MAX = 200


def _name(cfg: dict, key: str) -> None:
    value = cfg.get(key)
    if value is None and key != "group":
        return
    text = str(value)
    if not NAME_RE.fullmatch(text) or len(text) > NAME_MAX:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise ConfigError(f"{key}={shown!r} ({len(text)} characters): a name must be 1-{NAME_MAX} letters, digits "
                          f"or _ . = + - (no path: it names a file under results_dir). Fix: e.g. {key}=my-run-1")


def check_results_dir(results_dir: str | Path, group: str) -> Path:
    """Make ``<results_dir>/<group>`` and prove it writable, before anything trains."""
    folder = Path(results_dir) / group
    fix = "Fix: results_dir=<a writable folder> (or $SCALING_RESULTS)"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"results_dir={str(results_dir)!r}: cannot write records in {folder} "
                          f"({exc.strerror or type(exc).__name__}). {fix}") from None
    return folder


def validate(cfg: dict) -> None:
    """Raise ConfigError for the first value that cannot run. ``cfg`` is the resolved config as a dict."""
    for group in ("backend", "workload", "data"):
        if not isinstance(cfg.get(group), dict) or "name" not in cfg[group]:
            raise ConfigError(f"{group}: missing. Fix: choose one of {available(group)}, e.g. {group}={available(group)[0]}")
    if "_target_" not in cfg["backend"]:
        raise ConfigError(f"backend={cfg['backend']['name']}: its YAML names no _target_ class")
    facts = runs_on(cfg["backend"])
    if not facts.get("framework"):
        raise ConfigError(f"backend={cfg['backend']['name']}: its YAML's runs_on block names no framework (tf, torch)")
    _check_data(cfg["data"])
    _check_workload(cfg["workload"], facts["framework"])
    _positive_int(cfg, "workload.hidden", allow_none=True)
    _positive_int(cfg, "train.per_device_batch")
    _positive_int(cfg, "train.epochs")
    _positive_int(cfg, "train.max_steps_per_epoch", allow_none=True)
    _positive_int(cfg, "threads", allow_none=True)
    for key in ("run_name", "group", "sweep_id"):
        _name(cfg, key)
    lr = cfg["train"].get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"train.lr={lr!r}: must be a positive number. Fix: e.g. train.lr=1e-3")
    warmup = cfg["protocol"].get("warmup_steps")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"protocol.warmup_steps={warmup!r}: must be an integer >= 0")
    target = cfg["protocol"].get("target_accuracy")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ConfigError(f"protocol.target_accuracy={target!r}: must be in (0, 1], e.g. 0.97")
    _positive_int(cfg, "devices")
    _positive_int(cfg, "cluster.nodes")
    from scaling.geometry import GeometryError, plan

    if facts.get("max_nodes") is not None and cfg["cluster"]["nodes"] > facts["max_nodes"]:
        raise ConfigError(f"backend={cfg['backend']['name']} runs on {facts['max_nodes']} node(s), not "
                          f"{cfg['cluster']['nodes']}. Fix: cluster.nodes=1, or tf_multiworker across nodes")
    most = facts.get("max_devices")
    total = cfg["devices"] * cfg["cluster"]["nodes"]
    if most is not None and total > most:
        distributed = [name for name, b in backends().items() if runs_on(b).get("max_devices") is None]
        raise ConfigError(f"backend={cfg['backend']['name']} trains on {most} device(s), not {total}. "
                          f"Fix: devices=1, or a distributed backend ({', '.join(distributed)})")

    try:
        geometry = plan(cfg)
    except GeometryError as exc:
        raise ConfigError(str(exc)) from None
    from scaling.settings import VARIANTS

    if (cfg.get("variant") or "defaults") not in VARIANTS:
        raise ConfigError(f"variant={cfg.get('variant')!r}: must be one of {', '.join(VARIANTS)}")
    if cfg.get("variant") == "tuned" and not cfg["backend"].get("tuned"):
        raise ConfigError(f"variant=tuned: backend={cfg['backend']['name']} has no tuned settings (no tuned: block in "
                          "its YAML), so its defaults cells stand for it in both variants. Fix: variant=defaults")
    from scaling.placement import PLACEMENTS

    if (cfg.get("placement") or "core") not in PLACEMENTS:
        raise ConfigError(f"placement={cfg.get('placement')!r}: must be one of {', '.join(PLACEMENTS)}")
    _trains_and_measures(cfg, geometry.global_batch, warmup)
    if cfg.get("device") not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={cfg.get('device')!r}: must be auto, cpu or cuda")
    _check_fast_mode(cfg)
    _positive_int(cfg, "protocol.sync_every", allow_none=True)


def _findable(module: str) -> Any:
    """The module's spec if Python can import it (found without running it), else None."""
    from importlib.util import find_spec

    try:
        return find_spec(module)
    except (ImportError, ValueError, AttributeError):
        return None


def _check_target(key: str, target: Any, fix: str) -> None:
    """A ``_target_`` whose module cannot be found is refused now, naming the key and the fix. Its
    modules are found, not run (only the packages above them are imported: no framework is loaded
    here), so a wrong name inside a module that exists shows when the run builds it."""
    parts = str(target or "").split(".")
    for i in range(1, len(parts)):
        spec = _findable(".".join(parts[:i]))
        if spec is None:
            break
        if spec.submodule_search_locations is None or i == len(parts) - 1:
            return  # a module (the rest are names inside it), or a package and a name it defines
    raise ConfigError(f"{key}={target!r}: Python finds no module {'.'.join(parts[:-1]) or target!r}. Fix: {fix}")


def _check_data(data: dict) -> None:
    """The dataset's ``_target_`` can be imported; the study's own loader knows the name."""
    from scaling.data import DATASETS, DEFAULT_TARGET

    target = data.get("_target_") or DEFAULT_TARGET
    if target == DEFAULT_TARGET:
        if data["name"] not in DATASETS:
            raise ConfigError(f"data.name={data['name']!r}: unknown dataset. Fix: data=<one of {available('data')}>, "
                              "or a data YAML whose _target_ returns the dataset")
        return
    _check_target("data._target_", target, "put the function's module on PYTHONPATH, or correct _target_ in "
                                           f"the data YAML of {data['name']!r}")


def _check_workload(workload: dict, framework: str) -> None:
    """The workload says how ``framework`` builds it (``build.<framework>``), and that can be imported."""
    from scaling.workloads import config_of

    name = workload["name"]
    try:
        build = config_of(workload).get("build") or {}
    except ValueError:
        raise ConfigError(f"workload.name={name!r}: unknown workload (no build block, no conf/workload/{name}.yaml). "
                          f"Fix: workload=<one of {available('workload')}>, or a workload YAML with a build block") from None
    spec = build.get(framework)
    if not isinstance(spec, dict) or not spec.get("_target_"):
        raise ConfigError(f"workload={name} names no build.{framework}._target_: a {framework} backend cannot build it. "
                          f"Fix: add build.{framework}: {{_target_: <module.callable>}} to its YAML, or a backend "
                          f"of another framework ({', '.join(sorted(build)) or 'none named'})")
    _check_target(f"workload.build.{framework}._target_", spec["_target_"],
                  f"put the module on PYTHONPATH, or correct build.{framework} in the workload YAML of {name!r}")


def _check_fast_mode(cfg: dict) -> None:
    """``backend.fast`` must be one of the backend's ``runs_on.fast_modes``; graph capture needs a GPU."""
    backend = cfg["backend"]
    fast = backend.get("fast")
    if fast is None:
        return
    modes = list(runs_on(backend).get("fast_modes") or ["none"])
    if fast not in modes:
        raise ConfigError(f"backend.fast={fast!r}: backend={backend['name']} offers {', '.join(modes)}. "
                          f"Fix: backend.fast={modes[0]}" + (f" (or one of {', '.join(modes[1:])})" if len(modes) > 1 else ""))
    if fast == "graph" and cfg.get("device") == "cpu":
        raise ConfigError("backend.fast=graph captures the step as a CUDA graph and needs a GPU, not device=cpu. "
                          "Fix: device=cuda (or auto) on a GPU node, or backend.fast=none|compile")


def _trains_and_measures(cfg: dict, global_batch: int, warmup: int) -> None:
    """An epoch holds at least one global batch, and the run has a timed step after the warm-up."""
    from scaling.data import SPLIT_SIZES

    train_size = SPLIT_SIZES["train"]
    if global_batch > train_size:
        raise ConfigError(f"global batch {global_batch:,} is larger than the {train_size:,} training images: an epoch "
                          f"would hold no step. Fix: a smaller train.per_device_batch (or train.global_batch), "
                          f"at most {train_size:,} samples over all devices")
    per_epoch = train_size // global_batch
    limit = cfg["train"].get("max_steps_per_epoch")
    steps = min(per_epoch, limit) if limit else per_epoch
    total = steps * int(cfg["train"]["epochs"])
    if total <= warmup:
        raise ConfigError(f"the run trains {total} step(s) ({cfg['train']['epochs']} epoch(s) x {steps}), not more than "
                          f"protocol.warmup_steps={warmup}: no step would be timed. Fix: train.max_steps_per_epoch>="
                          f"{warmup // int(cfg['train']['epochs']) + 1}, more train.epochs, or a smaller protocol.warmup_steps")
