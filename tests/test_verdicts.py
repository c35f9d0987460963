"""Cells, metrics and verdicts against numbers computed by hand, the readers' agreement on every
speedup, and a Monte Carlo check of the verdicts' false-call rate."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from scaling import analysis, report, report_cells, tracking_sweep, verdicts
from scaling.config import frameworks
from scaling.results import results_command

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CPU = ROOT / "tests" / "data" / "local_cpu_sweep"


def _record(backend: str, framework: str, devices: int, nodes: int, repeat: int, thr: float,
            variant: str | None = None, threads: int = 1) -> dict:
    config = {"backend": {"name": backend, "framework": framework}, "workload": {"name": "mlp", "parameters": 101770},
              "data": {"name": "synthetic"}, "scaling": "weak", "devices": devices, "cluster": {"nodes": nodes},
              "repeat": repeat, "threads": 1}
    if variant:
        config["variant"] = variant
    n = devices * nodes
    return {"run_id": f"{backend}-n{devices}x{nodes}-r{repeat}", "group": "hand", "status": "ok", "error": None,
            "config": config, "environment": {},
            "metrics": {"samples_per_s": thr, "samples_per_s_per_device": thr / n, "global_batch": 64 * n,
                        "conditions": {"threads": threads, "placement": "spread", "pinned": False,
                                       "evaluation": "shard"}}}


HAND = {  # (backend, framework, devices, nodes): samples/s of repeats 0, 1, ...
    ("tf_multiworker", "tf", 1, 1): [100, 110, 90, 105],
    ("tf_multiworker", "tf", 2, 1): [190, 180, 200, 170],
    ("torch_ddp", "torch", 1, 1): [100, 95, 105, 98],
    ("torch_ddp", "torch", 2, 1): [150, 160, 140, 155],
    ("torch_ddp", "torch", 1, 2): [120, 130],
}


@pytest.fixture(scope="module")
def hand_cells() -> pd.DataFrame:
    recs = [_record(b, f, d, n, r, thr) for (b, f, d, n), values in HAND.items() for r, thr in enumerate(values)]
    recs[-1] = _record("torch_ddp", "torch", 1, 2, 1, 130, threads=2)  # one repeat ran with other threads
    recs.append(_record("torch_ddp", "torch", 1, 1, 0, 200, variant="tuned"))
    return analysis.tidy(recs)


def test_every_aggregate_cell_against_hand_computed_values(hand_cells):
    agg = analysis.aggregate(hand_cells)
    assert len(agg) == 6  # 2x1 and 1x2 are cells of their own, and so is the tuned variant
    rows = {(r["backend"], r["layout"], r["variant"]): r for r in agg.to_dict("records")}
    expected = {  # median, speedup = median / median at N=1, efficiency = speedup / 2, Gustafson (2 - S) / 1
        ("tf_multiworker", "1x1", "defaults"): (102.5, 1.0, 1.0, math.nan),
        ("tf_multiworker", "2x1", "defaults"): (185.0, 1.804878, 0.902439, 0.195122),
        ("torch_ddp", "1x1", "defaults"): (99.0, 1.0, 1.0, math.nan),
        ("torch_ddp", "2x1", "defaults"): (152.5, 1.540404, 0.770202, 0.459596),
        ("torch_ddp", "1x2", "defaults"): (125.0, 1.262626, 0.631313, 0.737374),
        ("torch_ddp", "1x1", "tuned"): (200.0, 1.0, 1.0, math.nan),
    }
    assert set(rows) == set(expected)
    for key, (median, speedup, eff, serial) in expected.items():
        r = rows[key]
        assert r["throughput"] == pytest.approx(median), key
        assert r["speedup"] == pytest.approx(speedup, abs=1e-6), key
        assert r["efficiency"] == pytest.approx(eff, abs=1e-6), key
        assert r["serial_law"] == "Gustafson"
        assert (math.isnan(r["serial_fraction"]) and math.isnan(serial)) or r["serial_fraction"] == pytest.approx(serial, abs=1e-6)
    assert "repeats ran under different conditions" in rows[("torch_ddp", "1x2", "defaults")]["conditions_note"]
    assert rows[("torch_ddp", "2x1", "defaults")]["conditions_note"] == ""
    assert analysis.condition_flags(agg) == [
        "torch_ddp N=2 (1x2, mlp, sweep hand): repeats ran under different conditions "
        "(threads=1, placement=spread, pinned=false, evaluation=shard | "
        "threads=2, placement=spread, pinned=false, evaluation=shard)"]


def test_both_verdicts_against_hand_computed_values(hand_cells):
    found = verdicts.verdicts(hand_cells[hand_cells["variant"] == "defaults"], bootstrap=200)
    rows = {(r["N"], r["layout"], r["question"]): r for r in found.to_dict("records")}
    assert set(rows) == {(1, "1x1", "faster"), (2, "2x1", "faster"), (2, "2x1", "scales better"), (2, "1x2", "faster"),
                         (2, "1x2", "scales better")}
    # N=2, faster: every TF repeat beats every PyTorch repeat: U = 16, p = 2 / C(8, 4) = 2/70; one pair
    fast = rows[(2, "2x1", "faster")]
    assert fast["ratio"] == pytest.approx(185 / 152.5) and fast["cliffs_delta"] == 1.0
    assert fast["p_value"] == pytest.approx(2 / 70) and fast["p_adjusted"] == pytest.approx(2 / 70)
    assert fast["verdict"] == "TF faster"
    assert fast["ratio_low"] <= fast["ratio"] <= fast["ratio_high"]
    # N=2, scales better: per-repeat efficiency thr_r(2) / thr_r(1) / 2
    tf = [190 / 100 / 2, 180 / 110 / 2, 200 / 90 / 2, 170 / 105 / 2]
    pt = [150 / 100 / 2, 160 / 95 / 2, 140 / 105 / 2, 155 / 98 / 2]
    scales = rows[(2, "2x1", "scales better")]
    assert scales["tf_value"] == pytest.approx((190 / 100 / 2 + 180 / 110 / 2) / 2)
    assert scales["ratio"] == pytest.approx(np.median(tf) / np.median(pt))
    # U = 14 of 16: the rank orders with U >= 14 are 4 of 70, twice for two sides
    assert scales["p_value"] == pytest.approx(8 / 70) and scales["cliffs_delta"] == pytest.approx(2 * 14 / 16 - 1)
    assert scales["verdict"] == "no significant difference"
    # N=1: ties count one half: U = 2.5 + 4 + 0 + 3.5 = 10, |U - 8| >= 2 in 48 of 70 orders
    assert rows[(1, "1x1", "faster")]["p_value"] == pytest.approx(48 / 70)
    assert rows[(2, "1x2", "faster")]["verdict"] == "not comparable: only PyTorch measured at N=2"


def test_underpowered_comparison_reads_inconclusive():
    # 3 repeats a side, a clean separation: the old rule said "TF faster"; p cannot go below 0.10
    row = verdicts.compare({"tf": [10, 11, 12]}, {"torch_ddp": [1, 2, 3]}, bootstrap=0)
    assert row["p_value"] == pytest.approx(0.1) and row["verdict"] == "inconclusive: needs >= 4 repeats"
    # 2 repeats a side and a 2% gap: never a verdict
    row = verdicts.compare({"tf": [102, 103]}, {"torch_ddp": [100, 101]}, bootstrap=0)
    assert row["verdict"] == "inconclusive: needs >= 4 repeats"
    # 3 x 3 backends at 5 repeats: 9 x 2 / C(10, 5) = 0.071 > 0.05, 6 repeats would do
    tf = {f"tf{i}": [10 + i, 11 + i, 12 + i, 13 + i, 14 + i] for i in range(3)}
    pt = {f"pt{i}": [1, 2, 3, 4, 5] for i in range(3)}
    assert verdicts.compare(tf, pt, bootstrap=0)["verdict"] == "inconclusive: needs >= 6 repeats"
    assert [verdicts.repeats_needed(k) for k in (1, 9, 25)] == [4, 6, 7]


def test_holm_adjusts_step_down():
    # sorted 0.01, 0.02, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.02), max(0.04, 1 x 0.04)
    assert verdicts.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])


def _seed_claim_design() -> tuple[int, int]:
    cfg = yaml.safe_load((ROOT / "conf" / "experiment" / "seed_claim.yaml").read_text())
    params = cfg["hydra"]["sweeper"]["params"]
    repeats = len(str(params["repeat"]).split(","))
    backends = str(params["backend"]).split(",")
    framework = frameworks()  # each backend's, from its YAML
    pairs = sum(framework[b] == "tf" for b in backends) * sum(framework[b] == "torch" for b in backends)
    return repeats, pairs


def test_seed_claim_has_enough_repeats_to_reach_alpha():
    repeats, pairs = _seed_claim_design()
    assert pairs == 9 and repeats >= verdicts.repeats_needed(pairs)
    assert repeats >= verdicts.repeats_needed(25)  # room for 5 backends per framework


def _false_call_rate(rule, n_tf: int, n_pt: int, repeats: int, trials: int, seed: int) -> dict[str, float]:
    """Share of trials in which ``rule(tf, pt, question)`` calls a difference, every backend drawn
    from one distribution (lognormal, 15% spread), for both questions."""
    rng = np.random.default_rng(seed)
    calls = {"faster": 0, "scales better": 0}
    for _ in range(trials):
        at_n = rng.lognormal(0.0, 0.15, size=(n_tf + n_pt, repeats))
        at_1 = rng.lognormal(0.0, 0.15, size=(n_tf + n_pt, repeats))
        for question, values in (("faster", at_n), ("scales better", at_n / at_1 / 4)):
            tf = {f"tf{i}": values[i] for i in range(n_tf)}
            pt = {f"pt{i}": values[n_tf + i] for i in range(n_pt)}
            calls[question] += bool(rule(tf, pt, question))
    return {q: c / trials for q, c in calls.items()}


def _the_verdict(tf, pt, question) -> bool:
    return not verdicts.compare(tf, pt, question, bootstrap=0)["verdict"].startswith(("no significant", "inconclusive"))


def _every_repeat_beats_every_repeat(tf, pt, question) -> bool:
    """The rule the verdicts replace: best median of each side, a call when the repeat ranges do not overlap."""
    a = max(tf.values(), key=np.median)
    b = max(pt.values(), key=np.median)
    return a.min() > b.max() or a.max() < b.min()


def test_false_call_rate_with_five_backends_per_framework_drawn_from_one_distribution():
    repeats, _ = _seed_claim_design()
    trials = 300
    mc_error = 2 * math.sqrt(0.05 * 0.95 / trials)
    for question, rate in _false_call_rate(_the_verdict, 5, 5, repeats, trials, seed=7).items():
        assert rate <= 0.05 + mc_error, question
    # the same harness catches a rule that calls noise: 4 TF backends, 1 PyTorch, 3 repeats
    assert _false_call_rate(_every_repeat_beats_every_repeat, 4, 1, 3, trials, seed=7)["faster"] > 0.05 + mc_error


def test_a_real_difference_is_called_with_the_default_repeats():
    repeats, _ = _seed_claim_design()
    rng = np.random.default_rng(11)
    tf = {f"tf{i}": rng.lognormal(np.log(1.5), 0.1, repeats) for i in range(3)}
    pt = {f"pt{i}": rng.lognormal(0.0, 0.1, repeats) for i in range(3)}
    row = verdicts.compare(tf, pt, bootstrap=500)
    assert row["verdict"] == "TF faster" and row["ratio_low"] > 1


def test_layouts_of_one_backend_are_never_pooled():
    loaded = analysis.load(LOCAL_CPU)
    recs = [r for r in loaded.records if r["config"]["backend"]["name"] == "torch_ddp"]
    relabelled = json.loads(json.dumps([r for r in recs if r["config"]["devices"] == 2]))
    for r in relabelled:  # the same runs, as 1 device on each of 2 nodes
        r["config"]["devices"], r["config"]["cluster"]["nodes"] = 1, 2
    agg = analysis.aggregate(analysis.tidy(recs + relabelled))
    n2 = agg[agg["N"] == 2]
    assert sorted(n2["layout"]) == ["1x2", "2x1"] and list(n2["repeats"]) == [3, 3]
    names = [name for _, name, _ in report_cells.series(agg)]
    assert names == ["torch_ddp (1 node)", "torch_ddp (2 nodes)"]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_backends", ROOT / "bench" / "backends.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_reader_prints_the_same_speedup(tmp_path):
    loaded = analysis.load(LOCAL_CPU)
    cells = analysis.tidy(loaded.records, loaded.paths)
    agg = analysis.aggregate(cells).set_index(["backend", "N"])["speedup"]
    # results export --table aggregate
    csv = tmp_path / "agg.csv"
    assert results_command(["export", str(LOCAL_CPU), "--csv", str(csv), "--table", "aggregate"]) == 0
    exported = pd.read_csv(csv).set_index(["backend", "N"])["speedup"]
    # the dashboard's tables and plots
    [study] = report.studies(cells, bootstrap=0)
    dashboard = study.agg.set_index(["backend", "N"])["speedup"]
    # the W&B sweep summary's speedup lines
    xs, ys, keys = tracking_sweep.sweep_lines(tracking_sweep.sweep_rows(loaded.records), "speedup")
    wandb = {(k, x): y for k, xline, yline in zip(keys, xs, ys) for x, y in zip(xline, yline)}
    # bench/backends.py
    bench = {k: v["speedup"] for k, v in _bench().summarize(loaded.records).items()}
    distributed = [k for k in agg.index if k[1] == 2]
    assert len(distributed) == 6
    for key in distributed:
        s = agg[key]
        assert 0 < s < 2
        assert exported[key] == pytest.approx(s, rel=1e-12) and dashboard[key] == pytest.approx(s, rel=1e-12)
        assert wandb[key] == pytest.approx(s, rel=1e-12) and bench[key] == pytest.approx(s, rel=1e-12)


def test_efficiency_against_the_best_single_device_of_the_framework():
    recs = [_record(b, f, d, n, r, thr) for (b, f, d, n), values in HAND.items() for r, thr in enumerate(values)]
    recs += [_record("torch", "torch", 1, 1, r, thr) for r, thr in enumerate([125, 135, 130])]  # median 130
    agg = analysis.aggregate(analysis.tidy(recs))
    rows = {(r["backend"], r["layout"]): r for r in agg.to_dict("records")}
    # torch_ddp at 2x1: median 152.5 over 2 x the fastest torch N = 1 cell (the single-device loop, 130)
    ddp = rows[("torch_ddp", "2x1")]
    assert ddp["framework_best"] == "torch" and ddp["framework_best_throughput"] == 130
    assert ddp["efficiency_vs_framework_best"] == pytest.approx(152.5 / (2 * 130))
    assert ddp["efficiency"] == pytest.approx(152.5 / 99 / 2)  # against its own N = 1 (median 99), unchanged
    assert rows[("torch_ddp", "1x1")]["efficiency_vs_framework_best"] == pytest.approx(99 / 130)
    # TF's only N = 1 cell is tf_multiworker's own: both efficiencies agree
    tf = rows[("tf_multiworker", "2x1")]
    assert tf["framework_best"] == "tf_multiworker"
    assert tf["efficiency_vs_framework_best"] == pytest.approx(tf["efficiency"]) == pytest.approx(185 / 102.5 / 2)


def test_a_backend_with_no_tuned_settings_is_the_baseline_of_both_variants():
    """The plain loop has no tuned: block (variant=tuned is no valid cell for it, tests/test_placement.py):
    its defaults cells are the framework's best single device in the tuned study too."""
    plain = _record("torch", "torch", 1, 1, 0, 300.0)
    tuned = [_record("torch_ddp", "torch", n, 1, 0, thr, variant="tuned") for n, thr in ((1, 250.0), (2, 400.0))]
    for rec in tuned:
        rec["config"]["backend"]["tuned"] = {"static_graph": True}
    agg = analysis.aggregate(analysis.tidy([plain, *tuned]))
    two = agg[(agg["backend"] == "torch_ddp") & (agg["N"] == 2)].iloc[0]
    assert two["variant"] == "tuned" and two["framework_best"] == "torch"
    assert two["efficiency_vs_framework_best"] == pytest.approx(400.0 / 2 / 300.0)
