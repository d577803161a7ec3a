"""Cost against size: ``equibench scale`` sweeps one size axis at a time for each method.

Axes: ``nodes`` (nodes per graph), ``batch`` (graphs per batch), ``width`` (the method's
``width`` option, or ``mul`` for irreps networks) and ``lmax`` (methods with an ``lmax`` option);
the axes not swept stay at their base values. Inputs are synthetic graphs of the task's spec
(``synthetic_batch``): every typed field filled with standard normals, positions uniform at unit
density, and edges to the ``k`` nearest neighbours, so the edge count grows linearly with the
nodes (the complete graph of n-body would be quadratic and is not what large systems use).

Each point is one ``measure_throughput`` call (median/IQR over repeats, peak memory, FLOPs) and
becomes tidy rows (``task="scaling"``, ``x`` = size, ``x_label`` = axis) appended as one block to
``results/<name>/records.jsonl``; a point already finished is skipped on resume. The cost exponent
is the least-squares slope of log(cost) against log(size) over the upper part of the sweep
(``fit_exponent``), where fixed per-call overheads no longer dominate.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from ..core.errors import UserError
from ..symmetry.fieldtypes import POINT, field_dim
from ..symmetry.precision import default_dtype, parse_dtype
from ..core.spec import TaskSpec

AXES = ("nodes", "batch", "width", "lmax")
COST_METRICS = ("time_s", "time_iqr_s", "graphs_per_s", "nodes_per_s", "peak_mem_bytes", "flops", "gflops_per_s")


def synthetic_batch(spec: TaskSpec, nodes: int, graphs: int = 1, k: int = 8, seed: int = 0) -> Batch:
    """``graphs`` random graphs of ``nodes`` nodes with every field of ``spec``.

    Positions are uniform in a cube of side ``nodes ** (1/3)`` (unit density, so neighbour
    distances do not shrink with size); other fields are standard normals of their type's
    dimension; edges j -> i join each node i to its ``k`` nearest neighbours j (``edge_index[0]``
    = source); edge inputs are standard normals; ``y`` is a random target of the output type.
    """
    from scipy.spatial import cKDTree
    if nodes < 2 or graphs < 1:
        raise UserError(f"synthetic graphs need >= 2 nodes and >= 1 graph, got {nodes} nodes, {graphs} graphs")
    rng = np.random.default_rng(seed)
    k = min(k, nodes - 1)
    dt = torch.get_default_dtype()
    data = []
    for _ in range(graphs):
        pos = rng.uniform(0.0, nodes ** (1 / 3), size=(nodes, 3))
        _, nbr = cKDTree(pos).query(pos, k=k + 1)
        dst = np.repeat(np.arange(nodes), k)
        src = nbr[:, 1:].reshape(-1)
        fields: dict[str, torch.Tensor] = {}
        for name, t in spec.inputs.items():
            value = pos if t == POINT else rng.standard_normal((nodes, field_dim(t)))
            fields[name] = torch.as_tensor(value, dtype=dt)
        for name, t in spec.edge_inputs.items():
            fields[name] = torch.as_tensor(rng.standard_normal((len(src), field_dim(t))), dtype=dt)
        rows = nodes if spec.level == "node" else 1
        fields["y"] = torch.as_tensor(rng.standard_normal((rows, field_dim(spec.output))), dtype=dt)
        data.append(Data(edge_index=torch.as_tensor(np.stack([src, dst]), dtype=torch.long), num_nodes=nodes,
                         **fields))
    return Batch.from_data_list(data)


def fit_exponent(x: Any, y: Any, tail: float = 0.5, min_points: int = 3) -> dict[str, float]:
    """Fit ``y = a * x ** slope`` by least squares in log-log over the largest ``tail`` fraction
    of the points (at least ``min_points``, or all when fewer); returns slope, log10 a, r2 and
    the x range used."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return {"slope": float("nan"), "log10_a": float("nan"), "r2": float("nan"), "n": float(len(x)),
                "x_min": float("nan"), "x_max": float("nan")}
    order = np.argsort(x)
    x, y = x[order], y[order]
    n = min(len(x), max(min_points, math.ceil(tail * len(x))))
    lx, ly = np.log10(x[-n:]), np.log10(y[-n:])
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + intercept)
    ss = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss if ss > 0 else 1.0
    return {"slope": float(slope), "log10_a": float(intercept), "r2": r2, "n": float(n),
            "x_min": float(x[-n]), "x_max": float(x[-1])}


@dataclass(frozen=True)
class ScaleConfig:
    """One scaling sweep. Sizes not swept stay at ``base_nodes`` / ``base_batch`` and the
    method's own defaults (``method_options`` per method override them)."""
    task: str = "nbody"
    methods: tuple[str, ...] = ("baseline", "frame_averaging", "tensor_frames", "e3nn")
    axes: tuple[str, ...] = ("nodes",)
    nodes: tuple[int, ...] = (16, 64, 256, 1024, 4096, 16384)
    batch: tuple[int, ...] = (1, 4, 16, 64)
    width: tuple[int, ...] = (16, 32, 64, 128)
    lmax: tuple[int, ...] = (0, 1, 2, 3)
    base_nodes: int = 256
    base_batch: int = 1
    k: int = 8
    mode: str = "inference"
    device: str = "cpu"
    dtype: str = "fp32"
    warmup: int = 2
    repeats: int = 5
    min_sample_s: float = 0.02
    max_warmup_samples: int = 2
    threads: int = 1
    clock: str = "wall"
    flops: bool = True
    max_call_s: float = 5.0
    seed: int = 0
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [a for a in self.axes if a not in AXES]
        if bad:
            raise UserError(f"unknown scaling axis {bad} (known: {', '.join(AXES)})")
        from ..metrics.throughput import MODES
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r} (known: {', '.join(MODES)})")
        parse_dtype(self.dtype)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {self.device!r} requested but CUDA is not available")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def size_option(method: str, axis: str) -> str | None:
    """The method option an axis sets: ``width`` (or ``mul``) for width, ``lmax`` for lmax."""
    from ..core.registry import method_class
    params = inspect.signature(method_class(method).__init__).parameters
    names = {"width": ("width", "mul"), "lmax": ("lmax",)}.get(axis, ())
    return next((n for n in names if n in params), None)


def _hash(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sweep_points(cfg: ScaleConfig) -> list[dict[str, Any]]:
    """Every (method, axis, x) point of ``cfg`` with its batch shape, options and spec hash;
    points of an axis a method has no option for are marked ``not_applicable``."""
    points = []
    for method in cfg.methods:
        for axis in cfg.axes:
            opt = size_option(method, axis) if axis in ("width", "lmax") else None
            for x in getattr(cfg, axis):
                nodes = x if axis == "nodes" else cfg.base_nodes
                graphs = x if axis == "batch" else cfg.base_batch
                options = dict(cfg.method_options.get(method, {}))
                if opt:
                    options[opt] = int(x)
                p = {"method": method, "axis": axis, "x": int(x), "nodes": int(nodes), "graphs": int(graphs),
                     "method_options": options, "option": opt,
                     "status": "not_applicable" if axis in ("width", "lmax") and opt is None else "ok"}
                ident = {k: v for k, v in cfg.to_dict().items() if k not in ("methods", "axes", "nodes", "batch",
                                                                                   "width", "lmax", "method_options",
                                                                                   "max_call_s")}
                p["spec_hash"] = _hash({**ident, **{k: p[k] for k in ("method", "axis", "x", "nodes", "graphs",
                                                                         "method_options")}})
                points.append(p)
    return points


def measure_point(cfg: ScaleConfig, p: dict[str, Any], model_cache: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Build (or reuse) the model and a synthetic batch for one point and measure it; returns
    tidy rows (without run-level columns). Errors become one ``failed`` row."""
    from ..core.registry import get_method, get_task
    from ..suite.runner import build_model
    from ..metrics.throughput import measure_throughput
    from ..methods.base import count_parameters
    spec = get_task(cfg.task).spec
    dtype = parse_dtype(cfg.dtype)
    key = json.dumps([p["method"], p["method_options"]], sort_keys=True)
    cache = model_cache if model_cache is not None else {}
    if key not in cache:
        cache.clear()  # one model alive at a time (memory at large sizes)
        method = get_method(p["method"], **p["method_options"])
        reason = method.supports(spec)
        cache[key] = (None, reason) if reason else (build_model(method, spec, cfg.seed, dtype), None)
    model, reason = cache[key]
    if reason:
        return [{"metric": "status", "value": None, "status": "not_applicable", "error": reason}]
    with default_dtype(dtype):
        batch = synthetic_batch(spec, p["nodes"], p["graphs"], cfg.k, cfg.seed)
    res = measure_throughput(model, batch, cfg.mode, cfg.device, warmup=cfg.warmup, repeats=cfg.repeats,
                             min_sample_s=cfg.min_sample_s, threads=cfg.threads, flops=cfg.flops, clock=cfg.clock,
                             max_warmup_samples=cfg.max_warmup_samples)
    ctx = {k: res[k] for k in ("mode", "dtype", "device_name", "batch_nodes", "batch_edges", "repeats", "threads",
                               "timer", "calls_per_sample", "mem_method", "stable", "load_avg_1min")}
    ctx.update(batch_size=res["batch_graphs"], params=count_parameters(model), compiled=False,
               spread_iqr_s=res["time_iqr_s"], status="ok", error="")
    values = {"time_s": res["time_median_s"], "time_iqr_s": res["time_iqr_s"], "graphs_per_s": res["graphs_per_s"],
              "nodes_per_s": res["nodes_per_s"], "peak_mem_bytes": res["peak_mem_bytes"], "flops": res["flops"],
              "gflops_per_s": res["gflops_per_s"]}
    return [{"metric": m, "value": float(v), **ctx} for m, v in values.items() if v is not None]


def run_scaling(cfg: ScaleConfig, results_dir: str | Path = "results", run_name: str | None = None,
                progress: Callable[[str], None] | None = functools.partial(print, flush=True)) -> Path:
    """Measure every point of ``cfg`` not yet in ``results_dir/run_name``; returns the run dir.

    A point whose time per call, extrapolated linearly from the last measured size of its
    (method, axis), exceeds ``max_call_s`` is recorded as ``skipped`` instead of measured."""
    from ..core.envinfo import environment, git_commit, package_versions
    from ..suite.store import append_block, completed_specs, read_records, write_json_atomic, write_parquet
    run_name = run_name or f"scaling-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(results_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "env.json").exists():
        write_json_atomic(run_dir / "env.json", environment())
    write_json_atomic(run_dir / "scaling_config.json", cfg.to_dict())
    done = completed_specs(run_dir)
    last: dict[tuple[str, str], tuple[int, float]] = {}  # (method, axis) -> (x, time per call) measured
    for r in read_records(run_dir):  # on resume, continue from the largest size measured so far
        if r.get("metric") == "time_s" and r.get("status") == "ok":
            key = (r["method"], r["x_label"])
            if key not in last or r["x"] > last[key][0]:
                last[key] = (int(r["x"]), float(r["value"]))
    cache: dict[str, Any] = {}
    base = {"run_id": run_name, "task": "scaling", "seed": cfg.seed, "device": cfg.device,
            "git_commit": git_commit(), "versions": package_versions(), "k_neighbours": cfg.k,
            "clock": cfg.clock, "scaling_task": cfg.task}
    for p in sweep_points(cfg):
        if p["spec_hash"] in done:
            continue
        t0 = time.perf_counter()
        where = {"method": p["method"], "spec_hash": p["spec_hash"], "x": p["x"], "x_label": p["axis"],
                 "nodes_per_graph": p["nodes"], "method_options": p["method_options"]}
        slow = None
        if (p["method"], p["axis"]) in last:  # cost grows at least linearly: extrapolate from the last point
            x0, t0_call = last[(p["method"], p["axis"])]
            predicted = t0_call * max(1.0, p["x"] / x0)
            if predicted > cfg.max_call_s:
                slow = (f"skipped: {p['axis']}={x0} took {t0_call:.3g} s per call, so {p['axis']}={p['x']} would take "
                        f">= {predicted:.3g} s (> max_call_s {cfg.max_call_s:g})")
        if p["status"] == "not_applicable":
            rows = [{"metric": "status", "value": None, "status": "not_applicable",
                     "error": f"{p['method']} has no option for axis {p['axis']!r}"}]
        elif slow:
            rows = [{"metric": "status", "value": None, "status": "skipped", "error": slow}]
        else:
            try:
                rows = measure_point(cfg, p, cache)
            except Exception as err:  # an OOM or a method failing at some size is a result
                rows = [{"metric": "status", "value": None, "status": "failed", "error": f"{type(err).__name__}: {err}"}]
                cache.clear()
        t_call = next((r["value"] for r in rows if r["metric"] == "time_s"), None)
        if t_call is not None:
            last[(p["method"], p["axis"])] = (p["x"], t_call)
        wall = time.perf_counter() - t0
        append_block(run_dir, [{**base, **where, **r, "wall_s": wall} for r in rows])
        if progress:
            status = rows[0]["status"]
            msg = f"{t_call * 1e3:.3g} ms/call" if t_call is not None else rows[0].get("error", "")
            progress(f"scaling {p['method']:22s} {p['axis']:6s}={p['x']:<6d} {status:14s} {msg}")
    write_parquet(run_dir)
    return run_dir


def exponents(df: "Any", metric: str = "time_s", tail: float = 0.5) -> "Any":
    """Fitted exponent per (method, axis) of ``metric`` from scaling rows (a DataFrame with
    columns method, x_label, x, metric, value, status); mean over repeated rows per point."""
    import pandas as pd
    s = df[(df["task"] == "scaling") & (df["status"] == "ok") & (df["metric"] == metric)]
    out = []
    for (method, axis), g in s.groupby(["method", "x_label"]):
        pts = g.groupby("x")["value"].mean()
        fit = fit_exponent(pts.index.to_numpy(), pts.to_numpy(), tail=tail)
        out.append({"method": method, "axis": axis, "metric": metric, **fit,
                    "y_at_min": float(pts.iloc[0]), "y_at_max": float(pts.iloc[-1]),
                    "x_first": float(pts.index[0]), "x_last": float(pts.index[-1]), "points": len(pts)})
    return pd.DataFrame(out)
