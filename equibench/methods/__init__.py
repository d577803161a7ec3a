"""Method adapters: one file each, registered with ``@register_method``.

Importing this package imports every module in it, so dropping a new adapter file here is all
it takes to register it. A module whose optional dependency is missing (escnn) registers
nothing; the reason is kept in ``unavailable`` and shown by ``equibench list``. The ``blocks``
subpackage (shared building blocks, no registrations) is not a method module: it is skipped here
and imported by the methods that use it.
"""
from __future__ import annotations

from ..core.autoimport import import_submodules
from .base import Method, build_at_params, count_parameters

unavailable: dict[str, str] = import_submodules(__name__, __path__, skip=("base", "blocks"))

__all__ = ["Method", "build_at_params", "count_parameters", "unavailable"]
