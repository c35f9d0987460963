"""Warm starts: each worker forked from a process that has already imported its framework.

Every cell runs in fresh worker processes, and most of a fresh worker's start is importing its
framework: ``import torch`` and the ``torch._dynamo`` that every ``torch.optim`` step imports took
about 2 s here, ``import tensorflow`` about 2.7 s, in every rank of every cell. A warm-start server
(``python -m scaling.launch.warm``) imports the framework once and then forks one child per worker
the launcher asks for; the child becomes the worker process a cold start would have given:

- its own session and process group (``killpg`` stops it as it stops a cold worker), SIGKILLed when
  the server dies (which dies with the launcher), stdin from ``/dev/null``, stdout and stderr into
  the pipe the launcher passed with the request;
- exactly the environment the launcher gives it, its working directory, and ``sys.argv`` of
  ``python -m MODULE ARGS``, which it runs as ``__main__``; on the way out it runs the
  interpreter's own exit steps (non-daemon threads, ``atexit``) and exits with the module's code;
- nothing else runs in the server, so the child starts with one thread (what the imports left:
  e.g. OpenBLAS's pool, which forks cleanly) and the modules a cold worker would import anyway.

The launcher keeps one server per framework and per environment in force at import time (the
variables that differ between runs and ranks, :data:`PER_RUN`, are read only when a framework
sets up its process group, never at import), so a server never hands a worker an import made
under other thread settings. Servers live as long as the launcher's process (a sweep), at most
:data:`MAX_SERVERS` at once. A worker that could not be started warm starts cold; so does every
worker with ``SCALING_WARM_START=0``, and every GPU worker (:func:`suits`). The record says which (``metrics.conditions.start``); the
seconds the server spent importing are added to the run's ``startup_s``, which thus stays what a
fresh process would take.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from scaling.geometry import on_gpu
from scaling.process import die_with_parent

#: set to 0: start every worker cold (a fresh interpreter that imports its framework itself)
ENABLE = "SCALING_WARM_START"
#: set in a warm-started worker: what its server imported and how long that took
STARTED = "SCALING_WARM_STARTED"
#: in a framework launcher's environment: the socket of the server its workers may be forked from
SOCKET = "SCALING_WARM_SOCKET"
#: the module every worker runs
WORKER = "scaling.worker"
#: framework launchers that start workers themselves and can ask a server for them
LAUNCHERS = ("scaling.launch.horovod_gloo",)
#: variables that differ between the runs and ranks one server serves; no framework reads them
#: when it is imported (only when it sets up its process group or strategy)
PER_RUN = ("SCALING_RUN_DIR", "SCALING_LAUNCH_TIME", "SCALING_TRACKER_GATE", "RANK", "WORLD_SIZE",
           "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR",
           "MASTER_PORT", "TF_CONFIG", STARTED, SOCKET)
#: so are W&B's variables, which the launcher's W&B service sets once it starts (only W&B reads
#: them, and no framework imports W&B)
PER_RUN_PREFIXES = ("WANDB_",)
#: servers held at once (each holds its framework's imports: a few hundred MB)
MAX_SERVERS = 4
#: how long a server may take to import its framework before its workers start cold
READY_TIMEOUT_S = 120.0
#: what a server imports, per framework (``runs_on.framework`` of the backend YAML): torch with the
#: ``torch._dynamo`` that torch.optim's step imports; TensorFlow
PRELOAD = {"torch": ("torch", "torch._dynamo"), "tf": ("tensorflow",)}


def enabled() -> bool:
    return os.environ.get(ENABLE, "1") not in ("0", "")


def suits(cfg: dict) -> bool:
    """Whether a run's workers may start warm: CPU workers only. A framework may touch the CUDA
    driver while it is imported or first asked about devices (``torch.cuda.is_available()``), and
    a process forked after that cannot use CUDA; GPU workers start cold."""
    return not on_gpu(cfg)


def module_argv(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, arguments) of ``python -m MODULE ARGS`` run by this interpreter; None otherwise."""
    if len(argv) >= 3 and argv[0] == sys.executable and argv[1] == "-m":
        return argv[2], list(argv[3:])
    return None


# -- the server ----------------------------------------------------------------------------------

def _run_module(module: str, args: list[str]) -> int:
    """Run ``module`` as ``__main__`` the way ``python -m`` does, then the interpreter's exit steps;
    the exit code."""
    import runpy
    import traceback

    sys.argv = [module, *args]
    code: int = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    try:  # what the interpreter does on the way out: wait for non-daemon threads, run atexit
        threading._shutdown()  # type: ignore[attr-defined]
    except Exception:
        pass
    try:
        atexit._run_exitfuncs()
    except Exception:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def _child(request: dict, out_fd: int, close: list[int], started: str) -> None:
    """In the forked child: become the worker the request describes; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in close:
            try:
                os.close(fd)
            except OSError:
                pass
        os.setsid()
        main = threading.main_thread()
        if getattr(main, "native_id", None) != threading.get_native_id() and hasattr(main, "_set_native_id"):
            main._set_native_id()  # Python 3.11 keeps the server's thread id after fork (placement pins by it)
        die_with_parent()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        for fd in (null, out_fd):
            if fd > 2:
                os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[STARTED] = started
        os.chdir(request["cwd"])
        code = _run_module(request["module"], request["args"])
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def serve(path: str, modules: list[str]) -> int:
    """Import ``modules``, say so on stdout (one JSON line), then fork a worker per request that
    comes in on the socket ``path`` until stdin closes (the launcher is done or gone)."""
    die_with_parent()
    began = time.monotonic()
    error = None
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # an import that fails here fails cold too: the launcher starts cold
            error = f"import {name}: {type(exc).__name__}: {exc}"
            break
    import_s = time.monotonic() - began
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(16)
    sys.stdout.write(json.dumps({"ready": error is None, "error": error, "import_s": import_s}) + "\n")
    sys.stdout.flush()
    if error:
        return 1
    started = json.dumps({"modules": modules, "import_s": round(import_s, 4)})
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    owners: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    conns: list[socket.socket] = []
    stdin = sys.stdin.fileno()
    while True:
        try:
            readable = select.select([listener, wake_r, stdin, *conns], [], [])[0]
        except InterruptedError:
            continue
        if stdin in readable and not os.read(stdin, 4096):
            return 0  # children still running follow the server (PR_SET_PDEATHSIG)
        if wake_r in readable:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        while owners:  # reap every child that ended and tell whoever asked for it
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = owners.pop(pid, None)
            if conn is not None:
                try:
                    conn.send(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
                except OSError:
                    pass
        if listener in readable:
            conn, _ = listener.accept()
            conns.append(conn)
        for conn in [c for c in conns if c in readable]:
            try:
                message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 1)
            except OSError:
                message, fds = b"", []
            if not message:
                conns.remove(conn)
                conn.close()
                for fd in fds:
                    os.close(fd)
                continue
            request = json.loads(message)
            if not fds:
                conn.send(json.dumps({"error": "no output descriptor"}).encode())
                continue
            pid = os.fork()
            if pid == 0:
                _child(request, fds[0], [listener.fileno(), wake_r, wake_w, *(c.fileno() for c in conns)], started)
            os.close(fds[0])
            owners[pid] = conn
            conn.send(json.dumps({"pid": pid}).encode())


# -- the launcher's side -------------------------------------------------------------------------

class WarmProcess:
    """A worker forked by a server, with the part of ``subprocess.Popen`` the launchers use:
    ``pid``, ``stdout`` (text), ``poll``, ``wait``, ``returncode``, ``terminate``, ``kill``."""

    def __init__(self, client: "Client", pid: int, stdout) -> None:
        self.client, self.pid, self.stdout = client, pid, stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.client.exit_code(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            self.client.exit_code(self.pid, timeout=0.05 if left is None else min(left, 0.05))
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Client:
    """One connection to a server: asks it for workers, learns how they exit."""

    def __init__(self, path: str, import_s: float | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.import_s = import_s
        self.exits: dict[int, int] = {}
        self.lock = threading.Lock()
        self.closed = False

    def _take(self, message: dict) -> dict | None:
        if "exit" in message:
            self.exits[int(message["exit"])] = int(message["code"])
            return None
        return message

    def _receive(self, timeout: float | None) -> dict | None:
        """The next message (None when none came within ``timeout``); exit notes are kept."""
        if select.select([self.sock], [], [], timeout)[0]:
            data = self.sock.recv(1 << 16)
            if not data:
                self.closed = True
                return None
            return json.loads(data)
        return None

    def start(self, module: str, args: list[str], env: dict[str, str], cwd: str | None = None,
              output: int | None = None) -> WarmProcess:
        """Fork ``python -m module args`` with exactly ``env``; its output (stdout and stderr) goes to
        the descriptor ``output``, or comes back on a pipe (``WarmProcess.stdout``)."""
        if output is None:
            r, w = os.pipe()
        else:
            r, w = -1, os.dup(output)
        try:
            with self.lock:
                request = {"module": module, "args": args, "env": env, "cwd": cwd or os.getcwd()}
                socket.send_fds(self.sock, [json.dumps(request).encode()], [w])
                os.close(w)
                w = -1
                deadline = time.monotonic() + 30
                message = None
                while message is None:  # the answer, past the exit notes of earlier workers
                    left = deadline - time.monotonic()
                    if self.closed or left <= 0:
                        raise OSError("the warm-start server did not answer")
                    message = self._receive(left)
                    if message is not None:
                        message = self._take(message)
            if "pid" not in message:
                raise OSError(f"the warm-start server could not start the worker: {message.get('error')}")
            return WarmProcess(self, int(message["pid"]), open(r, "r", errors="replace") if r >= 0 else None)
        except BaseException:
            for fd in (w, r):
                if fd >= 0:
                    os.close(fd)
            raise

    def exit_code(self, pid: int, timeout: float) -> int | None:
        """``pid``'s exit code once its server has reaped it; waits up to ``timeout`` for news."""
        with self.lock:
            if pid not in self.exits and not self.closed:
                message = self._receive(timeout)
                while message is not None:
                    self._take(message)
                    message = self._receive(0)
            if pid in self.exits:
                return self.exits[pid]
        if self.closed:  # the server is gone, and with it (PR_SET_PDEATHSIG) the worker
            return self.exits.get(pid, -signal.SIGKILL)
        return None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Server:
    """A running warm-start server and this process's connection to it."""

    def __init__(self, modules: tuple[str, ...], env: dict[str, str]) -> None:
        self.modules = modules
        self.folder = tempfile.mkdtemp(prefix="scaling-warm-")
        self.path = os.path.join(self.folder, "server.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "scaling.launch.warm", "--socket", self.path,
                                      "--preload", ",".join(modules)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=die_with_parent)
        self.client: Client | None = None
        self.error: str | None = None
        line = _read_line(self.proc.stdout, READY_TIMEOUT_S)
        try:
            ready = json.loads(line) if line else {"ready": False, "error": "no answer"}
        except ValueError:
            ready = {"ready": False, "error": f"unreadable answer {line!r}"}
        if ready.get("ready"):
            self.client = Client(self.path, ready.get("import_s"))
        else:
            self.error = ready.get("error") or "not ready"
            self.stop()

    def stop(self) -> None:
        if self.client:
            self.client.close()
        try:
            self.proc.stdin.close()  # the server's signal to leave
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        try:
            os.rmdir(self.folder)
        except OSError:
            pass


def _read_line(stream, timeout: float) -> str:
    if select.select([stream], [], [], timeout)[0]:
        return stream.readline().decode(errors="replace").strip()
    return ""


#: this process's servers, by (modules, environment at import), the most recently used last
_SERVERS: "collections.OrderedDict[tuple, Server]" = collections.OrderedDict()
#: keys whose server could not start (their workers start cold, without a new try)
_FAILED: dict[tuple, str] = {}
_LOCK = threading.Lock()


def import_env(env: dict[str, str]) -> dict[str, str]:
    """The part of a worker's environment a framework's import may read."""
    return {k: v for k, v in env.items() if k not in PER_RUN and not k.startswith(PER_RUN_PREFIXES)}


def server_for(framework: str | None, env: dict[str, str]) -> Server | None:
    """This process's server for ``framework`` under the import-time part of ``env``, started if
    needed; None when there is none to be had (no preload for that framework, warm starts off,
    or its server could not start)."""
    modules = PRELOAD.get(framework or "")
    if not modules or not enabled():
        return None
    base = import_env(env)
    key = (modules, tuple(sorted(base.items())))
    with _LOCK:
        if key in _FAILED:
            return None
        server = _SERVERS.get(key)
        if server is not None and server.proc.poll() is None and not server.client.closed:
            _SERVERS.move_to_end(key)
            return server
        if server is not None:
            _SERVERS.pop(key).stop()
        while len(_SERVERS) >= MAX_SERVERS:
            _SERVERS.popitem(last=False)[1].stop()
        server = Server(modules, base)
        if server.client is None:
            _FAILED[key] = server.error or "not ready"
            print(f"scaling: warm start unavailable for {framework} ({_FAILED[key]}); workers start cold",
                  file=sys.stderr, flush=True)
            return None
        _SERVERS[key] = server
        return server


def stop_all() -> None:
    """Stop every server this process holds."""
    with _LOCK:
        while _SERVERS:
            _SERVERS.popitem(last=False)[1].stop()


atexit.register(stop_all)


def start(framework: str | None, argv: list[str], env: dict[str, str]):
    """A worker (``python -m scaling.worker ...``) with ``env`` as a warm process
    (``WarmProcess``), or None: start it cold."""
    parsed = module_argv(argv)
    if parsed is None or parsed[0] != WORKER:
        return None
    server = server_for(framework, env)
    if server is None:
        return None
    try:
        return server.client.start(parsed[0], parsed[1], env)
    except OSError as exc:
        print(f"scaling: warm start failed ({exc}); the worker starts cold", file=sys.stderr, flush=True)
        return None


def launcher_env(framework: str | None, argv: list[str], env: dict[str, str]) -> dict[str, str]:
    """``env`` for a framework launcher that starts workers itself (:data:`LAUNCHERS`), with the
    socket of the server it may ask for them (:func:`connect`)."""
    parsed = module_argv(argv)
    if parsed is None or parsed[0] not in LAUNCHERS:
        return env
    server = server_for(framework, env)
    return {**env, SOCKET: server.path} if server is not None else env


def connect() -> Client | None:
    """In a framework launcher: a connection to the server the study's launcher gave it, or None
    (its workers then start cold)."""
    path = os.environ.get(SOCKET)
    if not path or not enabled():
        return None
    try:
        return Client(path)
    except OSError:
        return None


def started() -> dict:
    """How this worker process started: ``{"mode": "warm", "modules": [...], "import_s": s}`` or
    ``{"mode": "cold"}``."""
    raw = os.environ.get(STARTED)
    if not raw:
        return {"mode": "cold"}
    try:
        return {"mode": "warm", **json.loads(raw)}
    except ValueError:
        return {"mode": "warm"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scaling.launch.warm",
                                 description="import a framework once, then fork workers that ask for it")
    ap.add_argument("--socket", required=True, help="the Unix socket to listen on")
    ap.add_argument("--preload", default="", help="comma-separated modules to import first")
    args = ap.parse_args(argv)
    return serve(args.socket, [m for m in args.preload.split(",") if m])


if __name__ == "__main__":
    sys.exit(main())
