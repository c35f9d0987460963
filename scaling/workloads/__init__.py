"""The study's networks, defined once per framework, side by side (torch_models.py, tf_models.py).

Both files build the same layers in the same order; ``parameters`` is the count both must give.
A workload's config is its name and ``hidden``, the width of its hidden dense layer (128, the
networks' classic width, by default): the model-size axis.
"""
from __future__ import annotations


WORKLOADS = ("mlp", "cnn")

#: the hidden dense layer's width of every workload by default
DEFAULT_HIDDEN = 128


def hidden_of(workload: str | dict) -> int:
    width = workload.get("hidden") if isinstance(workload, dict) else None
    return int(width) if width is not None else DEFAULT_HIDDEN


def name_of(workload: str | dict) -> str:
    return workload["name"] if isinstance(workload, dict) else workload


def parameters(workload: str | dict) -> int:
    """Trainable parameters of a workload (a name, or a workload config with ``hidden``)."""
    h = hidden_of(workload)
    dense = {"mlp": 28 * 28, "cnn": 12 * 12 * 64}[name_of(workload)]
    convs = (9 * 32 + 32) + (9 * 32 * 64 + 64) if name_of(workload) == "cnn" else 0
    return convs + dense * h + h + h * 10 + 10


def label(workload: str | dict) -> str:
    """The workload's name, with its width when that is not the default: ``mlp``, ``mlp-h1024``."""
    h = hidden_of(workload)
    return name_of(workload) + ("" if h == DEFAULT_HIDDEN else f"-h{h}")


#: trainable parameters of each workload at the default width, identical in both frameworks
#: (mlp 101,770; cnn 1,199,882)
PARAMETERS = {name: parameters(name) for name in WORKLOADS}
