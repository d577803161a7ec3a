"""Exclusive locks on directories: one runner per run directory, one builder per environment.

``exclusive(lock_file, what, wait=...)`` takes an ``fcntl.flock`` on ``lock_file`` and writes
the holder (pid, host, start time, command) into it. The kernel releases a flock when the last
descriptor closes, so a holder killed with ``kill -9`` leaves nothing behind that blocks the next
runner (the file stays, its stale holder text is simply overwritten). The descriptor is not
inherited by worker processes (Python opens files non-inheritable), so a worker that outlives
its runner does not hold the lock either.

Without ``wait`` a busy lock raises ``UserError`` naming the holder (the CLI prints one line and
exits with code 2); with ``wait`` it says once on stderr whom it waits for, then blocks.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..results.store import storage_errors


def holder_info() -> dict[str, Any]:
    """Who takes a lock: pid, host, start time and command line (one line, shortened)."""
    command = " ".join(sys.argv) if sys.argv and sys.argv[0] else sys.executable
    command = " ".join(command.split())
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command[:200] + ("..." if len(command) > 200 else "")}


def describe_holder(fd: int) -> str:
    """The holder written in a lock file, as one line ("pid 12 on host since ... (command)")."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} since {h['started']} ({h['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if missing) for the ``with`` block.

    ``what`` names the locked thing in messages ("run directory results/x"). Raises
    ``UserError`` when another process holds it and ``wait`` is false.
    """
    path = Path(lock_file)
    with storage_errors(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = describe_holder(fd)
            if not wait:
                raise UserError(f"{what} is in use by {holder}; wait for it to finish or pass --wait") from None
            print(f"equibench: waiting for {what}, in use by {holder}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        with storage_errors(path):
            data = json.dumps(holder_info()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
