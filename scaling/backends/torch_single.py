"""PyTorch on one device, tuned: the dataset lives on the device, batches are gathered there.

This is the loop an expert writes for a tiny model: no DataLoader, no per-sample work, no host to
device copies per step. ``fast=compile`` wraps the model in ``torch.compile``; ``fast=graph``
captures the whole step as one CUDA graph (``torch_common.GraphedSteps``).
"""
from __future__ import annotations

import torch

from scaling.backends import RunContext
from scaling.backends import torch_common as tc


class TorchSingleDevice(tc.DrivenSteps):
    def __init__(self, ctx: RunContext, fast: str = "none") -> None:
        self.place(ctx, fast)
        torch.manual_seed(ctx.seed)
        self.load_resident()
        self.model = self.build_model()
        self.optimizer = tc.make_adam(self.model.parameters(), ctx.geometry, self.device, graph=self.fast == "graph")
        step_model = torch.compile(self.model) if self.fast == "compile" else self.model
        self.steps = tc.fast_steps(self.fast, step_model, self.optimizer, self.x, self.y, ctx.geometry, ctx.seed)
