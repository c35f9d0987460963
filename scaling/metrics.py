"""Scaling metrics, defined once: speedup, efficiency and the serial fractions.

Every reader of the records (the aggregate behind `results show|export` and the dashboard, the W&B
sweep summary, the scaling model, bench/backends.py) computes these figures with the functions
below, so they print the same numbers for the same records.

* ``N`` = devices per node x nodes (the layout, ``<devices per node>x<nodes>``, is kept beside it).
* throughput of a cell = the median samples/s over its ok repeats (rates: median, never a mean).
* speedup ``S(N) = median throughput(N) / median throughput(1)`` of the same backend, workload,
  data, scaling mode, variant and settings; the base is that backend's own N = 1 cell.
* efficiency ``E(N) = S(N) / N`` (1 is ideal in both scaling modes: weak scaling grows the work
  with N, strong scaling splits it, either way ideal throughput grows as N).
* efficiency against the framework's best single device ``E_fw(N) = throughput(N) / (N x best)``,
  ``best`` the highest median samples/s of any N = 1 cell (backend and settings) of the same
  framework in the study: a slow N = 1 base flatters its own efficiency, this one does not.
* strong scaling (fixed total work): Karp-Flatt serial fraction ``e = (1/S - 1/N) / (1 - 1/N)``,
  the Amdahl serial fraction that would explain the measured speedup.
* weak scaling (work grows with N): Gustafson's scaled serial fraction ``s = (N - S) / (N - 1)``,
  from the scaled speedup ``S = N - s (N - 1)``.

No framework imports: numpy only.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np


def median(values: Iterable[float]) -> float:
    """The median of the finite values; NaN when there are none."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(np.median(arr)) if arr.size else math.nan


def speedup(throughput_n: float, throughput_1: float) -> float:
    """``throughput(N) / throughput(1)``; NaN when the base is missing or not positive."""
    if not (throughput_1 > 0) or not math.isfinite(throughput_n):
        return math.nan
    return float(throughput_n) / float(throughput_1)


def efficiency(s: float, n: float) -> float:
    """``S / N``."""
    return float(s) / float(n) if n > 0 else math.nan


def karp_flatt(s: float, n: float) -> float:
    """Karp-Flatt serial fraction for strong scaling; NaN for N = 1 or no speedup."""
    if not (n > 1) or not (s > 0):
        return math.nan
    return (1.0 / s - 1.0 / n) / (1.0 - 1.0 / n)


def gustafson_serial(s: float, n: float) -> float:
    """Gustafson's scaled serial fraction for weak scaling ``(N - S) / (N - 1)``; NaN for N = 1."""
    if not (n > 1) or not math.isfinite(s):
        return math.nan
    return (n - s) / (n - 1.0)


def serial_fraction(s: float, n: float, scaling: str) -> float:
    """The serial fraction of the scaling mode's law: Karp-Flatt (strong) or Gustafson (weak)."""
    return karp_flatt(s, n) if scaling == "strong" else gustafson_serial(s, n)


def serial_law(scaling: str) -> str:
    return "Karp-Flatt" if scaling == "strong" else "Gustafson"


def cell_speedups(throughputs: dict[int, Sequence[float]]) -> dict[int, float]:
    """Speedup per N of one series (``{N: repeats' samples/s}``): median at N over median at 1."""
    base = median(throughputs.get(1, []))
    return {n: speedup(median(values), base) for n, values in throughputs.items()}


def best_single_device(bases: Mapping[str, float]) -> tuple[str | None, float]:
    """The fastest single-device cell of one framework: (its label, its median samples/s) out of
    ``{label: median samples/s at N = 1}``; (None, NaN) when none has a positive throughput."""
    found = {k: v for k, v in bases.items() if v is not None and v > 0}
    if not found:
        return None, math.nan
    label = max(sorted(found), key=found.__getitem__)
    return label, float(found[label])


def efficiency_vs_best(throughput_n: float, n: float, best: float) -> float:
    """``throughput(N) / (N x best)``: the efficiency against the framework's best single device."""
    return efficiency(speedup(throughput_n, best), n)
