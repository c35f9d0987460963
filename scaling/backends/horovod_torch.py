"""Horovod with PyTorch: ``hvd.DistributedOptimizer`` all-reduces gradients over gloo (NCCL on
GPU builds); one process per device, started by horovodrun locally and by srun under Slurm.

Same data layout as the other backends: each rank holds the dataset on its device and gathers its
slice of every global batch. Parameters and Adam state are broadcast from rank 0 before step 1.
"""
from __future__ import annotations

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from scaling.backends import RunContext
from scaling.backends import torch_common as tc
from scaling.backends.torch_ddp import param_digest
from scaling.data import epoch_permutation, rank_shard
from scaling.protocol import Measurement, drive
from scaling.workloads import torch_models


class HorovodTorch:
    devices = 1  # per process
    steps_per_call = 1

    def __init__(self, ctx: RunContext) -> None:
        cfg = ctx.config
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
        self.model = torch_models.build(cfg["workload"]["name"], ds.num_classes).to(self.device)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=g.lr_at(0))
        self.optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=self.model.named_parameters())
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(self.optimizer, root_rank=0)
        torch.manual_seed(cfg["seed"] * 1000 + self.rank)  # dropout masks differ per rank
        self._shard: torch.Tensor | None = None
        self._cursor = 0
        self._step = 0

    def begin_epoch(self, epoch: int) -> None:
        perm = epoch_permutation(self.x.shape[0], self.ctx.config["seed"], epoch)
        self._shard = torch.from_numpy(rank_shard(perm, self.global_batch, self.rank, self.per_device_batch)).to(self.device)
        self._cursor = 0
        self.model.train()

    def train_steps(self, n: int) -> None:
        b = self.per_device_batch
        for _ in range(n):
            if self._step < self.geometry.lr_warmup_steps:
                self.optimizer.param_groups[0]["lr"] = self.geometry.lr_at(self._step)
            self._step += 1
            idx = self._shard[self._cursor:self._cursor + b]
            self._cursor += b
            loss = F.nll_loss(self.model(self.x.index_select(0, idx)), self.y.index_select(0, idx))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self._last_loss = loss

    def loss(self) -> float:
        return float(hvd.allreduce(self._last_loss.detach(), op=hvd.Average, name="train_loss"))

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        n = self.test_x.shape[0]
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        for start in range(lo, hi, 1000):
            out = self.model(self.test_x[start:min(start + 1000, hi)])
            target = self.test_y[start:min(start + 1000, hi)]
            sums[0] += F.nll_loss(out, target, reduction="sum").double().cpu()
            sums[1] += (out.argmax(1) == target).sum().cpu()
        self.model.train()
        sums = hvd.allreduce(sums, op=hvd.Sum, name="eval_sums")
        return float(sums[0]) / n, float(sums[1]) / n

    def sync(self) -> None:
        tc.sync(self.device)

    def device_memory_peak(self) -> int | None:
        return tc.device_memory_peak(self.device)

    def param_digests(self) -> list[str]:
        return [param_digest(self.model)]

    def environment(self) -> dict:
        import horovod

        env = tc.environment(self.device)
        env["frameworks"]["horovod"] = horovod.__version__
        env["horovod"] = {"gloo": hvd.gloo_built(), "nccl": bool(hvd.nccl_built()), "size": hvd.size()}
        return env

    def train(self, meter: Measurement) -> None:
        try:
            drive(self, meter, int(self.ctx.train["epochs"]), self.ctx.train.get("max_steps_per_epoch"))
        finally:
            hvd.shutdown()
