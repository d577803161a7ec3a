"""Aliases of moved modules: the old import path keeps working for one release and warns.

A module that moved leaves a file at its old path that calls ``moved_module(__name__, new)``:
the old module then *is* the new one's namespace (every public name re-exported) and importing
it issues an ``EquibenchDeprecationWarning`` naming the new place (and ``equibench``, where the
public names live). ``EquibenchDeprecationWarning`` is a ``DeprecationWarning`` that
``import equibench`` sets to be shown (Python hides DeprecationWarning outside ``__main__``).
"""
from __future__ import annotations

import importlib
import sys
import warnings

REMOVED_IN = "0.3"


class EquibenchDeprecationWarning(DeprecationWarning):
    """A deprecated equibench import path or API (removed in the release ``REMOVED_IN``)."""


def moved_module(old: str, new: str) -> None:
    """Fill module ``old`` with the public names of ``new`` and warn its importer."""
    target = importlib.import_module(new)
    names = getattr(target, "__all__", None) or [n for n in vars(target) if not n.startswith("_")]
    vars(sys.modules[old]).update({n: getattr(target, n) for n in names})
    # stacklevel 3: past this function and the alias module (importlib frames are skipped)
    warnings.warn(f"{old} moved to {new} and will be removed in equibench {REMOVED_IN}; "
                  f"import the public names from 'equibench' instead (e.g. `from equibench import ...`)",
                  EquibenchDeprecationWarning, stacklevel=3)
