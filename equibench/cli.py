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

Bad input (unknown name, malformed suite file, wrong option type, a run directory in use) prints
one line on stderr and exits with code 2; a full or unwritable results directory prints one line
and exits with code 3. Results already written are never touched.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .benches.scaling import ScaleConfig, ScalingBench, exponents
from .benches.tp_bench import TPBench, TPBenchConfig
from .core.config import config_from_dict
from .core.errors import StorageError, UserError
from .core.registry import get_task, list_methods, list_tasks, load_plugin, method_class, unavailable_modules
from .report.build import write_comparison, write_report
from .report.history import append_history, find_regressions
from .report.sections import write_sections_report
from .suite.engine import run_benches
from .suite.limits import parse_size
from .suite.runner import run, run_dir_for, tune
from .suite.store import load_results
from .suite.suites import EXTRA_SECTIONS, list_suites, read_suite, tuning_config
from .suite.tuned import tuned_path, write_tuned


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


def _cmd_list(args: argparse.Namespace) -> int:
    for p in args.plugin or []:
        load_plugin(p)
    print("methods:")
    for name in list_methods():
        cls = method_class(name)
        doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip().splitlines()
        print(f"  {name:24s} exact={str(cls.exact):5s} group={str(cls.group):5s} "
              f"domains={','.join(cls.domains):16s} {doc[0] if doc else ''}")
    print("tasks:")
    for name in list_tasks():
        try:
            spec = get_task(name).spec
            print(f"  {name:24s} domain={spec.domain:8s} group={spec.group:4s} output={spec.output}"
                  f" ({spec.level}) metrics={','.join(spec.metrics)}")
        except Exception as err:  # a task whose data package is missing still lists
            print(f"  {name:24s} (unavailable: {err})")
    for name, why in unavailable_modules().items():
        print(f"  ({name}: not available, {why})")
    print("suites:")
    for name in list_suites():
        print(f"  {name}")
    return 0


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _limits(args: argparse.Namespace) -> dict:
    """The worker options every running command shares."""
    return dict(timeout=args.timeout, max_memory=args.max_memory, wait=args.wait, plugins=args.plugin or [],
                isolate=not args.no_isolate, progress=not args.quiet)


def _cmd_run(args: argparse.Namespace) -> int:
    df = run(args.suite, results_dir=args.results_dir, executor=args.executor, run_name=args.name,
             resume=args.resume, tasks=args.tasks, methods=args.methods, seeds=args.seeds, device=args.device,
             **_limits(args))
    run_id = str(df["run_id"].dropna().iloc[0])
    run_dir = Path(args.results_dir) / run_id
    runs = df[~df["task"].isin(list(EXTRA_SECTIONS))].drop_duplicates("spec_hash")
    points = df[df["task"].isin(list(EXTRA_SECTIONS))]["spec_hash"].nunique()
    print(f"results: {run_dir} ({int((runs['status'] == 'ok').sum())}/{len(runs)} runs ok"
          + (f"; {points} scaling/tensor-product points)" if points else ")"))
    if not args.no_report:
        index = write_report(run_dir, Path(args.reports_dir) / run_id)
        print(f"report: {index}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    suite = read_suite(args.suite)
    cfg = tuning_config(suite)
    if cfg is None:
        raise UserError(f"suite {suite.name!r} has no 'tuning:' section (grid of train options to tune)")
    run_dir = run_dir_for(args.results_dir, f"tune-{suite.name}", args.name, args.resume)
    selection = tune(suite, run_dir, tasks=args.tasks, methods=args.methods, device=args.device,
                     executor=args.executor, **_limits(args))
    out = Path(args.out) if args.out else tuned_path(suite.source)
    write_tuned(out, suite.name, run_dir, cfg, selection)
    for (task, method), chosen in sorted(selection.items()):
        setting = ", ".join(f"{k}={v:g}" for k, v in chosen["setting"].items())
        print(f"{task:10s} {method:24s} {setting:16s} validation {chosen['val_metric']} {chosen['val']:.4g}")
    print(f"results: {run_dir}\ntuned settings: {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    out = args.out or str(Path("reports") / Path(args.runs[0]).name)
    print(f"report: {write_report(args.runs, out)}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    out = args.out or str(Path("reports") / f"compare-{Path(args.run_a).name}-vs-{Path(args.run_b).name}")
    print(f"comparison: {write_comparison(args.run_a, args.run_b, out)}")
    return 0


def _cmd_nightly(args: argparse.Namespace) -> int:
    name = args.name or f"nightly-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    df = run(args.suite, results_dir=args.results_dir, executor=args.executor, run_name=name, resume=True,
             tasks=args.tasks, methods=args.methods, seeds=args.seeds, device=args.device, **_limits(args))
    run_dir = Path(args.results_dir) / str(df["run_id"].dropna().iloc[0])
    history = append_history(run_dir, args.history or Path(args.results_dir) / "history.parquet")
    regressions = find_regressions(history, run_dir.name, threshold=args.threshold, window=args.window, k=args.k)
    lines = [r.describe() for r in regressions]
    index = write_report(run_dir, Path(args.reports_dir) / run_dir.name, regressions=lines, history=history)
    print(f"results: {run_dir}\nreport: {index}")
    for line in lines:
        print(f"REGRESSION {line}")
    return 1 if regressions else 0


def _run_bench(bench, args: argparse.Namespace, prefix: str) -> Path:
    """Run one bench (``scale``/``tpbench``) into ``--results-dir/--name`` (an existing name resumes)."""
    name = args.name or f"{prefix}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return run_benches([bench], Path(args.results_dir) / name, **_limits(args))


def _cmd_scale(args: argparse.Namespace) -> int:
    for p in args.plugin or []:
        load_plugin(p)
    kw = {k: v for k, v in dict(task=args.task, methods=args.methods, axes=args.axes, nodes=args.nodes,
                                batch=args.batch, width=args.width, lmax=args.lmax, base_nodes=args.base_nodes,
                                base_batch=args.base_batch, k=args.k, mode=args.mode, device=args.device,
                                dtype=args.dtype, repeats=args.repeats, min_sample_s=args.min_sample_s,
                                threads=args.threads, clock=args.clock, max_call_s=args.max_call_s).items()
          if v is not None}
    run_dir = _run_bench(ScalingBench(config_from_dict(ScaleConfig, kw, "scale")), args, "scaling")
    ex = exponents(load_results(run_dir))
    if len(ex):
        print(ex[["method", "axis", "slope", "r2", "x_min", "x_max"]].to_string(index=False, float_format="%.3g"))
    print(f"results: {run_dir}")
    if args.report:
        print(f"report: {write_sections_report(run_dir, args.report, f'equibench scaling: {run_dir.name}')}")
    return 0


def _cmd_tpbench(args: argparse.Namespace) -> int:
    kw = {k: v for k, v in dict(lmax=args.lmax, channel_modes=args.channel_modes, impls=args.impls,
                                channels=args.channels, batch=args.batch, passes=args.passes, device=args.device,
                                dtype=args.dtype, repeats=args.repeats, min_sample_s=args.min_sample_s,
                                threads=args.threads, clock=args.clock, flush_l2=args.flush_l2 or None).items()
          if v is not None}
    run_dir = _run_bench(TPBench(config_from_dict(TPBenchConfig, kw, "tpbench")), args, "tpbench")
    print(f"results: {run_dir}")
    if args.report:
        print(f"report: {write_sections_report(run_dir, args.report, f'equibench tensor products: {run_dir.name}')}")
    return 0


def _add_worker_options(r: argparse.ArgumentParser) -> None:
    r.add_argument("--timeout", type=float, help="seconds allowed per point (a (task, method, seed) run, a size)")
    r.add_argument("--max-memory", type=_size, metavar="SIZE",
                   help="resident memory allowed per point, e.g. 4G or 512M (default: 75%% of RAM)")
    r.add_argument("--wait", action="store_true", help="wait for another runner using the same run directory")
    r.add_argument("--no-isolate", action="store_true", help="run points in this process (faster, no limits)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_run_options(r: argparse.ArgumentParser) -> None:
    r.add_argument("--tasks", type=_csv(), help="comma-separated task names (default: the suite's)")
    r.add_argument("--methods", type=_csv(), help="comma-separated method names (default: the suite's)")
    r.add_argument("--seeds", type=_csv(int), help="comma-separated integer seeds")
    r.add_argument("--device", help="cpu or cuda[:N] (default: the suite's)")
    r.add_argument("--executor", default="local", choices=["local", "submitit"])
    r.add_argument("--results-dir", default="results")
    r.add_argument("--reports-dir", default="reports")
    r.add_argument("--name", help="run directory name (default: SUITE-<timestamp>)")
    r.add_argument("--plugin", action="append", help="Python file registering extra methods/tasks")
    _add_worker_options(r)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="equibench", description="Benchmark equivariance methods side by side.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ls = sub.add_parser("list", help="list methods, tasks and suites")
    ls.add_argument("--plugin", action="append", help="Python file registering extra methods/tasks")
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
    cmp_.set_defaults(func=_cmd_compare)

    n = sub.add_parser("nightly", help="run a suite, append to the history, flag regressions")
    n.add_argument("suite", nargs="?", default="nightly")
    _add_run_options(n)
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
    sc.add_argument("--name", help="run directory name (default scaling-<timestamp>); reused = resume")
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
    tp.add_argument("--name", help="run directory name (default tpbench-<timestamp>); reused = resume")
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
        return 2
    except StorageError as err:
        print(f"equibench: error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("equibench: interrupted; finished results are kept (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
