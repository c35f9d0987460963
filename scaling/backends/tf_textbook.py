"""TensorFlow the way the Keras tutorial writes it: ``model.compile`` + ``model.fit`` on numpy
arrays scaled by ``/ 255.0``, batch 64, ``fit`` shuffling each epoch and training the last,
partial batch. The protocol sees the loop through a Keras callback.
"""
from __future__ import annotations

from scaling.backends import RunContext
from scaling.backends import tf_common
from scaling.protocol import Measurement


class TFTextbook:
    evaluation = "shard"  # one device: its shard is the whole test set

    def __init__(self, ctx: RunContext) -> None:
        tf_common.configure(ctx.config.get("threads"), ctx.config["device"])
        import keras

        from scaling.workloads import tf_models

        self.ctx = ctx
        keras.utils.set_random_seed(ctx.seed)
        self.global_batch = ctx.geometry.global_batch
        ds = ctx.dataset
        self.dataset = ds
        self.x_test, self.y_test = ds.test_x / 255.0, ds.test_y
        self.steps_per_epoch = -(-len(ds.train_y) // self.global_batch)
        self.model = tf_models.build(ctx.config["workload"], ds.num_classes)
        self.model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=ctx.geometry.lr),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        self._logs = None

    def sync(self) -> None:
        if self._logs and "loss" in self._logs:
            float(self._logs["loss"])  # fetching the loss waits for the step to finish

    def device_memory_peak(self) -> int | None:
        return tf_common.device_memory_peak()

    def environment(self) -> dict:
        return tf_common.environment()

    def evaluate(self) -> tuple[float, float]:
        loss, accuracy = self.model.evaluate(self.x_test, self.y_test, batch_size=1000, verbose=0)
        return loss, accuracy

    def fit(self, meter: Measurement, epochs: int, max_steps_per_epoch: int | None) -> None:
        import keras

        backend, b = self, self.global_batch
        n = len(self.dataset.train_y)
        n = min(n, max_steps_per_epoch * b) if max_steps_per_epoch else n

        class ProtocolCallback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                meter.epoch_begin(epoch)

            def on_train_batch_begin(self, batch, logs=None):
                meter.step_begin()

            def on_train_batch_end(self, batch, logs=None):
                backend._logs = logs
                # Keras reports the epoch's running mean loss
                has_loss = bool(logs) and "loss" in logs
                meter.step_end(1, samples=min(b, n - batch * b), loss=(lambda: float(logs["loss"])) if has_loss else None)

            def on_epoch_end(self, epoch, logs=None):
                meter.epoch_end(epoch, backend.evaluate)

        self.model.fit(self.dataset.train_x[:n] / 255.0, self.dataset.train_y[:n], epochs=epochs, batch_size=b, verbose=0,
                       callbacks=[ProtocolCallback()])
