"""``tensor_frames``: the shared backbone made O(3)-equivariant with local frames and tensorial
messages (Lippmann et al., "Tensor Frames", arXiv 2405.15389 / ICLR 2025).

Pipeline, for frames ``R_i`` (rows = axes; ``R_i(gX) = R_i(X) g^T``, see ``blocks.tfmp``):

1. node inputs in the node's own frame: ``rho_t(R_i) f_i`` for a field of type t, and
   ``R_i (x_i - c_b)`` for a point field (c_b the graph's centroid: no absolute positions);
2. the shared ``Backbone`` (embedding, ``depth`` x ``BackboneLayer``, head) runs on these local
   features; hidden features are declared as a representation (``hidden_reps``) and PyG hooks
   on each layer instance set ``h_j <- rho(R_i R_j^T) h_j``, ``edge_vec <- R_i (x_j - x_i)``;
3. outputs map back: ``D_t(R_i)^T y_i`` for irreps, ``R_i^T d_i + x_i`` for points; graph-level
   outputs convert every node's contribution to the global frame before pooling.

Every local quantity is invariant, so the model is exactly O(3) x translation equivariant
(SO(3) with ``so3=True``) and permutation equivariant, except at degenerate inputs where no
equivariant frame exists (``blocks.tfmp`` docstring).
"""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.utils import scatter

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import POINT, field_dim, irreps
from ..base import Method, build_at_params
from ..blocks.backbone import Backbone, edge_attr_dim, edge_geometry
from ..blocks.tfmp import (
    DELTA,
    LearnedFrames,
    NearestFrames,
    Reps,
    attach_tensor_frames,
    default_hidden_reps,
    edge_frames,
    parse_reps,
    rho,
    scale_reps,
)

FRAME_KINDS = ("learned", "nearest")


def _invariant_parts(value: torch.Tensor, t: str) -> list[torch.Tensor]:
    """O(3)-invariant features of a typed field: its 0e components and the (regularised) norm of
    every other irrep copy."""
    parts, start = [], 0
    for mul, ir in irreps(t):
        block = value[:, start:start + mul * ir.dim].reshape(-1, mul, ir.dim)
        start += mul * ir.dim
        parts.append(block[..., 0] if (ir.l, ir.p) == (0, 1) else ((block**2).sum(-1) + DELTA**2).sqrt())
    return parts


def frame_invariants(batch: Batch, spec: TaskSpec, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(node invariants [N, a], edge invariants [E, b]) that the frame network may use.

    Node: invariant parts of every non-point input. Edge: invariant parts of typed edge inputs,
    and <f_i, u_ij>, <f_j, u_ij> for every "1o" copy of the node inputs (u_ij the unit edge vector).
    """
    src, dst = batch.edge_index
    node, edge = [pos.new_zeros(pos.shape[0], 0)], [pos.new_zeros(src.numel(), 0)]
    vec = pos[src] - pos[dst]
    u = vec / ((vec * vec).sum(-1, keepdim=True) + DELTA**2).sqrt()
    for name, t in spec.inputs.items():
        if t == POINT:
            continue
        node += _invariant_parts(batch[name].reshape(pos.shape[0], -1), t)
        start = 0
        for mul, ir in irreps(t):
            block = batch[name][:, start:start + mul * ir.dim].reshape(-1, mul, ir.dim)
            start += mul * ir.dim
            if (ir.l, ir.p) == (1, -1):
                edge += [(block[dst] * u[:, None]).sum(-1), (block[src] * u[:, None]).sum(-1)]
    for name, t in spec.edge_inputs.items():
        edge += _invariant_parts(batch[name].reshape(src.numel(), -1), t)
    return torch.cat(node, dim=-1), torch.cat(edge, dim=-1)


def _dims(spec: TaskSpec) -> tuple[int, int]:
    """Widths of ``frame_invariants``' node and edge outputs for ``spec``."""
    node = sum(mul for t in spec.inputs.values() if t != POINT for mul, _ in irreps(t))
    n1o = sum(mul for t in spec.inputs.values() if t != POINT for mul, ir in irreps(t) if (ir.l, ir.p) == (1, -1))
    edge = 2 * n1o + sum(mul for t in spec.edge_inputs.values() for mul, _ in irreps(t))
    return node, edge


class TensorFramesModel(nn.Module):
    """Frames + the shared ``Backbone`` with tensor-frame hooks; ``model(batch) -> prediction``."""

    def __init__(self, spec: TaskSpec, hidden: Reps, depth: int = 4, frames: str = "learned",
                 so3: bool = False) -> None:
        super().__init__()
        self.spec, self.hidden = spec, hidden
        self.point = spec.point_fields[0]
        node_dim, edge_dim = _dims(spec)
        width = hidden.dim
        self.frames = (LearnedFrames(node_dim, edge_dim, so3=so3, hidden=max(16, width // 2))
                       if frames == "learned" else NearestFrames(so3=so3))
        in_dim = sum(field_dim(t) for t in spec.inputs.values())
        self.net = Backbone(in_dim, edge_attr_dim(spec), field_dim(spec.output), width, depth)
        edge_reps = "+".join(["0e", *spec.edge_inputs.values()])
        for layer in self.net.layers:
            attach_tensor_frames(layer, {"h": (hidden, "local"), "edge_vec": ("1o", "global"),
                                         "edge_attr": (edge_reps, "global")})

    def local_inputs(self, batch: Batch, R: torch.Tensor) -> torch.Tensor:
        """Every node input expressed in the node's own frame (invariant coordinates)."""
        parts = []
        for name, t in self.spec.inputs.items():
            value = batch[name].reshape(R.shape[0], -1)
            if t == POINT:
                centroid = scatter(value, batch.batch, dim=0, dim_size=int(batch.num_graphs), reduce="mean")
                value = value - centroid[batch.batch]
            parts.append(rho(t, R, value))
        return torch.cat(parts, dim=-1)

    def to_global(self, out: torch.Tensor, R: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Local node outputs -> prediction in the global frame (pooled for graph level)."""
        t = self.spec.output
        y = rho(t, R.transpose(1, 2), out)
        if t == POINT:
            y = y + batch[self.point]
        if self.spec.level == "graph":
            y = scatter(y, batch.batch, dim=0, dim_size=int(batch.num_graphs),
                        reduce="mean" if t == POINT else "sum")
        return y

    def forward(self, batch: Batch) -> torch.Tensor:
        pos = batch[self.point]
        node_inv, edge_inv = frame_invariants(batch, self.spec, pos)
        R = self.frames(pos, batch.edge_index, node_inv, edge_inv)
        vec, attr = edge_geometry(batch, self.spec)
        h = self.net.embed(self.local_inputs(batch, R))
        per_edge = edge_frames(R, batch.edge_index)  # R_i, R_i R_j^T once for all layers
        for layer in self.net.layers:
            h = layer(h, batch.edge_index, vec, attr, lframes=per_edge)
        return self.to_global(self.net.head(h), R, batch)


@register_method("tensor_frames")
class TensorFrames(Method):
    """Options: ``width`` (hidden dimension), ``depth``, ``params`` (target parameter count,
    scales ``width``), ``so3`` (SO(3) frames from two vectors), ``frames`` ("learned" |
    "nearest"), ``hidden_reps`` (representation of the hidden features, "16x0n+8x1n" or e3nn
    irreps; default ~half scalars, half vectors of total ``width``; when given without
    ``params`` it fixes the width, with ``params`` its non-scalar multiplicities are scaled)."""

    exact = True
    group = "O3"
    wraps_backbone = True

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None,
                 so3: bool = False, frames: str = "learned", hidden_reps: str | None = None) -> None:
        super().__init__(width=width, depth=depth, params=params, so3=so3, frames=frames,
                         hidden_reps=hidden_reps)
        if frames not in FRAME_KINDS:
            raise ValueError(f"frames must be one of {FRAME_KINDS}, got {frames!r}")
        if width < 1 or depth < 1:
            raise ValueError("width and depth must be positive")
        self.template = parse_reps(hidden_reps) if hidden_reps is not None else None
        self.width, self.depth, self.params = width, depth, params
        self.so3, self.frames = so3, frames
        self.group = "SO3" if so3 else "O3"

    def hidden_reps(self, size: int) -> Reps:
        if self.template is None:
            return default_hidden_reps(size)
        return self.template if self.params is None else scale_reps(self.template, size)

    def supports(self, spec: TaskSpec) -> str | None:
        reason = super().supports(spec)
        if reason is None and not spec.point_fields:
            reason = f"{self.name} builds frames from positions; task {spec.name!r} has no 'point' input"
        return reason

    def _factory(self, spec: TaskSpec):
        return lambda size: TensorFramesModel(spec, self.hidden_reps(size), self.depth, self.frames, self.so3)

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        default = self.template.dim if self.template is not None else self.width
        return build_at_params(self._factory(spec), self.params, default)


__all__ = ["TensorFrames", "TensorFramesModel", "frame_invariants"]
