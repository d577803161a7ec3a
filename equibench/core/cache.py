"""Where equibench keeps files it can rebuild: generated datasets, library caches (e.g. the
equiformer-pytorch basis). One root, ``$EQUIBENCH_CACHE`` or ``$XDG_CACHE_HOME/equibench``
(default ``~/.cache/equibench``), shared by the layers above (datasets and methods)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the on-disk cache: ``$EQUIBENCH_CACHE`` or ``~/.cache/equibench`` (created)."""
    root = os.environ.get("EQUIBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "equibench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
