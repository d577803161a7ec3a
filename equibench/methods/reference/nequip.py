"""``nequip``: the NequIP model of the ``nequip`` package (mir-group, 0.19.1;
``nequip.model.NequIPGNNModel``) behind equibench's ``Method`` interface, on molecular tasks.

Batzner et al., "E(3)-equivariant graph neural networks for data-efficient and accurate
interatomic potentials" (Nat. Commun. 2022). The library's model is an energy model: species
embedding, ``num_layers`` interaction blocks ('uvu' tensor products of the features with the
spherical harmonics Y(r_ij) of the edge vectors, l <= ``l_max``, weights from a bias-free radial
MLP on a Bessel basis times the polynomial cutoff u(r / r_max), edge sums divided by
sqrt(avg_num_neighbors), a species self-connection from layer 2 on, gated nonlinearities), a
per-atom energy readout, per-species scale and shift, and the sum over atoms:

    E = sum_i (scale_{z_i} * e_i + shift_{z_i}),     F_i = -dE/dx_i

(forces by autograd of the library's energy, see below). E is invariant and F equivariant under
E(3) = O(3) x translations (every map is an O(3) intertwiner of invariant inputs and edge
vectors; with ``parity=False`` the features keep only the natural parity (l, (-1)^l), which is
still reflection-equivariant), and under relabelling of the atoms (a permutation that carries each
atom's species along): so ``exact`` with group "O3". Float64 equivariance holds to round-off when
the model is built under a float64 default dtype (``model_dtype`` follows the default dtype at
build time).

Tasks (``supports``): one "point" input (positions) and invariant scalar node inputs that are a
one-hot species code (qm9: H, C, N, O, F; md: the molecule's elements), no edge inputs, and either
a graph-level "0e" target (predicted as E: qm9's standardised property, md with target="energy")
or a node-level "1o" force target (md's default, metric ``force_mae``: predicted as -dE/dx).
Declined: n-body (velocities and charges, a "point" output), normals (a "1o" output that is not a
force), image tasks.

How the batch is handed to the library (an ``AtomicDataDict``): ``pos`` in float64 (nequip keeps
data in float64 whatever the model dtype; lengths and the Bessel basis are computed in float64 and
cast to the model dtype), ``atom_types`` = argmax of the one-hot code (checked to be one-hot on the
first batch), ``edge_index`` = the task's edges flipped (PyG's edge j -> i is ``[j, i]``; nequip's
is ``[centre i, neighbour j]`` with edge vector x_j - x_i), ``batch`` and per-graph atom counts.
The task's graph is used as given (qm9: 5 A radius graph; md: complete graph unless the task sets
a cutoff); no neighbour list is rebuilt. Forces: the library model is built as an energy model
(``do_derivatives=False``) and F = -dE/dx is taken here with ``torch.autograd.grad`` (graph kept in
training mode, so a force loss trains the parameters; also under an outer ``no_grad``), the
derivative nequip's ``ForceStressOutput`` takes, without its virial (the tests hold the two equal to
1e-12 in float64). The positions enter the library as a view of the differentiated leaf: torch's
module tracker (``FlopCounterMode``) cannot hook a leaf tensor inside ``autograd.grad``, and
``ForceStressOutput`` differentiates with respect to a leaf, so FLOP counting failed with it.

Data statistics. nequip takes ``r_max`` and ``avg_num_neighbors`` as build-time constants computed
from the training set; a ``Method`` builds before it sees data. They follow the same rule as
equibench's ``e3nn_nequip`` (``GraphStatistics``): unless given as options, r_max = 1.1 x the
longest edge and avg_num_neighbors = the mean in-degree of the first batch the model sees in
training mode (the runner's first training batch), kept in the state dict; before that, each
batch's own values. The values are written into the library's modules (the edge-length
normaliser's 1 / r_max, the Bessel prefactor 2 pi / r_max^2, every block's 1 / sqrt(avg)) when
they change. So no edge of the task's graph is cut at build time; an evaluation edge longer than
r_max gets weight zero (smoothly, through the cutoff envelope). Per-species energy scales and
shifts (nequip: the force RMS and the mean per-atom energy of the training set) are fixed, equal
for every species: ``energy_scale`` = 1 and ``energy_shift`` = 0 by default, as the tasks' targets
are already of order one and referenced (qm9: standardised; md: E - E_ref in eV, forces in eV/A with
an RMS of 0.99 eV/A on the default ethanol trajectory at 500 K: 300 training configurations;
E - E_ref 0.41 +- 0.15 eV), and as ``e3nn_nequip`` has none.

Defaults are ``NequIPGNNModel``'s (4 layers, l_max 1, parity, 32 features, radial MLP 1 x 128,
8 Bessels, p = 6): 438 400 parameters with md's 3 species (the self-connections grow as F^3).
``params`` scales ``num_features`` and ``radial_mlp_width`` together (their ratio kept); where
the cubic growth of the self-connection steps over the 10 % band, the largest ``num_features``
below the target is kept and the radial width chosen. Counts come from
``parameter_count`` (NequIP's irreps rules, checked against built models in the tests).

The library's global state (``set_global_state``: float64 default dtype, a global seed, e3nn
flags) is initialised once, with the caller's default dtype, random states and e3nn flags restored
afterwards. Importing nequip takes ~6 s (lightning, hydra), so it is imported only when a model is
built.
"""
from __future__ import annotations

import importlib.util
import math
import os
import random
from typing import Any, ClassVar

import numpy as np
import torch
from e3nn import o3
from torch import nn
from torch_geometric.data import Batch

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import field_dim, irreps, is_invariant
from ..architectures.nequip_style import GraphStatistics, plan_layer
from ..base import Method, bisect_increasing

LIBRARY = "nequip"
RATIO_TOLERANCE = 0.10


def _initialise_nequip() -> None:
    """nequip's ``set_global_state`` once, leaving the caller's default dtype, random states
    (torch, numpy, random), e3nn optimisation flags and seed environment variables as they were."""
    from nequip.utils.global_state import global_state_initialized, set_global_state  # optional dependency
    if global_state_initialized():
        return
    import e3nn
    dtype, flags = torch.get_default_dtype(), e3nn.get_optimization_defaults()
    np_state, py_state = np.random.get_state(), random.getstate()
    env = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            set_global_state()
        finally:
            torch.set_default_dtype(dtype)
            _restore_e3nn_flags(flags)
            np.random.set_state(np_state)
            random.setstate(py_state)
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def species_fields(spec: TaskSpec) -> list[str]:
    """The invariant node inputs, concatenated into the one-hot species code."""
    point = spec.point_fields[0]
    return [k for k in spec.inputs if k != point]


def n_types(spec: TaskSpec) -> int:
    """Number of species: the width of the one-hot code (1 when there is none)."""
    return max(sum(field_dim(spec.inputs[k]) for k in species_fields(spec)), 1)


def build_nequip(spec: TaskSpec, seed: int, config: dict[str, Any], do_derivatives: bool = False) -> nn.Module:
    """The library's ``NequIPGNNModel`` for ``spec`` in the default dtype (placeholder r_max and
    avg_num_neighbors of 1 unless ``config`` fixes them; ``NequIPAdapter`` writes the real ones);
    an energy model unless ``do_derivatives`` (the library's own force output, used by the tests)."""
    _initialise_nequip()
    import e3nn
    from nequip.model import NequIPGNNModel  # optional dependency
    dtype = "float64" if torch.get_default_dtype() == torch.float64 else "float32"
    c = dict(config)
    flags = e3nn.get_optimization_defaults()
    try:
        return NequIPGNNModel(
            seed=seed, model_dtype=dtype, type_names=[f"t{i}" for i in range(n_types(spec))],
            r_max=c.pop("r_max") or 1.0, avg_num_neighbors=c.pop("avg_num_neighbors") or 1.0,
            per_type_energy_scales=c.pop("energy_scale"), per_type_energy_shifts=c.pop("energy_shift"),
            do_derivatives=do_derivatives, **c)
    finally:  # the build toggles jit_script_fx and restores it through e3nn's legacy mapping, which
        _restore_e3nn_flags(flags)  # leaves jit_mode "script": later e3nn modules could not be deep-copied


def _restore_e3nn_flags(flags: dict[str, Any]) -> None:
    """e3nn's optimisation flags as ``flags`` (``jit_mode`` last: setting the legacy
    ``jit_script_fx`` rewrites it)."""
    import e3nn
    e3nn.set_optimization_defaults(**{k: v for k, v in flags.items() if k != "jit_mode"})
    if "jit_mode" in flags:
        e3nn.set_optimization_defaults(jit_mode=flags["jit_mode"])


class NequIPAdapter(nn.Module):
    """``model(batch)``: the library model on an AtomicDataDict made from the batch; returns the
    total energy ``[B, 1]`` or the forces -dE/dx ``[N, 3]`` in the batch's dtype."""

    def __init__(self, spec: TaskSpec, graph_model: nn.Module, forces: bool,
                 avg_num_neighbors: float | None, r_max: float | None) -> None:
        super().__init__()
        from nequip.nn import ApplyFactor  # optional dependency
        from nequip.nn.embedding import EdgeLengthNormalizer
        from nequip.nn.norm import AvgNumNeighborsNorm
        self.point = spec.point_fields[0]
        self.species = species_fields(spec)
        self.forces = forces
        self.nequip = graph_model
        self.stats = GraphStatistics(avg_num_neighbors, r_max)
        mods = list(graph_model.modules())
        self._normalisers = [m for m in mods if isinstance(m, EdgeLengthNormalizer)]
        self._factors = [m for m in mods if isinstance(m, ApplyFactor) and m.in_field == "edge_embedding"]
        self._norms = [m for m in mods if isinstance(m, AvgNumNeighborsNorm)]
        if len(self._normalisers) != 1 or len(self._factors) != 1 or not self._norms:
            raise RuntimeError("nequip's model layout changed: cannot find its r_max and avg_num_neighbors "
                               f"constants ({len(self._normalisers)} normalisers, {len(self._factors)} "
                               f"Bessel factors, {len(self._norms)} edge-sum norms)")
        self._written: tuple[float, float] | None = None  # the statistics now in the library's modules
        self._checked = False
        self.register_load_state_dict_post_hook(NequIPAdapter._after_load)

    @staticmethod
    def _after_load(module: nn.Module, incompatible_keys: object) -> None:
        if isinstance(module, NequIPAdapter):  # a loaded state may carry other constants: write again
            module._written = None

    def _write_statistics(self, avg: float, r_max: float) -> None:
        if self._written == (avg, r_max):
            return
        self._normalisers[0]._rmax_recip.fill_(1.0 / r_max)
        self._factors[0].factor = 2.0 * math.pi / (r_max * r_max)  # nequip's Bessel prefactor
        for norm in self._norms:
            norm.norm_const.fill_(1.0 / math.sqrt(avg))
        self._written = (avg, r_max)

    def atom_types(self, batch: Batch) -> torch.Tensor:
        n = batch[self.point].shape[0]
        if not self.species:
            return torch.zeros(n, dtype=torch.long, device=batch[self.point].device)
        code = torch.cat([batch[k].reshape(n, -1) for k in self.species], -1)
        if not self._checked:
            if not bool(((code == 0) | (code == 1)).all() and (code.sum(-1) == 1).all()):
                raise ValueError(f"nequip needs a one-hot species code in {self.species}")
            self._checked = True
        return code.argmax(-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        pos = batch[self.point]
        src, dst = batch.edge_index
        with torch.no_grad():
            lengths = (pos[src] - pos[dst]).norm(dim=-1)
        self._write_statistics(*self.stats(batch, lengths))
        p = pos.to(torch.float64)  # nequip's data dtype
        if not p.requires_grad:
            p = p.detach()  # a new tensor: the caller's keeps its requires_grad flag
        n_graphs = int(batch.num_graphs)
        data = {"pos": p, "edge_index": torch.stack([dst, src]), "atom_types": self.atom_types(batch),
                "batch": batch.batch,
                "num_atoms": batch.batch.new_zeros(n_graphs).index_add_(0, batch.batch, torch.ones_like(batch.batch))}
        if not self.forces:
            return self.nequip(data)["total_energy"].reshape(n_graphs, 1).to(pos.dtype)
        keep = self.training or p.requires_grad  # a force loss (or an outer derivative) needs the graph
        with torch.enable_grad():  # forces by autograd, also under an outer no_grad
            leaf = p if p.requires_grad else p.requires_grad_(True)
            data["pos"] = leaf.view_as(leaf)  # not a leaf: see the module docstring (FlopCounterMode)
            energy = self.nequip(data)["total_energy"]
            (grad,) = torch.autograd.grad(energy.sum(), data["pos"], create_graph=keep)
        return (-grad).to(pos.dtype)


def _linear_numel(a: o3.Irreps, b: o3.Irreps) -> int:
    return sum(m1 * m2 for m1, i1 in a for m2, i2 in b if i1 == i2)


def parameter_count(num_types: int, num_features: int, num_layers: int, l_max: int, parity: bool,
                    radial_mlp_depth: int, radial_mlp_width: int, num_bessels: int,
                    bessel_trainable: bool) -> int:
    """Trainable parameters of ``NequIPGNNModel`` from its irreps rules (nothing is built): the
    species embedding (num_types x F), per layer linear_1, the radial MLP (no biases) feeding the 'uvu'
    tensor product, linear_2 and, from the second layer on, the self-connection with the F x 0e
    species embedding; the F -> 1 energy readout; trainable Bessel roots. The per-layer irreps
    follow NequIP's ``ConvNetLayer`` rules (``plan_layer``). Checked against built models in the
    tests."""
    nf = num_features
    sh = o3.Irreps.spherical_harmonics(l_max)
    hidden = o3.Irreps([(nf, (l, p)) for l in range(l_max + 1)
                        for p in ((1, -1) if parity else ((-1) ** l,))])
    embed = o3.Irreps(f"{nf}x0e")
    total = num_types * nf + (num_bessels if bessel_trainable else 0)
    ir = embed
    for layer in range(num_layers):
        plan = plan_layer(ir, sh, hidden if layer < num_layers - 1 else embed)
        sizes = [num_bessels] + [radial_mlp_width] * radial_mlp_depth + [plan.mid.num_irreps]
        total += _linear_numel(ir, ir) + sum(a * b for a, b in zip(sizes, sizes[1:]))
        total += _linear_numel(plan.mid.simplify(), plan.conv_out)
        if layer > 0:
            total += _linear_numel(ir, plan.conv_out) * nf
        ir = plan.out
    return total + ir.dim


@register_method("nequip")
class NequIP(Method):
    """nequip's ``NequIPGNNModel`` (Batzner et al. 2022): energies, forces as -dE/dx; O(3)-exact."""

    domains = ("graph3d",)
    exact = True
    group = "O3"
    smoke_options: ClassVar[dict[str, Any]] = {"num_features": 4, "num_layers": 2, "radial_mlp_width": 16}
    origin: ClassVar[str] = LIBRARY
    counterpart: ClassVar[str | None] = "e3nn_nequip"
    #: forces are -dE/dx of the library's energy (the report's reference pairs state the force kind)
    conservative_forces: ClassVar[bool] = True

    def __init__(self, *, num_layers: int = 4, l_max: int = 1, parity: bool = True, num_features: int = 32,
                 radial_mlp_depth: int = 1, radial_mlp_width: int = 128, num_bessels: int = 8,
                 bessel_trainable: bool = False, polynomial_cutoff_p: int = 6, params: int | None = None,
                 r_max: float | None = None, avg_num_neighbors: float | None = None,
                 energy_scale: float = 1.0, energy_shift: float = 0.0) -> None:
        for name, v in (("num_layers", num_layers), ("num_features", num_features),
                        ("radial_mlp_depth", radial_mlp_depth), ("radial_mlp_width", radial_mlp_width),
                        ("num_bessels", num_bessels)):
            if v < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        if l_max < 0:
            raise ValueError(f"l_max must be >= 0, got {l_max}")
        if polynomial_cutoff_p < 2:
            raise ValueError(f"polynomial_cutoff_p must be >= 2, got {polynomial_cutoff_p}")
        for name, x in (("params", params), ("r_max", r_max), ("avg_num_neighbors", avg_num_neighbors),
                        ("energy_scale", energy_scale)):
            if x is not None and x <= 0:
                raise ValueError(f"{name} must be positive, got {x}")
        super().__init__(num_layers=num_layers, l_max=l_max, parity=parity, num_features=num_features,
                         radial_mlp_depth=radial_mlp_depth, radial_mlp_width=radial_mlp_width,
                         num_bessels=num_bessels, bessel_trainable=bessel_trainable,
                         polynomial_cutoff_p=polynomial_cutoff_p, params=params, r_max=r_max,
                         avg_num_neighbors=avg_num_neighbors, energy_scale=energy_scale,
                         energy_shift=energy_shift)
        self.params = params

    def supports(self, spec: TaskSpec) -> str | None:
        if importlib.util.find_spec("nequip") is None:
            return f"{LIBRARY} is not installed (pip install nequip==0.19.1)"
        reason = super().supports(spec)
        if reason:
            return reason
        if len(spec.point_fields) != 1:
            return (f"nequip needs exactly one 'point' input (the atom positions), task {spec.name} "
                    f"has {spec.point_fields}")
        other = {k: t for k, t in spec.inputs.items() if k not in spec.point_fields and not is_invariant(t)}
        if other:
            return (f"nequip takes positions and a one-hot species code only; task {spec.name} also has "
                    f"non-invariant inputs {other}")
        if spec.edge_inputs:
            return f"nequip takes no edge inputs; task {spec.name} has {spec.edge_inputs}"
        if self._target(spec) is None:
            return (f"nequip predicts an energy (graph-level '0e') or forces -dE/dx (node-level '1o' with "
                    f"metric force_mae); task {spec.name} asks for a {spec.level}-level {spec.output!r}")
        return None

    @staticmethod
    def _target(spec: TaskSpec) -> str | None:
        if spec.level == "graph" and spec.output != "point" and irreps(spec.output) == irreps("0e"):
            return "energy"
        if spec.level == "node" and spec.output == "1o" and "force_mae" in spec.metrics:
            return "forces"
        return None

    def _config(self, num_features: int, radial_mlp_width: int) -> dict[str, Any]:
        o = self.options
        return {"num_layers": o["num_layers"], "l_max": o["l_max"], "parity": o["parity"],
                "num_features": num_features, "radial_mlp_depth": o["radial_mlp_depth"],
                "radial_mlp_width": radial_mlp_width, "num_bessels": o["num_bessels"],
                "bessel_trainable": o["bessel_trainable"], "polynomial_cutoff_p": o["polynomial_cutoff_p"],
                "r_max": o["r_max"], "avg_num_neighbors": o["avg_num_neighbors"],
                "energy_scale": o["energy_scale"], "energy_shift": o["energy_shift"]}

    def count(self, spec: TaskSpec, num_features: int, radial_mlp_width: int) -> int:
        o = self.options
        return parameter_count(n_types(spec), num_features, o["num_layers"], o["l_max"], o["parity"],
                               o["radial_mlp_depth"], radial_mlp_width, o["num_bessels"], o["bessel_trainable"])

    def sizes_for(self, spec: TaskSpec, target: int) -> tuple[int, int]:
        """(num_features, radial_mlp_width) for ``target`` parameters (see the module docstring)."""
        nf0, w0 = self.options["num_features"], self.options["radial_mlp_width"]

        def width(nf: int) -> int:
            return max(1, round(nf * w0 / nf0))

        lo, hi = bisect_increasing(lambda nf: self.count(spec, nf, width(nf)), target, hi_limit=1024)
        best = min((lo, hi), key=lambda nf: abs(self.count(spec, nf, width(nf)) - target))
        if abs(self.count(spec, best, width(best)) - target) <= RATIO_TOLERANCE * target:
            return best, width(best)
        a, b = bisect_increasing(lambda w: self.count(spec, lo, w), target, hi_limit=1 << 16)
        return lo, min((a, b), key=lambda w: abs(self.count(spec, lo, w) - target))

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        reason = self.supports(spec)
        if reason:
            raise ValueError(reason)
        nf, w = self.options["num_features"], self.options["radial_mlp_width"]
        if self.params is not None:
            nf, w = self.sizes_for(spec, self.params)
            n = self.count(spec, nf, w)
            if abs(n - self.params) > RATIO_TOLERANCE * self.params:
                raise ValueError(f"cannot build within 10% of {self.params} parameters "
                                 f"(closest: {n} at num_features={nf}, radial_mlp_width={w})")
        forces = self._target(spec) == "forces"
        model = build_nequip(spec, seed, self._config(nf, w))
        return NequIPAdapter(spec, model, forces, self.options["avg_num_neighbors"], self.options["r_max"])
