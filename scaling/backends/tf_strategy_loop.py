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
from typing import Callable

from scaling.backends import RunContext, check_one_per_device
from scaling.backends import tf_common
from scaling.sharding import epoch_permutation


class TFStrategyLoop(tf_common.DrivenSteps):
    def make_strategy(self, ctx: RunContext, jit_compile: bool = False):  # pragma: no cover - each backend defines it
        raise NotImplementedError

    def __init__(self, ctx: RunContext, steps_per_call: int = 1, jit_compile: bool = False) -> None:
        self.strategy = strategy = self.make_strategy(ctx, bool(jit_compile))  # before any other TF op
        import keras
        import tensorflow as tf

        self.tf, self.ctx = tf, ctx
        g = ctx.geometry
        check_one_per_device(ctx.config["backend"]["name"], strategy.num_replicas_in_sync, g.devices,
                             "replicas in sync")
        keras.utils.set_random_seed(ctx.seed)
        self.global_batch, b, G = g.global_batch, g.per_device_batch, g.global_batch
        ds = ctx.dataset
        self.n = n = len(ds.train_y)
        self.steps_per_epoch = n // G
        x_host, y_host = tf_common.to_tensors(ds.train_x, ds.train_y)
        self.test_x, self.test_y = tf_common.to_tensors(ds.test_x, ds.test_y)
        # one copy of the data per replica, on the replica's device
        self.x = strategy.experimental_distribute_values_from_function(lambda _: tf.identity(x_host))
        self.y = strategy.experimental_distribute_values_from_function(lambda _: tf.identity(y_host))
        with strategy.scope():
            self.model, self.optimizer = model, optimizer = self.model_and_optimizer(ctx)
        per_example = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
        self._evaluate = tf_common.make_strategy_evaluator(model, strategy, self.test_x, self.test_y)

        # with jit_compile, the function strategy.run calls is the XLA-compiled one (as in Keras'
        # own trainer): a compiled function nested inside it could not hold the gradient all-reduce
        @tf.function(jit_compile=bool(jit_compile))
        def replica_step(x, y, perm, start):
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            lo = start + tf.cast(rid, tf.int32) * b
            idx = perm[lo:lo + b]
            xb, yb = tf.gather(x, idx), tf.gather(y, idx)
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(per_example(yb, model(xb, training=True)), global_batch_size=G)
            stamps = tf_common.Stamps(self.stamping)
            grads = self.replica_gradients(tape, loss, model.trainable_variables, stamps)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return stamps.attach(loss)

        def one_step(start, x, y, perm):
            return strategy.run(replica_step, args=(x, y, perm, start))

        self.calls = tf_common.StepCalls(one_step, G, optimizer, g, int(steps_per_call or 1), bool(jit_compile))

    def model_and_optimizer(self, ctx: RunContext) -> tuple:
        """The model and its Keras Adam, built in the strategy's scope."""
        return tf_common.model_and_adam(ctx)

    def replica_gradients(self, tape, loss, variables, stamps: tf_common.Stamps) -> list:
        """This replica's gradients, traced into the replica step; the Keras optimizer all-reduces
        them in ``apply_gradients`` (so only reaching the all-reduce is stamped)."""
        grads = tape.gradient(loss, variables)
        stamps.reached(grads)
        return grads

    def mark_collective(self, reached: Callable[..., None], left: Callable[..., None]) -> bool:
        """Rank-clock marks traced into the step (``tf_common.Stamps``) where each process holds one
        replica (MultiWorker); several replicas in one process (Mirrored) have no rank clocks to compare."""
        if len(self.strategy.extended.worker_devices) != 1:
            return False
        return self.mark_stamps(self.strategy.num_replicas_in_sync, reached, left)

    def local_marks(self, marks):
        return self.strategy.experimental_local_results(marks)[0]

    def epoch_inputs(self, epoch: int) -> tuple:
        tf = self.tf
        perm = tf.constant(epoch_permutation(self.n, self.ctx.seed, epoch).astype("int32"))
        return self.x, self.y, self.strategy.experimental_distribute_values_from_function(lambda _: tf.identity(perm))

    def local_losses(self) -> list:
        return list(self.strategy.experimental_local_results(self.calls.last_loss))

    def loss(self) -> float:
        """The global batch's mean loss: per-replica losses are already divided by the global batch."""
        tf = self.tf
        return float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, self.calls.last_loss, axis=None))

    def evaluate(self) -> tuple[float, float]:
        return self._evaluate()

    def param_digests(self) -> list[str]:
        """sha256 of the parameters, once per replica copy this process holds."""
        import numpy as np

        copies: list[hashlib._Hash] = []
        for v in self.model.trainable_variables:
            value = getattr(v, "value", v)
            parts = self.strategy.experimental_local_results(value)
            while len(copies) < len(parts):
                copies.append(hashlib.sha256())
            for h, part in zip(copies, parts):
                h.update(np.ascontiguousarray(part.numpy()).tobytes())
        return [h.hexdigest() for h in copies]

    def environment(self) -> dict:
        env = tf_common.environment()
        env["strategy"] = type(self.strategy).__name__
        env["replicas_in_sync"] = self.strategy.num_replicas_in_sync
        return env
