"""TensorFlow on one device, tuned: a custom loop whose step is a ``tf.function``.

The dataset lives on the device as tensors; each step gathers its batch there with the epoch's
permutation, so no input pipeline runs between steps. ``steps_per_call`` > 1 runs several steps in
one ``tf.function`` call, and ``jit_compile`` compiles the step with XLA (the expert's options for
a tiny model).
"""
from __future__ import annotations


from scaling.backends import RunContext
from scaling.backends import tf_common
from scaling.sharding import epoch_permutation
from scaling.protocol import Measurement, drive


class TFSingleDevice:
    devices = 1
    evaluation = "shard"  # one device: its shard is the whole test set

    def __init__(self, ctx: RunContext) -> None:
        cfg, train = ctx.config, ctx.train
        tf_common.configure(cfg.get("threads"), cfg["device"])
        import keras
        import tensorflow as tf

        from scaling.workloads import tf_models

        self.tf = tf
        self.ctx = ctx
        keras.utils.set_random_seed(cfg["seed"])
        backend_cfg = cfg["backend"]
        self.steps_per_call = int(backend_cfg.get("steps_per_call") or 1)
        jit = bool(backend_cfg.get("jit_compile", False))
        self.geometry = ctx.geometry
        self.global_batch = b = ctx.geometry.global_batch
        ds = ctx.dataset
        with tf.device(tf_common.device_name()):
            self.x, self.y = tf_common.to_tensors(ds.train_x, ds.train_y)
            self.test_x, self.test_y = tf_common.to_tensors(ds.test_x, ds.test_y)
            self.perm = tf.Variable(tf.zeros([ds.train_x.shape[0]], tf.int32), trainable=False)
        self.steps_per_epoch = int(self.x.shape[0]) // b
        self.model = tf_models.build(cfg["workload"], ds.num_classes)
        self.optimizer = keras.optimizers.Adam(learning_rate=ctx.geometry.lr_at(0))
        self.optimizer.build(self.model.trainable_variables)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self._evaluate = tf_common.make_evaluator(self.model)
        model, optimizer, loss_fn, x, y, perm = self.model, self.optimizer, self.loss_fn, self.x, self.y, self.perm

        # XLA compiles the math of a step; the batch gather stays outside it, or every call would
        # hand the whole resident dataset to the compiled computation
        @tf.function(jit_compile=jit)
        def train_on_batch(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        def one_step(start):
            idx = perm[start:start + b]
            return train_on_batch(tf.gather(x, idx), tf.gather(y, idx))

        @tf.function
        def step(start):
            return one_step(start)

        @tf.function
        def steps(start, n):
            loss = tf.constant(0.0)
            for i in tf.range(n):
                loss = one_step(start + i * b)
            return loss

        self._calls = tf_common.StepCalls(step, steps, self.steps_per_call, jit)
        self._cursor = 0
        self._steps_done = 0
        self._last_loss = None

    def begin_epoch(self, epoch: int) -> None:
        self.perm.assign(epoch_permutation(int(self.x.shape[0]), self.ctx.config["seed"], epoch).astype("int32"))
        self._cursor = 0

    def train_steps(self, n: int) -> None:
        if self._steps_done < self.geometry.lr_warmup_steps:
            self.optimizer.learning_rate.assign(self.geometry.lr_at(self._steps_done))
        self._steps_done += n
        start = self.tf.constant(self._cursor, self.tf.int32)
        self._last_loss = self._calls(n, start)
        self._cursor += n * self.global_batch

    def loss(self) -> float:
        return float(self._last_loss)

    def fast_mode(self) -> dict:
        return self._calls.evidence()

    def sync(self) -> None:
        if self._last_loss is not None:
            self._last_loss.numpy()  # blocks until the step's device work is done

    def evaluate(self) -> tuple[float, float]:
        return self._evaluate(self.test_x, self.test_y)

    def device_memory_peak(self) -> int | None:
        return tf_common.device_memory_peak()

    def environment(self) -> dict:
        return tf_common.environment()

    def train(self, meter: Measurement) -> None:
        drive(self, meter, int(self.ctx.train["epochs"]), self.ctx.train.get("max_steps_per_epoch"))
