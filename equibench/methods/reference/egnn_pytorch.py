"""``egnn_pytorch``: the ``EGNN`` layers of the ``egnn-pytorch`` library (lucidrains, 0.2.8) as an
equibench method, arranged like equibench's ``egnn`` (Satorras, Hoogeboom and Welling, "E(n)
Equivariant Graph Neural Networks", ICML 2021; n-body model ``EGNN_vel``).

Group: E(3) = O(3) (reflections included) plus translations, exactly: the library's MLPs see only
invariants and coordinates move along relative vectors. One library layer, on a dense batch
``[B, n, .]`` (``to_dense_batch``, padding masked), for node i and the pairs j in N(i) + {i}::

    m_ij  = edge_mlp(h_i, h_j, |x_i - x_j|^2, a_ij)            (a_ij: dense edge attributes)
    x_i  <- x_i + sum_j (x_i - x_j) coors_mlp(m_ij)             (a sum: no 1/|N(i)|)
    h_i  <- h_i + node_mlp(h_i, sum_j m_ij)

edge_mlp: Linear(k, 2k), SiLU, Linear(2k, m_dim), SiLU with k = 2 width + 1 + edge_dim;
coors_mlp: Linear(m_dim, 4 m_dim), SiLU, Linear(4 m_dim, 1) (with bias); node_mlp: Linear(width +
m_dim, 2 width), SiLU, Linear(2 width, width); the weights of these linear layers drawn from
N(0, std 1e-3) (the library's ``init_eps``), biases PyTorch's default. Library defaults otherwise
(no feature or coordinate norm, no soft edges, no Fourier distance features, no clamp).

What the wrapper adds, as ``egnn`` does (so the two take the same inputs and give the same outputs):

* neighbours: the task's graph, through the library's ``adj_mat`` with ``only_sparse_neighbors``
  (the adjacency is passed with its diagonal set: the library takes k = the largest row sum of
  ``adj_mat`` neighbours, the pair (i, i) among them, so without the diagonal it would drop a
  neighbour of every node of largest degree). The library always adds the pair (i, i): x_i - x_i = 0
  adds nothing to the coordinates, but m_ii (with a_ii = 0) joins the message sum. On n-body the
  task's graph is complete, so this is the library's own all-pairs layer;
* velocities: the library has no velocity channel. EGNN_vel's term is added after each library
  layer, x_i <- x_i + phi_v(h_i) v_i with h_i before that layer's update (phi_v: Linear, SiLU,
  Linear, one per layer and per "1o" input, ours, not the library's);
* h^0 = Linear(|v_i| for every "1o" input, invariant node inputs); edge attributes a_ij = the squared
  input distance |x_i^0 - x_j^0|^2 and the task's invariant edge inputs (n-body: q_i q_j), densified
  ``[B, n, n, edge_dim]`` (zero off the graph and on the diagonal);
* outputs: "point" -> x^L; node-level "1o" -> x^L - x^0; invariant scalars -> MLPs on h^L (node MLP,
  sum over the graph, graph MLP), with coordinate updates off (``update_coors=False``).

Against ``egnn`` (same equations, other details): MLP hidden widths (2k, 4 m_dim, 2 width vs
width), message width (m_dim vs width), coordinate sum vs mean, the self pair, the bias of
coors_mlp, and the initialisation (std-1e-3 weights in the library's MLPs vs PyTorch's defaults and
egnn's gain-1e-3 coordinate layer). ``tests/test_reference_egnn.py`` shows these are the only
differences: with egnn's widths zero-padded to hold the library's layers, its coordinate weights
scaled by the in-degree, a constant hidden unit carrying the library's bias, and self-loops added to
egnn's graph, the two compute the same function to 1e-10 in float64 on n-body, normals and QM9 (the
degree scaling needs every node to have the same in-degree: true of n-body's complete graphs and
normals' k-NN graphs; QM9's scalar path moves no coordinates).
Cost: the layer builds ``[B, n, n, 3]`` relative coordinates and the dense edge attributes for all
pairs before it selects neighbours (memory grows as n^2 per graph).
"""
from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import global_add_pool
from torch_geometric.utils import to_dense_adj, to_dense_batch

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import POINT, field_dim
from ..architectures.egnn import EGNN, EGNNModel
from ..base import Method, build_at_params
from ..blocks.backbone import mlp

LIBRARY = "egnn-pytorch"


def _library() -> Any:
    from egnn_pytorch import EGNN as LibraryEGNN  # optional dependency (extra "reference")
    return LibraryEGNN


class LibraryEGNNModel(nn.Module):
    """egnn-pytorch ``EGNN`` layers with egnn's inputs, velocity terms and heads (module docstring)."""

    io: EGNNModel

    def __init__(self, spec: TaskSpec, width: int = 64, depth: int = 4, m_dim: int = 16,
                 node_scalars: bool = True) -> None:
        super().__init__()
        self.spec, self.width, self.depth = spec, width, depth
        # egnn's input/output conventions (its ``inputs``); kept out of the module tree: no parameters
        object.__setattr__(self, "io", EGNNModel(spec, 1, 1, node_scalars))
        n_in = self.io.embed.in_features
        self.vector_out = self.io.vector_out
        edge_dim = 1 + sum(field_dim(t) for t in spec.edge_inputs.values())
        self.embed = nn.Linear(n_in, width)
        self.layers = nn.ModuleList(
            _library()(dim=width, edge_dim=edge_dim, m_dim=m_dim, update_coors=self.vector_out,
                       only_sparse_neighbors=True) for _ in range(depth))
        n_vec = self.io.n_vectors if self.vector_out else 0
        self.phi_v = nn.ModuleList(nn.ModuleList(mlp([width, width, 1]) for _ in range(n_vec)) for _ in range(depth))
        if not self.vector_out:
            out = field_dim(spec.output)
            self.node_head = mlp([width, width, width if spec.level == "graph" else out])
            self.graph_head = mlp([width, width, out]) if spec.level == "graph" else None

    def dense_edges(self, batch: Batch, x0: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(edge attributes ``[B, n, n, edge_dim]``, adjacency ``[B, n, n]`` with its diagonal):
        entry (i, j) belongs to the edge j -> i, egnn's direction."""
        B, n = mask.shape
        src, dst = batch.edge_index
        adj = to_dense_adj(batch.edge_index, batch.batch, batch_size=B, max_num_nodes=n).transpose(1, 2) > 0
        adj = adj | (torch.eye(n, dtype=torch.bool, device=x0.device) & mask[:, :, None])
        rel = x0[:, :, None] - x0[:, None, :]
        feats = [(rel * rel).sum(-1, keepdim=True)]
        for k in self.spec.edge_inputs:
            attr = batch[k].reshape(src.numel(), -1).to(x0.dtype)
            dense = to_dense_adj(batch.edge_index, batch.batch, edge_attr=attr, batch_size=B, max_num_nodes=n)
            feats.append(dense.transpose(1, 2))
        return torch.cat(feats, dim=-1), adj

    def forward(self, batch: Batch) -> torch.Tensor:
        pos = batch[self.io.point]
        feats, vectors = self.io.inputs(batch)
        B = int(batch.num_graphs)
        x0, mask = to_dense_batch(pos, batch.batch, batch_size=B)
        h = to_dense_batch(self.embed(feats), batch.batch, batch_size=B)[0]
        vecs = [to_dense_batch(v, batch.batch, batch_size=B)[0] for v in vectors]
        edges, adj = self.dense_edges(batch, x0, mask)
        x = x0
        for layer, phi_v in zip(self.layers, self.phi_v):
            h_new, x = layer(h, x, edges=edges, mask=mask, adj_mat=adj)
            for phi, v in zip(phi_v.children(), vecs):
                x = x + phi(h) * v  # EGNN_vel's velocity term, h before this layer's update
            h = h_new
        if self.vector_out:
            out = x[mask]
            return out if self.spec.output == POINT else out - pos
        node = self.node_head(h[mask])
        if self.graph_head is None:
            return node
        return self.graph_head(global_add_pool(node, batch.batch, size=B))


@register_method("egnn_pytorch")
class EGNNPytorch(EGNN):
    """egnn-pytorch's EGNN layers (lucidrains) with EGNN_vel's velocity term, E(3)-exact; pairs with ``egnn``."""

    origin: ClassVar[str] = LIBRARY
    counterpart: ClassVar[str | None] = "egnn"
    smoke_options: ClassVar[dict[str, Any]] = {"width": 16, "depth": 2, "m_dim": 8}

    def __init__(self, *, width: int = 64, depth: int = 4, m_dim: int = 16, params: int | None = None,
                 node_scalars: bool = True) -> None:
        super().__init__(width=width, depth=depth, params=params, node_scalars=node_scalars)
        if m_dim < 1:
            raise ValueError("m_dim must be positive")
        self.m_dim = m_dim
        self.options.update(m_dim=m_dim)

    def supports(self, spec: TaskSpec) -> str | None:
        if importlib.util.find_spec("egnn_pytorch") is None:
            return f"{LIBRARY} is not installed (pip install -e .[reference])"
        reason = Method.supports(self, spec)
        if reason:
            return reason
        reason = super().supports(spec)
        return f"egnn_pytorch takes egnn's inputs and outputs: {reason}" if reason else None

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        reason = self.supports(spec)
        if reason:
            raise ValueError(reason)
        return build_at_params(lambda w: LibraryEGNNModel(spec, w, self.depth, self.m_dim, self.node_scalars),
                               self.params, self.width)
