"""The worker: ``python -m equibench.engine.worker JOB_FILE OUT_DIR`` measures a job's points.

Started by the runner as a plain command (never multiprocessing), or forked by a warm parent
that has already imported everything (``warm.py``; the child calls ``run_job`` as ``main`` does),
so the user's script is never re-imported and ``eb.run`` behaves the same from a script without
a main guard, ``python -c``, a notebook or the CLI. Protocol: ``jobs.py``. For each point, in
order, the worker marks it as current, runs ``bench_class(point.bench).run_point(point,
history)`` and writes its result file atomically; ``history`` starts with the job's rows and
grows with each point's rows.

Guarantees:

* an exception in a point is its row, made by the one writer (``results.rows.exception_rows``):
  ``failed`` (type, message, last traceback lines), ``out_of_memory`` for ``MemoryError`` /
  ``torch.OutOfMemoryError`` (with the worker's peak RSS and the limit), ``not_applicable`` /
  ``skipped`` for a bench's ``NotApplicable`` / ``Skipped``; the job goes on;
* a result it cannot write because the disk is full or not writable ends the worker with exit
  status ``EXIT_STORAGE`` and no result: the point was not measured and is run again on resume;
* it imports the ``equibench`` the runner runs (checked against the job's ``equibench_root``)
  and loads the job's plugins before the first point;
* on Linux it dies with its runner (``PR_SET_PDEATHSIG``), so a killed runner leaves no orphans.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from ..benches.base import Point, Row, bench_class
from ..core import quiet
from ..core.envinfo import package_versions
from ..core.registry import load_plugin
from ..results.rows import exception_rows
from ..results.store import is_storage_error
from . import jobs
from .jobs import EXIT_STORAGE, MARKER, equibench_root, read_job


def _json_default(obj: Any) -> Any:
    return obj.item() if hasattr(obj, "item") else str(obj)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the runner that started it dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = os.environ.get("EQUIBENCH_PARENT_PID")
    if parent and int(parent) != os.getppid():  # the runner died before prctl took effect
        os._exit(1)


def peak_rss() -> int:
    """Peak resident memory of this process so far (bytes)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb if sys.platform == "darwin" else kb * 1024)


def measure(point: Point, history: list[Row], max_memory: int | None = None) -> list[Row]:
    """The point's rows; never raises for an error inside the bench: it becomes the point's row
    (``results.rows.exception_rows``: ``failed``, ``out_of_memory``, ``not_applicable``, ...)."""
    try:
        return bench_class(point.bench).run_point(point, history)
    except Exception as err:  # a failure is a result, not a crash of the job
        return exception_rows(err, peak_rss=peak_rss(), max_memory=max_memory)


def check_source(root: str) -> None:
    """Refuse to run another ``equibench`` than the runner's (results would mix code versions)."""
    mine = equibench_root()
    if os.path.realpath(mine) != os.path.realpath(root):
        raise SystemExit(f"equibench worker: imported equibench from {mine}, the runner runs {root}")


def run_job(job: dict[str, Any], out_dir: str | os.PathLike) -> int:
    """Measure every point of ``job`` into ``out_dir``; the worker's exit status."""
    out = Path(out_dir)
    check_source(job["equibench_root"])
    quiet.configure(out if job.get("coordinated") else None)
    for plugin in job["plugins"]:
        load_plugin(plugin)
    versions = package_versions()
    history: list[Row] = list(job.get("history", []))
    points = [Point.from_dict(d) for d in job["points"]]
    used = {p.bench for p in points}
    for kind in used:  # imported before the first point is marked: start-up is not the point's time
        bench_class(kind)
    try:
        for point in points:
            jobs.write_durably(out / MARKER, point.hash)
            started, paused = time.time(), quiet.paused_s()
            rows = measure(point, history, job.get("max_memory"))
            result = {"hash": point.hash, "rows": rows, "versions": versions, "environment": job["environment"],
                      "started": started, "finished": time.time()}
            if quiet.coordinated():
                result["paused_s"] = quiet.paused_s() - paused
            jobs.write_durably(out / f"{point.hash}.json", json.dumps(result, default=_json_default))
            history += [{**point.identity, **r} for r in rows]
    except OSError as err:
        if not is_storage_error(err):
            raise
        print(f"equibench worker: cannot write to {out}: {err.strerror}", file=sys.stderr, flush=True)
        return EXIT_STORAGE
    finally:
        for kind in used:
            bench_class(kind).release()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m equibench.engine.worker JOB_FILE OUT_DIR", file=sys.stderr)
        return 2
    die_with_parent()
    return run_job(read_job(args[0]), args[1])


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Results are fsync'd and the logs flushed: skip the interpreter's finalisation (tearing down
    # torch & co. takes ~1 s), as multiprocessing's children do; an exception above exits normally.
    os._exit(status)
