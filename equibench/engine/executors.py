"""Executors: where jobs run. Each yields every job with the worker's ``Outcome`` as it ends.

* ``LocalExecutor`` (``executor="local"``): one worker at a time on this machine, under the same
  limits, log and marker either way: a child forked by the environment's warm parent
  (``warm.py``: torch, torch_geometric and equibench already imported) where ``warm.enabled()``,
  else a cold worker subprocess (``launch.run_worker``); with ``isolate=False`` the main
  environment's jobs run in this process instead (``worker.run_job``: no limits, no interpreter
  start; debugging).
* ``SubmititExecutor`` (``executor="submitit"``): each submitit task runs ``submitit_job``, which
  starts the very same worker command (same job file, result files, memory and time limits, log)
  on the node it lands on and returns the worker's outcome; the runner then stores the results
  exactly as for a local run, so ``--resume`` works across executors. With Slurm (``sbatch`` on
  PATH) the jobs of a wave go out as one array job (partition, GPUs, CPUs, memory, time limit and
  array parallelism from ``executor_options``); without it, submitit's local executor runs them
  as subprocesses, ``parallelism`` at a time (default 1: the machine's cores are the benchmark's).
  The run directory and isolated environments (``$EQUIBENCH_ENV_DIR``) must be on storage the
  nodes share. A submitit task that raises, is killed or times out is a ``failed`` row.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from ..core.errors import UserError
from . import warm as warm_workers
from .jobs import Job, read_job
from .launch import STARTUP_GRACE_S, Limits, Outcome, run_worker, watch
from .worker import peak_rss, run_job

OPTION_TYPES: dict[str, type | tuple[type, ...]] = {
    "partition": str, "gpus_per_node": int, "timeout_min": (int, float), "parallelism": int, "cpus_per_task": int,
    "mem_gb": (int, float), "cluster": str}


class Executor(Protocol):
    """Runs jobs; yields each job with its outcome as it ends (``on_tick`` while it runs)."""

    name: str
    wave: int

    def run(self, jobs: list[Job], on_tick: Callable[[Job], None]) -> Iterator[tuple[Job, Outcome]]: ...


class LocalExecutor:
    """One worker at a time on this machine: forked by a warm parent (``warm=None``: where
    ``warm.enabled()``) or a cold subprocess (``isolate=False``: in this process, without limits,
    for jobs in the main environment; faster, for debugging)."""

    wave = 1

    def __init__(self, limits: Limits, isolate: bool = True, warm: bool | None = None) -> None:
        self.limits, self.isolate = limits, isolate
        self.warm = warm_workers.enabled() if warm is None else warm
        self.name = "local" if isolate else "inline"

    def run(self, jobs: list[Job], on_tick: Callable[[Job], None]) -> Iterator[tuple[Job, Outcome]]:
        for job in jobs:
            if self.isolate or job.environment != "main":
                tick = functools.partial(on_tick, job)
                # a warm parent's start-up is not the job's time (a cold worker's start is)
                child = warm_workers.start(job.python, job.job_file, job.dir, job.log, job.log.parent) \
                    if self.warm else None
                job.launched = time.time()
                if child is not None:
                    yield job, watch(child, job.dir, job.log, self.limits, tick, time.monotonic(), STARTUP_GRACE_S)
                else:
                    yield job, run_worker(job.python, job.job_file, job.dir, job.log, self.limits, on_tick=tick)
            else:
                job.launched = time.time()
                t0 = time.monotonic()
                code = run_job(read_job(job.job_file), job.dir)
                yield job, Outcome(code, None, peak_rss(), None, time.monotonic() - t0, "", None)


def submitit_job(python: str, job_file: str, out_dir: str, log: str, limits: dict[str, Any]) -> dict[str, Any]:
    """What one submitit task runs (module-level so submitit can pickle it): the worker command."""
    return run_worker(python, job_file, out_dir, log, Limits(**limits)).to_dict()


def make_submitit(folder: Path, options: dict[str, Any], timeout: float | None):
    """A configured ``submitit.AutoExecutor``; unknown or mistyped options are a ``UserError``."""
    import submitit
    for k, v in options.items():
        if k not in OPTION_TYPES:
            raise UserError(f"unknown submitit option {k!r} (known: {', '.join(sorted(OPTION_TYPES))})")
        if not isinstance(v, OPTION_TYPES[k]) or isinstance(v, bool):
            raise UserError(f"submitit option {k!r} has the wrong type: {v!r}")
    executor = submitit.AutoExecutor(folder=folder, cluster=options.get("cluster"))
    timeout_min = options.get("timeout_min", (timeout / 60.0 + 5) if timeout else 60.0)
    params: dict[str, Any] = {"timeout_min": max(1, math.ceil(timeout_min))}  # submitit wants an int
    if "gpus_per_node" in options:
        params["gpus_per_node"] = options["gpus_per_node"]
    if executor.cluster == "slurm":
        params["slurm_array_parallelism"] = options.get("parallelism", 16)
        if "partition" in options:
            params["slurm_partition"] = options["partition"]
        if "cpus_per_task" in options:
            params["cpus_per_task"] = options["cpus_per_task"]
        if "mem_gb" in options:
            params["mem_gb"] = options["mem_gb"]
    executor.update_parameters(**params)
    return executor


class SubmititExecutor:
    """Waves of jobs as submitit tasks; yields each job's outcome in submission order."""

    def __init__(self, folder: Path, options: dict[str, Any], limits: Limits) -> None:
        self.folder, self.limits = folder, limits
        self.executor = make_submitit(folder, options, limits.timeout)
        self.name = f"submitit:{self.executor.cluster}"
        self.wave = 10_000 if self.executor.cluster == "slurm" else max(1, int(options.get("parallelism", 1)))

    def run(self, jobs: list[Job], on_tick: Callable[[Job], None]) -> Iterator[tuple[Job, Outcome]]:
        limits = dataclasses.asdict(self.limits)
        tasks = self.executor.map_array(submitit_job, [j.python for j in jobs], [str(j.job_file) for j in jobs],
                                        [str(j.dir) for j in jobs], [str(j.log) for j in jobs], [limits] * len(jobs))
        for job, task in zip(jobs, tasks):
            try:
                outcome = Outcome(**task.result())
            except Exception as err:  # raised in the task, killed, or timed out by the scheduler
                last = str(err).strip().splitlines()
                outcome = Outcome(None, None, 0, None, 0.0, f"submitit job {task.job_id}: "
                                  f"{last[-1] if last else type(err).__name__}", None)
            yield job, outcome


def make_executor(executor: str, run_dir: Path, limits: Limits, isolate: bool,
                  options: dict[str, Any] | None) -> Executor:
    if executor == "local":
        if options:
            raise UserError(f"executor 'local' takes no options, got {sorted(options)}")
        return LocalExecutor(limits, isolate)
    if executor == "submitit":
        return SubmititExecutor(run_dir / "submitit", options or {}, limits)
    raise UserError(f"unknown executor {executor!r} (known: local, submitit)")
