"""Per-point overhead of the engine's worker processes on a trivial point (no measurement work).

Four ways to run the same job (one point of a no-op bench, registered by a throw-away plugin):

* ``warm``: the engine's default, a child forked by the preloaded warm parent (``warm.py``,
  started once in ``setup``) and watched by ``launch.watch`` (RSS polling, marker, result file);
* ``subprocess``: the cold worker, ``python -m equibench.engine.worker JOB OUT`` started by
  ``launch.run_worker`` (Popen, then the same watching; ``EQUIBENCH_WORKER=cold``);
* ``spawn``: the old approach re-created for comparison — a ``multiprocessing`` *spawn* process
  running the same ``worker.run_job`` (so both import the same modules and write the same files);
* ``inline``: ``worker.run_job`` in this process (the floor: no process start, imports cached).

``engine`` is the whole ``run_benches`` path for 4 trivial points (lock, job files, store,
Parquet), reported per point, with warm workers (the parent already running, as for every point
of a run but the first) and ``engine_cold`` with cold ones. asv: ``time_*`` (seconds per call)
and ``track_*`` (seconds per point, median of 3). Script mode,
``python benchmarks/bench_worker.py [repeats]``, prints all with the machine's load average.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__:
    from .common import Benchmark
else:  # script mode: python benchmarks/bench_worker.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import Benchmark

PLUGIN = '''
from equibench.benches.base import Bench, Point, register_bench
from equibench.core.registry import register_method
from equibench.methods.base import Method


@register_method("noop_worker_bench")
class Noop(Method):
    """Nothing."""


@register_bench("noop")
class NoopBench(Bench):
    def __init__(self, n=1, tag=""):
        self.n, self.tag = n, tag

    def points(self):
        return [Point(bench="noop", hash=f"noop{self.tag}{i}", label=f"noop/{i}", config={},
                      identity={"task": "noop", "method": "noop_worker_bench", "seed": i}) for i in range(self.n)]

    @classmethod
    def run_point(cls, point, history):
        return [{"metric": "noop", "value": 0.0}]
'''


def _spawn_target(job: dict[str, Any], out_dir: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from equibench.engine.worker import run_job
    code = run_job(job, out_dir)
    sys.stdout.flush()
    os._exit(code)


class WorkerOverhead(Benchmark):
    """Seconds to run one trivial point in a fresh process, by launch mechanism."""

    repeat = (3, 5, 60.0)
    timeout = 900

    def setup(self, *params: Any) -> None:
        super().setup()
        from equibench.core.registry import load_plugin
        from equibench.engine.jobs import Job
        self.tmp = Path(tempfile.mkdtemp(prefix="eb-worker-bench-"))
        self.plugin = self.tmp / "noop_plugin.py"
        self.plugin.write_text(PLUGIN)
        load_plugin(self.plugin)
        from equibench.benches.base import bench_class
        self.bench_cls = bench_class("noop")
        self.job = Job(id="j", dir=self.tmp / "job", log=self.tmp / "job.log",
                       points=self.bench_cls(1).points(), python=sys.executable)
        self.job.write([str(self.plugin)], [], None)
        self.doc = json.loads(self.job.job_file.read_text())
        self.runs = 0
        from equibench.engine import warm
        t0 = time.perf_counter()
        self.warm = warm.enabled() and warm.parent_for(sys.executable, self.tmp / "logs") is not None
        self.parent_start_s = time.perf_counter() - t0  # once per runner and environment

    def teardown(self, *params: Any) -> None:
        from equibench.engine import warm
        warm.close_all()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _clean(self) -> None:
        for p in self.job.dir.iterdir():
            if p.name != "job.json":
                p.unlink()

    def run_subprocess(self) -> float:
        from equibench.engine.launch import Limits, run_worker
        self._clean()
        t0 = time.perf_counter()
        out = run_worker(sys.executable, self.job.job_file, self.job.dir, self.job.log, Limits(max_memory=2**40))
        dt = time.perf_counter() - t0
        assert out.returncode == 0 and self.job.read_result(self.job.points[0]) is not None, out
        return dt

    def run_warm(self) -> float:
        """A child of the warm parent (NaN where warm workers are unavailable)."""
        from equibench.engine import warm
        from equibench.engine.launch import STARTUP_GRACE_S, Limits, watch
        if not self.warm:
            return float("nan")
        self._clean()
        t0 = time.perf_counter()
        child = warm.start(sys.executable, self.job.job_file, self.job.dir, self.job.log, self.tmp / "logs")
        assert child is not None
        out = watch(child, self.job.dir, self.job.log, Limits(max_memory=2**40), None, time.monotonic(),
                    STARTUP_GRACE_S)
        dt = time.perf_counter() - t0
        assert out.returncode == 0 and self.job.read_result(self.job.points[0]) is not None, out
        return dt

    def run_spawn(self) -> float:
        self._clean()
        t0 = time.perf_counter()
        proc = mp.get_context("spawn").Process(target=_spawn_target,
                                               args=(self.doc, str(self.job.dir), str(self.job.log)))
        proc.start()
        proc.join()
        dt = time.perf_counter() - t0
        assert proc.exitcode == 0 and self.job.read_result(self.job.points[0]) is not None
        return dt

    def run_inline(self) -> float:
        from equibench.engine.worker import run_job
        self._clean()
        t0 = time.perf_counter()
        assert run_job(self.doc, self.job.dir) == 0
        return time.perf_counter() - t0

    def run_engine(self, n: int = 4, mode: str = "warm") -> float:
        """Seconds per point of ``run_benches`` over ``n`` trivial points (env.json pre-written),
        with ``mode`` ("warm" or "cold") workers."""
        from equibench.engine.engine import run_benches
        self.runs += 1
        run_dir = self.tmp / f"run{self.runs}"
        run_dir.mkdir()
        (run_dir / "env.json").write_text("{}")  # torch's collect_env is a one-off per run, not per point
        before = os.environ.get("EQUIBENCH_WORKER")
        os.environ["EQUIBENCH_WORKER"] = mode
        try:
            t0 = time.perf_counter()
            run_benches([self.bench_cls(n, tag=str(self.runs))], run_dir, plugins=[str(self.plugin)], progress=False)
            return (time.perf_counter() - t0) / n
        finally:
            if before is None:
                del os.environ["EQUIBENCH_WORKER"]
            else:
                os.environ["EQUIBENCH_WORKER"] = before

    def time_subprocess_worker(self) -> None:
        self.run_subprocess()

    def time_warm_worker(self) -> None:
        self.run_warm()

    def time_spawn_worker(self) -> None:
        self.run_spawn()

    def time_inline(self) -> None:
        self.run_inline()

    def track_subprocess_worker_s(self) -> float:
        return statistics.median(self.run_subprocess() for _ in range(3))
    track_subprocess_worker_s.unit = "s"

    def track_warm_worker_s(self) -> float:
        return statistics.median(self.run_warm() for _ in range(3))
    track_warm_worker_s.unit = "s"

    def track_spawn_worker_s(self) -> float:
        return statistics.median(self.run_spawn() for _ in range(3))
    track_spawn_worker_s.unit = "s"

    def track_engine_per_point_s(self) -> float:
        return statistics.median(self.run_engine() for _ in range(3))
    track_engine_per_point_s.unit = "s"

    def track_engine_cold_per_point_s(self) -> float:
        return statistics.median(self.run_engine(mode="cold") for _ in range(3))
    track_engine_cold_per_point_s.unit = "s"


def main(repeats: int = 5) -> None:
    b = WorkerOverhead()
    b.setup()
    try:
        b.run_inline()  # warm this process's imports
        load = os.getloadavg()
        results: dict[str, list[float]] = {"warm": [], "subprocess": [], "spawn": [], "inline": [], "engine": [],
                                           "engine_cold": []}
        for _ in range(repeats):  # interleaved, so host-speed drift hits every variant alike
            results["warm"].append(b.run_warm())
            results["subprocess"].append(b.run_subprocess())
            results["spawn"].append(b.run_spawn())
            results["inline"].append(b.run_inline())
            results["engine"].append(b.run_engine())
            results["engine_cold"].append(b.run_engine(mode="cold"))
        load = tuple(max(a, z) for a, z in zip(load, os.getloadavg()))
    finally:
        b.teardown()
    print(f"per-point overhead on a trivial point, median (min-max) of {repeats}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, {os.cpu_count()} CPUs, "
          f"load average (1, 5, 15 min; the larger of before/after) {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}:")
    labels = {"warm": "warm: child forked by the preloaded parent (default)",
              "subprocess": "cold: python -m equibench.engine.worker",
              "spawn": "multiprocessing spawn (old run_isolated)",
              "inline": "in-process run_job (no new interpreter)",
              "engine": "run_benches per point, warm (4 points: lock, jobs, store)",
              "engine_cold": "run_benches per point, cold (EQUIBENCH_WORKER=cold)"}
    for k, v in results.items():
        print(f"  {labels[k]:56s} {statistics.median(v):7.3f} s  ({min(v):.3f}-{max(v):.3f})")
    print(f"  {'(once per runner and environment) warm parent start':56s} {b.parent_start_s:7.3f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
