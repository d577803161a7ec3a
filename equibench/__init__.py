"""equibench: accuracy, equivariance error and throughput of equivariance methods, side by side.

Public API (DESIGN.md): everything a plugin, a script or a notebook needs is importable from
``equibench`` itself; the submodules are private layout that may move (a moved module keeps an
alias that warns for one release)::

    import equibench as eb
    eb.list_tasks(); eb.list_methods()
    task = eb.get_task("nbody"); method = eb.get_method("e3nn")
    model = method.build(task.spec, seed=0)
    eb.equivariance_error(model, batch, task.spec)
    eb.measure_throughput(model, batch, mode="inference")
    df = eb.run("smoke", results_dir="results")
    eb.write_report("results/<run>", "reports/<name>")

    # a plugin (a file passed with --plugin, or an entry point)
    from equibench import Method, register_method, BackboneModel, build_at_params

Names resolve lazily (``import equibench`` stays cheap: torch and the rest load on first use);
``__all__`` and ``dir(equibench)`` list them all.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any

from .core.autoimport import declare_builtin
from .core.deprecation import EquibenchDeprecationWarning, install

__version__ = "0.1.0"

# public name -> the module that defines it (the layout behind the names is private)
_API = {
    # specs and errors
    "TaskSpec": "equibench.core.spec", "RunSpec": "equibench.core.spec",
    "UserError": "equibench.core.errors",
    # registries
    "register_method": "equibench.core.registry", "register_task": "equibench.core.registry",
    "get_method": "equibench.core.registry", "get_task": "equibench.core.registry",
    "list_methods": "equibench.core.registry", "list_tasks": "equibench.core.registry",
    "load_plugin": "equibench.core.registry", "register_probe": "equibench.core.registry",
    "list_probes": "equibench.core.registry",
    # field types (how each field transforms)
    "POINT": "equibench.symmetry.fieldtypes", "irreps": "equibench.symmetry.fieldtypes",
    "field_dim": "equibench.symmetry.fieldtypes", "is_invariant": "equibench.symmetry.fieldtypes",
    "representation": "equibench.symmetry.fieldtypes", "transform_field": "equibench.symmetry.fieldtypes",
    "default_dtype": "equibench.symmetry.precision",
    # metrics
    "MetricSpec": "equibench.metrics.catalogue", "register_metric": "equibench.metrics.catalogue",
    "get_metric": "equibench.metrics.catalogue", "task_metric": "equibench.metrics.catalogue",
    "method_metric": "equibench.metrics.catalogue", "Probe": "equibench.metrics.probe",
    "ProbeContext": "equibench.metrics.probe", "ProbeSettings": "equibench.metrics.probe",
    "equivariance_error": "equibench.metrics.equivariance", "lie_derivative": "equibench.metrics.equivariance",
    "measure_throughput": "equibench.metrics.throughput",
    # writing a method: the interface, parameter matching, the shared backbone
    "Method": "equibench.methods.base", "build_at_params": "equibench.methods.base",
    "count_parameters": "equibench.methods.base", "bisect_increasing": "equibench.methods.base",
    "build_irreps_sized": "equibench.methods.base",
    "Backbone": "equibench.methods.blocks.backbone", "BackboneModel": "equibench.methods.blocks.backbone",
    "BackboneLayer": "equibench.methods.blocks.backbone", "mlp": "equibench.methods.blocks.backbone",
    "node_features": "equibench.methods.blocks.backbone", "edge_geometry": "equibench.methods.blocks.backbone",
    "edge_attr_dim": "equibench.methods.blocks.backbone", "readout": "equibench.methods.blocks.backbone",
    # writing a task
    "Task": "equibench.datasets.base", "cache_dir": "equibench.datasets.base",
    "atomic_save": "equibench.datasets.base",
    # running and reading
    "run": "equibench.engine.runner", "run_suite": "equibench.engine.runner", "run_one": "equibench.benches.taskrun",
    "RunRecords": "equibench.results.store", "Status": "equibench.results.status",
    "load_results": "equibench.results.store", "write_report": "equibench.report.build",
    "write_comparison": "equibench.report.compare",
}

__all__ = sorted([*_API, "EquibenchDeprecationWarning", "__version__"])

# equibench's own deprecations are shown (Python hides DeprecationWarning outside __main__,
# which would hide them from every plugin file and notebook helper)
warnings.filterwarnings("default", category=EquibenchDeprecationWarning)
install()  # old import paths of moved modules keep working for one release (core/deprecation.py)

# the built-in plugins: the registry (core, layer 0) is a passive store and names no package above
# it; this top-level module, which composes the layers, says where the built-in registrations live
# (their sources are indexed, and a module is imported when one of its names is first asked for)
declare_builtin("method", "equibench.methods")
declare_builtin("task", "equibench.datasets")
declare_builtin("probe", "equibench.metrics")  # equivariance, Lie derivative, symmetric inputs, ...
declare_builtin("probe", "equibench.benches.training")  # the learning curve


def __getattr__(name: str) -> Any:  # lazy: `import equibench` stays cheap
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'equibench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
