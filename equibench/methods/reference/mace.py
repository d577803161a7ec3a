"""``mace``: the MACE interatomic potential of ``mace-torch`` 0.3.16 (``mace.modules.MACE``) on
molecular energy and force tasks (``qm9``, ``md``), in its own isolated environment.

Batatia, Kovacs, Simm, Ortner, Csanyi, "MACE: Higher Order Equivariant Message Passing Neural
Networks for Fast and Accurate Force Fields" (NeurIPS 2022); reference ``ACEsuit/mace``.

The model (the library's, unchanged): species one-hot a_i, edge vectors r_ij = x_i - x_j (j -> i),
spherical harmonics Y_l(r_ij) for l <= ``max_ell``, a Bessel basis of |r_ij| times a polynomial
cutoff envelope (``num_bessel``, ``num_polynomial_cutoff``, ``r_max``). Each of the
``num_interactions`` layers forms the atomic basis A_i = sum_j R(|r_ij|) Y(r_ij) (x) W h_j
/ avg_num_neighbors (a channel-wise tensor product, weights from a radial MLP), then the
higher-order basis B_i by a symmetric contraction of A_i with itself up to ``correlation``
(body order ``correlation + 1``, species-dependent weights), a linear map back to the hidden
irreps ``num_channels x (0e + 1o + ... up to max_L)`` and a species self-connection. Readouts
(linear after the first layer, an MLP of ``mlp_irreps`` scalars after the last) give per-atom
energies; E = sum_i (E0(a_i) + sum_layers e_i). Every map is an intertwiner of O(3) (parity
kept: the hidden irreps are (l, (-1)^l)), the inputs are relative vectors and the sums are over
atoms, so E is invariant under E(3) and atom permutations: group ``O3`` (with reflections),
translations included.

How a task is read (the library's ``data`` dictionary is built from the batch): ``positions`` =
the task's point field, ``node_attrs`` = its invariant node inputs (qm9, md: the element one-hot;
MACE's ``atomic_numbers`` only matter for distance transforms and ZBL repulsion, which are off),
``edge_index`` = the task's edges (zero periodic shifts, no cell). Graph-level ``"0e"`` output:
the energy E; node-level ``"1o"`` output of a force task (metric ``force_mae``, ``md``): the forces
F_i = -dE/dx_i by autograd (``blocks.energy_forces``), exactly as equivariant as E is invariant.

Settings. Defaults are ``mace run_train``'s for its ``MACE`` model: 128 channels, max_L 1
(hidden ``128x0e + 128x1o``), max_ell 3, correlation 3, 2 interactions, r_max 5 A, 8 Bessel
functions, cutoff polynomial p = 5, radial MLP 3 x 64, readout MLP ``16x0e``, SiLU gate, first
layer ``RealAgnosticInteractionBlock``, then ``RealAgnosticResidualInteractionBlock``,
``use_reduced_cg`` off (its command-line default). Data statistics as ``run_train`` takes them from
the training set: ``avg_num_neighbors`` None = the mean in-degree of the first training batch,
kept in the state dict (``GraphStatistics``; until then each batch's own). Differences from
``run_train``: the atomic reference energies E0 are zero and there is no scale/shift block (plain
``MACE``, not ``ScaleShiftMACE``): the tasks already subtract a reference energy (md) or
standardise the target (qm9). ``params`` scales ``num_channels`` and the radial-MLP width together
(their ratio kept) from an exact count (``MACE.count``).

Environment: mace-torch 0.3.16 pins ``e3nn==0.4.4`` (equibench uses 0.6), so the method declares
``requirements`` and its points run in the cached layered environment of
``equibench.suite.envs``; in an environment without ``mace`` the method is listed with the reason.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn
from torch_geometric.data import Batch

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import POINT, field_dim, is_invariant
from ..architectures.nequip_style import GraphStatistics
from ..base import Method, bisect_increasing, build_irreps_sized, count_parameters
from ..blocks.energy_forces import ForcesFromEnergy

LIBRARY = "mace-torch"
VERSION = "0.3.16"


def _modules() -> Any:
    from mace import modules  # optional dependency: installed in the method's own environment
    return modules


def _o3() -> Any:
    from e3nn import o3  # the environment's e3nn (0.4.4 for mace-torch 0.3.16)
    return o3


def is_force_task(spec: TaskSpec) -> bool:
    """A node-level ``"1o"`` output measured as forces: predicted as -dE/dx."""
    return spec.level == "node" and spec.output == "1o" and "force_mae" in spec.metrics


def attribute_fields(spec: TaskSpec) -> list[str]:
    """The invariant node inputs, concatenated into MACE's ``node_attrs`` (species one-hot)."""
    return [k for k, t in spec.inputs.items() if t != POINT and is_invariant(t)]


@contextlib.contextmanager
def _plain_e3nn() -> Iterator[None]:
    """e3nn without TorchScript / einsum optimisation while only counting parameters (same
    parameters, ~4x faster to build)."""
    import e3nn
    old = e3nn.get_optimization_defaults()
    e3nn.set_optimization_defaults(jit_script_fx=False, optimize_einsums=False)
    try:
        yield
    finally:
        e3nn.set_optimization_defaults(**old)


class Structure(NamedTuple):
    """Every MACE setting but the two sizes ``params`` scales (channels, radial-MLP width)."""

    max_L: int
    max_ell: int
    correlation: int
    num_interactions: int
    r_max: float
    num_bessel: int
    num_polynomial_cutoff: int
    radial_layers: int
    mlp_irreps: str


@functools.lru_cache(maxsize=32)
def _count_coefficients(n_attr: int, structure: Structure) -> tuple[tuple[float, float, float], tuple[int, ...]]:
    """The parameter count of ``make_mace`` is exactly a C^2 + b C + c (everything but the radial
    MLPs; C = num_channels) plus, per interaction i, the bias-free radial MLP
    [num_bessel, h x layers, k_i C]: (a, b, c) from three small builds, and k_i."""
    rows: list[list[float]] = []
    ks: tuple[int, ...] = ()
    with _plain_e3nn(), torch.random.fork_rng(devices=[]):
        for c in (1, 2, 3):
            model = make_mace(n_attr, c, 1, structure, avg_num_neighbors=1.0)
            ks = tuple(int(layer.conv_tp.weight_numel) // c for layer in model.interactions)
            radial = sum(count_parameters(layer.conv_tp_weights) for layer in model.interactions)
            rows.append([float(c * c), float(c), 1.0, float(count_parameters(model) - radial)])
    a = torch.tensor(rows, dtype=torch.float64)
    coef = torch.linalg.solve(a[:, :3], a[:, 3])
    return (float(coef[0]), float(coef[1]), float(coef[2])), ks


def make_mace(n_attr: int, num_channels: int, radial_hidden: int, s: Structure, avg_num_neighbors: float) -> Any:
    """``mace.modules.MACE`` as ``run_train`` builds its ``MACE`` model (E0 = 0, no scale/shift)."""
    modules, o3 = _modules(), _o3()
    hidden = o3.Irreps([(num_channels, ir) for _, ir in o3.Irreps.spherical_harmonics(s.max_L)])
    return modules.MACE(
        r_max=s.r_max, num_bessel=s.num_bessel, num_polynomial_cutoff=s.num_polynomial_cutoff, max_ell=s.max_ell,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=s.num_interactions, num_elements=n_attr, hidden_irreps=hidden,
        MLP_irreps=o3.Irreps(s.mlp_irreps), atomic_energies=np.zeros(n_attr),
        avg_num_neighbors=avg_num_neighbors, atomic_numbers=list(range(1, n_attr + 1)), correlation=s.correlation,
        gate=torch.nn.functional.silu, radial_MLP=[radial_hidden] * s.radial_layers, use_reduced_cg=False)


class MaceEnergy(nn.Module):
    """``batch -> E [B, 1]``: the library's ``MACE`` on the batch's positions, attributes and edges."""

    def __init__(self, spec: TaskSpec, mace: Any, avg_num_neighbors: float | None) -> None:
        super().__init__()
        self.point = spec.point_fields[0]
        self.attr_fields = attribute_fields(spec)
        self.mace = mace
        self.stats = GraphStatistics(avg_num_neighbors, r_max=float(mace.r_max))

    def forward(self, batch: Batch) -> torch.Tensor:
        pos = batch[self.point]
        n, src = pos.shape[0], batch.edge_index[0]
        avg, _ = self.stats(batch, (pos[src] - pos[batch.edge_index[1]]).detach().norm(dim=-1))
        for layer in self.mace.interactions:
            layer.avg_num_neighbors = avg
        graphs = int(batch.num_graphs)
        counts = torch.bincount(batch.batch, minlength=graphs)
        zeros = pos.new_zeros(src.shape[0], 3)
        # MACE sets requires_grad on the positions in place: a tensor of its own, a view when they require grad
        # (FlopCounterMode's module tracker cannot hook a leaf differentiated with autograd.grad)
        data = {"positions": pos.view_as(pos) if pos.requires_grad else pos.detach(),
                "node_attrs": torch.cat([batch[k].reshape(n, -1) for k in self.attr_fields], -1).to(pos.dtype),
                "edge_index": batch.edge_index, "shifts": zeros, "unit_shifts": zeros,
                "cell": pos.new_zeros(3 * graphs, 3), "batch": batch.batch,
                "ptr": torch.cat([counts.new_zeros(1), counts.cumsum(0)])}
        return self.mace(data, training=self.training, compute_force=False)["energy"].unsqueeze(-1)


@register_method("mace")
class MaceMethod(Method):
    """MACE (Batatia et al. 2022) from mace-torch 0.3.16: energies, forces = -dE/dx; O(3)-exact."""

    domains = ("graph3d",)
    exact = True
    group = "O3"
    requirements: ClassVar[tuple[str, ...]] = (f"{LIBRARY}=={VERSION}",)
    origin: ClassVar[str] = LIBRARY
    counterpart: ClassVar[str | None] = None  # no MACE of our own (e3nn_nequip is two-body)
    #: forces are -dE/dx of the library's energy (the report's reference pairs state the force kind)
    conservative_forces: ClassVar[bool] = True
    smoke_options: ClassVar[dict[str, Any]] = {"num_channels": 8, "max_ell": 2, "correlation": 2,
                                               "radial_hidden": 16}

    def __init__(self, *, num_channels: int = 128, max_L: int = 1, max_ell: int = 3, correlation: int = 3,
                 num_interactions: int = 2, r_max: float = 5.0, num_bessel: int = 8, num_polynomial_cutoff: int = 5,
                 radial_hidden: int = 64, radial_layers: int = 3, mlp_irreps: str = "16x0e",
                 avg_num_neighbors: float | None = None, params: int | None = None) -> None:
        for name, v in (("num_channels", num_channels), ("max_ell", max_ell), ("correlation", correlation),
                        ("num_interactions", num_interactions), ("num_bessel", num_bessel),
                        ("num_polynomial_cutoff", num_polynomial_cutoff), ("radial_hidden", radial_hidden),
                        ("radial_layers", radial_layers)):
            if v < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        if not 0 <= max_L <= max_ell:
            raise ValueError(f"max_L must be in [0, max_ell = {max_ell}], got {max_L}")
        for name, x in (("r_max", r_max), ("avg_num_neighbors", avg_num_neighbors), ("params", params)):
            if x is not None and x <= 0:
                raise ValueError(f"{name} must be positive, got {x}")
        super().__init__(num_channels=num_channels, max_L=max_L, max_ell=max_ell, correlation=correlation,
                         num_interactions=num_interactions, r_max=r_max, num_bessel=num_bessel,
                         num_polynomial_cutoff=num_polynomial_cutoff, radial_hidden=radial_hidden,
                         radial_layers=radial_layers, mlp_irreps=mlp_irreps, avg_num_neighbors=avg_num_neighbors,
                         params=params)
        self.num_channels, self.radial_hidden, self.params = num_channels, radial_hidden, params
        self.avg_num_neighbors = avg_num_neighbors
        self.structure = Structure(max_L, max_ell, correlation, num_interactions, float(r_max), num_bessel,
                                   num_polynomial_cutoff, radial_layers, mlp_irreps)

    def supports(self, spec: TaskSpec) -> str | None:
        if importlib.util.find_spec("mace") is None:
            return (f"{LIBRARY} is not installed in this environment; the runner runs mace's points in its "
                    f"isolated environment ({LIBRARY}=={VERSION})")
        reason = super().supports(spec)
        if reason:
            return reason
        if len(spec.point_fields) != 1 or spec.edge_inputs:
            return "mace takes one point field (positions) and no edge inputs"
        other = [k for k, t in spec.inputs.items() if t != POINT and not is_invariant(t)]
        if other or not attribute_fields(spec):
            return ("mace takes positions and invariant node attributes (species one-hot) only"
                    + (f"; the task has non-invariant inputs {other}" if other else ""))
        if not (spec.level == "graph" and spec.output == "0e") and not is_force_task(spec):
            return (f"mace predicts an energy ('0e' per graph) or forces (-dE/dx, a force task); "
                    f"the task asks for {spec.output!r} per {spec.level}")
        return None

    def _n_attr(self, spec: TaskSpec) -> int:
        return sum(field_dim(spec.inputs[k]) for k in attribute_fields(spec))

    def count(self, spec: TaskSpec, num_channels: int, radial_hidden: int) -> int:
        """Trainable parameters of the model built for ``spec`` at these sizes (exact; see
        ``_count_coefficients``)."""
        (a, b, c), ks = _count_coefficients(self._n_attr(spec), self.structure)
        h, layers, n_b = radial_hidden, self.structure.radial_layers, self.structure.num_bessel
        radial = sum(n_b * h + (layers - 1) * h * h + h * k * num_channels for k in ks)
        return round(a * num_channels**2 + b * num_channels + c) + radial

    def sizes_for(self, spec: TaskSpec, target: int, tolerance: float = 0.10) -> tuple[int, int]:
        """(num_channels, radial_hidden) whose count is closest to ``target``, scaling both with the
        configured ratio; if that misses by more than ``tolerance``, the largest ``num_channels``
        below the target with the closest radial width."""
        def radial(c: int) -> int:
            return max(1, round(c * self.radial_hidden / self.num_channels))

        lo, hi = bisect_increasing(lambda c: self.count(spec, c, radial(c)), target)
        best = min((lo, hi), key=lambda c: abs(self.count(spec, c, radial(c)) - target))
        if abs(self.count(spec, best, radial(best)) - target) <= tolerance * target:
            return best, radial(best)
        a, b = bisect_increasing(lambda h: self.count(spec, lo, h), target)
        return lo, min((a, b), key=lambda h: abs(self.count(spec, lo, h) - target))

    @property
    def mul(self) -> int:
        """The channel count under the name ``build_irreps_sized`` reads."""
        return self.num_channels

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        def make(channels: int, hidden: int) -> nn.Module:
            mace = make_mace(self._n_attr(spec), channels, hidden, self.structure, self.avg_num_neighbors or 1.0)
            energy = MaceEnergy(spec, mace, self.avg_num_neighbors)
            return ForcesFromEnergy(energy, energy.point) if is_force_task(spec) else energy
        return build_irreps_sized(self, spec, seed, make)
