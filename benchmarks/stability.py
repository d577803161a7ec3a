"""Repeatability of ``measure_throughput``: do repeated measurements of one model agree?

    python benchmarks/stability.py [--methods baseline,e3nn] [--groups 3] [--runs 30] [--order interleaved]

A *run* is one ``measure_throughput`` call (warm-up, ``repeats`` samples, median per call). A
*measurement* is the median of the medians of ``runs`` runs. The script makes ``groups``
measurements per method and clock and reports PASS when every measurement lies within
``--tolerance`` (5%) of their median; it also prints the spread of the single runs.

``--order interleaved`` (default) takes run i of every group before run i+1 of any, so all
measurements span the same stretch of time: what is compared is the measurement procedure, not
how fast the host happened to be during each group (on a shared VM the host's speed drifts by
10-30% over minutes). ``--order sequential`` takes the groups one after the other. Either way a
fixed reference kernel (a 256x256 fp32 matmul, one thread) is timed before every run; its spread
over the session is printed as the host's own drift, for reading the result.
Not an asv benchmark (asv collects only time_/track_/peakmem_ names); the asv benchmark
``RepeatabilitySuite`` tracks the single-run spread.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def reference_kernel_s(n: int = 100) -> float:
    """Median time of one 256x256 fp32 matmul on one thread: a gauge of the host's speed."""
    import torch
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(256, 256)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n // 5):
                a @ a
            times.append((time.perf_counter() - t0) / (n // 5))
        return statistics.median(times)
    finally:
        torch.set_num_threads(prev)


def _rel_dev(xs: list[float]) -> float:
    ref = statistics.median(xs)
    return max(abs(x - ref) / ref for x in xs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="baseline,e3nn")
    p.add_argument("--groups", type=int, default=3, help="repeated measurements (each a median of medians)")
    p.add_argument("--runs", type=int, default=30, help="runs per measurement")
    p.add_argument("--repeats", type=int, default=20, help="samples per run")
    p.add_argument("--min-sample-s", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=64, help="graphs per batch")
    p.add_argument("--mode", default="inference")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="wall", help="comma-separated: wall, cpu")
    p.add_argument("--order", choices=["interleaved", "sequential"], default="interleaved")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tolerance", type=float, default=0.05)
    args = p.parse_args(argv)
    from common import build, nbody_batch  # benchmarks/common.py

    from equibench.metrics.throughput import measure_throughput
    batch = nbody_batch(args.batch)
    failed = 0
    print(f"device={args.device} mode={args.mode} batch={args.batch} graphs threads={args.threads} "
          f"groups={args.groups} runs/group={args.runs} repeats/run={args.repeats} min_sample_s={args.min_sample_s} "
          f"order={args.order} load={os.getloadavg()[0]:.1f}", flush=True)
    gauge: list[float] = []
    for method in args.methods.split(","):
        model = build(method)
        for clock in args.clock.split(","):
            t0 = time.perf_counter()
            medians: list[list[float]] = [[] for _ in range(args.groups)]
            order = ([(g, r) for r in range(args.runs) for g in range(args.groups)] if args.order == "interleaved"
                     else [(g, r) for g in range(args.groups) for r in range(args.runs)])
            for g, _ in order:
                gauge.append(reference_kernel_s())
                res = measure_throughput(model, batch, args.mode, args.device, repeats=args.repeats,
                                         min_sample_s=args.min_sample_s, threads=args.threads, clock=clock,
                                         flops=False, memory=False)
                medians[g].append(res["time_median_s"])
            mom = [statistics.median(m) for m in medians]
            for g, m in enumerate(medians):
                print(f"  {method} clock={clock} group {g}: run medians [ms] {' '.join(f'{x * 1e3:.3f}' for x in m)}"
                      f" -> median of medians {mom[g] * 1e3:.3f} ms (single runs within {100 * _rel_dev(m):.1f}%)")
            dev = _rel_dev(mom)
            ok = dev <= args.tolerance
            failed += not ok
            print(f"{method:16s} clock={clock:4s} medians of medians [ms]: {' '.join(f'{m * 1e3:.3f}' for m in mom)}"
                  f" | max deviation {100 * dev:.2f}% | {'PASS' if ok else 'FAIL'} (tolerance "
                  f"{100 * args.tolerance:g}%) | single runs: max deviation "
                  f"{100 * max(_rel_dev(m) for m in medians):.1f}% | {time.perf_counter() - t0:.0f} s | "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"host drift (reference matmul before each run): {min(gauge) * 1e3:.4f}-{max(gauge) * 1e3:.4f} ms, "
          f"max deviation from its median {100 * _rel_dev(gauge):.1f}% over {len(gauge)} runs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
