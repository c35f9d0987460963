"""TensorFlow pieces the TF-based backends share: threads, device placement, data, evaluation."""
from __future__ import annotations

import os
import time
from functools import partial
from typing import Callable

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


def resident(ds) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Train and test images and labels as tensors on this process's device (for the tests'
    evaluation too: no copy per step or per evaluation)."""
    with tf.device(device_name()):
        return (*to_tensors(ds.train_x, ds.train_y), *to_tensors(ds.test_x, ds.test_y))


def model_and_adam(ctx, adam=None):
    """The workload as a Keras model and its Adam (``adam``: a subclass of Keras' Adam, where given)
    at the schedule's first rate, its slot variables built now (created lazily inside a traced step
    they break the graph). Call it inside a strategy's scope where there is one."""
    import keras

    from scaling.workloads import tf_models

    model = tf_models.build(ctx.config["workload"], ctx.dataset.num_classes)
    optimizer = (adam or keras.optimizers.Adam)(learning_rate=ctx.geometry.lr_at(0))
    optimizer.build(model.trainable_variables)
    return model, optimizer


def flat_all_reduce(grads: list, all_reduce_sum, scale: float | None = None) -> list:
    """The whole gradient in one collective call: every gradient reshaped to 1-D and concatenated
    into one flat tensor, ``all_reduce_sum`` of it (a sum over the ranks), times ``scale`` where
    given (1/world to average; none where the loss is already divided by the global batch), split
    back to each gradient's shape. Traced into the step: its cost is one concat and one split."""
    shapes = [g.shape for g in grads]
    flat = all_reduce_sum(tf.concat([tf.reshape(g, [-1]) for g in grads], 0))
    if scale is not None:
        flat = flat * scale
    return [tf.reshape(part, shape) for part, shape in zip(tf.split(flat, [s.num_elements() for s in shapes]), shapes)]


class Stamps:
    """Rank-clock marks (``scaling.rank_clock``) traced into a TF step whose all-reduce the host
    never sees: ``tf.timestamp()`` once this rank's own gradients are computed (**reached**) and once
    the all-reduced ones are (**left**, where the backend can see them; Keras' optimizer reduces
    inside ``apply_gradients``, so ``tf_multiworker`` has no left mark). Each stamp has control
    dependencies on those tensors only and nothing depends on it (``tf.function`` orders a stateful
    op only against ops on the same resource), so the step's own ops are scheduled as without it.
    ``attach(loss)`` returns the step's output: the loss, or with stamps (loss, [reached, left]) in
    seconds since the epoch (TensorFlow's clock, microsecond resolution; -1 where unmarked).
    One per traced step; disabled, it traces nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._reached = self._left = None

    @staticmethod
    def _after(tensors) -> tf.Tensor:
        deps = [t for t in tf.nest.flatten(tensors, expand_composites=True) if t is not None]
        with tf.control_dependencies(deps):
            return tf.timestamp()

    def reached(self, local_gradients) -> None:
        if self.enabled:
            self._reached = self._after(local_gradients)

    def left(self, reduced_gradients) -> None:
        if self.enabled:
            self._left = self._after(reduced_gradients)

    def attach(self, loss):
        if not self.enabled or self._reached is None:
            return loss
        none = tf.constant(-1.0, tf.float64)
        return loss, tf.stack([self._reached, none if self._left is None else self._left])


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
    """The compiled step calls the TF backends share (the ``ShardedSteps`` of torch_common).

    ``one_step(start, *inputs)`` is a backend's step on the batch at offset ``start`` of this epoch's
    order (``stride`` samples per step), returning its loss. It is wrapped twice: ``step`` runs one
    step per ``tf.function`` call, ``steps`` runs ``count`` steps in one call (count is a tensor, so
    a shorter final call reuses the traced graph). With ``steps_per_call`` > 1 every call, a final
    one of a single step included, goes through ``steps``: tracing ``step`` then would happen inside
    the timed region. Before each call the learning-rate warm-up is applied (once per call).

    ``begin_epoch(*inputs)`` starts an epoch with the tensors the step reads this epoch;
    ``evidence()`` is what the record keeps: calls, the step counts the calls actually ran, graphs
    traced, and the XLA-compiled calls found in the traced graphs."""

    def __init__(self, one_step, stride: int, optimizer, geometry, steps_per_call: int = 1,
                 jit_compile: bool = False) -> None:
        @tf.function
        def step(start, *inputs):
            return one_step(start, *inputs)

        @tf.function
        def steps(start, count, *inputs):
            out = one_step(start, *inputs)
            for i in tf.range(1, count):
                out = one_step(start + i * stride, *inputs)
            return out

        self.step, self.steps, self.steps_per_call, self.jit_compile = step, steps, steps_per_call, jit_compile
        self.stride, self.optimizer, self.geometry = stride, optimizer, geometry
        self.calls = 0
        self.counts: set[int] = set()
        self.steps_done = 0
        self.cursor = 0
        self.inputs: tuple = ()
        self.last_loss = None
        #: the last single-step call's ``Stamps`` output (None: the step is not stamped)
        self.last_marks = None

    def begin_epoch(self, *inputs) -> None:
        self.inputs = inputs
        self.cursor = 0

    def run(self, n: int) -> None:
        from scaling.backends import warm_up

        warm_up(self.geometry, self.steps_done, self.optimizer.learning_rate.assign)
        self.steps_done += n
        self.calls += 1
        self.counts.add(int(n))
        start = tf.constant(self.cursor, tf.int32)
        if self.steps_per_call == 1 and n == 1:
            out = self.step(start, *self.inputs)
        else:
            out = self.steps(start, tf.constant(n, tf.int32), *self.inputs)
        self.last_loss, self.last_marks = out if isinstance(out, tuple) else (out, None)
        self.cursor += n * self.stride

    def evidence(self) -> dict:
        fns = (self.step, self.steps)
        return {"steps_per_call": self.steps_per_call, "calls": self.calls,
                "steps_per_call_run": sorted(self.counts),
                "graphs_traced": sum(int(f.experimental_get_tracing_count()) for f in fns),
                "jit_compile": self.jit_compile, "xla_compiled_calls": sum(_xla_calls(f) for f in fns)}


class DrivenSteps:
    """A TF backend whose loop ``protocol.drive`` runs through its :class:`StepCalls` ``self.calls``:
    ``epoch_inputs(epoch)`` gives the tensors the step reads that epoch (its order of samples)."""

    calls: StepCalls
    #: each rank (replica) evaluates 1/world of the test set; one device: its shard is the whole set
    evaluation = "shard"
    #: the rank clock's (reached, left) and TensorFlow's clock less CLOCK_MONOTONIC, in ns (``mark_stamps``)
    _marks: tuple[Callable[..., None], Callable[..., None], int] | None = None

    @property
    def stamping(self) -> bool:
        """Whether the traced step carries ``Stamps`` (``mark_stamps``, before the first call)."""
        return self._marks is not None

    def mark_stamps(self, world: int, reached: Callable[..., None], left: Callable[..., None]) -> bool:
        """Have the step stamp its collective for the rank clock, where the stamps mean what they
        say: on CPU (on a GPU an op's host time is when it was queued), with several ranks, one step
        per call (a fused call's stamps would be its last step's), without XLA (``jit_compile``, where
        the stamps are not checked), and before the step is first traced."""
        c = self.calls
        if (world < 2 or device_name() != "/CPU:0" or c.steps_per_call != 1 or c.jit_compile or c.calls
                or not self.can_stamp()):
            return False
        # TensorFlow's clock is the epoch's; the rank clock's is CLOCK_MONOTONIC, one per host
        self._marks = (reached, left, time.time_ns() - time.monotonic_ns())
        return True

    def can_stamp(self) -> bool:
        """Whether this backend's step can see its rank's own gradients before the collective."""
        return True

    def local_marks(self, marks):
        """This process's copy of a call's stamps (a strategy's replicas override it)."""
        return marks

    @property
    def steps_per_call(self) -> int:
        return self.calls.steps_per_call

    def epoch_inputs(self, epoch: int) -> tuple:
        raise NotImplementedError

    def begin_epoch(self, epoch: int) -> None:
        self.calls.begin_epoch(*self.epoch_inputs(epoch))

    def train_steps(self, n: int) -> None:
        self.calls.run(n)
        if self._marks is not None and self.calls.last_marks is not None:
            # read when the run ends (``RankClock.series``): reading a tensor costs ~15 us, in the step
            reached, left, _ = self._marks
            reached(partial(self._stamp_ns, self.calls.last_marks, 0))
            left(partial(self._stamp_ns, self.calls.last_marks, 1))

    def _stamp_ns(self, marks, which: int) -> int | None:
        """A stamp of a step's output as the rank clock's ns (None: not marked)."""
        seconds = float(self.local_marks(marks).numpy()[which])
        return None if seconds < 0 else round(seconds * 1e9) - self._marks[2]

    def loss(self) -> float:
        return float(self.calls.last_loss)

    def local_losses(self) -> list:
        """This process's copies of the last call's loss (one; a strategy's replicas override it)."""
        return [self.calls.last_loss]

    def sync(self) -> None:
        # fetching the last call's losses waits for its steps (and any all-reduce in them)
        if self.calls.last_loss is not None:
            for value in self.local_losses():
                value.numpy()

    def fast_mode(self) -> dict:
        return self.calls.evidence()

    def device_memory_peak(self) -> int | None:
        return device_memory_peak()

    def environment(self) -> dict:
        return environment()


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
