"""Does the suite's inference timing agree with an independent one? (issue 20, item 4)

For every registered method that runs on the chosen tasks (``method.supports(task.spec)``), on
the same model and batch, at one thread, interleaved round by round (the order rotating, so a
drift of the machine's load hits all alike), four timings:

* suite: ``measure_throughput(model, batch, "inference", threads=1, ...)`` with the quick
  suite's settings (5 repeats, 0.02 s samples) -> its ``time_median_s``;
* legacy: the same with the suite's CPU timing before issue 20 (``Timer.timeit(n)``: the mean
  of each sample's calls), for the before/after comparison;
* A and B: ``torch.utils.benchmark.Timer(stmt="model(batch)")`` under ``torch.no_grad()``, model
  in eval mode, ``blocked_autorange(min_run_time=...)`` -> its median; twice, so that B / A
  measures how far the same independent timer disagrees with itself at the current load.

Printed per method: the medians over rounds of the suite's and A's time; "suite" and "legacy" =
median over rounds of the paired ratio to A, minus 1, with the suite's range over rounds; "B vs A"
= median of |B / A - 1|. Verdict: "ok" when |suite| <= 5 %; "noise" when above but within
5 % + |B vs A| (the machine's load hides a difference that small: rerun quieter); "DIFFERS" else.
``--clock cpu`` times every one of them with ``time.process_time`` (the process's CPU time: other
processes on a shared machine disturb it far less than the wall clock). ``uptime``'s load
average is printed before and after.

    .venv/bin/python -m benchmarks.bench_timing [--tasks nbody,normals] [--methods a,b]
        [--batch 50] [--normals-batch 4] [--rounds 5] [--min-run-time 0.5] [--clock wall|cpu]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch.utils import benchmark
from torch_geometric.data import Batch

TASK_OPTIONS: dict[str, dict[str, Any]] = {  # the quick suite's
    "nbody": {"train_size": 1000, "val_size": 100, "test_size": 500},
    "normals": {"n_points": 128, "k": 8, "train_size": 96, "val_size": 16, "test_size": 24, "rotation": "none/SO3"},
}


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def setup(task_name: str, method_name: str, batch_graphs: int) -> tuple[torch.nn.Module, Batch] | str:
    """(model, batch) of ``method_name`` on ``task_name`` (seed 0, 20k parameters, eval mode), or
    the reason it does not run there."""
    import equibench as eb
    from equibench.benches.taskrun import build_model
    task = eb.get_task(task_name, **TASK_OPTIONS.get(task_name, {}))
    try:
        method = eb.get_method(method_name, params=20000)
    except Exception:  # a method without the params option
        method = eb.get_method(method_name)
    reason = method.supports(task.spec)
    if reason:
        return str(reason)
    data = task.load("test", seed=0)
    batch = Batch.from_data_list((data * (batch_graphs // len(data) + 1))[:batch_graphs])
    model = build_model(method, task.spec, 0, torch.float32).eval()
    return model, batch


def independent(model: torch.nn.Module, batch: Batch, min_run_time: float, clock: str = "wall") -> float:
    """Median seconds per forward from ``blocked_autorange`` (one thread, no_grad, eval mode);
    ``clock="cpu"`` times with ``time.process_time``."""
    extra: dict[str, Any] = {"timer": time.process_time} if clock == "cpu" else {}
    timer = benchmark.Timer(stmt="with torch.no_grad():\n    model(batch)",
                            globals={"model": model, "batch": batch, "torch": torch}, num_threads=1, **extra)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def legacy_cpu_run(step: Any, threads: int, clock: str = "wall") -> Any:
    """The suite's CPU ``run(n)`` before issue 20: ``Timer.timeit(n)``, i.e. the *mean* of ``n``
    back-to-back calls (a sample of ``min_sample_s``), for the before/after comparison."""
    extra: dict[str, Any] = {"timer": time.process_time} if clock == "cpu" else {}
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=threads, **extra)
    return lambda n: timer.timeit(n).mean * n


def suite(model: torch.nn.Module, batch: Batch, clock: str = "wall", legacy: bool = False) -> float:
    """The suite's median seconds per forward (the quick suite's timing settings); ``legacy``:
    with the CPU timing the suite had before issue 20."""
    from equibench.metrics import throughput
    current = throughput.cpu_run
    if legacy:
        throughput.cpu_run = legacy_cpu_run
    try:
        res = throughput.measure_throughput(model, batch, "inference", "cpu", threads=1, repeats=5,
                                            min_sample_s=0.02, flops=False, memory=False, clock=clock)
    finally:
        throughput.cpu_run = current
    return res["time_median_s"]


TIMINGS = ("suite", "legacy", "indep_a", "indep_b")


def compare(model: torch.nn.Module, batch: Batch, rounds: int, min_run_time: float,
            clock: str = "wall") -> dict[str, float]:
    """Interleaved rounds of four timings in a rotating order: the suite, the suite's pre-issue-20
    timing (legacy), and two independent ``blocked_autorange`` runs (A, B). Per round the ratios to
    A; returned: the median over rounds of ``suite / A - 1`` and ``legacy / A - 1``, the median of
    ``|B / A - 1|`` (the noise floor: how far two runs of the *same* timer disagree at this load),
    the range of the suite's ratios, and the median times."""
    fns = {"suite": lambda: suite(model, batch, clock), "legacy": lambda: suite(model, batch, clock, legacy=True),
           "indep_a": lambda: independent(model, batch, min_run_time, clock),
           "indep_b": lambda: independent(model, batch, min_run_time, clock)}
    times: dict[str, list[float]] = {k: [] for k in TIMINGS}
    for r in range(rounds):
        for k in TIMINGS[r % 4:] + TIMINGS[:r % 4]:
            times[k].append(fns[k]())
    ratio = {k: [x / a - 1 for x, a in zip(times[k], times["indep_a"])] for k in ("suite", "legacy", "indep_b")}
    return {"suite_s": statistics.median(times["suite"]), "indep_s": statistics.median(times["indep_a"]),
            "diff": statistics.median(ratio["suite"]), "legacy": statistics.median(ratio["legacy"]),
            "noise": statistics.median(abs(x) for x in ratio["indep_b"]), "lo": min(ratio["suite"]),
            "hi": max(ratio["suite"])}


def verdict_of(diff: float, noise: float, tolerance: float) -> str:
    """"ok" when the suite is within ``tolerance`` of blocked_autorange (median paired ratio);
    "noise" when it is not, but by no more than ``tolerance`` + the median disagreement of two
    blocked_autorange runs (the load hides a difference of that size; rerun quieter); else "DIFFERS"."""
    if abs(diff) <= tolerance:
        return "ok"
    return "noise" if abs(diff) <= noise + tolerance else "DIFFERS"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="nbody,normals")
    p.add_argument("--methods", default="", help="comma-separated; default every registered method")
    p.add_argument("--batch", type=int, default=50, help="graphs per batch (n-body)")
    p.add_argument("--normals-batch", type=int, default=4, help="graphs per batch on normals (the quick suite's)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: both time with time.process_time (insensitive to other processes)")
    p.add_argument("--tolerance", type=float, default=0.05)
    args = p.parse_args(argv)
    import equibench as eb
    torch.set_num_threads(1)
    names = args.methods.split(",") if args.methods else eb.list_methods()
    print(f"# torch {torch.__version__}, 1 thread, {args.clock} clock; {load()}")
    print(f"{'task':8s} {'method':24s} {'graphs':>6s} {'suite ms':>9s} {'indep ms':>9s} {'suite':>7s} "
          f"{'range':>15s} {'legacy':>7s} {'B vs A':>7s}  verdict")
    failures = 0
    for task_name in args.tasks.split(","):
        graphs = args.normals_batch if task_name == "normals" else args.batch
        for name in names:
            t0 = time.perf_counter()
            try:
                got = setup(task_name, name, graphs)
            except Exception as err:  # a reference library that is not installed
                print(f"{task_name:8s} {name:24s} skipped: {type(err).__name__}: {str(err)[:80]}")
                continue
            if isinstance(got, str):
                continue  # not applicable on this task
            model, batch = got
            res = compare(model, batch, args.rounds, args.min_run_time, args.clock)
            verdict = verdict_of(res["diff"], res["noise"], args.tolerance)
            failures += verdict == "DIFFERS"
            print(f"{task_name:8s} {name:24s} {graphs:6d} {res['suite_s'] * 1e3:9.3f} {res['indep_s'] * 1e3:9.3f} "
                  f"{res['diff']:+7.1%} [{res['lo']:+6.1%},{res['hi']:+6.1%}] {res['legacy']:+7.1%} "
                  f"{res['noise']:+7.1%}  {verdict}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"# {load()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
