"""Deprecated alias: ``equibench.suite.fieldtypes`` moved to ``equibench.symmetry.fieldtypes``.

Import the public names from ``equibench`` instead; this module goes in equibench 0.3.
"""
from ..core.deprecation import moved_module

moved_module(__name__, "equibench.symmetry.fieldtypes")
