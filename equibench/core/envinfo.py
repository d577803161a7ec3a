"""What a result was measured with: package versions, git commit, device, threads, and how busy
the machine was (``os.getloadavg``: the 1-, 5- and 15-minute load averages before and after a
run, beside the number of CPUs this process may use; a load above that number means other work
competed for the cores, and wall-clock timings of that run are not comparable)."""
from __future__ import annotations

import datetime as dt
import functools
import os
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


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (runnable + waiting processes), None where the OS
    has none (Windows)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def load_record(before: list[float] | None, after: list[float] | None) -> dict[str, Any]:
    """One run invocation's entry of ``env.json["load"]``: the load averages before and after,
    the CPUs and when it finished."""
    return {"before": before, "after": after, "cpus": cpu_count(),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


#: runnable threads beyond the CPUs that the load average *after* a run may show without other work: a run
#: with one worker per CPU (``--jobs``, ``scripts/run.sh``) holds every CPU itself until it ends, and its
#: runner (the coordinator thread, row writing) adds a little: measured 2.08 and 2.15 after two paper-cpu
#: runs with two workers on 2 CPUs and nothing else running
AFTER_TOLERANCE = 0.5


def loaded(record: dict[str, Any]) -> bool:
    """Whether a ``load_record`` shows a loaded machine: a 1-minute load average above the number of
    CPUs before the run, or above the CPUs plus ``AFTER_TOLERANCE`` after it (that average includes the
    run's own workers over its last minute)."""
    cpus = record.get("cpus") or cpu_count()
    before, after = record.get("before"), record.get("after")
    return ((isinstance(before, list) and bool(before) and before[0] > cpus)
            or (isinstance(after, list) and bool(after) and after[0] > cpus + AFTER_TOLERANCE))


def environment() -> dict[str, Any]:
    """Everything for ``env.json``: versions, commit, host, threads and torch's collect_env."""
    from torch.utils import collect_env
    try:
        pretty = collect_env.get_pretty_env_info()
    except Exception as err:  # collect_env shells out; never let it fail a run
        pretty = f"collect_env failed: {err}"
    return {"versions": package_versions(), "git_commit": git_commit(), "python": platform.python_version(),
            "platform": platform.platform(), "torch_threads": torch.get_num_threads(), "cpus": cpu_count(),
            "load_avg_at_start": load_average(),
            "cuda_available": torch.cuda.is_available(), "collect_env": pretty}
