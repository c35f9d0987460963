"""The study's networks, defined once per framework, side by side (torch_models.py, tf_models.py).

Both files build the same layers in the same order; ``PARAMETERS`` is the count both must give.
"""

WORKLOADS = ("mlp", "cnn")

#: trainable parameters of each workload, identical in both frameworks
PARAMETERS = {
    "mlp": 784 * 128 + 128 + 128 * 10 + 10,  # 101,770
    "cnn": (9 * 32 + 32) + (9 * 32 * 64 + 64) + (12 * 12 * 64 * 128 + 128) + (128 * 10 + 10),  # 1,199,882
}
