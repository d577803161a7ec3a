"""``eb.run``: resolve a suite (or a list of ``RunSpec``) into benches and run them.

Everything about running — run directory, lock, resume, workers, limits, environments, failed
rows, the store — is ``engine.run_benches``; this module only turns the user's request into
benches (``suites.suite_benches``: the task runs plus the suite's ``scaling``/``tp_bench``
sections) and a run directory name, and returns the run's rows as a DataFrame.
"""
from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..benches.base import Bench
from ..benches.taskrun import TaskBench
from ..benches.tuning import select_settings
from ..core.errors import UserError
from ..core.registry import load_plugin
from ..core.spec import RunSpec
from . import suites
from .engine import run_benches
from .store import load_results, read_records, storage_errors, write_json_atomic
from .tuned import Selection

Suite = str | os.PathLike | Sequence[RunSpec]
SUITE_FILE = "suite.json"


def resolve_benches(suite_or_runspecs: Suite, tasks: list[str] | None = None, methods: list[str] | None = None,
                    seeds: list[int] | None = None, device: str | None = None,
                    extras: bool | None = None) -> tuple[str, list[Bench]]:
    """(suite name, benches) from a suite name, a suite file path or a non-empty list of
    ``RunSpec`` (name "custom", one ``TaskBench``)."""
    if isinstance(suite_or_runspecs, (str, os.PathLike)):
        suite = suites.read_suite(Path(suite_or_runspecs) if isinstance(suite_or_runspecs, os.PathLike)
                                  else suite_or_runspecs)
        return suite.name, suites.suite_benches(suite, tasks=tasks, methods=methods, seeds=seeds, device=device,
                                                extras=extras)
    specs = list(suite_or_runspecs)
    if not specs or not all(isinstance(s, RunSpec) for s in specs):
        raise UserError("run() takes a suite name, a suite file or a non-empty list of RunSpec")
    return "custom", [TaskBench(specs)]


def run_dir_for(results_dir: str | os.PathLike, name: str, run_name: str | None, resume: bool) -> Path:
    """``results_dir/run_name``; without a name, the latest ``<name>-*`` run when resuming, else a
    new ``<name>-<timestamp>``."""
    root = Path(results_dir)
    if run_name is None:
        previous = sorted(p for p in root.glob(f"{name}-*") if p.is_dir()) if resume and root.exists() else []
        run_name = previous[-1].name if previous else f"{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return root / run_name


def run(suite_or_runspecs: Suite, results_dir: str | os.PathLike = "results", executor: str = "local", *,
        run_name: str | None = None, resume: bool = False, isolate: bool = True, timeout: float | None = None,
        max_memory: int | str | None = None, wait: bool = False, plugins: Sequence[str | os.PathLike] = (),
        tasks: list[str] | None = None, methods: list[str] | None = None, seeds: list[int] | None = None,
        device: str | None = None, progress: bool = True, executor_options: dict[str, Any] | None = None,
        extras: bool | None = None) -> pd.DataFrame:
    """Run every point not already finished in ``results_dir/<run_name>``; returns the run's rows
    as a DataFrame (``load_results``).

    ``executor`` is "local" (worker subprocesses here) or "submitit"; ``timeout`` (s) and
    ``max_memory`` (bytes or "4G"; default 75 % of RAM) limit each point; ``wait`` waits for
    another runner of the same run directory. The suite's ``scaling``/``tp_bench`` sections run
    when ``extras`` is True, or when it is None and neither ``tasks`` nor ``methods`` narrows the
    suite. ``isolate=False`` runs main-environment points in this process (no limits; debugging).
    """
    for p in plugins:
        load_plugin(p)
    options: dict[str, Any] = {"executor": executor, "isolate": isolate, "timeout": timeout,
                               "max_memory": max_memory, "wait": wait, "plugins": plugins, "progress": progress,
                               "executor_options": executor_options}
    if isinstance(suite_or_runspecs, (str, os.PathLike)):
        suite = suites.read_suite(suite_or_runspecs)
        cfg = suites.tuning_config(suite)
        if cfg is not None and cfg.use == "run":  # tune first, in the same run directory, then measure
            run_dir = run_dir_for(results_dir, suite.name, run_name, resume)
            selection = tune(suite, run_dir, tasks=tasks, methods=methods, device=device, **options)
            benches = suites.suite_benches(suite, tasks=tasks, methods=methods, seeds=seeds, device=device,
                                           extras=extras, selection=selection,
                                           selection_source=f"tuned in this run ({run_dir.name})")
            run_benches(benches, run_dir, **options)
            write_suite_file(run_dir, suite)
            return load_results(run_dir)
    name, benches = resolve_benches(suite_or_runspecs, tasks, methods, seeds, device, extras)
    run_dir = run_dir_for(results_dir, name, run_name, resume)
    run_benches(benches, run_dir, **options)
    if isinstance(suite_or_runspecs, (str, os.PathLike)):
        write_suite_file(run_dir, suites.read_suite(suite_or_runspecs))
    return load_results(run_dir)


def write_suite_file(run_dir: Path, suite: suites.SuiteFile) -> None:
    """``suite.json``: the suite the run measured (name, description, published figures, ...),
    for the report."""
    with storage_errors(run_dir):
        write_json_atomic(run_dir / SUITE_FILE, {"source": suite.source, **suite.to_dict()})


def tune(suite: suites.SuiteFile, run_dir: Path, *, tasks: list[str] | None = None,
         methods: list[str] | None = None, device: str | None = None, **options: Any) -> Selection:
    """Run ``suite``'s tuning grid into ``run_dir`` and return the chosen setting per (task,
    method) (``benches.tuning.select_settings``). Raises ``UserError`` without a ``tuning:``
    section."""
    bench = suites.tuning_bench(suite, tasks, methods, device)
    cfg = suites.tuning_config(suite)
    if bench is None or cfg is None:
        raise UserError(f"suite {suite.name!r} has no 'tuning:' section to run")
    run_benches([bench], run_dir, **options)
    rows = read_records(run_dir)
    selection = select_settings(rows, sorted(cfg.grid))
    if not selection:
        failed = [r for r in rows if r.get("status") not in ("ok", "not_applicable")]
        first = (f": {failed[0]['task']}/{failed[0]['method']}: {str(failed[0].get('error', ''))[:300]}"
                 if failed else "")
        raise UserError(f"no tuning run in {run_dir} finished with a validation value "
                        f"({len(failed)} failed){first}")
    return selection
