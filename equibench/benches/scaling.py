"""Cost against size: ``equibench scale`` sweeps one size axis at a time for each method.

Axes: ``nodes`` (nodes per graph), ``batch`` (graphs per batch), ``width`` (the method's
``width`` option, or ``mul`` for irreps networks) and ``lmax`` (methods with an ``lmax`` option);
the axes not swept stay at their base values. Inputs are synthetic graphs of the task's spec
(``synthetic_batch``): every typed field filled with standard normals, positions uniform at unit
density, and edges to the ``k`` nearest neighbours, so the edge count grows linearly with the
nodes (the complete graph of n-body would be quadratic and is not what large systems use).

Each point is one ``measure_throughput`` call (median/IQR over repeats, peak memory, FLOPs) and
becomes tidy rows (bench ``scaling``, the task in ``scaling_task``, ``x`` = size, ``x_label`` = axis;
a method without the axis's option raises ``NotApplicable``, a size predicted too slow
``Skipped``) appended as one block to
``results/<name>/records.jsonl``; a point already finished is skipped on resume. The cost exponent
is the least-squares slope of log(cost) against log(size) over the upper part of the sweep
(``fit_exponent``), where fixed per-call overheads no longer dominate.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import model_validator
from scipy.spatial import cKDTree
from torch_geometric.data import Batch, Data

from ..core.config import Config
from ..core.errors import NotApplicable, Skipped, UserError
from ..core.registry import get_method, get_task, method_class
from ..core.spec import TaskSpec
from ..methods.base import count_parameters
from ..metrics.catalogue import scaling_metric
from ..metrics.throughput import MODES, measure_throughput
from ..symmetry.fieldtypes import POINT, field_dim
from ..symmetry.precision import default_dtype, parse_dtype
from .base import Bench, Point, register_bench
from .taskrun import build_model

AXES = ("nodes", "batch", "width", "lmax")
TIME = scaling_metric("time_s")


def synthetic_batch(spec: TaskSpec, nodes: int, graphs: int = 1, k: int = 8, seed: int = 0) -> Batch:
    """``graphs`` random graphs of ``nodes`` nodes with every field of ``spec``.

    Positions are uniform in a cube of side ``nodes ** (1/3)`` (unit density, so neighbour
    distances do not shrink with size); other fields are standard normals of their type's
    dimension; edges j -> i join each node i to its ``k`` nearest neighbours j (``edge_index[0]``
    = source); edge inputs are standard normals; ``y`` is a random target of the output type.
    """
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


class ScaleConfig(Config):
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
    method_options: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _known_values(self) -> ScaleConfig:
        bad = [a for a in self.axes if a not in AXES]
        if bad:
            raise UserError(f"unknown scaling axis {bad} (known: {', '.join(AXES)})")
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r} (known: {', '.join(MODES)})")
        parse_dtype(self.dtype)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {self.device!r} requested but CUDA is not available")
        return self


def size_option(method: str, axis: str) -> str | None:
    """The method option an axis sets: ``width`` (or ``mul``) for width, ``lmax`` for lmax."""
    params = inspect.signature(method_class(method).__init__).parameters
    names = {"width": ("width", "mul"), "lmax": ("lmax",)}.get(axis, ())
    return next((n for n in names if n in params), None)


def _hash(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sweep_points(cfg: ScaleConfig) -> list[dict[str, Any]]:
    """Every (method, axis, x) point of ``cfg`` with its batch shape, options and spec hash;
    points of an axis a method has no option for are marked not ``applicable``."""
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
                     "applicable": not (axis in ("width", "lmax") and opt is None)}
                ident = {k: v for k, v in cfg.to_dict().items() if k not in ("methods", "axes", "nodes", "batch",
                                                                                   "width", "lmax", "method_options",
                                                                                   "max_call_s")}
                p["spec_hash"] = _hash({**ident, **{k: p[k] for k in ("method", "axis", "x", "nodes", "graphs",
                                                                         "method_options")}})
                points.append(p)
    return points


def measure_point(cfg: ScaleConfig, p: dict[str, Any],
                  model_cache: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Build (or reuse, from ``model_cache``) the model and a synthetic batch for one point and
    measure it; returns tidy rows (without run-level columns)."""
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
        raise NotApplicable(reason)
    with default_dtype(dtype):
        batch = synthetic_batch(spec, p["nodes"], p["graphs"], cfg.k, cfg.seed)
    res = measure_throughput(model, batch, cfg.mode, cfg.device, warmup=cfg.warmup, repeats=cfg.repeats,
                             min_sample_s=cfg.min_sample_s, threads=cfg.threads, flops=cfg.flops, clock=cfg.clock,
                             max_warmup_samples=cfg.max_warmup_samples)
    ctx = {k: res[k] for k in ("mode", "dtype", "device_name", "batch_nodes", "batch_edges", "repeats", "threads",
                               "timer", "calls_per_sample", "mem_method", "stable", "load_avg_1min")}
    ctx.update(batch_size=res["batch_graphs"], params=count_parameters(model), compiled=False,
               spread_iqr_s=res["time_iqr_s"])
    values = {"time_s": res["time_median_s"], "time_iqr_s": res["time_iqr_s"], "graphs_per_s": res["graphs_per_s"],
              "nodes_per_s": res["nodes_per_s"], "peak_mem_bytes": res["peak_mem_bytes"], "flops": res["flops"],
              "gflops_per_s": res["gflops_per_s"]}
    return [{"metric": scaling_metric(m), "value": float(v), **ctx} for m, v in values.items() if v is not None]


def too_slow(cfg: ScaleConfig, p: dict[str, Any], history: list[dict[str, Any]]) -> str | None:
    """Why ``p`` is skipped, or None: its time per call, extrapolated linearly (cost grows at least
    linearly with size) from the largest size of its (method, axis) measured so far, exceeds
    ``max_call_s``."""
    done = [(int(r["x"]), float(r["value"])) for r in history
            if r.get("metric") == TIME and r.get("value") is not None
            and r.get("method") == p["method"] and r.get("x_label") == p["axis"]]
    if not done:
        return None
    x0, t0 = max(done)
    predicted = t0 * max(1.0, p["x"] / x0)
    if predicted <= cfg.max_call_s:
        return None
    return (f"skipped: {p['axis']}={x0} took {t0:.3g} s per call, so {p['axis']}={p['x']} would take "
            f">= {predicted:.3g} s (> max_call_s {cfg.max_call_s:g})")


@register_bench("scaling")
class ScalingBench(Bench):
    """Cost against size: one point per (method, axis, size); the points of one (method, axis)
    share a worker (group), run in increasing size and reuse the built model."""

    _models: dict[str, Any] = {}

    def __init__(self, cfg: ScaleConfig) -> None:
        self.cfg = cfg

    def points(self) -> list[Point]:
        get_task(self.cfg.task)
        for m in self.cfg.methods:
            get_method(m, **self.cfg.method_options.get(m, {}))
        cfg = self.cfg.to_dict()
        out = []
        for p in sweep_points(self.cfg):
            identity = {"method": p["method"], "spec_hash": p["spec_hash"], "x": p["x"],
                        "x_label": p["axis"], "nodes_per_graph": p["nodes"], "method_options": p["method_options"],
                        "seed": self.cfg.seed, "device": self.cfg.device, "k_neighbours": self.cfg.k,
                        "clock": self.cfg.clock, "scaling_task": self.cfg.task}
            out.append(Point(bench=self.kind, hash=p["spec_hash"], label=f"scaling/{p['method']}/{p['axis']}={p['x']}",
                             config={"cfg": cfg, "point": p}, identity=identity, method=p["method"],
                             device=self.cfg.device, group=f"scaling/{p['method']}/{p['axis']}"))
        return out

    @classmethod
    def run_point(cls, point: Point, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        cfg = ScaleConfig.model_validate(point.config["cfg"])
        p = point.config["point"]
        if not p["applicable"]:
            raise NotApplicable(f"{p['method']} has no option for axis {p['axis']!r}")
        slow = too_slow(cfg, p, history)
        if slow:
            raise Skipped(slow)
        try:
            return measure_point(cfg, p, cls._models)
        except Exception:
            cls._models.clear()  # an OOM at one size must not keep the model alive for the next
            raise

    @classmethod
    def release(cls) -> None:
        cls._models.clear()


def exponents(df: pd.DataFrame, metric: str = TIME, tail: float = 0.5) -> pd.DataFrame:
    """Fitted exponent per (method, axis) of ``metric`` from the rows of a scaling sweep (a
    DataFrame with columns bench, method, x_label, x, metric, value; only measured rows carry a
    value); mean over repeated rows per point."""
    s = df[(df["bench"] == ScalingBench.kind) & (df["metric"] == metric) & df["value"].notna()]
    out = []
    for (method, axis), g in s.groupby(["method", "x_label"]):
        pts = g.groupby("x")["value"].mean()
        fit = fit_exponent(pts.index.to_numpy(), pts.to_numpy(), tail=tail)
        out.append({"method": method, "axis": axis, "metric": metric, **fit,
                    "y_at_min": float(pts.iloc[0]), "y_at_max": float(pts.iloc[-1]),
                    "x_first": float(pts.index[0]), "x_last": float(pts.index[-1]), "points": len(pts)})
    return pd.DataFrame(out)
