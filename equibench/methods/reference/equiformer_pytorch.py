"""``equiformer_pytorch``: the ``Equiformer`` of the ``equiformer-pytorch`` library (lucidrains, 0.5.4), a
reimplementation of Equiformer (Liao and Smidt, "Equiformer: Equivariant Graph Attention Transformer for
3D Atomistic Graphs", ICLR 2023; reference code ``atomicarchitects/equiformer``). equibench has no
Equiformer of its own: no counterpart.

Group: SO(3) (proper rotations) plus translations, exactly (with the paper's MLP attention, the default
here; see "attention" below); *not* O(3). The library's features are SO(3) irreps of degree
l = 0..``num_degrees``-1 without parity, and its edge kernels keep every coupling
|l_in - l_out| <= J <= l_in + l_out, the parity-odd ones included (degree 1 x degree 1 -> degree 1 through
J = 1 is a cross product with the edge direction), so an inversion changes the outputs by a relative
O(1) (measured: ``tests/test_reference_equiformer.py``). The paper's own QM9 and MD17 models are SE(3) too
(its ``se_l2`` settings: every irrep even, ``1x0e+1x1e+1x2e`` spherical harmonics; E(3) is a variant).
Degree-1 features are Cartesian (x, y, z) vectors (they rotate as the coordinates do).

The library's network (on a dense batch ``[B, n, .]``, padding masked; ``r_ij = x_i - x_j`` for the
neighbours j of i):

* edge kernels ("DTP", the eSCN construction): the features of j (plus a linear map of those of i) are
  rotated by Wigner-D matrices D(R_ij) into the frame where r_ij points along the y axis (R_ij from an
  explicit rotation matrix and its ZYZ Euler angles, in float64, then cast); there a radial MLP of
  (|r_ij|, edge attributes) - Linear, SiLU, LayerNorm, Linear, SiLU, LayerNorm, Linear - weights a fixed
  basis that commutes with rotations about the axis (the Clebsch-Gordan coefficients of the aligned
  spherical harmonics, found once as the null space of a Sylvester system at five fixed random rotations,
  SVD in float64, kept in float32); the result is rotated back by D(R_ij)^T. Each output channel takes
  one input degree (depthwise);
* ``tp_in``: one such kernel from the input fiber to ``width`` channels per degree, mean over neighbours,
  plus a linear self-interaction;
* ``depth`` blocks of pre-norm residual attention and feed-forward: values and attention logits from a
  kernel on (i, j) (the self pair included: ``attend_self``), logits = Linear(LeakyReLU(scalar channels))
  per head, softmax over the neighbours, gated values (SiLU on scalars, sigmoid gates on l >= 1), a
  sigmoid gate per head from node i's scalars, heads mixed by a linear map per degree (initialised to
  zero: each block starts as the identity); feed-forward: RMS norm per degree, Linear, gate, Linear
  (output initialised to zero); norms are RMS over channels of the per-component norms (no centring);
* a final norm, then the outputs.

How it is wrapped (each graph of the batch a row of ``to_dense_batch``):

* input fiber: degree 0 = the task's invariant node inputs (n-body: the charge; qm9, md: the element
  one-hot; a constant 1 where the task has none), degree 1 = its "1o" node inputs, one channel each
  (n-body: the velocity);
* neighbours = the task's graph: ``attend_sparse_neighbors`` with the dense adjacency (row i = the
  senders j of edges j -> i) and ``num_neighbors=0``, so no neighbour is added by distance; the task's
  invariant edge inputs (n-body: q_i q_j) go in as dense edge attributes beside |r_ij|;
* outputs: "point" -> x_i + v_i and node-level "1o" -> v_i, where v_i is the library's own degree-1
  output (``reduce_dim_out``: an equivariant linear map to one channel per degree), so n-body predicts a
  displacement of the input position and md forces are predicted directly (not -dE/dx: the library
  computes D(R_ij) under ``torch.no_grad``, so a gradient of its energy would miss their dependence on the
  positions); invariant outputs -> MLPs on the final degree-0 channels (node MLP; at graph level a sum
  over the graph, then a graph MLP), as ``egnn_pytorch`` does.

Scope: exact on inputs without a symmetry of their own (``GENERIC_INPUTS``). The library's norms divide
each degree's features by their RMS clamped at 1e-12, so where an input's own symmetry forces a node's
degree-1 features to vanish (the central C of methane or CO2 under its rotation stabiliser) the rounding
residue left there (~1e-17) is scaled up to ~1e-5 and on to the outputs: measured 3e-4 (methane) and
2e-5 (CO2) relative in float64 on md's symmetric molecules, while a 1e-9 perturbation of CO2 already
turns the C output from ~0 into a vector of size O(1). On every input without such a symmetry it is
exact to round-off (fp64 ~1e-15; fp32 ~1e-6 relative at most, measured with all weights random).

Attention (``attention``). ``"mlp"`` (default) is the paper's MLP attention (the library's
``l2_dist_attention=False``). ``"l2"`` is the library's default (logits -||q_i - k_ij|| per degree) and
is approximate in two ways, both measured in ``tests/test_reference_equiformer.py``: its distance is
``F.pairwise_distance``, which adds eps = 1e-6 to every component of q - k before the norm, so rotating
the inputs changes the logits of degree l >= 1 (relative equivariance error 1e-7 to 1e-6 in float64, random
weights, on n-body, normals and md); and its
degree-0 logits are not masked, so a node attends to padding and to non-neighbours in its neighbour slots
(there are max-in-degree slots per node in the batch): a graph's prediction depends on the other graphs
of its batch unless every node of the batch has the same in-degree (then its neighbour slots hold exactly its
neighbours). The wrapper refuses a batch where that does not hold (n-body's complete graphs and normals' k-NN
graphs pass; qm9's molecules do not).

Defaults: width 32 channels for each degree, degrees 0 and 1 (``num_degrees=2``, the library's default),
``depth=2`` (the library's), 4 heads of ``dim_head`` = width // heads channels per degree, radial MLP
width 16, the library's other defaults (attention hidden 4 x heads, LeakyReLU slope 0.1, head gates,
``attend_self``, zero-initialised block outputs): 233 876 parameters on n-body. The paper has no n-body
model; its QM9 model (6 blocks, 128x0e + 64x1e + 32x2e, 4 heads of 32x0e + 16x1e + 8x2e, radial MLP
64-64 on 128 Gaussians) written in this library's terms (``dim=(128, 64, 32)``, ``dim_head=(32, 16, 8)``,
radial width 64, MLP attention) has 13.7 M parameters: the library's kernels give every (degree in,
degree out) pair a full channel-by-channel weight matrix from the radial MLP. ``params`` sizes ``width``
(with ``dim_head`` following it unless given): ``params=20000`` on n-body gives width 6 (19 580).

Basis cache: the library keeps its basis in a directory (``$CACHE_PATH``, else
``~/.cache.equivariant_attention``; ``$CLEAR_CACHE`` set: in memory only) behind a file lock. The wrapper
sets ``CACHE_PATH`` to ``<equibench cache>/equiformer-pytorch-<version>`` (``$EQUIBENCH_CACHE`` or
``~/.cache/equibench``) before it first imports the library, unless ``CACHE_PATH`` or ``CLEAR_CACHE``
is already set. The basis is a deterministic function of the degree (fixed rotations); computing it takes
~0.02 s for ``num_degrees=2``, 0.4 s for 3, 7 s for 4.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import sys
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.utils import to_dense_adj, to_dense_batch

from ...core.cache import cache_dir
from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import POINT, field_dim, is_invariant
from ..base import GENERIC_INPUTS, Method, build_at_params
from ..blocks.backbone import invariant_heads, invariant_readout, is_vector_type, point_cloud_reason, vector_output

LIBRARY = "equiformer-pytorch"
Attention = Literal["mlp", "l2"]
#: why ``attention="l2"`` is not exact (measured with random weights, ``tests/test_reference_equiformer.py``)
L2_REASON = ("attention='l2' (the library's default) computes its logits with F.pairwise_distance, which adds "
             "eps=1e-6 to q - k before the norm: rotations change the degree-1 logits (relative equivariance "
             "error 1e-7 to 1e-6 in float64)")


def _library() -> Any:
    """The library's ``Equiformer`` class, its basis cache pointed into equibench's cache first."""
    if "equiformer_pytorch" not in sys.modules and "CLEAR_CACHE" not in os.environ:
        version = importlib.metadata.version(LIBRARY)
        os.environ.setdefault("CACHE_PATH", str(cache_dir() / f"{LIBRARY}-{version}"))
    from equiformer_pytorch import Equiformer  # optional dependency (extra "reference")
    return Equiformer


class LibraryEquiformerModel(nn.Module):
    """The library's ``Equiformer`` on equibench batches (module docstring)."""

    def __init__(self, spec: TaskSpec, width: int = 32, depth: int = 2, num_degrees: int = 2, heads: int = 4,
                 dim_head: int | None = None, radial_hidden_dim: int = 16, attention: Attention = "mlp") -> None:
        super().__init__()
        self.spec, self.attention = spec, attention
        self.point = spec.point_fields[0]
        self.scalar_fields = [k for k, t in spec.inputs.items() if is_invariant(t)]
        self.vector_fields = [k for k, t in spec.inputs.items() if is_vector_type(t)]
        n0 = sum(field_dim(spec.inputs[k]) for k in self.scalar_fields)
        n1 = sum(field_dim(spec.inputs[k]) // 3 for k in self.vector_fields)
        self.constant_input = n0 == 0
        dim_in = (max(n0, 1), n1) if n1 else (max(n0, 1),)
        edge_dim = sum(field_dim(t) for t in spec.edge_inputs.values())
        self.vector_out = vector_output(spec)
        with contextlib.redirect_stdout(sys.stderr):  # the library prints when it fills its basis cache
            self.net = _library()(
                dim=width, dim_in=dim_in, input_degrees=len(dim_in), num_degrees=num_degrees, depth=depth,
                heads=heads, dim_head=dim_head or max(1, width // heads), radial_hidden_dim=radial_hidden_dim,
                edge_dim=edge_dim or None, attend_sparse_neighbors=True, num_neighbors=0,
                l2_dist_attention=attention == "l2", reduce_dim_out=self.vector_out)
        if not self.vector_out:
            self.node_head, self.graph_head = invariant_heads(width, spec)

    def dense_inputs(self, batch: Batch, B: int) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(the input fiber ``{0: [B, n, d0], 1: [B, n, d1, 3]}``, positions ``[B, n, 3]``, mask ``[B, n]``)."""
        pos = batch[self.point]
        x, mask = to_dense_batch(pos, batch.batch, batch_size=B)
        if self.constant_input:
            scalars = torch.ones_like(pos[:, :1])
        else:
            scalars = torch.cat([batch[k].reshape(pos.shape[0], -1).to(pos.dtype) for k in self.scalar_fields], -1)
        fiber = {0: to_dense_batch(scalars, batch.batch, batch_size=B)[0]}
        if self.vector_fields:
            vecs = torch.cat([batch[k].reshape(pos.shape[0], -1, 3).to(pos.dtype) for k in self.vector_fields], 1)
            fiber[1] = to_dense_batch(vecs, batch.batch, batch_size=B)[0]
        return fiber, x, mask

    def dense_edges(self, batch: Batch, B: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(adjacency ``[B, n, n]``, edge attributes ``[B, n, n, e]`` or None): entry (i, j) is the edge j -> i."""
        adj = to_dense_adj(batch.edge_index, batch.batch, batch_size=B, max_num_nodes=n).transpose(1, 2) > 0
        if not self.spec.edge_inputs:
            return adj, None
        m = batch.edge_index.shape[1]
        attr = torch.cat([batch[k].reshape(m, -1).to(dtype) for k in self.spec.edge_inputs], -1)
        dense = to_dense_adj(batch.edge_index, batch.batch, edge_attr=attr, batch_size=B, max_num_nodes=n)
        return adj, dense.transpose(1, 2)

    def check_l2_batch(self, adj: torch.Tensor, mask: torch.Tensor) -> None:
        """The library's l2 attention leaves degree 0 unmasked: only exact when every node fills its slots."""
        degree = adj.sum(-1)[mask]
        if degree.numel() and bool((degree != degree.max()).any()):
            raise ValueError("equiformer_pytorch with attention='l2' needs every node of a batch to have the same "
                             "in-degree (the library does not mask degree-0 attention: a node would attend to "
                             "padding and non-neighbours); use attention='mlp'")

    def forward(self, batch: Batch) -> torch.Tensor:
        B = int(batch.num_graphs)
        fiber, x, mask = self.dense_inputs(batch, B)
        adj, edges = self.dense_edges(batch, B, x.shape[1], x.dtype)
        if self.attention == "l2":
            self.check_l2_batch(adj, mask)
        type0, type1 = self.net(fiber, x, mask=mask, adj_mat=adj, edges=edges)
        if self.vector_out:
            v = type1[mask]
            return x[mask] + v if self.spec.output == POINT else v
        return invariant_readout(self.node_head, self.graph_head, type0[mask], batch)


@register_method("equiformer_pytorch")
class EquiformerPytorch(Method):
    """equiformer-pytorch's Equiformer (lucidrains; Liao and Smidt 2023), SO(3)-exact with MLP attention."""

    domains = ("graph3d",)
    exact = True
    group = "SO3"
    exact_scope = GENERIC_INPUTS  # the RMS norms amplify rounding where a symmetric input zeroes a feature
    origin: ClassVar[str] = LIBRARY
    counterpart: ClassVar[str | None] = None
    smoke_options: ClassVar[dict[str, Any]] = {"width": 8, "depth": 1, "heads": 2, "radial_hidden_dim": 8}

    def __init__(self, *, width: int = 32, depth: int = 2, num_degrees: int = 2, heads: int = 4,
                 dim_head: int | None = None, radial_hidden_dim: int = 16, attention: Attention = "mlp",
                 params: int | None = None) -> None:
        for name, value in (("width", width), ("depth", depth), ("heads", heads),
                            ("radial_hidden_dim", radial_hidden_dim)):
            if value < 1:
                raise ValueError(f"{name} must be positive")
        if dim_head is not None and dim_head < 1:
            raise ValueError("dim_head must be positive")
        if num_degrees < 2:
            raise ValueError("num_degrees must be at least 2 (degree-1 features carry the vector outputs)")
        super().__init__(width=width, depth=depth, num_degrees=num_degrees, heads=heads, dim_head=dim_head,
                         radial_hidden_dim=radial_hidden_dim, attention=attention, params=params)
        self.width, self.depth, self.num_degrees, self.heads = width, depth, num_degrees, heads
        self.dim_head, self.radial_hidden_dim = dim_head, radial_hidden_dim
        self.attention, self.params = attention, params

    def supports(self, spec: TaskSpec) -> str | None:
        if importlib.util.find_spec("equiformer_pytorch") is None:
            return f"{LIBRARY} is not installed (pip install -e .[reference])"
        reason = super().supports(spec)
        if reason:
            return reason
        return point_cloud_reason("equiformer_pytorch", spec,
                                  outputs="points, node-level '1o' vectors or invariant scalars")

    def inexact_reason(self, spec: TaskSpec) -> str | None:
        return L2_REASON if self.attention == "l2" else super().inexact_reason(spec)

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        reason = self.supports(spec)
        if reason:
            raise ValueError(reason)
        return build_at_params(
            lambda w: LibraryEquiformerModel(spec, w, self.depth, self.num_degrees, self.heads, self.dim_head,
                                             self.radial_hidden_dim, self.attention),
            self.params, self.width)
