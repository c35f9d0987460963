"""PyTorch pieces the torch-based backends share: threads, device, device-resident data, the
step loop, the process group, evaluation."""
from __future__ import annotations

import os
from datetime import timedelta
from functools import partial
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from scaling.backends import RunContext, warm_up


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


def check_fast_mode(fast: str, device: torch.device) -> None:
    """Refuse, before any data moves, a fast mode this device cannot run (never a silent fallback)."""
    if fast == "graph" and device.type != "cuda":
        raise RuntimeError(f"backend.fast=graph captures the step as a CUDA graph and needs a CUDA device; "
                           f"this run is on {device}. Fix: device=cuda on a GPU node, or backend.fast=none|compile")


def to_device_tensors(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> float32 in [0, 1] (the same scaling the TF backends use), labels -> int64."""
    # np.array copies: the cache's arrays are read-only memory maps, which torch will not wrap
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device=device, dtype=torch.float32).div_(255.0)
    y = torch.from_numpy(np.array(labels)).to(device=device, dtype=torch.int64)
    return x, y


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
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
        }
    return env


class GradientArrival:
    """Marks for the rank clock (``scaling.rank_clock``) where a framework runs the gradient
    all-reduce itself (DDP's buckets, Horovod's DistributedOptimizer, Lightning's DDP): **reached**
    when this rank's backward has accumulated its last gradient, the moment it hands the step's last
    collective to the framework (DDP launches its last bucket, Horovod enqueues its last all-reduce,
    in their own hooks on the same accumulation, which run right after), and **left** when the
    framework says the collective is done (``left()``, called by the backend: DDP's ``backward``
    returning, Horovod's ``synchronize``).

    Nothing in the framework's path changes: one ``register_post_accumulate_grad_hook`` per
    parameter for the first backward, to learn which parameter autograd accumulates last (its order
    is fixed for a fixed graph), then on that one only: one Python call a step. Only on CPU, where the
    collective is done when the host call returns, and with more than one rank (:meth:`on`)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], reached: Callable[[], None],
                 left: Callable[[], None]) -> None:
        self._reached, self._left = reached, left
        self.last: int | None = None
        self._handles = [p.register_post_accumulate_grad_hook(partial(self._accumulated, i))
                         for i, p in enumerate(q for q in params if q.requires_grad)]

    @classmethod
    def on(cls, device: torch.device, world: int, params: Iterable[torch.nn.Parameter], reached: Callable[[], None],
           left: Callable[[], None]) -> "GradientArrival | None":
        """The marks on CPU with several ranks; None elsewhere (one rank has no one to wait for; on
        CUDA the host only queues the collective)."""
        if device.type != "cpu" or world < 2:
            return None
        return cls(params, reached, left)

    def _accumulated(self, index: int, _param: torch.Tensor) -> None:
        self.last = index
        self._reached()

    def left(self) -> None:
        if len(self._handles) > 1 and self.last is not None:  # after the first backward
            for i, handle in enumerate(self._handles):  # keep the hook of the last accumulated only
                if i != self.last:
                    handle.remove()
            self._handles = [self._handles[self.last]]
        self._left()


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
        #: called when ``backward`` returns (``GradientArrival.left``, where DDP's all-reduce ends)
        self.after_backward: Callable[[], None] | None = None

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def begin_epoch(self, epoch: int) -> None:
        from scaling.sharding import epoch_permutation, rank_shard

        perm = epoch_permutation(self.x.shape[0], self.seed, epoch)
        shard = rank_shard(perm, self.geometry.global_batch, self.rank, self.b)
        self.shard = torch.from_numpy(shard).to(self.x.device)
        self.cursor = 0
        self.model.train()

    def run(self, n: int) -> None:
        b, g = self.b, self.geometry
        for _ in range(n):
            warm_up(g, self.step, self.set_lr)
            self.step += 1
            idx = self.shard[self.cursor:self.cursor + b]
            self.cursor += b
            loss = torch.nn.functional.nll_loss(self.model(self.x.index_select(0, idx)), self.y.index_select(0, idx))
            self.optimizer.zero_grad()  # set_to_none, torch's default (Horovod's wrapper takes no argument)
            loss.backward()
            if self.after_backward is not None:
                self.after_backward()
            self.optimizer.step()
        self.last_loss = loss

    def evidence(self) -> dict:
        """What actually ran, for the record (a fallback must not pass for a fast mode)."""
        return {"ran": "eager"}


class GraphedSteps(ShardedSteps):
    """``backend.fast=graph``: the whole step (batch gather, forward, loss, backward, optimizer)
    captured once as a CUDA graph and replayed, so a step costs one launch instead of ~50.

    Everything a replay reads lives in static device buffers the graph captured by address: the
    epoch's shard of indices and a cursor into it, the step counter, and the learning rate, looked
    up in a table of the warm-up schedule (so the warm-up runs inside the graph too). The optimizer
    must be :func:`make_adam` ``(graph=True)``: capturable Adam whose learning rate is that tensor.
    The first ``eager_steps`` steps run eagerly on a side stream (allocator and optimizer state
    warm-up; DDP needs 11, CUDA's notes say), the next one is captured, then replayed.

    ``capture=False`` runs the same device-side step eagerly every time: the CPU check that the
    graph's step trains exactly the batches and learning rates the eager loop does.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 geometry, seed: int, rank: int = 0, *, eager_steps: int = 3, capture: bool = True) -> None:
        super().__init__(model, optimizer, x, y, geometry, seed, rank)
        if capture:
            check_fast_mode("graph", x.device)
        dev = x.device
        self.capture, self.eager_steps = capture, eager_steps
        self.lr_buf = optimizer.param_groups[0]["lr"]
        if not isinstance(self.lr_buf, torch.Tensor):
            raise TypeError("GraphedSteps needs make_adam(..., graph=True): the learning rate as a device tensor")
        table = [geometry.lr_at(s) for s in range(geometry.lr_warmup_steps + 1)]
        self.lr_table = torch.tensor(table, dtype=self.lr_buf.dtype, device=dev)
        self.step_t = torch.zeros(1, dtype=torch.int64, device=dev)
        self.cursor_t = torch.zeros(1, dtype=torch.int64, device=dev)
        self.offsets = torch.arange(self.b, dtype=torch.int64, device=dev)
        self.shard_buf: torch.Tensor | None = None
        self.loss_buf = torch.zeros((), dtype=torch.float32, device=dev)
        self.graph = None
        self.replays = 0
        self.captures = 0

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        if self.shard_buf is None:
            self.shard_buf = self.shard.clone()
        else:
            self.shard_buf.copy_(self.shard)  # same storage: the graph reads it by address
        self.cursor_t.zero_()

    def _device_step(self) -> None:
        """One step that reads and writes device buffers only (no host value, no sync)."""
        last = self.lr_table.shape[0] - 1
        self.lr_buf.copy_(self.lr_table.index_select(0, self.step_t.clamp(max=last)).view(()))
        idx = self.shard_buf.index_select(0, self.cursor_t * self.b + self.offsets)
        loss = torch.nn.functional.nll_loss(self.model(self.x.index_select(0, idx)), self.y.index_select(0, idx))
        if self.graph is None:  # eager: fresh gradients; captured: backward writes the graph's own
            self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss_buf.copy_(loss.detach())
        self.cursor_t += 1
        self.step_t += 1

    def run(self, n: int) -> None:
        for _ in range(n):
            if self.graph is not None:
                self.graph.replay()
                self.replays += 1
            elif not self.capture or self.step < self.eager_steps:
                self._eager(self._device_step)
            else:
                self._capture()
                self.graph.replay()
                self.replays += 1
            self.step += 1
            self.cursor += self.b
        self.last_loss = self.loss_buf

    def _eager(self, fn) -> None:
        if not self.capture:
            fn()
            return
        side = torch.cuda.Stream(self.x.device)
        side.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.x.device).wait_stream(side)

    def _capture(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.graph = graph  # inside the capture the step must not zero gradients itself
            self._device_step()
        self.captures += 1

    def evidence(self) -> dict:
        return {"ran": "graph" if self.capture else "graph-eager", "graph_captures": self.captures,
                "graph_replays": self.replays, "eager_steps": min(self.step, self.eager_steps)}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of every parameter group (the warm-up's setter)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_adam(params, geometry, device: torch.device, graph: bool = False) -> torch.optim.Optimizer:
    """Adam at the schedule's first learning rate; ``graph=True``: capturable (its state stays on
    the device, steps can be captured) with the learning rate as a device tensor the step updates."""
    if not graph:
        return torch.optim.Adam(params, lr=geometry.lr_at(0))
    lr = torch.tensor(geometry.lr_at(0), dtype=torch.float32, device=device)
    if device.type == "cuda":
        return torch.optim.Adam(params, lr=lr, capturable=True)
    return torch.optim.Adam(params, lr=lr, foreach=False)  # the eager check of the graphed step


def fast_steps(fast: str, model: torch.nn.Module, optimizer, x, y, geometry, seed: int, rank: int = 0,
               eager_steps: int = 3) -> ShardedSteps:
    """The step loop a ``backend.fast`` mode asks for (``graph``: :class:`GraphedSteps`)."""
    if fast == "graph":
        return GraphedSteps(model, optimizer, x, y, geometry, seed, rank, eager_steps=eager_steps)
    return ShardedSteps(model, optimizer, x, y, geometry, seed, rank)


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


def dist_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the process group's ranks, in place (``sharded_evaluate``'s ``all_reduce_sum``)."""
    dist.all_reduce(t)
    return t


@torch.no_grad()
def sharded_evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int = 0, world: int = 1,
                     all_reduce_sum=None) -> tuple[float, float]:
    """Mean NLL loss and accuracy over the test set, dropout off. Each rank evaluates its contiguous
    slice of it; ``all_reduce_sum`` adds the (loss, correct) sums over ranks (``torch.distributed``
    or Horovod; None for one rank, whose slice is the whole set)."""
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
    if all_reduce_sum is not None:
        sums = all_reduce_sum(sums)
    return float(sums[0]) / n, float(sums[1]) / n


#: the tuned key of torch_ddp and lightning_ddp that skips DDP's collective at world size 1
ONE_RANK_HOOK = "local_hook_at_one_rank"


def ddp_options(tuned: dict, world: int) -> tuple[dict, Any]:
    """DistributedDataParallel's keyword arguments from a backend's settings in force, and the
    communication hook to register (or None): with ``local_hook_at_one_rank`` and one rank, a hook
    that hands each bucket back as it is. The all-reduce of one rank is the identity, and DDP's
    default hook still queues it on the process group's worker thread every step."""
    kwargs = dict(tuned)
    wanted = bool(kwargs.pop(ONE_RANK_HOOK, False))
    return kwargs, (local_bucket_hook if wanted and world == 1 else None)


def local_bucket_hook(state, bucket):  # noqa: ANN001, ANN201 (DDP checks the annotations it finds)
    """A DDP communication hook for one rank: the bucket, unreduced (the sum over one rank)."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def ddp_in_force(ddp: torch.nn.Module, hook: Any = None) -> dict:
    """What a DistributedDataParallel reports it runs with (bucket cap, views, static graph), and
    the communication hook registered on it (``hook``; None: DDP's own all-reduce)."""
    return {"bucket_cap_mb": getattr(ddp, "bucket_bytes_cap", 0) / 2 ** 20,
            "gradient_as_bucket_view": bool(getattr(ddp, "gradient_as_bucket_view", False)),
            "static_graph": bool(getattr(ddp, "static_graph", False)),
            "comm_hook": getattr(hook, "__name__", "default all-reduce") if hook else "default all-reduce"}


class CudaStepEvents:
    """CUDA events queued on the current stream behind each step (``protocol.StepEvents``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds


class OnTorchDevice:
    """What every torch backend answers the same way about its device: ``self.device`` and
    ``self.model`` (the bare model; DDP backends point ``digest_model`` at the wrapped module)."""

    device: torch.device
    model: torch.nn.Module
    #: each rank evaluates 1/world of the test set (``sharded_evaluate``; one device: all of it)
    evaluation = "shard"
    fast = "none"

    def place(self, ctx: RunContext, fast: str = "none", device_index: int | None = None) -> None:
        """Threads, this rank's device (refusing a fast mode it cannot run) and the run's facts, the
        first thing every torch backend does."""
        configure_threads(ctx.config.get("threads"))
        self.ctx, self.geometry, self.global_batch = ctx, ctx.geometry, ctx.geometry.global_batch
        self.rank, self.world = ctx.rank, ctx.world_size
        self.device = resolve_device(ctx.config["device"], ctx.local_rank if device_index is None else device_index)
        self.fast = fast or "none"
        check_fast_mode(self.fast, self.device)

    def load_resident(self) -> None:
        """The dataset as tensors on the device; an epoch is the full global batches of it."""
        ds = self.ctx.dataset
        self.x, self.y = to_device_tensors(ds.train_x, ds.train_y, self.device)
        self.test_x, self.test_y = to_device_tensors(ds.test_x, ds.test_y, self.device)
        self.steps_per_epoch = self.x.shape[0] // self.global_batch

    def build_model(self) -> torch.nn.Module:
        from scaling.workloads import torch_models

        return torch_models.build(self.ctx.config["workload"], self.ctx.dataset.num_classes).to(self.device)

    def environment(self) -> dict:
        return environment(self.device)

    @property
    def digest_model(self) -> torch.nn.Module:
        return self.model

    def fast_mode(self) -> dict:
        """What ran: the step loop (eager, or the CUDA graph with its captures and replays) and the
        graphs TorchDynamo captured and compiled in this process (``torch.compile``)."""
        from torch._dynamo.utils import counters

        stats = counters.get("stats", {})
        steps = getattr(self, "steps", None)
        loop = steps.evidence() if hasattr(steps, "evidence") else {}
        return {"mode": getattr(self, "fast", "none"), **loop, "compiled_graphs": int(stats.get("unique_graphs", 0)),
                "compiled_frames": int(stats.get("calls_captured", 0))}

    def sync(self) -> None:
        sync(self.device)

    def device_memory_peak(self) -> int | None:
        return device_memory_peak(self.device)

    def step_events(self) -> "CudaStepEvents | None":
        """Device timestamps for ``protocol.sync_every`` > 1 (CUDA only; elsewhere every step syncs)."""
        return CudaStepEvents(self.device) if self.device.type == "cuda" else None

    def param_digests(self) -> list[str]:
        import hashlib

        h = hashlib.sha256()
        for p in self.digest_model.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return [h.hexdigest()]


class DrivenSteps(OnTorchDevice):
    """A torch backend whose loop ``protocol.drive`` runs through its step loop ``self.steps``
    (:class:`ShardedSteps` or :class:`GraphedSteps`), evaluating its slice of the test set."""

    steps: ShardedSteps
    steps_per_call = 1

    def begin_epoch(self, epoch: int) -> None:
        self.steps.begin_epoch(epoch)

    def train_steps(self, n: int) -> None:
        self.steps.run(n)

    def loss(self) -> float:
        """The global batch's mean loss (an all-reduce with several ranks, made only at logging steps)."""
        if self.world == 1:
            return float(self.steps.last_loss.item())
        return float(self.all_reduce_sum(self.steps.last_loss.detach().clone())) / self.world

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks (``torch.distributed``); backends over another library override it."""
        return dist_sum(t)

    def evaluate(self) -> tuple[float, float]:
        reduce = self.all_reduce_sum if self.world > 1 else None
        return sharded_evaluate(self.digest_model, self.test_x, self.test_y, self.rank, self.world, reduce)
