"""TensorFlow MultiWorkerMirroredStrategy: one process per worker, collective all-reduce between.

Locally each worker is a process with its own ``TF_CONFIG`` (written by ``launch/local.py``), one
CPU device each where there is no GPU. Under Slurm the cluster comes from ``SlurmClusterResolver``
(one task per node holding the node's GPUs), with explicit GPU counts so CPU nodes work too.
"""
from __future__ import annotations

import os

from scaling.backends import RunContext
from scaling.backends import tf_common
from scaling.backends.tf_strategy_loop import TFStrategyLoop


class TFMultiWorker(TFStrategyLoop):
    one_process_per_device = True

    def make_strategy(self, ctx: RunContext):
        import tensorflow as tf

        tf_common.configure(ctx.config.get("threads"), ctx.config["device"])
        if ctx.config["backend"].get("jit_compile") and not tf.config.list_physical_devices("GPU"):
            raise RuntimeError("tf_multiworker: jit_compile=true needs GPUs; XLA has no CPU kernel for the "
                               "collective all-reduce. Use backend.steps_per_call here")
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
        resolver = None
        if "TF_CONFIG" not in os.environ and "SLURM_JOB_ID" in os.environ:
            gpus = len(tf.config.list_physical_devices("GPU"))
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
                port_base=int(os.environ.get("SCALING_TF_PORT", "8888")),
                gpus_per_node=gpus, gpus_per_task=gpus, auto_set_gpu=False)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
        self.devices = max(1, len(tf.config.list_logical_devices("GPU")))
        return strategy
