"""`scaling comm`: message sizes and bandwidth definitions, the comm record, its cell id and
dashboard section, and a small N=2 run through each library's collective path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaling import comm, records
from scaling.comm.cli import expand_devices

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"min_bytes": 4, "max_bytes": 67108864, "size_factor": 4, "warmup": 1, "iters": 50, "min_iters": 5,
         "bytes_per_size": 268435456, "gradients": None}


def test_sizes_are_powers_of_two_from_4_bytes_to_64_mib_plus_labelled_gradients():
    every = comm.message_sizes({**QUICK, "size_factor": 2})
    assert [b for b, _ in every] == [2 ** k for k in range(2, 27)]
    quick = comm.message_sizes(QUICK, {"mlp": 407080, "cnn": 4799528})
    assert [b for b, _ in quick][:3] == [4, 16, 64] and quick[-1] == (67108864, None)
    assert (407080, "mlp") in quick and (4799528, "cnn") in quick
    assert comm.message_sizes(QUICK, {"tiny": 16}).count((16, "tiny")) == 1  # a grid size gets the label
    for bad in ({"size_factor": 3}, {"min_bytes": 6}, {"max_bytes": 2}):
        with pytest.raises(ValueError):
            comm.message_sizes({**QUICK, **bad})


def test_large_messages_get_fewer_iterations_but_never_below_the_minimum():
    assert comm.iterations_for(QUICK, 4) == 50
    assert comm.iterations_for(QUICK, 16 * 2 ** 20) == 16
    assert comm.iterations_for(QUICK, 64 * 2 ** 20) == 5


def test_latency_is_the_slowest_rank_and_busbw_follows_nccl_tests():
    assert comm.slowest_rank([[1.0, 5.0, 2.0], [3.0, 1.0, 2.5]]) == [3.0, 5.0, 2.5]
    entry = comm.size_result(4000, "mlp", [0.001, 0.003, 0.002], n=4)
    assert entry["latency_s"]["p50"] == pytest.approx(0.002)
    assert entry["algbw_bytes_per_s"] == pytest.approx(4000 / 0.002)
    assert entry["busbw_bytes_per_s"] == pytest.approx(4000 / 0.002 * 2 * 3 / 4)
    assert comm.bus_factor(2) == 1.0 and comm.bus_factor(8) == pytest.approx(1.75)


def comm_record(run_id="comm-torch_ddp-mlp-mnist-weak-n2x1-r0", status="ok", n=2, p50=0.001):
    cfg = {"backend": {"name": "torch_ddp"}, "devices": n, "cluster": {"nodes": 1}, "comm": {"name": "allreduce"}}
    sizes = [comm.size_result(b, label, [p50, p50 * 2], n) for b, label in ((4, None), (407080, "mlp"))]
    metrics = {"collective": "all_reduce", "library": "torch.distributed (gloo)", "devices": n, "processes": n,
               "gradient_bytes": {"mlp": 407080}, "sizes": sizes} if status == "ok" else None
    return records.make_record(run_id=run_id, group="comm", config=cfg, environment=records.capture_environment(),
                               metrics=metrics, error=None if status == "ok" else "rank 1: boom")


class _CountingPath:
    """A collective path that times nothing: its gradient sizes are the workloads' formulas."""
    processes, rank, library = 1, 0, "none"

    def gradient_elements(self, workload):
        from scaling.workloads import parameters

        return parameters(workload)

    def time_all_reduce(self, elements, warmup, iters):
        return [1e-6] * iters

    def exchange(self, table):
        return table


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_gradient_sizes_of_every_workload_yaml_the_framework_builds_and_the_cells_own(framework):
    from scaling.comm.worker import measure
    from scaling.workloads import parameters

    cfg = {"comm": {**QUICK, "max_bytes": 64}, "workload": {"name": "mlp", "hidden": 1024},
           "backend": {"runs_on": {"framework": framework}}, "devices": 1, "cluster": {"nodes": 1}}
    m = measure(_CountingPath(), cfg)
    assert m["gradient_bytes"] == {"mlp": 101_770 * 4, "cnn": 1_199_882 * 4, "mlp-h1024": parameters(cfg["workload"]) * 4}


def test_comm_records_validate_and_keep_out_of_the_training_analysis(tmp_path):
    rec = comm_record()
    assert rec["kind"] == "comm"
    records.validate(rec)
    records.write_record(rec, tmp_path)
    with pytest.raises(records.RecordError):
        records.validate({**rec, "kind": "train"})
    bad = json.loads(json.dumps(rec))
    del bad["metrics"]["sizes"][0]["busbw_bytes_per_s"]
    with pytest.raises(records.RecordError):
        records.validate(bad)
    from scaling import analysis

    assert analysis.load(tmp_path).records == []


def test_cell_ids_name_comm_cells_and_a_non_default_variant():
    from scaling.sweep import cell_id

    cfg = {"backend": {"name": "torch_ddp"}, "workload": {"name": "mlp"}, "data": {"name": "mnist"}, "devices": 2,
           "cluster": {"nodes": 1}, "repeat": 0}
    assert cell_id(cfg, ["backend=torch_ddp"]) == "torch_ddp-mlp-mnist-weak-n2x1-r0"  # unchanged
    assert cell_id({**cfg, "variant": "defaults"}, ["variant=defaults"]) == "torch_ddp-mlp-mnist-weak-n2x1-r0"
    assert cell_id({**cfg, "variant": "tuned"}, ["variant=tuned"]) == "torch_ddp-mlp-mnist-weak-n2x1-r0-tuned"
    assert cell_id({**cfg, "comm": {"name": "allreduce"}}, []) == "comm-torch_ddp-mlp-mnist-weak-n2x1-r0"


def test_devices_expand_from_two_to_the_devices_given():
    assert expand_devices(["devices=4", "backend=torch_ddp"]) == ["devices=2,3,4", "backend=torch_ddp"]
    assert expand_devices(["devices=2,8"]) == ["devices=2,8"]


def test_dashboard_section_plots_and_tabulates_the_gradient_size(tmp_path):
    from scaling import report, report_comm

    for i, n in enumerate((2, 4)):
        records.write_record(comm_record(run_id=f"c{i}", n=n), tmp_path)
    records.write_record(comm_record(run_id="dead", status="failed"), tmp_path)
    sec = report_comm.section(tmp_path, report.Figure, report._fig_html)
    assert [f.name for f in sec.figures] == ["comm-comm-latency", "comm-comm-busbw"]
    table = report_comm.gradient_table(sec.rows)
    assert list(table["N"]) == [2, 4] and set(table["label"]) == {"mlp"}
    assert table["busbw_bytes_per_s"].iloc[1] == pytest.approx(407080 / 0.0015 * 1.5)  # p50 of (1, 2) ms, N=4
    assert "Failed comm cells" in sec.html and "rank 1: boom" in sec.html
    html = report.build(tmp_path, png=False).html_path.read_text()
    assert "Collectives (scaling comm)" in html and "comm-comm-busbw" in html


# ---- real runs, N=2 -------------------------------------------------------------------------

SMALL = ["comm.max_bytes=64", "comm.size_factor=16", "comm.warmup=1", "comm.iters=3", "comm.min_iters=3",
         "comm.gradients=[mlp]", "device=cpu"]


def check(record, library):
    records.validate(record)
    assert record["status"] == "ok", record["error"]
    m = record["metrics"]
    assert record["kind"] == "comm" and library in m["library"] and m["devices"] == 2
    assert [s["bytes"] for s in m["sizes"]] == sorted([4, 64, m["gradient_bytes"]["mlp"]])
    from scaling.workloads import PARAMETERS

    assert m["gradient_bytes"] == {"mlp": PARAMETERS["mlp"] * 4}
    assert all(s["latency_s"]["p50"] > 0 and s["iters"] == 3 for s in m["sizes"])


@pytest.mark.multiprocess
def test_comm_sweep_over_torch_distributed_writes_record_dashboard_and_wandb_run(tmp_path):
    pytest.importorskip("torch")
    env = dict(os.environ, WANDB_MODE="offline", NETRC=os.devnull, WANDB_API_KEY="")
    proc = subprocess.run([sys.executable, "-m", "scaling", "comm", f"results_dir={tmp_path}", "backend=torch_ddp",
                           "devices=2", "logger=wandb", "logger.mode=offline", *SMALL],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    found = sorted((tmp_path / "comm").glob("comm-torch_ddp-mlp-mnist-weak-n2x1-r0*.json"))
    assert proc.returncode == 0 and len(found) == 2, proc.stderr[-3000:]  # both variants, as the main job
    record, tuned = (json.loads(f.read_text()) for f in found)
    check(record, "torch.distributed (gloo)")
    check(tuned, "torch.distributed (gloo)")
    assert tuned["config"]["variant"] == "tuned" and tuned["environment"]["settings"]["variant"] == "tuned"
    assert record["environment"]["process_group"] == "gloo" and len(record["ranks"]) == 2
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Collectives (scaling comm)" in page
    assert "2 collective benchmarks, 0 unreadable" in page  # counted as what they are
    assert "2 collective benchmark cell(s)" in proc.stderr and "0 runs" not in proc.stderr
    runs = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 2, "one W&B run per comm cell (the training summary run skips comm records)"


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend, module, library", [
    ("horovod_torch", "horovod.torch", "horovod (gloo)"),
    ("tf_multiworker", "tensorflow", "tf.distribute.MultiWorkerMirroredStrategy"),
    ("tf_mirrored", "tensorflow", "tf.distribute.MirroredStrategy"),
])
def test_comm_run_through_each_library(tmp_path, backend, module, library):
    pytest.importorskip(module)
    proc = subprocess.run([sys.executable, "-m", "scaling", "run", f"results_dir={tmp_path}", "comm=allreduce",
                           f"backend={backend}", "devices=2", "logger=none", "run_name=c", *SMALL],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    path = tmp_path / "runs" / "c.json"
    assert path.exists(), proc.stderr[-3000:]
    record = json.loads(path.read_text())
    check(record, library)
    assert proc.returncode == 0
