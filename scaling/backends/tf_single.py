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


class TFSingleDevice(tf_common.DrivenSteps):
    def __init__(self, ctx: RunContext, steps_per_call: int = 1, jit_compile: bool = False) -> None:
        tf_common.configure(ctx.config.get("threads"), ctx.config["device"])
        import keras
        import tensorflow as tf

        self.ctx = ctx
        keras.utils.set_random_seed(ctx.seed)
        self.global_batch = b = ctx.geometry.global_batch
        ds = ctx.dataset
        x, y, self.test_x, self.test_y = tf_common.resident(ds)
        with tf.device(tf_common.device_name()):
            self.perm = perm = tf.Variable(tf.zeros([ds.train_x.shape[0]], tf.int32), trainable=False)
        self.n = int(x.shape[0])
        self.steps_per_epoch = self.n // b
        model, optimizer = tf_common.model_and_adam(ctx)
        self.model = model
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self._evaluate = tf_common.make_evaluator(model)

        # XLA compiles the math of a step; the batch gather stays outside it, or every call would
        # hand the whole resident dataset to the compiled computation
        @tf.function(jit_compile=bool(jit_compile))
        def train_on_batch(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        def one_step(start):
            idx = perm[start:start + b]
            return train_on_batch(tf.gather(x, idx), tf.gather(y, idx))

        self.calls = tf_common.StepCalls(one_step, b, optimizer, ctx.geometry, int(steps_per_call or 1), bool(jit_compile))

    def epoch_inputs(self, epoch: int) -> tuple:
        self.perm.assign(epoch_permutation(self.n, self.ctx.seed, epoch).astype("int32"))
        return ()

    def evaluate(self) -> tuple[float, float]:
        return self._evaluate(self.test_x, self.test_y)
