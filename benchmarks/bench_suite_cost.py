"""The suite's own cost, tracked by asv so a regression shows in the nightly history (issue 20, item 6).

* ``SuiteTimeSplit``: one run of a suite (``smoke`` in the fast profile, ``quick`` in the regular
  one) through the engine with warm workers, split into

      training    = sum over task points of ``train.wall_s`` (the optimiser's time),
      measurement = sum of (finished_at - started_at) inside the worker - training
                    (data, equivariance, symmetric inputs, throughput, profile, floors),
      overhead    = sum of the engine's end-to-end ``wall_s`` per point - (finished_at - started_at)
                    (worker start, job files, result collection),

  as seconds and as shares of the task points' end-to-end time; plus the run's wall time. A run
  with ``--jobs`` records per point the seconds its worker was stopped for another worker's timing
  (``paused_s``): they are taken out of both differences (the benchmark itself runs one job).
* ``WrapperOverhead``: each backbone wrapper's inference time over the shared backbone's
  (``benchmarks/bench_overhead.py``: same batch of 50 graphs, 20k parameters, one thread,
  interleaved ``blocked_autorange``, median ratio over rounds); frame averaging per frame.

``benchmarks/bench_worker.py`` tracks the per-point overhead of a trivial point.
"""
from __future__ import annotations

import datetime as dt
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import CLOCK, PROFILE, Benchmark

SUITE = "smoke" if PROFILE == "fast" else "quick"
WRAPPERS = ["canonicalization", "pca_canonicalization", "tensor_frames", "local_canonicalization",
            "frame_averaging", "fa_gnn"]


def _seconds(a: Any, b: Any) -> float:
    return (dt.datetime.fromisoformat(str(b)) - dt.datetime.fromisoformat(str(a))).total_seconds()


def time_split(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Training, measurement and overhead seconds of the task points in ``rows`` (module docstring)."""
    points: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("status") != "ok" or not r.get("started_at") or not r.get("finished_at"):
            continue
        paused = float(r.get("paused_s") or 0.0)  # --jobs: stopped for another worker's timing (not this point's)
        p = points.setdefault(str(r["spec_hash"]), {"train": 0.0,
                                                    "inside": _seconds(r["started_at"], r["finished_at"]) - paused,
                                                    "wall": float(r.get("wall_s") or 0.0) - paused})
        if r["metric"] == "train.wall_s":
            p["train"] = float(r["value"])
    train = sum(p["train"] for p in points.values())
    inside = sum(p["inside"] for p in points.values())
    wall = sum(p["wall"] for p in points.values())
    return {"training_s": train, "measurement_s": inside - train, "overhead_s": max(wall - inside, 0.0),
            "points_s": wall, "points": float(len(points))}


class SuiteTimeSplit(Benchmark):
    """Where one run of the suite's task points spends its time (``track_*``: seconds and shares)."""
    repeat = (1, 1, 3600.0)
    number = 1
    timeout = 3600

    def setup_cache(self) -> dict[str, float]:
        import equibench as eb
        from equibench.results.store import read_records
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            eb.run(SUITE, results_dir=Path(tmp), run_name="cost", progress=False, extras=False)
            run_s = time.perf_counter() - t0
            rows = [r for r in read_records(Path(tmp) / "cost") if r.get("bench", "task") == "task"]
        return {**time_split(rows), "run_s": run_s}

    def track_training_share(self, split: dict[str, float]) -> float:
        return split["training_s"] / split["points_s"]

    def track_measurement_share(self, split: dict[str, float]) -> float:
        return split["measurement_s"] / split["points_s"]

    def track_overhead_share(self, split: dict[str, float]) -> float:
        return split["overhead_s"] / split["points_s"]

    def track_overhead_per_point_s(self, split: dict[str, float]) -> float:
        return split["overhead_s"] / split["points"]

    def track_run_s(self, split: dict[str, float]) -> float:
        return split["run_s"]

    track_training_share.unit = track_measurement_share.unit = track_overhead_share.unit = "share"  # type: ignore
    track_overhead_per_point_s.unit = track_run_s.unit = "seconds"  # type: ignore


class WrapperOverhead(Benchmark):
    """Inference time of each wrapper / the shared backbone's (per frame for frame averaging)."""
    param_names = ["task", "method"]
    params = (["nbody", "normals"], WRAPPERS)
    repeat = (1, 1, 600.0)
    number = 1

    def setup(self, task: str, method: str) -> None:
        super().setup()
        from .bench_overhead import ratios
        self.row = ratios(task, [method], graphs=50, params=20000, rounds=3, min_run_time=0.2, clock=CLOCK)[0]

    def track_ratio(self, task: str, method: str) -> float:
        return float(self.row["ratio"])

    def track_ratio_per_frame(self, task: str, method: str) -> float:
        return float(self.row["per_frame"] or self.row["ratio"])

    track_ratio.unit = track_ratio_per_frame.unit = "x backbone"  # type: ignore
