"""The custom training loop shared by the ``tf.distribute`` backends (Mirrored, MultiWorker).

It is the loop TensorFlow's distributed-training guide prescribes: model and optimizer built in
``strategy.scope()``, a ``tf.function`` step that calls ``strategy.run``, per-example losses
averaged over the *global* batch (``tf.nn.compute_average_loss``), and the Keras optimizer's
cross-replica gradient all-reduce. Each replica holds the dataset on its device and gathers its
slice of every global batch there (the layout of ``scaling.sharding.rank_shard``). The backends differ
only in how they build the strategy.
"""
from __future__ import annotations

import hashlib

from scaling.backends import RunContext
from scaling.backends import tf_common
from scaling.sharding import epoch_permutation
from scaling.protocol import Measurement, drive


class TFStrategyLoop:
    devices = 1  # replicas in this process; make_strategy sets it
    evaluation = "shard"  # each replica evaluates 1/replicas of the test set

    def make_strategy(self, ctx: RunContext):  # pragma: no cover - each backend defines it
        raise NotImplementedError

    def __init__(self, ctx: RunContext) -> None:
        import numpy as np

        cfg = ctx.config
        self.strategy = strategy = self.make_strategy(ctx)  # before any other TF op
        import keras
        import tensorflow as tf

        from scaling.workloads import tf_models

        self.tf, self.ctx = tf, ctx
        self.geometry = g = ctx.geometry
        if strategy.num_replicas_in_sync != g.devices:
            raise RuntimeError(f"{cfg['backend']['name']}: {strategy.num_replicas_in_sync} replicas in sync, "
                               f"but the run asks for {g.devices} devices")
        keras.utils.set_random_seed(cfg["seed"])
        backend_cfg = cfg["backend"]
        self.steps_per_call = int(backend_cfg.get("steps_per_call") or 1)
        jit = bool(backend_cfg.get("jit_compile", False))
        self.global_batch, b, G = g.global_batch, g.per_device_batch, g.global_batch
        ds = ctx.dataset
        self.n = n = len(ds.train_y)
        self.steps_per_epoch = n // G
        x_host, y_host = tf_common.to_tensors(ds.train_x, ds.train_y)
        self.test_x, self.test_y = tf_common.to_tensors(ds.test_x, ds.test_y)
        # one copy of the data per replica, on the replica's device
        self.x = strategy.experimental_distribute_values_from_function(lambda _: tf.identity(x_host))
        self.y = strategy.experimental_distribute_values_from_function(lambda _: tf.identity(y_host))
        self.perm = None
        with strategy.scope():
            self.model = tf_models.build(cfg["workload"], ds.num_classes)
            self.optimizer = keras.optimizers.Adam(learning_rate=g.lr_at(0))
            # slot variables now, in the scope: created lazily inside the step they break the graph
            self.optimizer.build(self.model.trainable_variables)
        per_example = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
        model, optimizer = self.model, self.optimizer
        self._evaluate = tf_common.make_strategy_evaluator(model, strategy, self.test_x, self.test_y)

        # with jit_compile, the function strategy.run calls is the XLA-compiled one (as in Keras'
        # own trainer): a compiled function nested inside it could not hold the gradient all-reduce
        @tf.function(jit_compile=jit)
        def replica_step(x, y, perm, start):
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            lo = start + tf.cast(rid, tf.int32) * b
            idx = perm[lo:lo + b]
            xb, yb = tf.gather(x, idx), tf.gather(y, idx)
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(per_example(yb, model(xb, training=True)), global_batch_size=G)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        @tf.function
        def step(x, y, perm, start):
            return strategy.run(replica_step, args=(x, y, perm, start))

        @tf.function
        def steps(x, y, perm, start, count):
            out = strategy.run(replica_step, args=(x, y, perm, start))
            for i in tf.range(1, count):
                out = strategy.run(replica_step, args=(x, y, perm, start + i * G))
            return out

        self._calls = tf_common.StepCalls(step, steps, self.steps_per_call, jit)
        self._np = np
        self._cursor = 0
        self._step = 0
        self._last = None

    def begin_epoch(self, epoch: int) -> None:
        tf = self.tf
        perm = tf.constant(epoch_permutation(self.n, self.ctx.config["seed"], epoch).astype("int32"))
        self.perm = self.strategy.experimental_distribute_values_from_function(lambda _: tf.identity(perm))
        self._cursor = 0

    def train_steps(self, n: int) -> None:
        tf = self.tf
        if self._step < self.geometry.lr_warmup_steps:
            self.optimizer.learning_rate.assign(self.geometry.lr_at(self._step))
        self._step += n
        start = tf.constant(self._cursor, tf.int32)
        self._last = self._calls(n, self.x, self.y, self.perm, start)
        self._cursor += n * self.global_batch

    def sync(self) -> None:
        # fetching this process's replica losses waits for their steps (and the all-reduce in them)
        if self._last is not None:
            for value in self.strategy.experimental_local_results(self._last):
                value.numpy()

    def loss(self) -> float:
        """The global batch's mean loss: per-replica losses are already divided by the global batch."""
        tf = self.tf
        return float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, self._last, axis=None))

    def evaluate(self) -> tuple[float, float]:
        return self._evaluate()

    def fast_mode(self) -> dict:
        return self._calls.evidence()

    def device_memory_peak(self) -> int | None:
        return tf_common.device_memory_peak()

    def param_digests(self) -> list[str]:
        """sha256 of the parameters, once per replica copy this process holds."""
        copies: list[hashlib._Hash] = []
        for v in self.model.trainable_variables:
            value = getattr(v, "value", v)
            parts = self.strategy.experimental_local_results(value)
            while len(copies) < len(parts):
                copies.append(hashlib.sha256())
            for h, part in zip(copies, parts):
                h.update(self._np.ascontiguousarray(part.numpy()).tobytes())
        return [h.hexdigest() for h in copies]

    def environment(self) -> dict:
        env = tf_common.environment()
        env["strategy"] = type(self.strategy).__name__
        env["replicas_in_sync"] = self.strategy.num_replicas_in_sync
        return env

    def train(self, meter: Measurement) -> None:
        drive(self, meter, int(self.ctx.train["epochs"]), self.ctx.train.get("max_steps_per_epoch"))
