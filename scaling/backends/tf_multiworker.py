"""TensorFlow MultiWorkerMirroredStrategy: one process per worker, collective all-reduce between.

Locally each worker is a process with its own ``TF_CONFIG`` (written by ``launch/local.py``), one
CPU device each where there is no GPU. Under Slurm the cluster comes from ``SlurmClusterResolver``
(one task per node holding the node's GPUs), with explicit GPU counts so CPU nodes work too.
"""
from __future__ import annotations

import os

from scaling import settings
from scaling.backends import RunContext
from scaling.backends import tf_common
from scaling.backends.tf_strategy_loop import TFStrategyLoop


class TFMultiWorker(TFStrategyLoop):
    def make_strategy(self, ctx: RunContext, jit_compile: bool = False):
        import tensorflow as tf

        tf_common.configure(ctx.config.get("threads"), ctx.config["device"])
        if jit_compile and not tf.config.list_physical_devices("GPU"):
            raise RuntimeError("tf_multiworker: jit_compile=true needs GPUs; XLA has no CPU kernel for the "
                               "collective all-reduce. Use backend.steps_per_call here")
        tuned = settings.in_force(ctx.config)
        implementation = str(tuned.get("implementation") or "AUTO").upper()
        if implementation == "NCCL" and not tf.config.list_physical_devices("GPU"):
            implementation = "RING"  # TensorFlow's own CPU fallback, made explicit in the record
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=getattr(tf.distribute.experimental.CommunicationImplementation, implementation),
            bytes_per_pack=int(tuned.get("bytes_per_pack") or 0))
        resolver = None
        if "TF_CONFIG" not in os.environ and "SLURM_JOB_ID" in os.environ:
            resolver = slurm_resolver(tf)
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)

    def settings_in_force(self) -> dict:
        options = self.strategy.extended._communication_options
        return {"implementation": options.implementation.name, "bytes_per_pack": int(options.bytes_per_pack)}


def slurm_resolver(tf):
    """``SlurmClusterResolver`` for one task per node holding the node's GPUs.

    GPU counts are passed explicitly: its defaults call nvidia-smi (missing on CPU nodes) and a
    count of 0 breaks its port/GPU pairing, so CPU nodes count as one "GPU" slot with
    ``auto_set_gpu=False``. Where several tasks resolve to one address and port (emulated nodes
    sharing a host, as in tests/slurm), each task gets its node's NodeAddr and its own port.
    """
    import subprocess

    gpus = max(1, len(tf.config.list_physical_devices("GPU")))
    port_base = int(os.environ.get("SCALING_TF_PORT", str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)))
    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=port_base, gpus_per_node=gpus, gpus_per_task=gpus, auto_set_gpu=False)
    spec = resolver.cluster_spec().as_dict()
    workers = spec["worker"]
    if len(set(workers)) == len(workers) and all(_resolvable(w.rsplit(":", 1)[0]) for w in workers):
        return resolver
    addressed = []
    for i, hostport in enumerate(workers):
        host = hostport.rsplit(":", 1)[0]
        out = subprocess.run(["scontrol", "show", "node", host, "-o"], capture_output=True, text=True, timeout=30).stdout
        addr = next((f.split("=", 1)[1] for f in out.split() if f.startswith("NodeAddr=")), host)
        addressed.append(f"{addr}:{port_base + i}")
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": addressed}), task_type="worker", task_id=resolver.task_id, rpc_layer="grpc")


def _resolvable(host: str) -> bool:
    import socket

    try:
        socket.getaddrinfo(host, None)
        return True
    except OSError:
        return False
