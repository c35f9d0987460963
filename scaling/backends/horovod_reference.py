"""The reference loop over Horovod (``horovod_reference``): backward, one flat ``hvd.allreduce``
of the whole gradient, average, step; no DistributedOptimizer. The practical floor for
``horovod_torch`` (see ``scaling.backends.torch_reference``)."""
from __future__ import annotations

from typing import Callable

import horovod.torch as hvd
import torch

from scaling import settings
from scaling.backends.horovod_torch import HorovodTorch
from scaling.backends.torch_reference import FlatAllReduce, mark_flat_all_reduce


class HorovodReference(HorovodTorch):
    def distributed_optimizer(self, optimizer: torch.optim.Optimizer):
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)  # before the gradients become views
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        return FlatAllReduce(optimizer, params, self.world,
                             lambda flat: hvd.allreduce_(flat, op=hvd.Sum, name="flat_gradient"))

    def mark_collective(self, reached: Callable[[], None], left: Callable[[], None]) -> bool:
        return mark_flat_all_reduce(self.optimizer, self.device, reached, left)

    def settings_in_force(self) -> dict:
        return {"all_reduce": "one flat buffer per step, gradients as its views", **settings.horovod_in_force()}
