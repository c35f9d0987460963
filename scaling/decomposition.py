"""Where a step's time goes, per cell (study, backend, N, layout), and how far it is from its floors.

A cell's step is its effective step time, global batch / samples/s (median over repeats), split as

- **compute**: the same backend's step at N = 1 in the same study (strong scaling: scaled by the
  per-device batch, compute taken as linear in it);
- **transfer**: the all-reduce of the gradient at this N through the backend's collective path,
  from the micro-benchmark (``scaling comm``): its mean latency (a step pays slow calls too) at
  exactly the gradient size, else the
  alpha-beta fit (``scaling.comm_model``) at that size;
- **waiting**: time ranks sat in the collective for the slowest rank (``scaling.rank_clock``),
  where the backend's collective can be marked; otherwise "not separable";
- **overhead**: what is left, ``step - compute - transfer - waiting``. Negative when the backend
  hid communication behind compute (overlap): ``hidden`` says how much.

And two floors: the **ideal** one, compute + transfer (no overlap) and max(compute, transfer)
(full overlap); the **practical** one, the reference loop over the same library
(``torch_reference``, ``horovod_reference``, ``horovod_tf_reference``, ``tf_reference``) at the
same N in the same study.

Pure functions over records and their tidy rows: no framework imports.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import pandas as pd

from scaling import analysis
from scaling.comm_model import PATH_OF, REFERENCE_OF, effective_steps, find_fit, measured_transfer, placement_of

COLUMNS = ["step_s", "compute_s", "transfer_s", "transfer_source", "waiting_s", "waiting_note", "overhead_s",
           "hidden_s", "ideal_floor_s", "ideal_overlap_floor_s", "reference_backend", "reference_floor_s",
           "start_skew_s"]


def split(step: float, compute: float, transfer: float | None, waiting: float | None) -> dict[str, float]:
    """The arithmetic of one cell: overhead (what is left), the communication overlap hid, and the
    ideal floors. An unknown transfer or waiting counts as 0 in the overhead and leaves the floors NaN."""
    t = 0.0 if transfer is None or math.isnan(transfer) else transfer
    w = 0.0 if waiting is None or math.isnan(waiting) else waiting
    overhead = step - compute - t - w
    known = transfer is not None and not math.isnan(transfer)
    return {"overhead_s": overhead, "hidden_s": max(0.0, -overhead),
            "ideal_floor_s": compute + transfer if known else math.nan,
            "ideal_overlap_floor_s": max(compute, transfer) if known else math.nan}


def clocks_by_run(records: Iterable[dict]) -> dict[str, dict]:
    """Each training record's ``metrics.rank_clock`` (``scaling.rank_clock.merge``), by run id."""
    return {r["run_id"]: (r.get("metrics") or {}).get("rank_clock") for r in records
            if (r.get("metrics") or {}).get("rank_clock")}


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(pd.Series(values).median()) if values else math.nan


def table(cells: pd.DataFrame, comm_rows: pd.DataFrame, clocks: dict[str, dict],
          fits: dict | None = None) -> pd.DataFrame:
    """One row per training cell (ok repeats): the aggregate keys and ``COLUMNS``."""
    from scaling.comm_model import fit_paths
    from scaling.scaling_model import gradient_bytes

    ok = effective_steps(cells)
    if ok.empty:
        return pd.DataFrame(columns=analysis.AGG_KEYS + COLUMNS)
    fits = fit_paths(comm_rows) if fits is None and not comm_rows.empty else (fits or {})
    base_of = {key: (float(g["step_s"].median()), float(g["per_device_batch"].median()))
               for key, g in ok[ok["N"] == 1].groupby(analysis.CELL_KEYS, dropna=False)}
    rows = []
    for key, grp in ok.groupby(analysis.AGG_KEYS, dropna=False, sort=True):
        k = dict(zip(analysis.AGG_KEYS, key))
        first = grp.iloc[0]
        n, backend, variant = int(k["N"]), str(k["backend"]), str(k["variant"])
        step = float(grp["step_s"].median())
        compute = math.nan
        if tuple(k[c] for c in analysis.CELL_KEYS) in base_of:
            base_step, base_batch = base_of[tuple(k[c] for c in analysis.CELL_KEYS)]
            ratio = float(grp["per_device_batch"].median()) / base_batch if k["scaling"] == "strong" else 1.0
            compute = base_step * ratio
        transfer, source = (0.0, "one device: no collective") if n == 1 else (None, None)
        placement = placement_of(first.get("conditions", ""))
        if n > 1:
            try:
                nbytes = gradient_bytes(str(k["workload"]), first.get("parameters"))
            except ValueError:
                nbytes = None
            if nbytes is not None and not comm_rows.empty:
                transfer, other = measured_transfer(comm_rows, backend, variant, placement, n, nbytes)
                source = (f"micro-benchmark at the gradient size{f' ({other})' if other else ''}"
                          if transfer is not None else None)
                if transfer is None:
                    fit, note = find_fit(fits, backend, variant, placement)
                    if fit is not None:
                        transfer = fit.time(n, nbytes)
                        source = f"alpha-beta fit at the gradient size{f' ({note})' if note else ''}"
            if transfer is None:
                source = f"no comm records for {PATH_OF.get(backend, backend)} at N={n}"
        figures = [clocks.get(r) for r in grp["run_id"]]
        waiting = _median([f.get("waiting_s") for f in figures if f]) if n > 1 else 0.0
        notes = sorted({f["note"] for f in figures if f and f.get("note")})
        waiting_note = ("; ".join(notes) if notes else
                        None if n == 1 or not math.isnan(waiting) else
                        f"waiting unmeasured for {backend}: no per-rank timestamps (one process holding "
                        "every replica, or a record from before its backend marked them)")
        row = {**k, "step_s": step, "compute_s": compute, "transfer_s": math.nan if transfer is None else transfer,
               "transfer_source": source, "waiting_s": waiting, "waiting_note": waiting_note,
               **split(step, compute, transfer, None if math.isnan(waiting) else waiting),
               "start_skew_s": _median([f.get("start_skew_s") for f in figures if f])}
        ref = REFERENCE_OF.get(backend)
        row["reference_backend"] = ref
        row["reference_floor_s"] = reference_step(ok, k, ref) if ref else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=analysis.AGG_KEYS + COLUMNS)


def reference_step(ok: pd.DataFrame, key: dict[str, Any], reference: str) -> float:
    """The reference loop's step (median over repeats) in the same study, at the same N and layout;
    its own fast-mode settings, whatever the compared backend's."""
    # a reference with no tuned settings: its defaults cells stand for it in the key's variant
    ref = analysis.untuned_in_every_variant(ok[ok["backend"] == reference], [key["variant"]])
    same = pd.Series(True, index=ref.index)
    for c in analysis.STUDY_KEYS + ["N", "layout"]:
        same &= ref[c] == key[c]
    return float(ref.loc[same, "step_s"].median()) if same.any() else math.nan


def for_results(results_dir: Any, loaded: analysis.Loaded, cells: pd.DataFrame) -> pd.DataFrame:
    """The decomposition of ``cells`` (records already loaded), with the comm records of ``results_dir``."""
    from scaling import report_comm

    return table(cells, report_comm.load(results_dir), clocks_by_run(loaded.records))


def join(agg: pd.DataFrame, where: pd.DataFrame) -> pd.DataFrame:
    """The aggregate table with the decomposition's columns (``scaling results export --table aggregate``)."""
    if agg.empty or where.empty:
        return agg
    return agg.merge(where[analysis.AGG_KEYS + COLUMNS], on=analysis.AGG_KEYS, how="left")


def load(results_dir: Any) -> pd.DataFrame:
    """The decomposition of every training cell under ``results_dir`` (comm records included)."""
    loaded = analysis.load(results_dir)
    return for_results(results_dir, loaded, analysis.tidy(loaded.records, loaded.paths))


#: the parts of a step a sweep's W&B summary run carries, per backend and N
SUMMARY_PARTS = ("step_s", "compute_s", "transfer_s", "waiting_s", "overhead_s", "ideal_floor_s", "reference_floor_s")


def summary_values(where: pd.DataFrame, sweep: str) -> dict[str, float]:
    """W&B summary values of one sweep's decomposition: ``where/<backend>/N<n>/<part>`` (seconds),
    known figures only (several studies in one sweep: their workload and scaling join the key)."""
    mine = where[where["sweep"] == sweep] if not where.empty else where
    many = mine[["workload", "workload_params", "scaling", "variant"]].drop_duplicates().shape[0] > 1 if not mine.empty else False
    out = {}
    for r in mine.to_dict("records"):
        study = f"{r['workload']}-{r['scaling']}-{r['variant']}/" if many else ""
        for part in SUMMARY_PARTS:
            value = r.get(part)
            if isinstance(value, (int, float)) and not math.isnan(value):
                out[f"where/{study}{r['backend']}/N{int(r['N'])}/{part}"] = float(value)
    return out
