"""``eb.run``: resolve a suite (or a list of ``RunSpec``) into benches and run them.

Everything about running — run directory, lock, resume, workers, limits, environments, failed
rows, the store — is ``engine.run_benches``; this module only turns the user's request into
benches (``suites.suite_benches``: the task runs plus the suite's ``scaling``/``tp_bench``
sections) and a run directory name, and returns what the run wrote: the handle ``RunRecords``
(``run_suite``) or the run's rows as a DataFrame (``run``). The suite file is parsed once and
``records.jsonl`` read once per invocation.

A run directory belongs to one invocation: naming an existing one is refused unless the caller
says ``resume`` (finish it) or ``append`` (add points to it), so two runs never merge silently.
Before anything runs, the resolved configuration of every (task, method) (each option's value
and where it came from, ``suites.resolved_configs``, plus the parameter count where it is cheap
to get) is written to ``resolved.json`` in the run directory and, with ``announce``, printed.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..benches.base import Bench
from ..benches.taskrun import TaskBench
from ..benches.tuning import TuneBench
from ..core.errors import UserError
from ..core.registry import get_method, get_task, load_plugin, method_class
from ..core.spec import RunSpec
from ..methods.base import count_parameters
from ..plan import suites
from ..plan.tuned import Selection, extension_settings, select_settings
from ..results.status import FAILURES
from ..results.store import RECORDS, RunRecords, check_writable, storage_errors, write_json_atomic
from .engine import run_benches
from .executors import check_executor

Suite = str | os.PathLike | Sequence[RunSpec]
SUITE_FILE = "suite.json"
#: the resolved configuration of a run's task points (``suites.resolved_configs`` + ``params``)
RESOLVED_FILE = "resolved.json"
#: seconds spent building built-in models to count their parameters before a run
PARAM_COUNT_BUDGET_S = 10.0


def resolve_benches(suite_or_runspecs: Suite | suites.SuiteFile, tasks: list[str] | None = None,
                    methods: list[str] | None = None,
                    seeds: list[int] | None = None, device: str | None = None,
                    extras: bool | None = None, task_options: dict[str, dict[str, Any]] | None = None,
                    method_options: dict[str, dict[str, Any]] | None = None
                    ) -> tuple[str, list[Bench], list[dict[str, Any]]]:
    """(suite name, benches, resolved configuration) from a suite name, a suite file path, a
    parsed suite or a non-empty list of ``RunSpec`` (name "custom", one ``TaskBench``; its
    options' source is "RunSpec")."""
    if isinstance(suite_or_runspecs, (str, os.PathLike, suites.SuiteFile)):
        suite = (suite_or_runspecs if isinstance(suite_or_runspecs, suites.SuiteFile)
                 else suites.read_suite(Path(suite_or_runspecs) if isinstance(suite_or_runspecs, os.PathLike)
                                        else suite_or_runspecs))
        benches, resolved = suites.plan(suite, tasks=tasks, methods=methods, seeds=seeds, device=device,
                                        extras=extras, task_options=task_options, method_options=method_options)
        return suite.name, benches, resolved
    specs = list(suite_or_runspecs)
    if not specs or not all(isinstance(s, RunSpec) for s in specs):
        raise UserError("run() takes a suite name, a suite file or a non-empty list of RunSpec")
    if task_options or method_options:
        raise UserError("task_options / method_options apply to suites; set them in the RunSpec")
    given = [(s, {part: {k: "RunSpec" for k in getattr(s, part)} for part in
                  ("task_options", "method_options", "train", "evaluate")}) for s in specs]
    return "custom", [TaskBench(specs)], suites.resolved_configs(None, given)


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` already holds a run (recorded points or their configs)."""
    return path.is_dir() and any((path / f).exists() for f in (RECORDS, "points.json", RESOLVED_FILE))


def run_dir_for(results_dir: str | os.PathLike, name: str, run_name: str | None, resume: bool,
                append: bool = False) -> Path:
    """``results_dir/run_name``; without a name, the latest ``<name>-*`` run when resuming, else a
    new ``<name>-<timestamp>`` (never an existing one). A named run that exists is refused
    (``UserError``) unless ``resume`` (finish it) or ``append`` (add points to it); a results
    directory that cannot take results is refused (``StorageError``) before anything runs."""
    root = Path(results_dir)
    if run_name is None:
        previous = sorted(p for p in root.glob(f"{name}-*") if p.is_dir()) if resume and root.exists() else []
        if previous:
            return previous[-1]
        run_name = f"{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        base, n = run_name, 1
        while (root / run_name).exists():  # two runs in one second: never share a directory
            n += 1
            run_name = f"{base}-{n}"
    run_dir = root / run_name
    check_writable(run_dir)
    if is_run_dir(run_dir) and not (resume or append):
        raise UserError(f"run directory {run_dir} already holds a run; pass --resume to finish it, --append to "
                        "add points to it, or choose another --name")
    return run_dir


def run_suite(suite_or_runspecs: Suite, results_dir: str | os.PathLike = "results", executor: str = "local", *,
              run_name: str | None = None, resume: bool = False, append: bool = False, isolate: bool = True,
              timeout: float | None = None, max_memory: int | str | None = None, wait: bool = False,
              plugins: Sequence[str | os.PathLike] = (), tasks: list[str] | None = None,
              methods: list[str] | None = None, seeds: list[int] | None = None, device: str | None = None,
              progress: bool = True, executor_options: dict[str, Any] | None = None, extras: bool | None = None,
              task_options: dict[str, dict[str, Any]] | None = None,
              method_options: dict[str, dict[str, Any]] | None = None, announce: bool = False,
              jobs: int = 1) -> RunRecords:
    """``run`` returning the handle to what the run wrote (``RunRecords``: its directory, rows,
    DataFrame, point outcomes), with the suite file parsed once, plugins loaded once and
    ``records.jsonl`` read once (only what earlier invocations wrote; this run's rows are kept as
    they are appended). Options as ``run``."""
    for p in plugins:
        load_plugin(p)
    options: dict[str, Any] = dict(executor=executor, isolate=isolate, timeout=timeout, max_memory=max_memory,
                                   wait=wait, plugins=plugins, progress=progress, executor_options=executor_options,
                                   jobs=jobs)
    check_executor(executor, executor_options)  # bad executor options: nothing written
    overrides: dict[str, Any] = {"task_options": task_options, "method_options": method_options}
    suite = suites.read_suite(suite_or_runspecs) if isinstance(suite_or_runspecs, (str, os.PathLike)) else None
    cfg = suites.tuning_config(suite) if suite is not None else None
    if suite is not None and cfg is not None and cfg.use == "run":  # tune first, in the same run directory
        suites.plan(suite, tasks=tasks, methods=methods, seeds=seeds, device=device, **overrides)  # validate
        run_dir = run_dir_for(results_dir, suite.name, run_name, resume, append)
        records = RunRecords(run_dir)
        selection = tune(suite, run_dir, tasks=tasks, methods=methods, device=device, records=records,
                         **overrides, **options)
        benches, resolved = suites.plan(suite, tasks=tasks, methods=methods, seeds=seeds, device=device,
                                        extras=extras, selection=selection,
                                        selection_source=f"tuned in this run ({run_dir.name})", **overrides)
    else:
        name, benches, resolved = resolve_benches(suite if suite is not None else suite_or_runspecs, tasks, methods,
                                                  seeds, device, extras, **overrides)
        run_dir = run_dir_for(results_dir, name, run_name, resume, append)
        records = RunRecords(run_dir)
    record_resolved(run_dir, resolved, announce, append)
    run_benches(benches, run_dir, records=records, **options)
    if suite is not None:
        write_suite_file(run_dir, suite)
    return records


def run(suite_or_runspecs: Suite, results_dir: str | os.PathLike = "results", executor: str = "local",
        **options: Any) -> pd.DataFrame:
    """Run every point not already finished in ``results_dir/<run_name>``; returns the run's rows
    as a DataFrame (as ``load_results`` gives them; ``df.attrs["run_dir"]`` names the directory;
    ``run_suite`` returns the handle ``RunRecords`` instead).

    Options (keywords): ``run_name``, ``resume``, ``append``, ``isolate``, ``timeout``,
    ``max_memory``, ``wait``, ``plugins``, ``tasks``, ``methods``, ``seeds``, ``device``,
    ``progress``, ``executor_options``, ``extras``, ``task_options``, ``method_options``,
    ``announce``, ``jobs`` (workers at once on this machine; timings then run alone).
    ``executor`` is "local" (worker subprocesses here) or "submitit"; ``timeout``
    (s) and ``max_memory`` (bytes or "4G"; default 75 % of RAM) limit each point; ``wait`` waits
    for another runner of the same run directory. The suite's ``scaling``/``tp_bench`` sections
    run when ``extras`` is True, or when it is None and neither ``tasks`` nor ``methods`` narrows
    the suite. ``isolate=False`` runs main-environment points in this process (no limits;
    debugging). An existing ``run_name`` needs ``resume`` or ``append`` (``run_dir_for``).
    ``task_options`` / ``method_options`` (task or method -> options) override the suite's,
    validated like it. ``announce`` prints the resolved configuration (with parameter counts)
    before running; it is written to ``resolved.json`` either way.
    """
    records = run_suite(suite_or_runspecs, results_dir, executor, **options)
    df = records.frame()
    df.attrs["run_dir"] = str(records.path)
    return df


def count_params(resolved: list[dict[str, Any]], budget_s: float = PARAM_COUNT_BUDGET_S) -> None:
    """Fill each entry's ``params`` by building its model on the CPU (seed: its first), for
    built-in methods without extra requirements, until ``budget_s`` seconds are spent; the others
    keep ``None`` ("at build": the run's ``params`` row has it). A plugin's build may hang, exit
    or need its own environment, so it is never built here."""
    start = time.perf_counter()
    for entry in resolved:
        cls = method_class(entry["method"])
        if (not cls.__module__.startswith("equibench.") or getattr(cls, "requirements", None)
                or time.perf_counter() - start > budget_s):
            continue
        t_opts = {k: v["value"] for k, v in entry["task_options"].items() if v["source"] != suites.DEFAULT}
        m_opts = {k: v["value"] for k, v in entry["method_options"].items() if v["source"] != suites.DEFAULT}
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(entry["seeds"][0])
                model = get_method(entry["method"], **m_opts).build(get_task(entry["task"], **t_opts).spec,
                                                                     entry["seeds"][0])
            entry["params"] = count_parameters(model)
        except Exception:  # the run records why it fails; counting is only a preview
            continue


def _fmt(options: dict[str, dict[str, Any]], keep: set[str] | None = None) -> str:
    """``a=1, b=2 (suite file); c=3 (default)``: values grouped by where they came from
    (defaults last); with ``keep``, defaults are shown only for those keys."""
    groups: dict[str, list[str]] = {}
    for k, v in options.items():
        if v["source"] == suites.DEFAULT and keep is not None and (k not in keep or v["value"] is None):
            continue
        groups.setdefault(v["source"], []).append(f"{k}={v['value']}")
    order = sorted(groups, key=lambda src: src == suites.DEFAULT)
    return "; ".join(f"{', '.join(groups[src])} ({src})" for src in order) or "defaults"


#: train settings always shown (the budget); the others only when set
BUDGET_KEYS = {"budget", "steps", "epochs", "max_seconds", "max_flops", "batch_size", "lr"}
#: under ``budget: converge`` the step budget is the cap ``max_steps``; ``steps`` / ``epochs`` do not apply
CONVERGE_KEYS = (BUDGET_KEYS - {"steps", "epochs"}) | {"max_steps", "val_every", "patience"}


def budget_keys(train: dict[str, dict[str, Any]]) -> set[str]:
    """The train settings ``format_resolved`` always shows for this budget kind."""
    return CONVERGE_KEYS if train.get("budget", {}).get("value") == "converge" else BUDGET_KEYS


def format_resolved(resolved: list[dict[str, Any]], path: Path | None = None) -> str:
    """The resolved configuration as printed before a run: per task its options (sizes), train
    budget and evaluate settings; per (task, method) its options, seeds and parameter count; each
    value with where it came from; notes for tasks and methods the suite does not configure."""
    lines = [f"resolved configuration{f' (saved in {path})' if path else ''}:"]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for e in resolved:
        by_task.setdefault(json.dumps([e["task"], e["task_options"], e["train"], e["evaluate"]], sort_keys=True),
                           []).append(e)
    for group in by_task.values():
        e0 = group[0]
        lines.append(f"  task {e0['task']}: {_fmt(e0['task_options'])}")
        lines.append(f"    train: {_fmt(e0['train'], budget_keys(e0['train']))}")
        lines.append(f"    evaluate: {_fmt(e0['evaluate'], set())}")
        for note in dict.fromkeys(n for e in group for n in e["notes"] if n.startswith("task ")):
            lines.append(f"    note: {note}")
        width = max(len(e["method"]) for e in group)
        for e in group:
            params = f"{e['params']:,}".replace(",", " ") if e["params"] is not None else "at build"
            seeds = ",".join(map(str, e["seeds"]))
            lines.append(f"    {e['method']:{width}s}  params {params}; seeds {seeds}; {e['device']}; "
                         f"{_fmt(e['method_options'])}")
            if e.get("setting_source"):
                lines.append(f"    {'':{width}s}  settings: {e['setting_source']}")
            lines += [f"    {'':{width}s}  note: {n}" for n in e["notes"] if not n.startswith("task ")]
    return "\n".join(lines)


def record_resolved(run_dir: Path, resolved: list[dict[str, Any]], announce: bool, append: bool = False) -> None:
    """Write ``resolved.json`` (``{"entries": [...]}``; an ``append`` keeps the entries of earlier
    invocations for other configurations) and, with ``announce``, print it (``format_resolved``)."""
    if not resolved:
        return
    if announce:
        count_params(resolved)
    path = run_dir / RESOLVED_FILE
    entries = resolved
    if append and path.is_file():
        try:
            old = json.loads(path.read_text()).get("entries", [])
        except (OSError, ValueError, AttributeError):
            old = []
        ident = lambda e: json.dumps({k: v for k, v in e.items() if k not in ("seeds", "params")},  # noqa: E731
                                     sort_keys=True)
        new = {ident(e) for e in resolved}
        entries = [e for e in old if ident(e) not in new] + resolved
    with storage_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"entries": entries})
    if announce:
        print(format_resolved(resolved, path), flush=True)


def write_suite_file(run_dir: Path, suite: suites.SuiteFile) -> None:
    """``suite.json``: the suite the run measured (name, description, published figures, ...),
    for the report."""
    with storage_errors(run_dir):
        write_json_atomic(run_dir / SUITE_FILE, {"source": suite.source, **suite.to_dict()})


def tune(suite: suites.SuiteFile, run_dir: Path, *, tasks: list[str] | None = None,
         methods: list[str] | None = None, device: str | None = None,
         task_options: dict[str, dict[str, Any]] | None = None,
         method_options: dict[str, dict[str, Any]] | None = None, records: RunRecords | None = None,
         **options: Any) -> Selection:
    """Run ``suite``'s tuning grid into ``run_dir`` and return the chosen setting per (task,
    method) (``plan.tuned.select_settings``). Raises ``UserError`` without a ``tuning:``
    section. ``records``: the run directory's records handle to share with the caller (kept up
    to date; a new one when None).

    In waves through the engine: the grid, then up to ``tuning.max_extensions`` waves of the
    values beyond the edge where a (task, method)'s best mean sits (``extension_settings``), each
    wave decided from the rows of the previous ones (a resumed run repeats the same decisions)."""
    bench = suites.tuning_bench(suite, tasks, methods, device, task_options, method_options)
    cfg = suites.tuning_config(suite)
    if bench is None or cfg is None:
        raise UserError(f"suite {suite.name!r} has no 'tuning:' section to run")
    records = records if records is not None else RunRecords(run_dir)
    run_benches([bench], run_dir, records=records, **options)
    for _ in range(cfg.max_extensions):
        extra = extension_settings(select_settings(records.rows, sorted(cfg.grid), cfg), cfg)
        if not extra:
            break
        run_benches([TuneBench(bench.specs, cfg, settings_for=extra)], run_dir, records=records, **options)
    rows = records.rows
    selection = select_settings(rows, sorted(cfg.grid), cfg)
    if not selection:
        failed = [r for r in rows if r.get("status") in FAILURES]
        first = (f": {failed[0]['task']}/{failed[0]['method']}: {str(failed[0].get('error', ''))[:300]}"
                 if failed else "")
        raise UserError(f"no tuning run in {run_dir} finished with a validation value "
                        f"({len(failed)} failed){first}")
    return selection
