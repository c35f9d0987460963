"""Horovod with PyTorch: ``hvd.DistributedOptimizer`` all-reduces gradients over gloo (NCCL on
GPU builds); one process per device, started by horovodrun locally and by srun under Slurm.

Same data layout as the other backends: each rank holds the dataset on its device and gathers its
slice of every global batch. Parameters and Adam state are broadcast from rank 0 before step 1.
"""
from __future__ import annotations

from typing import Callable

import horovod.torch as hvd
import torch

from scaling import settings
from scaling.backends import RunContext, check_one_per_device, horovod_environment, rank_seed
from scaling.backends import torch_common as tc


class HorovodTorch(tc.DrivenSteps):
    def __init__(self, ctx: RunContext, fast: str = "none") -> None:
        settings.apply_environment(ctx.config)  # HOROVOD_* knobs are read at init
        hvd.init()
        self.place(ctx, fast, device_index=hvd.local_rank())
        self.rank, self.world = hvd.rank(), hvd.size()
        check_one_per_device(ctx.config["backend"]["name"], self.world, ctx.geometry.devices)
        torch.manual_seed(ctx.seed)
        self.load_resident()
        self.model = self.build_model()
        optimizer = torch.optim.Adam(self.model.parameters(), lr=ctx.geometry.lr_at(0))
        self.optimizer = self.distributed_optimizer(optimizer)
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(self.optimizer, root_rank=0)
        torch.manual_seed(rank_seed(ctx.seed, self.rank))
        self.steps = tc.ShardedSteps(self.model, self.optimizer, self.x, self.y, ctx.geometry, ctx.seed, self.rank)

    def distributed_optimizer(self, optimizer: torch.optim.Optimizer):
        """Horovod's DistributedOptimizer: an all-reduce per gradient as backward produces it."""
        return hvd.DistributedOptimizer(optimizer, named_parameters=self.model.named_parameters())

    def mark_collective(self, reached: Callable[[], None], left: Callable[[], None]) -> bool:
        """Rank-clock marks around Horovod's all-reduces (``torch_common.GradientArrival``): reached at
        the last gradient's accumulation (Horovod's hook enqueues its all-reduce right after), left
        when ``optimizer.synchronize()``, which ``step`` calls first, has waited for all of them."""
        arrival = tc.GradientArrival.on(self.device, self.world, self.model.parameters(), reached, left)
        if arrival is None:
            return False
        synchronize = self.optimizer.synchronize

        def synchronized() -> None:
            synchronize()
            arrival.left()

        self.optimizer.synchronize = synchronized  # step() calls self.synchronize()
        return True

    def loss(self) -> float:
        return float(hvd.allreduce(self.steps.last_loss.detach(), op=hvd.Average, name="train_loss"))

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return hvd.allreduce(t.cpu(), op=hvd.Sum, name="eval_sums")

    def settings_in_force(self) -> dict:
        return settings.horovod_in_force()

    def environment(self) -> dict:
        return horovod_environment(hvd, tc.environment(self.device), self.world)

    def close(self) -> None:
        hvd.shutdown()
