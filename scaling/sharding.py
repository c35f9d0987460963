"""Which samples each rank trains on, step after step: the one sample order of an epoch and its
split over ranks. Every backend of both frameworks calls these two functions, so differences
between runs come from the frameworks, not from the data order. numpy only (beside
``scaling.geometry``, which sizes the batches these functions cut)."""
from __future__ import annotations

import numpy as np

__all__ = ["epoch_permutation", "rank_shard"]


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The one sample order every backend uses for (seed, epoch): identical across frameworks."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def rank_shard(perm: np.ndarray, global_batch: int, rank: int, per_device_batch: int) -> np.ndarray:
    """This rank's samples of an epoch, step after step: full global batches only.

    Step s's global batch is ``perm[s*G:(s+1)*G]`` whatever the device count, and rank r takes the
    r-th slice of ``per_device_batch`` of it. So ranks see disjoint samples that together cover
    every full batch, and N workers at global batch G train on the same batches, in the same
    order, as one worker at G.
    """
    steps = len(perm) // global_batch
    batches = perm[: steps * global_batch].reshape(steps, global_batch)
    return np.ascontiguousarray(batches[:, rank * per_device_batch:(rank + 1) * per_device_batch]).reshape(-1)
