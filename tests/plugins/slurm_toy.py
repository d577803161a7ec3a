"""A toy bench (kind ``slurm_toy``) for tests/test_slurm.py: points that finish, sleep or grow.

``action``: ``rows`` (one row: the worker's pid, the Slurm ids it sees and its hostname),
``sleep`` (sleeps ``seconds``, then a row), ``block`` (waits until the file named by
$EQUIBENCH_TEST_RELEASE exists, at most ``seconds``, then a row), ``hog`` (touches ``mib`` MiB in
32 MiB steps, holds it for ``seconds``, then a row). A point's hash is its name, so a test can
find its row.
"""
from __future__ import annotations

import os
import socket
import time

from equibench.benches.base import Bench, Point, register_bench
from equibench.core.registry import register_method
from equibench.methods.base import Method


@register_method("slurm_toy_noop")
class SlurmToyNoop(Method):
    """Registered so the plugin loads (a plugin must register a method or a task)."""


@register_bench("slurm_toy")
class SlurmToyBench(Bench):
    """Points from a list of (name, action, seconds, mib)."""

    def __init__(self, actions: list[tuple[str, str, float, int]]) -> None:
        self.actions = actions

    def points(self) -> list[Point]:
        return [Point(bench=self.kind, hash=f"slurmtoy-{name}", label=f"slurm_toy/{name}",
                      config={"action": action, "seconds": seconds, "mib": mib},
                      identity={"task": "slurm_toy", "method": "slurm_toy_noop", "seed": 0, "name": name})
                for name, action, seconds, mib in self.actions]

    @classmethod
    def run_point(cls, point: Point, history: list[dict]) -> list[dict]:
        action, seconds = point.config["action"], float(point.config["seconds"])
        if action == "sleep":
            time.sleep(seconds)
        if action == "block":
            release, end = os.environ.get("EQUIBENCH_TEST_RELEASE", ""), time.monotonic() + seconds
            while not (release and os.path.exists(release)) and time.monotonic() < end:
                time.sleep(0.2)
        if action == "hog":
            chunks = []
            while len(chunks) * 32 < int(point.config["mib"]):
                chunks.append(bytearray(b"\1" * (32 * 2**20)))  # written, hence resident
                time.sleep(0.02)
            time.sleep(seconds)
        return [{"metric": "pid", "value": os.getpid(), "host": socket.gethostname(),
                 "env_slurm_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
                 "env_slurm_task_id": os.environ.get("SLURM_ARRAY_TASK_ID")}]
