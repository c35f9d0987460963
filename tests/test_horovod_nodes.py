"""Horovod across two emulated nodes with distinct addresses: each rank in its own network
namespace (10.77.x.1 and 10.77.x.2 over a veth pair), started as srun would start it (Slurm's
variables, a stand-in ``scontrol``), joining the batch script's rendezvous server
(``scaling.launch.horovod_slurm``). Loopback is not shared between the nodes, so a rank that binds the
wrong interface cannot be reached and the all-reduce fails."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multiprocess

RANK = """
import os, sys
from pathlib import Path
from scaling.launch import horovod_slurm as hs
addr = sys.argv[2]
iface = os.environ.get("HOROVOD_GLOO_IFACE") or hs.route_iface(addr)
os.environ.update(hs.horovod_env(Path(sys.argv[1]), addr, iface, timeout=30))
import torch
import horovod.torch as hvd
hvd.init()
total = hvd.allreduce(torch.full((4,), float(hvd.rank() + 1)), op=hvd.Sum)
print(f"RANK {hvd.rank()}/{hvd.size()} iface={iface} sum={total[0].item():g}", flush=True)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_nodes(tmp_path):
    """Two network namespaces joined by a veth pair; yields (names, addresses)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")
    tag = f"{os.getpid() % 10000}"
    names, links = [f"scal-a{tag}", f"scal-b{tag}"], [f"sva{tag}", f"svb{tag}"]
    addrs = [f"10.77.{int(tag) % 250}.1", f"10.77.{int(tag) % 250}.2"]
    try:
        for ns in names:
            _ip("netns", "add", ns)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for ns, link, addr in zip(names, links, addrs):
            _ip("link", "set", link, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", link)
            _ip("-n", ns, "link", "set", link, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"network namespaces unavailable here: {exc.stderr.decode().strip()}")
    try:
        yield names, addrs
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _run_job(tmp_path: Path, names, addrs, force_iface: str | None = None):
    pytest.importorskip("horovod.torch")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"  # `scontrol show hostnames`: the two nodes
    scontrol.write_text("#!/bin/sh\nprintf 'nodea\\nnodeb\\n'\n")
    scontrol.chmod(0o755)
    (tmp_path / "rank.py").write_text(RANK)
    port_file = tmp_path / "job.rendezvous"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "SLURM_JOB_NODELIST": "node[a-b]", "SLURM_NTASKS": "2", "HOROVOD_GLOO_TIMEOUT_SECONDS": "10",
           "PYTHONUNBUFFERED": "1"}
    if force_iface:
        env["HOROVOD_GLOO_IFACE"] = force_iface
    server = subprocess.Popen(["ip", "netns", "exec", names[0], sys.executable, "-m", "scaling.launch.horovod_slurm", "serve",
                               "--port-file", str(port_file), "--tasks-per-node", "1"], env=env, cwd=ROOT)
    try:
        ranks = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(tmp_path / "rank.py"), str(port_file),
                                   addrs[0]], env={**env, "SLURM_PROCID": str(i)}, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i, ns in enumerate(names)]
        outs = []
        for proc in ranks:
            try:
                outs.append(proc.communicate(timeout=90)[0])
            except subprocess.TimeoutExpired:
                proc.kill()
                outs.append(proc.communicate()[0] + "\n(timed out)")
        return [p.returncode for p in ranks], outs
    finally:
        server.kill()
        server.wait()


def test_ranks_on_two_nodes_bind_the_interface_the_other_node_reaches(tmp_path, two_nodes):
    names, addrs = two_nodes
    codes, outs = _run_job(tmp_path, names, addrs)
    assert codes == [0, 0], "\n".join(o[-1500:] for o in outs)
    for i, out in enumerate(outs):
        assert f"RANK {i}/2" in out and "sum=3" in out
        assert "iface=lo" not in out  # the rendezvous node binds its veth, not loopback


def test_binding_loopback_on_every_node_cannot_work(tmp_path, two_nodes):
    # what a batch script exporting the first node's route (`lo`) to every rank did
    names, addrs = two_nodes
    codes, outs = _run_job(tmp_path, names, addrs, force_iface="lo")
    assert codes != [0, 0]
