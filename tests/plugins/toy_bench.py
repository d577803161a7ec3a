"""A toy bench (kind ``toy``) whose points do what their config says, for the engine's tests.

Points with the same ``group`` run in one worker, in order. ``action``: ``rows`` (one row with
the number of history rows it was given, the worker's pid and its parent's), ``exit`` (prints a
progress bar and an error line to stderr, then ``os._exit(3)``), ``sleep`` (sleeps ``seconds``),
``sigkill`` (the worker SIGKILLs itself), ``kill_parent`` (SIGKILLs the worker's parent when
that is a warm parent, i.e. not the runner, then waits to be killed with it), ``parallel`` (a
matrix product over 2 intra-op threads, which hangs in a forked child whose parent had started
OpenMP's pool; the row's value is its trace).
"""
from __future__ import annotations

import os
import signal
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
        if action == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "kill_parent" and os.getppid() != int(os.environ.get("EQUIBENCH_PARENT_PID", "0")):
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(60)  # PR_SET_PDEATHSIG ends this process with its parent
        if action == "parallel":
            import torch
            torch.set_num_threads(2)
            x = torch.eye(512, dtype=torch.float64) * 2.0
            return [{"metric": "trace", "value": float(torch.trace(x @ x)), "pid": os.getpid(),
                     "ppid": os.getppid(), "threads": torch.get_num_threads()}]
        return [{"metric": "history_rows", "value": len(history), "pid": os.getpid(), "ppid": os.getppid(),
                 "history_names": [r.get("name") for r in history]}]
