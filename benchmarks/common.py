"""Shared set-up of the asv benchmarks, in the style of scikit-learn's ``asv_benchmarks``.

Settings come from ``benchmarks/config.json``, overridden by environment variables:

* ``EQUIBENCH_ASV_PROFILE``: ``fast`` (default; 4 methods, one batch size, lmax 1-3) or
  ``regular`` (every graph method, two batch sizes, lmax 1-6, compiled e3nn);
* ``EQUIBENCH_ASV_DEVICE``: ``cpu``, ``cuda`` or ``auto`` (CUDA when available);
* ``EQUIBENCH_ASV_THREADS``: CPU threads (default 1, the stable choice on a shared machine);
* ``EQUIBENCH_ASV_CLOCK``: ``wall`` or ``cpu`` for equibench's own CPU timings (``track_*``).

Kinds of benchmark: ``time_*`` are asv's own timings (wall clock; each call ends with a CUDA
synchronise, since asv's timers know nothing about CUDA streams); ``track_*`` return equibench's
measurements — throughput from ``measure_throughput`` (CUDA events on a GPU), equivariance error,
accuracy after a short training, repeatability; ``peakmem_*`` are asv's peak RSS of the process.
"""
from __future__ import annotations

import json
import os
import timeit
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = Path(__file__).with_name("config.json")


@lru_cache(maxsize=1)
def config() -> dict[str, Any]:
    cfg = json.loads(CONFIG_FILE.read_text()) if CONFIG_FILE.exists() else {}
    env = {"profile": "EQUIBENCH_ASV_PROFILE", "device": "EQUIBENCH_ASV_DEVICE", "threads": "EQUIBENCH_ASV_THREADS",
           "clock": "EQUIBENCH_ASV_CLOCK"}
    for key, var in env.items():
        if os.environ.get(var):
            cfg[key] = os.environ[var]
    cfg.setdefault("profile", "fast")
    cfg.setdefault("device", "auto")
    cfg["threads"] = int(cfg.get("threads", 1))
    cfg.setdefault("clock", "wall")
    if cfg["profile"] not in ("fast", "regular"):
        raise ValueError(f"unknown asv profile {cfg['profile']!r} (fast, regular)")
    return cfg


PROFILE = config()["profile"]
THREADS = config()["threads"]
CLOCK = config()["clock"]
DEVICE = torch.device("cuda" if config()["device"] == "auto" and torch.cuda.is_available()
                      else ("cpu" if config()["device"] == "auto" else config()["device"]))

FAST_METHODS = ["baseline", "frame_averaging", "tensor_frames", "e3nn"]


def methods() -> list[str]:
    if PROFILE == "fast":
        return FAST_METHODS
    import equibench as eb
    from equibench.core.registry import method_class
    return [m for m in eb.list_methods() if "graph3d" in method_class(m).domains]


GRAPHS = [16] if PROFILE == "fast" else [16, 128]
LMAX = [1, 2, 3] if PROFILE == "fast" else [1, 2, 3, 4, 5, 6]
TP_IMPLS = ["e3nn", "gaunt"] + ([] if PROFILE == "fast" else ["e3nn_compiled"]) + (["cuet"] if DEVICE.type == "cuda" else [])
TASK_OPTIONS = {"train_size": 256, "val_size": 16, "test_size": 200}


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def task():
    import equibench as eb
    return eb.get_task("nbody", **TASK_OPTIONS)


def nbody_batch(graphs: int, dtype: torch.dtype = torch.float32):
    """``graphs`` n-body test graphs (the 200 test graphs repeated when more are asked for)."""
    from torch_geometric.data import Batch

    from equibench.symmetry.precision import default_dtype
    with default_dtype(dtype):
        data = task().load("test")
    return Batch.from_data_list((data * (graphs // len(data) + 1))[:graphs])


def build(method: str, dtype: torch.dtype = torch.float32, **options: Any) -> torch.nn.Module:
    """The method's model for the n-body spec, built under ``dtype`` (seed 0)."""
    import equibench as eb
    from equibench.benches.taskrun import build_model
    return build_model(eb.get_method(method, **options), task().spec, 0, dtype)


class Benchmark:
    """Base class: one process per benchmark, wall-clock timer, bounded repeats."""
    timer = timeit.default_timer
    processes = 1
    rounds = 1
    repeat = (3, 10, 10.0)  # (min, max repeats, max seconds)
    warmup_time = 0.5
    timeout = 600

    def setup(self, *params: Any) -> None:
        torch.set_num_threads(THREADS)
        torch.manual_seed(0)
