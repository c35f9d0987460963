"""PyTorch Lightning with ``strategy="ddp"``: the Trainer owns the loop, the protocol listens
through a Callback.

One process per device, started by torchrun locally and by srun under Slurm (Lightning detects
both environments). The data stays on the device: a sampler hands out this rank's index batches
(``scaling.sharding.rank_shard``, re-drawn in ``set_epoch``, which Lightning calls every epoch) and
the dataset gathers them, so Lightning's loop runs as it would for any DataLoader.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from scaling import settings
from scaling.backends import RunContext
from scaling.backends import torch_common as tc
from scaling.backends.torch_ddp import _dist_sum, process_group_backend
from scaling.sharding import epoch_permutation, rank_shard
from scaling.protocol import Measurement
from scaling.workloads import torch_models

for _name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.strategies import DDPStrategy  # noqa: E402


class DeviceBatches(torch.utils.data.Dataset):
    """Indexed by a tensor of sample indices: returns that batch, gathered on the device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x.index_select(0, idx), self.y.index_select(0, idx)


class RankBatchSampler(torch.utils.data.Sampler):
    """This rank's index batches for the current epoch."""

    def __init__(self, n: int, seed: int, global_batch: int, rank: int, per_device_batch: int,
                 device: torch.device, limit: int | None) -> None:
        self.n, self.seed, self.global_batch, self.rank, self.b = n, seed, global_batch, rank, per_device_batch
        self.device, self.steps = device, n // global_batch
        if limit:
            self.steps = min(self.steps, limit)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        shard = rank_shard(epoch_permutation(self.n, self.seed, epoch), self.global_batch, self.rank, self.b)
        self.shard = torch.from_numpy(shard).to(self.device)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for s in range(self.steps):
            yield self.shard[s * self.b:(s + 1) * self.b]


class Module(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, geometry) -> None:
        super().__init__()
        self.model, self.geometry = model, geometry

    def training_step(self, batch, batch_idx):
        step = self.global_step
        if step < self.geometry.lr_warmup_steps:
            for group in self.optimizers().optimizer.param_groups:
                group["lr"] = self.geometry.lr_at(step)
        x, y = batch
        return F.nll_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.geometry.lr_at(0))


class ProtocolCallback(pl.Callback):
    def __init__(self, backend: "LightningDDP", meter: Measurement) -> None:
        self.backend, self.meter = backend, meter

    def on_train_start(self, trainer, pl_module):
        model = trainer.strategy.model
        self.backend.ddp_model = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None

    def on_train_epoch_start(self, trainer, pl_module):
        self.meter.epoch_begin(trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.meter.step_begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        before = self.meter.steps_done
        self.meter.step_end(1)
        if self.meter.wants_loss(before):
            value = outputs["loss"].detach().clone()
            torch.distributed.all_reduce(value)
            self.meter.record_loss(float(value) / trainer.world_size)

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch
        self.meter.epoch_end(epoch)
        t0 = self.meter.now()
        loss, acc = self.backend.evaluate()
        self.meter.evaluated(epoch, loss, acc, self.meter.now() - t0)


class LightningDDP(tc.OnTorchDevice):
    devices = 1  # per process

    def __init__(self, ctx: RunContext) -> None:
        cfg = ctx.config
        tc.configure_threads(cfg.get("threads"))
        if cfg.get("threads"):
            # Lightning's launcher sets torch's threads to cores / local processes unless OMP_NUM_THREADS
            # is set (2 at N=1, 1 at N=2 on 2 cores): keep the config's threads per rank, as every backend
            os.environ["OMP_NUM_THREADS"] = str(int(cfg["threads"]))
        self.ctx = ctx
        self.geometry = g = ctx.geometry
        self.device = tc.resolve_device(cfg["device"], ctx.local_rank)
        self.rank, self.world = ctx.rank, ctx.world_size
        pl.seed_everything(cfg["seed"], verbose=False)
        ds = ctx.dataset
        self.x, self.y = tc.to_device_tensors(ds.train_x, ds.train_y, self.device)
        self.test_x, self.test_y = tc.to_device_tensors(ds.test_x, ds.test_y, self.device)
        self.global_batch, self.per_device_batch = g.global_batch, g.per_device_batch
        self.steps_per_epoch = self.x.shape[0] // g.global_batch
        self.model = torch_models.build(cfg["workload"], ds.num_classes)
        limit = cfg["train"].get("max_steps_per_epoch")
        self.loader = torch.utils.data.DataLoader(
            DeviceBatches(self.x, self.y), batch_size=None,
            sampler=RankBatchSampler(self.x.shape[0], cfg["seed"], g.global_batch, self.rank, g.per_device_batch,
                                     self.device, limit))
        self.limit = limit

    def evaluate(self) -> tuple[float, float]:
        return tc.sharded_evaluate(self.model, self.test_x, self.test_y, self.rank, self.world, _dist_sum)

    def settings_in_force(self) -> dict:
        """What the DistributedDataParallel Lightning built reports (after fit), else what was passed."""
        ddp = getattr(self, "ddp_model", None)
        if ddp is None:
            return settings.in_force(self.ctx.config)
        return {"bucket_cap_mb": ddp.bucket_bytes_cap / 2 ** 20, "gradient_as_bucket_view": bool(ddp.gradient_as_bucket_view),
                "static_graph": bool(ddp.static_graph)}

    def environment(self) -> dict:
        env = tc.environment(self.device)
        env["frameworks"]["pytorch_lightning"] = pl.__version__
        return env

    def train(self, meter: Measurement) -> None:
        cfg = self.ctx.config
        nodes = int(cfg["cluster"].get("nodes", 1))
        trainer = pl.Trainer(
            accelerator="gpu" if self.device.type == "cuda" else "cpu",
            devices=self.world // nodes,
            num_nodes=nodes,
            strategy=DDPStrategy(process_group_backend=process_group_backend(self.device, cfg["backend"].get("process_group")),
                                 **settings.in_force(cfg)),
            max_epochs=int(cfg["train"]["epochs"]),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            callbacks=[ProtocolCallback(self, meter)],
        )
        torch.manual_seed(cfg["seed"] * 1000 + self.rank)  # dropout masks differ per rank
        trainer.fit(Module(self.model, self.geometry), train_dataloaders=self.loader)
        self.rank = trainer.global_rank
