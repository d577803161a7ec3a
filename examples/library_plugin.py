"""A third-party library model as an equibench method: egnn-pytorch's ``EGNN_Network`` (lucidrains).

``equibench run quick --plugin examples/library_plugin.py --methods egnn_network --tasks nbody``
E(3)-exact: its layers see invariants only (h, |x_i - x_j|^2, edge inputs) and move points along
x_i - x_j, all pairs of each graph (dense batch, padding masked; n^2 memory). No vector inputs in the
library: a "1o" input enters h^0 as its norm and moves the output by v_i w(h_i).
Outputs: "point" -> x^L; node "1o" -> x^L - x^0; invariant scalars -> linear head (summed per graph).
"""
import torch
from torch import nn
from torch_geometric.nn import global_add_pool
from torch_geometric.utils import to_dense_adj, to_dense_batch

from equibench import POINT, Method, build_at_params, field_dim, is_invariant, register_method


class Net(nn.Module):
    def __init__(self, spec, dim: int, depth: int) -> None:
        super().__init__()
        from egnn_pytorch import EGNN_Network
        self.spec, self.vecs = spec, [k for k, t in spec.inputs.items() if t == "1o"]
        self.scalars = [k for k, t in spec.inputs.items() if t != POINT and is_invariant(t)]
        self.embed = nn.Linear(max(len(self.vecs) + sum(field_dim(spec.inputs[k]) for k in self.scalars), 1), dim)
        self.net = EGNN_Network(depth=depth, dim=dim, edge_dim=sum(field_dim(t) for t in spec.edge_inputs.values()))
        self.vector_out = spec.output == POINT or (spec.output, spec.level) == ("1o", "node")
        self.head = nn.Linear(dim, max(len(self.vecs), 1) if self.vector_out else field_dim(spec.output))

    def forward(self, batch):
        b, pos = batch.batch, batch[self.spec.point_fields[0]]
        feats = [batch[k].norm(dim=-1, keepdim=True) for k in self.vecs] + [batch[k] for k in self.scalars]
        h, mask = to_dense_batch(self.embed(torch.cat(feats, -1) if feats else torch.ones_like(pos[:, :1])), b)
        edges = [to_dense_adj(batch.edge_index, b, batch[k]).transpose(1, 2) for k in self.spec.edge_inputs]
        h, x = self.net(h, to_dense_batch(pos, b)[0], edges=torch.cat(edges, -1) if edges else None, mask=mask)
        w, x = self.head(h[mask]), x[mask]
        if not self.vector_out:
            return global_add_pool(w, b, size=batch.num_graphs) if self.spec.level == "graph" else w
        x = x + sum((w[:, i:i + 1] * batch[k] for i, k in enumerate(self.vecs)), torch.zeros_like(x))
        return x if self.spec.output == POINT else x - pos


@register_method("egnn_network")
class EGNNNetwork(Method):
    """egnn-pytorch's EGNN_Network on all pairs of each graph (a plugin example; see ``egnn_pytorch``)."""
    exact, group, origin, counterpart, smoke_options = True, "O3", "egnn-pytorch", "egnn", {"dim": 8, "depth": 2}

    def __init__(self, *, dim: int = 32, depth: int = 3, params: int | None = None) -> None:
        super().__init__(dim=dim, depth=depth, params=params)
        self.dim, self.depth, self.params = dim, depth, params

    def supports(self, spec):
        ok = spec.point_fields and all(t in (POINT, "1o") or is_invariant(t) for t in spec.inputs.values())
        ok = ok and all(is_invariant(t) for t in spec.edge_inputs.values())
        ok = ok and (spec.output == POINT or (spec.output, spec.level) == ("1o", "node") or is_invariant(spec.output))
        return super().supports(spec) or (None if ok else "egnn_network: point/'1o'/scalar inputs and outputs only")

    def build(self, spec, seed: int = 0) -> nn.Module:
        return build_at_params(lambda d: Net(spec, d, self.depth), self.params, self.dim)
