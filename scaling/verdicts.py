"""The seed claim as two verdicts per device count: *faster at N* and *scales better to N*.

For every study, device count N and layout, each TF backend is compared with each PyTorch backend:

* faster at N: the samples/s of the repeats at N;
* scales better to N: the per-repeat efficiency ``thr_r(N) / (N thr_r(1))``, repeat ``r`` at N over
  the same repeat index at N = 1 of the same backend (a sweep interleaves its repeats, so repeat r
  of every cell ran in the same round). Each repeat carries its own base, so the base's noise is
  in the test and not shared by all repeats.

Each pair gets the exact two-sided Mann-Whitney p-value; the p-values of all TF x PyTorch pairs at
that N are adjusted with Holm's method, so reporting the best backend of each framework (highest
median) costs nothing in false calls. The effect is the ratio of medians TF / PyTorch with a 95%
percentile-bootstrap interval (repeats resampled within each backend) and Cliff's delta. Where the
design cannot reach the alpha (the smallest possible exact p times the number of pairs exceeds it)
the verdict reads "inconclusive: needs >= R repeats".

numpy, pandas and scipy only: no framework imports.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from scaling import analysis

ALPHA = 0.05
BOOTSTRAP = 2000
QUESTIONS = ("faster", "scales better")

RULE = (
    "Two verdicts per device count N, each comparing every TF backend with every PyTorch backend at N "
    "(same study and layout): faster at N compares samples/s; scales better to N compares per-repeat "
    "efficiency, repeat r at N over repeat r at N=1 of the same backend, divided by N. Each pair is tested "
    "with the exact two-sided Mann-Whitney rank test; the p-values of all TF x PyTorch pairs are adjusted "
    f"with Holm's method, and a verdict needs the adjusted p of the best TF backend against the best PyTorch "
    f"backend (highest medians) below alpha = {ALPHA}. The effect is the ratio of medians TF / PyTorch with a "
    "95% bootstrap interval over repeats, and Cliff's delta (-1..1, the share of repeat pairs TF wins minus "
    "the share it loses). With n repeats a side the smallest exact p is 2 / C(2n, n) (0.10 at 3, 0.029 at 4, "
    "0.008 at 5), times the number of pairs after Holm: where that cannot reach alpha the verdict reads "
    "\"inconclusive: needs >= R repeats\" (R repeats a side would)."
)


def _mann_whitney(a: Sequence[float], b: Sequence[float]):
    from scipy.stats import mannwhitneyu

    return mannwhitneyu(np.asarray(a, float), np.asarray(b, float), alternative="two-sided", method="exact")


def u_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Pairs (x in a, y in b) with x > y, ties counting one half (Mann-Whitney's U of ``a``)."""
    return float(_mann_whitney(a, b).statistic)


def mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact two-sided Mann-Whitney p-value: ``scipy.stats.mannwhitneyu(method="exact")``, the
    no-ties null distribution. With ties U can be a half-integer; scipy then counts the orders at
    least as extreme as U rounded toward the centre, so the p is slightly conservative."""
    if len(a) == 0 or len(b) == 0:
        return math.nan
    return float(_mann_whitney(a, b).pvalue)


def smallest_p(n: int, m: int) -> float:
    """The smallest two-sided exact p with n and m repeats: 2 / C(n+m, n)."""
    return min(1.0, 2.0 / math.comb(n + m, n)) if n and m else 1.0


def repeats_needed(pairs: int, alpha: float = ALPHA) -> int:
    """Repeats a side with which ``pairs`` Holm-adjusted comparisons can reach ``alpha``."""
    r = 1
    while pairs * smallest_p(r, r) > alpha:
        r += 1
    return r


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given)."""
    p = np.asarray(pvalues, float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def cliffs_delta(a: Sequence[float], b: Sequence[float]) -> float:
    """Cliff's delta, ``2 U / (n m) - 1``: the share of pairs ``a`` wins minus the share it loses."""
    return 2.0 * u_statistic(a, b) / (len(a) * len(b)) - 1.0


def ratio_interval(a: np.ndarray, b: np.ndarray, bootstrap: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of median(a) / median(b), repeats resampled within a and b
    (``scipy.stats.bootstrap``, seeded: the same samples give the same interval)."""
    if bootstrap <= 0 or len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    from scipy.stats import bootstrap as scipy_bootstrap

    def ratio(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.median(x, axis=axis) / np.median(y, axis=axis)

    found = scipy_bootstrap((np.asarray(a, float), np.asarray(b, float)), ratio, n_resamples=bootstrap,
                            confidence_level=0.95, method="percentile", vectorized=True,
                            rng=np.random.default_rng(seed))
    return float(found.confidence_interval.low), float(found.confidence_interval.high)


def compare(tf: dict[str, np.ndarray], torch: dict[str, np.ndarray], question: str = "faster",
            alpha: float = ALPHA, bootstrap: int = BOOTSTRAP, seed: int = 0) -> dict:
    """One verdict from per-backend samples of each framework (see the module's docstring)."""
    tf = {k: np.asarray(v, float) for k, v in tf.items() if len(v)}
    torch = {k: np.asarray(v, float) for k, v in torch.items() if len(v)}
    row: dict = {"question": question}
    if not tf or not torch:
        row["verdict"] = f"not comparable: only {'TF' if tf else 'PyTorch'} measured" if (tf or torch) else "no data"
        return row
    pairs = [(a, b) for a in sorted(tf) for b in sorted(torch)]
    adjusted = dict(zip(pairs, holm([mann_whitney_p(tf[a], torch[b]) for a, b in pairs])))
    best_tf = max(sorted(tf), key=lambda k: np.median(tf[k]))
    best_pt = max(sorted(torch), key=lambda k: np.median(torch[k]))
    a, b = tf[best_tf], torch[best_pt]
    low, high = ratio_interval(a, b, bootstrap, seed)
    delta = cliffs_delta(a, b)
    p_adj = adjusted[(best_tf, best_pt)]
    row.update(tf_backend=best_tf, torch_backend=best_pt, tf_value=float(np.median(a)), torch_value=float(np.median(b)),
               ratio=float(np.median(a) / np.median(b)), ratio_low=low, ratio_high=high, cliffs_delta=delta,
               p_value=mann_whitney_p(a, b), p_adjusted=p_adj, pairs=len(pairs), tf_repeats=len(a),
               torch_repeats=len(b))
    verb = "faster" if question == "faster" else "scales better"
    if len(pairs) * smallest_p(len(a), len(b)) > alpha:
        row["verdict"] = f"inconclusive: needs >= {repeats_needed(len(pairs), alpha)} repeats"
    elif p_adj < alpha:
        row["verdict"] = f"{'TF' if delta > 0 else 'PyTorch'} {verb}"
    else:
        row["verdict"] = "no significant difference"
    return row


COLUMNS = analysis.STUDY_KEYS + [
    "N", "layout", "question", "tf_backend", "torch_backend", "tf_value", "torch_value", "ratio", "ratio_low",
    "ratio_high", "cliffs_delta", "p_value", "p_adjusted", "pairs", "tf_repeats", "torch_repeats", "verdict"]


def _label(backend: str, settings: str, several: bool) -> str:
    return f"{backend} [{settings}]" if several and settings else backend


def _samples(grp: pd.DataFrame, base: pd.DataFrame, n: int) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """{question: {framework: {backend label: samples}}} of one study at one N and layout."""
    several = grp.groupby("backend")["settings"].nunique().gt(1).to_dict()
    out: dict = {q: {"tf": {}, "torch": {}} for q in QUESTIONS}
    for (backend, framework, settings), side in grp.groupby(["backend", "framework", "settings"]):
        if framework not in ("tf", "torch"):
            continue
        label = _label(backend, settings, several.get(backend, False))
        out["faster"][framework][label] = side["samples_per_s"].to_numpy(float)
        if n > 1:
            one = base[(base["backend"] == backend) & (base["settings"] == settings)]
            one = one.groupby("repeat")["samples_per_s"].median()
            at_n = side.groupby("repeat")["samples_per_s"].median()
            common = at_n.index.intersection(one.index)
            if len(common):
                out["scales better"][framework][label] = (at_n[common] / one[common] / n).to_numpy(float)
    return out


def verdicts(cells: pd.DataFrame, alpha: float = ALPHA, bootstrap: int = BOOTSTRAP) -> pd.DataFrame:
    """Both verdicts for every study, device count and layout of the ok records in ``cells``."""
    ok = cells[(cells["status"] == "ok") & cells["samples_per_s"].notna()] if not cells.empty else cells
    rows = []
    if ok.empty:
        return pd.DataFrame(columns=COLUMNS)
    for key, grp in ok.groupby(analysis.STUDY_KEYS + ["N", "layout"], dropna=False, sort=True):
        k = dict(zip(analysis.STUDY_KEYS + ["N", "layout"], key))
        base = ok[np.logical_and.reduce([ok[c] == k[c] for c in analysis.STUDY_KEYS]) & (ok["N"] == 1)]
        samples = _samples(grp, base, int(k["N"]))
        for question in QUESTIONS:
            if question == "scales better" and k["N"] == 1:
                continue
            s = samples[question]
            row = compare(s["tf"], s["torch"], question, alpha, bootstrap)
            if row["verdict"].startswith("not comparable"):
                row["verdict"] += f" at N={k['N']}"
            rows.append(k | row)
    return pd.DataFrame(rows, columns=COLUMNS)
