"""The runner's side of quiet sections (``core.quiet``): one timing at a time, the rest stopped.

With ``--jobs N`` the local executor runs N workers at once. A worker that enters a timing section
writes ``quiet.want`` (request n) in its job folder; the ``Coordinator`` (a thread of the runner,
polling every few milliseconds) grants one request at a time: it stops every other running
worker's process tree with ``SIGSTOP``, then writes ``quiet.granted`` = n. When the holder's
``quiet.want`` is gone (or holds another n), or the holder has ended, the coordinator adds the
pause to each stopped worker's ``quiet.paused`` and sends ``SIGCONT``. A worker that starts while
a section is held is stopped at once. The worker's watch (``launch.watch``) does not count the
pause against the point's timeout.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil

from ..core.quiet import GRANTED, PAUSED, WANT, write_text_atomic

#: seconds between the coordinator's looks at the running workers' requests
POLL_S = 0.003


def _tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return [process]


def _signal(processes: list[psutil.Process], sig: int) -> None:
    for p in processes:
        try:
            p.send_signal(sig)
        except psutil.Error:  # ended meanwhile
            pass


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def paused_of(folder: str | os.PathLike) -> float:
    """Seconds the worker of job folder ``folder`` has been stopped so far (0 when never)."""
    try:
        return float(_read(Path(folder) / PAUSED) or 0.0)
    except ValueError:
        return 0.0


class Coordinator:
    """Grants quiet sections to one running worker at a time; stops the others meanwhile."""

    def __init__(self, poll_s: float = POLL_S) -> None:
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._running: dict[Path, psutil.Process] = {}
        self._stopped: dict[Path, tuple[float, list[psutil.Process]]] = {}
        self._holder: tuple[Path, str] | None = None
        self._end = threading.Event()
        self._thread: threading.Thread | None = None
        #: (job folder, seconds held) of every section granted, for the runner's log and tests
        self.sections: list[tuple[Path, float]] = []
        self._granted_at = 0.0

    def add(self, folder: Path, process: psutil.Process) -> None:
        """A worker started in job folder ``folder``."""
        with self._lock:
            self._running[Path(folder)] = process
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="equibench-quiet", daemon=True)
                self._thread.start()

    def remove(self, folder: Path) -> None:
        """The worker of ``folder`` ended (or is about to be reaped): release what it held."""
        folder = Path(folder)
        with self._lock:
            self._running.pop(folder, None)
            if self._holder is not None and self._holder[0] == folder:
                self._release()
            self._stopped.pop(folder, None)

    def close(self) -> None:
        """Continue every stopped worker and end the polling thread."""
        self._end.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._holder is not None:
                self._release()

    # ---- the polling thread -----------------------------------------------------------
    def _loop(self) -> None:
        while not self._end.wait(self.poll_s):
            with self._lock:
                self._step()

    def _step(self) -> None:
        if self._holder is not None:
            folder, n = self._holder
            if _read(folder / WANT) != n:
                self._release()
        if self._holder is None:
            for folder in self._running:
                want = _read(folder / WANT)
                if want is not None and _read(folder / GRANTED) != want:
                    self._grant(folder, want)
                    break
        if self._holder is not None:  # workers started since the grant
            for folder, process in self._running.items():
                if folder != self._holder[0] and folder not in self._stopped:
                    self._stop(folder, process)

    def _stop(self, folder: Path, process: psutil.Process) -> None:
        tree = _tree(process)
        _signal(tree, signal.SIGSTOP)
        self._stopped[folder] = (time.monotonic(), tree)

    def _grant(self, folder: Path, n: str) -> None:
        for other, process in self._running.items():
            if other != folder:
                self._stop(other, process)
        self._holder = (folder, n)
        self._granted_at = time.monotonic()
        try:
            write_text_atomic(folder / GRANTED, n)
        except OSError:  # its folder is gone: the job ended under us
            self._release()

    def _release(self) -> None:
        now = time.monotonic()
        if self._holder is not None:
            self.sections.append((self._holder[0], now - self._granted_at))
        for folder, (since, tree) in self._stopped.items():
            try:
                write_text_atomic(folder / PAUSED, repr(paused_of(folder) + now - since))
            except OSError:
                pass
            _signal(list(reversed(tree)), signal.SIGCONT)
        self._stopped.clear()
        self._holder = None
