"""Method adapters, one registered name per module, grouped by family: ``wrappers/`` (around the
shared backbone), ``architectures/`` (intrinsically equivariant networks). ``blocks/`` holds the
shared building blocks and registers nothing.

Importing this package imports every method module, so dropping a new adapter file into a family
folder is all it takes to register it. A module whose optional dependency is missing (escnn)
registers nothing; the reason is kept in ``unavailable`` and shown by ``equibench list``.
"""
from __future__ import annotations

from .architectures import unavailable as _architectures_missing
from .base import Method, build_at_params, count_parameters
from .wrappers import unavailable as _wrappers_missing

unavailable: dict[str, str] = {**_wrappers_missing, **_architectures_missing}

__all__ = ["Method", "build_at_params", "count_parameters", "unavailable"]
