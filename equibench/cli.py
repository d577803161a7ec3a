"""The ``equibench`` command line.

    equibench list                      methods, tasks and suites
    equibench run SUITE [options]       run a suite (name or YAML path), then write its report
    equibench report RUN... [--out DIR] write a report for one or more run directories
    equibench compare RUN_A RUN_B       side-by-side table and plot of two runs
    equibench tune SUITE                run the suite's tuning grid, store the chosen settings
    equibench nightly [SUITE]           run, append to the history, report trends, flag regressions
                                        (exit code 1 when a regression is flagged)
    equibench scale / tpbench           cost-vs-size sweeps / tensor-product microbenchmarks

run, nightly, scale and tpbench run every point in a worker process limited by --timeout and
--max-memory; a second runner on the same run directory stops (or waits with --wait).

A run directory belongs to one invocation: an existing ``--name`` needs ``--resume`` (finish it)
or ``--append`` (add points to it). Before running, run and nightly print the resolved
configuration of every (task, method) (options, budget, parameter count, where each value came
from; also ``resolved.json`` in the run directory); ``--task-option``/``--method-option`` set
options over the suite's.

Exit codes: 0 every point finished; 1 (nightly) a regression was flagged; 2 bad input (unknown
name, malformed suite file, wrong option type, negative seed, an existing run name, a run
directory in use: one line on stderr); 3 the results directory cannot be written (a file in the
way, no permission, disk full: one line); 4 some point ended ``failed``, ``timeout`` or
``out_of_memory`` (``--allow-failures``: 0). 4 takes precedence over 1. The last line of run,
nightly, tune, scale and tpbench counts the points by outcome. Results already written are never
touched.
"""
from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import pandas as pd
import yaml

from .benches.scaling import ScaleConfig, ScalingBench, exponents
from .benches.taskrun import TaskBench
from .benches.tp_bench import TPBench, TPBenchConfig
from .core.config import config_from_dict
from .core.errors import StorageError, UserError
from .core.registry import (
    get_task,
    list_methods,
    list_tasks,
    load_plugin,
    method_class,
    options_model,
    task_class,
    unavailable_modules,
)
from .core.spec import TaskSpec
from .engine.engine import run_benches
from .engine.launch import parse_size
from .engine.runner import run_dir_for, run_suite, tune
from .methods.base import scope_summary
from .plan.suites import EXTRA_SECTIONS, list_suites, read_suite, tuning_config
from .plan.tuned import tuned_path, write_tuned
from .report.build import write_comparison, write_report
from .report.compare import compare_dirs, display_table
from .report.history import append_history, find_regressions
from .report.sections import write_sections_report
from .results.status import FAILURES, Status
from .results.store import RunRecords, load_results, point_statuses


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage + message)
        raise UserError(f"{self.prog}: {message}")


def _csv(kind: type = str):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from None
    return parse


_NOT_AN_END = re.compile(r"(?:\be\.g|\bi\.e|\bcf|\bvs|\bapprox|\bet al|\bEq|\bFig|\bresp)\.$", re.IGNORECASE)


def first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph (joined across its lines; a period
    after "e.g", "i.e", "vs" ... does not end it); the whole paragraph when it has no full stop."""
    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    for m in re.finditer(r"[.!?](?=\s|$)", para):
        if not _NOT_AN_END.search(para[:m.end()]):
            return para[:m.end()]
    return para


def summary(cls: type) -> str:
    """What ``equibench list`` says a method or task is: the first sentence of the class's own
    docstring; for a class without one (or one that only lists options), the first sentence of
    its module's docstring without the leading ````name``:`` label."""
    own = cls.__dict__.get("__doc__")
    text = first_sentence(own)
    if text and not text.lower().startswith("options"):
        return text
    module = sys.modules.get(cls.__module__)
    text = re.sub(r"^``[^`]+``:\s*", "", first_sentence(getattr(module, "__doc__", None)))
    return (text[:1].upper() + text[1:]) if text else "(no docstring)"


def _option_defaults(cls: type) -> str:
    fields = options_model(cls).model_fields
    return ", ".join(f"{k}={'(required)' if f.is_required() else repr(f.default)}" for k, f in fields.items())


def _task_specs() -> dict[str, TaskSpec | Exception]:
    specs: dict[str, TaskSpec | Exception] = {}
    for name in list_tasks():
        try:
            specs[name] = get_task(name).spec
        except Exception as err:  # a task whose data package is missing still lists
            specs[name] = err
    return specs


def _supported(cls: type, specs: dict[str, TaskSpec | Exception]) -> list[str]:
    """The tasks a method (with its default options) runs on (``Method.supports``)."""
    try:
        method = cls()
    except Exception:  # a method that needs options to be built: ask the class's defaults nothing
        return []
    out = []
    for name, spec in specs.items():
        if isinstance(spec, Exception):
            continue
        try:
            if method.supports(spec) is None:
                out.append(name)
        except Exception:  # noqa: S112 - a buggy supports() of a plugin must not break the listing
            continue
    return out


def _implementation(cls: type) -> str:
    origin = getattr(cls, "origin", "equibench")
    if origin == "equibench":
        return ""
    pair = getattr(cls, "counterpart", None)
    return f" [library: {origin}" + (f"; our counterpart: {pair}]" if pair else "; no counterpart declared]")


def _describe_task(name: str) -> None:
    cls = task_class(name)
    print(f"task {name}: {summary(cls)}")
    print()
    print(inspect.cleandoc(cls.__doc__ or ""))
    print()
    try:
        spec = get_task(name).spec
    except Exception as err:
        print(f"(unavailable: {err})")
        return
    print(f"domain {spec.domain}; symmetry group {spec.group}; output {spec.output!r} per {spec.level}; "
          f"loss {spec.loss}; metrics {', '.join(spec.metrics)}")
    print("inputs (field: type):")
    for k, t in spec.inputs.items():
        print(f"  {k}: {t!r}")
    for k, t in spec.edge_inputs.items():
        print(f"  {k}: {t!r} (per edge)")
    for k, t in getattr(spec, "breaking_inputs", {}).items():
        print(f"  {k}: {t!r} (symmetry-breaking environment, not acted on)")
    print(f"options: {_option_defaults(cls)}")


def _describe_method(name: str, specs: dict[str, TaskSpec | Exception]) -> None:
    cls = method_class(name)
    print(f"method {name}: {summary(cls)}{_implementation(cls)}")
    print()
    print(inspect.cleandoc(cls.__doc__ or ""))
    print()
    print(f"exact={cls.exact} group={cls.group} domains={','.join(cls.domains)}; exact on: {scope_summary(cls)}")
    print(f"tasks: {', '.join(_supported(cls, specs)) or '(none of the registered tasks)'}")
    print(f"options: {_option_defaults(cls)}")


def _cmd_list(args: argparse.Namespace) -> int:
    for p in args.plugin or []:
        load_plugin(p)
    specs = _task_specs()
    if args.task or args.method:
        for name in args.task or []:
            _describe_task(name)
        for name in args.method or []:
            _describe_method(name, specs)
        return 0
    print("methods (name, claims, the tasks it runs on, what it is):")
    for name in list_methods():
        cls = method_class(name)
        print(f"  {name:24s} exact={str(cls.exact):5s} group={str(cls.group):5s} "
              f"tasks={','.join(_supported(cls, specs)) or '-'}")
        print(f"  {'':24s} exact on: {scope_summary(cls)}")
        print(f"  {'':24s} {summary(cls)}{_implementation(cls)}")
    print("tasks (equibench list --task NAME: field types, encodings, options):")
    for name, spec in specs.items():
        if isinstance(spec, Exception):
            print(f"  {name:24s} (unavailable: {spec})")
            continue
        print(f"  {name:24s} domain={spec.domain:8s} group={spec.group:4s} output={spec.output}"
              f" ({spec.level}) metrics={','.join(spec.metrics)}")
        print(f"  {'':24s} {summary(task_class(name))}")
    for name, why in unavailable_modules().items():
        print(f"  ({name}: not available, {why})")
    print("suites (purpose: what the run is for; see README):")
    for name in list_suites():
        try:
            suite = read_suite(name)
            print(f"  {name:24s} purpose={suite.purpose:9s} {first_sentence(suite.description)}")
        except UserError as err:
            print(f"  {name:24s} (invalid: {err})")
    return 0


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


#: exit codes: 0 every point finished (or --allow-failures); 1 nightly regression; 2 bad input;
#: 3 storage (results cannot be written); 4 some point ended failed, timeout or out_of_memory
EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_STORAGE, EXIT_FAILURES = 0, 1, 2, 3, 4


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _seeds(text: str) -> list[int]:
    seeds = _csv(int)(text)
    bad = [s for s in seeds if s < 0]
    if bad or not seeds:
        raise argparse.ArgumentTypeError(f"seeds must be non-negative integers, got {text!r}")
    return seeds


def _assignment(text: str) -> tuple[str, str, object]:
    """``NAME.OPTION=VALUE`` (``--task-option``/``--method-option``) -> (name, option, value); the
    value is read as JSON, else as YAML (``64``, ``5e-4``, ``true``, ``[1, 2]``, ``gap``)."""
    left, eq, value = text.partition("=")
    name, dot, key = left.strip().partition(".")
    if not (eq and dot and name and key.strip()):
        raise argparse.ArgumentTypeError(f"expected NAME.OPTION=VALUE (e.g. qm9.train_size=64), got {text!r}")
    return name, key.strip(), _value(value)


def _by_name(assignments: list[tuple[str, str, object]] | None) -> dict[str, dict[str, object]] | None:
    out: dict[str, dict[str, object]] = {}
    for name, key, value in assignments or []:
        out.setdefault(name, {})[key] = value
    return out or None


def _executor_option(text: str) -> tuple[str, object]:
    """``--executor-option KEY=VALUE`` -> (key, value); the value read as JSON, else YAML
    (``partition=gpu``, ``mem_gb=8``, ``setup=["module load cuda"]``)."""
    key, eq, value = text.partition("=")
    if not (eq and key.strip()):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. partition=gpu), got {text!r}")
    parsed = _value(value)
    return key.strip(), value if parsed is None else parsed


def _value(text: str) -> object:
    """A command-line value read as JSON, else YAML, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return text


def _executor_options(args: argparse.Namespace) -> dict | None:
    """The ``--executor-option`` settings (``None`` when none is given)."""
    return dict(args.executor_option) if args.executor_option else None


def _limits(args: argparse.Namespace) -> dict:
    """The worker options every running command shares."""
    return dict(timeout=args.timeout, max_memory=args.max_memory, wait=args.wait, plugins=args.plugin or [],
                isolate=not args.no_isolate, progress=not args.quiet, jobs=args.jobs)


def _suite_options(args: argparse.Namespace) -> dict:
    """The options ``run``/``nightly`` pass on to ``run`` besides the limits."""
    return dict(tasks=args.tasks, methods=args.methods, seeds=args.seeds, device=args.device,
                append=args.append, task_options=_by_name(args.task_option),
                method_options=_by_name(args.method_option), announce=True,
                executor_options=_executor_options(args))


def _outcome(run_dir: Path, args: argparse.Namespace, code: int = EXIT_OK, why: str = "",
             statuses: dict[str, Status] | None = None) -> int:
    """Print the last line, how many points of ``run_dir`` ended how, and return the exit code:
    ``EXIT_FAILURES`` when a point failed, timed out or ran out of memory (unless
    ``--allow-failures``), which takes precedence over ``code`` (a nightly regression).
    ``statuses``: the points' outcomes when the caller has them (else read from ``run_dir``)."""
    counts = Counter((point_statuses(run_dir) if statuses is None else statuses).values())
    failed = sum(counts[s] for s in FAILURES)
    if failed and not args.allow_failures:
        code = EXIT_FAILURES
    elif failed:
        why = ", ".join(filter(None, [why, "failures allowed by --allow-failures"]))
    text = ", ".join(f"{counts[s]} {s}" for s in Status if counts[s]) or "none recorded"
    print(f"points: {text} (exit {code}" + (f"; {why}" if why and code != EXIT_FAILURES else "") + ")")
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    records = run_suite(args.suite, results_dir=args.results_dir, executor=args.executor, run_name=args.name,
                        resume=args.resume, **_suite_options(args), **_limits(args))
    run_dir, df, statuses = records.path, records.frame(), records.statuses()  # records.jsonl read once
    runs = df[df["bench"] == TaskBench.kind]["spec_hash"].unique()
    points = df[df["bench"].isin(list(EXTRA_SECTIONS))]["spec_hash"].nunique()
    print(f"results: {run_dir} ({sum(statuses.get(h) == Status.OK for h in runs)}/{len(runs)} runs ok"
          + (f"; {points} scaling/tensor-product points)" if points else ")"))
    if not args.no_report:
        index = write_report(run_dir, Path(args.reports_dir) / run_dir.name, results=df)
        print(f"report: {index}")
    return _outcome(run_dir, args, statuses=statuses)


def _cmd_tune(args: argparse.Namespace) -> int:
    suite = read_suite(args.suite)
    cfg = tuning_config(suite)
    if cfg is None:
        raise UserError(f"suite {suite.name!r} has no 'tuning:' section (grid of train options to tune)")
    run_dir = run_dir_for(args.results_dir, f"tune-{suite.name}", args.name, args.resume, args.append)
    records = RunRecords(run_dir)
    selection = tune(suite, run_dir, tasks=args.tasks, methods=args.methods, device=args.device,
                     task_options=_by_name(args.task_option), method_options=_by_name(args.method_option),
                     executor=args.executor, executor_options=_executor_options(args), records=records,
                     **_limits(args))
    out = Path(args.out) if args.out else tuned_path(suite.source)
    write_tuned(out, suite.name, run_dir, cfg, selection)
    for (task, method), chosen in sorted(selection.items()):
        setting = ", ".join(f"{k}={v:g}" for k, v in chosen["setting"].items())
        edge = f"  ⚠ {chosen['edge_note']}" if chosen.get("edge_note") else ""
        print(f"{task:10s} {method:24s} {setting:16s} validation {chosen['val_metric']} {chosen['val']:.4g}{edge}")
    print(f"results: {run_dir}\ntuned settings: {out}")
    return _outcome(run_dir, args, statuses=records.statuses())


def _cmd_report(args: argparse.Namespace) -> int:
    out = args.out or str(Path("reports") / Path(args.runs[0]).name)
    df = load_results(args.runs)
    index = write_report(args.runs, out, results=df)
    for line in df.attrs.get("merged", []):  # which runs, which reruns counted once
        print(line)
    print(f"report: {index}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    out = args.out or str(Path("reports") / f"compare-{Path(args.run_a).name}-vs-{Path(args.run_b).name}")
    c = compare_dirs(args.run_a, args.run_b, args.threshold, args.k)
    index = write_comparison(args.run_a, args.run_b, out, comparison=c)
    print(f"A = {args.run_a}\nB = {args.run_b}")
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                           "display.max_colwidth", 48):
        print(display_table(c.table).to_string(index=False) if len(c.table) else "(no watched metric in either run)")
    print("\n".join([c.summary, *c.notes]))
    print(f"comparison: {index}")
    return 0


def _cmd_nightly(args: argparse.Namespace) -> int:
    name = args.name or f"nightly-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    records = run_suite(args.suite, results_dir=args.results_dir, executor=args.executor, run_name=name,
                        resume=args.resume, **_suite_options(args), **_limits(args))
    run_dir, df = records.path, records.frame()
    history = append_history(run_dir, args.history or Path(args.results_dir) / "history.parquet", results=df)
    regressions = find_regressions(history, run_dir.name, threshold=args.threshold, window=args.window, k=args.k)
    lines = [r.describe() for r in regressions]
    index = write_report(run_dir, Path(args.reports_dir) / run_dir.name, regressions=lines, history=history,
                         results=df)
    print(f"results: {run_dir}\nreport: {index}")
    for line in lines:
        print(f"REGRESSION {line}")
    return _outcome(run_dir, args, EXIT_REGRESSION if regressions else EXIT_OK,
                    f"{len(regressions)} regression(s)" if regressions else "", statuses=records.statuses())


def _run_bench(bench, args: argparse.Namespace, prefix: str) -> RunRecords:
    """Run one bench (``scale``/``tpbench``) into ``--results-dir/--name`` (an existing name needs
    ``--resume`` or ``--append``); the handle to what it wrote."""
    records = RunRecords(run_dir_for(args.results_dir, prefix, args.name, args.resume, args.append))
    run_benches([bench], records.path, records=records, **_limits(args))
    return records


def _cmd_scale(args: argparse.Namespace) -> int:
    for p in args.plugin or []:
        load_plugin(p)
    kw = {k: v for k, v in dict(task=args.task, methods=args.methods, axes=args.axes, nodes=args.nodes,
                                batch=args.batch, width=args.width, lmax=args.lmax, base_nodes=args.base_nodes,
                                base_batch=args.base_batch, k=args.k, mode=args.mode, device=args.device,
                                dtype=args.dtype, repeats=args.repeats, min_sample_s=args.min_sample_s,
                                threads=args.threads, clock=args.clock, max_call_s=args.max_call_s).items()
          if v is not None}
    records = _run_bench(ScalingBench(config_from_dict(ScaleConfig, kw, "scale")), args, "scaling")
    run_dir = records.path
    ex = exponents(records.frame())
    if len(ex):
        print(ex[["method", "axis", "slope", "r2", "x_min", "x_max"]].to_string(index=False, float_format="%.3g"))
    print(f"results: {run_dir}")
    if args.report:
        print(f"report: {write_sections_report(run_dir, args.report, f'equibench scaling: {run_dir.name}')}")
    return _outcome(run_dir, args, statuses=records.statuses())


def _cmd_tpbench(args: argparse.Namespace) -> int:
    kw = {k: v for k, v in dict(lmax=args.lmax, channel_modes=args.channel_modes, impls=args.impls,
                                channels=args.channels, batch=args.batch, passes=args.passes, device=args.device,
                                dtype=args.dtype, repeats=args.repeats, min_sample_s=args.min_sample_s,
                                threads=args.threads, clock=args.clock, flush_l2=args.flush_l2 or None).items()
          if v is not None}
    records = _run_bench(TPBench(config_from_dict(TPBenchConfig, kw, "tpbench")), args, "tpbench")
    run_dir = records.path
    print(f"results: {run_dir}")
    if args.report:
        print(f"report: {write_sections_report(run_dir, args.report, f'equibench tensor products: {run_dir.name}')}")
    return _outcome(run_dir, args, statuses=records.statuses())


def _add_worker_options(r: argparse.ArgumentParser) -> None:
    r.add_argument("--timeout", type=float, help="seconds allowed per point (a (task, method, seed) run, a size)")
    r.add_argument("--max-memory", type=_size, metavar="SIZE",
                   help="resident memory allowed per point, e.g. 4G or 512M (default: 75%% of RAM)")
    r.add_argument("--wait", action="store_true", help="wait for another runner using the same run directory")
    r.add_argument("--no-isolate", action="store_true", help="run points in this process (faster, no limits)")
    r.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="workers at once on this machine (local executor; give each one core with "
                        "OMP_NUM_THREADS): every timing runs alone, the other workers paused (default: 1)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even when a point ends failed, timeout or out_of_memory (default: exit 4)")
    r.add_argument("--append", action="store_true",
                   help="add points to the existing run --name (without it, or --resume, an existing name is refused)")


def _add_run_options(r: argparse.ArgumentParser) -> None:
    r.add_argument("--tasks", type=_csv(), help="comma-separated task names (default: the suite's)")
    r.add_argument("--methods", type=_csv(), help="comma-separated method names (default: the suite's)")
    r.add_argument("--seeds", type=_seeds, help="comma-separated non-negative integer seeds")
    r.add_argument("--device", help="cpu or cuda[:N] (default: the suite's)")
    r.add_argument("--executor", default="local", choices=["local", "submitit"],
                   help="local: worker processes here; submitit: Slurm array jobs when sbatch is on PATH")
    r.add_argument("--executor-option", action="append", type=_executor_option, metavar="KEY=VALUE",
                   help="a submitit/Slurm setting (repeatable): partition, account, qos, constraint, "
                        "gpus_per_node, cpus_per_task, mem_gb, timeout_min, parallelism (array tasks at once), "
                        "job_name, setup (shell lines), additional_parameters, cluster")
    r.add_argument("--results-dir", default="results")
    r.add_argument("--reports-dir", default="reports")
    r.add_argument("--name", help="run directory name (default: SUITE-<timestamp>); an existing one needs "
                                  "--resume or --append")
    r.add_argument("--task-option", action="append", type=_assignment, metavar="TASK.OPTION=VALUE",
                   help="set a task option over the suite's, e.g. qm9.train_size=64 (repeatable)")
    r.add_argument("--method-option", action="append", type=_assignment, metavar="METHOD.OPTION=VALUE",
                   help="set a method option over the suite's, e.g. egnn.params=5000 (repeatable; a method's "
                        "name also sets its variants)")
    r.add_argument("--plugin", action="append", help="Python file registering extra methods/tasks")
    _add_worker_options(r)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="equibench", description="Benchmark equivariance methods side by side.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ls = sub.add_parser("list", help="list methods, tasks and suites")
    ls.add_argument("--plugin", action="append", help="Python file registering extra methods/tasks")
    ls.add_argument("--task", action="append", help="describe one task: docstring, field types and encodings, "
                                                    "options (repeatable)")
    ls.add_argument("--method", action="append", help="describe one method: docstring, tasks, options (repeatable)")
    ls.set_defaults(func=_cmd_list)

    r = sub.add_parser("run", help="run a suite and write its report")
    r.add_argument("suite", help="suite name (smoke, quick, nightly, ...) or path to a suite YAML file")
    _add_run_options(r)
    r.add_argument("--resume", action="store_true", help="continue the named (or latest) run of this suite")
    r.add_argument("--no-report", action="store_true")
    r.set_defaults(func=_cmd_run)

    tn = sub.add_parser("tune", help="run a suite's tuning grid and store the chosen settings beside the suite")
    tn.add_argument("suite", help="suite name or path to a suite YAML file with a 'tuning:' section")
    _add_run_options(tn)
    tn.add_argument("--resume", action="store_true", help="continue the named (or latest) tuning run")
    tn.add_argument("--out", help="where to write the tuned settings (default: <suite>.tuned.yaml beside the suite)")
    tn.set_defaults(func=_cmd_tune)

    rep = sub.add_parser("report", help="write an HTML + Markdown report for run directories")
    rep.add_argument("runs", nargs="+", help="run directories (results/<run_id>) or a results root")
    rep.add_argument("--out", help="output directory (default: reports/<first run id>)")
    rep.set_defaults(func=_cmd_report)

    cmp_ = sub.add_parser("compare", help="compare two runs side by side")
    cmp_.add_argument("run_a")
    cmp_.add_argument("run_b")
    cmp_.add_argument("--out", help="output directory (default: reports/compare-A-vs-B)")
    cmp_.add_argument("--threshold", type=float, default=0.10,
                      help="relative change that counts (default 0.10, as nightly)")
    cmp_.add_argument("--k", type=float, default=3.0,
                      help="also require k x the larger measured spread of the two runs (default 3, as nightly)")
    cmp_.set_defaults(func=_cmd_compare)

    n = sub.add_parser("nightly", help="run a suite, append to the history, flag regressions")
    n.add_argument("suite", nargs="?", default="nightly")
    _add_run_options(n)
    n.add_argument("--resume", action="store_true", help="continue the named (or latest) nightly run")
    n.add_argument("--history", help="history Parquet file (default: RESULTS_DIR/history.parquet)")
    n.add_argument("--threshold", type=float, default=0.10, help="relative change that counts (default 0.10)")
    n.add_argument("--window", type=int, default=5, help="earlier runs to compare with (default 5)")
    n.add_argument("--k", type=float, default=3.0, help="also require k x the measured spread (default 3)")
    n.set_defaults(func=_cmd_nightly)

    sc = sub.add_parser("scale", help="cost-vs-size sweeps (nodes, batch, width, lmax) per method")
    sc.add_argument("--task", help="task whose fields the synthetic graphs carry (default nbody)")
    sc.add_argument("--methods", type=_csv(), help="comma-separated methods (default: baseline,frame_averaging,"
                                                   "tensor_frames,e3nn)")
    sc.add_argument("--axes", type=_csv(), help="comma-separated axes: nodes,batch,width,lmax (default nodes)")
    sc.add_argument("--nodes", type=_csv(int), help="nodes per graph (default 16,64,256,1024,4096,16384)")
    sc.add_argument("--batch", type=_csv(int), help="graphs per batch (default 1,4,16,64)")
    sc.add_argument("--width", type=_csv(int), help="widths (width or mul option; default 16,32,64,128)")
    sc.add_argument("--lmax", type=_csv(int), help="lmax values (default 0,1,2,3)")
    sc.add_argument("--base-nodes", type=int, help="nodes per graph when another axis is swept (default 256)")
    sc.add_argument("--base-batch", type=int, help="graphs per batch when another axis is swept (default 1)")
    sc.add_argument("--k", type=int, help="nearest-neighbour edges per node (default 8)")
    sc.add_argument("--mode", choices=["inference", "forward_backward", "train"])
    sc.add_argument("--device", help="cpu or cuda[:N]")
    sc.add_argument("--dtype", help="fp32 (default) or fp64")
    sc.add_argument("--repeats", type=int)
    sc.add_argument("--min-sample-s", type=float)
    sc.add_argument("--threads", type=int, help="CPU threads while timing (default 1)")
    sc.add_argument("--clock", choices=["wall", "cpu"], help="CPU timing clock (default wall)")
    sc.add_argument("--max-call-s", type=float, help="stop growing a sweep once a call takes longer (default 5)")
    sc.add_argument("--results-dir", default="results")
    sc.add_argument("--name", help="run directory name (default scaling-<timestamp>); an existing one needs "
                                   "--resume or --append")
    sc.add_argument("--resume", action="store_true", help="continue the named (or latest) scaling run")
    sc.add_argument("--report", help="also write a stand-alone scaling report into this folder")
    sc.add_argument("--plugin", action="append", help="Python file registering extra methods/tasks")
    _add_worker_options(sc)
    sc.set_defaults(func=_cmd_scale)

    tp = sub.add_parser("tpbench", help="tensor-product microbenchmarks (e3nn, Gaunt on S2, cuequivariance)")
    tp.add_argument("--lmax", type=_csv(int), help="lmax values (default 1,2,3,4,5,6)")
    tp.add_argument("--channel-modes", type=_csv(), help="uvu,uvw (default both)")
    tp.add_argument("--impls", type=_csv(), help="e3nn,e3nn_compiled,gaunt,gaunt_compiled,cuet "
                                                 "(default e3nn,e3nn_compiled,gaunt,cuet)")
    tp.add_argument("--channels", type=int, help="channels C of the first operand and the output (default 16)")
    tp.add_argument("--batch", type=int, help="pairs per call (default 256)")
    tp.add_argument("--passes", type=_csv(), help="forward,forward_backward (default forward)")
    tp.add_argument("--device", help="cpu or cuda[:N]")
    tp.add_argument("--dtype", help="fp32 (default) or fp64")
    tp.add_argument("--repeats", type=int)
    tp.add_argument("--min-sample-s", type=float)
    tp.add_argument("--threads", type=int, help="CPU threads while timing (default 1)")
    tp.add_argument("--clock", choices=["wall", "cpu"], help="CPU timing clock (default wall)")
    tp.add_argument("--flush-l2", action="store_true", help="CUDA: flush L2 before every timed call")
    tp.add_argument("--results-dir", default="results")
    tp.add_argument("--name", help="run directory name (default tpbench-<timestamp>); an existing one needs "
                                   "--resume or --append")
    tp.add_argument("--resume", action="store_true", help="continue the named (or latest) tpbench run")
    tp.add_argument("--report", help="also write a stand-alone report into this folder")
    tp.add_argument("--plugin", action="append", help="Python file registering extra methods/tasks")
    _add_worker_options(tp)
    tp.set_defaults(func=_cmd_tpbench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"equibench: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StorageError as err:
        print(f"equibench: error: {err}", file=sys.stderr)
        return EXIT_STORAGE
    except KeyboardInterrupt:
        print("equibench: interrupted; finished results are kept (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
