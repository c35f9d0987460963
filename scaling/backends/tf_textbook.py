"""TensorFlow the way the Keras tutorial writes it: ``model.compile`` + ``model.fit`` on numpy
arrays scaled by ``/ 255.0``, batch 64, ``fit`` shuffling each epoch and training the last,
partial batch. The protocol sees the loop through a Keras callback.
"""
from __future__ import annotations

from scaling.backends import RunContext
from scaling.backends import tf_common
from scaling.protocol import Measurement


class TFTextbook:
    devices = 1
    evaluation = "shard"  # one device: its shard is the whole test set

    def __init__(self, ctx: RunContext) -> None:
        cfg, train = ctx.config, ctx.train
        tf_common.configure(cfg.get("threads"), cfg["device"])
        import keras

        from scaling.workloads import tf_models

        self.ctx = ctx
        keras.utils.set_random_seed(cfg["seed"])
        self.global_batch = ctx.geometry.global_batch
        ds = ctx.dataset
        limit = train.get("max_steps_per_epoch")
        n = min(len(ds.train_y), limit * self.global_batch) if limit else len(ds.train_y)
        self.x_train, self.y_train = ds.train_x[:n] / 255.0, ds.train_y[:n]
        self.x_test, self.y_test = ds.test_x / 255.0, ds.test_y
        self.steps_per_epoch = -(-n // self.global_batch)
        self.model = tf_models.build(cfg["workload"], ds.num_classes)
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

    def train(self, meter: Measurement) -> None:
        import keras

        backend = self
        n = len(self.y_train)
        b = self.global_batch

        class ProtocolCallback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                meter.epoch_begin(epoch)

            def on_train_batch_begin(self, batch, logs=None):
                meter.step_begin()

            def on_train_batch_end(self, batch, logs=None):
                backend._logs = logs
                before = meter.steps_done
                meter.step_end(1, samples=min(b, n - batch * b))
                if meter.wants_loss(before) and logs and "loss" in logs:
                    meter.record_loss(float(logs["loss"]))  # Keras reports the epoch's running mean

            def on_epoch_end(self, epoch, logs=None):
                meter.epoch_end(epoch)
                t0 = meter.now()
                loss, acc = self.model.evaluate(backend.x_test, backend.y_test, batch_size=1000, verbose=0)
                meter.evaluated(epoch, loss, acc, meter.now() - t0)

        self.model.fit(self.x_train, self.y_train, epochs=int(self.ctx.train["epochs"]),
                       batch_size=b, verbose=0, callbacks=[ProtocolCallback()])
