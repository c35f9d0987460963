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
    def __init__(self, ctx: RunContext, loader_workers: int = 0) -> None:
        self.place(ctx)
        torch.manual_seed(ctx.seed)
        ds = ctx.dataset
        self.loader = DataLoader(
            ImageDataset(ds.train_x, ds.train_y),
            batch_size=self.global_batch,
            shuffle=True,
            num_workers=int(loader_workers),
            pin_memory=self.device.type == "cuda",
        )
        self.test_loader = DataLoader(ImageDataset(ds.test_x, ds.test_y), batch_size=1000)
        self.steps_per_epoch = len(self.loader)
        self.model = self.build_model()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=ctx.geometry.lr)

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

    def fit(self, meter: Measurement, epochs: int, max_steps_per_epoch: int | None) -> None:
        for epoch in range(epochs):
            self.model.train()
            meter.epoch_begin(epoch)
            for step, (data, target) in enumerate(self.loader):
                if max_steps_per_epoch and step >= max_steps_per_epoch:
                    break
                meter.step_begin()
                data, target = data.to(self.device), target.to(self.device)
                self.optimizer.zero_grad()
                output = self.model(data)
                loss = F.nll_loss(output, target)
                loss.backward()
                self.optimizer.step()
                meter.step_end(1, samples=len(target), loss=loss.item)
            meter.epoch_end(epoch, self.evaluate)
