"""Warm starts (launch/warm.py): a worker forked from a server that imported its framework is the
process a cold start would give (its own environment, directory, session and output, its exit
code), a server serves only workers whose import-time environment it was started under, and
nothing outlives the launcher. The servers here import ``colorsys`` instead of a framework; the
distributed tests run every backend's workers warm."""
import json
import os
import signal
import sys
import textwrap
import time

import pytest

from scaling.launch import warm

pytestmark = pytest.mark.multiprocess

PROBE = textwrap.dedent('''
    import json, os, sys, threading
    if sys.argv[1:2] == ["sleep"]:
        print("sleeping", flush=True)
        import time
        time.sleep(120)
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ),
                      "session": os.getsid(0) == os.getpid(), "threads": threading.active_count(),
                      "main_tid": threading.main_thread().native_id == threading.get_native_id(),
                      "preloaded": "colorsys" in sys.modules, "name": __name__}))
    print("to stderr", file=sys.stderr)
    atexit_note = os.environ.get("PROBE_NOTE")
    if atexit_note:
        import atexit
        atexit.register(lambda: print(atexit_note, flush=True))
    sys.exit(int(os.environ.get("PROBE_CODE", "0")))
''')


@pytest.fixture
def server(tmp_path, monkeypatch):
    (tmp_path / "probe_mod.py").write_text(PROBE)
    monkeypatch.setitem(warm.PRELOAD, "probe", ("colorsys",))
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path[1:]]),
           "PYTHONUNBUFFERED": "1"}
    yield warm.server_for("probe", env), env
    warm.stop_all()


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie of another parent still answers kill(0): read its state
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(")")[-1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_a_forked_worker_is_the_process_a_cold_start_gives(server, tmp_path):
    srv, env = server
    assert srv is not None and srv.client.import_s is not None
    work = tmp_path / "work"
    work.mkdir()
    proc = srv.client.start("probe_mod", ["--config", "c.json"], {**env, "ONLY_HERE": "1", "PROBE_CODE": "3",
                                                                  "PROBE_NOTE": "atexit ran"}, cwd=str(work))
    out = proc.stdout.read().splitlines()
    assert proc.wait(timeout=30) == 3 and proc.returncode == 3
    seen = json.loads(out[0])
    assert seen["argv"] == ["--config", "c.json"] and seen["cwd"] == str(work) and seen["name"] == "__main__"
    assert seen["env"]["ONLY_HERE"] == "1" and "SCALING_WARM_STARTED" in seen["env"]
    assert set(seen["env"]) == set(env) | {"ONLY_HERE", "PROBE_CODE", "PROBE_NOTE", warm.STARTED}
    assert seen["session"] and seen["threads"] == 1 and seen["preloaded"]
    assert seen["main_tid"]  # the main thread's id is the child's own (placement pins the thread by it)
    assert "to stderr" in out and "atexit ran" in out  # stderr on the same pipe; the exit steps ran
    assert json.loads(seen["env"][warm.STARTED])["modules"] == ["colorsys"]


def test_a_warm_worker_is_stopped_like_a_cold_one_and_dies_with_its_server(server):
    srv, env = server
    proc = srv.client.start("probe_mod", ["sleep"], env)
    assert proc.stdout.readline().strip() == "sleeping" and proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)  # its own process group, as Popen(start_new_session=True)
    assert proc.wait(timeout=10) == -signal.SIGTERM
    other = srv.client.start("probe_mod", ["sleep"], env)
    assert other.stdout.readline().strip() == "sleeping"
    warm.stop_all()  # the launcher leaves: its server goes, and the server's workers with it
    assert _wait_gone(other.pid), "a worker outlived its server"
    assert _wait_gone(srv.proc.pid)


def test_one_server_per_framework_and_import_time_environment(server, monkeypatch):
    srv, env = server
    assert warm.server_for("probe", {**env, "RANK": "1", "MASTER_PORT": "1234", "TF_CONFIG": "{}"}) is srv
    # the launcher's W&B service sets its variables after the first cell started: still one server
    assert warm.server_for("probe", {**env, "WANDB_SERVICE": "3-1-unix-/tmp/s", "WANDB_DIR": "/tmp/r"}) is srv
    threads = warm.server_for("probe", {**env, "OMP_NUM_THREADS": "1"})
    assert threads is not None and threads is not srv  # read at import (OpenMP, OpenBLAS): another server
    assert warm.server_for("no such framework", env) is None
    monkeypatch.setenv(warm.ENABLE, "0")
    assert warm.server_for("probe", env) is None
    assert warm.start("probe", [sys.executable, "-m", warm.WORKER, "--config", "c.json"], env) is None


def test_a_server_that_cannot_import_leaves_its_workers_cold(monkeypatch, capsys):
    monkeypatch.setitem(warm.PRELOAD, "broken", ("no_such_module_anywhere",))
    try:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(sys.path[1:])}
        assert warm.start("broken", [sys.executable, "-m", warm.WORKER, "--config", "c.json"], env) is None
        assert "warm start unavailable for broken" in capsys.readouterr().err
        # only the worker module is forked; anything else starts the usual way
        assert warm.start("probe", [sys.executable, "-m", "http.server"], env) is None
    finally:
        warm.stop_all()
        warm._FAILED.clear()


def test_a_killed_server_takes_its_workers_and_the_next_request_gets_a_new_one(server):
    srv, env = server
    proc = srv.client.start("probe_mod", ["sleep"], env)
    assert proc.stdout.readline().strip() == "sleeping"
    os.kill(srv.proc.pid, signal.SIGKILL)
    assert _wait_gone(proc.pid), "a worker outlived its killed server"
    assert proc.wait(timeout=10) == -signal.SIGKILL  # what the launcher then reports: a dead rank
    again = warm.server_for("probe", env)
    assert again is not None and again is not srv and again.proc.poll() is None
    fresh = again.client.start("probe_mod", [], env)
    assert fresh.wait(timeout=30) == 0


def test_only_cpu_workers_start_warm(monkeypatch):
    """A process forked after its parent touched the CUDA driver cannot use CUDA: GPU runs start cold."""
    assert warm.suits({"device": "cpu"}) and not warm.suits({"device": "cuda"})
    monkeypatch.setattr(warm.os.path, "exists", lambda path: path == "/dev/nvidiactl")
    assert not warm.suits({"device": "auto"})
    monkeypatch.setattr(warm.os.path, "exists", lambda path: False)
    assert warm.suits({"device": "auto"})
