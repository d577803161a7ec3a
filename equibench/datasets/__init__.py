"""Tasks: one file each, registered with ``@register_task`` (imported automatically)."""
from __future__ import annotations

from .base import Task, cache_dir
from ..core.autoimport import import_submodules

unavailable: dict[str, str] = import_submodules(__name__, __path__, skip=("base",))

__all__ = ["Task", "cache_dir", "unavailable"]
