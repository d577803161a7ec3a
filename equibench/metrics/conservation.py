"""Force conservation (issue 22, item 4): is a predicted force field the gradient of an energy?

Measured on tasks whose target is a node-level ``"1o"`` field with a point input (``is_force_task``:
md forces), on the model rebuilt in float64 (``ProbeContext.float64``), in eval mode: the curl at
init and after training, the energy drift after training only (an untrained e3nn_nequip still
takes its cutoff from each batch it sees, so its energy is not yet one function of the positions).
Units are md's: positions in Å, forces in eV/Å, energies in eV, masses in atomic mass units (from
the atomic numbers ``z`` the data carry; standard atomic weights, ``ase.data``).

**Curl.** Per molecule b with n atoms, the force Jacobian J = dF/dx (3n x 3n, autograd through the
model; the molecules of a batch do not interact, so row block (a, c) of every molecule comes from
one backward pass of sum_b F_b[a, c]: 3 n_max passes for the whole batch). A field is locally
conservative (F = -dE/dx) iff J is symmetric (J = -Hessian(E)); its rotational part is the
antisymmetric part A = (J - J^T) / 2. Reported: the relative curl

    curl_b = ||A||_F / ||J||_F          (in [0, 1]: ||J||^2 = ||S||^2 + ||A||^2, S = (J + J^T) / 2)

``curl_mean`` / ``curl_max`` over the first ``graphs`` test molecules (0 where J = 0). For a -dE/dx
model it is rounding only (~1e-15 in float64); a direct-force model has no reason to be symmetric.

**Energy drift.** A short NVE simulation driven by the model's forces, on the first
``trajectories`` test molecules at once: initial positions from the test split, Maxwell-Boltzmann
velocities at ``temperature`` (K; seeded by the point's seed, centre-of-mass momentum removed per
molecule), velocity Verlet (symplectic, time-reversible, second order)::

    v(t + dt/2) = v(t) + dt/2 F(x(t)) / m
    x(t + dt)   = x(t) + dt v(t + dt/2)
    v(t + dt)   = v(t + dt/2) + dt/2 F(x(t + dt)) / m

with dt = ``timestep_fs`` fs (in the internal unit Å sqrt(amu/eV) = ``TIME_UNIT_FS`` fs) for ``steps``
steps, the graph of every molecule kept as in the data (md: complete graphs, so exact). The
energy H = K + U, K = sum_i m_i |v_i|^2 / 2, is recorded every ``every`` steps, with the potential U:

* a model exposing an energy (``ForcesFromEnergy``: an ``energy_model`` attribute, F = -dE/dx):
  U = E(x), its own energy;
* any other model (direct forces): the line-integral potential from the starting configuration
  x0 along the straight path,

      U(x) = - int_0^1 F(x0 + s (x - x0)) . (x - x0) ds       (Gauss-Legendre, ``nodes`` points),

  a function of the state alone. If F = -grad E then U(x) = E(x) - E(x0) (path independence), so
  H is the same energy up to a constant and quadrature error (a test checks it); if F has a curl,
  dH/dt = (F + grad U) . v != 0 and H drifts. (K minus the work W = int F . dx accumulated along the
  trajectory would not do: it is conserved by Newton's law for any force field, and velocity
  Verlet with trapezoidal work conserves K - W + dt^2 |F|^2 / 8m exactly, curl or not.)

Reported: the drift of H, |slope| of the least-squares line through H(t), per atom, in
meV/atom/ps (absolute, not relative), ``drift_mean`` / ``drift_max`` over the simulated molecules.
For a conservative field it is velocity Verlet's O(dt^2) bounded energy error seen through a short
window (no secular drift); a trajectory that goes non-finite counts as inf. Not measured: the same
run driven by the reference GFN2-xTB forces (one xTB single point per step, seconds per point,
and md's data sit in ``datasets``, above this layer); the conservative models (``forces:
conservative``) are the comparison: the same integrator, molecules and settings.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import model_validator
from torch import nn
from torch_geometric.data import Batch

from ..core.registry import register_probe
from ..core.spec import TaskSpec
from ..symmetry.group3d import repeat_batch
from .catalogue import STAGES, MetricSpec
from .equivariance import cast_batch
from .probe import Probe, ProbeContext, ProbeSettings, Reading, reading

#: the time unit of (Å, eV, amu), Å sqrt(amu / eV), in femtoseconds
TIME_UNIT_FS = 10.180505710759416
#: Boltzmann's constant in eV/K
KB_EV = 8.617333262e-5
CURL_STATS = ("curl_mean", "curl_max")
DRIFT_STATS = ("drift_mean", "drift_max")
FAMILY = "force_conservation"

#: a force field: positions [..., N, 3] -> forces [..., N, 3] (leading dims: independent copies)
ForceField = Callable[[torch.Tensor], torch.Tensor]


def is_force_task(spec: TaskSpec) -> bool:
    """A node-level "1o" target on a task with a point input: forces that -dE/dx can produce."""
    return spec.level == "node" and spec.output == "1o" and bool(spec.point_fields)


def conservation_metric(stage: str, stat: str) -> str:
    """``force_conservation.<stage>.<stat>``."""
    return f"{FAMILY}.{stage}.{stat}"


# ---------------------------------------------------------------------------------------------
# curl

def relative_curl(jac: torch.Tensor) -> float:
    """||(J - J^T) / 2||_F / ||J||_F (0 for J = 0)."""
    norm = float(jac.norm())
    return 0.0 if norm == 0.0 else float((jac - jac.T).norm()) / (2.0 * norm)


def force_jacobians(field: ForceField, pos: torch.Tensor, graph: torch.Tensor, n_graphs: int) -> list[torch.Tensor]:
    """dF/dx per graph (``[3 n_b, 3 n_b]``, rows (atom, component) of F, columns of x), for a field
    whose graphs do not interact: one backward pass per (local atom index, component)."""
    pos = pos.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        forces = field(pos)
    counts = torch.bincount(graph, minlength=n_graphs)
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(len(graph), device=graph.device) - start[graph]
    jac = [pos.new_zeros(3 * int(n), 3 * int(n)) for n in counts]
    for a in range(int(counts.max())):
        rows = local == a
        for c in range(3):
            (grad,) = torch.autograd.grad(forces[rows, c].sum(), pos, retain_graph=True, allow_unused=True)
            if grad is None:
                continue
            for b in torch.nonzero(counts > a).flatten().tolist():
                s, n = int(start[b]), int(counts[b])
                jac[b][3 * a + c] = grad[s:s + n].reshape(-1)
    return jac


# ---------------------------------------------------------------------------------------------
# NVE

def per_graph(values: torch.Tensor, graph: torch.Tensor, n_graphs: int) -> torch.Tensor:
    """Sum of per-atom ``values [..., N]`` over each graph's atoms: ``[..., n_graphs]``."""
    out = values.new_zeros(*values.shape[:-1], n_graphs)
    return out.index_add(-1, graph, values)


def kinetic_energy(vel: torch.Tensor, masses: torch.Tensor, graph: torch.Tensor, n_graphs: int) -> torch.Tensor:
    """K_b = sum_i m_i |v_i|^2 / 2 per graph (eV with v in Å per ``TIME_UNIT_FS``, m in amu)."""
    return per_graph(0.5 * masses * (vel * vel).sum(-1), graph, n_graphs)


def maxwell_boltzmann(masses: torch.Tensor, graph: torch.Tensor, n_graphs: int, temperature: float,
                      generator: torch.Generator) -> torch.Tensor:
    """Velocities drawn at ``temperature`` K (each component N(0, kB T / m)), centre-of-mass
    momentum removed per graph."""
    noise = torch.randn(len(masses), 3, generator=generator, dtype=torch.float64).to(masses)
    vel = noise * torch.sqrt(KB_EV * temperature / masses)[:, None]
    momentum = vel.new_zeros(n_graphs, 3).index_add(0, graph, masses[:, None] * vel)
    return vel - (momentum / per_graph(masses, graph, n_graphs)[:, None])[graph]


def gauss_legendre(nodes: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of the ``nodes``-point Gauss-Legendre rule on [0, 1]."""
    s, w = np.polynomial.legendre.leggauss(nodes)
    return like.new_tensor((s + 1.0) / 2.0), like.new_tensor(w / 2.0)


def line_integral_potential(field: ForceField, pos: torch.Tensor, start: torch.Tensor, graph: torch.Tensor,
                            n_graphs: int, nodes: int = 8) -> torch.Tensor:
    """U_b(x) = -int_0^1 F(x0 + s (x - x0)) . (x - x0) ds per graph (module docstring): all
    quadrature nodes in one call of ``field``."""
    s, w = gauss_legendre(nodes, pos)
    d = pos - start
    forces = field(start + s[:, None, None] * d)
    return -(w[:, None] * per_graph((forces * d).sum(-1), graph, n_graphs)).sum(0)


@dataclass
class NVERun:
    """What ``velocity_verlet`` recorded: ``times`` [R] (ps), ``kinetic`` and ``potential`` [R, B]
    (eV), and whether every recorded number is finite."""
    times: torch.Tensor
    kinetic: torch.Tensor
    potential: torch.Tensor
    finite: bool

    @property
    def energy(self) -> torch.Tensor:
        return self.kinetic + self.potential


def velocity_verlet(field: ForceField, potential: Callable[[torch.Tensor], torch.Tensor], pos: torch.Tensor,
                    vel: torch.Tensor, masses: torch.Tensor, graph: torch.Tensor, n_graphs: int,
                    timestep_fs: float, steps: int, every: int = 1) -> NVERun:
    """Velocity Verlet (module docstring) for ``steps`` steps of ``timestep_fs`` fs; K and
    ``potential(x)`` [B] recorded at step 0 and every ``every`` steps (and at the last). Stops at
    the first non-finite position or force (``finite`` False)."""
    dt = timestep_fs / TIME_UNIT_FS
    inv_m = (1.0 / masses)[:, None]
    forces = field(pos)
    times, kin, pot = [], [], []

    def record(step: int) -> None:
        times.append(step * timestep_fs * 1e-3)
        kin.append(kinetic_energy(vel, masses, graph, n_graphs))
        pot.append(potential(pos))

    record(0)
    finite = bool(torch.isfinite(forces).all())
    for step in range(1, steps + 1):
        if not finite:
            break
        vel = vel + 0.5 * dt * forces * inv_m
        pos = pos + dt * vel
        forces = field(pos)
        vel = vel + 0.5 * dt * forces * inv_m
        finite = bool(torch.isfinite(forces).all() and torch.isfinite(pos).all())
        if finite and (step % every == 0 or step == steps):
            record(step)
    energy_finite = finite and bool(torch.isfinite(torch.stack(pot)).all())
    return NVERun(torch.tensor(times, dtype=torch.float64), torch.stack(kin).double(), torch.stack(pot).double(),
                  energy_finite)


def drift_per_ps(times: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of ``energy [R, B]`` against ``times [R]`` (ps): [B], energy per ps."""
    t = times - times.mean()
    return (t[:, None] * (energy - energy.mean(0))).sum(0) / (t * t).sum()


# ---------------------------------------------------------------------------------------------
# a model as a force field

class ModelField:
    """A force model (``batch -> [N, 3]``) as a ``ForceField`` on the positions of ``batch``
    (every other field and the graph kept); leading dims of the positions run as copies of the
    batch in one forward. ``energy``: the model's own energy per graph when it exposes one
    (``energy_model``, as ``ForcesFromEnergy``), else None."""

    def __init__(self, model: nn.Module, batch: Batch, pos_field: str) -> None:
        self.model, self.batch, self.pos_field = model, batch, pos_field
        self.n_graphs = int(batch.num_graphs)
        self._copies: dict[int, Batch] = {1: batch}
        energy_model = getattr(model, "energy_model", None)
        self.energy_model = energy_model if isinstance(energy_model, nn.Module) else None

    def _with(self, pos: torch.Tensor) -> Batch:
        k = int(np.prod(pos.shape[:-2])) if pos.dim() > 2 else 1
        if k not in self._copies:
            self._copies[k] = repeat_batch(self.batch, k)
        work = copy.copy(self._copies[k])
        work[self.pos_field] = pos.reshape(-1, 3)
        return work

    def __call__(self, pos: torch.Tensor) -> torch.Tensor:
        return self.model(self._with(pos)).reshape(pos.shape)

    def energy(self, pos: torch.Tensor) -> torch.Tensor:
        """The model's own energy per graph (``energy_model`` required)."""
        assert self.energy_model is not None
        with torch.no_grad():
            return self.energy_model(self._with(pos)).reshape(-1)

    def potential(self, pos: torch.Tensor, start: torch.Tensor, nodes: int = 8) -> torch.Tensor:
        """The potential of the NVE energy (module docstring): the model's energy when it exposes
        one, else the line integral of its forces from ``start``."""
        if self.energy_model is not None:
            return self.energy(pos)
        with torch.no_grad():
            return line_integral_potential(self, pos, start, self.batch.batch, self.n_graphs, nodes)


def atomic_masses(z: torch.Tensor) -> torch.Tensor:
    """Standard atomic weights (amu) of atomic numbers ``z`` (``ase.data``)."""
    from ase.data import atomic_masses as table  # optional: md's data need ase anyway
    return torch.as_tensor(table[z.cpu().numpy()], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# the probe

def _specs() -> tuple[MetricSpec, ...]:
    curl = "relative curl ||(J − Jᵀ)/2||_F / ||J||_F of the force Jacobian J = dF/dx per test molecule (fp64)"
    drift = ("|slope| of K + U along a velocity-Verlet NVE run driven by the model's forces (fp64; U: the model's "
             "energy, or for direct forces the line integral of F from the start), per atom")
    specs = []
    for stage in STAGES:
        for stat in CURL_STATS:
            word = "mean" if stat.endswith("mean") else "max"
            specs.append(MetricSpec(conservation_metric(stage, stat), f"force curl {stage}, {word}", FAMILY,
                                    direction="lower", aggregate="max" if word == "max" else "mean", stage=stage,
                                    dtype="fp64", stat=stat, number_format="sci", floor=1e-12,
                                    description=f"{curl}; {word} over molecules"))
        for stat in DRIFT_STATS if stage == "trained" else ():  # the NVE run: trained models only
            word = "mean" if stat.endswith("mean") else "max"
            specs.append(MetricSpec(conservation_metric(stage, stat), f"NVE energy drift {stage}, {word}", FAMILY,
                                    unit="meV/atom/ps", direction="lower", aggregate="max" if word == "max" else "mean",
                                    stage=stage, dtype="fp64", stat=stat, number_format="g",
                                    description=f"{drift}; {word} over molecules"))
    return tuple(specs)


@register_probe("force_conservation")
class ForceConservationProbe(Probe):
    """Relative curl of the force Jacobian (at init and trained) and NVE energy drift (trained) of
    the float64 model (module docstring), on force tasks (``is_force_task``). Off by default (switch:
    ``force_conservation: true``; settings ``force_conservation_<setting>``)."""

    METRICS = _specs()
    phases = ("init", "trained")
    order = 35
    domains = ("graph3d",)
    enabled = False

    class Settings(ProbeSettings):
        graphs: int = 4  # test molecules whose force Jacobian is taken
        trajectories: int = 4  # test molecules simulated (NVE, all in one batch)
        steps: int = 200  # velocity-Verlet steps
        timestep_fs: float = 0.5  # fs
        temperature: float = 300.0  # K, of the initial Maxwell-Boltzmann velocities
        every: int = 10  # the energy is recorded every `every` steps
        nodes: int = 8  # Gauss-Legendre nodes of the line-integral potential (direct forces)

        @model_validator(mode="after")
        def _positive(self) -> ForceConservationProbe.Settings:
            for name in ("graphs", "trajectories", "steps", "timestep_fs", "temperature", "every", "nodes"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
            return self

    @classmethod
    def applies_to(cls, spec: TaskSpec) -> bool:
        return super().applies_to(spec) and is_force_task(spec)

    def measure(self, ctx: ProbeContext, phase: str) -> list[Reading]:
        model = ctx.float64().to(ctx.device).eval()
        pos_field = ctx.spec.point_fields[0]
        out = self._curl(model, ctx, phase, pos_field)
        batch = ctx.test_batch(self.settings.trajectories)
        if phase == "trained" and "z" in batch:  # masses from the atomic numbers (md); without them no dynamics
            out += self._drift(model, ctx, phase, pos_field)
        return out

    def _curl(self, model: nn.Module, ctx: ProbeContext, phase: str, pos_field: str) -> list[Reading]:
        batch = cast_batch(ctx.test_batch(self.settings.graphs), torch.float64).to(ctx.device)
        field = ModelField(model, batch, pos_field)
        jac = force_jacobians(field, batch[pos_field], batch.batch, field.n_graphs)
        curl = torch.tensor([relative_curl(j) for j in jac], dtype=torch.float64)
        context = {"stage": phase, "dtype": "fp64", "batch_size": field.n_graphs}
        return [reading(conservation_metric(phase, "curl_mean"), float(curl.mean()), **context),
                reading(conservation_metric(phase, "curl_max"), float(curl.max()), **context)]

    def _drift(self, model: nn.Module, ctx: ProbeContext, phase: str, pos_field: str) -> list[Reading]:
        s = self.settings
        batch = cast_batch(ctx.test_batch(s.trajectories), torch.float64).to(ctx.device)
        field = ModelField(model, batch, pos_field)
        graph, n_graphs = batch.batch, field.n_graphs
        masses = atomic_masses(batch.z).to(ctx.device)
        pos0 = batch[pos_field].detach()
        vel0 = maxwell_boltzmann(masses, graph, n_graphs, s.temperature,
                                 torch.Generator().manual_seed(ctx.seed)).to(ctx.device)
        kind = "model energy" if field.energy_model is not None else "line integral"

        def potential(x: torch.Tensor) -> torch.Tensor:
            return field.potential(x, pos0, s.nodes)

        def forces(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return field(x).detach()

        run = velocity_verlet(forces, potential, pos0, vel0, masses, graph, n_graphs, s.timestep_fs, s.steps, s.every)
        atoms = torch.bincount(graph, minlength=n_graphs).double().cpu()
        if run.finite and len(run.times) > 2:
            drift = 1e3 * drift_per_ps(run.times, run.energy.cpu()).abs() / atoms
        else:
            drift = torch.full((n_graphs,), float("inf"), dtype=torch.float64)
        context = {"stage": phase, "dtype": "fp64", "batch_size": n_graphs, "potential": kind,
                   "timestep_fs": s.timestep_fs, "steps": s.steps, "temperature_K": s.temperature}
        return [reading(conservation_metric(phase, "drift_mean"), float(drift.mean()), **context),
                reading(conservation_metric(phase, "drift_max"), float(drift.max()), **context)]


__all__ = ["ForceConservationProbe", "ModelField", "NVERun", "atomic_masses", "conservation_metric", "drift_per_ps",
           "force_jacobians", "is_force_task", "kinetic_energy", "line_integral_potential", "maxwell_boltzmann",
           "relative_curl", "velocity_verlet"]
