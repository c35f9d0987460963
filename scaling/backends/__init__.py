"""Backends: one module per framework and strategy, chosen by ``conf/backend/<name>.yaml``.

Each YAML names its class with ``_target_``; a backend class takes a :class:`RunContext`, sets up
its framework, and trains under the shared protocol (``train(meter)``). Nothing else is shared
between backends: the protocol, the data and the workloads are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from scaling.data import Dataset
from scaling.geometry import Geometry
from scaling.protocol import Measurement


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
    def train(self) -> dict[str, Any]:
        return self.config["train"]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Backend(Protocol):
    #: devices this worker trains on (1 for a process per device; N for one process with N devices)
    devices: int
    global_batch: int
    steps_per_epoch: int

    def __init__(self, ctx: RunContext) -> None: ...
    def sync(self) -> None: ...
    def device_memory_peak(self) -> int | None: ...
    def environment(self) -> dict[str, Any]: ...
    def train(self, meter: Measurement) -> None: ...
    # optional: def param_digests(self) -> list[str]: sha256 of the parameters, one per replica held


def load_backend(target: str) -> type:
    """Import the class a backend YAML names in ``_target_``."""
    from hydra.utils import get_class

    return get_class(target)
