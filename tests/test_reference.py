"""The reference loops (torch_reference, horovod_reference, horovod_tf_reference, tf_reference):
one flat all-reduce per step."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_one_flat_all_reduce_per_step_averages_every_gradient():
    torch = pytest.importorskip("torch")
    from scaling.backends.torch_reference import FlatAllReduce
    from scaling.workloads import torch_models

    model = torch_models.build("mlp")
    params = list(model.parameters())
    calls = []

    def fake_sum(flat):  # two ranks with identical gradients: the sum doubles them
        calls.append(flat.numel())
        flat.mul_(2)

    opt = FlatAllReduce(torch.optim.SGD(params, lr=1.0), params, world=2, all_reduce_sum=fake_sum)
    before = [p.detach().clone() for p in params]
    x = torch.rand(8, 28, 28)
    y = torch.randint(0, 10, (8,))
    model.eval()  # no dropout: the expected gradient is reproducible
    opt.zero_grad()
    torch.nn.functional.nll_loss(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in params]
    opt.step()
    assert calls == [sum(p.numel() for p in params)]  # one call, the whole gradient
    for p, b, g in zip(params, before, grads):
        assert torch.allclose(p.detach(), b - g)  # sum over 2 ranks / 2 = the gradient itself
    opt.zero_grad()
    assert all(float(p.grad.abs().sum()) == 0 for p in params)  # the views survive zero_grad


def test_tf_flat_all_reduce_is_one_call_and_averages_every_gradient():
    tf = pytest.importorskip("tensorflow")
    from scaling.backends.tf_common import flat_all_reduce

    grads = [tf.reshape(tf.range(12, dtype=tf.float32), [3, 4]), tf.constant([5.0, -1.0]),
             tf.reshape(tf.range(8, dtype=tf.float32), [2, 2, 2])]
    calls = []

    def fake_sum(flat):  # two ranks with identical gradients: the sum doubles them
        calls.append(tuple(flat.shape))
        return flat * 2

    out = flat_all_reduce(grads, fake_sum, 1.0 / 2)
    assert calls == [(22,)]  # one call, the whole gradient as one 1-D tensor
    for g, o in zip(grads, out):
        assert o.shape == g.shape and np.array_equal(o.numpy(), g.numpy())  # sum over 2 ranks / 2
    assert np.array_equal(flat_all_reduce(grads, fake_sum)[1].numpy(), [10.0, -2.0])  # no scale: the sum


def test_tf_stamps_are_traced_between_the_gradients_and_the_step_end():
    tf = pytest.importorskip("tensorflow")
    import time

    from scaling.backends.tf_common import Stamps

    w = tf.Variable([1.0, 2.0])

    def make(enabled, with_left=True):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(w * w)
            stamps = Stamps(enabled)
            grads = tape.gradient(loss, [w])
            stamps.reached(grads)
            reduced = [g * 0.5 for g in grads]  # stands in for the all-reduce
            if with_left:
                stamps.left(reduced)
            w.assign_sub(reduced[0] * 0.1)
            return stamps.attach(loss)
        return step

    assert isinstance(make(False)(), tf.Tensor)  # disabled: the loss alone, nothing traced
    before = time.time()
    loss, marks = make(True)()
    reached, left = marks.numpy()
    assert before - 1e-3 <= reached <= left <= time.time() + 1e-3 and float(loss) > 0
    assert make(True, with_left=False)()[1].numpy()[1] == -1  # left unmarked


def test_tf_reference_adam_leaves_the_gradients_to_the_step():
    pytest.importorskip("tensorflow")
    import keras

    from scaling.backends.tf_reference import adam_without_aggregation

    # the Keras hook it overrides: where TFOptimizer.apply_gradients sums over replicas
    assert callable(getattr(keras.optimizers.Adam, "_all_reduce_sum_gradients", None))
    adam = adam_without_aggregation()
    assert issubclass(adam, keras.optimizers.Adam)
    pairs = [(object(), object()), (None, object())]
    assert adam(learning_rate=0.1)._all_reduce_sum_gradients(iter(pairs)) == pairs


_COLLECTIVES_IN_STEP = """
import json, os, sys
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": sys.argv[1].split(",")},
                                      "task": {"type": "worker", "index": int(sys.argv[2])}})
import tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
import keras
from scaling.backends.tf_common import Stamps
from scaling.backends.tf_reference import TFReference, adam_without_aggregation
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    optimizer = adam_without_aggregation()(learning_rate=0.1)
    optimizer.build(model.trainable_variables)

def replica_step(x):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x))
    grads = TFReference.replica_gradients(None, tape, loss, model.trainable_variables, Stamps(True))
    optimizer.apply_gradients(zip(grads, model.trainable_variables))

@tf.function
def step(x):
    strategy.run(replica_step, args=(x,))

x = tf.ones([2, 4]) * (int(sys.argv[2]) + 1)
step(x)
graph = step.get_concrete_function(x).graph.as_graph_def()
nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
print(json.dumps({"collectives": sum(n.op.startswith("Collective") for n in nodes),
                  "stamps": sum(n.op == "Timestamp" for n in nodes),
                  "kernel": model.trainable_variables[0].numpy().ravel().tolist()}))
"""


@pytest.mark.multiprocess
def test_tf_reference_step_holds_one_collective_not_two():
    """Keras' Adam would sum the gradients over replicas a second time; Adam's update hardly
    changes with the gradient's scale, so the loss would not show it: count the step's collectives."""
    pytest.importorskip("tensorflow")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            ports.append(s.getsockname()[1])
    workers = ",".join(f"localhost:{p}" for p in ports)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, "-c", _COLLECTIVES_IN_STEP, workers, str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [r["collectives"] for r in results] == [1, 1]  # the rank clock's stamps add none
    assert [r["stamps"] for r in results] == [2, 2]
    assert results[0]["kernel"] == results[1]["kernel"]  # one update from the summed gradient


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend, module, single", [("torch_reference", "torch.distributed", "torch"),
                                                     ("horovod_reference", "horovod.torch", "torch"),
                                                     ("horovod_tf_reference", "horovod.tensorflow", "tf"),
                                                     ("tf_reference", "tensorflow", "tf")])
def test_reference_loop_tracks_one_worker_and_stays_in_sync(tmp_path, mnist_cache, backend, module, single):
    pytest.importorskip(module)
    from test_distributed import STEPS, TRACK_MAX, TRACK_MEAN, run_ok

    common = ["train.epochs=1", f"train.max_steps_per_epoch={STEPS}", "protocol.log_every=1",
              "protocol.warmup_steps=0", "scaling=strong", "train.global_batch=64"]
    one = run_ok(tmp_path, "one", f"backend={single}", "devices=1", *common)
    two = run_ok(tmp_path, "two", f"backend={backend}", "devices=2", *common)
    assert two["metrics"]["ranks_in_sync"] is True
    a = np.array([v for _, v in one["metrics"]["train_loss"]])
    b = np.array([v for _, v in two["metrics"]["train_loss"]])
    rel = np.abs(a - b) / a
    assert len(a) == len(b) == STEPS and rel.mean() <= TRACK_MEAN and rel.max() <= TRACK_MAX, (a.round(3), b.round(3))
