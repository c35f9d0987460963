"""Each library's all-reduce, the way its training backend calls it.

A path sets up the library as the backend does (``torch_ddp``'s process group, ``hvd.init()``,
the very ``tf.distribute`` strategy ``tf_multiworker`` / ``tf_mirrored`` build, tuned variant
included), then times single all-reduce calls of a float32 buffer. ``exchange`` sums a small
array over the processes with the same library, to gather every rank's timings.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from scaling.backends import RunContext


class CollectivePath:
    #: processes taking part (MirroredStrategy: one process holding every replica)
    processes: int = 1
    rank: int = 0
    library: str = ""

    def time_all_reduce(self, elements: int, warmup: int, iters: int) -> list[float]:
        """Seconds of each of ``iters`` timed all-reduce calls on this rank, after ``warmup`` calls."""
        buf = self.buffer(elements)
        times = []
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            self.all_reduce(buf)
            t1 = time.perf_counter()
            if i >= warmup:
                times.append(t1 - t0)
        return times

    def buffer(self, elements: int) -> Any:  # pragma: no cover - each path defines it
        raise NotImplementedError

    def all_reduce(self, buf: Any) -> None:  # pragma: no cover - each path defines it
        raise NotImplementedError

    def exchange(self, values: np.ndarray) -> np.ndarray:
        return values

    def gradient_elements(self, workload: str | dict) -> int:  # pragma: no cover - each path defines it
        """Trainable parameters of the workload (a name, or its config) as this library builds it."""
        raise NotImplementedError

    def environment(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class TorchDistributed(CollectivePath):
    """``torch.distributed.all_reduce`` in the process group ``torch_ddp`` and Lightning join."""

    def __init__(self, ctx: RunContext) -> None:
        import torch

        from scaling.backends import torch_common as tc
        from scaling.backends.torch_ddp import init_process_group

        cfg = ctx.config
        tc.configure_threads(cfg.get("threads"))
        self.torch, self.tc = torch, tc
        self.device = tc.resolve_device(cfg["device"], ctx.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.group_backend = init_process_group(self.device, ctx.rank, ctx.world_size, cfg["backend"].get("process_group"))
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.processes = dist.get_rank(), dist.get_world_size()
        self.library = f"torch.distributed ({self.group_backend})"

    def buffer(self, elements: int):
        return self.torch.ones(elements, dtype=self.torch.float32, device=self.device)

    def all_reduce(self, buf) -> None:
        self.dist.all_reduce(buf)
        self.tc.sync(self.device)

    def exchange(self, values: np.ndarray) -> np.ndarray:
        t = self.torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(self.device)
        self.dist.all_reduce(t)
        return t.cpu().numpy()

    def gradient_elements(self, workload: str | dict) -> int:
        from scaling.workloads import torch_models

        return torch_models.parameter_count(torch_models.build(workload))

    def environment(self) -> dict:
        env = self.tc.environment(self.device)
        env["process_group"] = self.group_backend
        return env

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


class HorovodTorch(CollectivePath):
    """``hvd.allreduce`` on torch tensors, the collective ``hvd.DistributedOptimizer`` uses."""

    def __init__(self, ctx: RunContext) -> None:
        import horovod.torch as hvd
        import torch

        from scaling.backends import torch_common as tc
        from scaling.settings import apply_environment

        apply_environment(ctx.config)  # HOROVOD_* settings are read at init
        hvd.init()
        tc.configure_threads(ctx.config.get("threads"))
        self.hvd, self.torch, self.tc = hvd, torch, tc
        self.device = tc.resolve_device(ctx.config["device"], hvd.local_rank())
        self.rank, self.processes = hvd.rank(), hvd.size()
        self.library = "horovod (" + ("nccl" if self.device.type == "cuda" and hvd.nccl_built() else "gloo") + ")"

    def buffer(self, elements: int):
        return self.torch.ones(elements, dtype=self.torch.float32, device=self.device)

    def all_reduce(self, buf) -> None:
        self.hvd.allreduce_(buf, op=self.hvd.Sum, name="comm")
        self.tc.sync(self.device)

    def exchange(self, values: np.ndarray) -> np.ndarray:
        t = self.torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
        return self.hvd.allreduce(t, op=self.hvd.Sum, name="comm_exchange").numpy()

    def gradient_elements(self, workload: str | dict) -> int:
        from scaling.workloads import torch_models

        return torch_models.parameter_count(torch_models.build(workload))

    def environment(self) -> dict:
        import horovod

        env = self.tc.environment(self.device)
        env["frameworks"]["horovod"] = horovod.__version__
        return env

    def close(self) -> None:
        self.hvd.shutdown()


class HorovodTF(CollectivePath):
    """``hvd.allreduce`` on TensorFlow tensors, the collective ``hvd.DistributedGradientTape`` uses."""

    def __init__(self, ctx: RunContext) -> None:
        import horovod.tensorflow as hvd

        from scaling.backends import tf_common
        from scaling.settings import apply_environment

        apply_environment(ctx.config)
        hvd.init()
        tf_common.configure(ctx.config.get("threads"), ctx.config["device"])
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
        self.hvd, self.tf, self.tf_common = hvd, tf, tf_common
        self.rank, self.processes = hvd.rank(), hvd.size()
        self.library = "horovod (" + ("nccl" if gpus and hvd.nccl_built() else "gloo") + ")"

    def buffer(self, elements: int):
        with self.tf.device(self.tf_common.device_name()):
            return self.tf.ones([elements], self.tf.float32)

    def all_reduce(self, buf) -> None:
        self.hvd.allreduce(buf, op=self.hvd.Sum, name="comm").numpy()

    def exchange(self, values: np.ndarray) -> np.ndarray:
        return self.hvd.allreduce(self.tf.constant(values, self.tf.float64), op=self.hvd.Sum, name="comm_exchange").numpy()

    def gradient_elements(self, workload: str | dict) -> int:
        from scaling.workloads import tf_models

        return tf_models.parameter_count(tf_models.build(workload))

    def environment(self) -> dict:
        import horovod

        env = self.tf_common.environment()
        env["frameworks"]["horovod"] = horovod.__version__
        return env

    def close(self) -> None:
        self.hvd.shutdown()


class TFStrategy(CollectivePath):
    """The replica-context all-reduce inside ``strategy.run``: what the Keras optimizer's gradient
    aggregation calls, through the strategy's cross-device ops (MultiWorkerMirroredStrategy's
    collective RING/NCCL/AUTO, MirroredStrategy's in-process reduction)."""

    def __init__(self, ctx: RunContext, backend_class: type) -> None:
        backend = backend_class.__new__(backend_class)  # only its strategy: no model, no data
        self.strategy = strategy = backend.make_strategy(ctx)
        import tensorflow as tf

        from scaling.backends import tf_common

        self.tf, self.tf_common = tf, tf_common
        resolver = getattr(strategy, "cluster_resolver", None)
        self.rank = int(getattr(resolver, "task_id", 0) or 0) if resolver is not None and resolver.task_type else 0
        multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self.processes = max(1, ctx.world_size) if multi_worker else 1
        self.library = "tf.distribute." + ("MultiWorkerMirroredStrategy" if multi_worker else "MirroredStrategy")
        self.replicas = strategy.num_replicas_in_sync

    def buffer(self, elements: int, values: np.ndarray | None = None):
        """A mirrored variable (one copy per replica, like a gradient buffer) and the compiled
        all-reduce of it; calling the result runs one all-reduce."""
        tf, strategy = self.tf, self.strategy
        with strategy.scope():
            var = tf.Variable(tf.ones([elements], tf.float32) if values is None else tf.constant(values, tf.float32),
                              trainable=False)

        @tf.function
        def reduce():
            return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, var.read_value()))

        return reduce

    def all_reduce(self, buf) -> list:
        # fetching this process's replica results waits for them, and so for the collective
        return [value.numpy() for value in self.strategy.experimental_local_results(buf())]

    def exchange(self, values: np.ndarray) -> np.ndarray:
        if self.processes == 1:
            return values
        flat = np.asarray(values, dtype=np.float32).ravel()
        return self.all_reduce(self.buffer(flat.size, flat))[0].reshape(values.shape).astype(np.float64)

    def gradient_elements(self, workload: str | dict) -> int:
        from scaling.workloads import tf_models

        return tf_models.parameter_count(tf_models.build(workload))

    def environment(self) -> dict:
        env = self.tf_common.environment()
        env["strategy"] = self.library.split(".")[-1]
        env["replicas_in_sync"] = self.replicas
        options = getattr(self.strategy.extended, "_communication_options", None)
        if options is not None:
            env["communication_options"] = {"implementation": str(options.implementation.name),
                                             "bytes_per_pack": int(options.bytes_per_pack)}
        cross = getattr(self.strategy.extended, "_cross_device_ops", None)
        if cross is not None:
            env["cross_device_ops"] = type(cross).__name__
        return env


def open_path(ctx: RunContext) -> CollectivePath:
    """The collective path of the cell's backend (its YAML's ``name``)."""
    name = ctx.config["backend"]["name"]
    if name in ("torch_ddp", "lightning_ddp", "torch_reference"):
        return TorchDistributed(ctx)
    if name in ("horovod_torch", "horovod_reference"):
        return HorovodTorch(ctx)
    if name in ("horovod_tf", "horovod_tf_reference"):
        return HorovodTF(ctx)
    if name in ("tf_multiworker", "tf_reference"):
        from scaling.backends.tf_multiworker import TFMultiWorker

        return TFStrategy(ctx, TFMultiWorker)  # tf_reference builds its strategy the same way
    if name == "tf_mirrored":
        from scaling.backends.tf_mirrored import TFMirrored

        return TFStrategy(ctx, TFMirrored)
    raise ValueError(f"scaling comm: backend={name} has no collective to measure; use one of "
                     "torch_ddp, lightning_ddp, torch_reference, horovod_torch, horovod_reference, horovod_tf, "
                     "horovod_tf_reference, tf_multiworker, tf_reference, tf_mirrored")
