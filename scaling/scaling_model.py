"""A scaling model fitted to measured step times, and an honest check of its predictions.

Per backend and workload the per-step time is modelled as compute plus a ring all-reduce::

    T(N) = T_compute(N) + 2 (N - 1) alpha + 2 (N - 1) / N * S / beta

``S`` is the gradient size in bytes (fp32: parameters x 4; MLP 407,080 B, CNN 4,799,528 B),
``alpha`` the per-message latency (s) and ``beta`` the bandwidth (B/s). Weak scaling keeps the
per-device batch, so ``T_compute(N) = T0``; strong scaling splits a fixed global batch, so
``T_compute(N) = T0 / N``. The model is linear in ``(T0, alpha, 1/beta)``, all non-negative, so it
is fitted by non-negative least squares (scipy) over every repeat's point, in relative terms (each
point weighted by 1/T, so N = 1 counts as much as the largest N). The measured step time
is the *effective* one, ``global_batch / samples_per_s``, so a predicted step time turns into a
predicted throughput without another assumption.

With N = 1 and 2 only, ``alpha`` and ``beta`` cannot be told apart (one extra point, two costs):
the fit says so and brackets every prediction between the two extreme readings of the measured
cost, all latency (grows as N) and all bandwidth (saturates at 2 S / beta). Intervals are
percentiles of a bootstrap over repeats within each N, widened by the model's own error: the
largest leave-one-N-out prediction error on the measured points (``scaling.scaling_laws``), so
they say how far off the model has been, not only how noisy the repeats were.

Beside it, the scaling mode's serial-fraction law (``scaling.scaling_laws``): Amdahl's
``1/S(N) = f + (1 - f)/N`` for strong scaling, Gustafson's ``S(N) = N - s (N - 1)`` for weak.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from scaling import analysis
from scaling.scaling_laws import amdahl_fraction, amdahl_speedup, law, loo_log_error, median_speedups

__all__ = ["amdahl_fraction", "amdahl_speedup", "fit_cell", "fit_all", "validate", "validate_all"]

#: devices the predictions are made for
DEFAULT_TARGETS = (16, 32, 64, 128, 256, 512, 1024)
BOOTSTRAP = 400
PARAMS = ("t_compute_s", "alpha_s", "inv_beta_s_per_byte")


def gradient_bytes(workload: str, parameters: float | None = None, bytes_per_param: int = 4) -> int:
    """Bytes all-reduced per step: the workload's parameters in fp32."""
    if parameters is None or (isinstance(parameters, float) and math.isnan(parameters)):
        parameters = analysis.workload_parameters(workload)
    if parameters is None:
        raise ValueError(f"unknown parameter count for workload {workload!r}")
    return int(parameters) * bytes_per_param


def design(n: Sequence[float] | np.ndarray, scaling: str, grad_bytes: float) -> np.ndarray:
    """Columns: compute (1 weak, 1/N strong), 2(N-1) (latency), 2(N-1)/N * S (bandwidth)."""
    n = np.asarray(n, dtype=float)
    compute = np.ones_like(n) if scaling == "weak" else 1.0 / n
    return np.column_stack([compute, 2.0 * (n - 1.0), 2.0 * (n - 1.0) / n * grad_bytes])


def step_time(n: Sequence[float] | np.ndarray, theta: Sequence[float], scaling: str, grad_bytes: float) -> np.ndarray:
    """T(N) for parameters ``theta = (T0, alpha, 1/beta)``."""
    return design(n, scaling, grad_bytes) @ np.asarray(theta, dtype=float)


def nnls(a: np.ndarray, y: np.ndarray, columns: Sequence[int] | None = None) -> np.ndarray:
    """Non-negative least squares (``scipy.optimize.nnls``) on unit-norm columns, so the compute,
    latency and bandwidth columns (whose scales differ by ~1e10) are equally well conditioned.
    Columns outside ``columns`` are held at zero."""
    from scipy.optimize import nnls as scipy_nnls

    cols = list(range(a.shape[1])) if columns is None else list(columns)
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    coef, _ = scipy_nnls(a[:, cols] / norms[cols], y)
    out = np.zeros(a.shape[1])
    out[cols] = coef
    return out / norms


def fit_relative(a: np.ndarray, t: np.ndarray, columns: Sequence[int] | None = None) -> np.ndarray:
    """Non-negative least squares of the relative residual ``(model - t) / t``."""
    return nnls(a / t[:, None], np.ones_like(t), columns)


def identifiable_rank(n_values: Sequence[float], scaling: str, grad_bytes: float) -> int:
    """Rank of the model's design over the distinct device counts (3 = every parameter identifiable)."""
    a = design(sorted(set(n_values)), scaling, grad_bytes)
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    return int(np.linalg.matrix_rank(a / norms, tol=1e-9))


@dataclass
class Fit:
    """A fitted model for one backend on one study (sweep, workload, data, scaling, variant)."""

    key: dict
    scaling: str
    grad_bytes: int
    batch: float  # per-device batch (weak) or global batch (strong)
    n: np.ndarray  # per-repeat device counts
    t: np.ndarray  # per-repeat effective step times (s)
    throughput: np.ndarray  # per-repeat samples/s
    theta: np.ndarray | None = None  # (T0, alpha, 1/beta) when identifiable
    theta_boot: np.ndarray | None = None
    #: when not identifiable: the latency-only and the bandwidth-only fits (and their bootstraps)
    bracket: dict[str, np.ndarray] = field(default_factory=dict)
    bracket_boot: dict[str, np.ndarray] = field(default_factory=dict)
    #: the scaling mode's law (Amdahl for strong, Gustafson for weak) and its serial fraction
    law_name: str = "Amdahl"
    law_f: float = math.nan
    law_boot: np.ndarray | None = None
    #: the largest leave-one-N-out |log(predicted / measured)|; widens every prediction interval
    model_error: float = math.nan
    notes: list[str] = field(default_factory=list)

    @property
    def identifiable(self) -> bool:
        return self.theta is not None

    @property
    def measured_n(self) -> list[int]:
        return sorted({int(v) for v in self.n})

    @property
    def label(self) -> str:
        layout = f" / {self.key['nodes']} nodes" if self.key.get("nodes", 1) > 1 else ""
        return f"{self.key['backend']} / {self.key['workload']} / {self.key['data']} / {self.scaling}{layout}"

    def supported(self, targets: Sequence[int]) -> list[int]:
        """The device counts a prediction may be shown for: all of ``targets`` when alpha and beta are
        identifiable; otherwise those within the measured range, where the bracket interpolates
        between measured points (beyond them the data cannot say which cost grows)."""
        if self.identifiable:
            return sorted(targets)
        return sorted(n for n in targets if n <= max(self.measured_n))

    def global_batch(self, n: np.ndarray) -> np.ndarray:
        n = np.asarray(n, float)
        return self.batch * n if self.scaling == "weak" else np.full_like(n, self.batch)

    def _thetas(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        if self.theta is not None:
            return {"fit": (self.theta, self.theta_boot)}
        return {name: (theta, self.bracket_boot.get(name)) for name, theta in self.bracket.items()}

    def parameters(self) -> pd.DataFrame:
        """alpha, beta, T0 and the law's serial fraction, each with a 95% bootstrap interval."""
        rows = []
        for name, (theta, boot) in self._thetas().items():
            with np.errstate(invalid="ignore"):
                lo, hi = (np.percentile(boot, [2.5, 97.5], axis=0) if boot is not None and len(boot)
                          else (np.full(3, np.nan), np.full(3, np.nan)))
            for i, (pname, unit) in enumerate([("T_compute", "s"), ("alpha", "s"), ("beta", "B/s")]):
                if pname == "beta":  # fitted as 1/beta; report beta (inf when no bandwidth cost)
                    value, low, high = _inv(theta[2]), _inv(hi[2]), _inv(lo[2])
                else:
                    value, low, high = theta[i], lo[i], hi[i]
                rows.append({"model": name, "parameter": pname, "value": value, "low": low, "high": high, "unit": unit})
        if not math.isnan(self.law_f):
            lo, hi = (np.nanpercentile(self.law_boot, [2.5, 97.5]) if self.law_boot is not None
                      and np.isfinite(self.law_boot).any() else (math.nan, math.nan))
            rows.append({"model": self.law_name.lower(), "parameter": "serial fraction", "value": self.law_f, "low": lo,
                         "high": hi, "unit": ""})
        return pd.DataFrame(rows)

    def predict(self, targets: Sequence[int] = DEFAULT_TARGETS, include_measured: bool = True) -> pd.DataFrame:
        """Predicted step time, throughput and efficiency per N, with a band (95% bootstrap, and for
        a non-identifiable fit the envelope of the latency-only and bandwidth-only readings, widened
        by the model's leave-one-N-out error), and the law's prediction (``law_*``)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._predict(targets, include_measured)

    def _predict(self, targets: Sequence[int], include_measured: bool) -> pd.DataFrame:
        n = np.array(sorted(set(targets) | (set(self.measured_n) if include_measured else set())), float)
        out = pd.DataFrame({"N": n.astype(int)})
        gb = self.global_batch(n)
        preds, lows, highs = [], [], []
        for name, (theta, boot) in self._thetas().items():
            t = step_time(n, theta, self.scaling, self.grad_bytes)
            thr = gb / t
            preds.append(thr)
            if boot is not None and len(boot):
                tb = np.stack([step_time(n, b, self.scaling, self.grad_bytes) for b in boot])
                thr_b = gb / tb
                lows.append(np.percentile(thr_b, 2.5, axis=0))
                highs.append(np.percentile(thr_b, 97.5, axis=0))
            else:
                lows.append(thr)
                highs.append(thr)
            if name != "fit":
                out[f"throughput_{name}"] = thr
        thr1 = {name: float(self.global_batch(np.array([1.0]))[0] / step_time([1.0], theta, self.scaling, self.grad_bytes)[0])
                for name, (theta, _) in self._thetas().items()}
        if self.identifiable:
            out["step_time_s"] = gb / preds[0]
            out["throughput"] = preds[0]
            out["efficiency"] = preds[0] / (n * thr1["fit"])
        else:
            out["step_time_s"] = np.nan
            out["throughput"] = np.nan  # no single prediction: see the bracket
            names = list(self._thetas())
            effs = [p / (n * thr1[nm]) for p, nm in zip(preds, names)]
            out["efficiency_low"] = np.min(effs, axis=0) if effs else np.nan
            out["efficiency_high"] = np.max(effs, axis=0) if effs else np.nan
        widen = math.exp(self.model_error) if math.isfinite(self.model_error) else 1.0
        out["throughput_low"] = np.min(lows, axis=0) / widen if lows else np.nan
        out["throughput_high"] = np.max(highs, axis=0) * widen if highs else np.nan
        out["model_error"] = self.model_error
        if not math.isnan(self.law_f):
            base = float(np.median(self.throughput[self.n == 1])) if (self.n == 1).any() else math.nan
            s = law(self.scaling)[2](n, self.law_f)
            out["law_throughput"] = base * s
            out["law_efficiency"] = s / n
        return out


def _inv(x: float) -> float:
    return math.inf if not x > 0 else 1.0 / x


def _resample(rng: np.random.Generator, n: np.ndarray) -> np.ndarray:
    """Indices of a bootstrap sample drawn within each device count."""
    idx = []
    for v in np.unique(n):
        members = np.flatnonzero(n == v)
        idx.append(rng.choice(members, size=len(members), replace=True))
    return np.concatenate(idx)


def fit_cell(points: pd.DataFrame, bootstrap: int = BOOTSTRAP, seed: int = 0, model_error: bool = True) -> Fit:
    """Fit one backend's points (tidy rows of one study, backend and node count, status ok);
    ``model_error``: also refit without each N to size the model's own error."""
    first = points.iloc[0]
    scaling = str(first["scaling"])
    grad = gradient_bytes(str(first["workload"]), first.get("parameters"))
    n = points["N"].to_numpy(float)
    gb = points["global_batch"].to_numpy(float)
    thr = points["samples_per_s"].to_numpy(float)
    t = gb / thr
    batch = float(np.median(gb / n)) if scaling == "weak" else float(np.median(gb))
    key = {k: first[k] for k in analysis.CELL_KEYS} | {"nodes": int(points["nodes"].max()) if "nodes" in points else 1}
    fit = Fit(key=key, scaling=scaling, grad_bytes=grad, batch=batch, n=n, t=t, throughput=thr,
              law_name=law(scaling)[0])
    a = design(n, scaling, grad)
    rng = np.random.default_rng(seed)
    boots = [_resample(rng, n) for _ in range(bootstrap)]
    rank = identifiable_rank(n, scaling, grad)
    distinct = fit.measured_n
    if rank == 3:
        fit.theta = fit_relative(a, t)
        fit.theta_boot = np.stack([fit_relative(a[i], t[i]) for i in boots]) if boots else None
        if fit.theta[1] == 0:
            fit.notes.append("alpha fitted to 0 (its bound): no per-message latency cost visible in these points")
        if fit.theta[2] == 0:
            fit.notes.append("1/beta fitted to 0 (its bound): no bandwidth cost visible, beta unbounded")
        if fit.theta[0] == 0:
            fit.notes.append("T_compute fitted to 0 (its bound): the communication terms explain all of the step time")
    elif any(v > 1 for v in distinct):
        fit.notes.append(
            f"alpha and beta are not identifiable from N = {', '.join(map(str, distinct))} (one communication "
            f"point for two costs): predictions are bracketed between all-latency (alpha only) and "
            f"all-bandwidth (beta only) readings; measure at least 3 device counts to separate them")
        for name, cols in (("latency_only", (0, 1)), ("bandwidth_only", (0, 2))):
            fit.bracket[name] = fit_relative(a, t, cols)
            fit.bracket_boot[name] = np.stack([fit_relative(a[i], t[i], cols) for i in boots]) if boots else None
    else:
        fit.notes.append(f"only N = {distinct[0]} measured: no communication cost can be fitted")
    name, fraction, _ = law(scaling)
    if 1 in distinct and len(distinct) > 1:
        ns, s = median_speedups(n, thr)
        fit.law_f = fraction(ns, s)
        fit.law_boot = np.array([fraction(*median_speedups(n[i], thr[i])) for i in boots])
        if np.any(s[ns > 1] < 1):
            fit.notes.append(f"the run slows down with more devices (speedup < 1): {name}'s law cannot represent that; "
                             "its serial fraction comes out above 1")
    elif len(distinct) > 1:
        fit.notes.append(f"no N = 1 run: no {name} fit (speedups need the one-device throughput)")
    if model_error:
        fit.model_error = loo_log_error(points, lambda p, bootstrap: fit_cell(p, bootstrap, model_error=False),
                                        _reading_at)
        if math.isfinite(fit.model_error):
            fit.notes.append(f"model error: fitted without one device count, the model missed it by up to "
                             f"{math.exp(fit.model_error) - 1:.0%}; every interval is widened by that factor")
    if fit.identifiable:
        resid = step_time(n, fit.theta, scaling, grad) / t - 1.0
        fit.notes.append(f"fit residual {np.sqrt(np.mean(resid ** 2)):.0%} of the step time (RMS over {len(t)} runs)")
    cores = pd.to_numeric(points.get("cpu_count"), errors="coerce").min() if "cpu_count" in points else math.nan
    per_node = points["devices_per_node"].max() if "devices_per_node" in points else max(distinct)
    if (points.get("accelerator", pd.Series(["cpu"])) == "cpu").all() and cores > 0 and per_node > cores:
        fit.notes.append(f"CPU workers: up to {per_node} workers shared {cores:.0f} CPU cores, so compute per step grows "
                         f"with N there; the fitted communication terms absorb that (not a network measurement)")
    return fit


def _reading_at(fit: Fit, n: int) -> tuple[float, float, float]:
    """(low, predicted, high) throughput at ``n`` before any widening: the bracket's two readings when
    the fit is not identifiable (predicted NaN then)."""
    pred = fit.predict([n], include_measured=False).iloc[0]
    if fit.identifiable:
        return float(pred["throughput"]), float(pred["throughput"]), float(pred["throughput"])
    readings = [float(pred[c]) for c in pred.index if c.startswith("throughput_") and c.endswith("_only")]
    return (min(readings), math.nan, max(readings)) if readings else (math.nan, math.nan, math.nan)


def known_gradient(points: pd.DataFrame) -> bool:
    """Whether a series' gradient size is known: its records' parameter count (counted from the
    built model), else its workload's formula. Records of a workload with neither cannot be fitted."""
    first = points.iloc[0]
    try:
        gradient_bytes(str(first["workload"]), first.get("parameters"))
    except ValueError:
        return False
    return True


def _series(ok: pd.DataFrame):
    """One backend's points per node count; a multi-node series keeps its own N = 1 base (series
    without a known gradient size are left out)."""
    for _, grp in ok.groupby(analysis.CELL_KEYS, dropna=False, sort=True):
        if not known_gradient(grp):
            continue
        for nodes, part in grp.groupby("nodes", sort=True):
            base = grp[(grp["N"] == 1) & (grp["nodes"] == 1)]
            yield part if nodes == 1 else pd.concat([base, part])


def fit_all(cells: pd.DataFrame, bootstrap: int = BOOTSTRAP, distributed_only: bool = True) -> list[Fit]:
    """One fit per (study, backend, node count); single-device backends (only N = 1) are skipped by default."""
    ok = cells[(cells["status"] == "ok") & cells["samples_per_s"].notna() & cells["global_batch"].notna()]
    fits = []
    for grp in _series(ok):
        if distributed_only and grp["N"].nunique() < 2:
            continue
        fits.append(fit_cell(grp, bootstrap=bootstrap))
    return fits


@dataclass
class Validation:
    """Fit on the smaller device counts, predict the largest, compare with its measured median."""

    label: str
    train_n: list[int]
    holdout_n: int
    measured: float
    predicted: float  # NaN when the training fit is not identifiable
    predicted_low: float
    predicted_high: float
    law_predicted: float
    notes: list[str]
    law_name: str = "Amdahl"

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1.0

    @property
    def law_error(self) -> float:
        return self.law_predicted / self.measured - 1.0

    @property
    def inside(self) -> bool:
        """Whether the measured median lies in the model's interval (or bracket)."""
        return self.predicted_low <= self.measured <= self.predicted_high

    def summary(self) -> str:
        train = ", ".join(map(str, self.train_n))
        if math.isnan(self.predicted):
            model = (f"alpha-beta model not identifiable from N = {train}: bracket "
                     f"{self.predicted_low:,.0f} .. {self.predicted_high:,.0f} samples/s "
                     f"({self.predicted_low / self.measured - 1:+.0%} .. {self.predicted_high / self.measured - 1:+.0%})")
        else:
            model = (f"alpha-beta model {self.predicted:,.0f} samples/s (interval {self.predicted_low:,.0f} .. "
                     f"{self.predicted_high:,.0f}), error {self.error:+.1%}")
        model += ", measured inside its interval" if self.inside else ", measured OUTSIDE its interval"
        other = "" if math.isnan(self.law_predicted) else (
            f"; {self.law_name} {self.law_predicted:,.0f} samples/s, error {self.law_error:+.1%}")
        return (f"{self.label}: fit on N = {train}, predict N = {self.holdout_n}: measured {self.measured:,.0f} samples/s; "
                f"{model}{other}")


def validate(points: pd.DataFrame, holdout: int | None = None, bootstrap: int = BOOTSTRAP) -> Validation:
    """Hold out the largest device count (or ``holdout``), fit on the rest, predict it."""
    ok = points[(points["status"] == "ok") & points["samples_per_s"].notna()]
    holdout = int(ok["N"].max()) if holdout is None else int(holdout)
    train = ok[ok["N"] < holdout]
    test = ok[ok["N"] == holdout]
    if train["N"].nunique() < 2 or test.empty:
        raise ValueError(f"validation needs at least two device counts below N = {holdout} and runs at N = {holdout}")
    fit = fit_cell(train, bootstrap=bootstrap)
    pred = fit.predict([holdout], include_measured=False).iloc[0]
    return Validation(
        label=fit.label, train_n=fit.measured_n, holdout_n=holdout,
        measured=float(test["samples_per_s"].median()),
        predicted=float(pred["throughput"]),
        predicted_low=float(pred["throughput_low"]), predicted_high=float(pred["throughput_high"]),
        law_predicted=float(pred.get("law_throughput", math.nan)),
        notes=fit.notes, law_name=fit.law_name,
    )


def validate_all(cells: pd.DataFrame, bootstrap: int = BOOTSTRAP) -> list[Validation]:
    """A validation for every (study, backend, node count) with at least 3 device counts."""
    ok = cells[(cells["status"] == "ok") & cells["samples_per_s"].notna()]
    out = []
    for grp in _series(ok):
        if grp["N"].nunique() >= 3:
            out.append(validate(grp, bootstrap=bootstrap))
    return out
