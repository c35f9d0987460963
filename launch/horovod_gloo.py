"""Horovod's gloo ranks on this machine, started the way ``horovodrun --gloo -np N -H localhost:N``
starts them.

``horovodrun`` on one host does three things: it checks that Horovod was built with Gloo, starts
Horovod's rendezvous server (``RendezvousServer``, with the slot plan of ``get_host_assignments``)
and starts every rank with its slot's variables (``create_slot_env_vars``) and the rendezvous
address. Its check imports every framework extension in a subprocess, TensorFlow first: about
3 s before any rank starts, in every cell. This module does the other two with Horovod's own
pieces, as the Slurm path does (``scaling.launch.horovod_slurm``), so each rank sees the variables
horovodrun would give it (``HOROVOD_GLOO_IFACE`` is loopback: every rank is on this host). The
study's Horovod build is checked once, by ``.ci/horovod.sh``, not per cell.

``python -m scaling.launch.horovod_gloo -np N -- python -m scaling.worker --config CFG``: when a
rank fails the others are stopped (as horovodrun does); SIGTERM/SIGINT stop every rank; the exit
code is the first failing rank's, else 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from scaling.launch import warm
from scaling.launch.horovod_slurm import host_plan


def rank_env(slot, port: int) -> dict[str, str]:
    """One rank's variables, as horovodrun's gloo launch sets them on a single host."""
    from horovod.runner.gloo_run import create_slot_env_vars

    return {**create_slot_env_vars(slot), "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1",
            "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port), "HOROVOD_CONTROLLER": "gloo",
            "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": "lo", "PYTHONUNBUFFERED": "1"}


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _start(server: "warm.Client | None", command: list[str], env: dict[str, str]):
    """One rank: forked warm by the server when there is one and it can, else a fresh process."""
    parsed = warm.module_argv(command)
    if server is not None and parsed is not None and parsed[0] == warm.WORKER:
        try:
            sys.stdout.flush()
            return server.start(parsed[0], parsed[1], env, output=sys.stdout.fileno())
        except OSError:
            pass
    return subprocess.Popen(command, env=env)


def run(np_: int, command: list[str]) -> int:
    from horovod.runner.http.http_server import RendezvousServer

    plan = host_plan(["localhost"], np_)
    server = RendezvousServer()
    port = server.start()
    server.init(plan)
    procs: list[subprocess.Popen] = []

    def stop_on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_signal)
    server = warm.connect()  # the study's launcher may hold the ranks' framework imported already
    try:
        for slot in plan:
            env = {**os.environ, **rank_env(slot, port)}
            env.pop(warm.SOCKET, None)
            procs.append(_start(server, command, env))
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(procs)
                return failed[0] if failed[0] > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.02)
    except KeyboardInterrupt:
        _stop(procs)
        return 130


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scaling.launch.horovod_gloo",
                                 description="start N Horovod gloo ranks on this host, as horovodrun --gloo does")
    ap.add_argument("-np", type=int, required=True, help="number of ranks")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then each rank's command")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.np < 1 or not command:
        ap.error("need -np >= 1 and a command after --")
    code = run(args.np, command)
    # every rank is gone: leave without stopping the rendezvous server's HTTP thread (its shutdown
    # polls for half a second), as the ranks leave without their teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
