"""A step-time model from first principles: alpha and beta of the ring all-reduce fitted to the
micro-benchmark (``scaling comm`` records), never to the training runs, then each backend's step
time predicted from its own N = 1 step and checked against the sweep.

The collective's time for ``S`` bytes over ``N`` ranks, in the ring form (nccl-tests' model)::

    t(N, S) = 2 (N - 1) alpha + 2 (N - 1) / N * S * beta

``alpha`` is the per-step latency (s), ``beta`` the inverse bandwidth (s/B). It is linear in
(alpha, beta), both non-negative: fitted by exact non-negative least squares on the mean latency of
every message size and N of one collective path (library, variant, placement), each point weighted
by 1/t so the small messages count as much as the large ones. One N identifies both already
(the sizes separate the constant from the slope). The interval of a prediction is the 95%
bootstrap over the points, widened by the fit's RMS relative residual. The mean, not the p50:
a step's time (global batch / samples/s) is a mean over steps, and a loop of calls pays its slow
calls too; on pinned CPU ranks an all-reduce's mean can be several times its p50. Records written
before the mean was kept fall back to their p50.

A backend's step at N is then ``compute + exposed communication``, with compute its own step at
N = 1 (strong scaling: scaled by the per-device batch, assuming compute linear in it) and two
readings of the exposure: none hidden (``compute + t``) and all hidden (``max(compute, t)``).
A measured step inside ``[full-overlap low, no-overlap high]`` is *within its interval*.

No framework imports: pandas and numpy over the records' rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from scaling.scaling_model import fit_relative

BOOTSTRAP = 400
#: the collective path each backend's gradients go through (the one `scaling comm` measures for it)
PATH_OF = {"torch_ddp": "torch.distributed", "lightning_ddp": "torch.distributed",
           "torch_reference": "torch.distributed", "horovod_torch": "horovod (torch)",
           "horovod_reference": "horovod (torch)", "horovod_tf": "horovod (tf)",
           "horovod_tf_reference": "horovod (tf)", "tf_multiworker": "MultiWorkerMirroredStrategy",
           "tf_reference": "MultiWorkerMirroredStrategy", "tf_mirrored": "MirroredStrategy"}
#: the reference loop (practical floor) over the same library
REFERENCE_OF = {"torch_ddp": "torch_reference", "lightning_ddp": "torch_reference", "torch_reference": "torch_reference",
                "horovod_torch": "horovod_reference", "horovod_reference": "horovod_reference",
                "horovod_tf": "horovod_tf_reference", "horovod_tf_reference": "horovod_tf_reference",
                "tf_multiworker": "tf_reference", "tf_reference": "tf_reference"}


def ring_design(n: Any, nbytes: Any) -> np.ndarray:
    """Columns of the ring all-reduce: 2(N-1) (alpha's) and 2(N-1)/N * bytes (beta's)."""
    n, nbytes = np.asarray(n, float), np.asarray(nbytes, float)
    return np.column_stack([2.0 * (n - 1.0), 2.0 * (n - 1.0) / n * nbytes])


@dataclass
class AlphaBeta:
    """The ring model of one collective path, fitted to its comm records."""

    path: str
    variant: str
    placement: str
    n_values: list[int]
    points: int
    alpha: float  # s per ring step
    beta: float  # s per byte
    boot: np.ndarray | None = None  # (k, 2) bootstrap (alpha, beta)
    residual_rms: float = math.nan  # RMS of (fit / measured - 1)
    notes: list[str] = field(default_factory=list)

    def time(self, n: float, nbytes: float) -> float:
        """Predicted all-reduce seconds of ``nbytes`` over ``n`` ranks."""
        return float(ring_design([n], [nbytes])[0] @ np.array([self.alpha, self.beta]))

    def interval(self, n: float, nbytes: float) -> tuple[float, float]:
        """95% bootstrap interval of ``time``, widened by the RMS relative residual."""
        t = self.time(n, nbytes)
        if self.boot is None or not len(self.boot):
            lo, hi = t, t
        else:
            samples = self.boot @ ring_design([n], [nbytes])[0]
            lo, hi = (float(v) for v in np.percentile(samples, [2.5, 97.5]))
        widen = self.residual_rms if math.isfinite(self.residual_rms) else 0.0
        return min(lo, t) * max(0.0, 1.0 - widen), max(hi, t) * (1.0 + widen)


def fit_alpha_beta(points: pd.DataFrame, bootstrap: int = BOOTSTRAP, seed: int = 0, **key: Any) -> AlphaBeta:
    """Fit the ring model to rows with ``N``, ``bytes`` and a latency (``latency_s``, else
    ``latency_p50_s``), N >= 2."""
    points = with_latency(points)
    pts = points[(points["N"] >= 2) & points["latency_s"].notna() & (points["latency_s"] > 0)]
    if len(pts) < 2:
        raise ValueError(f"alpha-beta fit needs at least two measured sizes at N >= 2 (got {len(pts)})")
    a = ring_design(pts["N"], pts["bytes"])
    t = pts["latency_s"].to_numpy(float)
    theta = fit_relative(a, t)
    rng = np.random.default_rng(seed)
    boot = np.stack([fit_relative(a[i], t[i]) for i in (rng.integers(0, len(t), len(t)) for _ in range(bootstrap))]) \
        if bootstrap else None
    resid = (a @ theta) / t - 1.0
    fit = AlphaBeta(path=key.get("path", "?"), variant=key.get("variant", "defaults"),
                    placement=key.get("placement", "core"), n_values=sorted({int(v) for v in pts["N"]}),
                    points=len(t), alpha=float(theta[0]), beta=float(theta[1]), boot=boot,
                    residual_rms=float(np.sqrt(np.mean(resid ** 2))))
    if theta[0] == 0:
        fit.notes.append("alpha fitted to 0 (its bound): no latency term visible in these sizes")
    if theta[1] == 0:
        fit.notes.append("beta fitted to 0 (its bound): no bandwidth term visible in these sizes")
    return fit


def with_latency(points: pd.DataFrame) -> pd.DataFrame:
    """``points`` with ``latency_s``, the latency the model and the decomposition use: each size's
    mean over its timed calls, its p50 where a record has no mean (written before it was kept)."""
    if "latency_s" in points:
        return points
    mean = points["latency_mean_s"] if "latency_mean_s" in points else pd.Series(math.nan, index=points.index)
    return points.assign(latency_s=pd.to_numeric(mean, errors="coerce").fillna(points["latency_p50_s"]))


def comm_points(comm_rows: pd.DataFrame) -> pd.DataFrame:
    """The comm records' ok rows with their path and ``latency_s``; one row per (record, size)."""
    ok = comm_rows[(comm_rows["status"] == "ok") & comm_rows["bytes"].notna()].copy()
    ok["path"] = ok["backend"].map(PATH_OF)
    return with_latency(ok[ok["path"].notna()])


def fit_paths(comm_rows: pd.DataFrame, bootstrap: int = BOOTSTRAP, per_n: bool = False) -> dict[tuple, AlphaBeta]:
    """One fit per (path, variant, placement), over every size and N of its comm records (the one
    predictions use); ``per_n``: one per (path, variant, placement, N) instead, to see whether
    alpha and beta hold across N."""
    keys = ["path", "variant", "placement"] + (["N"] if per_n else [])
    fits = {}
    for key, grp in comm_points(comm_rows).groupby(keys, sort=True):
        try:
            fits[key] = fit_alpha_beta(grp, bootstrap, path=key[0], variant=key[1], placement=key[2])
        except ValueError:
            continue  # too few points: predictions say there are no comm records to fit
    return fits


def find_fit(fits: dict, backend: str, variant: str, placement: str) -> tuple[AlphaBeta | None, str | None]:
    """The fit for a training cell: its path, variant and placement; the same path under another
    placement (said in the note) when that is all there is."""
    path = PATH_OF.get(backend)
    if path is None:
        return None, f"{backend} has no collective path"
    if (path, variant, placement) in fits:
        return fits[(path, variant, placement)], None
    other = [f for (p, v, _), f in fits.items() if p == path and v == variant]
    if other:
        return other[0], f"comm records of {path} under placement {other[0].placement}, not {placement}"
    return None, f"no comm records for {path} (variant {variant})"


def measured_transfer(comm_rows: pd.DataFrame, backend: str, variant: str, placement: str, n: int,
                      nbytes: int) -> tuple[float | None, str | None]:
    """The micro-benchmark's latency (``with_latency``: mean, else p50) at exactly this gradient size
    and N (median over repeats), or None; and a note when it was measured under another placement
    than the cell's."""
    pts = comm_points(comm_rows)
    at = pts[(pts["path"] == PATH_OF.get(backend)) & (pts["variant"] == variant) & (pts["N"] == n)
             & (pts["bytes"] == nbytes)]
    if at.empty:
        return None, None
    same = at[at["placement"] == placement]
    if same.empty:
        others = ", ".join(sorted(set(at["placement"])))
        return float(at["latency_s"].median()), f"measured under placement {others}, not {placement}"
    return float(same["latency_s"].median()), None


def placement_of(conditions: str) -> str:
    """The placement a cell ran under, from its conditions text (``placement=core, ...``)."""
    for part in str(conditions or "").split(" | ")[0].split(", "):
        if part.startswith("placement="):
            value = part.split("=", 1)[1]
            return "core" if value == "default" else value
    return "core"


@dataclass
class Prediction:
    """The first-principles step time of one backend at one N, against the measured one."""

    backend: str
    n: int
    measured_s: float
    compute_s: float
    compute_low_s: float
    compute_high_s: float
    transfer_s: float | None
    transfer_low_s: float | None
    transfer_high_s: float | None
    note: str | None = None

    @property
    def no_overlap(self) -> tuple[float, float, float]:
        """(low, predicted, high) of compute + transfer."""
        if self.transfer_s is None:
            return math.nan, math.nan, math.nan
        return (self.compute_low_s + self.transfer_low_s, self.compute_s + self.transfer_s,
                self.compute_high_s + self.transfer_high_s)

    @property
    def full_overlap(self) -> tuple[float, float, float]:
        """(low, predicted, high) of max(compute, transfer)."""
        if self.transfer_s is None:
            return math.nan, math.nan, math.nan
        return (max(self.compute_low_s, self.transfer_low_s), max(self.compute_s, self.transfer_s),
                max(self.compute_high_s, self.transfer_high_s))

    @property
    def inside(self) -> bool | None:
        if self.transfer_s is None or not math.isfinite(self.measured_s):
            return None
        return self.full_overlap[0] <= self.measured_s <= self.no_overlap[2]

    def verdict(self) -> str:
        """A plain sentence: within or outside the interval, and where; or why there is no prediction."""
        if self.transfer_s is None:
            return f"no prediction: {self.note}"
        caveat = f" [{self.note}]" if self.note else ""
        return self._where() + caveat

    def _where(self) -> str:
        lo, _, hi = self.no_overlap
        flo, _, fhi = self.full_overlap
        ms = self.measured_s * 1e3
        if self.measured_s < flo:
            return f"outside its interval: measured {ms:.3f} ms is below the full-overlap floor {flo * 1e3:.3f} ms"
        if self.measured_s > hi:
            return (f"outside its interval: measured {ms:.3f} ms is above compute + transfer {hi * 1e3:.3f} ms "
                    "(a cost the model does not have)")
        where = ("no overlap" if lo <= self.measured_s else "full overlap" if self.measured_s <= fhi
                 else "partial overlap")
        return f"within its interval: measured {ms:.3f} ms in {flo * 1e3:.3f} .. {hi * 1e3:.3f} ms ({where})"


def effective_steps(cells: pd.DataFrame) -> pd.DataFrame:
    """The ok training rows with ``step_s`` = global batch / samples/s (the step a throughput is made of)."""
    ok = cells[(cells["status"] == "ok") & cells["samples_per_s"].notna() & cells["global_batch"].notna()].copy()
    ok["step_s"] = ok["global_batch"].astype(float) / ok["samples_per_s"].astype(float)
    return ok


def predict(series: pd.DataFrame, n: int, fits: dict, comm_rows: pd.DataFrame) -> Prediction:
    """The prediction for one backend's series (tidy rows of one cell key, several N) at ``n``."""
    from scaling.scaling_model import gradient_bytes

    ok = effective_steps(series)
    first = ok.iloc[0]
    backend, variant = str(first["backend"]), str(first["variant"])
    at_n, base = ok[ok["N"] == n], ok[ok["N"] == 1]
    measured = float(at_n["step_s"].median()) if not at_n.empty else math.nan
    if base.empty:
        return Prediction(backend, n, measured, math.nan, math.nan, math.nan, None, None, None,
                          note=f"no N=1 run of {backend}: no compute figure")
    ratio = 1.0
    if not at_n.empty and str(first["scaling"]) == "strong":
        # compute taken as linear in the per-device batch (the N=1 step does N times the work)
        ratio = float(at_n["per_device_batch"].median()) / float(base["per_device_batch"].median())
    c = base["step_s"] * ratio
    placement = placement_of(first.get("conditions", ""))
    nbytes = gradient_bytes(str(first["workload"]), first.get("parameters"))
    fit, note = find_fit(fits, backend, variant, placement)
    pred = Prediction(backend, n, measured, float(c.median()), float(c.min()), float(c.max()), None, None, None, note)
    if fit is not None:
        pred.transfer_s = fit.time(n, nbytes)
        pred.transfer_low_s, pred.transfer_high_s = fit.interval(n, nbytes)
        if n not in fit.n_values:
            beyond = f"comm measured at N = {', '.join(map(str, fit.n_values))} only: N={n} rests on the ring form"
            pred.note = f"{note}; {beyond}" if note else beyond
    else:  # no fit (one size only): the measured latency at this size, without an interval of its own
        t, other = measured_transfer(comm_rows, backend, variant, placement, n, nbytes)
        if t is None:
            pred.note = (f"no comm records for {PATH_OF.get(backend, backend)} at N={n}"
                         + ("" if variant == "defaults" else f" (variant {variant})"))
        else:
            pred.transfer_s = pred.transfer_low_s = pred.transfer_high_s = t
            pred.note = other
    return pred


def series_of(cells: pd.DataFrame):
    """Each backend's training series (one cell key, single node), as the training-runs model groups
    them (those without a known gradient size left out)."""
    from scaling import analysis
    from scaling.scaling_model import known_gradient

    ok = effective_steps(cells)
    for key, grp in ok.groupby(analysis.CELL_KEYS, dropna=False, sort=True):
        grp = grp[grp["nodes"] == 1] if "nodes" in grp else grp
        if grp["N"].nunique() >= 2 and known_gradient(grp):
            yield dict(zip(analysis.CELL_KEYS, key)), grp


def validate_all(cells: pd.DataFrame, comm_rows: pd.DataFrame, bootstrap: int = BOOTSTRAP) -> pd.DataFrame:
    """Per backend series: the first-principles prediction at every measured N > 1, and beside it,
    at the held-out (largest) N, the model fitted to training runs (``scaling.scaling_model``)."""
    from scaling import scaling_model

    fits = fit_paths(comm_rows, bootstrap)
    rows = []
    for key, grp in series_of(cells):
        holdout = int(grp["N"].max())
        trained = None
        if grp["N"].nunique() >= 3:
            try:
                trained = scaling_model.validate(grp, holdout, bootstrap=min(bootstrap, 100))
            except ValueError:
                trained = None
        for n in sorted(int(v) for v in grp["N"].unique() if v > 1):
            p = predict(grp, n, fits, comm_rows)
            lo, mid, hi = p.no_overlap
            flo, fmid, _ = p.full_overlap
            row = {**{k: key[k] for k in ("sweep", "workload", "scaling", "variant", "backend")}, "N": n,
                   "held_out": n == holdout, "measured_step_s": p.measured_s, "compute_s": p.compute_s,
                   "transfer_s": p.transfer_s, "predicted_no_overlap_s": mid, "predicted_full_overlap_s": fmid,
                   "interval_low_s": flo, "interval_high_s": hi, "inside": p.inside, "verdict": p.verdict(),
                   "trained_inside": None, "trained_verdict": None}
            if trained is not None and n == holdout:
                row["trained_inside"] = bool(trained.inside)
                row["trained_verdict"] = trained.summary()
            rows.append(row)
    return pd.DataFrame(rows)
