"""The reference loop over Horovod with TensorFlow (``horovod_tf_reference``): the ``horovod_tf``
step without ``DistributedGradientTape``: tape gradient, every gradient concatenated into one flat
tensor, one ``hvd.allreduce`` of it (sum), divided by the world size, split back, Keras Adam step.
The practical floor for ``horovod_tf`` (see ``scaling.backends.torch_reference``): the same
set-up, broadcast of the initial variables, data layout, ``steps_per_call`` and tuned settings.

The all-reduce is traced into the step's ``tf.function``, so the host never sees when a rank
reaches or leaves it: marking it for the rank clock would mean running it eagerly or through
``tf.py_function``, a change of the very cost this loop is the floor of. It is not marked.
"""
from __future__ import annotations

from typing import Callable

from scaling import settings
from scaling.backends import tf_common
from scaling.backends.horovod_tf import HorovodTF


class HorovodTFReference(HorovodTF):
    def all_reduced_gradients(self, tape, loss, variables) -> list:
        hvd = self.hvd
        return tf_common.flat_all_reduce(tape.gradient(loss, variables),
                                         lambda flat: hvd.allreduce(flat, op=hvd.Sum, name="flat_gradient"),
                                         1.0 / self.world)

    def mark_collective(self, reached: Callable[[], None], left: Callable[[], None]) -> bool:
        return False  # inside the compiled step: see the module's docstring

    def settings_in_force(self) -> dict:
        return {"all_reduce": "one flat buffer per step (the gradients concatenated)", **settings.horovod_in_force()}
