"""Placement (core / compute / none, the same at every N) and the defaults/tuned variant."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from scaling import placement, settings
from scaling.config import ConfigError, validate

ROOT = Path(__file__).resolve().parent.parent


def cfg_for(launcher="torchrun", devices=2, threads=1, mode="core", device="cpu"):
    return {"backend": {"runs_on": {"launcher": launcher}}, "devices": devices, "threads": threads, "placement": mode,
            "device": device}


def test_core_gives_each_process_its_threads_in_cores_at_every_n():
    cores = [0, 1, 2, 3]
    assert placement.block(cfg_for(devices=1), 0, 1, cores) == [0]  # N=1 gets one core too
    assert [placement.block(cfg_for(), r, 2, cores) for r in (0, 1)] == [[0], [1]]
    assert placement.block(cfg_for(threads=2), 1, 2, cores) == [2, 3]
    assert placement.block(cfg_for(launcher="process", devices=2), 0, 1, cores) == [0, 1]  # one process, 2 devices
    assert placement.block(cfg_for(threads=None), 1, 2, cores) == [2, 3]  # no thread count: an even split
    assert [placement.block(cfg_for(devices=3), r, 3, [0, 1]) for r in range(3)] == [[0], [1], [0]]  # round-robin


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_compute_pins_the_main_thread_and_frees_the_others():
    node = sorted(os.sched_getaffinity(0))
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, daemon=True)
    helper.start()
    placer = placement.Placement(cfg_for(devices=1, mode="compute"), 0, 1)
    try:
        assert placer.apply() == [node[0]]
        assert os.sched_getaffinity(threading.main_thread().native_id) == {node[0]}
        assert os.sched_getaffinity(helper.native_id) == set(node)
        d = placer.describe()
        # the main thread, and TensorFlow's compute threads where an earlier test in this process started some
        tf_compute = sum(1 for t in placement._tasks() if placement._name(t).startswith(placement.COMPUTE_THREADS)
                         and t != threading.main_thread().native_id)
        assert d["mode"] == "compute" and d["threads_pinned"] == 1 + tf_compute and d["threads_free"] >= 1
        core = placement.Placement(cfg_for(devices=1, mode="core"), 0, 1)
        core.apply()
        assert os.sched_getaffinity(helper.native_id) == {node[0]}
        assert placement.Placement(cfg_for(mode="none"), 0, 2).apply() is None
        assert placement.Placement(cfg_for(device="cuda"), 0, 2).describe()["skipped"] == "GPU worker"
    finally:
        stop.set()
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), node)
            except OSError:
                pass


def test_variant_selects_the_tuned_block_and_unknown_values_are_refused(mnist_cache):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from scaling.config import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        def plain(*overrides):
            return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)

        ddp = plain("backend=torch_ddp")
        assert ddp["variant"] == "defaults" and ddp["placement"] == "core" and settings.in_force(ddp) == {}
        tuned = plain("backend=torch_ddp", "variant=tuned")
        assert settings.in_force(tuned) == {"gradient_as_bucket_view": True, "static_graph": True, "bucket_cap_mb": 25,
                                            "local_hook_at_one_rank": True}
        hvd = plain("backend=horovod_torch", "variant=tuned")
        assert float(settings.in_force(hvd)["environment"]["HOROVOD_CYCLE_TIME"]) < 1
        assert settings.in_force(plain("backend=tf_multiworker", "variant=tuned"))["implementation"] == "RING"
        # the plain loop has no tuned settings: its defaults cells stand for it in both variants
        with pytest.raises(ConfigError, match="backend=torch has no tuned settings"):
            validate(plain("backend=torch", "variant=tuned"))
        validate(plain("backend=torch_ddp", "variant=tuned"))
        for bad in (("variant=best",), ("placement=everywhere",)):
            with pytest.raises(ConfigError):
                validate(plain("backend=torch_ddp", *bad))


@pytest.mark.multiprocess
def test_records_list_placement_and_the_settings_in_force(tmp_path):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, "-m", "scaling", "run", f"results_dir={tmp_path}", "progress=false",
                           "logger=none", "run_name=t", "backend=torch_ddp", "devices=2", "variant=tuned",
                           "placement=compute", "data=synthetic", "train.epochs=1", "train.max_steps_per_epoch=30",
                           "protocol.warmup_steps=5", "device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    rec = json.loads((tmp_path / "runs" / "t.json").read_text())
    assert proc.returncode == 0 and rec["status"] == "ok", (rec["error"] or "") + proc.stderr[-2000:]
    env = rec["environment"]
    assert env["settings"]["variant"] == "tuned"
    assert env["settings"]["in_force"] == {"bucket_cap_mb": 25.0, "gradient_as_bucket_view": True, "static_graph": True,
                                           "comm_hook": "default all-reduce"}  # two ranks: DDP's own all-reduce
    if len(os.sched_getaffinity(0)) >= 2:
        assert env["placement"]["mode"] == "compute" and len(env["placement"]["cores"]) == 1
        assert env["placement"]["threads_pinned"] == 1 and env["placement"]["threads_free"] >= 1  # gloo's threads


def test_ddp_at_one_rank_with_the_local_hook_steps_exactly_as_with_its_all_reduce(tmp_path):
    """``local_hook_at_one_rank`` (torch_ddp and lightning_ddp, tuned): at world size 1 the hook
    hands each bucket back instead of all-reducing it over one rank; the step is the same."""
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from scaling.backends import torch_common as tc
    from scaling.workloads import torch_models

    tuned = {"gradient_as_bucket_view": True, "local_hook_at_one_rank": True}
    kwargs, hook = tc.ddp_options(tuned, world=1)
    assert kwargs == {"gradient_as_bucket_view": True} and hook is tc.local_bucket_hook
    assert tc.ddp_options(tuned, world=2)[1] is None  # several ranks: DDP's own all-reduce
    assert tc.ddp_options({"local_hook_at_one_rank": False}, world=1) == ({}, None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x, y = torch.rand(16, 28, 28), torch.randint(0, 10, (16,))
        weights = []
        for with_hook in (False, True):
            torch.manual_seed(0)
            ddp = DDP(torch_models.build("mlp").eval(), **kwargs)
            if with_hook:
                ddp.register_comm_hook(None, hook)
            opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
            for _ in range(2):
                opt.zero_grad()
                torch.nn.functional.nll_loss(ddp(x), y).backward()
                opt.step()
            weights.append([p.detach().clone() for p in ddp.module.parameters()])
            assert tc.ddp_in_force(ddp, hook if with_hook else None)["comm_hook"] == (
                "local_bucket_hook" if with_hook else "default all-reduce")
        assert all(torch.equal(a, b) for a, b in zip(*weights))
    finally:
        dist.destroy_process_group()
