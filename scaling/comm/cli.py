"""``scaling comm [OVERRIDES...]``: the ``comm`` experiment as a sweep (locally or on Slurm).

``devices=D`` sweeps N = 2..D (a list such as ``devices=2,4,8`` is taken as given); every other
override is passed on, e.g. ``backend=torch_ddp`` for one library, ``comm.size_factor=2`` for
every power of two, ``variant=tuned`` for the tuned settings.
"""
from __future__ import annotations


def expand_devices(overrides: list[str]) -> list[str]:
    """``devices=D`` (one integer >= 2) becomes ``devices=2,3,...,D``."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "devices" and value.isdigit() and int(value) >= 2:
            o = "devices=" + ",".join(str(n) for n in range(2, int(value) + 1))
        out.append(o)
    return out


def sweep_overrides(argv: list[str]) -> list[str]:
    """The ``scaling sweep`` overrides of ``scaling comm ARGV``: the ``comm`` experiment unless one is named."""
    overrides = expand_devices(argv)
    if not any(o.startswith("experiment=") for o in overrides):
        overrides = ["experiment=comm", *overrides]
    return overrides
