"""PyTorch DistributedDataParallel: one process per device, NCCL on GPUs, gloo on CPU.

Started by torchrun locally (and by srun under Slurm); rank and world come from the environment.
Each rank holds the (small) dataset on its device and gathers its own slice of every global batch
(``scaling.sharding.rank_shard``), so ranks see disjoint samples and no input pipeline runs between
steps: the expert's loop for a tiny model, with DDP's bucketed all-reduce overlapping backward.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling import settings
from scaling.backends import RunContext
from scaling.backends import torch_common as tc
from scaling.protocol import Measurement, drive
from scaling.workloads import torch_models


def process_group_backend(device: torch.device, requested: str | None) -> str:
    """nccl on GPUs, gloo on CPU; ``gloo`` can be forced on GPUs (several ranks sharing one GPU,
    which NCCL refuses as "Duplicate GPU detected")."""
    if requested and requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(device: torch.device, rank: int, world: int, requested: str | None = None) -> str:
    """Join the job's process group (env:// from torchrun, or from srun's variables)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = process_group_backend(device, requested)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=5),
                                device_id=device if backend == "nccl" else None)
    return dist.get_backend()


def _dist_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


class TorchDDP(tc.OnTorchDevice):
    devices = 1  # per process
    steps_per_call = 1

    def __init__(self, ctx: RunContext) -> None:
        cfg = ctx.config
        tc.configure_threads(cfg.get("threads"))
        self.ctx = ctx
        self.geometry = g = ctx.geometry
        self.device = tc.resolve_device(cfg["device"], ctx.local_rank)
        self.fast = cfg["backend"].get("fast") or "none"
        tc.check_fast_mode(self.fast, self.device)
        self.rank, self.world = ctx.rank, ctx.world_size
        if self.world != g.devices:
            raise RuntimeError(f"torch_ddp: {self.world} processes for {g.devices} devices; one process per device expected")
        if self.fast == "graph":
            # CUDA's notes on capturing DDP: NCCL's async error handling off before the group exists
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = os.environ["NCCL_ASYNC_ERROR_HANDLING"] = "0"
        self.process_group_backend = init_process_group(self.device, self.rank, self.world,
                                                        cfg["backend"].get("process_group"))
        if self.fast == "graph" and self.process_group_backend != "nccl":
            raise RuntimeError(f"backend.fast=graph captures DDP's all-reduce in a CUDA graph, which needs NCCL; "
                               f"this run uses {self.process_group_backend}. Fix: one rank per GPU with "
                               f"backend.process_group=auto|nccl, or backend.fast=none")
        torch.manual_seed(cfg["seed"])  # the same initial weights everywhere (DDP also broadcasts rank 0's)
        ds = ctx.dataset
        self.x, self.y = tc.to_device_tensors(ds.train_x, ds.train_y, self.device)
        self.test_x, self.test_y = tc.to_device_tensors(ds.test_x, ds.test_y, self.device)
        self.global_batch, self.per_device_batch = g.global_batch, g.per_device_batch
        self.steps_per_epoch = self.x.shape[0] // g.global_batch
        model = torch_models.build(cfg["workload"], ds.num_classes).to(self.device)
        if self.fast == "compile":
            model = torch.compile(model)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model, self.optimizer = self.parallelize(model, g.lr_at(0))
        torch.manual_seed(cfg["seed"] * 1000 + self.rank)  # dropout masks differ per rank
        # a captured DDP step needs 11 eager DDP iterations first (CUDA graphs notes, "Usage with DDP")
        self.steps = tc.fast_steps(self.fast, self.model, self.optimizer, self.x, self.y, g, cfg["seed"], self.rank,
                                   eager_steps=11)

    def parallelize(self, model: torch.nn.Module, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """DDP around the model (with the settings in force), Adam over its parameters."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        kwargs = settings.in_force(self.ctx.config)
        if self.fast != "graph":
            ddp = DDP(model, device_ids=device_ids, **kwargs)
            return ddp, torch.optim.Adam(ddp.parameters(), lr=lr)
        # for a whole-step capture DDP is built on a side stream and its graph declared static
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            ddp = DDP(model, device_ids=device_ids, **{**kwargs, "static_graph": True})
        torch.cuda.current_stream(self.device).wait_stream(side)
        return ddp, tc.make_adam(ddp.parameters(), self.geometry, self.device, graph=True)

    def settings_in_force(self) -> dict:
        """What DDP reports it runs with (bucket cap in bytes, views, static graph)."""
        m = self.model
        return {"bucket_cap_mb": getattr(m, "bucket_bytes_cap", 0) / 2 ** 20,
                "gradient_as_bucket_view": bool(getattr(m, "gradient_as_bucket_view", False)),
                "static_graph": bool(getattr(m, "static_graph", False))}

    def begin_epoch(self, epoch: int) -> None:
        self.steps.begin_epoch(epoch)

    def train_steps(self, n: int) -> None:
        self.steps.run(n)

    def loss(self) -> float:
        """The global batch's mean loss (an all-reduce, made only at logging steps)."""
        value = self.steps.last_loss.detach().clone()
        dist.all_reduce(value)
        return float(value.item()) / self.world

    def evaluate(self) -> tuple[float, float]:
        return tc.sharded_evaluate(self.digest_model, self.test_x, self.test_y, self.rank, self.world, _dist_sum)

    @property
    def digest_model(self) -> torch.nn.Module:
        return self.model.module

    def environment(self) -> dict:
        env = tc.environment(self.device)
        env["process_group"] = self.process_group_backend
        return env

    def train(self, meter: Measurement) -> None:
        try:
            drive(self, meter, int(self.ctx.train["epochs"]), self.ctx.train.get("max_steps_per_epoch"))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
