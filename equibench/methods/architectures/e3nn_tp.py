"""``e3nn``: a Tensor Field Network (TFN)-style network of irreps features (intrinsically O(3)-exact).

Reference setting: Thomas et al., "Tensor field networks" (2018), as the EGNN paper runs TFN on
n-body (Satorras et al., ICML 2021, Table 2, TFN row: test MSE 0.0155; there 4 layers, degrees
up to l = 1, nf 64 split over the degrees). TFN-style here means: fully connected ('uvw')
Clebsch-Gordan products of every feature channel with every other, weights from an MLP on a
Gaussian radial basis, no cutoff envelope by default, messages divided by a fixed
sqrt(``avg_degree``) (4 = the 5-body complete graph). Our defaults (lmax 2, ``mul`` 16, 3 layers)
are wider in l and shallower than that TFN row. Because 'uvw' products cost mul^2 weights per path, at
matched parameters this network is narrower than a NequIP-style one: that is the registered
``e3nn_nequip`` (``architectures/nequip_style.py``: channel-wise 'uvu' products, Bessel basis
with a polynomial cutoff, data-derived average neighbour count, self-connection).

Group: E(3) = O(3) (rotations *and* reflections) plus translations. Every node feature h_i is
a direct sum of O(3) irreps (e3nn layout) and transforms as h_i -> D_h(R) h_i; positions enter
only through r_ij = pos_j - pos_i (PyG edge j -> i), so translations cancel.

* Node input: the task's non-point node fields concatenated in ``spec.inputs`` order (their
  e3nn layout, e.g. nbody ``vel`` "1o" + ``charge`` "0e" -> "1o+0e"); any further point field
  enters as ``p_k - p_0`` ("1o"); with no such field a constant ``1x0e``.
* Edge: Y(r_ij / |r_ij|) = spherical harmonics l = 0..lmax ("component" normalisation,
  D_Y(R) Y(x) = Y(R x), parity (-1)^l); invariants e_ij = [B(|r_ij|), s_ij] with B a Gaussian
  radial basis on [0, r_max] (``num_basis`` functions, optional smooth cutoff) and s_ij the
  task's invariant edge fields (nbody: q_i q_j). Non-invariant edge fields join Y as a second
  tensor-product operand.
* Layer (``depth`` of them), with w_ij = MLP(e_ij) per-edge weights::

      m_i  = (1 / sqrt(avg_degree)) sum_{j in N(i)} TP_{w_ij}(h_j, Y(r_ij))   (Clebsch-Gordan)
      u_i  = Gate((m_i + Linear(h_i)) / sqrt 2)
      h_i <- (h_i + u_i) / sqrt 2  when the irreps agree (residual), else u_i

  (the 1/sqrt 2 factors keep feature variance ~constant with depth at initialisation).

  TP is ``o3.FullyConnectedTensorProduct`` (every allowed path l1 x l2 -> l3 with parity
  p1 p2 = p3); it is equivariant because the CG coefficients intertwine D(R) and the weights
  are invariant. Gate: even scalars SiLU, odd scalars tanh (an odd function keeps parity),
  l >= 1 irreps multiplied by sigmoid(gate scalars).
* Hidden irreps: ``mul`` x 0e + ``mul`` x 0o + ``max(mul // 2, 1)`` x (l, both parities) for
  1 <= l <= lmax.
* Readout: ``o3.Linear`` to ``Irreps(spec.output)``; "point" outputs predict a "1o"
  displacement added to the first point input; graph-level outputs are summed over the nodes
  of each graph (graph-level points: summed displacement + centroid).

Every map is an intertwiner of O(3), so f(g.X) = rho_out(g) f(X) holds to round-off (build
under ``default_dtype(torch.float64)`` for a float64 check: e3nn makes its CG constants in the
default dtype).

Backends (option ``backend``): ``"e3nn"`` (default) computes the tensor products with
``o3.FullyConnectedTensorProduct``; ``"cuequivariance"`` swaps every one of them for
cuequivariance-torch's ``FullyConnectedTensorProduct`` (NVIDIA cuEquivariance; ``mul_ir``
layout, per-edge weights), which on a CUDA device runs its fused kernels. Everything else
(radial MLPs, linears, gates) is e3nn's, and the two products take the same flat weight vector in
the same order with the same path normalisation, so one state dict serves both backends and the
outputs agree to round-off (held to 1e-10 in float64 through cuequivariance-torch's pure-PyTorch
``method="naive"`` on the CPU in ``tests/test_e3nn_backends.py``; on CUDA the row's
``backend_agreement`` metric measures it in the run's dtype). The method declines the backend
without a CUDA device: its point is the kernels, and the CPU fallback says nothing about them.
"""
from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import math
from typing import Literal

import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace
from e3nn.nn import FullyConnectedNet, Gate
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import global_add_pool, global_mean_pool

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...metrics.catalogue import method_metric, test_metric
from ...symmetry.fieldtypes import POINT, irreps, is_invariant
from ...symmetry.precision import default_dtype
from ..base import Method, build_irreps_sized


def hidden_irreps(mul: int, lmax: int) -> tuple[o3.Irreps, o3.Irreps, o3.Irreps]:
    """(scalars, gates, gated) of one hidden layer: mul x 0e + mul x 0o, and
    max(mul // 2, 1) x (l, +-1) for 1 <= l <= lmax, each gated by one 0e scalar."""
    scalars = o3.Irreps(f"{mul}x0e+{mul}x0o")
    mv = max(mul // 2, 1)
    gated = o3.Irreps([(mv, (l, p)) for l in range(1, lmax + 1) for p in (-1, 1)])
    gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
    return scalars, gates, gated


def gate_irreps(mul: int, lmax: int) -> tuple[o3.Irreps, o3.Irreps]:
    """(input, output) irreps of the hidden ``Gate`` (its input is sorted and simplified)."""
    scalars, gates, gated = hidden_irreps(mul, lmax)
    return (scalars + gates + gated).sort().irreps.simplify(), scalars.simplify() + gated.simplify()


def _tp_numel(in1: o3.Irreps, in2: o3.Irreps, out: o3.Irreps) -> int:
    """Weights of a fully connected tensor product: mul1 * mul2 * mul_out per allowed path."""
    return sum(m1 * m2 * mo for m1, ir1 in in1 for m2, ir2 in in2 for mo, iro in out if iro in ir1 * ir2)


def _linear_numel(a: o3.Irreps, b: o3.Irreps) -> int:
    return sum(ma * mb for ma, ira in a for mb, irb in b if ira == irb)


def input_layout(spec: TaskSpec) -> tuple[list[tuple[str, str]], o3.Irreps]:
    """Node input fields (name, type) in spec order without the first point field, and the
    irreps of their concatenation (not simplified: that is the concatenated layout). Extra
    point fields are typed "1o" (they enter relative to the first point)."""
    first = spec.point_fields[0]
    fields = [(k, "1o" if t == POINT else t) for k, t in spec.inputs.items() if k != first]
    if not fields:
        return [], o3.Irreps("1x0e")
    return fields, o3.Irreps("+".join(str(irreps(t)) for _, t in fields))


_SQRT_HALF = 1.0 / math.sqrt(2.0)  # sums of two unit-variance terms are rescaled to unit variance


Backend = Literal["e3nn", "cuequivariance"]
#: rows of the cuequivariance backend: its deviation from the same network computed by e3nn
BACKEND_AGREEMENT = test_metric("backend_agreement")


def cuequivariance_missing() -> str | None:
    """None when cuequivariance-torch is importable, else why not."""
    if importlib.util.find_spec("cuequivariance_torch") is None or importlib.util.find_spec("cuequivariance") is None:
        return "cuequivariance-torch is not installed (pip install -e .[reference]; kernels: .[cuda])"
    return None


def product(in1: o3.Irreps, in2: o3.Irreps, out: o3.Irreps, backend: Backend) -> nn.Module:
    """A fully connected tensor product ``(x1, x2, w) -> out`` with per-sample weights ``w`` in
    e3nn's order, computed by ``backend``. cuequivariance's module picks its CUDA kernels on a
    CUDA device and its pure-PyTorch ``naive`` method elsewhere (``method=None``: its default
    dispatch, which needs the kernel package on CUDA)."""
    if backend == "e3nn" or _tp_numel(in1, in2, out) == 0:  # no allowed path: e3nn's zeros, nothing to compute
        return o3.FullyConnectedTensorProduct(in1, in2, out, shared_weights=False, internal_weights=False)
    import cuequivariance as cue  # optional dependency (extras "reference" / "cuda")
    import cuequivariance_torch as cuet
    method = None if torch.cuda.is_available() else "naive"
    return cuet.FullyConnectedTensorProduct(cue.Irreps("O3", str(in1)), cue.Irreps("O3", str(in2)),
                                            cue.Irreps("O3", str(out)), layout=cue.mul_ir, shared_weights=False,
                                            internal_weights=False, method=method)


class SplitTensorProduct(nn.Module):
    """``o3.FullyConnectedTensorProduct(irreps_in1, irreps_in2, irreps_out)`` with per-sample
    weights, held as one such product per output irrep and concatenated.

    The map is the same (a fully connected product to a direct sum is the direct sum of the
    products to each summand; e3nn's path normalisation is per output irrep), only the flat
    weight vector is ordered by output. Splitting matters for speed: e3nn slices the per-edge
    weight tensor once per path, and autograd materialises a full-size gradient for every
    slice; per-output blocks make that cost ~len(irreps_out) times smaller.
    """

    def __init__(self, irreps_in1: o3.Irreps, irreps_in2: o3.Irreps, irreps_out: o3.Irreps,
                 backend: Backend = "e3nn") -> None:
        super().__init__()
        self.irreps_in1, self.irreps_in2 = o3.Irreps(irreps_in1), o3.Irreps(irreps_in2)
        self.irreps_out = o3.Irreps(irreps_out)
        self.tps = nn.ModuleList([product(self.irreps_in1, self.irreps_in2, o3.Irreps([mul_ir]), backend)
                                  for mul_ir in self.irreps_out])
        self.sizes: list[int] = [_tp_numel(self.irreps_in1, self.irreps_in2, o3.Irreps([mul_ir]))
                                 for mul_ir in self.irreps_out]
        self.weight_numel = sum(self.sizes)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ws = torch.split(weight, self.sizes, dim=-1)
        return torch.cat([tp(x1, x2, w) for tp, w in zip(self.tps, ws)], dim=-1)


class Interaction(nn.Module):
    """One convolution + self-interaction + gate (see module docstring)."""

    def __init__(self, irreps_in: o3.Irreps, edge_irreps: o3.Irreps, n_invariant: int,
                 mul: int, lmax: int, radial_hidden: int, avg_degree: float, backend: Backend = "e3nn") -> None:
        super().__init__()
        scalars, gates, gated = hidden_irreps(mul, lmax)
        acts = [torch.nn.functional.silu if ir.p == 1 else torch.tanh for _, ir in scalars]
        self.gate = Gate(scalars, acts, gates, [torch.sigmoid] * len(gates), gated)
        self.tp = SplitTensorProduct(irreps_in, edge_irreps, self.gate.irreps_in, backend)
        self.radial = FullyConnectedNet([n_invariant, radial_hidden, self.tp.weight_numel],
                                        torch.nn.functional.silu)
        self.self_int = o3.Linear(irreps_in, self.gate.irreps_in)
        self.irreps_in, self.irreps_out = irreps_in, self.gate.irreps_out
        self.residual = irreps_in == self.irreps_out
        self.norm = 1.0 / math.sqrt(avg_degree)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor,
                edge_inv: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index
        msg = self.tp(h[src], edge_attr, self.radial(edge_inv))
        agg = msg.new_zeros(h.shape[0], msg.shape[1]).index_add(0, dst, msg) * self.norm
        out = self.gate((agg + self.self_int(h)) * _SQRT_HALF)
        return (h + out) * _SQRT_HALF if self.residual else out


def edge_layout(spec: TaskSpec, lmax: int,
                num_basis: int) -> tuple[list[str], list[str], o3.Irreps, int]:
    """(invariant edge fields, equivariant edge fields, irreps of the tensor product's second
    operand = Y^0..lmax + equivariant edge fields, width of the radial MLP input)."""
    inv = [k for k, t in spec.edge_inputs.items() if is_invariant(t)]
    eq = [k for k, t in spec.edge_inputs.items() if not is_invariant(t)]
    eq_irreps = o3.Irreps("+".join(str(irreps(spec.edge_inputs[k])) for k in eq))
    edge = o3.Irreps.spherical_harmonics(lmax) + eq_irreps
    return inv, eq, edge, num_basis + sum(irreps(spec.edge_inputs[k]).dim for k in inv)


def output_irreps(spec: TaskSpec) -> o3.Irreps:
    return o3.Irreps("1o" if spec.output == POINT else spec.output)


def parameter_count(spec: TaskSpec, mul: int, lmax: int, depth: int, num_basis: int,
                    radial_hidden: int) -> int:
    """Trainable parameters of ``E3NNModel`` computed from the irreps alone (no build):
    per layer the radial MLP (n_inv * hidden + hidden * tp_weights, no biases), the
    self-interaction ``Linear``, and the output ``Linear``."""
    _, _, edge, n_inv = edge_layout(spec, lmax, num_basis)
    gate_in, gate_out = gate_irreps(mul, lmax)
    total, ir = 0, input_layout(spec)[1]
    for _ in range(depth):
        total += radial_hidden * (n_inv + _tp_numel(ir, edge, gate_in)) + _linear_numel(ir, gate_in)
        ir = gate_out
    return total + _linear_numel(ir, output_irreps(spec))


class E3NNModel(nn.Module):
    """The whole network applied to a batch: ``model(batch) -> prediction``."""

    def __init__(self, spec: TaskSpec, mul: int, lmax: int, depth: int, r_max: float,
                 num_basis: int, radial_hidden: int, avg_degree: float, cutoff: bool,
                 backend: Backend = "e3nn") -> None:
        super().__init__()
        self.spec, self.r_max, self.num_basis, self.cutoff = spec, r_max, num_basis, cutoff
        self.mul, self.radial_hidden = mul, radial_hidden
        self.point = spec.point_fields[0]
        self.fields, self.irreps_in = input_layout(spec)
        self.edge_inv, self.edge_eq, self.irreps_edge, n_inv = edge_layout(spec, lmax, num_basis)
        self.sh = o3.SphericalHarmonics(o3.Irreps.spherical_harmonics(lmax), normalize=True,
                                        normalization="component")
        layers, ir = [], self.irreps_in
        for _ in range(depth):
            layers.append(Interaction(ir, self.irreps_edge, n_inv, mul, lmax, radial_hidden, avg_degree, backend))
            ir = layers[-1].irreps_out
        self.layers = nn.ModuleList(layers)
        self.irreps_out = output_irreps(spec)
        self.head = o3.Linear(ir, self.irreps_out)

    def node_input(self, batch: Batch) -> torch.Tensor:
        pos = batch[self.point]
        if not self.fields:
            return torch.ones(pos.shape[0], 1, dtype=pos.dtype, device=pos.device)
        parts = [batch[k] - pos if self.spec.inputs[k] == POINT else batch[k] for k, _ in self.fields]
        return torch.cat([p.reshape(pos.shape[0], -1) for p in parts], dim=-1)

    def edge_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(Y(r_ij) [+ equivariant edge fields], radial basis of |r_ij| + invariant edge fields)."""
        src, dst = batch.edge_index
        pos = batch[self.point]
        vec = pos[src] - pos[dst]
        n_edges = vec.shape[0]
        attr = torch.cat([self.sh(vec), *(batch[k].reshape(n_edges, -1) for k in self.edge_eq)], -1)
        basis = soft_one_hot_linspace(vec.norm(dim=-1), 0.0, self.r_max, self.num_basis,
                                      basis="gaussian", cutoff=self.cutoff) * math.sqrt(self.num_basis)
        inv = torch.cat([basis, *(batch[k].reshape(n_edges, -1) for k in self.edge_inv)], -1)
        return attr, inv

    def forward(self, batch: Batch) -> torch.Tensor:
        attr, inv = self.edge_features(batch)
        h = self.node_input(batch)
        for layer in self.layers:
            h = layer(h, batch.edge_index, attr, inv)
        out = self.head(h)
        pos = batch[self.point]
        if self.spec.level == "graph":
            size = int(batch.num_graphs)
            out = global_add_pool(out, batch.batch, size=size)
            if self.spec.output == POINT:
                out = out + global_mean_pool(pos, batch.batch, size=size)
            return out
        return out + pos if self.spec.output == POINT else out


def with_backend(model: nn.Module, backend: Backend) -> nn.Module:
    """A copy of ``model`` (an ``E3NNModel`` or any module holding one, e.g. a forces-from-energy
    wrapper) whose tensor products are computed by ``backend``: same weights, device and dtype."""
    twin = copy.deepcopy(model)
    ref = next(model.parameters())
    for m in twin.modules():
        if isinstance(m, SplitTensorProduct):
            with default_dtype(ref.dtype):  # e3nn builds its Clebsch-Gordan constants in the default dtype
                m.tps = nn.ModuleList([product(m.irreps_in1, m.irreps_in2, o3.Irreps([mul_ir]), backend)
                                       for mul_ir in m.irreps_out]).to(device=ref.device, dtype=ref.dtype)
    return twin


def backend_agreement(model: nn.Module, batch: Batch, pred: torch.Tensor) -> float:
    """max |f(X) - f_e3nn(X)| / max |f_e3nn(X)| on one batch, f_e3nn = ``model`` with e3nn's
    tensor products (same weights, same dtype)."""
    ref = with_backend(model, "e3nn").eval()(batch).detach()
    return float((pred.detach() - ref).abs().max() / ref.abs().max().clamp_min(torch.finfo(ref.dtype).tiny))


@register_method("e3nn")
class E3NN(Method):
    """Irreps tensor-product network, TFN style ('uvw' products; EGNN paper Table 2 TFN row), exact for O(3).

    Options: ``lmax`` (spherical harmonics and hidden irreps up to l = lmax), ``mul`` (hidden
    multiplicity of 0e and 0o; l >= 1 irreps get ``max(mul // 2, 1)`` per parity), ``depth``
    (interaction layers), ``params`` (target parameter count, see ``sizes_for``), ``r_max`` and
    ``num_basis`` (Gaussian radial basis), ``radial_hidden`` (hidden width of the radial MLP),
    ``avg_degree`` (messages are divided by its square root; 4 = the 5-body complete graph),
    ``cutoff`` (the radial basis vanishes smoothly at ``r_max``).
    """

    domains = ("graph3d",)
    exact = True
    group = "O3"
    smoke_options = {"mul": 4, "depth": 2}
    METRICS = (method_metric("backend_agreement", description=(
        "max |f − f_e3nn| / max |f_e3nn| per test batch (mean over batches): the e3nn method with cuEquivariance "
        "tensor products against the same weights through e3nn's, in the run's dtype")),)

    def __init__(self, *, lmax: int = 2, mul: int = 16, depth: int = 3, params: int | None = None,
                 r_max: float = 4.0, num_basis: int = 8, radial_hidden: int = 32,
                 avg_degree: float = 4.0, cutoff: bool = False, backend: Backend = "e3nn") -> None:
        if lmax < 0:
            raise ValueError(f"lmax must be >= 0, got {lmax}")
        for name, v in (("mul", mul), ("depth", depth), ("radial_hidden", radial_hidden)):
            if v < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        if num_basis < 2:
            raise ValueError(f"num_basis must be >= 2, got {num_basis}")
        if r_max <= 0 or avg_degree <= 0:
            raise ValueError("r_max and avg_degree must be positive")
        if params is not None and params < 1:
            raise ValueError(f"params must be positive, got {params}")
        super().__init__(lmax=lmax, mul=mul, depth=depth, params=params, r_max=r_max,
                         num_basis=num_basis, radial_hidden=radial_hidden, avg_degree=avg_degree,
                         cutoff=cutoff, backend=backend)
        self.lmax, self.mul, self.depth, self.params = lmax, mul, depth, params
        self.backend: Backend = backend
        self.r_max, self.num_basis, self.radial_hidden = float(r_max), num_basis, radial_hidden
        self.avg_degree, self.cutoff = float(avg_degree), cutoff

    def supports(self, spec: TaskSpec) -> str | None:
        reason = super().supports(spec)
        if reason:
            return reason
        if self.backend == "cuequivariance":
            missing = cuequivariance_missing()
            if missing:
                return missing
            if not torch.cuda.is_available():
                return ("the cuequivariance backend is measured with its CUDA kernels and there is no CUDA device "
                        "here (its agreement with e3nn is tested on the CPU through its pure-PyTorch fallback)")
        if not spec.point_fields:
            return "e3nn needs at least one 'point' input (edge geometry comes from positions)"
        out_l = 1 if spec.output == POINT else irreps(spec.output).lmax
        if out_l > self.lmax:
            return f"output {spec.output!r} has l = {out_l} > lmax = {self.lmax}"
        return None

    def count(self, spec: TaskSpec, mul: int, radial_hidden: int) -> int:
        return parameter_count(spec, mul, self.lmax, self.depth, self.num_basis, radial_hidden)

    def sizes_for(self, spec: TaskSpec, target: int, tolerance: float = 0.10) -> tuple[int, int]:
        """(mul, radial_hidden) for ``target`` parameters: the ``mul`` whose count is closest
        (``radial_hidden`` as given); if that misses by more than ``tolerance`` (the count
        grows ~ mul^2, so small models step coarsely), the largest ``mul`` below the target
        (at least 1) with ``radial_hidden`` solved for the rest (the count is linear in it).
        Counts come from ``parameter_count``, so nothing is built while searching."""
        rh = self.radial_hidden
        lo, hi = 1, 1
        while self.count(spec, hi, rh) < target and hi < 4096:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # count(lo) < target <= count(hi) (or lo = hi = 1)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.count(spec, mid, rh) < target else (lo, mid)
        best = min((lo, hi), key=lambda m: abs(self.count(spec, m, rh) - target))
        if abs(self.count(spec, best, rh) - target) <= tolerance * target:
            return best, rh
        mul = lo
        base = self.count(spec, mul, 0)
        per_hidden = self.count(spec, mul, 1) - base
        return mul, max(1, round((target - base) / per_hidden))

    def implementation(self) -> str:
        own = super().implementation()
        if self.backend == "e3nn":
            return own
        try:
            return f"{own} + cuequivariance-torch {importlib.metadata.version('cuequivariance-torch')}"
        except importlib.metadata.PackageNotFoundError:
            return f"{own} + cuequivariance-torch (not installed)"

    def extra_metrics(self, model: nn.Module, batch: Batch, pred: torch.Tensor) -> dict[str, float]:
        if self.backend == "e3nn":
            return {}
        return {"backend_agreement": backend_agreement(model, batch, pred)}  # row: BACKEND_AGREEMENT

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        return build_irreps_sized(self, spec, seed, lambda mul, rh: E3NNModel(
            spec, mul, self.lmax, self.depth, self.r_max, self.num_basis, rh, self.avg_degree, self.cutoff,
            self.backend))
