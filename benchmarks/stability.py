"""Repeatability of ``measure_throughput``: are repeated measurements of one model the same?

    python benchmarks/stability.py [--methods baseline,e3nn] [--runs 5] [--clock wall,cpu]

For each method and clock, ``runs`` independent measurements (each: warm-up, ``repeats``
samples, median) of the same model on the same n-body batch; prints every run's median, the
median of medians, the largest relative deviation of a run from it and PASS when that is within
``--tolerance`` (5%). Not an asv benchmark (asv collects only time_/track_/peakmem_ names); the
asv ``track_repeatability_*`` benchmark in bench_methods.py runs the same check.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="baseline,e3nn")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
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
          f"runs={args.runs} repeats={args.repeats} min_sample_s={args.min_sample_s} load={os.getloadavg()[0]:.1f}")
    for method in args.methods.split(","):
        model = build(method)
        for clock in args.clock.split(","):
            t0 = time.perf_counter()
            r = repeatability(model, batch, args.mode, args.device, runs=args.runs, repeats=args.repeats,
                              min_sample_s=args.min_sample_s, threads=args.threads, clock=clock)
            ok = r["max_rel_dev"] <= args.tolerance
            failed += not ok
            meds = " ".join(f"{m * 1e3:.3f}" for m in r["medians_s"])
            iqr = " ".join(f"{100 * q:.1f}" for q in r["iqr_rel"])
            print(f"{method:16s} clock={clock:4s} medians[ms]: {meds} | median of medians "
                  f"{r['median_of_medians_s'] * 1e3:.3f} ms | max deviation {100 * r['max_rel_dev']:.2f}% | "
                  f"IQR/median per run [%]: {iqr} | {'PASS' if ok else 'FAIL'} (tolerance "
                  f"{100 * args.tolerance:g}%) | {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}",
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
