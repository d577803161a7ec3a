"""equibench: accuracy, equivariance error and throughput of equivariance methods, side by side.

Public API (DESIGN.md)::

    import equibench as eb
    eb.list_tasks(); eb.list_methods()
    task = eb.get_task("nbody"); method = eb.get_method("e3nn")
    model = method.build(task.spec, seed=0)
    eb.equivariance_error(model, batch, task.spec)
    eb.measure_throughput(model, batch, mode="inference")
    df = eb.run("smoke", results_dir="results")
    eb.write_report("results/<run>", "reports/<name>")
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "TaskSpec": "equibench.core.spec", "RunSpec": "equibench.core.spec",
    "UserError": "equibench.core.errors",
    "register_method": "equibench.core.registry", "register_task": "equibench.core.registry",
    "get_method": "equibench.core.registry", "get_task": "equibench.core.registry",
    "list_methods": "equibench.core.registry", "list_tasks": "equibench.core.registry",
    "load_plugin": "equibench.core.registry",
    "equivariance_error": "equibench.metrics.equivariance", "lie_derivative": "equibench.metrics.equivariance",
    "measure_throughput": "equibench.metrics.throughput",
    "run": "equibench.suite.runner", "run_one": "equibench.benches.taskrun",
    "load_results": "equibench.suite.store", "write_report": "equibench.report.build",
    "Method": "equibench.methods.base", "Task": "equibench.datasets.base",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:  # lazy: `import equibench` stays cheap
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'equibench' has no attribute {name!r}")
