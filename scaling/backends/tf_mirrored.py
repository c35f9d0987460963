"""TensorFlow MirroredStrategy: one process holding all of a node's devices.

On GPUs the replicas are the node's GPUs; with no GPU the CPU is split into N logical devices
(``tf.config.set_logical_device_configuration``) so the same strategy runs here.
"""
from __future__ import annotations

from scaling.backends import RunContext
from scaling.backends import tf_common
from scaling.backends.tf_strategy_loop import TFStrategyLoop


class TFMirrored(TFStrategyLoop):
    def make_strategy(self, ctx: RunContext, jit_compile: bool = False):
        import tensorflow as tf

        n = int(ctx.config["devices"])
        threads = ctx.config.get("threads")
        tf_common.configure(threads, ctx.config["device"])
        if threads:  # one inter-op thread per replica, or the replicas take turns
            tf.config.threading.set_inter_op_parallelism_threads(max(int(threads), n))
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            if len(gpus) < n:
                raise RuntimeError(f"tf_mirrored: devices={n} but TensorFlow sees {len(gpus)} GPU(s)")
            names = [f"/gpu:{i}" for i in range(n)]
        else:
            if jit_compile:
                raise RuntimeError(
                    "tf_mirrored: jit_compile=true needs GPUs; XLA cannot use variables on logical CPU devices "
                    "(XLA known issue 'tf.Variable on a different device'). Use backend.steps_per_call here")
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
            names = [f"/cpu:{i}" for i in range(n)]
        return tf.distribute.MirroredStrategy(devices=names)
