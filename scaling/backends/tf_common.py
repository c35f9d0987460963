"""TensorFlow pieces the TF-based backends share: threads, device placement, data, evaluation."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's start-up chatter out of the run's output

import numpy as np
import tensorflow as tf


def configure(threads: int | None, device: str) -> None:
    """Set threads and visible devices; must run before TensorFlow executes its first op."""
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(int(threads))
    gpus = tf.config.list_physical_devices("GPU")
    if device == "cpu" and gpus:
        tf.config.set_visible_devices([], "GPU")
    elif device == "cuda" and not gpus:
        raise RuntimeError("device=cuda requested but TensorFlow sees no GPU (tf.config.list_physical_devices('GPU') is empty)")
    for gpu in tf.config.list_physical_devices("GPU") if device != "cpu" else []:
        tf.config.experimental.set_memory_growth(gpu, True)


def device_name() -> str:
    return "/GPU:0" if tf.config.list_logical_devices("GPU") else "/CPU:0"


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 images -> float32 in [0, 1] (the same scaling the torch backends use), labels -> int32."""
    x = tf.constant(np.ascontiguousarray(images), dtype=tf.uint8)
    return tf.cast(x, tf.float32) / 255.0, tf.constant(np.asarray(labels, dtype=np.int32))


def make_evaluator(model, batch: int = 1000, rank: int = 0, world: int = 1, all_reduce_sum=None):
    """A compiled evaluation: mean cross-entropy and accuracy over a test set, dropout off. With
    ``world`` > 1 each rank evaluates its contiguous slice of the test set, as the torch backends
    do, and ``all_reduce_sum`` adds the (loss, correct) sums over ranks."""
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

    @tf.function
    def _batch(x, y):
        logits = model(x, training=False)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), y), tf.int64))
        return tf.cast(loss_fn(y, logits), tf.float64), correct

    def evaluate(x: tf.Tensor, y: tf.Tensor) -> tuple[float, float]:
        n = int(x.shape[0])
        lo, hi = n * rank // world, n * (rank + 1) // world
        sums = np.zeros(2)
        for start in range(lo, hi, batch):
            l, c = _batch(x[start:min(start + batch, hi)], y[start:min(start + batch, hi)])
            sums += (float(l), int(c))
        if all_reduce_sum is not None:
            sums = np.asarray(all_reduce_sum(sums), dtype=float)
        return float(sums[0]) / n, float(sums[1]) / n

    return evaluate


def make_strategy_evaluator(model, strategy, x: tf.Tensor, y: tf.Tensor, batch: int = 1000):
    """The sharded evaluation under a ``tf.distribute`` strategy: replica ``r`` of ``R`` in sync
    (over every process) evaluates the r-th contiguous slice of the test set on its own device,
    and the (loss, correct) sums are added over replicas; no replica evaluates the whole set."""
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    replicas = strategy.num_replicas_in_sync
    n = int(x.shape[0])
    xd = strategy.experimental_distribute_values_from_function(lambda _: tf.identity(x))
    yd = strategy.experimental_distribute_values_from_function(lambda _: tf.identity(y))

    def replica_sums(xr, yr):
        rid = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int32)
        lo, hi = n * rid // replicas, n * (rid + 1) // replicas
        sums = tf.zeros([2], tf.float64)
        for start in tf.range(lo, hi, batch):
            end = tf.minimum(start + batch, hi)
            logits = model(xr[start:end], training=False)
            yb = yr[start:end]
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), yb), tf.float64))
            sums += tf.stack([tf.cast(loss_fn(yb, logits), tf.float64), correct])
        return sums

    @tf.function
    def run():
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_sums, args=(xd, yd)), axis=None)

    def evaluate() -> tuple[float, float]:
        sums = run().numpy()
        return float(sums[0]) / n, float(sums[1]) / n

    return evaluate


class StepCalls:
    """Calls a backend's compiled step functions and keeps the evidence of what ran.

    ``step(*args)`` runs one step, ``steps(*args, count)`` runs ``count`` steps in one call (count is
    a tensor, so a shorter final call reuses the traced graph). With ``steps_per_call`` > 1 every call,
    a final one of a single step included, goes through ``steps``: tracing ``step`` then would happen
    inside the timed region. ``evidence()`` is what the record keeps: calls, the step counts the calls
    actually ran, graphs traced, and the XLA-compiled calls found in the traced graphs."""

    def __init__(self, step, steps, steps_per_call: int, jit_compile: bool = False) -> None:
        self.step, self.steps, self.steps_per_call, self.jit_compile = step, steps, steps_per_call, jit_compile
        self.calls = 0
        self.counts: set[int] = set()

    def __call__(self, n: int, *args):
        self.calls += 1
        self.counts.add(int(n))
        if self.steps_per_call == 1 and n == 1:
            return self.step(*args)
        return self.steps(*args, tf.constant(n, tf.int32))

    def evidence(self) -> dict:
        fns = (self.step, self.steps)
        return {"steps_per_call": self.steps_per_call, "calls": self.calls,
                "steps_per_call_run": sorted(self.counts),
                "graphs_traced": sum(int(f.experimental_get_tracing_count()) for f in fns),
                "jit_compile": self.jit_compile, "xla_compiled_calls": sum(_xla_calls(f) for f in fns)}


def _xla_calls(fn) -> int | None:
    """Calls marked for XLA compilation (``_XlaMustCompile``) in a tf.function's traced graphs."""
    try:
        concrete = fn._list_all_concrete_functions()
    except AttributeError:  # a TensorFlow without this accessor: no evidence, not a false zero
        return None
    count = 0
    for cf in concrete:
        graph_def = cf.graph.as_graph_def()
        nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
        count += sum(1 for node in nodes if "_XlaMustCompile" in node.attr and node.attr["_XlaMustCompile"].b)
    return count


def device_memory_peak() -> int | None:
    if not tf.config.list_logical_devices("GPU"):
        return None
    return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])


def environment() -> dict:
    import keras

    env = {"frameworks": {"tensorflow": tf.__version__, "keras": keras.__version__}, "gpu": None,
           "device": device_name(),
           "threads": tf.config.threading.get_intra_op_parallelism_threads()}
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        build = tf.sysconfig.get_build_info()
        env["gpu"] = {"count": len(gpus), "model": details.get("device_name"),
                      "cuda": build.get("cuda_version"), "cudnn": build.get("cudnn_version")}
    return env
