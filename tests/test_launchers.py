"""The launcher table (launch/launchers.py): every backend's launcher is in it, a new launcher is one
entry that local runs, rendered Slurm scripts, submitit and srun tasks all follow, and no other
module names a launcher."""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import yaml

from scaling.launch import launchers, slurm_env
from scaling.config import CONF_DIR, ConfigError

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["data=synthetic", "train.epochs=1", "train.max_steps_per_epoch=30", "protocol.warmup_steps=5",
         "progress=false", "logger=none"]


def compose(*overrides: str, hydra: bool = False):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from scaling.slurm import register_resolvers

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra)
        return cfg if hydra else OmegaConf.to_container(cfg, resolve=True)


def env_ranks(devices: int, worker: list[str]) -> launchers.Commands:
    """A launcher torch.distributed needs nothing else for: one process per device with env:// set."""
    port = launchers.free_port()
    return [([sys.executable, *worker], {"RANK": str(i), "WORLD_SIZE": str(devices), "LOCAL_RANK": str(i),
                                         "LOCAL_WORLD_SIZE": str(devices), "MASTER_ADDR": "127.0.0.1",
                                         "MASTER_PORT": str(port)})
            for i in range(devices)]


@pytest.fixture
def new_launcher():
    """One entry in the table, and nothing else: taken out again after the test."""
    entry = launchers.register(launchers.Launcher(
        "env_ranks", task_per_device=True, local=env_ranks, rendezvous="torch",
        srun_note="srun starts one rank per device, each told its rank by env_ranks"))
    yield entry
    launchers.LAUNCHERS.pop(entry.name)


@pytest.mark.parametrize("path", sorted((CONF_DIR / "backend").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_backend_names_a_launcher_in_the_table(path):
    name = yaml.safe_load(path.read_text())["runs_on"]["launcher"]
    entry = launchers.get(name)
    commands = entry.local(2, ["-m", "scaling.worker", "--config", "c.json"])
    assert commands and all(argv and "scaling.worker" in argv for argv, _ in commands)
    assert entry.tasks_per_node(4) * entry.devices_per_task(4) == 4
    assert entry.rendezvous is None or entry.rendezvous in slurm_env.RENDEZVOUS


def test_an_unknown_launcher_is_a_config_error_naming_the_known_ones():
    with pytest.raises(ConfigError, match="backend.runs_on.launcher=.nope.*torchrun"):
        launchers.of({"backend": {"runs_on": {"launcher": "nope"}}})


def test_a_new_launcher_renders_its_slurm_geometry_from_its_entry(new_launcher, tmp_path):
    from scaling.slurm import geometry, render_cell

    cfg = compose("cluster=slurm", "backend=torch_ddp", "devices=3", "cluster.nodes=2",
                  f"backend.runs_on.launcher={new_launcher.name}", f"results_dir={tmp_path}", *QUICK)
    script = render_cell(cfg, "cell", tmp_path / "jobs").read_text()
    assert "#SBATCH --ntasks-per-node=3" in script and "#SBATCH --cpus-per-task=1" in script
    assert f"# {new_launcher.srun_note}" in script
    assert script.rstrip().splitlines()[-1].startswith("srun --kill-on-bad-exit=1 ")
    assert geometry(cfg) == (2, 3, 3, 1)
    # the submitit launcher asks for the same allocation, through the resolvers
    hydra = compose("cluster=slurm", "backend=torch_ddp", "devices=3", f"backend.runs_on.launcher={new_launcher.name}",
                    hydra=True).hydra.launcher
    assert (hydra.tasks_per_node, hydra.cpus_per_task) == (3, 1)


def fake_scontrol(tmp_path: Path, addrs: dict[str, str]) -> Path:
    """An ``scontrol`` answering ``show hostnames`` and ``show node X -o`` for a made-up job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cases = "".join(f'  "show node {h} -o") echo "NodeName={h} Arch=x86_64 NodeAddr={a} NodeHostName={h}" ;;\n'
                    for h, a in addrs.items())
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\ncase "$*" in\n  "show hostnames"*) printf "%s\\n" {" ".join(addrs)} ;;\n'
                      f'{cases}  *) exit 1 ;;\nesac\n')
    script.chmod(0o755)
    return bin_dir


@pytest.fixture
def srun_task(tmp_path, monkeypatch):
    """This process as task 1 of a 2-node, 2-task srun job (job 4242), with its own scontrol."""
    bin_dir = fake_scontrol(tmp_path, {"nodea": "10.9.0.1", "nodeb": "10.9.0.2"})
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[a-b]", "SLURM_NTASKS": "2",
                       "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("MASTER_ADDR", "MASTER_PORT", "TF_CONFIG", "SCALING_TF_PORT", "SCALING_RUN_DIR",
                "SCALING_GATHER_RANKS"):
        monkeypatch.setenv(key, "")  # so that what set_up writes is undone after the test
        monkeypatch.delenv(key)


def test_an_srun_task_gets_its_launchers_rendezvous(new_launcher, srun_task, monkeypatch):
    import os

    slurm_env.set_up({"backend": {"launcher": new_launcher.name}}, 1, "cell")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.9.0.1", str(20000 + 4242))
    assert "TF_CONFIG" not in os.environ
    slurm_env.set_up({"backend": {"launcher": "tf_config"}}, 1, "cell")
    tf = json.loads(os.environ["TF_CONFIG"])
    assert tf == {"cluster": {"worker": ["10.9.0.1:24242", "10.9.0.2:24243"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.delenv("MASTER_ADDR")
    slurm_env.set_up({"backend": {"launcher": "process"}}, 1, "cell")  # one task: nobody to meet
    assert "MASTER_ADDR" not in os.environ


def test_under_srun_rank_0_gathers_the_ranks_reports_itself(srun_task, tmp_path, capsys):
    import os

    from scaling import sinks

    slurm_env.set_up({"backend": {"launcher": "process"}, "results_dir": str(tmp_path)}, 1, "cell")
    folder = tmp_path / ".ranks" / "4242.0.cell"
    assert os.environ["SCALING_RUN_DIR"] == str(folder) and folder.is_dir()
    assert os.environ[sinks.GATHER_ENV] == "1"

    def report(rank, reached):
        clock = {"host": "h", "clock": "monotonic_ns", "sync_every": 1, "collective_marked": True,
                 "start": [0], "end": [500], "reached": [reached], "left": [400]}
        (folder / f"rank{rank}.exit.json").write_text(json.dumps(
            {"rank": rank, "status": "ok", "param_digests": ["abc"], "rank_clock": clock}))

    record = {"config": {"backend": {"name": "torch_ddp"}}, "metrics": {"samples_per_s": 1.0}}
    report(0, 100)
    assert not sinks.gather_ranks(record, timeout=0.1)  # rank 1 never reported: named, the rest kept
    assert "rank(s) [1] sent no report" in capsys.readouterr().err and [r["rank"] for r in record["ranks"]] == [0]
    report(1, 130)
    record = {"config": {"backend": {"name": "torch_ddp"}}, "metrics": {"samples_per_s": 1.0}}
    assert sinks.gather_ranks(record, timeout=5)
    assert [r["rank"] for r in record["ranks"]] == [0, 1] and record["metrics"]["ranks_in_sync"] is True
    assert record["metrics"]["rank_clock"]["waiting_per_rank_s"] == pytest.approx([30e-9, 0.0])
    assert all("rank_clock" not in r for r in record["ranks"])


@pytest.mark.multiprocess
def test_a_new_launcher_runs_a_two_worker_cell_locally(new_launcher, tmp_path):
    pytest.importorskip("torch")
    from scaling.launch.local import launch

    cfg = compose("backend=torch_ddp", "devices=2", f"backend.runs_on.launcher={new_launcher.name}",
                  f"results_dir={tmp_path}", "run_name=two", *QUICK)
    record = launch(cfg)
    assert record["status"] == "ok", record["error"]
    assert [r["rank"] for r in record["ranks"]] == [0, 1] and record["environment"]["world_size"] == 2
    assert record["metrics"]["ranks_in_sync"] is True
    assert record["config"]["backend"]["runs_on"]["launcher"] == new_launcher.name


def test_no_module_but_the_table_names_a_launcher():
    """A launcher's name as a string appears only in launch/launchers.py (docstrings aside): the
    launch layer, the renderer, the resolvers and the sweep all ask the table."""
    names = set(launchers.LAUNCHERS)
    found = []
    for path in sorted([*(ROOT / "scaling").rglob("*.py"), *(ROOT / "launch").rglob("*.py")]):
        if path == ROOT / "launch" / "launchers.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "launcher names outside the table:\n" + "\n".join(found)


def test_torch_and_horovod_ranks_get_what_torchrun_and_horovodrun_would_give_them(monkeypatch):
    """Locally the launcher starts torch ranks itself with torchrun --standalone's variables and
    Horovod ranks through Horovod's own rendezvous (launch/horovod_gloo.py);
    SCALING_FRAMEWORK_LAUNCHERS=1 runs the programs instead."""
    worker = ["-m", "scaling.worker", "--config", "c.json"]
    monkeypatch.delenv(launchers.FRAMEWORK_PROGRAMS, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    ranks = launchers.torchrun(2, worker)
    assert [argv for argv, _ in ranks] == [[sys.executable, *worker]] * 2
    envs = [env for _, env in ranks]
    assert [e["RANK"] for e in envs] == ["0", "1"] and [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {e["LOCAL_WORLD_SIZE"] for e in envs} == {"2"}
    assert len({e["MASTER_PORT"] for e in envs}) == 1 and {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}
    assert {e["OMP_NUM_THREADS"] for e in envs} == {"1"}  # as torchrun sets it for several ranks
    assert "OMP_NUM_THREADS" not in launchers.torchrun(1, worker)[0][1]
    [(argv, env)] = launchers.horovodrun(2, worker)
    assert argv[:5] == [sys.executable, "-m", "scaling.launch.horovod_gloo", "-np", "2"] and env == {}
    from scaling.launch import horovod_gloo

    slot = type("Slot", (), dict(hostname="localhost", rank=1, size=2, local_rank=1, local_size=2,
                                 cross_rank=0, cross_size=1))()
    pytest.importorskip("horovod")
    env = horovod_gloo.rank_env(slot, 4242)
    assert env["HOROVOD_RANK"] == "1" and env["HOROVOD_SIZE"] == "2" and env["HOROVOD_GLOO_RENDEZVOUS_PORT"] == "4242"
    assert env["HOROVOD_CONTROLLER"] == env["HOROVOD_CPU_OPERATIONS"] == "gloo"
    monkeypatch.setenv(launchers.FRAMEWORK_PROGRAMS, "1")
    [(argv, _)] = launchers.torchrun(2, worker)
    assert argv[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in argv
    [(argv, _)] = launchers.horovodrun(2, worker)
    assert "--gloo" in argv and argv[argv.index("-np") + 1] == "2"
