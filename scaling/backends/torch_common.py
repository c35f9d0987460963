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


class ShardedSteps:
    """The device-resident training step the torch backends share: each epoch's permutation,
    this rank's slice of every global batch (``rank_shard``), the classic
    ``forward / nll_loss / zero_grad / backward / step``, and the learning-rate warm-up.

    A single device is rank 0 of 1. The backends differ only in what they wrap around the model
    (DDP) or the optimizer (Horovod).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 geometry, seed: int, rank: int = 0) -> None:
        self.model, self.optimizer, self.x, self.y = model, optimizer, x, y
        self.geometry, self.seed, self.rank = geometry, seed, rank
        self.b = geometry.per_device_batch
        self.shard: torch.Tensor | None = None
        self.cursor = 0
        self.step = 0
        self.last_loss: torch.Tensor | None = None

    def begin_epoch(self, epoch: int) -> None:
        from scaling.data import epoch_permutation, rank_shard

        perm = epoch_permutation(self.x.shape[0], self.seed, epoch)
        shard = rank_shard(perm, self.geometry.global_batch, self.rank, self.b)
        self.shard = torch.from_numpy(shard).to(self.x.device)
        self.cursor = 0
        self.model.train()

    def run(self, n: int) -> None:
        b, g = self.b, self.geometry
        for _ in range(n):
            if self.step < g.lr_warmup_steps:
                for group in self.optimizer.param_groups:
                    group["lr"] = g.lr_at(self.step)
            self.step += 1
            idx = self.shard[self.cursor:self.cursor + b]
            self.cursor += b
            loss = torch.nn.functional.nll_loss(self.model(self.x.index_select(0, idx)), self.y.index_select(0, idx))
            self.optimizer.zero_grad()  # set_to_none, torch's default (Horovod's wrapper takes no argument)
            loss.backward()
            self.optimizer.step()
        self.last_loss = loss


@torch.no_grad()
def sharded_evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, world: int,
                     all_reduce_sum) -> tuple[float, float]:
    """Each rank evaluates its contiguous slice of the test set; ``all_reduce_sum`` adds the
    (loss, correct) sums over ranks (``torch.distributed`` or Horovod)."""
    n = x.shape[0]
    lo, hi = n * rank // world, n * (rank + 1) // world
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)
    for start in range(lo, hi, 1000):
        out = model(x[start:min(start + 1000, hi)])
        target = y[start:min(start + 1000, hi)]
        sums[0] += torch.nn.functional.nll_loss(out, target, reduction="sum").double()
        sums[1] += (out.argmax(1) == target).sum()
    model.train(was_training)
    sums = all_reduce_sum(sums)
    return float(sums[0]) / n, float(sums[1]) / n


class OnTorchDevice:
    """What every torch backend answers the same way about its device: ``self.device`` and
    ``self.model`` (the bare model; DDP backends point ``digest_model`` at the wrapped module)."""

    device: torch.device
    model: torch.nn.Module
    #: each rank evaluates 1/world of the test set (``sharded_evaluate``; one device: all of it)
    evaluation = "shard"

    @property
    def digest_model(self) -> torch.nn.Module:
        return self.model

    def fast_mode(self) -> dict:
        """Evidence of ``torch.compile``: the graphs TorchDynamo captured and compiled in this process."""
        from torch._dynamo.utils import counters

        stats = counters.get("stats", {})
        return {"compiled_graphs": int(stats.get("unique_graphs", 0)),
                "compiled_frames": int(stats.get("calls_captured", 0))}

    def sync(self) -> None:
        sync(self.device)

    def device_memory_peak(self) -> int | None:
        return device_memory_peak(self.device)

    def param_digests(self) -> list[str]:
        import hashlib

        h = hashlib.sha256()
        for p in self.digest_model.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return [h.hexdigest()]
