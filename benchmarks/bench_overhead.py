"""Inference overhead of the backbone wrappers over the shared backbone (issue 20, item 3).

For each task (n-body, normals with the quick suite's options) every wrapper and the ``baseline``
are built at the same parameter count (``get_method(name, params=...)``, seed 0, float32, eval
mode) and timed on the same batch of ``--batch`` graphs, no grad, one thread, with
``torch.utils.benchmark.Timer.blocked_autorange``. Baseline and wrapper are measured back to back,
``--rounds`` times, interleaved; the reported ratio is the median over rounds of
t(wrapper) / t(baseline) of the same round, so a steady background load cancels in the ratio.

    ratio = t_wrapper / t_baseline      (per frame: ratio / frames, for frame averaging)

With ``--profile`` each wrapper also runs under ``torch.profiler`` and the script prints its top
operators by self CPU time and the share of the forward spent in the ``record_function`` regions
the wrappers label: ``equibench.frames`` (frame / canonicalisation construction),
``equibench.backbone`` (the shared backbone), ``equibench.to_frame`` (mapping in and out of
frames, averaging).

    nice -n 19 .venv/bin/python -m benchmarks.bench_overhead --profile
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import timeit
from typing import Any

import torch
from torch.utils import benchmark

from equibench.metrics.profile import REGIONS as PROFILE_REGIONS

TASK_OPTIONS: dict[str, dict[str, Any]] = {  # the quick suite's task options (equibench/suites/quick.yaml)
    "nbody": {"train_size": 1000, "val_size": 100, "test_size": 500},
    "normals": {"n_points": 128, "k": 8, "train_size": 96, "val_size": 16, "test_size": 24,
                "rotation": "none/SO3"},
}
METHODS = ("canonicalization", "pca_canonicalization", "tensor_frames", "local_canonicalization",
           "frame_averaging", "fa_gnn")
#: the issue's targets: ratio <= target (frame averaging and fa_gnn: ratio / frames <= target)
TARGETS = {"canonicalization": 1.3, "pca_canonicalization": 1.2, "tensor_frames": 1.5,
           "local_canonicalization": 1.5, "frame_averaging": 0.6, "fa_gnn": 1.2}
REGIONS = tuple(PROFILE_REGIONS)  # the wrappers' labels


def make_batch(task_name: str, graphs: int):
    """``graphs`` test graphs of the task (repeated when the split is smaller), as one batch."""
    from torch_geometric.data import Batch

    import equibench as eb
    task = eb.get_task(task_name, **TASK_OPTIONS[task_name])
    data = task.load("test")
    return task, Batch.from_data_list((data * (graphs // len(data) + 1))[:graphs])


def make_model(name: str, spec, params: int) -> torch.nn.Module:
    import equibench as eb
    from equibench.benches.taskrun import build_model
    return build_model(eb.get_method(name, params=params), spec, 0, torch.float32).eval()


def frames_of(name: str, model: torch.nn.Module) -> int | None:
    """Number of frames the wrapper averages over (None for single-frame methods)."""
    if name == "frame_averaging":
        return 8 if model.group == "O3" else 4
    if name == "fa_gnn":
        return 8 if model.group == "O3" else 4
    return None


CLOCKS = {"wall": timeit.default_timer, "cpu": time.process_time}


def time_call(model: torch.nn.Module, batch, min_run_time: float, clock: str = "wall") -> float:
    """Median seconds per ``model(batch)`` (no grad, one thread); ``clock="cpu"`` counts the
    process's CPU time, which other processes on a busy machine disturb far less than wall time."""
    timer = benchmark.Timer(stmt="model(batch)", setup="torch.set_grad_enabled(False)", timer=CLOCKS[clock],
                            globals={"model": model, "batch": batch, "torch": torch}, num_threads=1)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def ratios(task_name: str, methods: list[str], graphs: int, params: int, rounds: int,
           min_run_time: float, clock: str = "wall") -> list[dict[str, Any]]:
    """One row per method: median over ``rounds`` of t(method) / t(baseline), measured back to back."""
    task, batch = make_batch(task_name, graphs)
    base = make_model("baseline", task.spec, params)
    models = {m: make_model(m, task.spec, params) for m in methods}
    with torch.no_grad():  # warm-up (lazy caches, allocator)
        for model in (base, *models.values()):
            model(batch)
    per: dict[str, list[float]] = {m: [] for m in methods}
    base_t: list[float] = []
    for _ in range(rounds):
        for m in methods:
            tb = time_call(base, batch, min_run_time, clock)
            tm = time_call(models[m], batch, min_run_time, clock)
            base_t.append(tb)
            per[m].append(tm / tb)
    rows = []
    for m in methods:
        k = frames_of(m, models[m])
        r = statistics.median(per[m])
        rows.append({"task": task_name, "method": m, "frames": k, "ratio": r,
                     "per_frame": r / k if k else None, "spread": (min(per[m]), max(per[m])),
                     "baseline_ms": 1e3 * statistics.median(base_t)})
    return rows


def profile(task_name: str, methods: list[str], graphs: int, params: int, calls: int, top: int) -> None:
    """Top operators by self CPU time and the share of each labelled region, per method."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    task, batch = make_batch(task_name, graphs)
    for m in ["baseline", *methods]:
        model = make_model(m, task.spec, params)
        with torch.no_grad():
            model(batch)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    with torch.profiler.record_function("equibench.forward"):
                        model(batch)
        avg = prof.key_averages()
        total = sum(e.cpu_time_total for e in avg if e.key == "equibench.forward")
        regions = {e.key: e.cpu_time_total for e in avg if e.key in REGIONS}
        shares = ", ".join(f"{k.split('.')[1]} {100 * v / total:.0f}%" for k, v in regions.items()) or "no labels"
        print(f"\n--- {task_name} / {m}: {total / calls / 1e3:.2f} ms per forward (profiled); {shares}")
        print(avg.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="nbody,normals")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--params", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-run-time", type=float, default=0.2)
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="wall (default) or the process's CPU time (steadier on a shared machine)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler breakdowns")
    ap.add_argument("--profile-only", action="store_true")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--profile-calls", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    print(f"threads 1, batch {args.batch} graphs, params {args.params}, rounds {args.rounds}, clock {args.clock}, "
          f"load average {os.getloadavg()[0]:.2f}")
    if not args.profile_only:
        print(f"{'task':8s} {'method':24s} {'frames':>6s} {'ratio':>7s} {'per frame':>9s} {'target':>7s} "
              f"{'min..max':>13s} {'base ms':>8s}")
        for t in tasks:
            for row in ratios(t, methods, args.batch, args.params, args.rounds, args.min_run_time, args.clock):
                pf = f"{row['per_frame']:.2f}" if row["per_frame"] is not None else ""
                lo, hi = row["spread"]
                print(f"{t:8s} {row['method']:24s} {row['frames'] or '':>6} {row['ratio']:7.2f} {pf:>9s} "
                      f"{TARGETS.get(row['method'], float('nan')):7.2f} {lo:6.2f}..{hi:<6.2f} "
                      f"{row['baseline_ms']:8.2f}", flush=True)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.profile or args.profile_only:
        for t in tasks:
            profile(t, methods, args.batch, args.params, calls=args.profile_calls, top=args.top)


if __name__ == "__main__":
    main()
