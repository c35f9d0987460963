"""Aggregation, export, the seed-claim rule and the scaling model, on recorded sweeps.

Fixtures (records only, copied from real runs on the project's 2-CPU machine):
* ``data/local_cpu_sweep``: ``scaling sweep experiment=local_cpu`` (8 backends, N = 1, 2, 3 repeats,
  MLP, real MNIST, 1 epoch);
* ``data/model_fit_sweep``: ``scaling sweep sweep_id=model_fit backend=torch_ddp,horovod_torch
  devices=1,2,3,4 repeat=0,1 data=synthetic train.epochs=1 train.max_steps_per_epoch=200``.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling import analysis, metrics, scaling_laws, scaling_model, verdicts
from scaling.results import results_command
from scaling.predict import predict_command

DATA = Path(__file__).parent / "data"
LOCAL_CPU = DATA / "local_cpu_sweep"
MODEL_FIT = DATA / "model_fit_sweep"


@pytest.fixture(scope="module")
def local_cells() -> pd.DataFrame:
    loaded = analysis.load(LOCAL_CPU)
    assert loaded.problems == []
    return analysis.tidy(loaded.records, loaded.paths)


def _raw_throughputs(backend: str, n: int) -> list[float]:
    out = []
    for path in sorted((LOCAL_CPU / "local_cpu").glob(f"{backend}-mlp-mnist-weak-n{n}x1-r*.json")):
        out.append(json.loads(path.read_text())["metrics"]["samples_per_s"])
    return out


# -- aggregation ----------------------------------------------------------------------------------

def test_tidy_has_one_row_per_record(local_cells):
    assert len(local_cells) == 42
    assert set(local_cells["status"]) == {"ok"}
    assert set(local_cells["N"]) == {1, 2}
    assert (local_cells["N"] == local_cells["devices_per_node"] * local_cells["nodes"]).all()
    assert set(local_cells["framework"]) == {"tf", "torch"}
    assert (local_cells["accelerator"] == "cpu").all()


def test_a_workloads_build_block_is_no_part_of_its_cell():
    """How each framework builds a workload (its YAML's ``build`` block) joins no key: records written
    before the block existed (the fixtures) pool with records that carry it, in the study, the cell,
    its aggregate and the W&B sweep summary's series."""
    from scaling.tracking_sweep import _series_key, sweep_rows

    old, new = (json.loads((LOCAL_CPU / "local_cpu" / f"torch_ddp-mlp-mnist-weak-n{n}x1-r{r}.json").read_text())
                for n, r in ((1, 0), (2, 1)))
    assert "build" not in old["config"]["workload"]
    new["config"]["workload"]["build"] = {"torch": {"_target_": "scaling.workloads.torch_models.MLP"},
                                          "tf": {"_target_": "scaling.workloads.tf_models.mlp"}}
    cells = analysis.tidy([old, new])
    assert cells[analysis.CELL_KEYS].drop_duplicates().shape[0] == 1
    assert analysis.workload_params(new["config"]["workload"]) == analysis.workload_params(old["config"]["workload"])
    agg = analysis.aggregate(cells).set_index("N")
    assert len(agg) == 2 and agg.loc[2, "speedup"] == pytest.approx(
        new["metrics"]["samples_per_s"] / old["metrics"]["samples_per_s"])
    assert _series_key(new["config"]) == _series_key(old["config"])
    assert [r["speedup"] for r in sweep_rows([old, new])] == [1.0, pytest.approx(agg.loc[2, "speedup"])]


def test_aggregate_matches_hand_computation(local_cells):
    agg = analysis.aggregate(local_cells).set_index(["backend", "N"])
    one, two = _raw_throughputs("horovod_torch", 1), _raw_throughputs("horovod_torch", 2)
    assert len(one) == len(two) == 3
    s = statistics.median(two) / statistics.median(one)
    row = agg.loc[("horovod_torch", 2)]
    assert row["repeats"] == 3
    assert row["throughput"] == pytest.approx(statistics.median(two))
    assert row["throughput_min"] == pytest.approx(min(two)) and row["throughput_max"] == pytest.approx(max(two))
    assert row["speedup"] == pytest.approx(s)
    assert row["efficiency"] == pytest.approx(s / 2)
    assert row["serial_law"] == "Gustafson"  # weak scaling: the scaled serial fraction (N - S) / (N - 1)
    assert row["serial_fraction"] == pytest.approx((2 - s) / (2 - 1))
    # the numbers themselves, computed by hand from the JSON: 36,587.58 / 85,698.13
    assert row["speedup"] == pytest.approx(0.426936, abs=1e-6)
    assert row["serial_fraction"] == pytest.approx(1.573064, abs=1e-6)
    assert row["speedup_min"] == pytest.approx(min(two) / max(one))
    base = agg.loc[("horovod_torch", 1)]
    assert base["speedup"] == 1 and base["efficiency"] == 1 and math.isnan(base["serial_fraction"])
    # single-device backends have only N = 1
    assert ("torch", 2) not in agg.index and ("tf", 1) in agg.index


def test_serial_fractions_known_pairs():
    assert metrics.karp_flatt(1.6, 2) == pytest.approx(0.25)  # (1/1.6 - 1/2) / (1 - 1/2)
    assert metrics.karp_flatt(4.0, 4) == pytest.approx(0.0)  # ideal: no serial part
    assert metrics.karp_flatt(1.0, 8) == pytest.approx(1.0)  # no speedup at all: all serial
    assert math.isnan(metrics.karp_flatt(1.0, 1))
    assert metrics.gustafson_serial(1.6, 2) == pytest.approx(0.4)  # 1.6 = 2 - 0.4 (2 - 1)
    assert metrics.gustafson_serial(7.3, 8) == pytest.approx(0.1)  # 7.3 = 8 - 0.1 x 7
    assert metrics.serial_fraction(1.6, 2, "strong") == pytest.approx(0.25)
    assert metrics.serial_fraction(1.6, 2, "weak") == pytest.approx(0.4)


def test_strong_scaling_speedup_uses_the_same_formula(local_cells):
    cells = local_cells[local_cells["backend"] == "torch_ddp"].copy()
    cells["scaling"] = "strong"
    agg = analysis.aggregate(cells).set_index("N")
    assert agg.loc[2, "speedup"] == pytest.approx(agg.loc[2, "throughput"] / agg.loc[1, "throughput"])


def test_verdicts_on_the_recorded_sweep(local_cells):
    found = verdicts.verdicts(local_cells).set_index(["N", "question"])
    n2 = found.loc[(2, "faster")]
    assert (n2["tf_backend"], n2["torch_backend"]) == ("tf_mirrored", "horovod_torch")
    tf, pt = _raw_throughputs("tf_mirrored", 2), _raw_throughputs("horovod_torch", 2)
    assert n2["ratio"] == pytest.approx(statistics.median(tf) / statistics.median(pt))
    assert min(tf) > max(pt)  # every TF repeat beat every PyTorch repeat, which the old rule called "TF faster"
    assert n2["p_value"] == pytest.approx(0.1)  # 2 of the C(6,3) = 20 rank orders are as extreme
    assert n2["pairs"] == 9 and n2["p_adjusted"] == pytest.approx(0.9)  # Holm over 3 TF x 3 PyTorch backends
    assert n2["verdict"] == "inconclusive: needs >= 6 repeats"  # 9 x 2 / C(12, 6) = 0.019 <= 0.05
    assert found.loc[(1, "faster"), "verdict"] == "inconclusive: needs >= 6 repeats"  # 16 pairs: 16 x 2 / 924
    assert (2, "scales better") in found.index and (1, "scales better") not in found.index


def test_mann_whitney_exact():
    assert verdicts.mann_whitney_p([4, 5, 6], [1, 2, 3]) == pytest.approx(0.1)
    assert verdicts.mann_whitney_p([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252)
    assert verdicts.mann_whitney_p([1, 4], [2, 3]) == pytest.approx(1.0)  # interleaved: U = nm/2
    assert verdicts.mann_whitney_p([1, 3], [2, 4]) == pytest.approx(4 / 6)
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(3)
    for n, m in ((4, 4), (5, 7), (6, 3)):
        a, b = rng.normal(size=n), rng.normal(0.8, size=m)
        assert verdicts.mann_whitney_p(a, b) == pytest.approx(mannwhitneyu(a, b, method="exact").pvalue)


# -- results store: list, show, export ------------------------------------------------------------

def test_export_round_trips(tmp_path, local_cells):
    csv, parquet = tmp_path / "out" / "cells.csv", tmp_path / "out" / "cells.parquet"
    assert results_command(["export", str(LOCAL_CPU), "--csv", str(csv), "--parquet", str(parquet)]) == 0
    back = pd.read_parquet(parquet)
    pd.testing.assert_frame_equal(back, local_cells, check_dtype=False)
    from_csv = pd.read_csv(csv)
    assert list(from_csv.columns) == list(local_cells.columns) and len(from_csv) == len(local_cells)
    for col in ("samples_per_s", "step_time_p50_s", "N", "repeat", "final_test_accuracy"):
        np.testing.assert_allclose(from_csv[col].to_numpy(float), local_cells[col].to_numpy(float), rtol=1e-12)
    assert (from_csv["run_id"] == local_cells["run_id"]).all()

    agg_csv = tmp_path / "agg.csv"
    assert results_command(["export", str(LOCAL_CPU), "--csv", str(agg_csv), "--table", "aggregate"]) == 0
    agg = pd.read_csv(agg_csv)
    assert len(agg) == 14 and {"speedup", "efficiency", "serial_fraction", "layout"} <= set(agg.columns)


def test_results_list_and_show(capsys):
    assert results_command(["list", str(LOCAL_CPU)]) == 0
    out = capsys.readouterr().out
    assert "local_cpu" in out and "42" in out
    assert results_command(["list", str(MODEL_FIT), "--sweep", "model_fit"]) == 0
    assert "torch_ddp-mlp-synthetic-weak-n4x1-r1-2ef5bad0" in capsys.readouterr().out
    assert results_command(["show", str(LOCAL_CPU)]) == 0
    out = capsys.readouterr().out
    assert "Gustafson serial" in out and "not a multi-GPU verdict" in out and "2x1" in out
    assert "faster" in out and "scales better" in out and "inconclusive: needs >= 6 repeats" in out
    assert "2 / C(2n, n)" in out and "Holm" in out  # the rule is printed


def _copy(src: Path, dst: Path, pattern: str = "*.json") -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob(pattern)):
        shutil.copy(p, dst / p.name)


def test_empty_and_missing_folders_say_so(tmp_path, capsys):
    assert results_command(["show", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "no records in" in out and "Traceback" not in out
    assert results_command(["list", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().out
    assert results_command(["export", str(tmp_path), "--csv", str(tmp_path / "x.csv")]) == 1
    assert results_command(["export", str(tmp_path)]) == 2  # no output file named
    assert predict_command([str(tmp_path)]) == 1


def test_partial_and_mixed_version_folders(tmp_path, capsys):
    sweep = tmp_path / "mixed"
    _copy(LOCAL_CPU / "local_cpu", sweep, "torch_ddp-*n2x1*.json")  # no N = 1 baseline
    _copy(LOCAL_CPU / "local_cpu", sweep, "tf-*.json")
    newer = json.loads((sweep / "tf-mlp-mnist-weak-n1x1-r0.json").read_text())
    newer["schema_version"] = 2
    (sweep / "future.json").write_text(json.dumps(newer))
    (sweep / "broken.json").write_text("{not json")
    failed = json.loads((sweep / "tf-mlp-mnist-weak-n1x1-r1.json").read_text())
    failed.update(status="failed", metrics=None, error="Traceback ...\nRuntimeError: worker 1 exited with 137")
    (sweep / "tf-mlp-mnist-weak-n1x1-r1.json").write_text(json.dumps(failed))

    loaded = analysis.load(tmp_path)
    text = "\n".join(loaded.problems)
    assert "schema_version 2 skipped" in text and "broken.json: not readable JSON" in text
    cells = analysis.tidy(loaded.records, loaded.paths)
    agg = analysis.aggregate(cells).set_index(["backend", "N"])
    assert agg.loc[("tf", 1), "repeats"] == 2 and agg.loc[("tf", 1), "failed"] == 1
    assert math.isnan(agg.loc[("torch_ddp", 2), "speedup"])
    assert any("torch_ddp" in m and "no ok N=1 run" in m for m in analysis.missing_baselines(analysis.aggregate(cells)))

    assert results_command(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "schema_version 2" in out and "no ok N=1 run" in out and "+1 failed" in out


# -- the scaling model ----------------------------------------------------------------------------

def _closed_form_step_time(n: float, theta, scaling: str, grad: float) -> float:
    """T(N) = T0 (weak) or T0 / N (strong) + 2 (N - 1) alpha + 2 (N - 1) / N * S / beta, written out here."""
    t0, alpha, inv_beta = theta
    return (t0 if scaling == "weak" else t0 / n) + 2 * (n - 1) * alpha + 2 * (n - 1) / n * grad * inv_beta


def _synthetic_points(scaling: str, theta, ns, repeats=1, noise=0.0, seed=0, grad=407_080) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for n in ns:
        t = _closed_form_step_time(n, theta, scaling, grad)
        gb = 64 * n if scaling == "weak" else 512
        for r in range(repeats):
            tr = t * (1 + noise * rng.standard_normal())
            rows.append({"sweep": "synthetic", "backend": "fake", "framework": "torch", "workload": "mlp",
                         "parameters": grad / 4, "data": "synthetic", "scaling": scaling, "variant": "defaults", "N": n,
                         "workload_params": "", "settings": "", "overrides": "", "layout": f"{n}x1", "nodes": 1,
                         "conditions": "threads=1", "devices_per_node": n, "repeat": r, "status": "ok", "global_batch": gb,
                         "samples_per_s": gb / tr, "accelerator": "gpu"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("scaling", ["weak", "strong"])
def test_fit_recovers_known_alpha_beta(scaling):
    theta = (2e-3, 25e-6, 1 / 5e9)  # T0 2 ms, alpha 25 us, beta 5 GB/s
    points = _synthetic_points(scaling, theta, [1, 2, 4, 8, 16, 32])
    fit = scaling_model.fit_cell(points, bootstrap=20)
    assert fit.identifiable
    np.testing.assert_allclose(fit.theta, theta, rtol=1e-6)
    params = fit.parameters().set_index("parameter")
    assert params.loc["alpha", "value"] == pytest.approx(25e-6, rel=1e-6)
    assert params.loc["beta", "value"] == pytest.approx(5e9, rel=1e-6)
    pred = fit.predict([1024]).set_index("N")
    t1024 = _closed_form_step_time(1024, theta, scaling, 407_080)
    gb = 64 * 1024 if scaling == "weak" else 512
    assert pred.loc[1024, "throughput"] == pytest.approx(gb / t1024, rel=1e-6)


def test_a_workload_without_a_formula_is_fitted_from_the_count_its_records_carry():
    """A workload from outside the package has no formula: its records carry the count of the model
    it built, and the fits take the gradient size from it; series with no count at all are left out."""
    theta = (2e-3, 25e-6, 1 / 5e9)
    points = _synthetic_points("weak", theta, [1, 2, 4, 8]).assign(workload="tiny")
    fits = scaling_model.fit_all(points, bootstrap=0)
    assert len(fits) == 1 and fits[0].grad_bytes == 407_080
    unknown = points.assign(parameters=math.nan)
    assert scaling_model.fit_all(unknown, bootstrap=0) == [] and scaling_model.validate_all(unknown, bootstrap=0) == []
    from scaling import comm_model

    assert len(list(comm_model.series_of(points.assign(step_s=0.01)))) == 1
    assert list(comm_model.series_of(unknown.assign(step_s=0.01))) == []


def test_fit_with_noise_has_intervals_covering_the_truth():
    theta = (2e-3, 25e-6, 1 / 5e9)
    fit = scaling_model.fit_cell(_synthetic_points("weak", theta, [1, 2, 4, 8], repeats=4, noise=0.01), bootstrap=200)
    params = fit.parameters().set_index("parameter")
    for name, true in (("alpha", 25e-6), ("beta", 5e9), ("T_compute", 2e-3)):
        low, high = params.loc[name, "low"], params.loc[name, "high"]
        assert low <= true * 1.02 and true * 0.98 <= high, (name, low, high)


def test_two_device_counts_are_not_identifiable():
    fit = scaling_model.fit_cell(_synthetic_points("weak", (2e-3, 25e-6, 1 / 5e9), [1, 2], repeats=3, noise=0.01),
                                 bootstrap=50)
    assert not fit.identifiable
    assert any("not identifiable" in n for n in fit.notes)
    pred = fit.predict([16, 1024]).set_index("N")
    assert pred["throughput"].isna().all()
    assert (pred["throughput_low"] < pred["throughput_high"]).all()
    # the all-latency reading saturates, the all-bandwidth reading keeps scaling
    assert pred.loc[1024, "throughput_bandwidth_only"] > 10 * pred.loc[1024, "throughput_latency_only"]


def test_amdahl_fraction():
    # S(N) = 1 / (0.1 + 0.9 / N) at N = 2, 4, 8: 20/11, 40/13, 80/17
    ns = np.array([1, 2, 4, 8])
    speedups = np.array([1.0, 20 / 11, 40 / 13, 80 / 17])
    assert scaling_model.amdahl_fraction(ns, speedups) == pytest.approx(0.1)
    np.testing.assert_allclose(scaling_model.amdahl_speedup(ns, 0.1), speedups)


def test_validation_on_the_recorded_sweep(capsys):
    loaded = analysis.load(MODEL_FIT)
    cells = analysis.tidy(loaded.records, loaded.paths)
    validations = scaling_model.validate_all(cells, bootstrap=200)
    assert {v.label.split(" / ")[0] for v in validations} == {"torch_ddp", "horovod_torch"}
    with capsys.disabled():
        print()
        for v in validations:
            print("  " + v.summary())
    for v in validations:
        assert v.train_n == [1, 2, 3] and v.holdout_n == 4
        assert math.isfinite(v.error) and math.isfinite(v.law_error) and v.law_name == "Gustafson"
        assert v.predicted_low <= v.predicted <= v.predicted_high
        # the interval includes the model's leave-one-N-out error, and the line says where the measurement fell
        assert any("model error" in n for n in v.notes)
        inside = v.predicted_low <= v.measured <= v.predicted_high
        assert ("measured inside its interval" if inside else "measured OUTSIDE its interval") in v.summary()
        # 2 CPUs shared by 4 workers: contention the model does not know about; this records how far off it is
        assert abs(v.error) < 0.5


def test_predict_command(capsys):
    assert predict_command([str(MODEL_FIT), "--validate", "--devices", "16,1024", "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "1024" in out and "validation" in out and "error" in out
    assert predict_command([str(LOCAL_CPU), "--backend", "torch_ddp", "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "not identifiable" in out
    # N = 1, 2 cannot tell alpha from beta: no number beyond the measured devices, and it says so
    assert "no prediction at N = 16, 32, 64, 128, 256, 512, 1024" in out and "\n 1024 " not in out


def test_gustafson_fit_from_a_closed_form():
    # S(N) = N - 0.2 (N - 1) at N = 2, 4, 8: 1.8, 3.4, 6.6
    ns = np.array([1, 2, 4, 8])
    speedups = np.array([1.0, 1.8, 3.4, 6.6])
    assert scaling_laws.gustafson_fraction(ns, speedups) == pytest.approx(0.2)
    np.testing.assert_allclose(scaling_laws.gustafson_speedup(ns, 0.2), speedups)
    points = _synthetic_points("weak", (2e-3, 25e-6, 1 / 5e9), [1, 2, 4, 8])
    fit = scaling_model.fit_cell(points, bootstrap=0)
    assert fit.law_name == "Gustafson"
    strong = scaling_model.fit_cell(_synthetic_points("strong", (2e-3, 25e-6, 1 / 5e9), [1, 2, 4, 8]), bootstrap=0)
    assert strong.law_name == "Amdahl"


def test_validation_says_when_the_measurement_is_outside_the_interval():
    # a contention the model cannot represent: T(N) = 2 ms + 0.1 ms x N^2; fit on 1..4, predict 8
    rows = []
    for n in (1, 2, 3, 4, 8):
        for r in range(3):
            t = 2e-3 + 1e-4 * n * n
            rows.append({"sweep": "s", "backend": "fake", "framework": "torch", "workload": "mlp", "parameters": 101770,
                         "data": "synthetic", "scaling": "weak", "variant": "defaults", "workload_params": "",
                         "settings": "", "overrides": "", "layout": f"{n}x1", "nodes": 1, "conditions": "threads=1",
                         "N": n, "devices_per_node": n, "repeat": r, "status": "ok", "global_batch": 64 * n,
                         "samples_per_s": 64 * n / (t * (1 + 0.01 * (r - 1))), "accelerator": "gpu"})
    v = scaling_model.validate(pd.DataFrame(rows), bootstrap=50)
    measured = 64 * 8 / (2e-3 + 1e-4 * 64)
    assert v.measured == pytest.approx(measured)
    assert not (v.predicted_low <= measured <= v.predicted_high)
    assert "measured OUTSIDE its interval" in v.summary()
    assert any("model error" in n for n in v.notes)


def test_a_tuned_cells_other_overrides_keep_it_in_its_own_study():
    """A tuned cell's id puts the variant between the repeat and the overrides' hash: placements
    swept beside variants must not pool (``experiment=tuning``)."""
    from scaling.naming import cell_id

    cfg = {"backend": {"name": "torch_ddp"}, "workload": {"name": "mlp"}, "data": {"name": "mnist"}, "devices": 2,
           "cluster": {"nodes": 1}, "repeat": 0}
    ids = {(variant, placement): cell_id({**cfg, "variant": variant}, [f"variant={variant}", f"placement={placement}"])
           for variant in ("defaults", "tuned") for placement in ("core", "compute")}
    hashes = {key: analysis.overrides_of(run_id, key[0]) for key, run_id in ids.items()}
    assert all(len(h) == 8 for h in hashes.values())
    assert hashes[("tuned", "core")] == hashes[("defaults", "core")] != hashes[("tuned", "compute")]
    assert analysis.overrides_of(cell_id({**cfg, "variant": "tuned"}, ["variant=tuned"]), "tuned") == ""
    assert analysis.overrides_of("torch_ddp-mlp-mnist-weak-n2x1-r0-deadbeef") == "deadbeef"
    assert analysis.overrides_of("torch_ddp_mlp_mnist_n2_20261127-101010_host-1") == ""  # a lone run
