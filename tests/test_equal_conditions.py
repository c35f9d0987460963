"""Equal conditions across backends and device counts: the same threads per rank, the same
evaluation work per rank, replicas compared only where there are two, and the aggregate flagging
cells whose runs did not share their conditions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scaling.sinks import ranks_in_sync
from scaling import analysis

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CPU = ROOT / "tests" / "data" / "local_cpu_sweep"


def test_ranks_in_sync_needs_two_digests():
    same, other = "a" * 64, "b" * 64
    assert ranks_in_sync([same, same]) is True
    assert ranks_in_sync([same, same, other]) is False
    assert ranks_in_sync([same]) is None  # one replica: nothing to compare, not "in sync"
    assert ranks_in_sync([]) is None


def test_the_recorded_sweep_is_flagged_where_conditions_differed():
    loaded = analysis.load(LOCAL_CPU)
    flags = analysis.condition_flags(analysis.aggregate(analysis.tidy(loaded.records, loaded.paths)))
    # Lightning set its own threads (2 at N=1, 1 at N=2); the N=1 runs were not pinned, the N=2 ranks were
    assert "lightning_ddp N=2 (2x1, mlp, sweep local_cpu): the N=1 base ran under other conditions: " \
           "threads=2 there, 1 here, pinned=false there, true here" in flags
    assert not any(f.startswith("tf_mirrored") for f in flags)  # one process at N=1 and N=2, never pinned


SHARDED_EVALUATION = """
import json, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from scaling.backends import tf_common
from scaling.workloads import tf_models
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = tf_models.build("mlp", 10)
rng = np.random.default_rng(0)
x = tf.constant(rng.random((2500, 28, 28, 1), dtype=np.float32))
y = tf.constant(rng.integers(0, 10, 2500).astype(np.int32))
halves = [tf_common.make_evaluator(model, rank=r, world=2)(x, y) for r in (0, 1)]
print(json.dumps({"full": tf_common.make_evaluator(model)(x, y), "halves": halves,
                  "strategy": tf_common.make_strategy_evaluator(model, strategy, x, y)()}))
"""


def test_tf_evaluation_is_a_shard_per_rank_and_adds_up_to_the_whole_set():
    pytest.importorskip("tensorflow")
    proc = subprocess.run([sys.executable, "-c", SHARDED_EVALUATION], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (full_loss, full_acc), halves = out["full"], out["halves"]
    # each rank's share counts over the whole set's size, so the shares add up to the whole
    assert sum(h[1] for h in halves) == pytest.approx(full_acc)
    assert sum(h[0] for h in halves) == pytest.approx(full_loss, rel=1e-5)
    assert all(0 < h[1] < full_acc for h in halves) or full_acc == 0
    assert out["strategy"] == pytest.approx([full_loss, full_acc], rel=1e-5)


@pytest.mark.multiprocess
def test_lightning_runs_with_the_configured_threads(tmp_path, mnist_cache):
    pytest.importorskip("pytorch_lightning")
    proc = subprocess.run([sys.executable, "-m", "scaling", "run", f"results_dir={tmp_path}", "progress=false",
                           "logger=none", "run_name=light", "backend=lightning_ddp", "threads=1", "train.epochs=1",
                           "train.max_steps_per_epoch=20", "protocol.warmup_steps=5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    rec = json.loads((tmp_path / "runs" / "light.json").read_text())
    assert proc.returncode == 0 and rec["status"] == "ok", (rec["error"] or "") + proc.stderr[-2000:]
    # Lightning alone would set cores / local processes (2 on a 2-core machine at N=1)
    assert rec["environment"]["threads"] == 1
    assert rec["metrics"]["conditions"]["threads"] == 1 and rec["metrics"]["conditions"]["evaluation"] == "shard"
