"""Horovod with PyTorch: ``hvd.DistributedOptimizer`` all-reduces gradients over gloo (NCCL on
GPU builds); one process per device, started by horovodrun locally and by srun under Slurm.

Same data layout as the other backends: each rank holds the dataset on its device and gathers its
slice of every global batch. Parameters and Adam state are broadcast from rank 0 before step 1.
"""
from __future__ import annotations

import horovod.torch as hvd
import torch

from scaling import settings
from scaling.backends import RunContext
from scaling.backends import torch_common as tc
from scaling.protocol import Measurement, drive
from scaling.workloads import torch_models


class HorovodTorch(tc.OnTorchDevice):
    devices = 1  # per process
    steps_per_call = 1

    def __init__(self, ctx: RunContext) -> None:
        cfg = ctx.config
        settings.apply_environment(cfg)  # HOROVOD_* knobs are read at init
        hvd.init()
        tc.configure_threads(cfg.get("threads"))
        self.ctx = ctx
        self.geometry = g = ctx.geometry
        self.rank, self.world = hvd.rank(), hvd.size()
        if self.world != g.devices:
            raise RuntimeError(f"horovod_torch: {self.world} processes for {g.devices} devices; one process per device expected")
        self.device = tc.resolve_device(cfg["device"], hvd.local_rank())
        torch.manual_seed(cfg["seed"])
        ds = ctx.dataset
        self.x, self.y = tc.to_device_tensors(ds.train_x, ds.train_y, self.device)
        self.test_x, self.test_y = tc.to_device_tensors(ds.test_x, ds.test_y, self.device)
        self.global_batch, self.per_device_batch = g.global_batch, g.per_device_batch
        self.steps_per_epoch = self.x.shape[0] // g.global_batch
        self.model = torch_models.build(cfg["workload"], ds.num_classes).to(self.device)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=g.lr_at(0))
        self.optimizer = self.distributed_optimizer(optimizer)
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(self.optimizer, root_rank=0)
        torch.manual_seed(cfg["seed"] * 1000 + self.rank)  # dropout masks differ per rank
        self.steps = tc.ShardedSteps(self.model, self.optimizer, self.x, self.y, g, cfg["seed"], self.rank)

    def distributed_optimizer(self, optimizer: torch.optim.Optimizer):
        """Horovod's DistributedOptimizer: an all-reduce per gradient as backward produces it."""
        return hvd.DistributedOptimizer(optimizer, named_parameters=self.model.named_parameters())

    def begin_epoch(self, epoch: int) -> None:
        self.steps.begin_epoch(epoch)

    def train_steps(self, n: int) -> None:
        self.steps.run(n)

    def loss(self) -> float:
        return float(hvd.allreduce(self.steps.last_loss.detach(), op=hvd.Average, name="train_loss"))

    def evaluate(self) -> tuple[float, float]:
        return tc.sharded_evaluate(self.model, self.test_x, self.test_y, self.rank, self.world,
                                   lambda t: hvd.allreduce(t.cpu(), op=hvd.Sum, name="eval_sums"))

    def settings_in_force(self) -> dict:
        return settings.horovod_in_force()

    def environment(self) -> dict:
        import horovod

        env = tc.environment(self.device)
        env["frameworks"]["horovod"] = horovod.__version__
        env["horovod"] = {"gloo": hvd.gloo_built(), "nccl": bool(hvd.nccl_built()), "size": self.world}
        return env

    def train(self, meter: Measurement) -> None:
        try:
            drive(self, meter, int(self.ctx.train["epochs"]), self.ctx.train.get("max_steps_per_epoch"))
        finally:
            hvd.shutdown()
