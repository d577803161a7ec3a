"""A third-party adapter outside the package: an EGNN-style network (Satorras et al., 2021).

Load it with ``equibench run SUITE --plugin examples/egnn_plugin.py --methods egnn_example``; nothing in
equibench changes. E(3)-equivariant by construction: messages use only invariants
(h_i, h_j, |x_i - x_j|^2, edge inputs); positions move along relative vectors,
``x_i <- x_i + mean_j (x_i - x_j) phi_x(m_ij)``; vector inputs enter as ``v_i phi_v(h_i)``.
Node-level "1o"/"point" outputs are the displacement x_out - x_in (+ x_in for points); scalar
outputs come from invariant node states.
"""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import global_add_pool
from torch_geometric.utils import scatter

from equibench import POINT, Method, build_at_params, irreps, mlp, register_method


class EGNNLayer(nn.Module):
    def __init__(self, width: int, edge_dim: int) -> None:
        super().__init__()
        self.phi_e = mlp([2 * width + 1 + edge_dim, width, width], last_act=True)
        self.phi_x = mlp([width, width, 1])
        self.phi_v = mlp([width, width, 1])
        self.phi_h = mlp([2 * width, width, width])

    def forward(self, h, x, v, edge_index, edge_attr):
        src, dst = edge_index
        rel = x[dst] - x[src]
        m = self.phi_e(torch.cat([h[dst], h[src], (rel * rel).sum(-1, keepdim=True), edge_attr], -1))
        x = x + scatter(rel * self.phi_x(m), dst, 0, dim_size=x.shape[0], reduce="mean")
        if v is not None:
            x = x + v * self.phi_v(h)
        h = h + self.phi_h(torch.cat([h, scatter(m, dst, 0, dim_size=h.shape[0], reduce="sum")], -1))
        return h, x


class EGNN(nn.Module):
    def __init__(self, spec, width: int, depth: int) -> None:
        super().__init__()
        self.spec = spec
        self.scalars = [k for k, t in spec.inputs.items() if t != POINT and all(ir.l == 0 and ir.p == 1
                                                                                  for _, ir in irreps(t))]
        self.vectors = [k for k, t in spec.inputs.items() if t == "1o"]
        n_in = sum(irreps(spec.inputs[k]).dim for k in self.scalars) or 1
        edge_dim = sum(irreps(t).dim for t in spec.edge_inputs.values())
        self.embed = mlp([n_in, width, width])
        self.layers = nn.ModuleList(EGNNLayer(width, edge_dim) for _ in range(depth))
        out = irreps(spec.output)
        self.vector_out = spec.output in (POINT, "1o")
        self.head = mlp([width, width, 1 if self.vector_out else out.dim])

    def forward(self, batch: Batch) -> torch.Tensor:
        pos = batch[self.spec.point_fields[0]]
        feats = [batch[k] for k in self.scalars] or [torch.ones_like(pos[:, :1])]
        h = self.embed(torch.cat(feats, -1))
        v = batch[self.vectors[0]] if self.vectors else None
        edge_attr = torch.cat([batch[k] for k in self.spec.edge_inputs] or
                              [pos.new_zeros(batch.edge_index.shape[1], 0)], -1)
        x = pos
        for layer in self.layers:
            h, x = layer(h, x, v, batch.edge_index, edge_attr)
        if self.vector_out:
            out = (x - pos) * self.head(h)
            return out + pos if self.spec.output == POINT else out
        out = self.head(h)
        return global_add_pool(out, batch.batch, size=int(batch.num_graphs)) if self.spec.level == "graph" else out


@register_method("egnn_example")
class EGNNMethod(Method):
    """EGNN-style network, a third-party plugin example (the package's own is ``egnn``)."""

    exact = True
    group = "O3"
    smoke_options = {"width": 16, "depth": 2}

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None) -> None:
        super().__init__(width=width, depth=depth, params=params)
        self.width, self.depth, self.params = width, depth, params

    def supports(self, spec):
        reason = super().supports(spec)
        if reason is None and not spec.point_fields:
            return "egnn needs a point input"
        if reason is None and not (spec.output in (POINT, "1o") or all(ir.l == 0 and ir.p == 1
                                                                       for _, ir in irreps(spec.output))):
            return f"egnn outputs scalars or vectors, not {spec.output!r}"
        return reason

    def build(self, spec, seed: int = 0) -> nn.Module:
        return build_at_params(lambda w: EGNN(spec, w, self.depth), self.params, self.width)
