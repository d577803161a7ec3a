"""Degeneracy stress test: equivariance error on inputs where frames are ill-defined.

Frame-based methods (frame averaging, PCA / learned canonicalisation) build a frame from the
positions; the frame is undefined when covariance eigenvalues tie or the input is symmetric.
Two curves, both rewriting ONLY the first point field of each graph (velocities, charges, ...
stay as in the batch) and then measuring the relative equivariance error exactly as
``equibench.metrics.equivariance.equivariance_error`` does (same sampling of g = (R, t, P) from
``seed``, same per-graph ``rel = ||f(gX) - rho(g) f(X)|| / (||f(X)|| + eps_B)``, eps_B the
floor of ``equivariance.output_scale`` over the graphs with a finite output):

* ``degeneracy_curve``: the centred cloud of each graph is rescaled along its principal axes
  so that C = sum_i (x_i - t)(x_i - t)^T gets eigenvalues s * (1, 1 + gap, 3) (centroid t and
  principal directions kept; s = tr C / (5 + gap) keeps the overall spread when
  ``keep_scale``, else s = 1). As gap -> 0 the two smallest eigenvalues tie; the largest is 3,
  not 2, so that gap = 1 is a well-separated reference ((1, 2, 2) would tie the top pair).
  Graphs whose cloud is (numerically) planar or collinear cannot be rescaled and are left out.
* ``symmetric_curve``: every graph's points are replaced by an exactly symmetric
  configuration (``symmetric_configurations``: regular polygon, pyramid, tetrahedron,
  octahedron, cube, mirror-symmetric cloud, collinear, coincident), randomly oriented, with
  the graph's centroid and RMS radius. Configurations that do not fit a graph's node count are
  left out for that graph; a configuration fitting no graph gives no row.

Non-finite outputs never raise: ``nonfinite`` is the fraction of non-finite output entries over
f(X) and all f(gX); a (graph, sample) pair with any non-finite entry is excluded from the error
statistics (all pairs excluded -> NaN statistics). Rows: ``gap`` (or ``config``), ``rel_mean``,
``rel_median``, ``rel_max``, ``abs_max``, ``nonfinite``, ``n_graphs``, ``n_samples``.

Probe ``degeneracy`` (``metrics/probe.py``, off by default): both curves of the trained fp64 model
on the first test graphs (``degeneracy.*`` rows, graph3d).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.utils import scatter

from ..core.registry import register_probe
from ..core.spec import TaskSpec
from ..symmetry.group3d import act_on_batch, act_on_output, sample_element, sample_rotations
from ..symmetry.precision import default_dtype
from .catalogue import DEGENERACY_AXES, DEGENERACY_STATS, STAT_WORDS, MetricSpec, degeneracy_metric
from .equivariance import EPS, SCALE_FLOOR, cast_batch, model_in_dtype
from .probe import Probe, ProbeContext, ProbeSettings, Reading, reading

DEFAULT_GAPS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-8, 0.0)
DEFAULT_CONFIGS = ("polygon", "pyramid", "tetrahedron", "octahedron", "cube", "mirror", "line", "coincident")
_RANK_TOL = 1e-10
TOP_EIGENVALUE = 3.0


# ---- equivariance statistics that tolerate non-finite outputs -------------------------------
def _graph_rows(batch: Batch, spec: TaskSpec, n_rows: int, perm: torch.Tensor | None) -> torch.Tensor:
    if spec.level == "graph":
        return torch.arange(n_rows, device=batch.batch.device)
    return batch.batch if perm is None else batch.batch[perm]


def _per_graph(x: torch.Tensor, rows: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Frobenius norm, all-finite flag) of each graph's rows of ``x``."""
    flat = x.reshape(x.shape[0], -1)
    bad = (~torch.isfinite(flat)).any(-1).double()
    sq = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0).double().pow(2).sum(-1)
    norm = scatter(sq, rows, dim=0, dim_size=B, reduce="sum").sqrt()
    return norm, scatter(bad, rows, dim=0, dim_size=B, reduce="sum") == 0


@torch.no_grad()
def robust_equivariance_error(model: nn.Module, batch: Batch, spec: TaskSpec, n_samples: int = 4,
                              dtype: torch.dtype = torch.float64, group: str | None = None,
                              seed: int = 0) -> dict[str, Any]:
    """``equivariance_error``'s statistics with non-finite outputs counted and excluded."""
    group = group or spec.group
    gen = torch.Generator().manual_seed(seed)
    model = model_in_dtype(model, dtype)
    was_training = model.training
    model.eval()
    try:
        with default_dtype(dtype):
            device = next((p.device for p in model.parameters()), batch.edge_index.device)
            x = cast_batch(batch, dtype).to(device)
            B = int(x.num_graphs)
            fx = model(x)
            n_fx, ok_fx = _per_graph(fx, _graph_rows(x, spec, fx.shape[0], None), B)
            floor = SCALE_FLOOR * n_fx[ok_fx].median() if ok_fx.any() else n_fx.new_zeros(())
            n_bad = (~torch.isfinite(fx)).sum().item()
            n_all = fx.numel()
            rels, abs_max = [], 0.0
            for _ in range(n_samples):
                g = sample_element(x, group, gen, permute=True).to(dtype, device)
                fgx = model(act_on_batch(x, spec, g, target=False))
                n_bad += (~torch.isfinite(fgx)).sum().item()
                n_all += fgx.numel()
                diff = fgx - act_on_output(fx, spec, g, x)
                n_diff, ok = _per_graph(diff, _graph_rows(x, spec, diff.shape[0], g.perm), B)
                ok = ok & ok_fx
                rels.append((n_diff / (n_fx + EPS + floor))[ok])
                finite = torch.isfinite(diff)
                if finite.any():
                    abs_max = max(abs_max, diff[finite].abs().max().item())
    finally:
        model.train(was_training)
    rel = torch.cat(rels).double()
    nan = float("nan")
    return {"rel_mean": rel.mean().item() if rel.numel() else nan,
            "rel_median": rel.median().item() if rel.numel() else nan,
            "rel_max": rel.max().item() if rel.numel() else nan,
            "abs_max": abs_max if rel.numel() else nan,
            "nonfinite": n_bad / max(n_all, 1), "n_graphs": B, "n_samples": n_samples}


# ---- batch surgery ------------------------------------------------------------------------------
def _subset(batch: Batch, keep: torch.Tensor) -> Batch:
    """The graphs of ``batch`` where ``keep`` (``[B]`` bool) is true."""
    if bool(keep.all()):
        return batch
    idx = keep.nonzero().flatten().tolist()
    return Batch.from_data_list([batch.get_example(i) for i in idx])


def _with_points(batch: Batch, spec: TaskSpec, pos: torch.Tensor) -> Batch:
    new = batch.clone()
    new[spec.point_fields[0]] = pos
    return new


def _centred(pos: torch.Tensor, index: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = scatter(pos, index, dim=0, dim_size=B, reduce="mean")
    return pos - t[index], t


def _covariance(c: torch.Tensor, index: torch.Tensor, B: int) -> torch.Tensor:
    outer = (c.unsqueeze(-1) * c.unsqueeze(-2)).reshape(-1, 9)
    return scatter(outer, index, dim=0, dim_size=B, reduce="sum").reshape(B, 3, 3)


def with_eigenvalues(batch: Batch, spec: TaskSpec, gap: float, keep_scale: bool = True) -> Batch:
    """``batch`` (float64) with each graph's first point field rescaled along its principal axes
    so that the covariance eigenvalues are s * (1, 1 + gap, 3) (module docstring). All graphs
    must have full-rank clouds (``degeneracy_curve`` drops the others first)."""
    point = spec.point_fields[0]
    pos = batch[point].double()
    B = int(batch.num_graphs)
    c, t = _centred(pos, batch.batch, B)
    lam, V = torch.linalg.eigh(_covariance(c, batch.batch, B))  # ascending
    target = torch.tensor([1.0, 1.0 + gap, TOP_EIGENVALUE], dtype=torch.float64)
    scale = lam.sum(-1, keepdim=True) / target.sum() if keep_scale else torch.ones(B, 1, dtype=torch.float64)
    stretch = (target * scale / lam).sqrt()  # [B, 3]
    M = V @ torch.diag_embed(stretch) @ V.transpose(-1, -2)  # symmetric: x -> V S V^T x
    new_c = torch.einsum("nij,nj->ni", M[batch.batch], c)
    return _with_points(batch, spec, t[batch.batch] + new_c)


def full_rank(batch: Batch, spec: TaskSpec) -> torch.Tensor:
    """``[B]`` bool: the graph's centred cloud spans 3-D (smallest / largest eigenvalue > 1e-10)."""
    pos = batch[spec.point_fields[0]].double()
    B = int(batch.num_graphs)
    c, _ = _centred(pos, batch.batch, B)
    lam = torch.linalg.eigvalsh(_covariance(c, batch.batch, B))
    return lam[:, 0] > _RANK_TOL * lam[:, 2].clamp_min(1e-300)


def degeneracy_curve(model: nn.Module, batch: Batch, spec: TaskSpec, gaps: Sequence[float] = DEFAULT_GAPS,
                     n_samples: int = 4, dtype: torch.dtype = torch.float64, group: str | None = None,
                     seed: int = 0, keep_scale: bool = True) -> list[dict[str, Any]]:
    """Equivariance error as the two smallest covariance eigenvalues approach a tie (one row per
    gap; module docstring). Raises ``ValueError`` if the task has no point field or no graph of
    ``batch`` spans 3-D."""
    if not spec.point_fields:
        raise ValueError(f"task {spec.name!r} has no point field: no degeneracy curve")
    base = cast_batch(batch, torch.float64)
    keep = full_rank(base, spec)
    if not bool(keep.any()):
        raise ValueError("degeneracy_curve: no graph of the batch has a 3-D (full-rank) point cloud")
    base = _subset(base, keep)
    rows = []
    for gap in gaps:
        b = with_eigenvalues(base, spec, float(gap), keep_scale)
        rows.append({"gap": float(gap), **robust_equivariance_error(model, b, spec, n_samples, dtype,
                                                                    group, seed)})
    return rows


# ---- exactly symmetric configurations ----------------------------------------------------------
def _shells(vertices: Sequence[Sequence[float]], n: int) -> torch.Tensor | None:
    """``n // m`` concentric copies (radii 1, 1/2, ...) of an m-vertex solid, plus the centre if
    ``n % m == 1``; None if ``n % m`` is anything else (the symmetry would break)."""
    m = len(vertices)
    k, r = divmod(n, m)
    if k == 0 or r > 1:
        return None
    v = torch.tensor(vertices, dtype=torch.float64)
    pts = [v * 0.5**i for i in range(k)] + ([torch.zeros(1, 3, dtype=torch.float64)] if r else [])
    return torch.cat(pts)


def _polygon(n: int, z: float = 0.0) -> torch.Tensor:
    ang = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    return torch.stack([ang.cos(), ang.sin(), torch.full_like(ang, z)], dim=-1)


def _config(name: str, n: int, gen: torch.Generator) -> torch.Tensor | None:
    f64 = torch.float64
    if name == "polygon":  # D_n in a plane: eigenvalues (a, a, 0)
        return _polygon(n) if n >= 3 else None
    if name == "pyramid":  # C_(n-1)v: a regular base plus an apex on the axis, tie in the base plane
        if n < 4:
            return None
        return torch.cat([_polygon(n - 1, -1.0 / (n - 1)), torch.tensor([[0.0, 0.0, 1.0]], dtype=f64)])
    if name == "tetrahedron":  # T_d: isotropic covariance
        return _shells([(1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)], n)
    if name == "octahedron":  # O_h
        return _shells([(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)], n)
    if name == "cube":  # O_h
        return _shells(list(itertools.product((1.0, -1.0), repeat=3)), n)
    if name == "mirror":  # C_s: a generic cloud mirrored in z = 0 (zero third moment along z)
        if n < 2:
            return None
        flip = torch.tensor([1.0, 1.0, -1.0], dtype=f64)
        half = torch.randn(n // 2, 3, generator=gen, dtype=f64)
        on_plane = torch.randn(n % 2, 3, generator=gen, dtype=f64) * torch.tensor([1.0, 1.0, 0.0], dtype=f64)
        return torch.cat([half, half * flip, on_plane])
    if name == "line":  # D_inf_h: collinear, equally spaced
        if n < 2:
            return None
        return torch.linspace(-1, 1, n, dtype=f64)[:, None] * torch.tensor([1.0, 0.0, 0.0], dtype=f64)
    if name == "coincident":  # every point at the centroid: zero covariance, zero edge vectors
        return torch.zeros(n, 3, dtype=f64)
    raise ValueError(f"unknown symmetric configuration {name!r} (known: {', '.join(DEFAULT_CONFIGS)})")


def symmetric_configurations(n: int, names: Sequence[str] = DEFAULT_CONFIGS,
                             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The configurations of ``names`` that exist for ``n`` points: ``name -> [n, 3]`` float64,
    centred, RMS radius 1 (0 for "coincident"), in a fixed orientation."""
    gen = generator or torch.Generator().manual_seed(0)
    out = {}
    for name in names:
        p = _config(name, n, gen)
        if p is None:
            continue
        p = p - p.mean(0)
        rms = p.pow(2).sum(-1).mean().sqrt()
        out[name] = p / rms if rms > 0 else p
    return out


def _symmetric_batch(batch: Batch, spec: TaskSpec, name: str, gen: torch.Generator) -> Batch | None:
    point = spec.point_fields[0]
    pos = batch[point].double()
    B = int(batch.num_graphs)
    c, t = _centred(pos, batch.batch, B)
    rms = scatter(c.pow(2).sum(-1), batch.batch, dim=0, dim_size=B, reduce="mean").sqrt()
    Q = sample_rotations(B, True, gen)
    counts = torch.bincount(batch.batch, minlength=B).tolist()
    new_pos, keep = [], []
    for b, n in enumerate(counts):
        p = symmetric_configurations(n, (name,), gen).get(name)
        keep.append(p is not None)
        if p is not None:
            new_pos.append(t[b] + rms[b] * p @ Q[b].T)
        else:
            new_pos.append(pos[batch.batch == b])
    keep_t = torch.tensor(keep)
    if not keep_t.any():
        return None
    order = torch.argsort(batch.batch, stable=True)  # nodes are grouped by graph in a PyG batch
    out = torch.empty_like(pos)
    out[order] = torch.cat(new_pos)
    return _subset(_with_points(batch, spec, out), keep_t)


def symmetric_curve(model: nn.Module, batch: Batch, spec: TaskSpec, configs: Sequence[str] = DEFAULT_CONFIGS,
                    n_samples: int = 4, dtype: torch.dtype = torch.float64, group: str | None = None,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Equivariance error on exactly symmetric point configurations (one row per configuration
    that fits at least one graph; module docstring)."""
    if not spec.point_fields:
        raise ValueError(f"task {spec.name!r} has no point field: no symmetric curve")
    base = cast_batch(batch, torch.float64)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name in configs:
        b = _symmetric_batch(base, spec, name, gen)
        if b is None:
            continue
        rows.append({"config": name, **robust_equivariance_error(model, b, spec, n_samples, dtype,
                                                                 group, seed)})
    return rows


@register_probe("degeneracy")
class DegeneracyProbe(Probe):
    """The degeneracy curves (``degeneracy_curve`` over eigenvalue gaps, ``symmetric_curve`` over
    symmetric configurations) of the trained fp64 model on the first ``graphs`` test graphs
    (graph3d; off by default: ``degeneracy: true``)."""

    METRICS = tuple(MetricSpec(
        degeneracy_metric(axis, stat), f"degeneracy ({axis}) {STAT_WORDS[stat]}", "degeneracy",
        direction="lower", aggregate="max" if stat != "rel_mean" else "mean", stage="trained", dtype="fp64",
        stat=stat, axis=axis, number_format="sci", log_scale=stat != "nonfinite",
        description="equivariance error (fp64, trained) near degenerate inputs")
        for axis in DEGENERACY_AXES for stat in DEGENERACY_STATS)
    phases = ("trained",)
    order = 40
    domains = ("graph3d",)
    enabled = False
    keys = {"equivariance_graphs": "graphs"}

    class Settings(ProbeSettings):
        graphs: int = 32

    def measure(self, ctx: ProbeContext, phase: str) -> list[Reading]:
        batch, model, out = ctx.test_batch(self.settings.graphs), ctx.float64().to(ctx.device), []
        for curve in (degeneracy_curve, symmetric_curve):
            for r in curve(model, batch, ctx.spec, group=ctx.group):
                axis = "gap" if "gap" in r else "config"
                x = r[axis]
                out += [reading(degeneracy_metric(axis, stat), r[stat], stage=phase, dtype="fp64", group=ctx.group,
                                x=x if axis == "gap" else None, x_label=str(x), batch_size=int(batch.num_graphs))
                        for stat in DEGENERACY_STATS]
        return out


__all__ = ["DEFAULT_CONFIGS", "DEFAULT_GAPS", "DegeneracyProbe", "degeneracy_curve", "full_rank",
           "robust_equivariance_error", "symmetric_configurations", "symmetric_curve", "with_eigenvalues"]
