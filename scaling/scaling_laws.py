"""The serial-fraction laws fitted beside the alpha-beta model, and the model's own error.

* strong scaling (fixed total work): Amdahl, ``1/S(N) = f + (1 - f)/N``;
* weak scaling (work grows with N): Gustafson, ``S(N) = N - s (N - 1)``.

Both are fitted by non-negative least squares over the N > 1 median speedups (``scaling.metrics``), the pooled
counterparts of the per-N Karp-Flatt and Gustafson fractions.

The model's error: the alpha-beta model fitted without one device count predicts it; the largest
such leave-one-N-out error (in log terms) widens every prediction interval, so an interval covers
how wrong the model has been on these points and not only the repeat noise.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd

from scaling import metrics


def _nonnegative_slope(x: np.ndarray, y: np.ndarray) -> float:
    """The least-squares ``f >= 0`` of ``y ~ f x`` (``scipy.optimize.nnls`` with one column)."""
    from scipy.optimize import nnls

    return float(nnls(np.asarray(x, float)[:, None], np.asarray(y, float))[0][0])


def amdahl_fraction(n: np.ndarray, speedup: np.ndarray) -> float:
    """Least-squares serial fraction of ``1/S = f + (1-f)/N`` over the N > 1 points, at least 0."""
    n, speedup = np.asarray(n, float), np.asarray(speedup, float)
    keep = (n > 1) & (speedup > 0)
    if not keep.any():
        return math.nan
    return _nonnegative_slope(1.0 - 1.0 / n[keep], 1.0 / speedup[keep] - 1.0 / n[keep])


def amdahl_speedup(n: np.ndarray | list, f: float) -> np.ndarray:
    n = np.asarray(n, float)
    return 1.0 / (f + (1.0 - f) / n)


def gustafson_fraction(n: np.ndarray, speedup: np.ndarray) -> float:
    """Least-squares serial fraction of ``S = N - s (N - 1)`` over the N > 1 points, at least 0."""
    n, speedup = np.asarray(n, float), np.asarray(speedup, float)
    keep = (n > 1) & np.isfinite(speedup)
    if not keep.any():
        return math.nan
    return _nonnegative_slope(n[keep] - 1.0, n[keep] - speedup[keep])


def gustafson_speedup(n: np.ndarray | list, s: float) -> np.ndarray:
    """``N - s (N - 1)``, at least 0 (a fraction above 1, from runs that slow down, would go negative)."""
    n = np.asarray(n, float)
    return np.maximum(n - s * (n - 1.0), 0.0)


def law(scaling: str) -> tuple[str, Callable, Callable]:
    """(name, fraction fit, speedup) of the scaling mode's law."""
    if scaling == "strong":
        return "Amdahl", amdahl_fraction, amdahl_speedup
    return "Gustafson", gustafson_fraction, gustafson_speedup


def median_speedups(n: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct N and the speedup at each (median at N over median at 1)."""
    ns = np.unique(n)
    by_n = metrics.cell_speedups({int(v): thr[n == v] for v in ns})
    return ns, np.array([by_n[int(v)] for v in ns])


def loo_log_error(points: pd.DataFrame, fit_cell: Callable, predict_at: Callable) -> float:
    """The largest ``|log(predicted / measured median)|`` over the device counts, each predicted by
    the model fitted without it (NaN below 3 device counts: nothing to leave out and still fit).
    ``predict_at(fit, n)`` gives (low, mid, high) readings; the error is to the nearest reading."""
    ns = sorted(points["N"].unique())
    if len(ns) < 3:
        return math.nan
    errors = []
    for held in ns:
        if held == 1:
            continue  # the base; the law and the compute term need it
        rest = points[points["N"] != held]
        fit = fit_cell(rest, bootstrap=0)
        low, mid, high = predict_at(fit, held)
        measured = float(points.loc[points["N"] == held, "samples_per_s"].median())
        if math.isfinite(mid):
            errors.append(abs(math.log(mid / measured)))
        elif low <= measured <= high:
            errors.append(0.0)
        elif math.isfinite(low) and math.isfinite(high):
            errors.append(min(abs(math.log(low / measured)), abs(math.log(high / measured))))
    return max(errors) if errors else math.nan
