"""Horovod with TensorFlow: a custom loop whose ``tf.function`` step wraps the tape in
``hvd.DistributedGradientTape``; one process per device (horovodrun locally, srun under Slurm).

Keras 3 needs two accommodations (horovod issue #4290): the tape and ``broadcast_variables`` get
the underlying ``tf.Variable`` of each Keras variable (``v.value``), the optimizer the Keras
variables. ``horovod.tensorflow.keras`` is not used: under Keras 3 its ``fit`` runs without
averaging gradients, so ranks drift apart.
"""
from __future__ import annotations

import hashlib

from scaling import settings
from scaling.backends import RunContext
from scaling.backends import tf_common
from scaling.sharding import epoch_permutation, rank_shard
from scaling.protocol import Measurement, drive


def _tf_vars(variables):
    return [getattr(v, "value", v) for v in variables]


class HorovodTF:
    devices = 1  # per process
    evaluation = "shard"  # each rank evaluates 1/world of the test set

    def __init__(self, ctx: RunContext) -> None:
        cfg = ctx.config
        import horovod.tensorflow as hvd
        import tensorflow as tf

        settings.apply_environment(cfg)  # HOROVOD_* knobs are read at init
        hvd.init()
        tf_common.configure(cfg.get("threads"), cfg["device"])
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:  # one GPU per process
            tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
        import keras

        from scaling.workloads import tf_models

        self.tf, self.hvd, self.ctx = tf, hvd, ctx
        self.geometry = g = ctx.geometry
        self.rank, self.world = hvd.rank(), hvd.size()
        if self.world != g.devices:
            raise RuntimeError(f"horovod_tf: {self.world} processes for {g.devices} devices; one process per device expected")
        keras.utils.set_random_seed(cfg["seed"])
        self.steps_per_call = int(cfg["backend"].get("steps_per_call") or 1)
        if cfg["backend"].get("jit_compile"):
            raise RuntimeError("horovod_tf: jit_compile is not supported (Horovod's ops do not compile with XLA); "
                               "use backend.steps_per_call for the fast mode")
        self.global_batch, b = g.global_batch, g.per_device_batch
        self.per_device_batch = b
        ds = ctx.dataset
        with tf.device(tf_common.device_name()):
            self.x, self.y = tf_common.to_tensors(ds.train_x, ds.train_y)
            self.test_x, self.test_y = tf_common.to_tensors(ds.test_x, ds.test_y)
            self.shard = tf.Variable(tf.zeros([len(ds.train_y) // g.global_batch * b], tf.int32), trainable=False)
        self.n = len(ds.train_y)
        self.steps_per_epoch = self.n // g.global_batch
        self.model = model = tf_models.build(cfg["workload"], ds.num_classes)
        self.optimizer = optimizer = keras.optimizers.Adam(learning_rate=g.lr_at(0))
        optimizer.build(model.trainable_variables)
        hvd.broadcast_variables(_tf_vars(model.variables), root_rank=0)
        hvd.broadcast_variables(_tf_vars(optimizer.variables), root_rank=0)
        keras.utils.set_random_seed(cfg["seed"] * 1000 + self.rank)  # dropout masks differ per rank
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self._evaluate = tf_common.make_evaluator(
            model, rank=self.rank, world=self.world,
            all_reduce_sum=lambda sums: hvd.allreduce(tf.constant(sums), op=hvd.Sum, name="eval_sums").numpy())
        x, y, shard = self.x, self.y, self.shard

        def one_step(start):
            idx = shard[start:start + b]
            xb, yb = tf.gather(x, idx), tf.gather(y, idx)
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            tape = hvd.DistributedGradientTape(tape)
            grads = tape.gradient(loss, _tf_vars(model.trainable_variables))
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        # Horovod's collectives are custom ops XLA cannot compile: jit_compile is refused (config check)
        @tf.function
        def step(start):
            return one_step(start)

        @tf.function
        def steps(start, count):
            loss = tf.constant(0.0)
            for i in tf.range(count):
                loss = one_step(start + i * b)
            return loss

        self._calls = tf_common.StepCalls(step, steps, self.steps_per_call)
        self._cursor = 0
        self._steps_done = 0
        self._last_loss = None

    def begin_epoch(self, epoch: int) -> None:
        perm = epoch_permutation(self.n, self.ctx.config["seed"], epoch)
        self.shard.assign(rank_shard(perm, self.global_batch, self.rank, self.per_device_batch).astype("int32"))
        self._cursor = 0

    def train_steps(self, n: int) -> None:
        tf = self.tf
        if self._steps_done < self.geometry.lr_warmup_steps:
            self.optimizer.learning_rate.assign(self.geometry.lr_at(self._steps_done))
        self._steps_done += n
        start = tf.constant(self._cursor, tf.int32)
        self._last_loss = self._calls(n, start)
        self._cursor += n * self.per_device_batch

    def loss(self) -> float:
        return float(self.hvd.allreduce(self._last_loss, op=self.hvd.Average, name="train_loss"))

    def sync(self) -> None:
        if self._last_loss is not None:
            self._last_loss.numpy()

    def fast_mode(self) -> dict:
        return self._calls.evidence()

    def evaluate(self) -> tuple[float, float]:
        return self._evaluate(self.test_x, self.test_y)

    def device_memory_peak(self) -> int | None:
        return tf_common.device_memory_peak()

    def param_digests(self) -> list[str]:
        h = hashlib.sha256()
        for v in self.model.trainable_variables:
            h.update(v.numpy().tobytes())
        return [h.hexdigest()]

    def settings_in_force(self) -> dict:
        return settings.horovod_in_force()

    def environment(self) -> dict:
        import horovod

        env = tf_common.environment()
        env["frameworks"]["horovod"] = horovod.__version__
        env["horovod"] = {"gloo": self.hvd.gloo_built(), "nccl": bool(self.hvd.nccl_built()), "size": self.world}
        return env

    def train(self, meter: Measurement) -> None:
        try:
            drive(self, meter, int(self.ctx.train["epochs"]), self.ctx.train.get("max_steps_per_epoch"))
        finally:
            self.hvd.shutdown()
