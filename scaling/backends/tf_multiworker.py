"""TensorFlow MultiWorkerMirroredStrategy: one process per worker, collective all-reduce between.

Each worker is a process with its own ``TF_CONFIG``: written by the local launcher (one CPU device
each where there is no GPU) or, under srun, by ``launch/slurm_env.py`` from the job (one task per
node holding the node's GPUs). TensorFlow forms the cluster from it the same way in both.
"""
from __future__ import annotations

from scaling import settings
from scaling.backends import RunContext
from scaling.backends import tf_common
from scaling.backends.tf_strategy_loop import TFStrategyLoop


class TFMultiWorker(TFStrategyLoop):
    def make_strategy(self, ctx: RunContext, jit_compile: bool = False):
        import tensorflow as tf

        tf_common.configure(ctx.config.get("threads"), ctx.config["device"])
        if jit_compile and not tf.config.list_physical_devices("GPU"):
            raise RuntimeError(f"{ctx.config['backend']['name']}: jit_compile=true needs GPUs; XLA has no CPU "
                               "kernel for the collective all-reduce. Use backend.steps_per_call here")
        tuned = settings.in_force(ctx.config)
        implementation = str(tuned.get("implementation") or "AUTO").upper()
        if implementation == "NCCL" and not tf.config.list_physical_devices("GPU"):
            implementation = "RING"  # TensorFlow's own CPU fallback, made explicit in the record
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=getattr(tf.distribute.experimental.CommunicationImplementation, implementation),
            bytes_per_pack=int(tuned.get("bytes_per_pack") or 0))
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)

    def settings_in_force(self) -> dict:
        options = self.strategy.extended._communication_options
        return {"implementation": options.implementation.name, "bytes_per_pack": int(options.bytes_per_pack)}
