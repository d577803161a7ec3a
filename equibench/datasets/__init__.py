"""Tasks: one file each, registered with ``@register_task`` (found in the sources and imported
when first asked for, like the methods)."""
from __future__ import annotations

from .base import Task, cache_dir

__all__ = ["Task", "cache_dir"]
