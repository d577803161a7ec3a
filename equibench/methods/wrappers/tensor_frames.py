"""``tensor_frames``: the shared backbone made O(3)-equivariant with local frames and tensorial
messages (Lippmann, Gerhartz, Remme, Hamprecht, "Beyond canonicalization: how tensorial messages
improve equivariant message passing", ICLR 2025; arXiv 2405.15389 "Tensor Frames").

Pipeline, for frames ``R_i`` (rows = axes; ``R_i(gX) = R_i(X) g^T``, see ``blocks.tfmp``):

1. node inputs in the node's own frame: ``rho_t(R_i) f_i`` for a field of type t, and
   ``R_i (x_i - c_b)`` for a point field (c_b the graph's centroid: no absolute positions);
2. the shared ``Backbone`` (embedding, ``depth`` x ``BackboneLayer``, head) runs on these local
   features; the edge inputs enter in the receiver's frame, ``edge_vec = R_i (x_j - x_i)`` and
   ``rho(R_i)`` of typed edge inputs (computed once, the same for every layer); hidden features
   are declared as a representation (``hidden_reps``) and, unless they are invariant, PyG hooks
   on each layer instance set ``h_j <- rho(R_i R_j^T) h_j``;
3. outputs map back: ``D_t(R_i)^T y_i`` for irreps, ``R_i^T d_i + x_i`` for points; graph-level
   outputs convert every node's contribution to the global frame before pooling.

Every local quantity is invariant, so with equivariant frames the model is exactly
O(3) x translation equivariant (SO(3) with ``so3=True``) and permutation equivariant.

Handedness (O(3) only; ``blocks.tfmp`` docstring for the math). z = x cross y is a pseudo-vector;
its sign must come from an equivariant vector with a component along z. On an exactly planar
k-NN neighbourhood (flat mesh faces in ``normals``, planar fragments of ``qm9`` molecules, even
when the plane is only flat to float32 rounding of the stored coordinates) no such vector exists
locally.

* ``handedness="wide"`` (default): degenerate nodes take candidates from their whole graph; a
  graph that is entirely planar with reflection-symmetric features gets its output projected on
  the fixed subspace of that reflection, (f + rho(sigma) f) / 2 (invariant outputs are unchanged;
  "1o" and point outputs lose their normal component, as any O(3)-equivariant map's must). Exact
  on every input except exactly symmetric ones (a node on a rotation axis or on a mirror plane of
  its whole input), counted by ``test.frame_degenerate_share``.
* ``handedness="local"``: the paper's local construction; undecided handedness is left as
  x cross y, which is not reflection-equivariant, and near-collinear axis candidates (sine < 1e-6)
  fall back to the global axes. It does NOT claim exactness (``exact_on``): fp64 rel_max after
  training measured 9.6e-2 on ``qm9`` and 6e-2 on ``normals`` (``"wide"``: 6e-13, 3e-13).

"wide" also widens the axis candidates x, y (second moments of the whole graph), so its SO(3)
variant keeps equivariant frames on atoms near a rotation axis where "local" falls back.

Method-specific metrics (``extra_metrics``, declared below; computed on the evaluated model, i.e.
in its dtype, float32 in the runner, where rounding makes more local frames undecided):
``frame_degenerate_share`` (share of nodes whose frame is not determined equivariantly),
``frame_weak_share`` (equivariant but ill-conditioned: y from a candidate at a sine below 1e-6),
``frame_widened_share`` (share of nodes whose frame needed the graph-wide context: degenerate
under ``"local"``), ``frame_planar_share`` (share of graphs symmetrised as planar inputs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.utils import scatter

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...metrics.catalogue import MetricSpec, register_metric, test_metric
from ...metrics.profile import region
from ...symmetry.fieldtypes import POINT, field_dim, irreps
from ..base import GENERIC_INPUTS, Method, build_at_params
from ..blocks.backbone import Backbone, edge_attr_dim
from ..blocks.breaking import FieldInputOption
from ..blocks.tfmp import (
    DELTA,
    HANDEDNESS,
    EdgeFrames,
    FrameContext,
    FrameStatus,
    LearnedFrames,
    NearestFrames,
    Reps,
    attach_tensor_frames,
    default_hidden_reps,
    edge_vectors,
    parse_reps,
    planar_symmetry,
    rho,
    scale_reps,
    unit_edges,
)

FRAME_KINDS = ("learned", "nearest")

#: method extras (``extra_metrics``), one ``test.<name>`` row each
FRAME_METRICS = {
    "frame_degenerate_share": "share of test nodes whose local frame is not determined equivariantly (no "
                              "equivariant axis candidate, or O(3) handedness undecided outside a planar input): "
                              "exactness does not hold there",
    "frame_widened_share": "share of test nodes whose local frame needed the graph-wide context (degenerate "
                           "for the neighbourhood alone, e.g. exactly planar k-NN neighbourhoods)",
    "frame_weak_share": "share of test nodes whose frame is equivariant but ill-conditioned (y axis from a "
                        "candidate at a sine below 1e-6 to x: rounding amplified beyond 1e-10 in float64)",
    "frame_planar_share": "share of test graphs that are planar and reflection-symmetric, whose output is "
                          "projected on the reflection-fixed subspace",
}
for _name, _doc in FRAME_METRICS.items():
    register_metric(MetricSpec(test_metric(_name), _name.replace("_", " "), "test",
                               direction="lower" if _name in ("frame_degenerate_share", "frame_weak_share")
                               else None,
                               stat=_name, stage="trained", log_scale=False, description=_doc))


def _invariant_parts(value: torch.Tensor, t: str) -> list[torch.Tensor]:
    """O(3)-invariant features of a typed field: its 0e components and the (regularised) norm of
    every other irrep copy."""
    parts, start = [], 0
    for mul, ir in irreps(t):
        block = value[:, start:start + mul * ir.dim].reshape(-1, mul, ir.dim)
        start += mul * ir.dim
        parts.append(block[..., 0] if (ir.l, ir.p) == (0, 1) else ((block**2).sum(-1) + DELTA**2).sqrt())
    return parts


def frame_invariants(batch: Batch, spec: TaskSpec, pos: torch.Tensor,
                     unit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(node invariants [N, a], edge invariants [E, b]) that the frame network may use.

    Node: invariant parts of every non-point input. Edge: invariant parts of typed edge inputs,
    and <f_i, u_ij>, <f_j, u_ij> for every "1o" copy of the node inputs (u_ij the unit edge vector;
    ``unit``: ``unit_edges(pos, edge_index)[0]`` if the caller has it).
    """
    src, dst = batch.edge_index
    node, edge = [pos.new_zeros(pos.shape[0], 0)], [pos.new_zeros(src.numel(), 0)]
    u = unit
    for name, t in spec.inputs.items():
        if t == POINT:
            continue
        node += _invariant_parts(batch[name].reshape(pos.shape[0], -1), t)
        start = 0
        for mul, ir in irreps(t):
            block = batch[name][:, start:start + mul * ir.dim].reshape(-1, mul, ir.dim)
            start += mul * ir.dim
            if (ir.l, ir.p) == (1, -1):
                u = unit_edges(pos, batch.edge_index)[0] if u is None else u
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


def _vector_inputs(batch: Batch, spec: TaskSpec, n: int, like: torch.Tensor) -> torch.Tensor:
    """Every "1o" copy of the node inputs as ``[N, V, 3]`` (the ``"wide"`` handedness candidates)."""
    vecs = [like.new_zeros(n, 0, 3)]
    for name, t in spec.inputs.items():
        if t == POINT:
            continue
        value, start = batch[name].reshape(n, -1), 0
        for mul, ir in irreps(t):
            if (ir.l, ir.p) == (1, -1):
                vecs.append(value[:, start:start + mul * 3].reshape(n, mul, 3))
            start += mul * ir.dim
    return torch.cat(vecs, dim=1)


@dataclass(frozen=True)
class FrameInfo:
    """Frames of a batch and what is known about them: ``status`` per node, ``planar [B]`` graphs
    whose input is symmetric under the reflection through their plane (normal ``[B, 3]``)."""

    R: torch.Tensor
    status: FrameStatus
    planar: torch.Tensor
    normal: torch.Tensor
    centre: torch.Tensor | None = None  # the centroids of the frame's point field, [B, 3]

    @property
    def degenerate(self) -> torch.Tensor:
        """Nodes where no equivariant frame was found and the planar projection does not apply."""
        return self.status.degenerate  # compute_frames clears ``undecided`` in planar graphs


class TensorFramesModel(nn.Module):
    """Frames + the shared ``Backbone`` with tensor-frame hooks; ``model(batch) -> prediction``."""

    def __init__(self, spec: TaskSpec, hidden: Reps, depth: int = 4, frames: str = "learned",
                 so3: bool = False, handedness: str = "wide") -> None:
        super().__init__()
        self.spec, self.hidden = spec, hidden
        self.point = spec.point_fields[0]
        self.so3, self.handedness = so3, handedness
        node_dim, edge_dim = _dims(spec)
        width = hidden.dim
        self.frames = (LearnedFrames(node_dim, edge_dim, so3=so3, hidden=max(16, width // 2), handedness=handedness)
                       if frames == "learned" else NearestFrames(so3=so3, handedness=handedness))
        in_dim = sum(field_dim(t) for t in spec.inputs.values())
        self.net = Backbone(in_dim, edge_attr_dim(spec), field_dim(spec.output), width, depth)
        self.edge_reps = parse_reps("+".join(["0e", *spec.edge_inputs.values()]))
        # edge_vec and edge_attr are global: moved into the receiver's frame once, before the layers
        # (the same R_i e for every layer); only tensorial hidden features need a hook on each layer
        if not hidden.is_invariant:
            for layer in self.net.layers:
                attach_tensor_frames(layer, {"h": (hidden, "local")})

    def compute_frames(self, batch: Batch, vec: torch.Tensor | None = None) -> FrameInfo:
        """Local frames, their status and (``"wide"`` O(3) frames) the planar, reflection-symmetric
        graphs, whose nodes all keep the default z = x cross y (a pseudo-vector, consistently at
        every node: any handedness "decided" there is rounding noise) and whose output is projected
        (``symmetrize``); they are not degenerate. ``vec``: ``edge_vectors(pos, edge_index)`` if
        the caller has it."""
        pos = batch[self.point]
        n, B = pos.shape[0], int(batch.num_graphs)
        unit = unit_edges(pos, batch.edge_index, vec)  # shared by the invariants and the frame network
        node_inv, edge_inv = frame_invariants(batch, self.spec, pos, unit[0])
        context = FrameContext(batch.batch, B, _vector_inputs(batch, self.spec, n, pos))
        R, status = self.frames.compute(pos, batch.edge_index, node_inv, edge_inv, context, edges=unit)
        # the centroids (local_inputs' and the planarity test's: computed once)
        centre = scatter(pos, batch.batch, dim=0, dim_size=B, reduce="mean")
        planar = torch.zeros(B, dtype=torch.bool, device=pos.device)
        normal = pos.new_zeros(B, 3)
        if self.handedness == "wide" and not self.so3:
            fields = [(parse_reps(t), batch[name].reshape(n, -1), batch.batch)
                      for name, t in self.spec.inputs.items() if t != POINT]
            dst = batch.edge_index[1]
            fields += [(parse_reps(t), batch[name].reshape(dst.numel(), -1), batch.batch[dst])
                       for name, t in self.spec.edge_inputs.items()]
            planar, normal = planar_symmetry(pos, batch.batch, B, fields, centre)
            if bool(planar.any()):
                on = planar[batch.batch]
                z = torch.where(on[:, None], torch.linalg.cross(R[:, 0], R[:, 1]), R[:, 2])
                R = torch.stack([R[:, 0], R[:, 1], z], dim=1)
                status = FrameStatus(status.x_fallback, status.y_fallback, status.undecided & ~on,
                                     status.widened, status.weak)
        return FrameInfo(R, status, planar, normal, centre)

    def local_inputs(self, batch: Batch, R: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
        """Every node input expressed in the node's own frame (invariant coordinates); ``centre``: the
        centroids of the frame's point field if the caller has them."""
        parts = []
        for name, t in self.spec.inputs.items():
            value = batch[name].reshape(R.shape[0], -1)
            if t == POINT:
                centroid = centre if centre is not None and name == self.point else scatter(
                    value, batch.batch, dim=0, dim_size=int(batch.num_graphs), reduce="mean")
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

    def symmetrize(self, y: torch.Tensor, batch: Batch, info: FrameInfo) -> torch.Tensor:
        """Project the prediction of planar, reflection-symmetric graphs on the fixed subspace of
        their reflection sigma = I - 2 n n^T: (y + rho(sigma) y) / 2; for points (affine sigma
        through the centroid c) y - n <n, y - c>."""
        index = batch.batch if self.spec.level == "node" else torch.arange(int(batch.num_graphs), device=y.device)
        mask, n = info.planar[index], info.normal[index].to(y.dtype)
        if self.spec.output == POINT:
            c = scatter(batch[self.point], batch.batch, dim=0, dim_size=int(batch.num_graphs), reduce="mean")[index]
            sym = y - n * ((y - c) * n).sum(-1, keepdim=True)
        else:
            sigma = torch.eye(3, dtype=y.dtype, device=y.device) - 2 * n[:, :, None] * n[:, None, :]
            sym = 0.5 * (y + rho(self.spec.output, sigma, y))
        return torch.where(mask[:, None], sym, y)

    def local_edges(self, batch: Batch, R_i: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R_i (x_j - x_i), rho(R_i) edge_attr)``: the backbone's edge inputs
        (``backbone.edge_geometry``: ``vec = x_j - x_i``, attr = (|vec|^2, typed edge inputs)) in the
        receiver's frame (``R_i = R[dst]``, ``[E, 3, 3]``), the same for every layer."""
        extra = [batch[k].reshape(vec.shape[0], -1) for k in self.spec.edge_inputs]
        attr = torch.cat([(vec * vec).sum(-1, keepdim=True), *extra], dim=-1)
        return rho("1o", R_i, vec), rho(self.edge_reps, R_i, attr)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Profiler regions (``metrics.profile``): ``frames`` (local frames, the per-edge R_i and
        R_i R_j^T), ``to_frame`` (inputs and edge inputs into the local frames, outputs back, and
        the tensorial messages' rho(R_i R_j^T) h_j inside the layers), ``backbone`` (the rest of
        the shared network)."""
        with region("equibench.frames"):
            vec = edge_vectors(batch[self.point], batch.edge_index)
            info = self.compute_frames(batch, vec)
            R = info.R
            src, dst = batch.edge_index
            R_i = R.index_select(0, dst)
            hooks = not self.hidden.is_invariant
            # U_ij = R_i R_j^T once for all layers (tensorial messages only; invariant h_j needs none)
            kw = {"lframes": EdgeFrames(R_i, R_i @ R.index_select(0, src).transpose(1, 2))} if hooks else {}
        with region("equibench.to_frame"):
            vec, attr = self.local_edges(batch, R_i, vec)
            x = self.local_inputs(batch, R, info.centre)
        with region("equibench.backbone"):
            h = self.net.embed(x)
            for layer in self.net.layers:
                h = layer(h, batch.edge_index, vec, attr, **kw)
            out = self.net.head(h)
        with region("equibench.to_frame"):
            y = self.to_global(out, R, batch)
            return self.symmetrize(y, batch, info) if bool(info.planar.any()) else y

    @torch.no_grad()
    def frame_report(self, batch: Batch) -> dict[str, float]:
        """The ``FRAME_METRICS`` shares on ``batch``."""
        info = self.compute_frames(batch)
        return {"frame_degenerate_share": info.degenerate.double().mean().item(),
                "frame_widened_share": info.status.widened.double().mean().item(),
                "frame_weak_share": info.status.weak.double().mean().item(),
                "frame_planar_share": info.planar.double().mean().item()}


@register_method("tensor_frames")
class TensorFrames(FieldInputOption, Method):
    """The shared backbone made O(3)-equivariant by local frames and tensorial messages (Lippmann et al. 2025).

    Options: ``width`` (hidden dimension), ``depth``, ``params`` (target parameter count,
    scales ``width``), ``so3`` (SO(3) frames from two vectors), ``frames`` ("learned" |
    "nearest"), ``handedness`` ("wide" | "local": whether a degenerate local frame, handedness or
    axes, may take candidates from the whole graph; module docstring), ``hidden_reps``
    (representation of the hidden features, "16x0n+8x1n" or e3nn irreps; default ~half scalars,
    half vectors of total ``width``; when given without ``params`` it fixes the width, with
    ``params`` its non-scalar multiplicities are scaled)."""

    exact = True
    exact_scope = GENERIC_INPUTS  # local frames are undecided where a neighbourhood is symmetric
    group = "O3"
    wraps_backbone = True
    float32_caveat = ("a local frame's handedness or second axis is decided by a signal near float32 rounding "
                      "(~1e-5) on molecules flat to float32 precision but not exactly planar, so the frame can "
                      "flip under a rotation (the same frames in tensor_frames and local_canonicalization; "
                      "measured on tensor_frames after 700 qm9 training steps: 3-6 of 300 test graphs per group "
                      "sample, worst relative error 9.6e-2); exact in float64")

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None,
                 so3: bool = False, frames: str = "learned", handedness: str = "wide",
                 hidden_reps: str | None = None, field_input: bool = False) -> None:
        super().__init__(width=width, depth=depth, params=params, so3=so3, frames=frames,
                         handedness=handedness, hidden_reps=hidden_reps)
        self.set_field_input(field_input)
        if frames not in FRAME_KINDS:
            raise ValueError(f"frames must be one of {FRAME_KINDS}, got {frames!r}")
        if handedness not in HANDEDNESS:
            raise ValueError(f"handedness must be one of {HANDEDNESS}, got {handedness!r}")
        if width < 1 or depth < 1:
            raise ValueError("width and depth must be positive")
        self.template = parse_reps(hidden_reps) if hidden_reps is not None else None
        self.width, self.depth, self.params = width, depth, params
        self.so3, self.frames, self.handedness = so3, frames, handedness
        self.group = "SO3" if so3 else "O3"
        # local frames are undefined on planar neighbourhoods / near rotation axes: no exactness claim
        self.exact = handedness != "local"

    def hidden_reps(self, size: int) -> Reps:
        if self.template is None:
            return default_hidden_reps(size)
        return self.template if self.params is None else scale_reps(self.template, size)

    def supports(self, spec: TaskSpec) -> str | None:
        reason = super().supports(spec)
        if reason is None and not spec.point_fields:
            reason = f"{self.name} builds frames from positions; task {spec.name!r} has no 'point' input"
        return reason

    def inexact_reason(self, spec: TaskSpec) -> str | None:
        if self.handedness == "local" and not self.so3:
            return (f"{self.name} with handedness='local': an O(3) frame's handedness is undefined on an exactly "
                    "planar k-NN neighbourhood (flat mesh faces, planar molecular fragments) and left as x cross y, "
                    "which is not reflection-equivariant; use handedness='wide'")
        if self.handedness == "local":
            return (f"{self.name} with handedness='local': axis candidates from the neighbourhood only; where they "
                    "are collinear to a sine of 1e-6 (an atom on a rotation axis of a molecule symmetric to float32 "
                    "rounding: 4 of the first 2264 qm9 test molecules) the frame falls back to the global axes; "
                    "use handedness='wide'")
        return super().inexact_reason(spec)

    def _factory(self, spec: TaskSpec):
        return lambda size: TensorFramesModel(spec, self.hidden_reps(size), self.depth, self.frames, self.so3,
                                              self.handedness)

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        spec = self.model_spec(spec)  # + the symmetry-breaking inputs under field_input=True
        default = self.template.dim if self.template is not None else self.width
        return build_at_params(self._factory(spec), self.params, default)

    def extra_metrics(self, model: nn.Module, batch: Batch, pred: torch.Tensor) -> dict[str, float]:
        report = getattr(model, "frame_report", None)
        return report(batch) if callable(report) else {}


__all__ = ["FRAME_METRICS", "FrameInfo", "TensorFrames", "TensorFramesModel", "frame_invariants"]
