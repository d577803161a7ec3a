"""The shared, deliberately non-equivariant message-passing backbone.

Every wrapping method (baseline, augmentation, frame averaging, canonicalisation, tensor
frames, ...) runs this same network, so differences in the report come from the equivariance
mechanism alone. One layer is

    m_ij = phi([h_i, h_j, e_vec_ij, e_attr_ij]),    h_i <- h_i + psi([h_i, sum_j m_ij])

with raw coordinates: ``e_vec_ij = pos_j - pos_i`` (3 numbers in whatever frame the caller
gives), ``e_attr_ij`` = (|e_vec|^2, typed edge inputs). Node inputs are all typed fields of the
task flattened and concatenated (positions included), so nothing here respects O(3).

Also the typed input checks and the invariant readout that the equivariant point-cloud networks
(egnn, cgenn, ponita, equiformer_pytorch) share: ``is_vector_type``, ``vector_output``,
``point_cloud_reason``, ``invariant_heads`` / ``invariant_readout``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import MessagePassing, global_add_pool

from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import POINT, field_dim, irreps, is_invariant


def mlp(sizes: list[int], act: type[nn.Module] = nn.SiLU, last_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_act:
            layers.append(act())
    return nn.Sequential(*layers)


def run_mlp(seq: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``seq(x)`` for an ``mlp`` (Linear / SiLU layers) through the functional calls, without the
    per-module call overhead (a few us per module on the CPU; bit-identical to ``seq(x)``). Other
    layer types are called as modules."""
    for layer in seq.children():
        if type(layer) is nn.Linear:
            x = nn.functional.linear(x, layer.weight, layer.bias)
        elif type(layer) is nn.SiLU:
            x = nn.functional.silu(x)
        else:
            x = layer(x)
    return x


class BackboneLayer(MessagePassing):
    """One residual message-passing layer; ``message`` arguments are named so that wrappers
    (tensor frames) can transform ``h_j`` and ``edge_vec`` with PyG's message hooks."""

    def __init__(self, width: int, edge_dim: int) -> None:
        super().__init__(aggr="add")
        self.phi = mlp([2 * width + 3 + edge_dim, width, width], last_act=True)
        self.psi = mlp([2 * width, width, width])

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_vec: torch.Tensor,
                edge_attr: torch.Tensor, **propagate_kwargs) -> torch.Tensor:
        m = self.propagate(edge_index, h=h, edge_vec=edge_vec, edge_attr=edge_attr, **propagate_kwargs)
        return h + self.psi(torch.cat([h, m], dim=-1))

    def message(self, h_i: torch.Tensor, h_j: torch.Tensor, edge_vec: torch.Tensor,
                edge_attr: torch.Tensor) -> torch.Tensor:
        return self.phi(torch.cat([h_i, h_j, edge_vec, edge_attr], dim=-1))


class Backbone(nn.Module):
    """Embedding -> ``depth`` x ``BackboneLayer`` -> per-node head, on plain tensors."""

    def __init__(self, in_dim: int, edge_dim: int, out_dim: int, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.embed = mlp([in_dim, width, width])
        self.layers = nn.ModuleList(BackboneLayer(width, edge_dim) for _ in range(depth))
        self.head = mlp([width, width, out_dim])
        self.width, self.depth = width, depth

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_vec: torch.Tensor,
                edge_attr: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, edge_index, edge_vec, edge_attr)
        return self.head(h)


def node_features(batch: Batch, spec: TaskSpec) -> torch.Tensor:
    """All typed node inputs, flattened and concatenated in ``spec.inputs`` order."""
    return torch.cat([batch[k].reshape(batch[k].shape[0], -1) for k in spec.inputs], dim=-1)


def edge_geometry(batch: Batch, spec: TaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(edge_vec, edge_attr)``: pos_j - pos_i for the first point field (zeros if none) and
    (|edge_vec|^2, typed edge inputs). PyG convention: edge (j -> i) is ``edge_index[:, e] = (j, i)``."""
    src, dst = batch.edge_index
    points = spec.point_fields
    if points:
        pos = batch[points[0]]
        vec = pos[src] - pos[dst]
    else:
        vec = torch.zeros(src.numel(), 3, dtype=torch.get_default_dtype(), device=src.device)
    extra = [batch[k].reshape(src.numel(), -1) for k in spec.edge_inputs]
    attr = torch.cat([(vec * vec).sum(-1, keepdim=True), *extra], dim=-1)
    return vec, attr


def edge_attr_dim(spec: TaskSpec) -> int:
    return 1 + sum(field_dim(t) for t in spec.edge_inputs.values())


def readout(out: torch.Tensor, batch: Batch, spec: TaskSpec) -> torch.Tensor:
    """Per-node head output -> prediction of ``spec.output``: sum-pooled for graph-level
    outputs; a displacement added to the first point input for ``"point"`` outputs."""
    if spec.level == "graph":
        out = global_add_pool(out, batch.batch, size=int(batch.num_graphs))
    if spec.output == POINT:
        out = out + batch[spec.point_fields[0]]
    return out


class BackboneModel(nn.Module):
    """The backbone applied to a batch of a task: ``model(batch) -> prediction``."""

    def __init__(self, spec: TaskSpec, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.spec = spec
        in_dim = sum(field_dim(t) for t in spec.inputs.values())
        self.net = Backbone(in_dim, edge_attr_dim(spec), field_dim(spec.output), width, depth)

    def forward(self, batch: Batch) -> torch.Tensor:
        vec, attr = edge_geometry(batch, self.spec)
        out = self.net(node_features(batch, self.spec), batch.edge_index, vec, attr)
        return readout(out, batch, self.spec)


def is_vector_type(t: str) -> bool:
    """Whether field type ``t`` is one or more polar vectors: every irrep of it is "1o" (a point is not)."""
    return t != POINT and all(ir.l == 1 and ir.p == -1 for _, ir in irreps(t))


def vector_output(spec: TaskSpec, copies: bool = False) -> bool:
    """Whether ``spec`` asks for a point or a node-level vector: exactly one "1o", or with ``copies``
    any number of them ("kx1o")."""
    if spec.output == POINT:
        return True
    return spec.level == "node" and (is_vector_type(spec.output) if copies else irreps(spec.output) == irreps("1o"))


def point_cloud_reason(name: str, spec: TaskSpec, outputs: str | None = None, copies: bool = False) -> str | None:
    """Why a network on one point cloud, with invariant and "1o" node inputs and invariant edge
    inputs only, cannot take ``spec`` (a one-line reason naming the method ``name``); None if it can.
    With ``outputs`` (the method's words for what it predicts) the output must also be a point, a
    node-level vector (``vector_output(spec, copies)``) or invariant; without, the method checks it."""
    if len(spec.point_fields) != 1:
        return (f"{name} needs exactly one point field (its 'point' input: the coordinates), "
                f"the task has {len(spec.point_fields)}")
    bad = [t for t in spec.inputs.values() if t != POINT and not is_invariant(t) and not is_vector_type(t)]
    if bad:
        return f"{name} takes invariant and '1o' node inputs only, not {bad}"
    if any(not is_invariant(t) for t in spec.edge_inputs.values()):
        return f"{name} takes invariant edge inputs only"
    if outputs is not None and not (vector_output(spec, copies) or is_invariant(spec.output)):
        return f"{name} predicts {outputs}, not {spec.output!r} at {spec.level} level"
    return None


def invariant_heads(width: int, spec: TaskSpec) -> tuple[nn.Sequential, nn.Sequential | None]:
    """(node head, graph head or None) of EGNN's invariant readout: phi_node: width -> width -> d
    (d = width at graph level, else the output's dimension); at graph level phi_graph: width ->
    width -> output dimension."""
    out, graph = field_dim(spec.output), spec.level == "graph"
    return mlp([width, width, width if graph else out]), (mlp([width, width, out]) if graph else None)


def invariant_readout(node_head: nn.Module, graph_head: nn.Module | None, h: torch.Tensor,
                      batch: Batch) -> torch.Tensor:
    """y_i = phi_node(h_i) at node level (``graph_head`` None); y_G = phi_graph(sum_{i in G}
    phi_node(h_i)) at graph level."""
    out = node_head(h)
    if graph_head is None:
        return out
    return graph_head(global_add_pool(out, batch.batch, size=int(batch.num_graphs)))
