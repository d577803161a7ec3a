"""``e3nn_nequip``: a NequIP-style e3nn network ('uvu' convolutions, Bessel basis + cutoff), O(3)-exact.

Batzner et al., "E(3)-equivariant graph neural networks for data-efficient and accurate
interatomic potentials" (Nat. Commun. 2022); reference ``mir-group/nequip``, its
``InteractionBlock`` / ``ConvNetLayer`` and ``NequIPGNNModel`` defaults.

Beside the TFN-style ``e3nn`` (fully connected 'uvw' products, Gaussian radial basis, fixed
average degree), this follows NequIP's convolution:

* Node attributes a_i (NequIP: one-hot species): a constant 1 and the task's invariant node
  inputs (n-body: q_i; QM9 / md: the element one-hot), as ``n x 0e``. Initial features
  h_i^0 = Linear(a_i) (``mul x 0e``, NequIP's species embedding) plus the task's non-invariant
  node inputs in their e3nn layout (n-body: the velocity "1o"; further point fields as
  ``p_k - p_0``).
* Edges (r_ij = pos_j - pos_i, PyG edge j -> i): Y(r_ij) spherical harmonics l = 0..lmax
  ("component" normalisation); a Bessel radial basis B_n(r) = (2 / r_max) sin(w_n r / r_max) / r
  with w_n = n pi (trainable with ``bessel_trainable``; NequIP's current default is fixed, the
  paper's trained), multiplied by the polynomial cutoff envelope
  u(r / r_max) (degree ``cutoff_p`` = 6: u(d) = 1 - (p+1)(p+2)/2 d^p + p(p+2) d^{p+1}
  - p(p+1)/2 d^{p+2}, 0 for d >= 1; u(1) = u'(1) = u''(1) = 0). The task's invariant edge inputs
  (n-body: q_i q_j) join the radial-MLP input, also multiplied by u, so every edge's message goes
  to zero smoothly at r_max (the radial MLP has no biases and SiLU(0) = 0).
* Interaction (``depth`` layers), as NequIP's ``InteractionBlock`` + ``ConvNetLayer``::

      w_ij = MLP(u(r_ij) [B(r_ij), s_ij])                    (``radial_layers`` x ``radial_hidden``, SiLU)
      m_i  = Linear_2( sum_j TP_uvu(Linear_1(h)_j, Y(r_ij); w_ij) / sqrt(avg_num_neighbors) )
      h_i <- Gate(m_i + SC(h_i, a_i))          (+ h_i if ``resnet`` and the irreps agree)

  TP_uvu: channel-wise ('uvu') tensor product, one path per (input irrep, Y_l, output irrep)
  allowed by the hidden irreps, per-edge weights; SC: the self-connection, a fully connected
  tensor product of h_i with the attributes a_i (a linear map of the node features, one per
  attribute; NequIP's ``use_sc``), left out of the first layer as NequIP does (its isolated-atom
  limit) unless the task has non-invariant node inputs (n-body: the node's own velocity reaches
  layer 1 only through it). Gate: SiLU on even scalars, tanh on odd scalars, SiLU gates on the
  l >= 1 irreps (NequIP's defaults). Hidden irreps: ``mul`` copies each of 0e, 0o and (l, +-1)
  for 1 <= l <= lmax (NequIP's ``feature_irreps_hidden``), restricted per layer to the irreps a
  path can reach; for invariant outputs the last layer keeps ``mul x 0e`` only (as NequIP).
* Readout: ``o3.Linear`` to the output irreps ("point": a "1o" displacement added to the
  position); graph level: summed over nodes (NequIP's per-atom energies summed).

Data statistics (NequIP takes both from the training set): ``avg_num_neighbors`` and ``r_max``
default to None = estimated from the data: the mean in-degree, and 1.1 x the longest edge, of
the first batch the model sees in training mode (the runner's first training batch), then kept
in the state dict (``GraphStatistics``). Until a training batch has been seen (an untrained
model in eval mode), each batch's own values are used and not stored. Pass numbers to fix them.

Defaults = ``nequip.model.NequIPGNNModel``'s: ``lmax=1``, ``mul=32`` (``num_features``),
``depth=4`` (``num_layers``), ``num_basis=8``, fixed Bessel frequencies, ``cutoff_p=6``, radial
MLP 2 x 64, no resnet, parity on (178 945 parameters on n-body). ``params`` scales ``mul`` and
``radial_hidden`` together (their ratio kept; see ``E3NNNequIP.sizes_for``). Every map is an intertwiner of
O(3) and the statistics are invariant, so f(g.X) = rho_out(g) f(X) to round-off (build under a
float64 default dtype for float64 checks). Differences from NequIP: attributes may be any
invariant node inputs (not only one-hot species); vector node inputs enter as features; the
readout is one ``o3.Linear`` (NequIP: two, to 0e hidden and to the energy); no per-species
scale/shift; forces (md) are predicted directly unless ``forces="conservative"``.

Length units (``radial_scale``). NequIP's Bessel basis has units of 1 / length^2 (at r -> 0 it is
2 w_n / r_max^2): its radial MLP expects lengths in Angstrom with a cutoff near 5. On data in other
units it is another network: on ``normals`` (clouds of unit RMS radius, r_max ~ 0.9) the basis
reaches ~60, the radial MLP's weights follow, and the features grow by orders of magnitude per
layer (1e32 after four layers at initialisation; training diverges at every learning rate). With
``radial_scale = s`` the basis is computed on lengths rescaled so that the cutoff is s (NequIP's
default 5.0): B_n(r; r_max) (r_max / s)^2, the same function of r / r_max that NequIP computes at
its default cutoff. None (default) keeps NequIP's formula in the data's own units, which the
library cross-check (``nequip``) compares against.

Tensor product (``tensor_product``): ``"cg"`` (default, the above: e3nn's Clebsch-Gordan paths) or
``"gaunt"``: Gaunt products (Luo, Chen, Krishnapriyan, ICLR 2024; ``blocks.gaunt``), the interaction product
computed as a product of functions on the sphere. Per layer and per family of the input (natural irreps, parity
(-1)^l: 0e 1o 2e 3o; pseudo: 0o 1e 2o 3e; ``blocks.gaunt.family_sign``)::

      f_{j,u}(s)  = sum_{l1} Linear_1(h)_{j,u}^{l1} . Y^{l1}(s)                      (every l1 <= the family's largest)
      g_{ij,u}(s) = sum_{l2} R_{u,l2}(r_ij) Y^{l2}(r_ij) . Y^{l2}(s)                 (radial MLP: one weight per u, l2)
      m_i^{l3}    = Linear_2( c_{l3} P_{l3}[ sum_j f_{j,u} g_{ij,u} ] / sqrt(avg_num_neighbors) )

(``blocks.gaunt.GauntConvolution``: the neighbour sum on the grid, one projection P per node; c_{l3} normalises
each output degree). This is e3nn's 'uvu' product with the path weights factorised as w_{ij,u,p} =
c_{l3} k_p R_{u,l2}(r_ij) (k_p: the Gaunt constant of path p, ``gaunt_path_constants``; the paper's per-degree
weights w_{l1} and w_{l3} are the channel mixes Linear_1 and Linear_2) and restricted to the paths with
l1 + l2 + l3 even: the Gaunt coefficients of the others vanish. ``gaunt_route``: ``"s2"`` (default, e3nn's S²
grid) or ``"fourier"`` (the paper's 2-D Fourier route; the same numbers to round-off). Gate, self-connection,
readout and statistics are unchanged; per layer, gate irreps are those reachable through even paths.

Which of NequIP's CG paths ``ir_in x Y_l2 -> ir_out`` it keeps, for a hidden layer (input and output: every
irrep up to lmax; ``path_split``): all those with l1 + l2 + l3 even (lmax 1: 8 of 10, lmax 2: 22 of 30, lmax 3:
46 of 68); it drops the antisymmetric ones (l1 + l2 + l3 odd: natural x Y -> pseudo, pseudo x Y -> natural):

      lmax=1: drops 1ex1o->1o, 1ox1o->1e
      lmax=2: drops 1ex1o->1o, 1ex2e->2e, 1ox1o->1e, 1ox2e->2o, 2ex1o->2o, 2ex2e->1e, 2ox1o->2e, 2ox2e->1o
      lmax=3: drops 1ex1o->1o, 1ex2e->2e, 1ex3o->3o, 1ox1o->1e, 1ox2e->2o, 1ox3o->3e, 2ex1o->2o, 2ex2e->1e,
        2ex2e->3e, 2ex3o->2o, 2ox1o->2e, 2ox2e->1o, 2ox2e->3o, 2ox3o->2e, 3ex1o->3o, 3ex2e->2e, 3ex3o->1o,
        3ex3o->3o, 3ox1o->3e, 3ox2e->2o, 3ox3o->1e, 3ox3o->3e

Since only these make a pseudo irrep from natural ones, the Gaunt network never reaches the pseudo family
from natural inputs: on every task here (node inputs 0e and 1o) its hidden irreps are 0e, 1o, 2e, 3o only (the
CG network's 0o, 1e, 2o, 3e are left out) and the paths it runs are the natural ones:

      lmax=1 runs 0ex0e->0e, 0ex1o->1o, 1ox0e->1o, 1ox1o->0e
      lmax=2 runs 0ex0e->0e, 0ex1o->1o, 0ex2e->2e, 1ox0e->1o, 1ox1o->0e, 1ox1o->2e, 1ox2e->1o, 2ex0e->2e,
        2ex1o->1o, 2ex2e->0e, 2ex2e->2e
      lmax=3 runs 0ex0e->0e, 0ex1o->1o, 0ex2e->2e, 0ex3o->3o, 1ox0e->1o, 1ox1o->0e, 1ox1o->2e, 1ox2e->1o,
        1ox2e->3o, 1ox3o->2e, 2ex0e->2e, 2ex1o->1o, 2ex1o->3o, 2ex2e->0e, 2ex2e->2e, 2ex3o->1o, 2ex3o->3o,
        3ox0e->3o, 3ox1o->2e, 3ox2e->1o, 3ox2e->3o, 3ox3o->0e, 3ox3o->2e

(4 of the CG network's 10, 11 of 30, 23 of 68 paths per hidden layer). A task whose output is a pseudo irrep
(e.g. "1e") from natural inputs is not supported with ``gaunt`` (``supports`` says so). At the same ``mul`` a
Gaunt layer has fewer weights (the radial MLP outputs mul x (lmax + 1) instead of mul x paths; Linear_2 maps
mul instead of mul x paths copies of each irrep), so ``params`` gives it a larger ``mul``. It is exactly as
O(3)-equivariant as the CG network (the grid quadrature is exact for the band-limited product; fp64 errors
~1e-15 measured on nbody and md).

Forces (``forces``): ``"direct"`` (default) reads a node-level "1o" target (md forces) off the
network's "1o" head like any vector output. ``"conservative"`` makes it an energy model, as NequIP
is: on a task whose target is a node-level "1o" field and which has a point input, the network is
built for a graph-level "0e" output (``blocks.energy_forces.energy_spec``: the energy E, summed
per-atom energies) and the prediction is F_i = -dE/dx_i by autograd (``ForcesFromEnergy``: graph
kept in training, so a force loss trains through the second derivative). F is then exactly as
equivariant as E is invariant, and conservative. On every other task the option changes nothing
(an energy or other target is predicted directly either way). ``params`` sizes the energy
network. The ``reference`` suite runs ``e3nn_nequip`` with ``forces: conservative``, so its md
pair with ``nequip`` compares the same kind of forces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from e3nn import o3
from e3nn.nn import FullyConnectedNet, Gate
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import global_add_pool, global_mean_pool

from ...core.errors import UserError
from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import POINT, field_dim, irreps, is_invariant
from ..base import Method, bisect_increasing, build_irreps_sized
from ..blocks.energy_forces import FORCE_MODES, ForcesOption
from ..blocks.gaunt import ROUTES, GauntConvolution, GauntFamily, family_sign, from_degrees, gaunt_allows, to_channels


def polynomial_cutoff(d: torch.Tensor, p: int = 6) -> torch.Tensor:
    """NequIP's envelope u(d), d = r / r_max: 1 at 0, zero with two vanishing derivatives at 1."""
    u = (1.0 - (p + 1) * (p + 2) / 2 * d**p + p * (p + 2) * d ** (p + 1) - p * (p + 1) / 2 * d ** (p + 2))
    return u * (d < 1.0).to(d.dtype)


class BesselBasis(nn.Module):
    """``B_n(r) = (2 / r_max) sin(w_n r / r_max) / r`` with w_n = n pi (trainable if asked); finite at 0."""

    weights: torch.Tensor

    def __init__(self, num_basis: int, trainable: bool = False) -> None:
        super().__init__()
        w = math.pi * torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype())
        if trainable:
            self.weights = nn.Parameter(w)
        else:
            self.register_buffer("weights", w)

    def forward(self, r: torch.Tensor, r_max: torch.Tensor | float) -> torch.Tensor:
        a = self.weights / r_max  # sin(a r) / r = a sinc(a r / pi), smooth at r = 0
        return (2.0 / r_max) * a * torch.sinc(a * r.unsqueeze(-1) / math.pi)


class GraphStatistics(nn.Module):
    """Average in-degree and cutoff radius: fixed numbers, or estimated from the first batch
    seen in training mode and kept as buffers (NaN until then; see the module docstring)."""

    avg_num_neighbors: torch.Tensor
    r_max: torch.Tensor

    def __init__(self, avg_num_neighbors: float | None, r_max: float | None, r_max_margin: float = 1.1) -> None:
        super().__init__()
        self.fixed_avg, self.fixed_r = avg_num_neighbors, r_max
        self.margin = r_max_margin
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        self.register_buffer("avg_num_neighbors", nan.clone())
        self.register_buffer("r_max", nan.clone())
        self.ready = False  # values held as Python floats too (no device sync per forward)
        self.values = (float("nan"), float("nan"))
        self.register_load_state_dict_post_hook(GraphStatistics._after_load)

    @staticmethod
    def _after_load(module: nn.Module, incompatible_keys: object) -> None:
        if isinstance(module, GraphStatistics):
            module.values = (float(module.avg_num_neighbors), float(module.r_max))
            module.ready = all(math.isfinite(v) for v in module.values)

    def forward(self, batch: Batch, lengths: torch.Tensor) -> tuple[float, float]:
        """(avg_num_neighbors, r_max) for this batch."""
        if self.ready:
            avg, r = self.values
        else:
            avg = max(lengths.numel() / max(int(batch.num_nodes), 1), 1.0)
            r = self.margin * float(lengths.max()) if lengths.numel() else 1.0
            r = r if r > 0 else 1.0
            if self.training:  # the first training batch: keep its statistics
                self.avg_num_neighbors.fill_(avg)
                self.r_max.fill_(r)
                self.values, self.ready = (avg, r), True
        return (self.fixed_avg if self.fixed_avg is not None else avg,
                self.fixed_r if self.fixed_r is not None else r)


def hidden_irreps(mul: int, lmax: int) -> o3.Irreps:
    """NequIP's ``feature_irreps_hidden``: ``mul`` x (0e, 0o, and (l, +-1) for 1 <= l <= lmax)."""
    return o3.Irreps([(mul, (l, p)) for l in range(lmax + 1) for p in (1, -1)])


#: the ``tensor_product`` option: e3nn's Clebsch-Gordan paths, or Gaunt products (module docstring)
TENSOR_PRODUCTS = ("cg", "gaunt")


def _allowed(ir1: o3.Irrep, ir2: o3.Irrep, ir_out: o3.Irrep, gaunt: bool) -> bool:
    return gaunt_allows(ir1, ir2, ir_out) if gaunt else ir_out in ir1 * ir2


def _reachable(irreps_in: o3.Irreps, irreps_edge: o3.Irreps, ir_out: o3.Irrep, gaunt: bool = False) -> bool:
    return any(_allowed(ir1, ir2, ir_out, gaunt) for _, ir1 in irreps_in for _, ir2 in irreps_edge)


def gaunt_families(irreps_in: o3.Irreps, irreps_edge: o3.Irreps, conv_out: o3.Irreps) -> tuple[GauntFamily, ...]:
    """The families (natural, pseudo; ``blocks.gaunt.family_sign``) of a Gaunt layer's input that reach an
    output irrep: ``mul`` = the largest input multiplicity, every degree up to the family's largest, the
    filter degrees and output degrees that some even path (l1 + l2 + l3) connects."""
    mul = max(m for m, _ in irreps_in)
    edge_ls = sorted({ir.l for _, ir in irreps_edge})
    if any(family_sign(ir) != 1 for _, ir in irreps_edge):
        raise ValueError(f"Gaunt filters are spherical harmonics (natural parities), got {irreps_edge}")
    out = []
    for sign in (1, -1):
        ls = sorted({ir.l for _, ir in irreps_in if family_sign(ir) == sign})
        if not ls:
            continue
        def ok(a: int, b: int, c: int) -> bool:
            return abs(a - b) <= c <= a + b and (a + b + c) % 2 == 0
        l3s = sorted({ir.l for _, ir in conv_out if family_sign(ir) == sign
                      and any(ok(a, b, ir.l) for a in ls for b in edge_ls)})
        l2s = sorted({b for b in edge_ls if any(ok(a, b, c) for a in ls for c in l3s)})
        if l3s:
            out.append(GauntFamily(sign, mul, max(ls), tuple(l2s), tuple(l3s)))
    return tuple(out)


@dataclass(frozen=True)
class LayerPlan:
    """The irreps of one interaction layer (NequIP's ``ConvNetLayer`` rules): gate scalars / gates /
    gated irreps reachable from the input, the convolution's output (= the gate's input), the
    'uvu' tensor product's output irreps (sorted) and instructions, and the layer's output. With Gaunt
    products (``gaunt``): reachable through even paths only, ``instructions`` = the CG paths the Gaunt
    product keeps (for reference; nothing builds them), ``families`` = its ``GauntFamily``s, ``uniform`` =
    their input irreps (``linear_1``'s output), ``mid`` = their output irreps (``linear_2``'s input)."""
    scalars: o3.Irreps
    gates: o3.Irreps
    gated: o3.Irreps
    conv_out: o3.Irreps
    mid: o3.Irreps
    instructions: list[tuple[int, int, int, str, bool]]
    out: o3.Irreps
    families: tuple[GauntFamily, ...] = ()
    uniform: o3.Irreps | None = None


def plan_layer(irreps_in: o3.Irreps, irreps_edge: o3.Irreps, hidden: o3.Irreps, gaunt: bool = False) -> LayerPlan:
    def reach(ir: o3.Irrep) -> bool:
        return _reachable(irreps_in, irreps_edge, ir, gaunt)
    scalars = o3.Irreps([(m, ir) for m, ir in hidden if ir.l == 0 and reach(ir)])
    gated = o3.Irreps([(m, ir) for m, ir in hidden if ir.l > 0 and reach(ir)])
    gate_ir = "0e" if reach(o3.Irrep("0e")) else "0o"
    gates = o3.Irreps([(m, gate_ir) for m, _ in gated])
    conv_out = (scalars.simplify() + gates.simplify() + gated.simplify()).sort().irreps.simplify()
    mid: list[tuple[int, o3.Irrep]] = []
    instructions = []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_edge) in enumerate(irreps_edge):
            for ir_out in ir_in * ir_edge:
                if ir_out in conv_out and _allowed(ir_in, ir_edge, ir_out, gaunt):
                    instructions.append((i, j, len(mid), "uvu", True))
                    mid.append((mul, ir_out))
    irreps_mid, perm, _ = o3.Irreps(mid).sort()
    instructions = [(a, b, perm[k], mode, train) for a, b, k, mode, train in instructions]
    out = scalars.simplify() + gated.simplify()
    if not gaunt:
        return LayerPlan(scalars, gates, gated, conv_out, irreps_mid, instructions, out)
    families = gaunt_families(irreps_in, irreps_edge, conv_out)
    uniform = sum((f.irreps_in for f in families), o3.Irreps(""))
    gaunt_mid = sum((f.irreps_out for f in families), o3.Irreps(""))
    return LayerPlan(scalars, gates, gated, conv_out, gaunt_mid, instructions, out, families, uniform)


def path_split(lmax: int) -> tuple[list[str], list[str]]:
    """(kept, dropped): NequIP's CG paths ``ir_in x Y_l -> ir_out`` of a hidden layer at ``lmax`` (input and
    output: every irrep 0e, 0o, (l, +-1) up to ``lmax``; edges: Y_0..Y_lmax), split by whether a Gaunt
    product has them (l1 + l2 + l3 even), written ``"1ox1o->1e"``."""
    hidden = hidden_irreps(1, lmax)
    kept: list[str] = []
    dropped: list[str] = []
    for _, a in hidden:
        for _, b in o3.Irreps.spherical_harmonics(lmax):
            for c in a * b:
                if c in hidden:
                    (kept if gaunt_allows(a, b, c) else dropped).append(f"{a}x{b}->{c}")
    return kept, dropped


def _linear_numel(a: o3.Irreps, b: o3.Irreps) -> int:
    """Weights of ``o3.Linear(a, b)`` (no biases): every pair of entries with the same irrep."""
    return sum(ma * mb for ma, ira in a for mb, irb in b if ira == irb)


def layer_schedule(spec: TaskSpec, mul: int, lmax: int, depth: int) -> list[tuple[o3.Irreps, bool]]:
    """(hidden irreps, self-connection?) of every layer. As NequIP: the last layer keeps only
    ``mul x 0e`` when the output is invariant (energies), and the first layer has no
    self-connection (NequIP's isolated-atom limit) unless the task has non-invariant node inputs
    (then the node's own vectors reach layer 1 only through it)."""
    hidden = hidden_irreps(mul, lmax)
    last = o3.Irreps(f"{mul}x0e") if is_invariant(spec.output) else hidden
    own_vectors = bool(_layout(spec)[1])
    return [(last if i == depth - 1 else hidden, i > 0 or own_vectors) for i in range(depth)]


def parameter_count(spec: TaskSpec, mul: int, lmax: int, depth: int, num_basis: int, radial_hidden: int,
                    radial_layers: int, bessel_trainable: bool = False, tensor_product: str = "cg") -> int:
    """Trainable parameters of ``NequIPModel`` from the irreps alone (nothing is built): embedding,
    (trainable) Bessel frequencies, per layer linear_1 + radial MLP (no biases) + linear_2 (+ the
    self-connection), and the head. Checked against built models in the tests."""
    attr_fields, feat_fields, edge_fields = _layout(spec)
    n_attr = 1 + sum(field_dim(spec.inputs[k]) for k in attr_fields)
    ir = o3.Irreps(f"{mul}x0e") + _feature_irreps(feat_fields)
    sh = o3.Irreps.spherical_harmonics(lmax)
    n_radial = num_basis + sum(field_dim(spec.edge_inputs[k]) for k in edge_fields)
    total = n_attr * mul + (num_basis if bessel_trainable else 0)
    sizes = [n_radial] + [radial_hidden] * radial_layers
    gaunt = tensor_product == "gaunt"
    for hidden, use_sc in layer_schedule(spec, mul, lmax, depth):
        plan = plan_layer(ir, sh, hidden, gaunt)
        if gaunt:
            assert plan.uniform is not None
            n_weights = sum(f.mul * len(f.l2s) for f in plan.families)
            total += _linear_numel(ir, plan.uniform) + _linear_numel(plan.mid, plan.conv_out)
        else:
            n_weights = sum(ir[i].mul for i, _, _, _, _ in plan.instructions)
            total += _linear_numel(ir, ir) + _linear_numel(plan.mid.simplify(), plan.conv_out)
        total += sum(a * b for a, b in zip(sizes, sizes[1:] + [n_weights]))
        if use_sc:
            total += sum(m * n_attr * mo for m, ir_in in ir for mo, ir_out in plan.conv_out if ir_out == ir_in)
        ir = plan.out
    return total + _linear_numel(ir, output_irreps(spec))


def final_irreps(spec: TaskSpec, mul: int, lmax: int, depth: int, tensor_product: str = "cg") -> o3.Irreps:
    """The irreps of the last layer's output (the head's input)."""
    feat_fields = _layout(spec)[1]
    ir = o3.Irreps(f"{mul}x0e") + _feature_irreps(feat_fields)
    for hidden, _ in layer_schedule(spec, mul, lmax, depth):
        ir = plan_layer(ir, o3.Irreps.spherical_harmonics(lmax), hidden, tensor_product == "gaunt").out
    return ir


class Interaction(nn.Module):
    """NequIP's ``InteractionBlock`` followed by its gate (``ConvNetLayer``), see module docstring; with
    ``tensor_product="gaunt"`` the convolution is ``blocks.gaunt.GauntConvolution`` per family."""

    def __init__(self, irreps_in: o3.Irreps, irreps_edge: o3.Irreps, irreps_attr: o3.Irreps,
                 hidden: o3.Irreps, n_radial: int, radial_hidden: int, radial_layers: int,
                 resnet: bool, use_sc: bool = True, tensor_product: str = "cg", gaunt_route: str = "s2") -> None:
        super().__init__()
        self.gaunt = tensor_product == "gaunt"
        plan = plan_layer(irreps_in, irreps_edge, hidden, self.gaunt)
        self.plan = plan
        scalars, gates, gated = plan.scalars, plan.gates, plan.gated
        silu, tanh = torch.nn.functional.silu, torch.tanh
        self.gate = Gate(scalars, [silu if ir.p == 1 else tanh for _, ir in scalars],
                         gates, [silu if ir.p == 1 else tanh for _, ir in gates], gated)
        irreps_out, irreps_mid, instructions = plan.conv_out, plan.mid, plan.instructions
        if self.gaunt:
            assert plan.uniform is not None
            self.linear_1 = o3.Linear(irreps_in, plan.uniform)
            self.convs = nn.ModuleList(GauntConvolution(f, gaunt_route) for f in plan.families)
            n_weights = sum(f.mul * len(f.l2s) for f in plan.families)
            self.linear_2 = o3.Linear(irreps_mid, irreps_out)
        else:
            self.linear_1 = o3.Linear(irreps_in, irreps_in)
            self.tp = o3.TensorProduct(irreps_in, irreps_edge, irreps_mid, instructions,
                                       shared_weights=False, internal_weights=False)
            n_weights = self.tp.weight_numel
            self.linear_2 = o3.Linear(irreps_mid.simplify(), irreps_out)
        self.radial = FullyConnectedNet([n_radial] + [radial_hidden] * radial_layers + [n_weights],
                                        torch.nn.functional.silu)
        self.sc = o3.FullyConnectedTensorProduct(irreps_in, irreps_attr, irreps_out) if use_sc else None
        self.irreps_in, self.irreps_out = irreps_in, self.gate.irreps_out
        self.resnet = resnet and self.irreps_in == self.irreps_out

    def convolve(self, x: torch.Tensor, edge_index: torch.Tensor, sh: torch.Tensor, weights: torch.Tensor
                 ) -> torch.Tensor:
        """sum_j TP(x_j, Y(r_ij); w_ij) over each node's incoming edges (CG or Gaunt), ``[N, mid.dim]``."""
        src, dst = edge_index
        if not self.gaunt:
            msg = self.tp(x[src], sh, weights)
            return msg.new_zeros(x.shape[0], msg.shape[1]).index_add(0, dst, msg)
        outs, i, j = [], 0, 0
        for conv in self.convs:
            assert isinstance(conv, GauntConvolution)
            fam = conv.family
            n, k = fam.mul * (fam.l1max + 1) ** 2, fam.mul * len(fam.l2s)
            xc = to_channels(x[:, i:i + n], fam.mul, fam.l1max)
            w = weights[:, j:j + k].reshape(-1, fam.mul, len(fam.l2s))
            outs.append(from_degrees(conv(xc, sh, w, edge_index, x.shape[0]), fam.l3s))
            i, j = i + n, j + k
        return torch.cat(outs, dim=-1)

    def forward(self, h: torch.Tensor, attrs: torch.Tensor, edge_index: torch.Tensor, sh: torch.Tensor,
                radial_in: torch.Tensor, avg_num_neighbors: float) -> torch.Tensor:
        agg = self.convolve(self.linear_1(h), edge_index, sh, self.radial(radial_in)) / math.sqrt(avg_num_neighbors)
        m = self.linear_2(agg)
        out = self.gate(m if self.sc is None else m + self.sc(h, attrs))
        return h + out if self.resnet else out


def _layout(spec: TaskSpec) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """(invariant node inputs = attributes, non-invariant node inputs with their irreps type
    (extra points as "1o"), invariant edge inputs)."""
    first = spec.point_fields[0]
    attrs = [k for k, t in spec.inputs.items() if is_invariant(t)]
    feats = [(k, "1o" if t == POINT else t) for k, t in spec.inputs.items() if k != first and not is_invariant(t)]
    edge = [k for k, t in spec.edge_inputs.items() if is_invariant(t)]
    return attrs, feats, edge


def _feature_irreps(feat_fields: list[tuple[str, str]]) -> o3.Irreps:
    return o3.Irreps("+".join(str(irreps(t)) for _, t in feat_fields)) if feat_fields else o3.Irreps("")


def output_irreps(spec: TaskSpec) -> o3.Irreps:
    return o3.Irreps("1o" if spec.output == POINT else spec.output)


class NequIPModel(nn.Module):
    """The whole network applied to a batch: ``model(batch) -> prediction``."""

    def __init__(self, spec: TaskSpec, mul: int, lmax: int = 1, depth: int = 4, num_basis: int = 8,
                 radial_hidden: int = 64, radial_layers: int = 2, cutoff_p: int = 6, resnet: bool = False,
                 avg_num_neighbors: float | None = None, r_max: float | None = None,
                 bessel_trainable: bool = False, radial_scale: float | None = None, tensor_product: str = "cg",
                 gaunt_route: str = "s2") -> None:
        super().__init__()
        self.spec, self.mul, self.cutoff_p = spec, mul, cutoff_p
        self.radial_scale = radial_scale
        self.point = spec.point_fields[0]
        self.attr_fields, self.feat_fields, self.edge_fields = _layout(spec)
        n_attr = 1 + sum(field_dim(spec.inputs[k]) for k in self.attr_fields)
        self.irreps_attr = o3.Irreps(f"{n_attr}x0e")
        feat_irreps = _feature_irreps(self.feat_fields)
        self.embed = o3.Linear(self.irreps_attr, o3.Irreps(f"{mul}x0e"))
        self.irreps_in = o3.Irreps(f"{mul}x0e") + feat_irreps
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        self.sh = o3.SphericalHarmonics(self.irreps_sh, normalize=True, normalization="component")
        self.basis = BesselBasis(num_basis, bessel_trainable)
        self.stats = GraphStatistics(avg_num_neighbors, r_max)
        n_radial = num_basis + sum(field_dim(spec.edge_inputs[k]) for k in self.edge_fields)
        layers, ir = [], self.irreps_in
        for hidden, use_sc in layer_schedule(spec, mul, lmax, depth):
            layers.append(Interaction(ir, self.irreps_sh, self.irreps_attr, hidden, n_radial, radial_hidden,
                                      radial_layers, resnet, use_sc, tensor_product, gaunt_route))
            ir = layers[-1].irreps_out
        self.layers = nn.ModuleList(layers)
        self.head = o3.Linear(ir, output_irreps(spec))

    def node_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(attributes ``[N, n_attr]``, initial features ``[N, irreps_in.dim]``)."""
        pos = batch[self.point]
        n = pos.shape[0]
        attrs = torch.cat([torch.ones_like(pos[:, :1]), *(batch[k].reshape(n, -1) for k in self.attr_fields)], -1)
        feats = [batch[k] - pos if self.spec.inputs[k] == POINT else batch[k] for k, _ in self.feat_fields]
        h = torch.cat([self.embed(attrs), *(f.reshape(n, -1) for f in feats)], dim=-1)
        return attrs, h

    def edge_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(Y(r_ij), radial-MLP input u(r/r_max) [B(r), s_ij], avg_num_neighbors)."""
        src, dst = batch.edge_index
        pos = batch[self.point]
        vec = pos[src] - pos[dst]
        r = vec.norm(dim=-1)
        avg, r_max = self.stats(batch, r.detach())
        env = polynomial_cutoff(r / r_max, self.cutoff_p).unsqueeze(-1)
        basis = self.basis(r, r_max)
        if self.radial_scale is not None:  # lengths in units where the cutoff is radial_scale (module docstring)
            basis = basis * (r_max / self.radial_scale) ** 2
        radial = torch.cat([basis, *(batch[k].reshape(r.numel(), -1) for k in self.edge_fields)], -1)
        return self.sh(vec), radial * env, avg

    def forward(self, batch: Batch) -> torch.Tensor:
        attrs, h = self.node_inputs(batch)
        sh, radial, avg = self.edge_inputs(batch)
        for layer in self.layers:
            h = layer(h, attrs, batch.edge_index, sh, radial, avg)
        out = self.head(h)
        pos = batch[self.point]
        if self.spec.level == "graph":
            size = int(batch.num_graphs)
            out = global_add_pool(out, batch.batch, size=size)
            return out + global_mean_pool(pos, batch.batch, size=size) if self.spec.output == POINT else out
        return out + pos if self.spec.output == POINT else out


@register_method("e3nn_nequip")
class E3NNNequIP(ForcesOption, Method):
    """NequIP-style e3nn network (Batzner et al. 2022): 'uvu' convolutions, Bessel basis + cutoff, self-connection."""

    domains = ("graph3d",)
    exact = True
    group = "O3"
    smoke_options = {"mul": 4, "depth": 2, "radial_hidden": 16}

    def __init__(self, *, lmax: int = 1, mul: int = 32, depth: int = 4, params: int | None = None,
                 num_basis: int = 8, radial_hidden: int = 64, radial_layers: int = 2, cutoff_p: int = 6,
                 resnet: bool = False, bessel_trainable: bool = False, avg_num_neighbors: float | None = None,
                 r_max: float | None = None, forces: str = "direct", radial_scale: float | None = None,
                 tensor_product: str = "cg", gaunt_route: str = "s2") -> None:
        if forces not in FORCE_MODES:  # (checked first, as before the other options)
            raise UserError(f"e3nn_nequip: forces must be one of {FORCE_MODES}, got {forces!r}")
        if tensor_product not in TENSOR_PRODUCTS:
            raise UserError(f"e3nn_nequip: tensor_product must be one of {TENSOR_PRODUCTS}, got {tensor_product!r}")
        if gaunt_route not in ROUTES:
            raise UserError(f"e3nn_nequip: gaunt_route must be one of {ROUTES}, got {gaunt_route!r}")
        if gaunt_route != "s2" and tensor_product != "gaunt":
            raise UserError("e3nn_nequip: gaunt_route applies to tensor_product: gaunt only")
        if lmax < 0:
            raise ValueError(f"lmax must be >= 0, got {lmax}")
        for name, v in (("mul", mul), ("depth", depth), ("radial_hidden", radial_hidden),
                        ("radial_layers", radial_layers), ("cutoff_p", cutoff_p), ("num_basis", num_basis)):
            if v < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        for name, x in (("avg_num_neighbors", avg_num_neighbors), ("r_max", r_max), ("radial_scale", radial_scale)):
            if x is not None and x <= 0:
                raise ValueError(f"{name} must be positive, got {x}")
        if params is not None and params < 1:
            raise ValueError(f"params must be positive, got {params}")
        super().__init__(lmax=lmax, mul=mul, depth=depth, params=params, num_basis=num_basis,
                         radial_hidden=radial_hidden, radial_layers=radial_layers, cutoff_p=cutoff_p,
                         resnet=resnet, bessel_trainable=bessel_trainable, avg_num_neighbors=avg_num_neighbors,
                         r_max=r_max)
        self.lmax, self.mul, self.depth, self.params = lmax, mul, depth, params
        self.num_basis, self.radial_hidden, self.radial_layers = num_basis, radial_hidden, radial_layers
        self.cutoff_p, self.resnet, self.bessel_trainable = cutoff_p, resnet, bessel_trainable
        self.avg_num_neighbors, self.r_max = avg_num_neighbors, r_max
        self.set_forces(forces)  # recorded only when set: existing rows stay as they were
        self.radial_scale = radial_scale
        if radial_scale is not None:  # the same: recorded only when set
            self.options.update(radial_scale=radial_scale)
        self.tensor_product, self.gaunt_route = tensor_product, gaunt_route
        if tensor_product != "cg":  # the same: recorded only when not the default
            self.options.update(tensor_product=tensor_product)
        if gaunt_route != "s2":
            self.options.update(gaunt_route=gaunt_route)

    def supports(self, spec: TaskSpec) -> str | None:
        reason = super().supports(spec)
        if reason:
            return reason
        spec = self.network_spec(spec)
        if not spec.point_fields:
            return "e3nn_nequip needs a 'point' input (edge geometry comes from positions)"
        if any(not is_invariant(t) for t in spec.edge_inputs.values()):
            return "e3nn_nequip takes invariant edge inputs only (they enter the radial MLP)"
        out_l = 1 if spec.output == POINT else irreps(spec.output).lmax
        if out_l > self.lmax:
            return f"output {spec.output!r} has l = {out_l} > lmax = {self.lmax}"
        if self.tensor_product == "gaunt":
            reached = final_irreps(spec, 1, self.lmax, self.depth, "gaunt")
            missing = [str(ir) for _, ir in output_irreps(spec) if ir not in reached]
            if missing:
                return (f"tensor_product 'gaunt' has no path with l1 + l2 + l3 odd, so output irreps {missing} "
                        f"cannot be reached from this task's inputs (reached: {reached.simplify()})")
        return None

    def count(self, spec: TaskSpec, mul: int, radial_hidden: int) -> int:
        spec = self.network_spec(spec)
        return parameter_count(spec, mul, self.lmax, self.depth, self.num_basis, radial_hidden,
                               self.radial_layers, self.bessel_trainable, self.tensor_product)

    def sizes_for(self, spec: TaskSpec, target: int, tolerance: float = 0.10) -> tuple[int, int]:
        """(mul, radial_hidden) for ``target`` parameters, from ``parameter_count`` (nothing is
        built). Both scale together, keeping the configured ratio radial_hidden / mul (default
        64 / 32, NequIP's): otherwise the bias-free radial MLPs (radial_hidden^2 per layer) would
        take a small budget and leave ``mul`` ~1. If the closest scale misses by more than
        ``tolerance`` (small models step coarsely), the largest ``mul`` below the target with the
        ``radial_hidden`` whose count is closest."""
        def radial(m: int) -> int:
            return max(1, round(m * self.radial_hidden / self.mul))

        lo, hi = bisect_increasing(lambda m: self.count(spec, m, radial(m)), target)
        best = min((lo, hi), key=lambda m: abs(self.count(spec, m, radial(m)) - target))
        if abs(self.count(spec, best, radial(best)) - target) <= tolerance * target:
            return best, radial(best)
        mul = lo
        a, b = bisect_increasing(lambda h: self.count(spec, mul, h), target)
        return mul, min((a, b), key=lambda h: abs(self.count(spec, mul, h) - target))

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        net_spec = self.network_spec(spec)
        model = build_irreps_sized(self, spec, seed, lambda mul, rh: NequIPModel(
            net_spec, mul, self.lmax, self.depth, self.num_basis, rh, self.radial_layers, self.cutoff_p, self.resnet,
            self.avg_num_neighbors, self.r_max, self.bessel_trainable, self.radial_scale, self.tensor_product,
            self.gaunt_route))
        return self.with_forces(model, spec)
