"""What a result was measured with: package versions, git commit, device, threads."""
from __future__ import annotations

import functools
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("equibench", "torch", "e3nn", "torch_geometric", "numpy", "scipy", "escnn", "pandas",
            "trimesh", "pybullet", "qm9pack", "tblite", "ase", "mlxtend", "scikit-learn")


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """``<sha>`` of the checkout equibench runs from (``+dirty`` with local changes), or "unknown"."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, Any]:
    """Everything for ``env.json``: versions, commit, host, threads and torch's collect_env."""
    from torch.utils import collect_env
    try:
        pretty = collect_env.get_pretty_env_info()
    except Exception as err:  # collect_env shells out; never let it fail a run
        pretty = f"collect_env failed: {err}"
    return {"versions": package_versions(), "git_commit": git_commit(), "python": platform.python_version(),
            "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available(), "collect_env": pretty}
