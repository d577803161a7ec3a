"""Warm workers: a preloaded parent per environment forks one child per job.

A cold worker (``python -m equibench.engine.worker JOB OUT``) spends seconds importing torch,
torch_geometric and equibench before its first point. A *warm parent* pays that once:
``python -P -m equibench.engine.warm FD`` (started by the runner, like a cold worker, with the
environment's interpreter and ``launch.worker_environ()``) imports torch, torch_geometric,
equibench, every bench module and the built-in method and task registries, then waits for
requests on the socket ``FD``. For each job it ``os.fork()``s a child that runs exactly what a
cold worker runs (``worker.run_job`` on the same job file and folder, its output appended to the
job's log), and reports the child's pid; the runner watches that pid's process tree (memory,
marker, timeout: ``launch.watch``) and kills it, never the parent, when a limit is crossed.

Line protocol (UTF-8, one message a line, parent <-> runner):

* parent: ``ready <pid> <os threads> <their ids, comma-separated>`` once preloaded;
* runner: ``run <json {"job", "out", "log", "cwd"}>``; parent: ``started <child pid>``, later
  ``ended <child pid> <exit status as Popen gives it> <child's ru_maxrss in bytes>``;
* runner: ``kill`` (SIGKILL the running child's process group; the parent reaps it) and
  ``threads`` (parent: ``threads <n> <ids>``, its OS threads now: no new one, whatever the children
  do; threads the imports started may have ended since ``ready``);
* runner: ``exit``, or the socket closing: the parent kills its child and exits.

Fork safety. The parent never runs a torch operation: importing builds small tensors at most,
below ATen's parallel grain, so OpenMP's thread pool (which a forked child could not use) is
never started; the OS threads the parent has are those the imports start (OpenBLAS, jemalloc),
whose libraries re-create them after ``fork``. CUDA is never initialised in the parent. The child
starts like a fresh interpreter: its own session (``setsid``: the runner's kill of its process
group spares the parent), ``PR_SET_PDEATHSIG`` towards the parent (which has it towards the
runner: a killed runner leaves no orphan), the runner's working directory, torch's default
generator reset to its initial seed, NumPy's global generator re-seeded from the OS, and
``torch.set_num_threads`` set to the default the parent computed (``OMP_NUM_THREADS`` or the
cores). It ends with ``os._exit`` (results are fsync'd), as a cold worker does.

Failures. A crash, out-of-memory kill or timeout of a child is the child's: the parent reaps it
and serves the next job. A parent that dies (or whose socket breaks) is replaced by a fresh one
for the next job; the job it was running ends like a killed cold worker (its point becomes a
``failed`` row naming the parent's death). A parent that cannot start (its imports fail) is not
retried in that process: that environment's jobs run cold, so the failure shows in their logs
exactly as before.

Where: ``LocalExecutor`` uses warm parents on Linux (``pidfd``, ``PR_SET_PDEATHSIG``, ``fork``);
``EQUIBENCH_WORKER=cold`` (or ``LocalExecutor(warm=False)``) runs every job cold; other
platforms and the submitit executor always run cold. Parents live for the runner's process, one
per interpreter (the main environment and each isolated one), and are replaced when the
environment variables the runner would give a worker change (they were read at import).
"""
from __future__ import annotations

import atexit
import concurrent.futures
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from ..core.envinfo import package_versions
from ..core.errors import UserError
from ..core.registry import _load_builtins, import_all
from .jobs import read_job
from .launch import kill_all, worker_environ
from .worker import die_with_parent, run_job

#: seconds a parent may take to import everything before the runner gives up on it (runs cold)
READY_TIMEOUT_S = 300.0
#: seconds the runner waits for the parent to answer a request (fork, reap)
ANSWER_TIMEOUT_S = 60.0


def enabled() -> bool:
    """Whether warm workers may be used here (``EQUIBENCH_WORKER`` not ``cold``, Linux with fork
    and pidfd)."""
    mode = os.environ.get("EQUIBENCH_WORKER", "warm").strip().lower()
    if mode not in ("warm", "cold", ""):
        raise UserError(f"EQUIBENCH_WORKER={mode!r}: expected 'warm' or 'cold'")
    return mode != "cold" and sys.platform.startswith("linux") and hasattr(os, "fork") \
        and hasattr(os, "pidfd_open")


# ---- the parent (runs in the preloaded interpreter) -------------------------------------------

def preload() -> None:
    """Import what every job needs, without running a torch operation."""
    import torch  # noqa: F401
    import torch_geometric  # noqa: F401
    import_all("equibench.benches")
    _load_builtins()
    package_versions()  # cached: every job's result carries it (20-40 ms of metadata reads each)


def os_threads() -> int:
    """This process's OS threads (Linux; 0 where unknown)."""
    return len(os_thread_ids())


def os_thread_ids() -> list[int]:
    """The ids of this process's OS threads (Linux; empty where unknown)."""
    try:
        return sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:
        return []


def _threads_message(word: str) -> str:
    ids = os_thread_ids()
    return f"{word} {len(ids)} {','.join(map(str, ids)) or '-'}"


def _parse_ids(field: str) -> frozenset[int]:
    return frozenset(int(t) for t in field.split(",") if t not in ("", "-"))


class Lines:
    """Line-buffered messages over a connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf, self.closed = sock, b"", False

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def fileno(self) -> int:
        return self.sock.fileno()

    def pending(self) -> bool:
        return b"\n" in self.buf

    def read(self, timeout: float | None) -> str | None:
        """The next line; None when none came within ``timeout`` or the peer closed (``closed``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            if self.closed:
                return None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.sock], [], [], left)[0]:
                return None
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def _child(request: dict[str, Any], conn: Lines, parent: int, threads: int) -> None:
    """The forked child: set up like a fresh worker process, run the job, ``os._exit``."""
    status = 1
    try:
        conn.sock.close()
        os.setsid()
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.chdir(request["cwd"])
        import numpy as np
        import torch
        torch.manual_seed(torch.initial_seed())  # the generator as a fresh interpreter has it
        np.random.seed()
        torch.set_num_threads(threads)
        status = run_job(read_job(request["job"]), request["out"])
    except SystemExit as err:  # what the interpreter prints and returns for it
        if isinstance(err.code, int) or err.code is None:
            status = err.code or 0
        else:
            print(err.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def _serve_one(conn: Lines, request: dict[str, Any], threads: int) -> bool:
    """Fork a child for ``request``, answer until it is reaped; False when the runner is gone."""
    pid = os.fork()
    if pid == 0:
        _child(request, conn, os.getppid(), threads)
    conn.send(f"started {pid}")
    pidfd = os.pidfd_open(pid)
    alive = True
    try:
        while True:
            if not (alive and conn.pending()):
                ready = select.select([pidfd] + ([conn] if alive else []), [], [])[0]
                if pidfd in ready:
                    break
            line = conn.read(0)
            if line is None and conn.closed:  # the runner is gone: end the child
                alive = False
                _kill(pid)
            elif line == "kill":
                _kill(pid)
            elif line == "threads":
                conn.send(_threads_message("threads"))
    finally:
        os.close(pidfd)
    try:  # leftovers of the child's session (compilers, loaders) go with it, as for a cold worker
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if alive:
        conn.send(f"ended {pid} {code} {int(usage.ru_maxrss) * 1024}")
    return alive


def _kill(pid: int) -> None:
    """SIGKILL the unreaped child ``pid`` and its process group (also before its ``setsid``)."""
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            kill(target, signal.SIGKILL)
        except OSError:
            pass


def serve(fd: int) -> int:
    """The parent's loop on socket ``fd``."""
    die_with_parent()
    conn = Lines(socket.socket(fileno=fd))
    preload()
    import torch
    threads = torch.get_num_threads()  # the default a fresh interpreter would use; no parallel op
    conn.send(_threads_message(f"ready {os.getpid()}"))
    while True:
        line = conn.read(None)
        if line is None or line == "exit":
            return 0
        cmd, _, arg = line.partition(" ")
        if cmd == "run":
            if not _serve_one(conn, json.loads(arg), threads):
                return 0
        elif cmd == "threads":
            conn.send(_threads_message("threads"))
        # anything else ("kill" after its child already ended) is stale: ignored


# ---- the runner's side ----------------------------------------------------------------------

class ParentGone(Exception):
    """The warm parent died or stopped answering."""


class WarmParent:
    """The runner's handle on one preloaded parent (one interpreter, one set of variables)."""

    def __init__(self, python: str, log: Path, env: dict[str, str]) -> None:
        self.python, self.log, self.env_key = python, log, _env_key(env)
        ours, theirs = socket.socketpair()
        cmd = [python, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "equibench.engine.warm",
               str(theirs.fileno())]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as log_f:
            # started from one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that
            # started a process ends, and a run in a short-lived thread must not take its parent along
            self.proc = _spawner().submit(subprocess.Popen, cmd, stdin=subprocess.DEVNULL, stdout=log_f,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                          pass_fds=(theirs.fileno(),)).result()
        theirs.close()
        self.conn = Lines(ours)
        line = self.conn.read(READY_TIMEOUT_S)
        if not line or not line.startswith("ready "):
            self.close()
            raise ParentGone(f"warm worker parent did not start (log: {log})")
        _, pid, threads, ids = line.split()
        self.pid, self.threads = int(pid), int(threads)
        #: the ids of the parent's OS threads when it was ready (what the imports started)
        self.thread_ids = _parse_ids(ids)
        #: a job's child is running (set by ``start``, cleared when its end is known)
        self.busy = False

    def alive(self) -> bool:
        return self.proc.poll() is None and not self.conn.closed

    def ask_threads(self) -> int:
        """The parent's OS thread count now."""
        return len(self.ask_thread_ids())

    def ask_thread_ids(self) -> frozenset[int]:
        """The ids of the parent's OS threads now: a subset of ``thread_ids`` unless something in
        the parent started a thread (an OpenMP pool, which a forked child would lack)."""
        self.conn.send("threads")
        line = self.conn.read(ANSWER_TIMEOUT_S)
        if not line or not line.startswith("threads "):
            raise ParentGone("warm worker parent did not answer")
        return _parse_ids(line.split()[2])

    def start(self, job_file: str | os.PathLike, out_dir: str | os.PathLike, log: str | os.PathLike) -> ForkedChild:
        """Fork a child for the job; ``ParentGone`` when the parent cannot."""
        request = {"job": str(job_file), "out": str(out_dir), "log": str(log), "cwd": os.getcwd()}
        try:
            self.conn.send("run " + json.dumps(request))
        except OSError as err:
            raise ParentGone(f"warm worker parent unreachable: {err}") from None
        line = self.conn.read(ANSWER_TIMEOUT_S)
        if not line or not line.startswith("started "):
            self.close()
            raise ParentGone("warm worker parent died before forking")
        return ForkedChild(self, int(line.split()[1]))

    def close(self) -> None:
        """Ask the parent to exit; kill it if it does not at once."""
        if self.proc.poll() is None:
            try:
                self.conn.send("exit")
                self.proc.wait(2)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.conn.sock.close()
        self.conn.closed = True


class ForkedChild:
    """A job's child as ``launch.watch`` sees it (``launch.Watched``)."""

    def __init__(self, parent: WarmParent, pid: int) -> None:
        self.parent, self.pid = parent, pid
        try:
            self.ps: psutil.Process | None = psutil.Process(pid)
        except psutil.Error:  # already ended (and reaped by the parent)
            self.ps = None
        self.result: tuple[int | None, int] | None = None
        self.gone = ""

    def _take(self, timeout: float) -> None:
        conn = self.parent.conn
        while self.result is None and not self.gone:
            line = conn.read(timeout)
            if line is None:
                if conn.closed or not self.parent.alive():
                    self.gone = f"warm worker parent (pid {self.parent.pid}) died while running the point"
                return
            if line.startswith(f"ended {self.pid} "):
                _, _, code, maxrss = line.split()
                self.result = (int(code), int(maxrss))

    def ended(self) -> bool:
        self._take(0)
        return self.result is not None or bool(self.gone)

    def wait(self, seconds: float) -> None:
        self._take(seconds)

    def kill(self) -> None:
        try:
            tree = [self.ps] + self.ps.children(recursive=True) if self.ps is not None else []
        except psutil.Error:
            tree = []
        if not self.gone:
            try:
                self.parent.conn.send("kill")  # the parent kills the child's group before reaping it
            except OSError:
                pass
        kill_all(tree)

    def reap(self) -> tuple[int | None, int]:
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while self.result is None and not self.gone and time.monotonic() < deadline:
            self._take(max(0.0, deadline - time.monotonic()))
        self.parent.busy = False
        if self.result is None:
            if not self.gone:
                self.gone = f"warm worker parent (pid {self.parent.pid}) did not reap the point's process"
            self.kill()
            self.parent.close()
            return None, 0
        return self.result

    def ending(self) -> str:
        return self.gone

    def process(self) -> Any:
        return self.ps


_SPAWNER: list[concurrent.futures.ThreadPoolExecutor] = []


def _spawner() -> concurrent.futures.ThreadPoolExecutor:
    if not _SPAWNER:
        _SPAWNER.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="equibench-warm"))
    return _SPAWNER[0]


def _env_key(env: dict[str, str]) -> str:
    """What a parent was started with (the runner's switch ``EQUIBENCH_WORKER`` aside)."""
    return hashlib.sha256(json.dumps(sorted((k, v) for k, v in env.items() if k != "EQUIBENCH_WORKER"))
                          .encode()).hexdigest()


_PARENTS: dict[tuple[str, int], WarmParent] = {}
_BROKEN: set[tuple[str, str]] = set()
_OWNER = [os.getpid()]
_LOCK = threading.Lock()


def parent_for(python: str, log_dir: Path, slot: int = 0) -> WarmParent | None:
    """The warm parent for ``python`` in ``slot`` (started when missing, dead or started with other
    variables), or None when this interpreter cannot have one (its imports failed): run cold.
    Slots: ``--jobs N`` runs N workers at once, each slot with a parent of its own."""
    env = worker_environ()
    key = _env_key(env)
    if (python, key) in _BROKEN:
        return None
    if _OWNER[0] != os.getpid():  # a fork of the runner: its parents talk to the original runner
        for inherited in _PARENTS.values():
            inherited.conn.sock.close()
        _PARENTS.clear()
        _SPAWNER.clear()  # its thread did not survive the fork
        _OWNER[0] = os.getpid()
    parent = _PARENTS.get((python, slot))
    if parent is not None and parent.busy:  # another thread's job: never replaced under it
        return parent
    if parent is not None and (parent.env_key != key or not parent.alive()):
        parent.close()
        parent = None
    if parent is None:
        log = log_dir / "warm" / (f"parent-{hashlib.sha256(python.encode()).hexdigest()[:8]}-{os.getpid()}"
                                  + (f"-{slot}" if slot else "") + ".log")
        try:
            parent = WarmParent(python, log, env)
        except ParentGone:
            _BROKEN.add((python, key))
            return None
        _PARENTS[(python, slot)] = parent
    return parent


def start(python: str, job_file: str | os.PathLike, out_dir: str | os.PathLike, log: str | os.PathLike,
          log_dir: Path, slot: int = 0) -> ForkedChild | None:
    """The job's child, forked by the warm parent of ``python`` in ``slot`` (started if need be),
    or None when there is none to fork it: the caller runs the job cold."""
    with _LOCK:  # runs in two threads of one runner share no parent: the second one runs cold
        parent = parent_for(python, log_dir, slot)
        if parent is None or parent.busy:
            return None
        parent.busy = True
    try:
        return parent.start(job_file, out_dir, log)
    except ParentGone:  # it died between jobs: nothing of the job ran yet
        parent.busy = False
        return None


def close_all() -> None:
    """End every warm parent of this process (also at exit)."""
    if _OWNER[0] != os.getpid():
        return
    while _PARENTS:
        _PARENTS.popitem()[1].close()


atexit.register(close_all)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m equibench.engine.warm SOCKET_FD", file=sys.stderr)
        sys.exit(2)
    code = serve(int(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
