"""The reference loops: the minimal hand-written data-parallel step, with no DDP and no
DistributedOptimizer: forward, backward, one all-reduce of every gradient as one flat buffer,
average, step; over torch.distributed (``torch_reference``, here) and over Horovod
(``horovod_reference``, in its own module); for TensorFlow, ``horovod_tf_reference`` and
``tf_reference`` (their own modules).

Each is the practical floor for the backends over the same library (``torch_ddp`` and
``lightning_ddp``; ``horovod_torch``; ``horovod_tf``; ``tf_multiworker``), with the same data
layout and protocol: what a backend costs beyond it is that backend's overhead.
In the PyTorch loops the gradients live as views of one flat buffer, so the all-reduce needs no
copy in or out, and on CPU the all-reduce is marked for the rank clock (``scaling.rank_clock``):
when each rank reached it and left it, so the record can tell waiting for the slowest rank from
the transfer.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from scaling.backends.torch_ddp import TorchDDP


class FlatAllReduce:
    """An optimizer whose ``step`` first sums every gradient over the ranks in one collective call
    (``all_reduce_sum`` on one flat buffer the gradients are views of) and averages it."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], world: int,
                 all_reduce_sum: Callable[[torch.Tensor], None]) -> None:
        self.optimizer, self.params, self.world, self.all_reduce_sum = optimizer, params, world, all_reduce_sum
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.checked = False
        #: (reached, left): called around the all-reduce so the rank clock can time waiting for peers
        self.marks: tuple[Callable[[], None], Callable[[], None]] | None = None
        offset = 0
        for p in params:
            p.grad = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def __getattr__(self, name: str):
        # everything but zero_grad and step is the wrapped optimizer's (param_groups, state_dict...)
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def zero_grad(self) -> None:
        self.flat.zero_()  # keep the views: backward accumulates into the flat buffer

    def step(self) -> None:
        if not self.checked:  # once: autograd accumulated into the views, not into new tensors
            lo, hi = self.flat.data_ptr(), self.flat.data_ptr() + self.flat.numel() * self.flat.element_size()
            if not all(p.grad is not None and lo <= p.grad.data_ptr() < hi for p in self.params):
                raise RuntimeError("a gradient left the flat buffer; the all-reduce would miss it")
            self.checked = True
        if self.marks:
            self.marks[0]()
            self.all_reduce_sum(self.flat)
            self.marks[1]()
        else:
            self.all_reduce_sum(self.flat)
        self.flat.div_(self.world)
        self.optimizer.step()


def mark_flat_all_reduce(optimizer: FlatAllReduce, device: torch.device, reached: Callable[[], None],
                         left: Callable[[], None]) -> bool:
    """Have ``optimizer`` call ``reached``/``left`` around its all-reduce, on CPU only: there the call
    returns when the collective is done, so host time is the collective's. On CUDA the host only
    queues it and never sees when the device reaches it: no marks (returns False)."""
    if device.type != "cpu":
        return False
    optimizer.marks = (reached, left)
    return True


class TorchReference(TorchDDP):
    def parallelize(self, model: torch.nn.Module, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        for p in model.parameters():  # rank 0's initial weights everywhere, as DDP does
            dist.broadcast(p.data, src=0)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, FlatAllReduce(torch.optim.Adam(params, lr=lr), params, self.world, dist.all_reduce)

    def mark_collective(self, reached: Callable[[], None], left: Callable[[], None]) -> bool:
        return mark_flat_all_reduce(self.optimizer, self.device, reached, left)

    @property
    def digest_model(self) -> torch.nn.Module:
        return self.model  # not wrapped

    def settings_in_force(self) -> dict:
        return {"all_reduce": "one flat buffer per step, gradients as its views"}

