"""Quiet sections: timing that runs alone while other workers of the same run are paused.

``equibench run --jobs N`` (N > 1) runs N workers at once on one machine, one per core. Training
and accuracy do not depend on what the other cores do, but a wall-clock timing does (shared
caches, memory bandwidth, a hypervisor's sibling threads). So every timing (the throughput and
profile probes, the scaling and tensor-product benches) runs inside ``with quiet():``; the
runner's coordinator (``engine.quiet.Coordinator``) then stops every other worker of the run
(``SIGSTOP`` to its process tree) for the section's length and continues them after it. A timing
therefore sees the machine as a run with one worker would.

Protocol (files in the job's folder, which only this worker and the runner touch):

* worker: writes ``quiet.want`` holding a request number n, then waits until ``quiet.granted``
  holds n (the coordinator has stopped the others), runs the section and removes ``quiet.want``;
* coordinator: grants one request at a time; when the holder's ``quiet.want`` is gone (or no
  longer holds n) it adds the pause to each stopped worker's ``quiet.paused`` and continues it.

A stopped worker's own clocks run on while it is stopped: its training clock subtracts
``paused_s()`` (kept current by a ``SIGCONT`` handler that re-reads ``quiet.paused``), so a
training time or a ``max_seconds`` cap never counts another worker's timing.

Without a coordinator (one worker at a time, the default, and every in-process run) ``quiet()``
does nothing and ``paused_s()`` is 0.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WANT, GRANTED, PAUSED = "quiet.want", "quiet.granted", "quiet.paused"
#: seconds between checks for the grant (the coordinator polls every few milliseconds)
POLL_S = 0.002


class _State:
    """This worker's side of the protocol."""

    folder: Path | None = None  # the job's folder when coordinated
    depth = 0  # nesting of quiet() sections
    n = 0  # the last request number
    paused = 0.0  # seconds stopped so far, as last read


_state = _State()


def configure(job_dir: str | os.PathLike | None) -> None:
    """Coordinated from now on through ``job_dir`` (None: alone, every section runs at once)."""
    _state.folder = None if job_dir is None else Path(job_dir)
    _state.depth, _state.n, _state.paused = 0, 0, 0.0
    if job_dir is not None:
        signal.signal(signal.SIGCONT, _on_continue)


def coordinated() -> bool:
    return _state.folder is not None


def _read_paused(folder: Path) -> float:
    try:
        return float((folder / PAUSED).read_text() or 0.0)
    except (OSError, ValueError):
        return _state.paused


def _on_continue(signum: int, frame: object) -> None:
    if _state.folder is not None:
        _state.paused = _read_paused(_state.folder)


def paused_s() -> float:
    """Seconds this worker has spent stopped for other workers' quiet sections so far."""
    return _state.paused  # kept current by the SIGCONT handler (the runner writes it before SIGCONT)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once (a reader sees the old or the new content)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def quiet() -> Iterator[None]:
    """Run the body with every other worker of the run stopped (nested sections: the outermost)."""
    folder = _state.folder
    if folder is None or _state.depth > 0:
        _state.depth += 1
        try:
            yield
        finally:
            _state.depth -= 1
        return
    _state.n += 1
    n = str(_state.n)
    write_text_atomic(folder / WANT, n)
    while True:
        try:
            if (folder / GRANTED).read_text().strip() == n:
                break
        except OSError:
            pass
        time.sleep(POLL_S)
    _state.depth = 1
    try:
        yield
    finally:
        _state.depth = 0
        try:
            (folder / WANT).unlink()
        except OSError:
            pass
