"""The runner <-> worker protocol: job files, result files and the "current point" marker.

A *job* is a list of points that one worker interpreter measures in order, in its own folder
``<run_dir>/work/<job id>/``::

    job.json        written by the runner before the worker starts:
                    {"protocol": 1, "points": [Point.to_dict()...], "plugins": [abs paths],
                     "history": [rows], "environment": "main" | <env hash>,
                     "equibench_root": <folder holding the equibench package>, "max_memory": bytes,
                     "coordinated": true when other workers run at once (timing asks first: core.quiet)}
    current         the hash of the point the worker is on (replaced atomically before each point)
    <hash>.json     one result per finished point, written atomically (temp file, fsync, rename):
                    {"hash", "rows": [...], "versions": {package: version}, "environment",
                     "started": unix time, "finished": unix time}

The worker is ``python -m equibench.engine.worker <job.json> <job folder>`` (``worker.py``); its
stdout and stderr go to ``<run_dir>/logs/<job id>.log``. A result file exists only for a point
whose rows are complete, so whatever the worker's fate, the runner records exactly the points with
a result and knows the next one (the first without) is where the worker stopped.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..benches.base import Point, Row
from ..results.store import storage_errors, write_json_atomic

PROTOCOL = 1
JOB_FILE = "job.json"
MARKER = "current"
#: worker exit status meaning "could not write my result: disk full / not writable" (EX_TEMPFAIL)
EXIT_STORAGE = 75


def equibench_root() -> str:
    """The folder holding the ``equibench`` package this process runs."""
    return str(Path(__file__).resolve().parents[2])


@dataclass
class Job:
    """Points for one worker, the interpreter it runs in and where its files go."""

    id: str
    dir: Path
    log: Path
    points: list[Point]
    python: str
    environment: str = "main"
    versions: dict[str, str] = field(default_factory=dict)
    #: when the executor started it (unix time; None when unknown, e.g. queued on Slurm)
    launched: float | None = None
    #: the scheduler's ids of the task that ran it, stamped on its points' rows (Slurm:
    #: ``slurm_job_id``, ``slurm_array_task_id``; empty for local workers)
    scheduler: dict[str, Any] = field(default_factory=dict)

    @property
    def job_file(self) -> Path:
        return self.dir / JOB_FILE

    def result_file(self, point: Point) -> Path:
        return self.dir / f"{point.hash}.json"

    def write(self, plugins: list[str], history: list[Row], max_memory: int | None, coordinated: bool = False) -> None:
        """Create the job folder and write ``job.json`` (``StorageError`` when the disk refuses);
        ``coordinated``: other workers run at once, so the worker asks before timing (``core.quiet``)."""
        with storage_errors(self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
            self.log.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.job_file, {
            "protocol": PROTOCOL, "points": [p.to_dict() for p in self.points],
            "plugins": [str(Path(p).resolve()) for p in plugins], "history": history,
            "environment": self.environment, "equibench_root": equibench_root(), "max_memory": max_memory,
            **({"coordinated": True} if coordinated else {}),
        }, indent=None)

    def read_result(self, point: Point) -> dict[str, Any] | None:
        """The point's result, or None when the worker did not finish it."""
        try:
            return json.loads(self.result_file(point).read_text())
        except FileNotFoundError:
            return None

    def current(self) -> str | None:
        """The hash of the point the worker is on (None before it started one)."""
        try:
            return (self.dir / MARKER).read_text().strip() or None
        except OSError:
            return None


def job_id(point: Point, attempt: int) -> str:
    """A file-name-safe id: the first point's label, its hash and the attempt number."""
    label = re.sub(r"[^A-Za-z0-9_.=-]+", "_", point.label)[:60].strip("_")
    return f"{label}-{point.hash[:8]}-{attempt}"


def read_job(path: str | os.PathLike) -> dict[str, Any]:
    """The job document (worker side); ``ValueError`` for another protocol version."""
    job = json.loads(Path(path).read_text())
    if job.get("protocol") != PROTOCOL:
        raise ValueError(f"job protocol {job.get('protocol')!r}, this worker speaks {PROTOCOL}")
    return job


def write_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (temp file, fsync, rename).

    Raises the ``OSError`` as is (the worker decides what a full disk means)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
