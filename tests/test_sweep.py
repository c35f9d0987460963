"""Sweeps: cell ids, skipping finished cells, failures, an interrupted driver, concurrent writers."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaling import cell_time, records
from scaling.sweep import cell_id

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["data=synthetic", "train.epochs=1", "train.max_steps_per_epoch=20", "protocol.warmup_steps=5"]


def sweep(tmp, *args, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "scaling", "sweep", f"results_dir={tmp}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


def cells(tmp, sweep_id):
    out = {}
    for path in sorted((Path(tmp) / sweep_id).glob("[!.]*.json")):  # records; dotfiles are the sweep's own
        rec = json.loads(path.read_text())
        records.validate(rec)
        out[path.stem] = (rec["status"], path.stat().st_mtime_ns)
    return out


def _cfg(**kw):
    cfg = {"backend": {"name": "torch_ddp"}, "workload": {"name": "mlp"}, "data": {"name": "mnist"},
           "scaling": "weak", "devices": 2, "cluster": {"nodes": 1}, "repeat": 1}
    cfg.update(kw)
    return cfg


def test_cell_ids_are_stable_and_name_the_axes():
    base = cell_id(_cfg(), ["backend=torch_ddp", "devices=2", "repeat=1", "results_dir=/x", "experiment=e"])
    assert base == "torch_ddp-mlp-mnist-weak-n2x1-r1"
    assert cell_id(_cfg(), ["devices=2", "backend=torch_ddp"]) == base
    other = cell_id(_cfg(), ["backend=torch_ddp", "train.per_device_batch=128"])
    assert other.startswith(base + "-") and other != base
    assert other == cell_id(_cfg(), ["train.per_device_batch=128"])
    assert cell_id(_cfg(), ["train.per_device_batch=256"]) != other


@pytest.mark.multiprocess
def test_sweep_runs_skips_and_reruns_only_missing_cells(tmp_path):
    args = ["sweep_id=s", "backend=torch,torch_ddp", "devices=1,2", *QUICK]
    first = sweep(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    done = cells(tmp_path, "s")
    # torch on 2 devices is not a valid cell: skipped with the reason, no record
    # the QUICK overrides are not named axes: one short hash of them ends every id
    suffixes = {k.rsplit("-", 1)[1] for k in done}
    assert len(suffixes) == 1 and len(suffixes.pop()) == 8
    assert {k.rsplit("-", 1)[0] for k in done} == {"torch-mlp-synthetic-weak-n1x1-r0",
                                                   "torch_ddp-mlp-synthetic-weak-n1x1-r0",
                                                   "torch_ddp-mlp-synthetic-weak-n2x1-r0"}
    assert all(status == "ok" for status, _ in done.values())
    assert "not a valid cell, skipped" in first.stderr
    # the skipped cell is kept with its reason, and the dashboard's header counts it
    invalid = json.loads((tmp_path / "s" / ".invalid-cells.json").read_text())
    assert [k.split("-r0")[0] for k in invalid] == ["torch-mlp-synthetic-weak-n2x1"]
    assert "1 grid cells skipped as invalid for their backend" in (tmp_path / "report" / "index.html").read_text()
    assert "sweep s: 3 runs (0 failed)" in first.stderr  # the closing table: medians, speedup, efficiency
    assert "cell 1/4 " in first.stderr and " elapsed, ~" in first.stderr  # progress: cell k of n, ETA
    assert first.stderr.count(" s fixed) | ") == 3  # each cell's wall time and its fixed part
    for run_id in done:  # where each cell's wall time went: phases that add up to it (scaling.cell_time)
        m = records.load_record(tmp_path / "s" / f"{run_id}.json")["metrics"]
        t = m["cell_time_s"]
        assert sum(t[p] for p in cell_time.PHASES) == pytest.approx(t["wall"])
        assert t["training"] >= m["train_time_s"] and t["fixed"] == pytest.approx(
            t["wall"] - m["train_time_s"] - sum(m["eval_time_s"]))
    table = first.stderr[first.stderr.index("sweep s: 3 runs"):]
    assert "speedup" in table and "efficiency" in table and "2x1" in table
    again = sweep(tmp_path, *args)
    assert again.returncode == 0 and again.stderr.count("done already") == 3
    assert cells(tmp_path, "s") == done  # nothing rewritten
    victim = [k for k in done if k.startswith("torch_ddp-mlp-synthetic-weak-n2x1-r0")][0]
    (tmp_path / "s" / f"{victim}.json").unlink()
    third = sweep(tmp_path, *args, "--resume")
    assert third.returncode == 0 and third.stderr.count("done already") == 2
    after = cells(tmp_path, "s")
    assert set(after) == set(done)
    assert {k: v for k, v in after.items() if k != victim} == {k: v for k, v in done.items() if k != victim}


@pytest.mark.multiprocess
def test_failed_cell_is_recorded_and_the_sweep_goes_on(tmp_path):
    pytest.importorskip("torch")
    if __import__("torch").cuda.is_available():
        pytest.skip("needs a machine without CUDA to make a cell fail")
    args = ["sweep_id=f", "backend=torch", "device=cuda,cpu", *QUICK]
    proc = sweep(tmp_path, *args)
    assert proc.returncode != 0
    got = {k: s for k, (s, _) in cells(tmp_path, "f").items()}
    assert sorted(got.values()) == ["failed", "ok"]
    failed = [k for k, s in got.items() if s == "failed"][0]
    rec = json.loads((tmp_path / "f" / f"{failed}.json").read_text())
    assert "no CUDA device" in rec["error"]
    rerun = sweep(tmp_path, *args)
    assert rerun.stderr.count("done already") == 1 and "FAILED" in rerun.stderr  # only the failed cell ran


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.multiprocess
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_killed_driver_loses_no_finished_cell(tmp_path, sig):
    args = ["sweep_id=k", "backend=torch_ddp", "devices=1,2", "repeat=0,1", "data=synthetic", "train.epochs=3",
            "protocol.warmup_steps=5"]
    proc = subprocess.Popen([sys.executable, "-m", "scaling", "sweep", f"results_dir={tmp_path}", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pids = set()
    try:
        deadline = time.monotonic() + 240
        # wait until one cell has finished and the next one is training
        while time.monotonic() < deadline:
            for f in (tmp_path / "k").glob(".*.run/rank*.pid.json"):
                try:
                    pids.add(json.loads(f.read_text())["pid"])
                except (ValueError, OSError):
                    pass
            done = set()
            for p in (tmp_path / "k").glob("[!.]*.json"):
                try:
                    if json.loads(p.read_text()).get("status") == "ok":
                        done.add(p.stem)
                except (ValueError, OSError):
                    pass
            running = {p.parent.name[1:-len(".run")] for p in (tmp_path / "k").glob(".*.run/rank0.pid.json")}
            if done and running - done:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the sweep never reached its second cell")
        time.sleep(1.5)
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(2)
    # every record is whole; the finished cell is kept; no worker survives its driver
    got = cells(tmp_path, "k")
    assert any(s == "ok" for s, _ in got.values())
    assert not [p for p in pids if _alive(p)]
    assert not list((tmp_path / "k").glob(".*.tmp"))
    rerun = sweep(tmp_path, *args, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    final = cells(tmp_path, "k")
    assert len(final) == 4 and all(s == "ok" for s, _ in final.values())
    for name, (status, mtime) in got.items():
        if status == "ok":
            assert final[name][1] == mtime  # finished cells were not rerun


def _writer(args):
    results, worker, rounds = args
    env = records.capture_environment()
    for i in range(rounds):
        run_id = f"shared-{i % 3}" if i % 2 else f"w{worker}-{i}"
        rec = records.make_record(run_id=run_id, group="g", config={"writer": worker, "i": i, "pad": "x" * 20000},
                                  environment=env, metrics=None, error=f"writer {worker} round {i}")
        records.write_record(rec, results)


def test_concurrent_writers_corrupt_nothing(tmp_path):
    with multiprocessing.get_context("spawn").Pool(10) as pool:
        pool.map(_writer, [(str(tmp_path), w, 40) for w in range(10)])
    files = list((tmp_path / "g").iterdir())
    assert not [f for f in files if f.name.startswith(".")]  # no temp file left behind
    found = list(records.read_records(tmp_path))
    assert len(found) == 10 * 20 + 3
    for _, rec in found:
        records.validate(rec)
        assert rec["error"] == f"writer {rec['config']['writer']} round {rec['config']['i']}"


def test_cells_are_counted_as_the_multirun_makes_them():
    from scaling.sweep import count_cells

    params = {"repeat": "range(3)", "backend": "torch,torch_ddp,tf", "devices": "1,2"}
    assert count_cells(params, []) == 18
    assert count_cells(params, ["backend=torch_ddp", "train.epochs=1"]) == 6  # the command line wins
    assert count_cells({}, ["devices=1,2,4"]) == 3


def test_the_sweep_composes_up_front_one_cell_per_group_choice_and_each_new_value():
    import itertools

    from scaling.sweep import covering_cells

    backends = ["torch", "tf", "torch_ddp", "horovod_torch"]
    batch = [[f"repeat={r}", f"backend={b}", f"devices={d}", f"variant={v}", "workload=mlp"]
             for r, b, d, v in itertools.product(range(3), backends, (1, 2), ("defaults", "tuned"))]
    picked = covering_cells(batch, lambda key: key in ("backend", "workload"))
    chosen = [batch[i] for i in picked]
    assert len(picked) == 8  # one per backend, plus the first cell with each other value not seen yet
    assert {o for cell in chosen for o in cell} == {o for cell in batch for o in cell}  # every value
    assert {c[1] for c in chosen} == {f"backend={b}" for b in backends}  # every group choice
    # two group axes: every combination of their choices, not just every choice
    batch = [[f"backend={b}", f"workload={w}"] for b, w in itertools.product(backends, ("mlp", "cnn"))]
    assert covering_cells(batch, lambda key: key in ("backend", "workload")) == list(range(8))
    assert covering_cells([["+backend@x=torch"], ["~backend"]], lambda key: key == "backend") == [0, 1]
