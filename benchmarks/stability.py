"""Repeatability of ``measure_throughput``: do repeated measurements of one model agree?

    python benchmarks/stability.py [--methods baseline,e3nn] [--groups 3] [--runs 5] [--clock wall,cpu]

A *run* is one ``measure_throughput`` call (warm-up, ``repeats`` samples, median per call). A
*measurement* is the median of the medians of ``runs`` independent runs (robust to a run that
caught a burst of load from other processes). For each method and clock the script makes
``groups`` measurements one after the other and reports PASS when every measurement lies
within ``--tolerance`` (5%) of their median; it also prints the spread of the single runs.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="baseline,e3nn")
    p.add_argument("--groups", type=int, default=3, help="repeated measurements (each a median of medians)")
    p.add_argument("--runs", type=int, default=5, help="runs per measurement")
    p.add_argument("--repeats", type=int, default=10, help="samples per run")
    p.add_argument("--min-sample-s", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=64, help="graphs per batch")
    p.add_argument("--mode", default="inference")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="wall,cpu", help="comma-separated: wall, cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tolerance", type=float, default=0.05)
    args = p.parse_args(argv)
    from common import build, nbody_batch  # benchmarks/common.py
    from equibench.suite.throughput import repeatability
    batch = nbody_batch(args.batch)
    failed = 0
    print(f"device={args.device} mode={args.mode} batch={args.batch} graphs threads={args.threads} "
          f"groups={args.groups} runs/group={args.runs} repeats/run={args.repeats} "
          f"min_sample_s={args.min_sample_s} load={os.getloadavg()[0]:.1f}", flush=True)
    for method in args.methods.split(","):
        model = build(method)
        for clock in args.clock.split(","):
            t0 = time.perf_counter()
            mom, run_devs = [], []
            for g in range(args.groups):
                r = repeatability(model, batch, args.mode, args.device, runs=args.runs, repeats=args.repeats,
                                  min_sample_s=args.min_sample_s, threads=args.threads, clock=clock)
                mom.append(r["median_of_medians_s"])
                run_devs.append(r["max_rel_dev"])
                meds = " ".join(f"{m * 1e3:.3f}" for m in r["medians_s"])
                print(f"  {method} clock={clock} group {g}: run medians [ms] {meds} -> median of medians "
                      f"{r['median_of_medians_s'] * 1e3:.3f} ms (single runs within {100 * r['max_rel_dev']:.1f}%; "
                      f"IQR/median per run {', '.join(f'{100 * q:.0f}%' for q in r['iqr_rel'])}; "
                      f"load {os.getloadavg()[0]:.1f})", flush=True)
            ref = statistics.median(mom)
            dev = max(abs(m - ref) / ref for m in mom)
            ok = dev <= args.tolerance
            failed += not ok
            print(f"{method:16s} clock={clock:4s} medians of medians [ms]: {' '.join(f'{m * 1e3:.3f}' for m in mom)}"
                  f" | max deviation {100 * dev:.2f}% | {'PASS' if ok else 'FAIL'} (tolerance "
                  f"{100 * args.tolerance:g}%) | single runs: max deviation {100 * max(run_devs):.1f}% | "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
