"""Keras (TensorFlow) versions of the workloads: the twins of torch_models.py, layer for layer,
named by the workload YAMLs' ``build.tf``.

Both output logits and train with ``SparseCategoricalCrossentropy(from_logits=True)``: the same
loss as PyTorch's ``log_softmax`` + ``nll_loss``, as in the TensorFlow quickstart.
"""
from __future__ import annotations

import keras
from keras import layers

from scaling import workloads


def mlp(num_classes: int = 10, hidden: int = 128) -> keras.Model:
    """Flatten 28x28 -> Dense 128 ReLU -> Dropout 0.2 -> Dense 10 (the Keras tutorial's MLP)."""
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28)),
            layers.Flatten(),
            layers.Dense(hidden, activation="relu"),
            layers.Dropout(0.2),
            layers.Dense(num_classes),
        ],
        name="mlp",
    )


def cnn(num_classes: int = 10, hidden: int = 128) -> keras.Model:
    """conv 32 3x3 -> conv 64 3x3 -> maxpool 2 -> dropout 0.25 -> dense 128 -> dropout 0.5 -> dense 10."""
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28)),
            layers.Reshape((28, 28, 1)),  # NHWC, TensorFlow's layout
            layers.Conv2D(32, 3, activation="relu"),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(hidden, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(num_classes),
        ],
        name="cnn",
    )


def build(workload: str | dict, num_classes: int = 10) -> keras.Model:
    """The workload (a name, or its config) as a Keras model: its YAML's ``build.tf`` (``scaling.workloads.build``)."""
    return workloads.build(workload, "tf", num_classes, parameter_count)


def parameter_count(model: keras.Model) -> int:
    return int(sum(int(v.numpy().size) for v in model.trainable_variables))
