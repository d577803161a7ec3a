"""``executor="submitit"``: the same jobs and workers, scheduled through submitit.

Each submitit task runs ``submitit_job``, which starts the very same worker command as the local
executor (``launch.run_worker``: same job file, result files, memory and time limits, log) on the
node it lands on, and returns the worker's outcome; the runner then stores the results exactly
as for a local run, so ``--resume`` works across executors. With Slurm (``sbatch`` on PATH) the
jobs of a wave go out as one array job (partition, GPUs, CPUs, memory, time limit and array
parallelism from ``executor_options``); without it, submitit's local executor runs them as
subprocesses, ``parallelism`` at a time (default 1: the machine's cores are the benchmark's).
The run directory and isolated environments (``$EQUIBENCH_ENV_DIR``) must be on storage the
nodes share. A submitit task that raises, is killed or times out is a ``failed`` row.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from ..core.errors import UserError
from .jobs import Job
from .launch import Outcome, run_worker
from .limits import Limits

OPTION_TYPES = {"partition": str, "gpus_per_node": int, "timeout_min": (int, float), "parallelism": int,
                "cpus_per_task": int, "mem_gb": (int, float), "cluster": str}


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
        limits = {"max_memory": self.limits.max_memory, "timeout": self.limits.timeout}
        tasks = self.executor.map_array(submitit_job, [j.python for j in jobs], [str(j.job_file) for j in jobs],
                                        [str(j.dir) for j in jobs], [str(j.log) for j in jobs], [limits] * len(jobs))
        for job, task in zip(jobs, tasks):
            try:
                outcome = Outcome(**task.result())
            except Exception as err:  # raised in the task, killed, or timed out by the scheduler
                last = str(err).strip().splitlines()
                outcome = Outcome(None, None, 0, "", 0.0, f"submitit job {task.job_id}: "
                                  f"{last[-1] if last else type(err).__name__}", None)
            yield job, outcome
