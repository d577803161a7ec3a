"""A toy bench (kind ``toy``) whose points do what their config says, for the engine's tests.

Points with the same ``group`` run in one worker, in order. ``action``: ``rows`` (one row with
the number of history rows it was given and the worker's pid), ``exit`` (prints a progress bar
and an error line to stderr, then ``os._exit(3)``), ``sleep`` (sleeps ``seconds``).
"""
from __future__ import annotations

import os
import sys
import time

from equibench.benches.base import Bench, Point, register_bench
from equibench.core.registry import register_method
from equibench.methods.base import Method


@register_method("toy_noop")
class ToyNoop(Method):
    """Registered so the plugin loads (a plugin must register a method or a task)."""


@register_bench("toy")
class ToyBench(Bench):
    """Points from a list of (name, action, group, seconds)."""

    def __init__(self, actions: list[tuple[str, str, str, float]]) -> None:
        self.actions = actions

    def points(self) -> list[Point]:
        return [Point(bench=self.kind, hash=f"toy{i:02d}{name}", label=f"toy/{name}",
                      config={"action": action, "seconds": seconds},
                      identity={"task": "toy", "method": "toy_noop", "seed": 0, "name": name}, group=group)
                for i, (name, action, group, seconds) in enumerate(self.actions)]

    @classmethod
    def run_point(cls, point: Point, history: list[dict]) -> list[dict]:
        action = point.config["action"]
        if action == "exit":
            sys.stderr.write("\r 10%|#         | 1/10 [00:01<00:09]\r 50%|#####     | 5/10 [00:02<00:02]")
            sys.stderr.write("\nfatal: the toy point broke\n\r 60%|######    | 6/10 [00:03<00:02]")
            sys.stderr.flush()
            os._exit(3)
        if action == "sleep":
            time.sleep(point.config["seconds"])
        return [{"metric": "history_rows", "value": len(history), "pid": os.getpid(),
                 "history_names": [r.get("name") for r in history]}]
