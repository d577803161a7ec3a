"""``run_benches``: the one loop that measures the points of every kind of bench into a run directory.

It alone owns, for task runs, scaling sweeps and tensor-product benchmarks alike:

* the run directory: created, locked for the whole run (``lock.py``: a second runner exits with
  one line naming the holder, or waits), ``env.json`` and ``points.json`` (every point's config);
* resume: points whose hash already has a complete block in ``records.jsonl`` are skipped;
* isolation: points run in worker processes (``executors.py``: here children forked by the
  environment's warm parent, ``warm.py``, or cold ``launch.py``/``worker.py`` subprocesses; or
  submitit), one job per point,
  or per run of points sharing a non-empty ``group`` (in order); a job whose worker dies records
  the failure on the point it was on and its remaining points go to a fresh worker;
* environments: points of a method with ``requirements`` run in its cached environment
  (``envs.py``); a failed build is a ``failed`` row for each of its points;
* rows: each point's rows get its ``identity``, ``spec_hash`` and the run-level columns
  (``run_id``, ``git_commit``, ``wall_s``, ``executor``, ``environment`` and the worker
  environment's ``versions``) and go to the store as ONE atomic block as soon as the point ends;
  failures (crash, signal, out of memory, timeout) are rows built the same way;
* cards: before a point's block is appended, the cards of its method and task
  (``results.cards``: ``cards/``) are updated from the live method and task and the point's rows,
  each file replaced atomically; a resumed run describes the recorded points its cards lack;
* storage: a full or unwritable results directory stops the run with ``StorageError``; nothing
  is recorded for a point whose result could not be written, so ``--resume`` runs it again.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..benches.base import Bench, Point, Row
from ..core.envinfo import environment as env_info
from ..core.envinfo import git_commit, load_average, load_record
from ..core.errors import StorageError, UserError
from ..core.registry import get_method, get_task, load_plugin, method_class, method_of, task_class
from ..results.cards import CardStore
from ..results.rows import RunColumns, point_record, status_row
from ..results.status import Status
from ..results.store import RunRecords, storage_errors, write_json_atomic, write_parquet
from .envs import EnvBuildError, Environment, env_key, environment_for
from .executors import Executor, LocalExecutor, make_executor
from .jobs import EXIT_STORAGE, Job, job_id
from .launch import Limits, Outcome, default_max_memory
from .lock import exclusive
from .slurm import interrupted

LOCK_FILE = ".lock"
POINTS_FILE = "points.json"


@dataclass
class Unit:
    """Points that run in order in one worker (a group, or one point), and all hashes of the
    group (whose rows are the history its bench sees)."""

    points: list[Point]
    group_hashes: tuple[str, ...]


def requirements_of(point: Point) -> tuple[str, ...]:
    """The pip requirements declared by the point's method (``()`` when none or no method)."""
    if not point.method:
        return ()
    try:
        cls = method_class(point.method)
    except UserError:
        return ()
    reqs = getattr(cls, "requirements", ()) or ()
    if isinstance(reqs, str) or not all(isinstance(r, str) for r in reqs):
        raise UserError(f"method {point.method!r}: requirements must be a tuple of strings, got {reqs!r}")
    return tuple(sorted(reqs))


def collect_points(benches: Sequence[Bench]) -> list[Point]:
    """Every bench's points (validated by the bench; ``UserError`` on bad input), first of each hash."""
    points: dict[str, Point] = {}
    for bench in benches:
        for p in bench.points():
            points.setdefault(p.hash, p)
    return list(points.values())


def make_units(points: Sequence[Point], pending: set[str]) -> list[Unit]:
    """Jobs to run: each point alone, or the pending points of a group together (at the place
    of its first point), split where the environment changes."""
    groups: dict[str, list[Point]] = {}
    order: list[str] = []
    for p in points:
        key = p.group or f"#{p.hash}"
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(p)
    units = []
    for key in order:
        members = groups[key]
        hashes = tuple(p.hash for p in members)
        run: list[Point] = []
        for p in (m for m in members if m.hash in pending):
            if run and requirements_of(run[-1]) != requirements_of(p):
                units.append(Unit(run, hashes))
                run = []
            run.append(p)
        if run:
            units.append(Unit(run, hashes))
    return units


class Engine:
    """The state of one run: what is recorded, the history per point, environments, progress."""

    def __init__(self, records: RunRecords, executor: Executor, limits: Limits, plugins: list[str],
                 progress: bool, total: int) -> None:
        self.records, self.run_dir = records, records.path
        self.executor, self.limits, self.plugins = executor, limits, plugins
        self.history: dict[str, list[Row]] = {}
        for r in records.rows:
            self.history.setdefault(r["spec_hash"], []).append(r)
        self.recorded: set[str] = set()
        self.envs: dict[tuple[str, ...], Environment | EnvBuildError] = {}
        self.attempts: Counter[str] = Counter()
        self.clock: dict[str, float] = {}
        self.progress, self.total = progress, total
        self.bar: Any = None
        self.cards = CardStore(self.run_dir)

    # ---- cards ------------------------------------------------------------------------
    def describe(self, point: Point, rows: list[Row]) -> None:
        """Update the cards of the method and task of ``point`` (a point that names a registered
        task and method: task and tuning runs) from the live method and task and ``rows``. One this
        process cannot describe is left to the report's fallback (``results.runcards``) with a
        warning, never a failed run."""
        ident = point.identity
        try:
            method_class(str(ident.get("method"))), task_class(str(ident.get("task")))
        except UserError:  # a bench of its own names (scaling, tensor products, a plugin's bench)
            return
        try:
            method = get_method(method_of(str(ident["method"])), **(ident.get("method_options") or {}))
            task = get_task(str(ident["task"]), **(ident.get("task_options") or {}))
            self.cards.add(ident, rows, method, task)
        except StorageError:
            raise
        except Exception as err:  # a plugin's declaration this process cannot read: the rows still count
            warnings.warn(f"{point.label}: no card written ({type(err).__name__}: {err})", stacklevel=2)

    # ---- rows -------------------------------------------------------------------------
    def record(self, point: Point, rows: list[Row], *, wall_s: float, env: Environment | None,
               versions: dict[str, str] | None = None, scheduler: dict[str, Any] | None = None,
               paused_s: float | None = None) -> None:
        """Append ``rows`` of ``point`` as one block, stamped by the one writer
        (``results.rows.point_record``: identity, run-level columns, units, schema version);
        ``scheduler``: the Slurm ids of the task that ran it (``Job.scheduler``)."""
        run = RunColumns(run_id=self.run_dir.name, spec_hash=point.hash, bench=point.bench, git_commit=git_commit(),
                         versions=versions if versions is not None else (env.versions if env is not None else {}),
                         environment=env.id if env is not None else "main", executor=self.executor.name,
                         wall_s=wall_s, paused_s=paused_s, **(scheduler or {}))
        block = point_record(point.identity, rows, run).rows()
        self.describe(point, block)
        out = self.records.append(block)
        self.recorded.add(point.hash)
        self.history.setdefault(point.hash, []).extend(out)
        if self.bar is not None:
            self.bar.update(1)

    def fail(self, point: Point, status: Status, error: str, *, wall_s: float = 0.0, env: Environment | None = None,
             scheduler: dict[str, Any] | None = None, **extra: Any) -> None:
        self.record(point, [status_row(status, error, **extra)], wall_s=wall_s, env=env, scheduler=scheduler)

    def harvest(self, job: Job) -> None:
        """Record every result the job's worker has finished so far, in order."""
        for p in job.points:
            if p.hash in self.recorded:
                continue
            res = job.read_result(p)
            if res is None:
                return
            start = self.clock.get(job.id) or job.launched or res["started"]
            self.clock[job.id] = res["finished"]
            self.record(p, res["rows"], wall_s=res["finished"] - start, env=self._env_of(job),
                        versions=res.get("versions"), scheduler=job.scheduler, paused_s=res.get("paused_s"))

    # ---- jobs -------------------------------------------------------------------------
    def environment(self, point: Point) -> Environment | EnvBuildError:
        reqs = requirements_of(point)
        if reqs not in self.envs:
            try:
                self.envs[reqs] = environment_for(reqs, progress=self.progress)
            except EnvBuildError as err:
                self.envs[reqs] = err
        return self.envs[reqs]

    def _env_of(self, job: Job) -> Environment:
        return Environment(job.environment, job.python, versions=job.versions)

    def make_job(self, unit: Unit, env: Environment) -> Job:
        first = unit.points[0]
        self.attempts[first.hash] += 1
        jid = job_id(first, self.attempts[first.hash])
        job = Job(id=jid, dir=self.run_dir / "work" / jid, log=self.run_dir / "logs" / f"{jid}.log",
                  points=list(unit.points), python=env.python, environment=env.id, versions=env.versions)
        shutil.rmtree(job.dir, ignore_errors=True)  # never harvest a stale result or marker
        history = [r for h in unit.group_hashes for r in self.history.get(h, [])]
        job.write(self.plugins, history, self.limits.max_memory,
                  coordinated=bool(getattr(self.executor, "coordinated", False)))
        return job

    def settle(self, job: Job, outcome: Outcome) -> list[Point]:
        """Record the failure of the point the worker stopped at; the points still to run."""
        left = [p for p in job.points if p.hash not in self.recorded]
        if outcome.returncode == EXIT_STORAGE:
            raise StorageError(f"cannot write results in {job.dir}: disk full, over quota or not writable; "
                               "finished results are kept, make room and rerun with --resume")
        if not left:
            return []
        point, env = left[0], self._env_of(job)
        start = self.clock.get(job.id) or job.launched or time.time()
        extra: dict[str, Any] = {"exit_code": outcome.returncode, "exit_signal": outcome.signal,
                                 "peak_rss_bytes": outcome.peak_rss}
        if outcome.killed_for == Status.OUT_OF_MEMORY:
            extra["max_memory_bytes"] = outcome.max_memory or self.limits.max_memory
        if outcome.slurm_state:
            extra["slurm_state"] = outcome.slurm_state
        if outcome.returncode == 0 and outcome.killed_for is None:
            error = "worker ended without a result" + (f": {outcome.log_tail}" if outcome.log_tail else "")
        else:
            error = outcome.describe(self.limits)
        self.fail(point, outcome.killed_for or Status.FAILED, error, wall_s=time.time() - start, env=env,
                  scheduler=job.scheduler, **extra)
        return left[1:]

    def run(self, units: list[Unit]) -> None:
        for unit in units:  # builds first: their output never interleaves with the progress bar
            self.environment(unit.points[0])
        if self.progress:
            self.bar = _bar(self.total)
        queue = deque(units)
        units_of: dict[str, Unit] = {}
        if isinstance(self.executor, LocalExecutor):  # fed one job at a time, as slots free up
            for job, outcome in self.executor.stream(lambda: self._next_job(queue, units_of), self.harvest):
                self._finish(job, outcome, queue, units_of)
            return
        while queue:
            wave: list[Job] = []
            while len(wave) < self.executor.wave and (nxt := self._next_job(queue, units_of)) is not None:
                wave.append(nxt)
            if not wave:
                break
            requeue: deque[Unit] = deque()
            for job, outcome in self.executor.run(wave, self.harvest):
                self._finish(job, outcome, requeue, units_of)
            queue.extendleft(requeue)

    def _next_job(self, queue: deque[Unit], units_of: dict[str, Unit]) -> Job | None:
        """The next unit of ``queue`` as a job (None when the queue is empty; a unit whose
        environment cannot be built fails here and the next one is taken)."""
        while queue:
            job = self._job_for(queue.popleft(), units_of)
            if job is not None:
                return job
        return None

    def _job_for(self, unit: Unit, units_of: dict[str, Unit]) -> Job | None:
        env = self.environment(unit.points[0])
        if isinstance(env, EnvBuildError):
            reqs = requirements_of(unit.points[0])
            where = Environment(env_key(reqs), "", reqs)
            for p in unit.points:
                self.fail(p, Status.FAILED, f"environment for {' '.join(reqs)} could not be built: {env}", env=where)
            return None
        job = self.make_job(unit, env)
        units_of[job.id] = unit
        if self.bar is not None:
            self.bar.set_postfix_str(unit.points[0].label)
        return job

    def _finish(self, job: Job, outcome: Outcome, requeue: deque[Unit], units_of: dict[str, Unit]) -> None:
        """Record what ``job`` finished; its points still to run go to the front of ``requeue``."""
        self.harvest(job)
        rest = self.settle(job, outcome)
        if rest:
            requeue.appendleft(Unit(rest, units_of[job.id].group_hashes))
        shutil.rmtree(job.dir, ignore_errors=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _bar(total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="equibench", unit="point", file=sys.stderr)


def write_points(run_dir: Path, points: Sequence[Point]) -> None:
    """``points.json``: every point ever asked of this run directory (by hash), with its config."""
    path = run_dir / POINTS_FILE
    try:
        known = {p["hash"]: p for p in json.loads(path.read_text())["points"]}
    except (OSError, ValueError, KeyError, TypeError):
        known = {}
    known.update({p.hash: p.to_dict() for p in points})
    write_json_atomic(path, {"points": list(known.values())})


def _record_load(run_dir: Path, before: list[float] | None) -> None:
    """Append this invocation's load averages (before, after) to ``env.json["load"]`` (the report
    says when the machine was loaded); never fails a run."""
    path = run_dir / "env.json"
    with contextlib.suppress(OSError, ValueError, TypeError):
        env = json.loads(path.read_text())
        env["load"] = [*env.get("load", []), load_record(before, load_average())]
        write_json_atomic(path, env)


def run_benches(benches: Sequence[Bench], run_dir: str | os.PathLike, *, executor: str = "local",
                isolate: bool = True, timeout: float | None = None, max_memory: int | str | None = None,
                wait: bool = False, plugins: Sequence[str | os.PathLike] = (), progress: bool = True,
                executor_options: dict[str, Any] | None = None, records: RunRecords | None = None,
                jobs: int = 1) -> Path:
    """Measure every point of ``benches`` not already finished in ``run_dir``; returns ``run_dir``.

    ``timeout`` (seconds) and ``max_memory`` (bytes or "4G"; default 75 % of RAM) limit each
    point; ``wait`` waits for another runner holding ``run_dir`` instead of failing. Raises
    ``UserError`` for bad input (nothing written) and ``StorageError`` when the disk refuses.
    ``records``: the run directory's records as the caller has read them (``RunRecords``; read
    here, only what is new, and kept up to date with what this run appends), so an invocation
    that runs several waves into one directory reads ``records.jsonl`` once. ``jobs``: workers at
    once (local executor only; their timings run alone, ``engine/quiet.py``; the default memory
    limit is then shared among them).
    """
    plugin_paths = [str(Path(p).resolve()) for p in plugins]
    for plugin in plugin_paths:
        load_plugin(plugin)
    points = collect_points(benches)
    for point in points:
        requirements_of(point)  # a malformed declaration is bad input: fail before writing anything
    if max_memory is None and isinstance(jobs, int) and not isinstance(jobs, bool) and jobs > 1:
        max_memory = default_max_memory() // jobs
    limits = Limits.make(max_memory, timeout)
    run_dir = Path(run_dir)
    ex = make_executor(executor, run_dir, limits, isolate, executor_options, jobs)
    with storage_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(run_dir / LOCK_FILE, f"run directory {run_dir}", wait=wait):
        ex.prepare()  # a killed runner's Slurm tasks: cancelled and gone before work/ is cleared
        shutil.rmtree(run_dir / "work", ignore_errors=True)  # left by a killed runner (we hold the lock)
        if not (run_dir / "env.json").exists():
            write_json_atomic(run_dir / "env.json", env_info())
        write_points(run_dir, points)
        records = (records if records is not None and records.path == run_dir else RunRecords(run_dir)).refresh()
        done = {r["spec_hash"] for r in records.rows} - interrupted(records.rows)  # cancelled on Slurm: again
        pending = {p.hash for p in points} - done
        engine = Engine(records, ex, limits, plugin_paths, progress, len(pending))
        for p in points:  # recorded before this invocation (or before cards): describe them once
            if p.hash in done and not engine.cards.has(p.identity):
                engine.describe(p, engine.history.get(p.hash, []))
        load_before = load_average()
        try:
            engine.run(make_units(points, pending))
        finally:
            engine.close()
            _record_load(run_dir, load_before)
        with contextlib.suppress(OSError):
            (run_dir / "work").rmdir()  # only when empty: a failed clean-up stays for inspection
        write_parquet(run_dir, records.rows)
    return run_dir
