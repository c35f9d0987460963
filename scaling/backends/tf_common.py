"""TensorFlow pieces the TF-based backends share: threads, device placement, data, evaluation."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's start-up chatter out of the run's output

import numpy as np
import tensorflow as tf


def configure(threads: int | None, device: str) -> None:
    """Set threads and visible devices; must run before TensorFlow executes its first op."""
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(int(threads))
    gpus = tf.config.list_physical_devices("GPU")
    if device == "cpu" and gpus:
        tf.config.set_visible_devices([], "GPU")
    elif device == "cuda" and not gpus:
        raise RuntimeError("device=cuda requested but TensorFlow sees no GPU (tf.config.list_physical_devices('GPU') is empty)")
    for gpu in tf.config.list_physical_devices("GPU") if device != "cpu" else []:
        tf.config.experimental.set_memory_growth(gpu, True)


def device_name() -> str:
    return "/GPU:0" if tf.config.list_logical_devices("GPU") else "/CPU:0"


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 images -> float32 in [0, 1] (the same scaling the torch backends use), labels -> int32."""
    x = tf.constant(np.ascontiguousarray(images), dtype=tf.uint8)
    return tf.cast(x, tf.float32) / 255.0, tf.constant(np.asarray(labels, dtype=np.int32))


def make_evaluator(model, batch: int = 1000):
    """A compiled evaluation: mean cross-entropy and accuracy over a test set, dropout off."""
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

    @tf.function
    def _batch(x, y):
        logits = model(x, training=False)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), y), tf.int64))
        return tf.cast(loss_fn(y, logits), tf.float64), correct

    def evaluate(x: tf.Tensor, y: tf.Tensor) -> tuple[float, float]:
        n = int(x.shape[0])
        loss, correct = 0.0, 0
        for start in range(0, n, batch):
            l, c = _batch(x[start:start + batch], y[start:start + batch])
            loss += float(l)
            correct += int(c)
        return loss / n, correct / n

    return evaluate


def device_memory_peak() -> int | None:
    if not tf.config.list_logical_devices("GPU"):
        return None
    return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])


def environment() -> dict:
    import keras

    env = {"frameworks": {"tensorflow": tf.__version__, "keras": keras.__version__}, "gpu": None,
           "device": device_name(),
           "threads": tf.config.threading.get_intra_op_parallelism_threads()}
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        build = tf.sysconfig.get_build_info()
        env["gpu"] = {"count": len(gpus), "model": details.get("device_name"),
                      "cuda": build.get("cuda_version"), "cudnn": build.get("cudnn_version")}
    return env
