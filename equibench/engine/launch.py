"""Start one worker as a subprocess and watch it until it ends: memory, time, exit status.

``watch`` is the one watching loop, for a cold worker (``Subprocess``) and for a child forked by
a warm parent (``warm.ForkedChild``) alike (``Watched``: pid, ended, wait, kill, reap).
``run_worker`` starts a *cold* worker: ``<python> -m equibench.engine.worker JOB_FILE OUT_DIR`` with
``subprocess.Popen`` in a session of its own, stdout and stderr appended to the job's log file,
the runner's ``equibench`` first on ``PYTHONPATH`` (``-P`` keeps the working directory off
``sys.path`` on Python >= 3.11, so the worker imports the runner's source, not a checkout that
happens to be the current folder). While it runs, a few times a second:

* the resident memory (RSS) of the worker's whole process tree is summed (psutil); over
  ``limits.max_memory`` the tree is killed and the outcome says ``out_of_memory``;
* the point it is on is read from its marker file; a point running longer than
  ``limits.timeout`` kills the tree: ``timeout`` (the start-up before the first point, imports
  and plugins, may take ``STARTUP_GRACE_S`` more);
* ``on_tick`` is called (the runner stores finished points as they appear).

Waiting uses a pidfd where the kernel has one, so a worker's end is seen at once. The outcome
carries the exit code, the signal's name, the peak RSS (polled, and the kernel's ``ru_maxrss``
of the reaped worker) and the last meaningful lines of the log (progress-bar fragments dropped).
``submitit_job`` is what a submitit task (a Slurm array task) runs: ``run_worker`` on the node.
"""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from ..core.errors import UserError
from ..results.status import Status
from .jobs import MARKER, equibench_root
from .quiet import paused_of

# ---- resource limits of one point (was suite/limits.py, then suite/launch.py) ------------------------------
# Resource limits of one measurement point: memory (bytes) and wall time (seconds).
#
# ``parse_size("4G")`` reads a size as the CLI and ``run(max_memory=...)`` take it (binary units:
# ``K``/``M``/``G``/``T``, optional ``B``/``iB``, decimals allowed; a bare number is bytes); any other
# text is a one-line ``UserError``. ``default_max_memory()`` is 75 % of the machine's RAM: a point
# that grows past it is stopped before the kernel's OOM killer picks a victim (possibly the runner).

DEFAULT_FRACTION = 0.75
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """Bytes in ``text`` ("4G", "512M", "1.5GiB", "1000000"); ``UserError`` when it is not a size."""
    if isinstance(text, bool):
        raise UserError(f"invalid memory size {text!r} (expected e.g. 4G, 512M or a number of bytes)")
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise UserError(f"invalid memory size {text!r} (expected e.g. 4G, 512M or a number of bytes)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise UserError(f"invalid memory size {text!r}: must be positive")
    return value


def format_size(n: int | float | None) -> str:
    """``n`` bytes as a short human-readable string ("1.5 GiB")."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def default_max_memory() -> int:
    """75 % of the machine's total RAM (bytes)."""
    return int(psutil.virtual_memory().total * DEFAULT_FRACTION)


@dataclass(frozen=True)
class Limits:
    """Per-point limits a worker runs under: ``max_memory`` (bytes of resident memory of the
    worker's process tree) and ``timeout`` (seconds per point); ``None`` = unlimited."""

    max_memory: int | None = None
    timeout: float | None = None

    @classmethod
    def make(cls, max_memory: int | str | None, timeout: float | None) -> Limits:
        """Validated limits; ``max_memory=None`` means ``default_max_memory()``."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout <= 0):
            raise UserError(f"invalid timeout {timeout!r}: must be a positive number of seconds")
        mem = default_max_memory() if max_memory is None else parse_size(max_memory)
        return cls(max_memory=mem, timeout=None if timeout is None else float(timeout))

POLL_S = 0.2
#: resident memory kept for a submitit task itself when its worker's limit comes from ``mem_gb``
TASK_RESERVE = 64 * 2**20
#: seconds a worker may take to start (imports, plugins) on top of the first point's timeout
STARTUP_GRACE_S = 60.0
_BAR = re.compile(r"\d+%\|.*\||\|[#█▏▎▍▌▋▊▉ ]+\||\d+/\d+ \[\d")


@dataclass
class Outcome:
    """How a worker ended. ``killed_for``: None, or the status of the limit it was killed for
    (``Status.OUT_OF_MEMORY``, ``Status.TIMEOUT``). ``reason``: the failed row's text when the one
    who watched the worker knows better than ``describe`` (a Slurm task: its own memory limit, a
    cancellation, the scheduler's time limit); ``max_memory``: the limit the worker ran under when
    it is not the runner's (bytes)."""

    returncode: int | None
    signal: str | None
    peak_rss: int
    killed_for: Status | None
    elapsed: float
    log_tail: str
    current: str | None
    reason: str = ""
    max_memory: int | None = None
    #: a Slurm task's final state (``slurm.py``), stamped on the failed row as ``slurm_state``
    slurm_state: str | None = None

    def describe(self, limits: Limits) -> str:
        """One line for a failed row of the point the worker was on."""
        if self.reason:
            return self.reason
        if self.killed_for == Status.OUT_OF_MEMORY:
            return (f"out of memory: peak RSS {format_size(self.peak_rss)} over the limit "
                    f"{format_size(limits.max_memory)} (worker killed)")
        if self.killed_for == Status.TIMEOUT:
            return f"timeout: exceeded {limits.timeout:g} s (worker killed)"
        if self.returncode is None:
            return self.log_tail or "worker did not report how it ended"
        how = f"killed by {self.signal}" if self.signal else f"exited with code {self.returncode}"
        return f"worker {how} (peak RSS {format_size(self.peak_rss)})" + (f": {self.log_tail}" if self.log_tail else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def worker_command(python: str, job_file: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    isolated_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [python, *isolated_path, "-m", "equibench.engine.worker", str(job_file), str(out_dir)]


def site_dirs() -> list[str]:
    """This interpreter's site-packages folders (what an isolated environment inherits)."""
    import site
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [os.path.realpath(d) for d in dirs if os.path.isdir(d)]


def worker_environ() -> dict[str, str]:
    """The worker's environment: this one, with the runner's ``equibench`` first on the path
    (unless it lives in a site-packages folder, which must stay behind an isolated environment's
    own packages), unbuffered output and the runner's pid for ``PR_SET_PDEATHSIG``."""
    env = dict(os.environ)
    root = equibench_root()
    if os.path.realpath(root) not in site_dirs():
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env["EQUIBENCH_PARENT_PID"] = str(os.getpid())
    return env


def log_tail(path: str | os.PathLike, n: int = 3, max_bytes: int = 65536) -> str:
    """The last ``n`` meaningful lines of a log: ``\\r``-separated progress-bar redraws and bars
    themselves are dropped, so an error is never reported as "37%|███▋ | 37/100"."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [seg.strip() for line in text.splitlines() for seg in line.split("\r")]
    keep = [ln for ln in lines if ln and not _BAR.search(ln)]
    return " / ".join(keep[-n:])


def _tree_rss(proc: psutil.Process | None) -> int:
    total = 0
    if proc is None:
        return 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    kill_all(children)


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL each of ``procs`` (psutil checks each is still the process it was, not a reused pid)."""
    for c in procs:
        try:
            c.kill()
        except psutil.Error:
            continue


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _ended(proc: subprocess.Popen) -> bool:
    """Whether the worker has exited (without reaping it: its pid, hence its process group,
    stays reserved until ``_reap``)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _reap(proc: subprocess.Popen) -> tuple[int, int]:
    """Kill what is left of the worker's session (compile or loader processes), reap the worker:
    (exit status as Popen reports it, its ru_maxrss in bytes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # already reaped elsewhere
        return (proc.returncode if proc.returncode is not None else -1), 0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, int(usage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


class Watched(Protocol):
    """A running worker as ``watch`` sees it: a cold worker subprocess (``Subprocess``) or a
    child forked by a warm parent (``warm.ForkedChild``)."""

    pid: int

    def ended(self) -> bool: ...

    def wait(self, seconds: float) -> None: ...

    def kill(self) -> None: ...

    def reap(self) -> tuple[int | None, int]: ...

    def ending(self) -> str: ...

    def process(self) -> psutil.Process | None: ...


class Subprocess:
    """A cold worker: our own child, in a session of its own."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.pid = proc, proc.pid
        self.ps = psutil.Process(proc.pid)
        self._wait = _waiter(proc.pid)

    def ended(self) -> bool:
        return _ended(self.proc)

    def wait(self, seconds: float) -> None:
        self._wait(seconds)

    def kill(self) -> None:
        _kill_tree(self.proc)

    def reap(self) -> tuple[int | None, int]:
        try:
            return _reap(self.proc)
        finally:
            if hasattr(self._wait, "fd"):
                os.close(self._wait.fd)

    def ending(self) -> str:
        return ""

    def process(self) -> psutil.Process | None:
        return self.ps


def _waiter(pid: int) -> Callable[[float], None]:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return time.sleep

    def wait(seconds: float) -> None:
        select.select([fd], [], [], seconds)
    wait.fd = fd  # type: ignore[attr-defined]
    return wait


def run_worker(python: str, job_file: str | os.PathLike, out_dir: str | os.PathLike, log: str | os.PathLike,
               limits: Limits, on_tick: Callable[[], None] | None = None) -> Outcome:
    """Run one cold worker to its end under ``limits``; never raises for what the worker does."""
    started = time.monotonic()
    return watch(start_cold(python, job_file, out_dir, log), out_dir, log, limits, on_tick, started,
                 STARTUP_GRACE_S)


def start_cold(python: str, job_file: str | os.PathLike, out_dir: str | os.PathLike,
               log: str | os.PathLike) -> Subprocess:
    """A cold worker subprocess for the job, in a session of its own, its output appended to ``log``."""
    with open(log, "ab") as log_f:
        proc = subprocess.Popen(worker_command(python, job_file, out_dir), stdin=subprocess.DEVNULL, stdout=log_f,
                                stderr=subprocess.STDOUT, env=worker_environ(), start_new_session=True)
    return Subprocess(proc)


def watch(worker: Watched, out_dir: str | os.PathLike, log: str | os.PathLike, limits: Limits,
          on_tick: Callable[[], None] | None, started: float, grace: float) -> Outcome:
    """Watch ``worker`` until it ends: its process tree's RSS against ``limits.max_memory``, the
    marker's point against ``limits.timeout`` (the first point gets ``grace`` more), ``on_tick``;
    kills its tree when over a limit. Never raises for what the worker does."""
    marker = Path(out_dir) / MARKER
    ps = worker.process()
    peak, current, point_started = 0, None, started + grace
    # time the worker spent stopped for another worker's timing (``--jobs``) is not its own
    paused_then = 0.0
    killed_for: Status | None = None
    try:
        while not worker.ended():
            rss = _tree_rss(ps)
            peak = max(peak, rss)
            now = time.monotonic()
            try:
                on = marker.read_text().strip() or None
            except OSError:
                on = None
            paused = paused_of(out_dir) if limits.timeout else 0.0
            if on != current:
                current, point_started, paused_then = on, now, paused
            if limits.max_memory and rss > limits.max_memory:
                killed_for = Status.OUT_OF_MEMORY
            elif limits.timeout and now - point_started - (paused - paused_then) > limits.timeout:
                killed_for = Status.TIMEOUT
            if killed_for:
                worker.kill()
                break
            if on_tick is not None:
                on_tick()
            worker.wait(POLL_S)
    finally:
        if not worker.ended():  # the runner itself is being interrupted
            worker.kill()
        code, maxrss = worker.reap()
    sig = signal_name(-code) if code is not None and code < 0 else None
    try:
        current = marker.read_text().strip() or current
    except OSError:
        pass
    tail, ending = log_tail(log), worker.ending()
    return Outcome(returncode=code, signal=sig, peak_rss=max(peak, maxrss), killed_for=killed_for,
                   elapsed=time.monotonic() - started, current=current,
                   log_tail=f"{ending}: {tail}" if ending and tail else ending or tail)


def submitit_job(python: str, job_file: str, out_dir: str, log: str, limits: dict[str, Any],
                 mem_bytes: int | None = None) -> dict[str, Any]:
    """What one submitit task runs (module-level so submitit can pickle it, in this module so the
    task imports neither torch nor the rest of equibench): the worker command, ``run_worker``.

    On Slurm, submitit's early warning before the time limit (``SIGUSR2``) is ignored here and, the
    disposition being inherited, by the worker: the point runs until Slurm's own limit (its row then
    says ``timeout``) instead of being stopped as if preempted. torch's threads default to the task's
    CPUs (``SLURM_CPUS_PER_TASK``). With ``mem_bytes`` (``mem_gb``), the worker's process tree is
    held to ``mem_bytes`` less this task's own resident memory and ``TASK_RESERVE`` (or the runner's
    ``--max-memory`` when lower): without cgroups its own watcher stops it first, an ``out_of_memory``
    row, where slurmstepd's sampler would kill the whole task."""
    if hasattr(signal, "SIGUSR2"):
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        os.environ.setdefault("OMP_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
    lim, capped = Limits(**limits), False
    if mem_bytes:
        cap = max(1, mem_bytes - psutil.Process().memory_info().rss - TASK_RESERVE)
        if lim.max_memory is None or cap < lim.max_memory:
            lim, capped = Limits(max_memory=cap, timeout=lim.timeout), True
    out = run_worker(python, job_file, out_dir, log, lim)
    if capped and mem_bytes and out.killed_for == Status.OUT_OF_MEMORY:
        out.reason = f"{out.describe(lim)}: the Slurm task's mem_gb ({mem_bytes / 2**30:g} GiB) less its own memory"
    out.max_memory = lim.max_memory
    return out.to_dict()
