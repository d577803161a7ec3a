"""``egnn``: EGNN with velocities as its paper's n-body experiment builds it (EGNN_vel), E(3)-exact.

Satorras, Hoogeboom and Welling, "E(n) Equivariant Graph Neural Networks" (ICML 2021), n-body
experiment (Table 2, EGNN row: test MSE 0.0071); reference ``vgsatorras/egnn``, ``main_nbody.py``
with ``EGNN_vel``.

Group: E(3) = O(3) (reflections included) plus translations, exactly: only invariants (h, squared
distances, invariant edge inputs) enter the MLPs, and coordinates move along relative vectors
and input vectors. One layer (``depth`` of them), for edges j -> i::

    m_ij      = phi_e(h_i, h_j, |x_i - x_j|^2, a_ij)                     (a_ij: fixed edge attributes)
    x_i      <- x_i + C sum_j (x_i - x_j) phi_x(m_ij) + phi_v(h_i) v_i    (C = 1 / (neighbours of i))
    h_i      <- h_i + phi_h(h_i, sum_j m_ij)

(the paper's velocity variant: v_i <- phi_v(h_i) v_i^init + C sum_j (x_i - x_j) phi_x(m_ij),
x_i <- x_i + v_i, written as one position update). phi_e: two linear layers with SiLU after
each; phi_h: linear, SiLU, linear; phi_x: linear, SiLU, linear (no bias, initialised with gain
1e-3 as in the reference); phi_v: linear, SiLU, linear. x^0 = the input positions; v^init = the
task's first "1o" node input (n-body: the velocity), the same v^init in every layer; further
"1o" node inputs get their own phi_v term.

* Node input h^0 (a linear embedding): the norm of every "1o" node input (the reference's
  |v_i|) and the task's invariant node inputs; on n-body that adds the charge q_i, which the
  reference passes only through the q_i q_j edge attribute (``node_scalars=False`` reproduces
  the reference's h^0 = |v_i| exactly).
* Edge attributes a_ij: the squared input distance |x_i^0 - x_j^0|^2 and the task's invariant
  edge inputs (n-body: q_i q_j) - the reference's two edge features.
* Output: "point" -> the final positions x^L (n-body: predicted positions at the target frame);
  "1o" at node level -> the displacement x^L - x^0 (normals, md forces; the layers update the
  displacement itself, so it is never formed as a float32 difference of positions); invariant scalar outputs
  ("0e" mixtures) -> an MLP on h^L (graph level: node MLP, sum, graph MLP, like the reference's
  QM9 model, whose layers do not update coordinates: nor do ours for scalar outputs).

Defaults = the reference's n-body run: ``depth=4``, ``width=64`` (``nf``), SiLU; its optimiser
(Adam, lr 5e-4, batch 100, 3 000 training samples, 10 000 epochs) belongs to the suite. As in
the reference, C is 1 / (number of edges into i) (its segment mean) and phi_v sees h before the
layer's update. Differences, on purpose: the reference clamps each coordinate update
component-wise to +-100 ("never activated"; a component-wise clamp is not rotation-equivariant):
not done here; and the charge joins h^0 by default (above).

Forces (``forces``, as ``e3nn_nequip``'s): ``"direct"`` (default) predicts a node-level "1o" target
(md forces) as the coordinate displacement x^L - x^0; ``"conservative"`` builds the network for a
graph-level invariant energy on such a task (scalar outputs: its layers do not move coordinates;
E depends on the positions through |x_i - x_j|^2) and predicts F = -dE/dx
(``blocks.energy_forces.ForcesOption``): conservative by construction, and still E(3)-exact.
``params`` then sizes the energy network.

Other tasks: supported where the output is a point, a node-level "1o" vector, or invariant
scalars (n-body, normals, QM9, md energies and forces); not supported: outputs with l >= 1 other
than one node-level "1o" (a pseudovector "1e" or l = 2 would need more than coordinate
displacements), non-invariant edge inputs, node inputs of l >= 2 or pseudo-vectors, tasks
without a point input.
"""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.data import Batch

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import POINT, field_dim, is_invariant
from ..base import Method, build_at_params
from ..blocks.backbone import invariant_heads, invariant_readout, is_vector_type, mlp, point_cloud_reason, vector_output
from ..blocks.energy_forces import ForcesOption


class EGCL(nn.Module):
    """One E(n)-equivariant convolution layer with velocity terms (module docstring)."""

    def __init__(self, width: int, edge_dim: int, n_vectors: int, update_coords: bool) -> None:
        super().__init__()
        self.phi_e = mlp([2 * width + 1 + edge_dim, width, width], last_act=True)
        self.phi_h = mlp([2 * width, width, width])
        self.update_coords = update_coords
        if update_coords:
            last = nn.Linear(width, 1, bias=False)
            nn.init.xavier_uniform_(last.weight, gain=0.001)
            self.phi_x = nn.Sequential(nn.Linear(width, width), nn.SiLU(), last)
            self.phi_v = nn.ModuleList(mlp([width, width, 1]) for _ in range(n_vectors))

    def forward(self, h: torch.Tensor, dx: torch.Tensor, d0: torch.Tensor, vectors: list[torch.Tensor],
                edge_index: torch.Tensor, edge_attr: torch.Tensor,
                inv_degree: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, dx)`` updated, with positions x = x^0 + dx held as the displacement ``dx [N, 3]`` from the
        input positions and ``d0 = x^0_i - x^0_j`` per edge (see ``EGNNModel.forward``)."""
        src, dst = edge_index
        diff = d0 + (dx[dst] - dx[src])  # x_i - x_j for edge j -> i
        radial = (diff * diff).sum(-1, keepdim=True)
        m = self.phi_e(torch.cat([h[dst], h[src], radial, edge_attr], dim=-1))
        if self.update_coords:
            trans = diff * self.phi_x(m)
            dx = dx + trans.new_zeros(dx.shape).index_add(0, dst, trans) * inv_degree
            for phi_v, v in zip(self.phi_v, vectors):
                dx = dx + phi_v(h) * v
        agg = m.new_zeros(h.shape[0], m.shape[1]).index_add(0, dst, m)
        h = h + self.phi_h(torch.cat([h, agg], dim=-1))
        return h, dx


class EGNNModel(nn.Module):
    """The EGNN applied to a batch: ``model(batch) -> prediction`` (module docstring)."""

    def __init__(self, spec: TaskSpec, width: int = 64, depth: int = 4, node_scalars: bool = True) -> None:
        super().__init__()
        self.spec, self.width, self.depth = spec, width, depth
        self.point = spec.point_fields[0]
        # "1o" node inputs, split into their 3-vectors (a "2x1o" field gives two)
        self.vector_fields = [k for k, t in spec.inputs.items() if is_vector_type(t)]
        self.n_vectors = sum(field_dim(spec.inputs[k]) // 3 for k in self.vector_fields)
        self.scalar_fields = [k for k, t in spec.inputs.items() if is_invariant(t)] if node_scalars else []
        n_in = self.n_vectors + sum(field_dim(spec.inputs[k]) for k in self.scalar_fields)
        self.constant_input = n_in == 0
        edge_dim = 1 + sum(field_dim(t) for t in spec.edge_inputs.values())
        self.vector_out = vector_output(spec)
        self.embed = nn.Linear(max(n_in, 1), width)
        self.layers = nn.ModuleList(EGCL(width, edge_dim, self.n_vectors, self.vector_out) for _ in range(depth))
        if not self.vector_out:
            self.node_head, self.graph_head = invariant_heads(width, spec)

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(h^0 input features ``[N, n_in]``, the input vectors ``[N, 3]`` each)."""
        pos = batch[self.point]
        vectors = [v for k in self.vector_fields for v in batch[k].reshape(pos.shape[0], -1, 3).unbind(1)]
        feats = [v.norm(dim=-1, keepdim=True) for v in vectors]
        feats += [batch[k].reshape(pos.shape[0], -1) for k in self.scalar_fields]
        if self.constant_input:
            feats = [torch.ones_like(pos[:, :1])]
        return torch.cat(feats, dim=-1), vectors

    def forward(self, batch: Batch) -> torch.Tensor:
        x0 = batch[self.point]
        feats, vectors = self.inputs(batch)
        src, dst = batch.edge_index
        d0 = x0[dst] - x0[src]
        edge_attr = torch.cat([(d0 * d0).sum(-1, keepdim=True),
                               *(batch[k].reshape(src.numel(), -1) for k in self.spec.edge_inputs)], dim=-1)
        degree = torch.zeros(x0.shape[0], 1, dtype=x0.dtype, device=x0.device).index_add(
            0, dst, torch.ones(dst.numel(), 1, dtype=x0.dtype, device=x0.device))
        inv_degree = 1.0 / degree.clamp_min(1.0)
        # positions are carried as the displacement dx = x - x^0 (edge vectors d0 + dx_i - dx_j): a "1o" output
        # is dx itself, not x^L - x^0, whose float32 cancellation against a translated x^0 (error ~ 6e-8 |x^0|)
        # put a trained normals model at a relative error of 3e-4 when its outputs were small
        h, dx = self.embed(feats), torch.zeros_like(x0)
        for layer in self.layers:
            h, dx = layer(h, dx, d0, vectors, batch.edge_index, edge_attr, inv_degree)
        if self.vector_out:
            return x0 + dx if self.spec.output == POINT else dx
        return invariant_readout(self.node_head, self.graph_head, h, batch)


@register_method("egnn")
class EGNN(ForcesOption, Method):
    """EGNN (Satorras et al. 2021, n-body Table 2: EGNN_vel): E(n)-equivariant coordinate and velocity updates."""

    domains = ("graph3d",)
    exact = True
    group = "O3"
    smoke_options = {"width": 16, "depth": 2}

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None,
                 node_scalars: bool = True, forces: str = "direct") -> None:
        if width < 1 or depth < 1:
            raise ValueError("width and depth must be positive")
        super().__init__(width=width, depth=depth, params=params, node_scalars=node_scalars)
        self.width, self.depth, self.params, self.node_scalars = width, depth, params, node_scalars
        self.set_forces(forces)  # recorded only when set

    def supports(self, spec: TaskSpec) -> str | None:
        reason = super().supports(spec)
        if reason:
            return reason
        return point_cloud_reason("egnn", self.network_spec(spec), outputs="points, node-level '1o' vectors "
                                  "(coordinate displacements) or invariant scalars")

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        reason = self.supports(spec)
        if reason:
            raise ValueError(reason)
        net_spec = self.network_spec(spec)
        net = build_at_params(lambda w: EGNNModel(net_spec, w, self.depth, self.node_scalars), self.params, self.width)
        return self.with_forces(net, spec)
