"""The reference loop over TensorFlow's collective all-reduce (``tf_reference``): the
``tf_multiworker`` loop, same ``MultiWorkerMirroredStrategy`` (tuned ``CommunicationOptions``
included), data layout, ``steps_per_call`` and ``jit_compile``, whose replica step makes one
collective call for the whole gradient: tape gradient, every gradient concatenated into one flat
tensor, one ``get_replica_context().all_reduce(SUM, flat)``, split back, Keras Adam step. The
practical floor for ``tf_multiworker``.

The loss is each replica's per-example losses summed and divided by the *global* batch
(``tf.nn.compute_average_loss``, as in ``tf_multiworker``), so the sum over replicas is already the
global batch's mean gradient: nothing is divided after the all-reduce.

Keras 3 has no switch to keep its optimizer from aggregating (Keras 2's
``experimental_aggregate_gradients`` is gone): under a strategy, ``apply_gradients`` in a replica
context sums the gradients over replicas in ``TFOptimizer._all_reduce_sum_gradients`` before its
update. The optimizer here is Keras' Adam with that one method returning the gradients as they are,
so the gradient is all-reduced once, by the step. A Keras without that method is refused at start
(its optimizer would sum the summed gradients again).

The all-reduce is traced into the step; the rank clock's marks are stamped there
(``tf_common.Stamps``): when the local gradients are computed and when the reduced ones are.
"""
from __future__ import annotations

from functools import cache
from scaling.backends import RunContext, tf_common
from scaling.backends.tf_multiworker import TFMultiWorker


@cache
def adam_without_aggregation() -> type:
    """Keras' Adam whose ``apply_gradients`` takes the gradients as already summed over replicas."""
    import keras

    if not callable(getattr(keras.optimizers.Adam, "_all_reduce_sum_gradients", None)):
        raise RuntimeError(f"tf_reference: Keras {keras.__version__} has no TFOptimizer._all_reduce_sum_gradients, "
                           "the step where its optimizer sums gradients over replicas; the reference loop "
                           "cannot keep it from summing them a second time")

    class AdamWithoutAggregation(keras.optimizers.Adam):
        def _all_reduce_sum_gradients(self, grads_and_vars):
            return list(grads_and_vars)  # the step's one flat all-reduce already summed them

    return AdamWithoutAggregation


class TFReference(TFMultiWorker):
    def model_and_optimizer(self, ctx: RunContext) -> tuple:
        return tf_common.model_and_adam(ctx, adam=adam_without_aggregation())

    def replica_gradients(self, tape, loss, variables, stamps: tf_common.Stamps) -> list:
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        local = tape.gradient(loss, variables)
        stamps.reached(local)
        reduced = tf_common.flat_all_reduce(local, lambda flat: context.all_reduce(tf.distribute.ReduceOp.SUM, flat))
        stamps.left(reduced)
        return reduced

    def settings_in_force(self) -> dict:
        return {**super().settings_in_force(), "all_reduce": "one flat buffer per step (the gradients concatenated)"}
