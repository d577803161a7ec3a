"""``cgenn``: Clifford group equivariant message passing as its paper's n-body model builds it, O(3)-exact.

Ruhe, Brandstetter and Forre, "Clifford Group Equivariant Neural Networks" (NeurIPS 2023, arXiv
2305.11141), n-body experiment (test MSE 0.0039 +- 0.0001 in the paper's n-body table); reference
``DavidRuhe/clifford-group-equivariant-neural-networks``, ``models/nbody_cggnn.py`` (``NBodyCGGNN``)
and ``models/modules``. The algebra Cl(3,0) and the layers are ``blocks/clifford.py`` (written
here from the blade rules; the reference's code is not used).

Group: E(3) = O(3) (reflections included) plus translations, exactly. Every feature is a stack of
multivectors ``[N, C, 8]``; Q in O(3) acts on them by its outermorphism rho(Q) (grade 0 invariant,
grade 1 the vector Q v, grade 2 the bivector, grade 3 times det Q). Every layer commutes with rho(Q)
(``blocks/clifford.py``); translations are removed by taking positions relative to the graph's
mean and differences h_i - h_j.

Inputs (per node, one multivector channel each): the task's invariant node inputs (n-body: the
charge) in grade 0; the position relative to its graph's mean, x_i - mean_j x_j, in grade 1; every
"1o" node input (n-body: the velocity) in grade 1. Invariant edge inputs (n-body: q_i q_j) are
grade-0 channels of the edge. Network (``depth`` layers, ``width`` channels)::

    h^0      = MVLinear_shared(inputs)                    (one weight per channel pair, scalar bias)
    m_ij     = CEMLP_e([h_i - h_j, a_ij])                 (channels concatenated)
    h_i     <- h_i + CEMLP_h([h_i, mean_{j -> i} m_ij])
    CEMLP    = 2 x (MVLinear -> MVGate -> GeometricProductLayer -> MVLayerNorm)

The edge message sees the relative position x_i - x_j through h_i - h_j (the embedding is linear,
its bias cancels), exactly as the reference does. Outputs: "point" -> x_i + <MVLinear(h_i)>_1
(one output channel's vector part: a displacement added to the input position, the reference's
``loc + loc_pred``); node-level "k x 1o" -> the vector parts of k output channels (normals, md
forces); invariant scalars ("0e" mixtures) -> an MLP on the grade-0 parts <h_i>_0 (graph level:
node MLP, sum over the graph, graph MLP, as ``egnn``'s head).

Defaults = the reference's n-body model: ``depth=3``, ``width=28`` (``hidden_features``), the
channel-wise geometric product layer (``product="channelwise"``, the reference's
``SteerableGeometricProductLayer``), the quadratic-form gate (``gate="quadratic"``, its
``MVSiLU``), mean aggregation, residual node updates; 134 625 parameters on n-body. Its optimiser
(Adam, lr 4e-3, weight decay 1e-4, batch 100, 3 000 training samples, 131 072 steps, cosine
schedule with warm-up) belongs to the suite. Options beyond the reference: ``product=
"fully_connected"`` (the paper's fully connected geometric product: each output channel sums
over all input channels' path products; ~c times the product weights) and ``gate="scalar"``
(every grade gated by a sigmoid of the channel's grade-0 part).

Speed: the channel-wise geometric product runs in a fused CPU kernel (``blocks/clifford_kernel.py``,
built by ``scripts/setup.sh``; tensor operations on other devices). One n-body train step at the
defaults, batch 100, one thread, on the 2-core machine: 0.28-0.32 s alone, 0.33-0.37 s beside another
worker (paper-cpu, 39236b8), against about 1.2 s with the product as tensor operations (``[edges,
channels, 64]`` intermediates); the values agree to float rounding (``tests/test_cgenn.py``). The edge
MLP's first linear layer runs on the nodes before the gather (``CEMLP.forward_edges``): the same
function without an ``[edges, 2 width + 1, 8]`` input.

Checked once against the reference code (``NBodyCGGNN`` with the same, perturbed weights, float64,
n-body inputs): predictions agree to 4e-15 (not a test here: the reference is not an installable
package). Differences, on purpose: the reference casts every input to float32; here the run's
dtype is kept. The heads for other outputs (node vectors, scalars) and the options are additions.

Forces (``forces``, as ``egnn``'s): ``"direct"`` (default) reads a node-level "1o" target (md
forces) from grade 1; ``"conservative"`` builds the network for a graph-level invariant energy
and predicts F = -dE/dx (``blocks.energy_forces.ForcesOption``); ``params`` then sizes the
energy network.

Other tasks: supported where the output is a point, node-level "1o" vectors or invariant scalars
(n-body, normals, QM9, md energies and forces); not supported: pseudo-vector, pseudo-scalar or
l >= 2 outputs and inputs, vector outputs at graph level, non-invariant edge inputs, tasks
without exactly one point input.
"""
from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch_geometric.data import Batch

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import POINT, field_dim, is_invariant
from ..base import Method, build_at_params
from ..blocks.backbone import invariant_heads, invariant_readout, is_vector_type, point_cloud_reason, vector_output
from ..blocks.clifford import GATES, VECTOR, GeometricProductLayer, MVGate, MVLayerNorm, MVLinear, embed
from ..blocks.energy_forces import ForcesOption

PRODUCTS = ("channelwise", "fully_connected")


class CEMLP(nn.Module):
    """``blocks`` x (MVLinear -> MVGate -> GeometricProductLayer -> MVLayerNorm), ``[.., c_in, 8] -> [.., width, 8]``
    (the reference's ``CEMLP``)."""

    def __init__(self, c_in: int, width: int, fully_connected: bool, gate: str, blocks: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers += [MVLinear(c_in if i == 0 else width, width), MVGate(width, gate),
                       GeometricProductLayer(width, width, fully_connected), MVLayerNorm(width)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def forward_edges(self, h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                      edge_attr: torch.Tensor) -> torch.Tensor:
        """``self([h_i - h_j, a_ij])`` for edges j -> i (``dst`` = i, ``src`` = j), with the first MVLinear
        applied on the nodes before the gather: it is linear, so W [h_i - h_j, a_ij] + b = (W_h h)_i - (W_h h)_j
        + W_a a_ij + b, and the invariant edge inputs a_ij (grade 0 only) and the bias touch the scalar blade
        alone. The same function as concatenating per edge, without the ``[E, c_h + c_a, 8]`` input and its
        channel mixing over every edge."""
        first = cast(MVLinear, self.layers[0])
        width = h.shape[-2]
        hw = MVLinear.mix_per_grade(h, first.weight[:, :width])  # [N, c_out, 8]
        out = hw.index_select(0, dst) - hw.index_select(0, src)
        scalar = edge_attr[..., 0] @ first.weight[:, width:, 0].T  # [E, c_out]: grade-0 weights on a_ij
        if first.bias is not None:
            scalar = scalar + first.bias
        out.select(-1, 0).add_(scalar)
        return self.layers[1:](out)


class CliffordLayer(nn.Module):
    """One message-passing layer (module docstring): edge CEMLP on [h_i - h_j, a_ij], mean over
    incoming edges, residual node CEMLP on [h_i, m_i]."""

    def __init__(self, width: int, edge_dim: int, fully_connected: bool, gate: str) -> None:
        super().__init__()
        self.edge_model = CEMLP(width + edge_dim, width, fully_connected, gate)
        self.node_model = CEMLP(2 * width, width, fully_connected, gate)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor,
                inv_degree: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index  # edge j -> i: src = j, dst = i
        m = self.edge_model.forward_edges(h, src, dst, edge_attr)  # = edge_model(cat([h_i - h_j, a_ij]))
        agg = m.new_zeros(h.shape).index_add(0, dst, m) * inv_degree[:, None, None]
        return h + self.node_model(torch.cat([h, agg], dim=-2))


def graph_mean(pos: torch.Tensor, batch_index: torch.Tensor, n_graphs: int) -> torch.Tensor:
    """``[N, 3]``: the mean position of each node's graph."""
    total = pos.new_zeros(n_graphs, 3).index_add(0, batch_index, pos)
    count = pos.new_zeros(n_graphs, 1).index_add(0, batch_index, pos.new_ones(pos.shape[0], 1))
    return (total / count.clamp_min(1.0))[batch_index]


class CGENNModel(nn.Module):
    """The Clifford group equivariant network on a batch: ``model(batch) -> prediction`` (module docstring)."""

    def __init__(self, spec: TaskSpec, width: int = 28, depth: int = 3, product: str = "channelwise",
                 gate: str = "quadratic") -> None:
        super().__init__()
        self.spec, self.width, self.depth = spec, width, depth
        self.point = spec.point_fields[0]
        self.scalar_fields = [k for k, t in spec.inputs.items() if is_invariant(t)]
        self.vector_fields = [k for k, t in spec.inputs.items() if is_vector_type(t)]
        n_in = sum(field_dim(spec.inputs[k]) for k in self.scalar_fields) + 1
        n_in += sum(field_dim(spec.inputs[k]) // 3 for k in self.vector_fields)
        edge_dim = sum(field_dim(t) for t in spec.edge_inputs.values())
        fc = product == "fully_connected"
        self.embedding = MVLinear(n_in, width, per_grade=False)
        self.layers = nn.ModuleList(CliffordLayer(width, edge_dim, fc, gate) for _ in range(depth))
        self.vector_out = vector_output(spec, copies=True)
        if self.vector_out:
            self.projection = MVLinear(width, field_dim(spec.output) // 3)
        else:
            self.node_head, self.graph_head = invariant_heads(width, spec)

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(node multivectors ``[N, n_in, 8]``, edge multivectors ``[E, edge_dim, 8]``)."""
        pos = batch[self.point]
        n = pos.shape[0]
        batch_index = getattr(batch, "batch", None)
        if batch_index is None:
            batch_index = torch.zeros(n, dtype=torch.long, device=pos.device)
        n_graphs = int(getattr(batch, "num_graphs", 1) or 1)
        channels = [embed(batch[k].reshape(n, -1, 1), 0) for k in self.scalar_fields]
        channels.append(embed((pos - graph_mean(pos, batch_index, n_graphs))[:, None], 1))
        channels += [embed(batch[k].reshape(n, -1, 3), 1) for k in self.vector_fields]
        n_edges = batch.edge_index.shape[1]
        edge = [embed(batch[k].reshape(n_edges, -1, 1), 0) for k in self.spec.edge_inputs]
        edge_attr = torch.cat(edge, dim=-2) if edge else pos.new_zeros(n_edges, 0, 8)
        return torch.cat(channels, dim=-2), edge_attr

    def forward(self, batch: Batch) -> torch.Tensor:
        x, edge_attr = self.inputs(batch)
        dst = batch.edge_index[1]
        degree = x.new_zeros(x.shape[0]).index_add(0, dst, x.new_ones(dst.numel()))
        inv_degree = 1.0 / degree.clamp_min(1.0)
        h = self.embedding(x)
        for layer in self.layers:
            h = layer(h, batch.edge_index, edge_attr, inv_degree)
        if self.vector_out:
            vec = self.projection(h)[..., VECTOR].reshape(h.shape[0], -1)  # [N, 3k]
            return batch[self.point] + vec if self.spec.output == POINT else vec
        return invariant_readout(self.node_head, self.graph_head, h[..., 0], batch)


@register_method("cgenn")
class CGENN(ForcesOption, Method):
    """Clifford group equivariant network (Ruhe et al. 2023, n-body model): multivector message passing, O(3)-exact."""

    domains = ("graph3d",)
    exact = True
    group = "O3"
    smoke_options = {"width": 6, "depth": 1}

    def __init__(self, *, width: int = 28, depth: int = 3, params: int | None = None,
                 product: str = "channelwise", gate: str = "quadratic", forces: str = "direct") -> None:
        if width < 1 or depth < 1:
            raise ValueError("width and depth must be positive")
        if product not in PRODUCTS:
            raise ValueError(f"product must be one of {PRODUCTS}, got {product!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        super().__init__(width=width, depth=depth, params=params, product=product, gate=gate)
        self.width, self.depth, self.params, self.product, self.gate = width, depth, params, product, gate
        self.set_forces(forces)  # recorded only when set

    def supports(self, spec: TaskSpec) -> str | None:
        reason = super().supports(spec)
        if reason:
            return reason
        return point_cloud_reason("cgenn", self.network_spec(spec), copies=True,
                                  outputs="points, node-level '1o' vectors (grade 1) or invariant scalars (grade 0)")

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        reason = self.supports(spec)
        if reason:
            raise ValueError(reason)
        net_spec = self.network_spec(spec)
        net = build_at_params(lambda w: CGENNModel(net_spec, w, self.depth, self.product, self.gate),
                              self.params, self.width)
        return self.with_forces(net, spec)
