"""Horovod with TensorFlow: a custom loop whose ``tf.function`` step wraps the tape in
``hvd.DistributedGradientTape``; one process per device (horovodrun locally, srun under Slurm).

Keras 3 needs two accommodations (horovod issue #4290): the tape and ``broadcast_variables`` get
the underlying ``tf.Variable`` of each Keras variable (``v.value``), the optimizer the Keras
variables. ``horovod.tensorflow.keras`` is not used: under Keras 3 its ``fit`` runs without
averaging gradients, so ranks drift apart.
"""
from __future__ import annotations

import hashlib
from typing import Callable

from scaling import settings
from scaling.backends import RunContext, check_one_per_device, horovod_environment, rank_seed
from scaling.backends import tf_common
from scaling.sharding import epoch_permutation, rank_shard


def _tf_vars(variables):
    return [getattr(v, "value", v) for v in variables]


class HorovodTF(tf_common.DrivenSteps):
    def __init__(self, ctx: RunContext, steps_per_call: int = 1, jit_compile: bool = False) -> None:
        import horovod.tensorflow as hvd
        import tensorflow as tf

        if jit_compile:
            raise RuntimeError("horovod_tf: jit_compile is not supported (Horovod's ops do not compile with XLA); "
                               "use backend.steps_per_call for the fast mode")
        settings.apply_environment(ctx.config)  # HOROVOD_* knobs are read at init
        hvd.init()
        tf_common.configure(ctx.config.get("threads"), ctx.config["device"])
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:  # one GPU per process
            tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
        import keras

        self.hvd, self.ctx = hvd, ctx
        g = ctx.geometry
        self.rank, self.world = hvd.rank(), hvd.size()
        check_one_per_device(ctx.config["backend"]["name"], self.world, g.devices)
        keras.utils.set_random_seed(ctx.seed)
        self.global_batch, self.per_device_batch = g.global_batch, g.per_device_batch
        b = g.per_device_batch
        ds = ctx.dataset
        self.n = len(ds.train_y)
        x, y, self.test_x, self.test_y = tf_common.resident(ds)
        with tf.device(tf_common.device_name()):
            self.shard = shard = tf.Variable(tf.zeros([self.n // g.global_batch * b], tf.int32), trainable=False)
        self.steps_per_epoch = self.n // g.global_batch
        model, optimizer = tf_common.model_and_adam(ctx)
        self.model = model
        hvd.broadcast_variables(_tf_vars(model.variables), root_rank=0)
        hvd.broadcast_variables(_tf_vars(optimizer.variables), root_rank=0)
        keras.utils.set_random_seed(rank_seed(ctx.seed, self.rank))
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self._evaluate = tf_common.make_evaluator(
            model, rank=self.rank, world=self.world,
            all_reduce_sum=lambda sums: hvd.allreduce(tf.constant(sums), op=hvd.Sum, name="eval_sums").numpy())

        # Horovod's collectives are custom ops XLA cannot compile: jit_compile is refused above
        def one_step(start):
            idx = shard[start:start + b]
            xb, yb = tf.gather(x, idx), tf.gather(y, idx)
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            stamps = tf_common.Stamps(self.stamping)
            grads = self.all_reduced_gradients(tape, loss, _tf_vars(model.trainable_variables), stamps)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return stamps.attach(loss)

        self.calls = tf_common.StepCalls(one_step, b, optimizer, g, int(steps_per_call or 1))

    def all_reduced_gradients(self, tape, loss, variables, stamps: tf_common.Stamps) -> list:
        """The gradients averaged over the ranks, traced into the step: Horovod's
        ``DistributedGradientTape``. Stamped for the rank clock around the all-reduce it makes of
        the tape's gradients (its ``_allreduce_grads``, wrapped at trace time only)."""
        distributed = self.hvd.DistributedGradientTape(tape)
        if stamps.enabled:
            all_reduce = distributed._allreduce_grads

            def stamped(grads, sources, *args):
                stamps.reached(grads)
                reduced = all_reduce(grads, sources, *args)
                stamps.left(reduced)
                return reduced

            distributed._allreduce_grads = stamped
        return distributed.gradient(loss, variables)

    def can_stamp(self) -> bool:
        """Horovod's tape must still reduce through ``_allreduce_grads`` for the stamps to wrap it."""
        import tensorflow as tf

        return callable(getattr(self.hvd.DistributedGradientTape(tf.GradientTape()), "_allreduce_grads", None))

    def mark_collective(self, reached: Callable[..., None], left: Callable[..., None]) -> bool:
        """Rank-clock marks traced into the step (``tf_common.Stamps``)."""
        return self.mark_stamps(self.world, reached, left)

    def epoch_inputs(self, epoch: int) -> tuple:
        perm = epoch_permutation(self.n, self.ctx.seed, epoch)
        self.shard.assign(rank_shard(perm, self.global_batch, self.rank, self.per_device_batch).astype("int32"))
        return ()

    def loss(self) -> float:
        return float(self.hvd.allreduce(self.calls.last_loss, op=self.hvd.Average, name="train_loss"))

    def evaluate(self) -> tuple[float, float]:
        return self._evaluate(self.test_x, self.test_y)

    def param_digests(self) -> list[str]:
        h = hashlib.sha256()
        for v in self.model.trainable_variables:
            h.update(v.numpy().tobytes())
        return [h.hexdigest()]

    def settings_in_force(self) -> dict:
        return settings.horovod_in_force()

    def environment(self) -> dict:
        return horovod_environment(self.hvd, tf_common.environment(), self.world)

    def close(self) -> None:
        self.hvd.shutdown()
