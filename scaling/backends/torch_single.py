"""PyTorch on one device, tuned: the dataset lives on the device, batches are gathered there.

This is the loop an expert writes for a tiny model: no DataLoader, no per-sample work, no host to
device copies per step. ``fast=compile`` wraps the model in ``torch.compile``; ``fast=graph``
captures the whole step as one CUDA graph (``torch_common.GraphedSteps``).
"""
from __future__ import annotations

import torch

from scaling.backends import RunContext
from scaling.backends import torch_common as tc
from scaling.protocol import Measurement, drive
from scaling.workloads import torch_models


class TorchSingleDevice(tc.OnTorchDevice):
    devices = 1
    steps_per_call = 1

    def __init__(self, ctx: RunContext) -> None:
        cfg, train = ctx.config, ctx.train
        tc.configure_threads(cfg.get("threads"))
        torch.manual_seed(cfg["seed"])
        self.ctx = ctx
        self.device = tc.resolve_device(cfg["device"], ctx.local_rank)
        self.fast = cfg["backend"].get("fast") or "none"
        tc.check_fast_mode(self.fast, self.device)
        self.geometry = ctx.geometry
        self.global_batch = ctx.geometry.global_batch
        ds = ctx.dataset
        self.x, self.y = tc.to_device_tensors(ds.train_x, ds.train_y, self.device)
        self.test_x, self.test_y = tc.to_device_tensors(ds.test_x, ds.test_y, self.device)
        self.steps_per_epoch = self.x.shape[0] // self.global_batch  # full batches only
        self.model = torch_models.build(cfg["workload"], ds.num_classes).to(self.device)
        self.optimizer = tc.make_adam(self.model.parameters(), ctx.geometry, self.device, graph=self.fast == "graph")
        self.step_model = torch.compile(self.model) if self.fast == "compile" else self.model
        self.steps = tc.fast_steps(self.fast, self.step_model, self.optimizer, self.x, self.y, ctx.geometry, cfg["seed"])

    def begin_epoch(self, epoch: int) -> None:
        self.steps.begin_epoch(epoch)

    def train_steps(self, n: int) -> None:
        self.steps.run(n)

    def loss(self) -> float:
        return float(self.steps.last_loss.item())

    def evaluate(self) -> tuple[float, float]:
        return tc.evaluate(self.model, self.test_x, self.test_y)

    def environment(self) -> dict:
        return tc.environment(self.device)

    def train(self, meter: Measurement) -> None:
        drive(self, meter, int(self.ctx.train["epochs"]), self.ctx.train.get("max_steps_per_epoch"))
