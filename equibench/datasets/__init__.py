"""Tasks: one file each, registered with ``@register_task`` (imported automatically)."""
from __future__ import annotations

from ..core.autoimport import import_submodules
from .base import Task, cache_dir

unavailable: dict[str, str] = import_submodules(__name__, __path__, skip=("base",))

__all__ = ["Task", "cache_dir", "unavailable"]
