"""PyTorch pieces the torch-based backends share: threads, device, device-resident data, eval."""
from __future__ import annotations

import numpy as np
import torch

from scaling.data import Dataset


def configure_threads(threads: int | None) -> None:
    """Pin intra-op threads; with PyTorch's default on a small CPU share, training ran 20x slower."""
    if threads:
        torch.set_num_threads(int(threads))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or parallel work already started in this process
            pass


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "cuda":
        raise RuntimeError("device=cuda requested but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cpu")


def to_device_tensors(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> float32 in [0, 1] (the same scaling the TF backends use), labels -> int64."""
    # np.array copies: the cache's arrays are read-only memory maps, which torch will not wrap
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device=device, dtype=torch.float32).div_(255.0)
    y = torch.from_numpy(np.array(labels)).to(device=device, dtype=torch.int64)
    return x, y


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """Mean NLL loss and accuracy over the whole test set, dropout off."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for start in range(0, x.shape[0], batch):
        out = model(x[start:start + batch])
        target = y[start:start + batch]
        loss_sum += torch.nn.functional.nll_loss(out, target, reduction="sum").double()
        correct += (out.argmax(1) == target).sum()
    model.train(was_training)
    n = x.shape[0]
    return float(loss_sum.item()) / n, int(correct.item()) / n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_memory_peak(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def environment(device: torch.device) -> dict:
    env = {"frameworks": {"torch": torch.__version__}, "gpu": None, "device": str(device),
           "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = {
            "count": torch.cuda.device_count(),
            "model": torch.cuda.get_device_name(0),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return env
