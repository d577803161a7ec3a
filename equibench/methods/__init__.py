"""Method adapters, one registered name per module, grouped by family: ``wrappers/`` (around the
shared backbone), ``architectures/`` (intrinsically equivariant networks). ``blocks/`` holds the
shared building blocks and registers nothing.

Dropping a new adapter file into a family folder is all it takes to register it: the registry
finds ``@register_method("name")`` in the sources (``core.autoimport.builtin_index``) and imports
a method's module when the method is first asked for (``equibench list`` imports them all). A
module whose optional dependency is missing registers nothing; ``equibench list`` shows why.
"""
from __future__ import annotations

from .base import Method, build_at_params, count_parameters

__all__ = ["Method", "build_at_params", "count_parameters"]
