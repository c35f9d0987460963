"""The reference loop over Horovod with TensorFlow (``horovod_tf_reference``): the ``horovod_tf``
step without ``DistributedGradientTape``: tape gradient, every gradient concatenated into one flat
tensor, one ``hvd.allreduce`` of it (sum), divided by the world size, split back, Keras Adam step.
The practical floor for ``horovod_tf`` (see ``scaling.backends.torch_reference``): the same
set-up, broadcast of the initial variables, data layout, ``steps_per_call`` and tuned settings.

The all-reduce is traced into the step's ``tf.function``; the rank clock's marks are stamped
there (``tf_common.Stamps``): when the local gradients are computed and when the reduced ones are.
"""
from __future__ import annotations

from scaling import settings
from scaling.backends import tf_common
from scaling.backends.horovod_tf import HorovodTF


class HorovodTFReference(HorovodTF):
    def all_reduced_gradients(self, tape, loss, variables, stamps: tf_common.Stamps) -> list:
        hvd = self.hvd
        local = tape.gradient(loss, variables)
        stamps.reached(local)
        reduced = tf_common.flat_all_reduce(local, lambda flat: hvd.allreduce(flat, op=hvd.Sum, name="flat_gradient"),
                                            1.0 / self.world)
        stamps.left(reduced)
        return reduced

    def settings_in_force(self) -> dict:
        return {"all_reduce": "one flat buffer per step (the gradients concatenated)", **settings.horovod_in_force()}
