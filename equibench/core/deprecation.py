"""Old import paths of moved modules: they keep working for one release and warn.

``MOVED`` maps each old dotted path to the module's new home. ``import equibench`` installs
``MovedModuleFinder`` at the end of ``sys.meta_path``, so importing an old path (which no file
provides any more) yields a module holding the new module's public names and issues an
``EquibenchDeprecationWarning`` pointing at the importing line, naming the new place and
``equibench`` (where the public names live). No alias is a file, so nothing that walks the
package's files (the built-in method/task discovery, the layering test) sees them.
``EquibenchDeprecationWarning`` is a ``DeprecationWarning`` that ``import equibench`` sets to be
shown (Python hides DeprecationWarning outside ``__main__``, i.e. in every plugin file).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence

REMOVED_IN = "0.3"
#: old module path -> new module path (the layout before the core/symmetry/metrics split)
MOVED = {
    "equibench.suite.registry": "equibench.core.registry",
    "equibench.suite.spec": "equibench.core.spec",
    "equibench.suite.errors": "equibench.core.errors",
    "equibench.suite.fieldtypes": "equibench.symmetry.fieldtypes",
    "equibench.suite.precision": "equibench.symmetry.precision",
    "equibench.suite.group": "equibench.symmetry.group3d",
    "equibench.suite.equivariance": "equibench.metrics.equivariance",
    "equibench.suite.throughput": "equibench.metrics.throughput",
    "equibench.methods.backbone": "equibench.methods.blocks.backbone",
    "equibench.suite.limits": "equibench.engine.launch",
    # the split of suite/ into plan/, engine/ and results/ (issue 21)
    "equibench.suite.suites": "equibench.plan.suites",
    "equibench.suite.tuned": "equibench.plan.tuned",
    "equibench.suite.store": "equibench.results.store",
    **{f"equibench.suite.{m}": f"equibench.engine.{m}"
       for m in ("engine", "runner", "executors", "launch", "worker", "warm", "jobs", "envs", "lock")},
}
#: packages that no longer exist -> where their modules went: each is a virtual, empty package
#: (no file) so that its moved submodules above still import (and warn)
MOVED_PACKAGES = {"equibench.suite": "equibench.plan, equibench.engine and equibench.results"}


class EquibenchDeprecationWarning(DeprecationWarning):
    """A deprecated equibench import path or API (removed in the release ``REMOVED_IN``)."""


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of ``MOVED`` (only when no file provides them) and loads each as an
    alias of its new module."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED and fullname not in MOVED_PACKAGES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname in MOVED_PACKAGES)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ in MOVED_PACKAGES:  # an empty package: its moved submodules warn when imported
            module.__path__ = []
            module.__doc__ = f"Deprecated: {module.__name__} was split into {MOVED_PACKAGES[module.__name__]}."
            return
        old, new = module.__name__, MOVED[module.__name__]
        target = importlib.import_module(new)
        names = getattr(target, "__all__", None) or [n for n in vars(target) if not n.startswith("_")]
        vars(module).update({n: getattr(target, n) for n in names})
        module.__doc__ = f"Deprecated alias of {new} (moved); import from ``equibench`` instead."
        # stacklevel 2: past this method; importlib's own frames are skipped, so the warning
        # points at the line that imported the old path
        warnings.warn(f"{old} moved to {new} and will be removed in equibench {REMOVED_IN}; "
                      "import the public names from 'equibench' instead (e.g. `from equibench import ...`)",
                      EquibenchDeprecationWarning, stacklevel=2)


def install() -> None:
    """Put ``MovedModuleFinder`` on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
