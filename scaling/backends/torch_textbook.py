"""PyTorch the way the tutorials write it: a Dataset with a per-sample transform, a shuffling
DataLoader at batch 64, and the classic ``zero_grad / forward / nll_loss / backward / step`` loop.

The per-sample transform is what ``transforms.ToTensor()`` + ``Normalize((0.1307,), (0.3081,))``
do to an MNIST image (PyTorch's examples/mnist), written out so the baseline needs no torchvision.
The last, partial batch is trained on, as ``DataLoader(drop_last=False)`` does.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from scaling.backends import RunContext
from scaling.backends import torch_common as tc
from scaling.protocol import Measurement
from scaling.workloads import torch_models

MEAN, STD = 0.1307, 0.3081


class ImageDataset(TorchDataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.array(self.images[i], dtype=np.float32)).div_(255.0).unsqueeze_(0)
        return (x - MEAN) / STD, int(self.labels[i])


class TorchTextbook(tc.OnTorchDevice):
    devices = 1

    def __init__(self, ctx: RunContext) -> None:
        cfg, train = ctx.config, ctx.train
        tc.configure_threads(cfg.get("threads"))
        torch.manual_seed(cfg["seed"])
        self.ctx = ctx
        self.device = tc.resolve_device(cfg["device"], ctx.local_rank)
        self.global_batch = ctx.geometry.global_batch
        ds = ctx.dataset
        self.loader = DataLoader(
            ImageDataset(ds.train_x, ds.train_y),
            batch_size=self.global_batch,
            shuffle=True,
            num_workers=int(cfg["backend"].get("loader_workers", 0)),
            pin_memory=self.device.type == "cuda",
        )
        self.test_loader = DataLoader(ImageDataset(ds.test_x, ds.test_y), batch_size=1000)
        self.steps_per_epoch = len(self.loader)
        self.model = torch_models.build(cfg["workload"], ds.num_classes).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=ctx.geometry.lr)

    def environment(self) -> dict:
        return tc.environment(self.device)

    def evaluate(self) -> tuple[float, float]:
        self.model.eval()
        loss, correct = 0.0, 0
        with torch.no_grad():
            for data, target in self.test_loader:
                data, target = data.to(self.device), target.to(self.device)
                output = self.model(data)
                loss += F.nll_loss(output, target, reduction="sum").item()
                correct += output.argmax(dim=1).eq(target).sum().item()
        n = len(self.test_loader.dataset)
        return loss / n, correct / n

    def train(self, meter: Measurement) -> None:
        epochs = int(self.ctx.train["epochs"])
        limit = self.ctx.train.get("max_steps_per_epoch")
        for epoch in range(epochs):
            self.model.train()
            meter.epoch_begin(epoch)
            for step, (data, target) in enumerate(self.loader):
                if limit and step >= limit:
                    break
                meter.step_begin()
                data, target = data.to(self.device), target.to(self.device)
                self.optimizer.zero_grad()
                output = self.model(data)
                loss = F.nll_loss(output, target)
                loss.backward()
                self.optimizer.step()
                before = meter.steps_done
                meter.step_end(1, samples=len(target))
                if meter.wants_loss(before):
                    meter.record_loss(loss.item())
            meter.epoch_end(epoch)
            t0 = meter.now()
            loss, acc = self.evaluate()
            meter.evaluated(epoch, loss, acc, meter.now() - t0)
