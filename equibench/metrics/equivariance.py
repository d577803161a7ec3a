"""Equivariance error and Lie derivative (DESIGN.md, "Metrics").

For K sampled elements g = (R, t, P) (R in O(3) or SO(3) per ``group``, a translation when the
task has ``"point"`` inputs, a within-graph node permutation P), per graph b:

    rel_b(g) = || f(g.X)_b - rho_out(g) f(X)_b || / (|| f(X)_b || + eps_B)

(Frobenius norm over the graph's nodes and components), with eps_B = eps + ``SCALE_FLOOR`` x the
median over the measured graphs of || f(X)_b ||: a graph whose output happens to be near zero (a
standardised molecular target close to its mean) is measured against a hundredth of a typical
output rather than against its own tiny norm, which would turn a float32 rounding error of 1e-7
into a "relative" error of 1e-3 for any method (docs/design.md, deviations). Reported: mean, median and max of rel
over graphs and samples, and ``abs_max`` = max |f(g.X) - rho_out(g) f(X)| elementwise.

For ``"point"`` outputs (n-body predicts future positions) ||f(X)|| is dominated by where the
particles already are, so the same error is also reported relative to the predicted
*displacement*, with x the input positions of the task's first point field (their graph centroid
for graph-level outputs):

    disp_rel_b(g) = || f(g.X)_b - g f(X)_b || / (|| f(X)_b - x_b || + eps)

as ``disp_rel_mean``, ``disp_rel_median`` and ``disp_rel_max`` (absent for other output types).
Models run in eval mode, without gradients, in ``dtype``; a model whose parameters are in
another dtype is copied and cast (which cannot fix e3nn's constants: build the model under
``default_dtype(torch.float64)`` for a structural float64 measurement, as the runner does).

The Lie derivative along so(3) generator A_k is d/ds [rho_out(exp(-sA_k)) f(exp(sA_k).X)] at
s = 0, taken by a central difference of the *true* function in float64 (see docs/design.md:
autograd's jvp would miss the dependence through detached frames of frame averaging and
canonicalisation).

Probes (``metrics/probe.py``): ``equivariance`` (fp32 and fp64, at init and trained, under the
task's group and, where the task declares one, the group its environment breaks) and
``lie_derivative`` (fp64, graph3d) run these on the first test graphs of every task point.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.utils import scatter

from ..core.registry import register_probe
from ..core.spec import TaskSpec
from ..symmetry import group2d, group3d
from ..symmetry.fieldtypes import POINT
from ..symmetry.group3d import GroupElement, OneParameterElement, act_on_batch, act_on_output, lie_generators
from ..symmetry.precision import default_dtype, dtype_name
from .catalogue import (
    DTYPES,
    EQUIVARIANCE_STATS,
    FLOORS,
    LIE_STATS,
    STAGES,
    STAT_WORDS,
    MetricSpec,
    broken_equivariance_metric,
    equivariance_metric,
    lie_metric,
)
from .probe import Probe, ProbeContext, ProbeSettings, Reading, reading

EPS = 1e-12


def cast_batch(batch: Batch, dtype: torch.dtype) -> Batch:
    """A copy of ``batch`` with every floating tensor in ``dtype``."""
    new = batch.clone()
    for key in list(new.keys()):
        val = new[key]
        if torch.is_tensor(val) and val.is_floating_point():
            new[key] = val.to(dtype)
    return new


def model_in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` itself if its floating parameters/buffers are all ``dtype``; else a cast copy."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.dtype == dtype for t in tensors if t.is_floating_point()):
        return model
    if dtype == torch.float64:
        warnings.warn("equivariance_error: casting a model to float64 after building it; constants "
                      "made at build time (e3nn) keep their precision. Build under "
                      "default_dtype(torch.float64) for a structural measurement.", stacklevel=3)
    return copy.deepcopy(model).to(dtype)


#: the denominator floor of the relative errors, as a fraction of the median per-graph output norm
SCALE_FLOOR = 1e-2


def output_scale(norms: torch.Tensor) -> torch.Tensor:
    """Per-graph denominators ``norms + eps + SCALE_FLOOR * median(norms)`` of the relative errors."""
    return norms + EPS + SCALE_FLOOR * norms.median()


def _per_graph_norm(x: torch.Tensor, spec: TaskSpec, batch: Batch) -> torch.Tensor:
    sq = x.reshape(x.shape[0], -1).pow(2).sum(-1)
    if spec.level == "node":
        sq = scatter(sq, batch.batch, dim=0, dim_size=int(batch.num_graphs), reduce="sum")
    return sq.sqrt()


def group_actions(spec: TaskSpec):
    """The module implementing ``sample_element``, ``act_on_batch`` and ``act_on_output`` for the
    task's domain (graph3d: E(3) on typed fields; image2d: planar rotations/reflections)."""
    if spec.domain == "image2d":
        return group2d
    return group3d


def _device(model: nn.Module, batch: Batch) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else batch.batch.device


def _summary(rel: torch.Tensor, abs_max: float, **extra: Any) -> dict[str, Any]:
    rel = rel.double()
    return {"rel_mean": rel.mean().item(), "rel_median": rel.median().item(),
            "rel_max": rel.max().item(), "abs_max": abs_max, **extra}


def _displacement_norm(fx: torch.Tensor, spec: TaskSpec, batch: Batch) -> torch.Tensor | None:
    """Per-graph ||f(X) - x|| for a ``"point"`` output (x: the input positions of the first point
    field, their graph centroid at graph level); None for other outputs or without a point input."""
    if spec.output != POINT or not spec.point_fields:
        return None
    x = batch[spec.point_fields[0]].to(fx.dtype)
    if spec.level == "graph":
        x = scatter(x, batch.batch, dim=0, dim_size=int(batch.num_graphs), reduce="mean")
    return _per_graph_norm(fx - x, spec, batch)


@torch.no_grad()
def equivariance_error(model: nn.Module, batch: Batch, spec: TaskSpec, n_samples: int = 8,
                       dtype: torch.dtype = torch.float64, group: str | None = None,
                       seed: int = 0, permute: bool = True) -> dict[str, Any]:
    """Relative equivariance error of ``model`` on ``batch`` (see module docstring).

    ``group`` defaults to the task's group (E(3) with reflections for n-body); pass "SO3"/"SE3"
    for a method that only claims rotations. Returns ``rel_mean``, ``rel_median``, ``rel_max``,
    ``abs_max``, ``n_samples``, ``n_graphs``, ``dtype`` and ``group``; for ``"point"`` outputs also
    ``disp_rel_mean``, ``disp_rel_median`` and ``disp_rel_max`` (relative to ||f(X) - x||).
    """
    group = group or spec.group
    actions = group_actions(spec)
    disp_rels: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(seed)
    model = model_in_dtype(model, dtype)
    was_training = model.training
    model.eval()
    try:
        with default_dtype(dtype):
            x = cast_batch(batch, dtype).to(_device(model, batch))
            fx = model(x)
            disp = _displacement_norm(fx, spec, x) if spec.domain == "graph3d" else None
            scale = output_scale(_per_graph_norm(fx, spec, x))
            disp_scale = output_scale(disp) if disp is not None else None
            rels, abs_max = [], 0.0
            elements = [actions.sample_element(x, group, gen, permute=permute).to(dtype, x.batch.device)
                        for _ in range(n_samples)]
            for xs, fxs, g, fgx in _sample_chunks(model, x, fx, elements, spec):
                diff = fgx - actions.act_on_output(fxs, spec, g, xs)
                perm = getattr(g, "perm", None)
                num = _per_graph_norm(diff, spec, xs if perm is None else _permuted(xs, g))
                rels.append(num / scale.repeat(len(num) // len(scale)))
                if disp_scale is not None:
                    disp_rels.append(num / disp_scale.repeat(len(num) // len(disp_scale)))
                abs_max = max(abs_max, diff.abs().max().item())
    finally:
        model.train(was_training)
    extra: dict[str, Any] = {}
    if disp_rels:
        d = torch.cat(disp_rels).double()
        extra = {"disp_rel_mean": d.mean().item(), "disp_rel_median": d.median().item(),
                 "disp_rel_max": d.max().item()}
    return _summary(torch.cat(rels), abs_max, n_samples=n_samples, n_graphs=int(batch.num_graphs),
                    dtype=dtype_name(dtype), group=group, **extra)


#: the group samples of a graph measurement run as one forward over copies of the batch, up to this
#: many nodes per forward (the rest in further forwards)
MAX_BATCHED_NODES = 20_000
#: a batched forward whose untransformed copy is further than this from f(X) (relative to max |f(X)|)
#: shows a model that couples the graphs of a batch: its samples are measured one forward each
BATCH_COUPLING_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _identity(g: GroupElement, n_nodes: int) -> GroupElement:
    perm = None if g.perm is None else torch.arange(n_nodes, device=g.perm.device)
    return GroupElement(torch.eye(3, dtype=g.R.dtype, device=g.R.device).expand_as(g.R).clone(),
                        torch.zeros_like(g.t), perm)


def _sample_chunks(model: nn.Module, x: Batch, fx: torch.Tensor, elements: list[Any], spec: TaskSpec):
    """``(batch, f(X), g, f(g.X))`` per group of samples. On graphs the elements are stacked over
    copies of ``x`` (``group3d.stack_elements``, as many per forward as ``MAX_BATCHED_NODES``
    allows) behind one untransformed copy: when that copy's output differs from f(X) beyond
    rounding (``BATCH_COUPLING_TOL``: the model couples the graphs of a batch, which the stacked
    forward would misread as an equivariance error), the samples run one forward each, as on
    images (also when the stacked forward raises: a model that only runs at the batch it was
    given). The relative errors come out sample-major either way."""
    N = int(x.num_nodes)
    per = max(1, min(len(elements), MAX_BATCHED_NODES // max(N, 1) - 1))
    if spec.domain == "graph3d" and len(elements) > 1 and per > 1:
        chunks = [elements[i:i + per] for i in range(0, len(elements), per)]
        outs = []
        try:
            for chunk in chunks:
                g = group3d.stack_elements([_identity(chunk[0], N), *chunk], N)
                outs.append(model(group3d.act_on_batch(group3d.repeat_batch(x, len(chunk) + 1), spec, g,
                                                       target=False)))
        except Exception:  # a model that only runs at the batch it was given: one forward per sample
            outs = []
        split = fx.shape[0]
        tol = BATCH_COUPLING_TOL.get(fx.dtype, 1e-4) * (fx.abs().max().item() + EPS)
        if outs and all(o.shape[0] == split * (len(c) + 1) and (o[:split] - fx).abs().max().item() <= tol
                        for o, c in zip(outs, chunks)):
            for chunk, out in zip(chunks, outs):
                k = len(chunk)
                yield (group3d.repeat_batch(x, k), fx.repeat(k, *([1] * (fx.dim() - 1))),
                       group3d.stack_elements(chunk, N), out[split:])
            return
    for g in elements:
        yield x, fx, g, model(group_actions(spec).act_on_batch(x, spec, g, target=False))


def _permuted(batch: Batch, g: GroupElement) -> Batch:
    """A light view whose ``batch`` vector follows the permuted node order (for per-graph norms)."""
    view = Batch()
    view.batch = batch.batch[g.perm]
    view._num_graphs = int(batch.num_graphs)
    return view


@torch.no_grad()
def lie_derivative(model: nn.Module, batch: Batch, spec: TaskSpec, step: float = 1e-4,
                   dtype: torch.dtype = torch.float64, generators: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
    """Norm of the Lie derivative along the so(3) generators ``generators`` (0, 1, 2 = rotations
    about x, y, z; an axial group such as "O2z" has only z: ``group3d.lie_generators``), relative
    to ||f(X)|| per graph: ``rel_mean`` / ``rel_max`` over graphs and generators (central
    difference, ``step``)."""
    model = model_in_dtype(model, dtype)
    was_training = model.training
    model.eval()
    try:
        with default_dtype(dtype):
            device = _device(model, batch)
            x = cast_batch(batch, dtype).to(device)
            fx = model(x)
            B = int(x.num_graphs)
            base = dict(R=torch.eye(3, dtype=dtype, device=device).expand(B, 3, 3),
                        t=torch.zeros(B, 3, dtype=dtype, device=device))
            rels, abs_max = [], 0.0

            def pulled_back(k: int, s: float) -> torch.Tensor:
                out = model(act_on_batch(x, spec, OneParameterElement(**base, k=k, s=s), target=False))
                return act_on_output(out, spec, OneParameterElement(**base, k=k, s=-s), x)

            for k in generators:
                deriv = (pulled_back(k, step) - pulled_back(k, -step)) / (2 * step)
                rels.append(_per_graph_norm(deriv, spec, x) / output_scale(_per_graph_norm(fx, spec, x)))
                abs_max = max(abs_max, deriv.abs().max().item())
    finally:
        model.train(was_training)
    return _summary(torch.cat(rels), abs_max, dtype=dtype_name(dtype), step=step)


# ---------------------------------------------------------------------------------------------
# probes

def _equivariance_specs() -> tuple[MetricSpec, ...]:
    specs = []
    for stage in STAGES:
        for dtype in DTYPES:
            for stat in EQUIVARIANCE_STATS:
                specs.append(MetricSpec(
                    equivariance_metric(stage, dtype, stat), f"equiv. err {dtype} {stage}, {STAT_WORDS[stat]}",
                    "equivariance", direction="lower", aggregate="max" if stat.endswith("_max") else "mean",
                    stage=stage, dtype=dtype, stat=stat, number_format="sci",
                    floor=FLOORS[dtype] if "rel_" in stat else None,
                    watch=stage == "trained" and stat == "rel_mean",
                    description="||f(g·X) − ρ(g) f(X)|| over test graphs and group samples; relative: / ||f(X)||; "
                                "relative to displacement (point outputs): / ||f(X) − x||"))
            for stat in EQUIVARIANCE_STATS:
                specs.append(MetricSpec(
                    broken_equivariance_metric(stage, dtype, stat),
                    f"broken-group equiv. err {dtype} {stage}, {STAT_WORDS[stat]}", "equivariance_broken",
                    direction=None, aggregate="max" if stat.endswith("_max") else "mean", stage=stage, dtype=dtype,
                    stat=stat, number_format="sci", floor=FLOORS[dtype] if "rel_" in stat else None,
                    description="||f(g·X) − ρ(g) f(X)|| as for 'equivariance', with g drawn from the group the "
                                "task's environment breaks (TaskSpec.broken_group, e.g. E(3) for nbody_field; "
                                "the symmetry-breaking field itself is held fixed): how far a model follows "
                                "the symmetry the data do not have. Context, not a score: an accurate model "
                                "must break it"))
    return tuple(specs)


@register_probe("equivariance")
class EquivarianceProbe(Probe):
    """Equivariance error (``equivariance_error``) of the float32 model as deployed and of its
    float64 copy, at init and trained, on the first ``graphs`` test graphs: under the measured
    group (``equivariance.*``) and under the task's broken group where it declares one
    (``equivariance_broken.*``)."""

    METRICS = _equivariance_specs()
    phases = ("init", "trained")
    order = 10

    class Settings(ProbeSettings):
        samples: int = 8  # group elements sampled per graph (suite key equivariance_samples)
        graphs: int = 32  # test graphs measured (suite key equivariance_graphs)

    def measure(self, ctx: ProbeContext, phase: str) -> list[Reading]:
        fp64 = ctx.float64()  # first: a build reseeds, as it did before the float32 measurement
        measured = [(ctx.group, equivariance_metric)]
        if ctx.broken_group is not None:
            measured.append((ctx.broken_group, broken_equivariance_metric))
        batch, out = ctx.test_batch(self.settings.graphs), []
        for dtype, model in ((torch.float32, ctx.model), (torch.float64, fp64)):
            for group, metric in measured:
                res = equivariance_error(model.to(ctx.device), batch, ctx.spec, n_samples=self.settings.samples,
                                         dtype=dtype, group=group, seed=ctx.seed)
                out += [reading(metric(phase, dtype_name(dtype), stat), res[stat], stage=phase,
                                dtype=dtype_name(dtype), group=group, batch_size=res["n_graphs"],
                                repeats=res["n_samples"])
                        for stat in EQUIVARIANCE_STATS if stat in res]  # disp_*: point outputs only
        return out


@register_probe("lie_derivative")
class LieDerivativeProbe(Probe):
    """Relative Lie derivative (``lie_derivative``) of the float64 model along the generators of
    the measured group, at init and trained, on the first ``graphs`` test graphs (graph3d)."""

    METRICS = tuple(MetricSpec(
        lie_metric(stage, stat), f"Lie deriv. fp64 {stage}, {STAT_WORDS[stat]}", "lie_derivative",
        direction="lower", aggregate="max" if stat == "rel_max" else "mean", stage=stage, dtype="fp64",
        stat=stat, number_format="sci", description="relative Lie derivative of the fp64 model")
        for stage in STAGES for stat in LIE_STATS)
    phases = ("init", "trained")
    order = 30
    domains = ("graph3d",)
    keys = {"equivariance_graphs": "graphs"}

    class Settings(ProbeSettings):
        graphs: int = 32

    def measure(self, ctx: ProbeContext, phase: str) -> list[Reading]:
        batch, generators = ctx.test_batch(self.settings.graphs), lie_generators(ctx.group)
        lie = lie_derivative(ctx.float64().to(ctx.device), batch, ctx.spec, generators=generators)
        return [reading(lie_metric(phase, stat), lie[stat], stage=phase, dtype="fp64", group=ctx.group,
                        batch_size=int(batch.num_graphs), repeats=len(generators)) for stat in LIE_STATS]

