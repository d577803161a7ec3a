"""An invariant, graph-level plugin: a SchNet-style distance network (Schütt et al., 2017).

Load it with ``equibench run smoke --tasks qm9 --methods schnet_example --plugin
examples/schnet_plugin.py``; nothing in equibench changes, and everything it needs comes from
``equibench`` itself.

The network sees the geometry only through interatomic distances, so its output is exactly
invariant under E(3) (rotations, reflections, translations) and, with sum pooling, under
permutations of the atoms:

* embedding: ``h_i = W x_i`` of the invariant node inputs (qm9: the one-hot element over
  H, C, N, O, F);
* radial basis: ``e_k(d_ij) = exp(-gamma (d_ij - mu_k)^2)``, ``mu_k`` evenly spaced on
  [0, cutoff], ``gamma = 1 / (2 spacing^2)``, times the cosine envelope
  ``(cos(pi d / cutoff) + 1) / 2`` so that filters vanish smoothly at the cutoff;
* interaction (continuous-filter convolution, repeated ``interactions`` times):
  ``h_i <- h_i + Dense(ssp(Dense(sum_j W(e(d_ij)) * Dense(h_j))))`` with a filter network
  ``W: R^n_rbf -> R^hidden`` and the shifted softplus ``ssp(x) = softplus(x) - log 2``;
* readout: an atom-wise MLP, summed over the molecule (graph-level ``"0e"`` outputs), or kept
  per atom (node-level invariant outputs).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import global_add_pool
from torch_geometric.utils import scatter

from equibench import POINT, Method, TaskSpec, build_at_params, field_dim, is_invariant, register_method


class ShiftedSoftplus(nn.Module):
    """``softplus(x) - log 2`` (zero at zero; SchNet's activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(x) - math.log(2.0)


class RadialBasis(nn.Module):
    """Gaussian expansion of distances times a cosine envelope that vanishes at ``cutoff``."""

    def __init__(self, n_rbf: int, cutoff: float) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("mu", torch.linspace(0.0, cutoff, n_rbf))
        self.gamma = 0.5 / (cutoff / (n_rbf - 1)) ** 2

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        envelope = 0.5 * (torch.cos(math.pi * d / self.cutoff) + 1.0) * (d < self.cutoff)
        return torch.exp(-self.gamma * (d[:, None] - self.mu) ** 2) * envelope[:, None]


class Interaction(nn.Module):
    """One continuous-filter convolution with its atom-wise layers and a residual update."""

    def __init__(self, hidden: int, n_rbf: int) -> None:
        super().__init__()
        self.filter = nn.Sequential(nn.Linear(n_rbf, hidden), ShiftedSoftplus(), nn.Linear(hidden, hidden))
        self.into = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Sequential(nn.Linear(hidden, hidden), ShiftedSoftplus(), nn.Linear(hidden, hidden))

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, rbf: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index  # edge j -> i is (j, i)
        messages = self.filter(rbf) * self.into(h)[src]
        return h + self.out(scatter(messages, dst, 0, dim_size=h.shape[0], reduce="sum"))


class SchNet(nn.Module):
    """``model(batch) -> [B, field_dim(output)]`` (graph level) or ``[N, ...]`` (node level)."""

    def __init__(self, spec: TaskSpec, hidden: int, interactions: int, n_rbf: int, cutoff: float) -> None:
        super().__init__()
        self.spec = spec
        self.pos_key = spec.point_fields[0]
        self.scalars = [k for k, t in spec.inputs.items() if t != POINT]
        in_dim = sum(field_dim(spec.inputs[k]) for k in self.scalars)
        self.embed = nn.Linear(max(in_dim, 1), hidden)
        self.rbf = RadialBasis(n_rbf, cutoff)
        self.blocks = nn.ModuleList(Interaction(hidden, n_rbf) for _ in range(interactions))
        self.head = nn.Sequential(nn.Linear(hidden, hidden // 2), ShiftedSoftplus(),
                                  nn.Linear(hidden // 2, field_dim(spec.output)))

    def forward(self, batch: Batch) -> torch.Tensor:
        pos = batch[self.pos_key]
        src, dst = batch.edge_index
        d = (pos[src] - pos[dst]).norm(dim=-1)
        feats = (torch.cat([batch[k].reshape(pos.shape[0], -1) for k in self.scalars], -1) if self.scalars
                 else torch.ones_like(pos[:, :1]))
        h = self.embed(feats)
        rbf = self.rbf(d)
        for block in self.blocks:
            h = block(h, batch.edge_index, rbf)
        out = self.head(h)
        return global_add_pool(out, batch.batch, size=int(batch.num_graphs)) if self.spec.level == "graph" else out


@register_method("schnet_example")
class SchNetExample(Method):
    """SchNet-style invariant network: RBF distance expansion, continuous-filter convolutions, sum readout.

    Exactly E(3)-invariant (it sees distances only), so it runs the tasks whose inputs besides
    one position field are invariant and whose output is invariant (qm9; md with
    ``target="energy"``). ``params`` matches a parameter budget by choosing ``hidden``.
    """
    exact, group = True, "O3"
    smoke_options = {"hidden": 16, "interactions": 2, "n_rbf": 16}

    def __init__(self, *, hidden: int = 64, interactions: int = 3, n_rbf: int = 32, cutoff: float = 5.0,
                 params: int | None = None) -> None:
        super().__init__(hidden=hidden, interactions=interactions, n_rbf=n_rbf, cutoff=cutoff, params=params)
        self.hidden, self.interactions, self.n_rbf = hidden, interactions, n_rbf
        self.cutoff, self.params = cutoff, params

    def supports(self, spec: TaskSpec) -> str | None:
        ok = (len(spec.point_fields) == 1 and is_invariant(spec.output) and not spec.edge_inputs
              and all(t == POINT or is_invariant(t) for t in spec.inputs.values()))
        return super().supports(spec) or (None if ok else
                                          "schnet_example: one position field, invariant inputs and output only")

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return build_at_params(lambda w: SchNet(spec, max(w, 2), self.interactions, self.n_rbf, self.cutoff),
                               self.params, self.hidden)
