"""The study's networks, defined once per framework, side by side (torch_models.py, tf_models.py).

A workload is a YAML, ``conf/workload/<name>.yaml``: its ``name``, its arguments (``hidden``, the
width of its hidden dense layer, 128, the networks' classic width, by default: the model-size
axis) and a ``build:`` block naming, per framework (``torch``, ``tf``: a backend's
``runs_on.framework``), the callable that builds it. :func:`build` calls it through Hydra's
``instantiate`` with ``num_classes`` and the arguments, so a workload from outside the package is
a module and a YAML, nothing else.

The ``build`` block says how a network is built, not which network it is: it is no part of a
cell's identity (``scaling.analysis.workload_params``). Both of the study's own networks build the
same layers in the same order in both frameworks, and ``parameters`` is the count both must give;
a workload without a formula here has its count taken from the model it builds.
"""
from __future__ import annotations

from typing import Any, Callable

#: the hidden dense layer's width of every workload by default
DEFAULT_HIDDEN = 128
#: a workload config's keys that are not arguments of its build callable
NOT_ARGUMENTS = ("name", "build", "parameters")


def hidden_of(workload: str | dict) -> int:
    width = workload.get("hidden") if isinstance(workload, dict) else None
    return int(width) if width is not None else DEFAULT_HIDDEN


def name_of(workload: str | dict) -> str:
    return workload["name"] if isinstance(workload, dict) else workload


def _dense_head(inputs: int, h: int) -> int:
    return inputs * h + h + h * 10 + 10


#: trainable parameters of the study's own networks (10 classes) for a hidden width
FORMULAS: dict[str, Callable[[int], int]] = {
    "mlp": lambda h: _dense_head(28 * 28, h),
    "cnn": lambda h: (9 * 32 + 32) + (9 * 32 * 64 + 64) + _dense_head(12 * 12 * 64, h),
}


def parameters(workload: str | dict) -> int | None:
    """Trainable parameters of a workload (a name, or a workload config with ``hidden``); None for a
    workload without a formula here (its count is known once it is built: :func:`build`)."""
    formula = FORMULAS.get(name_of(workload))
    return None if formula is None else formula(hidden_of(workload))


def label(workload: str | dict) -> str:
    """The workload's name, with its width when that is not the default: ``mlp``, ``mlp-h1024``."""
    h = hidden_of(workload)
    return name_of(workload) + ("" if h == DEFAULT_HIDDEN else f"-h{h}")


#: trainable parameters of each of the study's networks at the default width, identical in both
#: frameworks (mlp 101,770; cnn 1,199,882)
PARAMETERS = {name: parameters(name) for name in FORMULAS}


def config_of(workload: str | dict) -> dict:
    """A workload's config with its ``build`` block: as given when it has one, else (a name, or a
    config written before the block existed) completed from ``conf/workload/<name>.yaml``."""
    if isinstance(workload, dict) and workload.get("build"):
        return workload
    from importlib import resources

    name = name_of(workload)
    path = resources.files("scaling.conf") / "workload" / f"{name}.yaml"  # the folder config.CONF_DIR names
    if not path.is_file():
        raise ValueError(f"workload {name!r} names no build block and there is no {path}")
    import yaml

    given = {k: v for k, v in workload.items() if k != "build"} if isinstance(workload, dict) else {}
    return {**yaml.safe_load(path.read_text()), **given}


def arguments(workload: dict) -> dict[str, Any]:
    """What the build callable gets besides ``num_classes``: the config's keys but name, build and
    parameters (``hidden`` for the study's networks)."""
    return {k: v for k, v in workload.items() if k not in NOT_ARGUMENTS}


def build(workload: str | dict, framework: str, num_classes: int, count: Callable[[Any], int]) -> Any:
    """The workload as ``framework``'s model: ``instantiate(build.<framework>, num_classes=...,
    **arguments)``. ``count`` gives a model's trainable parameters: checked against the formula
    where there is one; otherwise, for a workload config, written into it as ``parameters`` (so the
    run's record carries the count of the model it trained)."""
    from hydra.utils import instantiate

    cfg = config_of(workload)
    spec = (cfg.get("build") or {}).get(framework)
    if not spec:
        raise ValueError(f"workload {name_of(cfg)!r} has no build.{framework}: it cannot run on a {framework} "
                         f"backend. Fix: add build.{framework}: {{_target_: <module.callable>}} to its YAML")
    model = instantiate(spec, num_classes=num_classes, **arguments(cfg), _convert_="all")
    n = count(model)
    expected = parameters(cfg)
    if expected is None:
        if isinstance(workload, dict) and workload.get("parameters") is None:
            workload["parameters"] = n
    elif num_classes == 10 and n != expected:
        raise AssertionError(f"{framework} {name_of(cfg)} has {n} parameters, expected {expected}")
    return model
