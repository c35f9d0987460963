"""Where the time goes: the alpha-beta fit to the micro-benchmark, the first-principles prediction
and its verdict, the per-cell decomposition, the rank clock, and a real 2-rank reference loop
whose record carries per-rank waiting figures."""
import math

import pandas as pd
import pytest

from scaling import comm_model, decomposition, rank_clock

ALPHA, BETA = 20e-6, 1e-9  # 20 us per ring step, 1 GB/s
MLP_BYTES = 101770 * 4  # the MLP's gradient (parameters x 4 bytes)


def ring(n, nbytes, alpha=ALPHA, beta=BETA):
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes * beta


def comm_rows(ns=(2, 4), sizes=(4, 4096, 262144, 4194304, MLP_BYTES), backend="torch_ddp", **kw):
    rows = []
    for n in ns:
        for b in sizes:
            rows.append({"sweep": "comm", "run_id": f"c{n}", "status": "ok", "error": None, "backend": backend,
                         "library": "torch.distributed (gloo)", "N": n, "variant": "defaults", "placement": "core",
                         "bytes": b, "label": "mlp" if b == MLP_BYTES else None, "iters": 10,
                         "latency_p50_s": ring(n, b, **kw), "latency_p95_s": ring(n, b, **kw) * 1.1,
                         "algbw_bytes_per_s": None, "busbw_bytes_per_s": None})
    return pd.DataFrame(rows)


def cell(backend, n, step_s, repeat=0, scaling="weak", per_device_batch=64):
    gb = per_device_batch * n
    return {"sweep": "s", "workload": "mlp", "workload_params": "", "data": "synthetic", "scaling": scaling,
            "variant": "defaults", "overrides": "", "backend": backend, "framework": "torch", "settings": "",
            "N": n, "layout": f"{n}x1", "nodes": 1, "devices_per_node": n, "run_id": f"{backend}-{n}-{repeat}",
            "status": "ok", "repeat": repeat, "parameters": 101770, "per_device_batch": per_device_batch,
            "global_batch": gb, "samples_per_s": gb / step_s,
            "conditions": "threads=1, placement=core, pinned=true, evaluation=sharded"}


# -- the alpha-beta fit ------------------------------------------------------------------------

def test_ring_fit_recovers_alpha_and_beta_from_exact_latencies():
    fit = comm_model.fit_alpha_beta(comm_rows(), bootstrap=50, path="torch.distributed")
    assert fit.alpha == pytest.approx(ALPHA, rel=1e-6) and fit.beta == pytest.approx(BETA, rel=1e-6)
    assert fit.residual_rms == pytest.approx(0, abs=1e-9)
    # N=8 was never measured: the ring form carries the fit there, 14 alpha + 14/8 S beta
    assert fit.time(8, 1e6) == pytest.approx(14 * ALPHA + 14 / 8 * 1e6 * BETA, rel=1e-6)
    lo, hi = fit.interval(8, 1e6)
    assert lo <= fit.time(8, 1e6) <= hi and hi - lo < 1e-9  # exact data: no spread


def test_one_device_count_identifies_both_terms():
    fit = comm_model.fit_alpha_beta(comm_rows(ns=(2,)), bootstrap=0)
    # at N=2: t = 2 alpha + S beta, the sizes separate the constant from the slope
    assert fit.alpha == pytest.approx(ALPHA, rel=1e-6) and fit.beta == pytest.approx(BETA, rel=1e-6)
    with pytest.raises(ValueError):
        comm_model.fit_alpha_beta(comm_rows(ns=(2,), sizes=(4,)), bootstrap=0)


def test_noisy_latencies_widen_the_interval_by_the_residual():
    rows = comm_rows()
    rows.loc[::2, "latency_p50_s"] *= 1.2
    fit = comm_model.fit_alpha_beta(rows, bootstrap=100)
    assert fit.residual_rms > 0.05
    lo, hi = fit.interval(4, MLP_BYTES)
    assert lo < fit.time(4, MLP_BYTES) * (1 - fit.residual_rms) + 1e-15 and hi >= fit.time(4, MLP_BYTES) * (1 + fit.residual_rms)


# -- the first-principles prediction ------------------------------------------------------------

def test_prediction_is_compute_at_one_plus_transfer_and_says_within_or_outside():
    compute = 0.010
    t2, t4 = ring(2, MLP_BYTES), ring(4, MLP_BYTES)
    cells = pd.DataFrame([cell("torch_reference", 1, compute), cell("torch_reference", 2, compute + t2),
                          cell("torch_reference", 4, 3 * (compute + t4)),  # far above: outside
                          cell("horovod_torch", 1, compute), cell("horovod_torch", 2, compute)])
    out = comm_model.validate_all(cells, comm_rows(), bootstrap=20).set_index(["backend", "N"])
    r2 = out.loc[("torch_reference", 2)]
    assert r2["predicted_no_overlap_s"] == pytest.approx(compute + t2, rel=1e-6)
    assert r2["predicted_full_overlap_s"] == pytest.approx(max(compute, t2), rel=1e-6)
    assert r2["inside"] and r2["verdict"].startswith("within its interval") and "(no overlap)" in r2["verdict"]
    assert "rests on the ring form" not in r2["verdict"]  # N=2 was measured
    r4 = out.loc[("torch_reference", 4)]
    assert r4["held_out"] and not r4["inside"] and r4["verdict"].startswith("outside its interval")
    # beside it, the model fitted to the training runs of N = 1, 2, at the same held-out N
    assert "fit on N = 1, 2, predict N = 4" in r4["trained_verdict"] and r4["trained_inside"] is False
    hv = out.loc[("horovod_torch", 2)]
    assert hv["inside"] is None and hv["verdict"] == "no prediction: no comm records for horovod (torch) at N=2"


def test_strong_scaling_compute_follows_the_per_device_batch():
    cells = pd.DataFrame([cell("torch_ddp", 1, 0.020, scaling="strong", per_device_batch=128),
                          cell("torch_ddp", 2, 0.012, scaling="strong", per_device_batch=64)])
    p = comm_model.predict(cells, 2, comm_model.fit_paths(comm_rows(), bootstrap=0), comm_rows())
    assert p.compute_s == pytest.approx(0.010)  # half the batch, half the N=1 step
    assert p.transfer_s == pytest.approx(ring(2, MLP_BYTES), rel=1e-6)
    far = comm_model.predict(cells.assign(N=[1, 8]), 8, comm_model.fit_paths(comm_rows(), bootstrap=0), comm_rows())
    assert far.note == "comm measured at N = 2, 4 only: N=8 rests on the ring form" and far.note in far.verdict()


# -- the decomposition ----------------------------------------------------------------------------

def test_split_closed_forms():
    d = decomposition.split(step=10.0, compute=6.0, transfer=3.0, waiting=0.5)
    assert d == {"overhead_s": 0.5, "hidden_s": 0.0, "ideal_floor_s": 9.0, "ideal_overlap_floor_s": 6.0}
    overlapped = decomposition.split(step=7.0, compute=6.0, transfer=3.0, waiting=None)
    assert overlapped["overhead_s"] == -2.0 and overlapped["hidden_s"] == 2.0
    unknown = decomposition.split(step=7.0, compute=6.0, transfer=None, waiting=None)
    assert unknown["overhead_s"] == 1.0 and math.isnan(unknown["ideal_floor_s"])


def test_table_splits_each_cell_and_marks_both_floors():
    compute, t2 = 0.010, ring(2, MLP_BYTES)
    cells = pd.DataFrame([cell("torch_ddp", 1, compute), cell("torch_ddp", 2, 0.016),
                          cell("torch_reference", 1, compute), cell("torch_reference", 2, 0.013),
                          cell("tf_mirrored", 1, compute), cell("tf_mirrored", 2, 0.02)])
    clocks = {"torch_reference-2-0": {"waiting_s": 0.001, "note": None, "start_skew_s": 0.002},
              "torch_ddp-2-0": {"waiting_s": None, "note": "waiting not separable for torch_ddp: inside"}}
    t = decomposition.table(cells, comm_rows(), clocks).set_index(["backend", "N"])
    ref = t.loc[("torch_reference", 2)]
    assert ref["compute_s"] == pytest.approx(compute) and ref["transfer_s"] == pytest.approx(t2)
    assert ref["transfer_source"] == "micro-benchmark at the gradient size"
    assert ref["waiting_s"] == pytest.approx(0.001)
    assert ref["overhead_s"] == pytest.approx(0.013 - compute - t2 - 0.001)
    assert ref["ideal_floor_s"] == pytest.approx(compute + t2)
    ddp = t.loc[("torch_ddp", 2)]
    assert ddp["reference_backend"] == "torch_reference" and ddp["reference_floor_s"] == pytest.approx(0.013)
    assert math.isnan(ddp["waiting_s"]) and "not separable" in ddp["waiting_note"]
    assert ddp["overhead_s"] == pytest.approx(0.016 - compute - t2)
    tf = t.loc[("tf_mirrored", 2)]
    assert math.isnan(tf["transfer_s"]) and tf["transfer_source"].startswith("no comm records for MirroredStrategy")
    assert pd.isna(tf["reference_backend"]) and math.isnan(tf["reference_floor_s"])
    one = t.loc[("torch_ddp", 1)]
    assert one["transfer_s"] == 0 and one["overhead_s"] == pytest.approx(0)


# -- the rank clock ----------------------------------------------------------------------------------

class Ticks:
    def __init__(self):
        self.now = 0

    def __call__(self):
        self.now += 10
        return self.now


def test_rank_clock_keeps_timed_steps_and_the_collective_marks():
    clock = rank_clock.RankClock(warmup_steps=1, clock=Ticks())

    class Backend:
        def mark_collective(self, reached, left):
            self.marks = (reached, left)
            return True

    backend = Backend()
    assert clock.attach(backend)
    for _ in range(3):
        clock.step_begin()
        backend.marks[0]()
        backend.marks[1]()
        clock.advance(1)
    s = clock.series()
    # 4 ticks a step; the first step is warm-up
    assert s["start"] == [50, 90] and s["reached"] == [60, 100] and s["left"] == [70, 110] and s["end"] == [80, 120]
    assert s["collective_marked"] and s["clock"] == "monotonic_ns"
    assert not rank_clock.RankClock(0).attach(object())  # no hook: nothing marked


def test_rank_clock_reads_stamps_given_as_functions_when_the_run_ends():
    clock = rank_clock.RankClock(warmup_steps=0, clock=Ticks())
    read = []

    def later(ns):
        def value():
            read.append(ns)
            return ns
        return value

    clock.marked = True
    for at in (15, 55):
        clock.step_begin()
        clock.collective_begin(later(at))
        clock.collective_end(lambda: None)  # stamped as not marked
        clock.advance(1)
    assert read == []  # nothing read inside the steps
    s = clock.series()
    assert s["reached"] == [15, 55] and s["left"] == [None, None] and read == [15, 55]


def test_rank_clock_under_the_protocol_times_the_same_steps_as_the_measurement():
    from scaling.protocol import Measurement, ProtocolConfig

    clock = rank_clock.RankClock(warmup_steps=2)
    meter = Measurement(ProtocolConfig(warmup_steps=2, log_every=0), global_batch=8, devices=1, observers=[clock])
    meter.epoch_begin(0)
    for _ in range(5):
        meter.step_begin()
        meter.step_end()
    meter.epoch_end(0)
    s = clock.series(meter.sync_every)
    assert len(s["start"]) == len(s["end"]) == len(meter.step_times) == 3
    assert all(b >= a for a, b in zip(s["start"], s["end"])) and s["reached"] is None  # nothing marked


def exit_report(rank, host, start, reached, left, marked=True):
    return {"rank": rank, "rank_clock": {"host": host, "clock": "monotonic_ns", "sync_every": 1,
                                         "collective_marked": marked, "start": start, "end": [x + 100 for x in (left or start)],
                                         "reached": reached if marked else None, "left": left if marked else None}}


def test_waiting_from_arrivals_on_one_host():
    exits = [exit_report(0, "h", [0, 1000], [100, 1200], [400, 1500]),
             exit_report(1, "h", [10, 1050], [130, 1260], [400, 1500])]
    m = rank_clock.merge(exits, "torch_reference")
    # rank 0 waits 30 ns, then 60 ns, for rank 1; rank 1 waits for no one
    assert m["waiting_per_rank_s"] == pytest.approx([45e-9, 0.0])
    assert m["waiting_s"] == pytest.approx(22.5e-9)  # median over steps of the ranks' mean (15, 30)
    assert m["arrival_skew_s"] == pytest.approx(45e-9) and m["start_skew_s"] == pytest.approx(30e-9)
    assert m["end_skew_s"] == 0 and m["step_per_rank_s"] == pytest.approx([550e-9, 520e-9])  # end = left + 100
    assert m["in_collective_s"] == pytest.approx((285 + 270) / 2 * 1e-9)
    assert m["method"].startswith("arrival timestamps")
    record = {"metrics": {"step_time_s": {}}}
    rank_clock.into_record(record, exits, "torch_reference")
    assert record["metrics"]["rank_clock"]["waiting_s"] and all("rank_clock" not in e for e in exits)


def test_waiting_across_hosts_uses_time_in_the_collective():
    # clocks of two hosts are unrelated: only each rank's time in the collective counts
    exits = [exit_report(0, "a", [0], [100], [400]), exit_report(1, "b", [9_000_000], [9_000_050], [9_000_150])]
    m = rank_clock.merge(exits)
    assert m["waiting_per_rank_s"] == pytest.approx([200e-9, 0.0]) and m["start_skew_s"] is None
    assert "several hosts" in m["method"]


def test_arrival_marks_alone_give_waiting_on_one_host_only():
    # tf_multiworker marks reaching the collective; Keras' optimizer leaves it out of sight
    one = rank_clock.merge([exit_report(0, "h", [0], [100], None), exit_report(1, "h", [0], [130], None)], "tf_x")
    assert one["waiting_per_rank_s"] == pytest.approx([30e-9, 0.0]) and one["in_collective_s"] is None
    assert one["note"] is None and one["marks_outside_step"] == 0
    two = rank_clock.merge([exit_report(0, "a", [0], [100], None), exit_report(1, "b", [0], [130], None)], "tf_x")
    assert two["waiting_s"] is None and "across hosts" in two["note"]


def test_marks_outside_their_steps_are_not_trusted():
    # rank 1's arrival 1 ms before its step began: a stamp from a clock that moved
    exits = [exit_report(0, "h", [5_000_000], [5_000_100], [5_000_400]),
             exit_report(1, "h", [5_000_000], [4_000_000], [5_000_400])]
    m = rank_clock.merge(exits, "horovod_tf")
    assert m["marks_outside_step"] == 1 and m["waiting_s"] is None and "not trusted" in m["note"]


def test_gradient_arrival_marks_the_last_gradient_then_hooks_it_alone():
    torch = pytest.importorskip("torch")
    from scaling.backends.torch_common import GradientArrival

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    events = []
    arrival = GradientArrival(model.parameters(), lambda: events.append("reached"), lambda: events.append("left"))
    for _ in range(3):
        model(torch.ones(1, 4)).sum().backward()
        arrival.left()
    # the first backward calls every parameter's hook, later ones only the last accumulated one's
    assert events == ["reached"] * 4 + ["left"] + ["reached", "left"] * 2
    assert arrival.last in (0, 1)  # the first layer's gradients are accumulated last
    assert GradientArrival.on(torch.device("cpu"), 1, model.parameters(), print, print) is None  # one rank
    assert GradientArrival.on(torch.device("meta"), 2, model.parameters(), print, print) is None  # not CPU


def test_unmarked_collective_says_waiting_is_not_separable():
    exits = [exit_report(r, "h", [0, 10], None, None, marked=False) for r in range(2)]
    m = rank_clock.merge(exits, "torch_ddp")
    assert m["waiting_s"] is None and m["note"].startswith("waiting not separable for torch_ddp")
    assert m["start_skew_s"] == 0
    assert rank_clock.merge([exits[0]]) is None  # one rank: nothing to compare


# -- a real 2-rank reference loop ------------------------------------------------------------------

@pytest.mark.multiprocess
def test_reference_loop_record_carries_per_rank_waiting(tmp_path):
    pytest.importorskip("torch.distributed")
    from test_distributed import run_ok

    rec = run_ok(tmp_path, "ref", "backend=torch_reference", "devices=2", "data=synthetic", "train.epochs=1",
                 "train.max_steps_per_epoch=12", "protocol.warmup_steps=2")
    clock = rec["metrics"]["rank_clock"]
    assert clock["ranks"] == 2 and clock["steps"] == 10 and clock["note"] is None
    assert len(clock["waiting_per_rank_s"]) == 2 and all(w >= 0 for w in clock["waiting_per_rank_s"])
    assert clock["waiting_s"] is not None and clock["in_collective_s"] >= clock["waiting_s"] > -1e-12
    assert min(clock["waiting_per_rank_s"]) == 0 or clock["waiting_s"] < clock["in_collective_s"]
    assert all("rank_clock" not in r for r in rec["ranks"])


# -- the dashboard and the results table ---------------------------------------------------------

def test_dashboard_shows_the_decomposition_and_the_floors(tmp_path):
    import shutil

    from scaling import comm, records, report
    from test_report import LOCAL_CPU

    shutil.copytree(LOCAL_CPU / "local_cpu", tmp_path / "local_cpu")
    for n in (2, 3):
        sizes = [comm.size_result(b, "mlp" if b == MLP_BYTES else None, [ring(n, b)] * 3, n)
                 for b in (4, 4096, 262144, MLP_BYTES)]
        metrics = {"collective": "all_reduce", "library": "torch.distributed (gloo)", "devices": n, "processes": n,
                   "gradient_bytes": {"mlp": MLP_BYTES}, "sizes": sizes}
        cfg = {"backend": {"name": "torch_ddp"}, "devices": n, "cluster": {"nodes": 1}, "comm": {"name": "allreduce"}}
        records.write_record(records.make_record(run_id=f"c{n}", group="comm", config=cfg, metrics=metrics,
                                                 environment=records.capture_environment(), error=None), tmp_path)
    html = report.build(tmp_path, png=False, bootstrap=20).html_path.read_text()
    assert "Where the time goes" in html and "local_cpu-mlp-" in html and "-decomposition" in html
    for part in ("compute (N=1 step)", "transfer (micro-benchmark)", "waiting for the slowest rank",
                 "overhead (what is left)", "ideal floor: compute + transfer", "practical floor: reference loop"):
        assert part in html
    assert "micro-benchmark at the gradient size" in html  # torch_ddp at N=2: the measured latency
    assert "no comm records for MirroredStrategy" in html  # said, not left blank
    assert "First-principles model against the sweep" in html
    assert "within its interval" in html or "outside its interval" in html
    table = decomposition.load(tmp_path)
    ddp = table[(table["backend"] == "torch_ddp") & (table["N"] == 2)].iloc[0]
    assert ddp["transfer_s"] == pytest.approx(ring(2, MLP_BYTES), rel=1e-9)
    assert ddp["overhead_s"] == pytest.approx(ddp["step_s"] - ddp["compute_s"] - ddp["transfer_s"])


def test_wandb_summary_values_name_backend_n_and_part():
    cells = pd.DataFrame([cell("torch_reference", 1, 0.010), cell("torch_reference", 2, 0.013)])
    where = decomposition.table(cells, comm_rows(), {})
    values = decomposition.summary_values(where, "s")
    assert values["where/torch_reference/N2/step_s"] == pytest.approx(0.013)
    assert values["where/torch_reference/N2/transfer_s"] == pytest.approx(ring(2, MLP_BYTES))
    assert "where/torch_reference/N2/waiting_s" not in values  # unmeasured: left out, not 0
    assert decomposition.summary_values(where, "other") == {}


def test_per_n_fits_show_whether_alpha_and_beta_hold_across_n():
    rows = pd.concat([comm_rows(ns=(2,)), comm_rows(ns=(4,), alpha=2 * ALPHA)])
    per_n = comm_model.fit_paths(rows, bootstrap=0, per_n=True)
    assert per_n[("torch.distributed", "defaults", "core", 2)].alpha == pytest.approx(ALPHA, rel=1e-6)
    assert per_n[("torch.distributed", "defaults", "core", 4)].alpha == pytest.approx(2 * ALPHA, rel=1e-6)
    pooled = comm_model.fit_paths(rows, bootstrap=0)[("torch.distributed", "defaults", "core")]
    assert pooled.n_values == [2, 4] and pooled.residual_rms > 0  # one alpha cannot fit both


def test_transfer_from_another_placement_or_from_the_fit_says_so():
    cells = pd.DataFrame([cell("torch_ddp", 1, 0.010), cell("torch_ddp", 2, 0.016), cell("torch_ddp", 3, 0.02)])
    rows = comm_rows().assign(placement="none")
    t = decomposition.table(cells, rows, {}).set_index("N")
    assert t.loc[2, "transfer_source"] == "micro-benchmark at the gradient size (measured under placement none, not core)"
    # N=3 was not measured: the ring fit of N=2 and 4 carries it, under the other placement, said
    assert t.loc[3, "transfer_s"] == pytest.approx(ring(3, MLP_BYTES), rel=1e-6)
    assert t.loc[3, "transfer_source"] == ("alpha-beta fit at the gradient size (comm records of torch.distributed "
                                           "under placement none, not core)")


def test_a_reference_with_no_tuned_settings_is_the_floor_of_the_tuned_study_too():
    from scaling import analysis

    base = dict.fromkeys(analysis.STUDY_KEYS, "s")
    ok = pd.DataFrame([dict(base, backend="torch_reference", variant="defaults", tunable=False, N=2, layout="2x1",
                            step_s=0.004),
                       dict(base, backend="horovod_reference", variant="defaults", tunable=True, N=2, layout="2x1",
                            step_s=0.003)])
    for variant in ("defaults", "tuned"):
        key = dict(base, variant=variant, N=2, layout="2x1")
        assert decomposition.reference_step(ok, key, "torch_reference") == pytest.approx(0.004), variant
    # a reference that has tuned settings stands only for its own variant
    assert math.isnan(decomposition.reference_step(ok, dict(base, variant="tuned", N=2, layout="2x1"), "horovod_reference"))


def test_transfer_is_the_mean_call_of_the_cells_own_variant():
    """A step pays every all-reduce call, slow ones included: the transfer is the micro-benchmark's
    mean at the gradient size (its p50 for a record without a mean), measured under the cell's variant."""
    compute = 0.002
    defaults = comm_rows(ns=(2,)).assign(latency_mean_s=lambda r: r["latency_p50_s"] * 3)  # a heavy tail
    tuned = comm_rows(ns=(2,)).assign(variant="tuned", run_id="c2-tuned")  # written before the mean was kept
    tuned_cells = [dict(cell("horovod_torch", n, step), variant="tuned") for n, step in ((1, compute), (2, 0.004))]
    cells = pd.DataFrame([cell("horovod_torch", 1, compute), cell("horovod_torch", 2, 0.006), *tuned_cells])
    rows = pd.concat([defaults.assign(backend="horovod_torch"), tuned.assign(backend="horovod_torch")])
    t = decomposition.table(cells, rows, {}).set_index(["variant", "N"])
    assert t.loc[("defaults", 2), "transfer_s"] == pytest.approx(3 * ring(2, MLP_BYTES))
    assert t.loc[("tuned", 2), "transfer_s"] == pytest.approx(ring(2, MLP_BYTES))
    assert t.loc[("defaults", 2), "overhead_s"] == pytest.approx(0.006 - compute - 3 * ring(2, MLP_BYTES))
    # the first-principles model is fitted to the same latency
    fit = comm_model.fit_alpha_beta(comm_model.comm_points(defaults), bootstrap=0)
    assert fit.time(2, MLP_BYTES) == pytest.approx(3 * ring(2, MLP_BYTES), rel=1e-6)
