"""What a Slurm job asks for, without a cluster: sbatch options in rendered scripts and in the
submitit launcher's config, the site's set-up lines, and the interface Horovod binds per node."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["data=synthetic", "train.epochs=1"]


def render(tmp_path, *overrides) -> str:
    out = tmp_path / "jobs"
    proc = subprocess.run([sys.executable, "-m", "scaling", "slurm", "render", "cluster=slurm",
                           f"results_dir={tmp_path / 'results'}", *QUICK, *overrides, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    scripts = sorted(out.glob("*.sbatch"))
    assert len(scripts) == 1
    assert subprocess.run(["bash", "-n", str(scripts[0])]).returncode == 0
    return scripts[0].read_text()


def directives(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]


def test_benchmark_jobs_get_their_nodes_memory_and_no_requeue_by_default(tmp_path):
    d = directives(render(tmp_path, "backend=torch_ddp", "devices=4"))
    assert "--exclusive" in d and "--mem=0" in d and "--no-requeue" in d and "--requeue" not in d
    assert "--cpus-per-task=1" in d and "--ntasks-per-node=4" in d


def test_cpus_per_task_follow_the_devices_a_task_drives(tmp_path):
    # one TF process holding the node's 4 GPUs gets 4x what one DDP rank gets
    assert "--cpus-per-task=32" in directives(render(tmp_path / "a", "backend=tf_mirrored", "devices=4",
                                                     "cluster.cpus_per_device=8"))
    assert "--cpus-per-task=8" in directives(render(tmp_path / "b", "backend=torch_ddp", "devices=4",
                                                    "cluster.cpus_per_device=8"))
    assert "--cpus-per-task=3" in directives(render(tmp_path / "c", "backend=tf_mirrored", "devices=4",
                                                    "cluster.cpus_per_task=3"))


def test_requeue_exclusive_and_mem_as_configured(tmp_path):
    d = directives(render(tmp_path, "backend=torch_ddp", "cluster.requeue=true", "cluster.exclusive=false",
                          "cluster.mem=null"))
    assert "--requeue" in d and "--no-requeue" not in d
    assert "--exclusive" not in d and not [x for x in d if x.startswith("--mem")]


def test_site_setup_lines_run_before_the_cell(tmp_path):
    text = render(tmp_path, "backend=torch_ddp",
                  'cluster.env_setup=["module load cuda/12.4 nccl","export NCCL_IB_HCA=mlx5"]')
    lines = text.splitlines()
    at = lines.index("module load cuda/12.4 nccl")
    assert lines[at + 1] == "export NCCL_IB_HCA=mlx5"
    assert lines.index(next(line for line in lines if line.startswith("cd "))) < at
    assert at < lines.index(next(line for line in lines if line.startswith("srun ")))


def test_horovod_script_leaves_the_interface_to_each_rank(tmp_path):
    text = render(tmp_path, "backend=horovod_torch", "devices=2", "cluster.nodes=2")
    assert "HOROVOD_GLOO_IFACE=" not in text  # computed on the first node it was `lo` for every rank


def test_submitit_launcher_asks_for_the_same_allocation_as_a_rendered_script():
    from hydra import compose, initialize_config_dir

    from scaling.slurm import register_resolvers
    from scaling.config import CONF_DIR

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=["cluster=slurm", "backend=tf_mirrored", "devices=4", "cluster.cpus_per_device=2",
                                           'cluster.env_setup=["module load cuda"]'], return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert (launcher.tasks_per_node, launcher.cpus_per_task, launcher.gpus_per_node) == (1, 8, 4)
        assert dict(launcher.additional_parameters) == {"exclusive": True, "mem": "0", "no-requeue": True}
        assert list(launcher.setup)[0] == "module load cuda" and "SCALING_LAUNCH_TIME" in list(launcher.setup)[1]
        ddp = compose("config", overrides=["cluster=slurm", "backend=horovod_torch", "devices=4"],
                      return_hydra_config=True).hydra.launcher
        assert (ddp.tasks_per_node, ddp.cpus_per_task) == (4, 1)


def fake_ip(routes: dict[str, str], owners: dict[str, str]):
    def ip(*args: str) -> str:
        if args[:2] == ("route", "get"):
            return routes[args[2]]
        if args[:3] == ("addr", "show", "to"):
            return owners.get(args[3], "")
        raise AssertionError(args)
    return ip


def test_each_node_binds_the_interface_the_other_nodes_reach_it_through():
    from scaling.launch.slurm_job import route_iface

    # the rendezvous node: its route to its own address is `lo`, but peers come in on eth0
    head = fake_ip({"10.0.0.5": "local 10.0.0.5 dev lo table local src 10.0.0.5 uid 0"},
                   {"10.0.0.5": "2: eth0    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0"})
    assert route_iface("10.0.0.5", ip=head) == "eth0"
    # another node reaches the rendezvous over InfiniBand
    other = fake_ip({"10.0.0.5": "10.0.0.5 dev ib0 src 10.0.0.6 uid 0"}, {})
    assert route_iface("10.0.0.5", ip=other) == "ib0"
    # everything on one machine: loopback is right
    local = fake_ip({"127.0.0.2": "local 127.0.0.2 dev lo table local src 127.0.0.1 uid 0"}, {})
    assert route_iface("127.0.0.2", ip=local) == "lo"


def test_collective_settings_are_recorded(monkeypatch):
    from scaling import records

    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("NCCL_IB_HCA", "mlx5")
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "0.5")
    env = records.capture_environment()["comm_env"]
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_IB_HCA"] == "mlx5" and env["HOROVOD_CYCLE_TIME"] == "0.5"
