"""Backends: one module per framework and strategy, chosen by ``conf/backend/<name>.yaml``.

A backend YAML reads like the lightning-hydra-template's: ``_target_`` names the class and the
other top-level keys are its constructor's arguments (``fast``, ``steps_per_call``,
``process_group``...), passed by :func:`build` alone; ``name`` (the cell's identity), ``tuned``
(``variant=tuned``'s settings) and the ``runs_on`` block (framework, launcher, device and node
limits, fast modes: facts the config check, the launchers and the report read) are not arguments.

A backend class takes a :class:`RunContext` and its arguments, sets up its framework, and either
exposes single steps (``protocol.SteppedTrainer``) or runs its framework's loop
(``protocol.LoopOwner``); the worker trains it with ``protocol.drive``. What backends share beside
the protocol, the data and the workloads sits here (framework-free) and in ``torch_common`` /
``tf_common``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from scaling.data import Dataset
from scaling.geometry import Geometry

#: the backend YAML's keys that are not constructor arguments
NOT_ARGUMENTS = ("name", "tuned", "runs_on")


@dataclass
class RunContext:
    """What a worker hands its backend: the resolved config as plain data, the data, its place."""

    config: dict[str, Any]
    dataset: Dataset
    geometry: Geometry
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def seed(self) -> int:
        return int(self.config["seed"])


class Backend(Protocol):
    global_batch: int
    steps_per_epoch: int

    def sync(self) -> None: ...
    def device_memory_peak(self) -> int | None: ...
    def environment(self) -> dict[str, Any]: ...
    # and either protocol.SteppedTrainer's or protocol.LoopOwner's methods
    # optional: param_digests() (sha256 of the parameters, one per replica held), close(), fast_mode(),
    # settings_in_force(), step_events()


def build(backend: dict[str, Any], ctx: RunContext) -> Backend:
    """The backend a backend config names: ``_target_`` called with ``ctx`` and the YAML's arguments."""
    from hydra.utils import instantiate

    arguments = {k: v for k, v in backend.items() if k not in NOT_ARGUMENTS}
    # the YAML's arguments bound first, the context (arrays, not config) passed as it is
    return instantiate(arguments, _partial_=True, _convert_="all")(ctx)


def warm_up(geometry: Geometry, step: int, set_lr: Callable[[float], Any]) -> None:
    """The learning-rate warm-up every backend applies before optimizer step ``step`` (0-based):
    ``set_lr`` gets the schedule's rate while the warm-up lasts; after it the rate stays put."""
    if step < geometry.lr_warmup_steps:
        set_lr(geometry.lr_at(step))


def rank_seed(seed: int, rank: int) -> int:
    """The seed a rank reseeds with once the weights are equal everywhere: dropout masks differ per rank."""
    return seed * 1000 + rank


def horovod_environment(hvd: Any, env: dict[str, Any], world: int) -> dict[str, Any]:
    """A framework's environment plus Horovod's version, build and size (``hvd``: horovod.torch or
    horovod.tensorflow; asked after ``close`` too, so only build facts are read from it)."""
    import horovod

    env["frameworks"]["horovod"] = horovod.__version__
    env["horovod"] = {"gloo": hvd.gloo_built(), "nccl": bool(hvd.nccl_built()), "size": world}
    return env


def check_one_per_device(backend: str, count: int, devices: int, what: str = "processes") -> None:
    """Refuse a run whose ranks (or replicas) do not match its devices one to one."""
    if count != devices:
        raise RuntimeError(f"{backend}: {count} {what} for {devices} devices; one per device expected")
