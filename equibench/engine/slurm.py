"""Slurm as the submitit executor sees it: the queue (``squeue``), cancellation (``scancel``),
partitions (``sinfo``) and what an array task's final state means for its point.

submitit follows its jobs with ``sacct``, which needs Slurm's accounting database; a cluster
without one (a single-node test cluster, ``scripts/slurm-local.sh``) answers "accounting storage
is disabled" and submitit would wait forever for a task that was cancelled or timed out (it never
writes a result). So the executor asks ``squeue -t all`` itself (finished tasks stay listed for
``MinJobAge`` seconds, 300 by default) and reads a task's end from its Slurm state:

* ``COMPLETED`` (or any state with submitit's result file): the worker's own outcome;
* ``CANCELLED``: a ``failed`` row naming the cancellation (``scancel``);
* ``TIMEOUT`` / ``DEADLINE``: a ``timeout`` row (the array task's Slurm time limit);
* ``OUT_OF_MEMORY``, or any end whose log has slurmstepd's "exceeded memory limit" (without
  cgroups, ``JobAcctGatherParams=OverMemoryKill`` kills the step and the state reads ``FAILED``
  or ``CANCELLED``): an ``out_of_memory`` row;
* anything else (``FAILED``, ``NODE_FAIL``, ``PREEMPTED``, ``BOOT_FAIL``, gone from the queue):
  a ``failed`` row with the state and the last lines of the task's log.

Every array job a runner submits is appended to ``<run_dir>/submitit/slurm_jobs`` (and dropped
from it once all its tasks have ended); a runner that
starts on the same run directory (``--resume`` after a killed runner) first cancels those still
queued or running and waits until they have left the queue (``cancel_leftovers``), so no point
runs twice and nothing writes into the run directory behind its back.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from ..core.errors import UserError
from ..results.status import Status

#: states of a task that has not ended yet
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"})
TIMED_OUT = frozenset({"TIMEOUT", "DEADLINE"})
#: what slurmstepd writes to a task's stderr when jobacct_gather kills it for memory
OOM_MARKS = ("exceeded memory limit", "exceeded job memory limit", "oom-kill", "out of memory")
#: final states of a task that say nothing about its point (someone cancelled it, the node or
#: the scheduler failed): ``--resume`` runs such a point again
RERUN = frozenset({"CANCELLED", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "GONE"})
JOBS_FILE = "slurm_jobs"
SQUEUE_TIMEOUT_S = 60


def available() -> bool:
    """Whether Slurm's ``sbatch`` is on PATH (submitit then submits array jobs)."""
    return shutil.which("sbatch") is not None


def _run(cmd: list[str], timeout: float = SQUEUE_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def interrupted(rows: Iterable[dict]) -> set[str]:
    """The points (``spec_hash``) whose every recorded block is a Slurm interruption (a failed row
    with ``slurm_state`` in ``RERUN``): not measured, so ``--resume`` runs them again."""
    by_point: dict[str, dict[str, bool]] = {}
    for r in rows:
        blocks = by_point.setdefault(str(r.get("spec_hash")), {})
        block = str(r.get("block"))
        blocks[block] = blocks.get(block, True) and r.get("slurm_state") in RERUN
    return {h for h, blocks in by_point.items() if all(blocks.values())}


def partitions() -> list[str]:
    """The cluster's partition names (``sinfo``); ``UserError`` when the controller does not answer."""
    try:
        out = _run(["sinfo", "-h", "-o", "%R"])
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UserError(f"Slurm does not answer: sinfo: {err}") from None
    if out.returncode != 0:
        raise UserError(f"Slurm does not answer: sinfo: {_last_line(out.stderr) or f'exit {out.returncode}'}")
    return sorted({p.strip() for p in out.stdout.split() if p.strip()})


def check_partition(name: str) -> None:
    """``UserError`` (one line) unless ``name`` is one of the cluster's partitions."""
    known = partitions()
    if name not in known:
        raise UserError(f"unknown Slurm partition {name!r} (this cluster has: {', '.join(known) or 'none'})")


def max_array_size(default: int = 1001) -> int:
    """The cluster's ``MaxArraySize`` (tasks per array job), ``default`` when it cannot be read."""
    try:
        out = _run(["scontrol", "show", "config"])
    except (OSError, subprocess.TimeoutExpired):
        return default
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize":
            try:
                return max(1, int(value.strip()))
            except ValueError:
                return default
    return default


def states(array_ids: Iterable[str]) -> dict[str, str] | None:
    """``{"<array job>_<task>": STATE}`` for every listed task of the given array jobs, finished
    ones included (``squeue -r -t all``); ``None`` when ``squeue`` fails (the controller is busy or
    restarting: ask again later). A job no longer known to the controller is simply absent."""
    ids = sorted(set(array_ids))
    if not ids:
        return {}
    try:
        out = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T"])
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        if "invalid job id" not in out.stderr.lower():
            return None
        if len(ids) == 1:
            return {}
        merged: dict[str, str] = {}  # one id the controller has forgotten: ask for each alone
        for one in ids:
            part = states([one])
            if part is None:
                return None
            merged.update(part)
        return merged
    found: dict[str, str] = {}
    for line in out.stdout.splitlines():
        jid, _, state = line.strip().partition("|")
        if jid:
            found[jid] = state.strip().split()[0] if state.strip() else "UNKNOWN"
    return found


def cancel(job_ids: Iterable[str]) -> None:
    """``scancel`` the given jobs or array tasks (errors for jobs that already ended are ignored)."""
    ids = sorted(set(job_ids))
    if ids:
        try:
            _run(["scancel", *ids])
        except (OSError, subprocess.TimeoutExpired):
            pass


def remember(folder: Path, array_id: str) -> None:
    """Append a submitted array job's id to ``folder/slurm_jobs`` (read by ``cancel_leftovers``)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / JOBS_FILE, "a") as f:
        f.write(array_id + "\n")
        f.flush()
        os.fsync(f.fileno())


def forget(folder: Path, array_ids: Iterable[str]) -> None:
    """Drop ended array jobs from ``folder/slurm_jobs`` (the file goes when none is left)."""
    path, done = folder / JOBS_FILE, set(array_ids)
    try:
        keep = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and ln.strip() not in done]
    except OSError:
        return
    if keep:
        path.write_text("".join(f"{i}\n" for i in keep))
    else:
        path.unlink(missing_ok=True)


def cancel_leftovers(folder: Path, wait_s: float = 300.0) -> int:
    """Cancel the array tasks an earlier runner of this run directory left queued or running (its
    ids in ``folder/slurm_jobs``) and wait until none is left in the queue; returns how many were
    cancelled. ``UserError`` when they do not leave within ``wait_s``."""
    path = folder / JOBS_FILE
    try:
        ids = sorted({ln.strip() for ln in path.read_text().splitlines() if ln.strip()})
    except OSError:
        return 0
    if not ids or not available():
        return 0
    deadline = time.monotonic() + wait_s
    left = _active(ids)
    n = len(left)
    if left:
        print(f"[equibench] cancelling {n} Slurm task(s) left by an earlier runner of this run directory: "
              f"{', '.join(sorted(left)[:5])}{' ...' if n > 5 else ''}", file=sys.stderr)
        cancel(ids)
    while left:
        if time.monotonic() > deadline:
            raise UserError(f"Slurm tasks of an earlier runner did not leave the queue in {wait_s:g} s: "
                            f"{', '.join(sorted(left)[:5])}; scancel them and rerun with --resume")
        time.sleep(1.0)
        left = _active(ids)
    path.unlink(missing_ok=True)
    return n


def _active(array_ids: list[str]) -> set[str]:
    """The tasks of ``array_ids`` still queued or running (polled until ``squeue`` answers)."""
    for _ in range(30):
        found = states(array_ids)
        if found is not None:
            return {jid for jid, st in found.items() if st in ACTIVE}
        time.sleep(2.0)
    raise UserError("Slurm does not answer (squeue failed 30 times): cannot tell whether tasks of an earlier "
                    "runner are still running")


def ending(state: str | None, task_id: str, stderr: str, time_limit_min: float,
           mem_bytes: int | None) -> tuple[Status, str] | None:
    """How a Slurm end that is not the worker's own reads on the point's row: (status, error
    line), or ``None`` when the worker's outcome stands (``COMPLETED``, nothing the scheduler did).
    ``stderr``: the last lines of the task's error log (slurmstepd writes its reasons there)."""
    memory = state == "OUT_OF_MEMORY" or any(m in stderr.lower() for m in OOM_MARKS)
    where = f"Slurm array task {task_id}"
    if memory:
        limit = f" of {mem_bytes / 2**30:g} GiB (mem_gb)" if mem_bytes else ""
        return Status.OUT_OF_MEMORY, f"out of memory: over the Slurm memory limit{limit}, killed by Slurm " \
                                     f"({where} {state or 'ended'}{': ' + stderr if stderr else ''})"
    if state in TIMED_OUT:
        return Status.TIMEOUT, f"timeout: Slurm time limit of {time_limit_min:g} min reached ({where} {state})"
    if state == "CANCELLED":
        return Status.FAILED, f"cancelled on Slurm (scancel): {where} CANCELLED before the point finished"
    if state is None:
        return Status.FAILED, (f"{where} left the Slurm queue without a result (cancelled while pending, or "
                               "purged)")
    if state == "COMPLETED":
        return None
    return Status.FAILED, f"{where} ended {state}" + (f": {stderr}" if stderr else "")
