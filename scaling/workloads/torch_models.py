"""PyTorch versions of the workloads: the twins of tf_models.py, layer for layer, named by the
workload YAMLs' ``build.torch``.

Both end in ``log_softmax`` and train with ``nll_loss``, as in PyTorch's MNIST example.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from scaling import workloads


class MLP(nn.Module):
    """Flatten 28x28 -> Linear 128 + ReLU -> Dropout 0.2 -> Linear 10 (the Keras tutorial's MLP)."""

    def __init__(self, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, hidden)
        self.dropout = nn.Dropout(0.2)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.dropout(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


class CNN(nn.Module):
    """conv 32 3x3 -> conv 64 3x3 -> maxpool 2 -> dropout 0.25 -> dense 128 -> dropout 0.5 -> dense 10."""

    def __init__(self, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(12 * 12 * 64, hidden)
        self.dropout2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # (N, 28, 28) images get their channel axis (NCHW, PyTorch's layout)
            x = x.unsqueeze(1)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = torch.flatten(x, 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def build(workload: str | dict, num_classes: int = 10) -> nn.Module:
    """The workload (a name, or its config) as a torch module: its YAML's ``build.torch`` (``scaling.workloads.build``)."""
    return workloads.build(workload, "torch", num_classes, parameter_count)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
