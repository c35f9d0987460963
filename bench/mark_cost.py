"""What the rank clock's collective marks cost a step, in one process on CPU (one thread).

The framework backends mark when a rank reaches and leaves its collective without changing the
framework's path (``scaling.rank_clock``):

- PyTorch (DDP, Lightning, Horovod): one ``register_post_accumulate_grad_hook`` on the parameter
  autograd accumulates last (``torch_common.GradientArrival``). Measured: a backward of a small
  leaf with and without that hook.
- TensorFlow: ``tf.timestamp()`` traced into the step twice, with control dependencies on the
  gradients (``tf_common.Stamps``), the stamps returned with the loss and read only when the run
  ends. Measured: a ``tf.function`` call with and without the stamps, and, for comparison, what
  reading the stamps in every step would cost (which is why they are read at the end).

Modes alternate in blocks, ``--rounds`` times; the medians over rounds are printed in
microseconds per step. Run on an otherwise idle machine:

    python bench/mark_cost.py                # both frameworks
    python bench/mark_cost.py --only torch
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def per_call_us(fn, calls: int) -> float:
    for _ in range(min(200, calls)):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def torch_hook(rounds: int, calls: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    w = torch.zeros(10, requires_grad=True)
    sink = [0]

    def hook(_param) -> None:
        sink[0] = time.monotonic_ns()

    def backward() -> None:
        (w * 2).sum().backward()

    out: dict[str, list[float]] = {"backward": [], "backward + hook": []}
    for _ in range(rounds):
        out["backward"].append(per_call_us(backward, calls))
        handle = w.register_post_accumulate_grad_hook(hook)
        out["backward + hook"].append(per_call_us(backward, calls))
        handle.remove()
    return {k: statistics.median(v) for k, v in out.items()}


def tf_stamps(rounds: int, calls: int) -> dict[str, float]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from scaling.backends.tf_common import Stamps

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    w = tf.Variable(tf.ones([64, 64]))

    def make(enabled: bool):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(w * w)
            stamps = Stamps(enabled)
            grads = tape.gradient(loss, [w])
            stamps.reached(grads)
            stamps.left(grads)
            w.assign_sub(grads[0] * 1e-6)
            return stamps.attach(loss)
        return step

    plain, stamped = make(False), make(True)
    kept: list = []

    def keep() -> None:  # what the backends do: keep the output, read it when the run ends
        kept.append(stamped()[1])
        if len(kept) > 4096:
            kept.clear()

    def read() -> None:
        stamped()[1].numpy()

    out: dict[str, list[float]] = {"step": [], "step + stamps (kept)": [], "step + stamps (read every step)": []}
    for _ in range(rounds):
        out["step"].append(per_call_us(plain, calls))
        out["step + stamps (kept)"].append(per_call_us(keep, calls))
        out["step + stamps (read every step)"].append(per_call_us(read, calls))
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("torch", "tf"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10000)
    args = parser.parse_args()
    for name, bench in (("torch", torch_hook), ("tf", tf_stamps)):
        if args.only in (None, name):
            figures = bench(args.rounds, args.calls)
            base = next(iter(figures.values()))
            for label, us in figures.items():
                print(f"{name:6s} {label:34s} {us:8.2f} us/step  (+{us - base:.2f})", flush=True)


if __name__ == "__main__":
    main()
