"""PyTorch DistributedDataParallel: one process per device, NCCL on GPUs, gloo on CPU.

Started by torchrun locally (and by srun under Slurm); rank and world come from the environment.
Each rank holds the (small) dataset on its device and gathers its own slice of every global batch
(``scaling.sharding.rank_shard``), so ranks see disjoint samples and no input pipeline runs between
steps: the expert's loop for a tiny model, with DDP's bucketed all-reduce overlapping backward.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling import settings
from scaling.backends import RunContext, check_one_per_device, rank_seed
from scaling.backends import torch_common as tc
from scaling.backends.torch_common import init_process_group  # noqa: F401  (scaling.comm joins the same way)


class TorchDDP(tc.DrivenSteps):
    def __init__(self, ctx: RunContext, fast: str = "none", process_group: str = "auto") -> None:
        self.place(ctx, fast)
        check_one_per_device(ctx.config["backend"]["name"], self.world, ctx.geometry.devices)
        if self.fast == "graph":
            # CUDA's notes on capturing DDP: NCCL's async error handling off before the group exists
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = os.environ["NCCL_ASYNC_ERROR_HANDLING"] = "0"
        self.process_group_backend = tc.init_process_group(self.device, self.rank, self.world, process_group)
        if self.fast == "graph" and self.process_group_backend != "nccl":
            raise RuntimeError(f"backend.fast=graph captures DDP's all-reduce in a CUDA graph, which needs NCCL; "
                               f"this run uses {self.process_group_backend}. Fix: one rank per GPU with "
                               f"backend.process_group=auto|nccl, or backend.fast=none")
        torch.manual_seed(ctx.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
        self.load_resident()
        model = self.build_model()
        if self.fast == "compile":
            model = torch.compile(model)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model, self.optimizer = self.parallelize(model, ctx.geometry.lr_at(0))
        torch.manual_seed(rank_seed(ctx.seed, self.rank))
        # a captured DDP step needs 11 eager DDP iterations first (CUDA graphs notes, "Usage with DDP")
        self.steps = tc.fast_steps(self.fast, self.model, self.optimizer, self.x, self.y, ctx.geometry, ctx.seed,
                                   self.rank, eager_steps=11)

    def parallelize(self, model: torch.nn.Module, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """DDP around the model (with the settings in force), Adam over its parameters."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        kwargs, self.comm_hook = tc.ddp_options(settings.in_force(self.ctx.config), self.world)
        if self.fast != "graph":
            ddp = DDP(model, device_ids=device_ids, **kwargs)
            if self.comm_hook is not None:
                ddp.register_comm_hook(None, self.comm_hook)
            return ddp, torch.optim.Adam(ddp.parameters(), lr=lr)
        self.comm_hook = None  # the captured step keeps DDP's own collective
        # for a whole-step capture DDP is built on a side stream and its graph declared static
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            ddp = DDP(model, device_ids=device_ids, **{**kwargs, "static_graph": True})
        torch.cuda.current_stream(self.device).wait_stream(side)
        return ddp, tc.make_adam(ddp.parameters(), self.geometry, self.device, graph=True)

    def mark_collective(self, reached: Callable[[], None], left: Callable[[], None]) -> bool:
        """Rank-clock marks around DDP's all-reduce (``torch_common.GradientArrival``): reached at the
        last gradient's accumulation, left when ``backward`` returns (DDP waits for its buckets'
        all-reduce at the end of backward)."""
        arrival = tc.GradientArrival.on(self.device, self.world, self.model.parameters(), reached, left)
        if arrival is None:
            return False
        self.steps.after_backward = arrival.left
        return True

    def settings_in_force(self) -> dict:
        """What DDP reports it runs with (bucket cap in bytes, views, static graph, hook)."""
        return tc.ddp_in_force(self.model, getattr(self, "comm_hook", None))

    @property
    def digest_model(self) -> torch.nn.Module:
        return self.model.module

    def environment(self) -> dict:
        env = tc.environment(self.device)
        env["process_group"] = self.process_group_backend
        return env

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
