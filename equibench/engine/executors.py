"""Executors: where jobs run. Each yields every job with the worker's ``Outcome`` as it ends.

* ``LocalExecutor`` (``executor="local"``): one worker at a time on this machine (``jobs`` at a
  time with ``--jobs``: timings then run alone, ``quiet.py``), under the same limits, log and
  marker either way: a child forked by the environment's warm parent
  (``warm.py``: torch, torch_geometric and equibench already imported) where ``warm.enabled()``,
  else a cold worker subprocess (``launch.run_worker``); with ``isolate=False`` the main
  environment's jobs run in this process instead (``worker.run_job``: no limits, no interpreter
  start; debugging).
* ``SubmititExecutor`` (``executor="submitit"``): each submitit task runs ``submitit_job``, which
  starts the very same worker command (same job file, result files, memory and time limits, log)
  on the node it lands on and returns the worker's outcome; the runner then stores the results
  exactly as for a local run, so ``--resume`` works across executors. With Slurm (``sbatch`` on
  PATH) the jobs of a wave go out as one array job (``executor_options``, checked before anything
  runs: ``partition``, ``account``, ``qos``, ``constraint``, ``gpus_per_node``, ``cpus_per_task``,
  ``mem_gb``, ``timeout_min``, ``parallelism`` = array tasks at once (default 16), ``job_name``,
  ``setup`` = shell lines before the task, ``additional_parameters`` = other ``#SBATCH`` options);
  the runner follows the tasks with ``squeue`` (``slurm.py``: no accounting database needed),
  harvests finished points as they appear, and reads a task's Slurm end into its point's row
  (cancelled: ``failed`` naming the cancellation; time limit: ``timeout``; memory: ``out_of_memory``);
  every row carries ``slurm_job_id`` and ``slurm_array_task_id``. Without Slurm, submitit's local
  executor runs the jobs as subprocesses, ``parallelism`` at a time (default 1: the machine's
  cores are the benchmark's); a Slurm-only option is then bad input. The run directory and
  isolated environments (``$EQUIBENCH_ENV_DIR``) must be on storage the nodes share. A submitit
  task that raises or is killed is a ``failed`` row.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from ..core.errors import UserError
from ..results.status import Status
from . import slurm
from . import warm as warm_workers
from .jobs import Job, read_job
from .launch import STARTUP_GRACE_S, Limits, Outcome, Watched, log_tail, run_worker, start_cold, submitit_job, watch
from .quiet import Coordinator
from .worker import peak_rss, run_job

OPTION_TYPES: dict[str, type | tuple[type, ...]] = {
    "partition": str, "account": str, "qos": str, "constraint": str, "job_name": str, "gpus_per_node": int,
    "timeout_min": (int, float), "parallelism": int, "cpus_per_task": int, "mem_gb": (int, float),
    "setup": list, "additional_parameters": dict, "cluster": str}
#: options only Slurm understands: bad input when submitit would run the jobs locally
SLURM_ONLY = ("partition", "account", "qos", "constraint", "job_name", "cpus_per_task", "mem_gb", "setup",
              "additional_parameters")
#: submitit parameter names of the plain Slurm options
_SLURM_PARAMS = {"partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos",
                 "constraint": "slurm_constraint", "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb",
                 "setup": "slurm_setup", "additional_parameters": "slurm_additional_parameters"}
#: how long a Slurm task may be COMPLETED before its result file shows (shared storage lag)
RESULT_GRACE_S = 30.0


class Executor(Protocol):
    """Runs jobs; yields each job with its outcome as it ends (``on_tick`` while it runs)."""

    name: str
    wave: int

    def prepare(self) -> None:
        """Called by the runner holding the run directory's lock, before it clears ``work/``:
        stop whatever an earlier (killed) runner of this directory left running."""

    def run(self, jobs: list[Job], on_tick: Callable[[Job], None]) -> Iterator[tuple[Job, Outcome]]: ...


class LocalExecutor:
    """Workers on this machine, ``jobs`` at a time: each forked by a warm parent (``warm=None``:
    where ``warm.enabled()``; one parent per slot) or a cold subprocess; with ``isolate=False`` (one
    at a time only) in this process, without limits, for jobs in the main environment (faster,
    for debugging).

    ``jobs > 1``: each worker runs one thread of its own (set ``OMP_NUM_THREADS`` to cores / jobs);
    the engine writes its jobs as coordinated, so every timing section runs alone, the other
    workers stopped meanwhile (``quiet.Coordinator``); a job is started as soon as a slot is free
    (``stream``: the engine hands them out one at a time)."""

    def __init__(self, limits: Limits, isolate: bool = True, warm: bool | None = None, jobs: int = 1) -> None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise UserError(f"invalid jobs {jobs!r}: must be a positive integer")
        if jobs > 1 and not isolate:
            raise UserError("--jobs above 1 needs isolated workers (drop --no-isolate)")
        self.limits, self.isolate, self.jobs = limits, isolate, jobs
        self.warm = warm_workers.enabled() if warm is None else warm
        self.name = ("local" if jobs == 1 else f"local:{jobs}") if isolate else "inline"
        self.wave = jobs

    @property
    def coordinated(self) -> bool:
        """Whether workers must ask before timing (more than one runs at once)."""
        return self.jobs > 1

    def prepare(self) -> None:
        """Nothing to clean up: a local worker dies with the runner that started it."""

    def stream(self, next_job: Callable[[], Job | None], on_tick: Callable[[Job], None]
               ) -> Iterator[tuple[Job, Outcome]]:
        """Run the jobs ``next_job()`` gives (None: none now; asked again when a job ends, since
        the engine requeues the rest of a job that stopped early), ``self.jobs`` at a time."""
        if self.jobs > 1:
            yield from self._run_parallel(next_job, on_tick)
            return
        while (job := next_job()) is not None:
            yield from self.run([job], on_tick)

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

    def _run_parallel(self, next_job: Callable[[], Job | None], on_tick: Callable[[Job], None]
                      ) -> Iterator[tuple[Job, Outcome]]:
        """Up to ``self.jobs`` workers at once, each watched by a thread; the engine's callbacks
        (``on_tick``, taking the next job, handling an outcome) run one at a time under a lock."""
        lock = threading.Lock()
        coordinator = Coordinator()
        workers: dict[str, Any] = {}

        def tick(job: Job) -> None:
            with lock:
                on_tick(job)

        def one(job: Job, slot: int) -> Outcome:
            forked = warm_workers.start(job.python, job.job_file, job.dir, job.log, job.log.parent, slot=slot) \
                if self.warm else None
            job.launched, started = time.time(), time.monotonic()  # a warm parent's start-up is not the job's
            child: Watched = forked if forked is not None else start_cold(job.python, job.job_file, job.dir, job.log)
            workers[job.id] = child
            process = child.process()
            if process is not None:
                coordinator.add(job.dir, process)
            try:
                return watch(child, job.dir, job.log, self.limits, functools.partial(tick, job), started,
                             STARTUP_GRACE_S)
            finally:
                coordinator.remove(job.dir)
                workers.pop(job.id, None)

        pool = concurrent.futures.ThreadPoolExecutor(self.jobs, thread_name_prefix="equibench-worker")
        running: dict[concurrent.futures.Future[Outcome], tuple[Job, int]] = {}
        free = list(range(self.jobs - 1, -1, -1))
        try:
            while True:
                with lock:
                    while free:
                        job = next_job()
                        if job is None:
                            break
                        slot = free.pop()
                        running[pool.submit(one, job, slot)] = (job, slot)
                if not running:
                    return
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    job, slot = running.pop(future)
                    free.append(slot)
                    with lock:
                        yield job, future.result()
        finally:
            for child in list(workers.values()):  # the runner is being interrupted
                child.kill()
            pool.shutdown(wait=True)
            coordinator.close()


def _check_options(options: dict[str, Any]) -> None:
    """``UserError`` (one line) for an unknown option or one of the wrong type or sign."""
    for k, v in options.items():
        if k not in OPTION_TYPES:
            raise UserError(f"unknown submitit option {k!r} (known: {', '.join(sorted(OPTION_TYPES))})")
        if not isinstance(v, OPTION_TYPES[k]) or isinstance(v, bool):
            want = OPTION_TYPES[k]
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise UserError(f"submitit option {k!r} has the wrong type: {v!r} (expected {names})")
        if isinstance(v, (int, float)) and v <= 0:
            raise UserError(f"submitit option {k!r} must be positive, got {v!r}")
        if k == "setup" and isinstance(v, list) and not all(isinstance(line, str) for line in v):
            raise UserError(f"submitit option 'setup' must be a list of shell lines, got {v!r}")
        if k == "cluster" and v not in ("slurm", "local", "debug"):
            raise UserError(f"submitit option 'cluster' must be slurm, local or debug, got {v!r}")


def check_submitit(options: dict[str, Any]) -> None:
    """``UserError`` (one line) for options submitit cannot run with: unknown, mistyped, a Slurm
    option without Slurm (no ``sbatch`` on PATH, or ``cluster`` not slurm), an unknown partition."""
    _check_options(options)
    cluster = options.get("cluster")
    on_slurm = cluster == "slurm" or (cluster is None and slurm.available())
    if cluster == "slurm" and not slurm.available():
        raise UserError("submitit option cluster='slurm' needs Slurm, but sbatch is not on PATH")
    slurm_only = sorted(k for k in options if k in SLURM_ONLY)
    if slurm_only and not on_slurm:
        why = "sbatch is not on PATH" if cluster is None else f"cluster is {cluster!r}"
        raise UserError(f"submitit option(s) {', '.join(slurm_only)} need Slurm, but {why} "
                        "(without Slurm submitit runs the points on this machine)")
    if on_slurm and "partition" in options:
        slurm.check_partition(options["partition"])


def check_executor(executor: str, options: dict[str, Any] | None) -> None:
    """``UserError`` for an executor name or options that cannot run (before anything is written)."""
    if executor == "local":
        if options:
            raise UserError(f"executor 'local' takes no options, got {sorted(options)}")
    elif executor == "submitit":
        check_submitit(options or {})
    else:
        raise UserError(f"unknown executor {executor!r} (known: local, submitit)")


def make_submitit(folder: Path, options: dict[str, Any], timeout: float | None, name: str = "equibench"):
    """A configured ``submitit.AutoExecutor`` (options checked by ``check_submitit``)."""
    check_submitit(options)
    import submitit
    executor = submitit.AutoExecutor(folder=folder, cluster=options.get("cluster"))
    timeout_min = options.get("timeout_min", (timeout / 60.0 + 5) if timeout else 60.0)
    params: dict[str, Any] = {"timeout_min": max(1, math.ceil(timeout_min))}  # submitit wants an int
    if "gpus_per_node" in options:
        params["gpus_per_node"] = options["gpus_per_node"]
    if executor.cluster == "slurm":
        params["slurm_array_parallelism"] = options.get("parallelism", 16)
        params["name"] = options.get("job_name", name)
        # python in the batch step itself, not an srun step: submitit's early time-limit warning
        # (--signal=USR2@90, sent to steps only) then never reaches a task still starting up,
        # where it would kill it (the default action) before any handler is installed
        params["slurm_use_srun"] = False
        params.update({_SLURM_PARAMS[k]: v for k, v in options.items() if k in _SLURM_PARAMS})
    executor.update_parameters(**params)
    return executor


class SubmititExecutor:
    """Waves of jobs as submitit tasks: on Slurm one array job per wave, followed with ``squeue``
    (each job yielded as its task ends); else submitit's local executor (in submission order)."""

    def __init__(self, folder: Path, options: dict[str, Any], limits: Limits, name: str = "equibench") -> None:
        self.folder, self.limits, self.options = folder, limits, options
        self.executor = make_submitit(folder, options, limits.timeout, name)
        self.name = f"submitit:{self.executor.cluster}"
        self.slurm = self.executor.cluster == "slurm"
        self.mem_bytes = int(options["mem_gb"] * 2**30) if "mem_gb" in options else None
        self.wave = min(10_000, slurm.max_array_size()) if self.slurm else max(1, int(options.get("parallelism", 1)))

    def prepare(self) -> None:
        if self.slurm:
            slurm.cancel_leftovers(self.folder)

    def time_limit_min(self, jobs: list[Job]) -> int:
        """The wave's Slurm time limit (minutes): ``timeout_min``, else the longest job's points
        times ``--timeout`` (60 min without one) plus 5 min for start-up."""
        if "timeout_min" in self.options:
            return max(1, math.ceil(self.options["timeout_min"]))
        per_point = self.limits.timeout / 60.0 if self.limits.timeout else 60.0
        return max(1, math.ceil(max(len(j.points) for j in jobs) * per_point + 5))

    def run(self, jobs: list[Job], on_tick: Callable[[Job], None]) -> Iterator[tuple[Job, Outcome]]:
        limits = dataclasses.asdict(self.limits)
        if self.slurm:
            self.executor.update_parameters(timeout_min=self.time_limit_min(jobs))
        try:
            tasks = self.executor.map_array(submitit_job, [j.python for j in jobs], [str(j.job_file) for j in jobs],
                                            [str(j.dir) for j in jobs], [str(j.log) for j in jobs],
                                            [limits] * len(jobs), [self.mem_bytes] * len(jobs))
        except Exception as err:  # sbatch refused the array (a partition's limits, the controller down)
            last = [ln for ln in str(err).strip().splitlines() if ln.strip()]
            raise UserError(f"submitit could not submit {len(jobs)} job(s): {last[-1] if last else err}") from None
        if self.slurm:
            yield from self._follow_slurm(jobs, tasks, on_tick)
            return
        for job, task in zip(jobs, tasks):
            yield job, _result(task)

    def _follow_slurm(self, jobs: list[Job], tasks: list[Any], on_tick: Callable[[Job], None]
                      ) -> Iterator[tuple[Job, Outcome]]:
        """Poll ``squeue`` until every task has ended; harvest running jobs' finished points on
        each poll; yield each job as its task ends. Tasks still queued or running when the runner
        stops (an exception, Ctrl-C, the generator closed) are cancelled."""
        arrays = sorted({t.job_id.split("_")[0] for t in tasks})
        for array_id in arrays:
            slurm.remember(self.folder, array_id)
        for job, task in zip(jobs, tasks):
            array_id, _, index = task.job_id.partition("_")
            job.scheduler = {"slurm_job_id": array_id, "slurm_array_task_id": int(index) if index.isdigit() else None}
        pending = {t.job_id: (job, t) for job, t in zip(jobs, tasks)}
        ended_at: dict[str, float] = {}
        minutes = self.time_limit_min(jobs)
        started, pause, failures = time.monotonic(), 0.5, 0
        try:
            while pending:
                found = slurm.states(arrays)
                failures = 0 if found is not None else failures + 1
                if failures == 10:  # the controller is down or overloaded: keep waiting, say so once
                    print("[equibench] squeue does not answer; still waiting for the Slurm tasks "
                          f"{', '.join(arrays)} (Ctrl-C cancels them)", file=sys.stderr)
                for jid, (job, task) in list(pending.items()):
                    state = None if found is None else found.get(jid)
                    if found is None or state in slurm.ACTIVE:
                        on_tick(job)
                        continue
                    if state in ("COMPLETED", None) and not task.paths.result_pickle.exists():
                        # shared storage may show the result late; a task missing from one answer
                        # may be a controller hiccup: give both a grace before reading the end
                        first = ended_at.setdefault(jid, time.monotonic())
                        if time.monotonic() - first < (RESULT_GRACE_S if state else 3 * pause):
                            continue
                    del pending[jid]
                    yield job, self._slurm_outcome(task, state, minutes)
                if pending:
                    time.sleep(pause)
                    pause = min(5.0, 0.5 + (time.monotonic() - started) / 60.0)
        finally:
            if pending:
                slurm.cancel(pending)
            else:
                slurm.forget(self.folder, arrays)

    def _slurm_outcome(self, task: Any, state: str | None, minutes: int) -> Outcome:
        """The outcome of an ended Slurm task: the worker's (submitit's result file) unless Slurm
        ended it (cancelled, time limit, memory: ``slurm.ending``)."""
        tail = log_tail(task.paths.stderr)
        end = slurm.ending(state, task.job_id, tail, minutes, self.mem_bytes)
        worker = _result(task) if task.paths.result_pickle.exists() else None
        if worker is not None and (end is None or (end[0] == Status.FAILED and state != "CANCELLED")):
            return worker  # the worker's own end (a task that raised: its traceback's last line)
        if end is None:
            return Outcome(None, None, 0, None, 0.0, "", None, reason=f"Slurm array task {task.job_id} ended "
                           f"{state} without a result: {tail or 'no log'}", slurm_state=state)
        status, text = end
        peak = worker.peak_rss if worker is not None else 0
        return Outcome(None, None, peak, status if status != Status.FAILED else None, 0.0, "", None, reason=text,
                       max_memory=self.mem_bytes if status == Status.OUT_OF_MEMORY else None,
                       slurm_state=state or "GONE")


def _result(task: Any) -> Outcome:
    """A finished submitit task's outcome: the worker's, or a failure naming what the task raised."""
    try:
        return Outcome(**task.result())
    except Exception as err:  # raised in the task, killed, or timed out by the scheduler
        last = str(err).strip().splitlines()
        return Outcome(None, None, 0, None, 0.0, f"submitit job {task.job_id}: "
                       f"{last[-1] if last else type(err).__name__}", None)


def make_executor(executor: str, run_dir: Path, limits: Limits, isolate: bool,
                  options: dict[str, Any] | None, jobs: int = 1) -> Executor:
    if executor == "local":
        if options:
            raise UserError(f"executor 'local' takes no options, got {sorted(options)}")
        return LocalExecutor(limits, isolate, jobs=jobs)
    if jobs != 1:
        raise UserError(f"--jobs is for the local executor; {executor}'s tasks at once are its "
                        "'parallelism' option")
    if executor == "submitit":
        return SubmititExecutor(run_dir / "submitit", options or {}, limits, name=f"equibench-{run_dir.name}")
    raise UserError(f"unknown executor {executor!r} (known: local, submitit)")
