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
from typing import Callable

import torch
import torch.nn.functional as F

from scaling import settings
from scaling.backends import RunContext, rank_seed, warm_up
from scaling.backends import torch_common as tc
from scaling.sharding import epoch_permutation, rank_shard
from scaling.protocol import Measurement

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
        warm_up(self.geometry, self.global_step, lambda lr: tc.set_lr(self.optimizers().optimizer, lr))
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

    def on_after_backward(self, trainer, pl_module):
        if self.backend.after_backward is not None:
            self.backend.after_backward()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.meter.step_end(1, loss=lambda: float(tc.dist_sum(outputs["loss"].detach().clone())) / trainer.world_size)

    def on_train_epoch_end(self, trainer, pl_module):
        self.meter.epoch_end(trainer.current_epoch, self.backend.evaluate)


class LightningDDP(tc.OnTorchDevice):
    def __init__(self, ctx: RunContext, fast: str = "none", process_group: str = "auto") -> None:
        threads = ctx.config.get("threads")
        self.place(ctx, fast)
        if threads:
            # Lightning's launcher sets torch's threads to cores / local processes unless OMP_NUM_THREADS
            # is set (2 at N=1, 1 at N=2 on 2 cores): keep the config's threads per rank, as every backend
            os.environ["OMP_NUM_THREADS"] = str(int(threads))
        self.process_group = process_group
        pl.seed_everything(ctx.seed, verbose=False)
        self.load_resident()
        self.model = self.build_model()

    #: called when Lightning's backward returns (``GradientArrival.left``; None: not marked)
    after_backward = None

    def mark_collective(self, reached: Callable[[], None], left: Callable[[], None]) -> bool:
        """Rank-clock marks around the all-reduce of the DDP Lightning builds, as ``torch_ddp``'s:
        reached at the last gradient's accumulation (the module's parameters are the ones DDP wraps),
        left at the ``on_after_backward`` callback hook, called when backward has returned."""
        arrival = tc.GradientArrival.on(self.device, self.world, self.model.parameters(), reached, left)
        if arrival is None:
            return False
        self.after_backward = arrival.left
        return True

    def evaluate(self) -> tuple[float, float]:
        return tc.sharded_evaluate(self.model, self.test_x, self.test_y, self.rank, self.world, tc.dist_sum)

    def settings_in_force(self) -> dict:
        """What the DistributedDataParallel Lightning built reports (after fit), else what was passed."""
        ddp = getattr(self, "ddp_model", None)
        if ddp is None:
            return settings.in_force(self.ctx.config)
        return tc.ddp_in_force(ddp, getattr(self, "comm_hook", None))

    def environment(self) -> dict:
        env = tc.environment(self.device)
        env["frameworks"]["pytorch_lightning"] = pl.__version__
        return env

    def fit(self, meter: Measurement, epochs: int, max_steps_per_epoch: int | None) -> None:
        cfg, g = self.ctx.config, self.geometry
        loader = torch.utils.data.DataLoader(
            DeviceBatches(self.x, self.y), batch_size=None,
            sampler=RankBatchSampler(self.x.shape[0], self.ctx.seed, g.global_batch, self.rank, g.per_device_batch,
                                     self.device, max_steps_per_epoch))
        nodes = int(cfg["cluster"].get("nodes", 1))
        kwargs, self.comm_hook = tc.ddp_options(settings.in_force(cfg), self.world)
        if self.comm_hook is not None:
            kwargs["ddp_comm_hook"] = self.comm_hook
        trainer = pl.Trainer(
            accelerator="gpu" if self.device.type == "cuda" else "cpu",
            devices=self.world // nodes,
            num_nodes=nodes,
            strategy=DDPStrategy(process_group_backend=tc.process_group_backend(self.device, self.process_group),
                                 **kwargs),
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            callbacks=[ProtocolCallback(self, meter)],
        )
        torch.manual_seed(rank_seed(self.ctx.seed, self.rank))
        trainer.fit(Module(self.model, g), train_dataloaders=loader)
        self.rank = trainer.global_rank
