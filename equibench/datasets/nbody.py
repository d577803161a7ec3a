"""``nbody``: charged particles (EGNN / frame-averaging protocol).

Five particles with charges q = +-1 (p = 1/2), positions ~ N(0, loc_std^2 I), velocities of
speed 0.5 in uniformly random directions, Coulomb-like forces
``F_i = sum_j q_i q_j (x_i - x_j) / |x_i - x_j|^3`` clipped per component to +-100 (the clip
breaks exact E(3) symmetry slightly; ``clip_force=False`` removes it), leapfrog integration
with dt = 0.001, frames every 100 steps. Input: positions and velocities at frame 30 plus
charges; target: positions at frame 40 (1 000 steps later); edge attribute q_i q_j on the
complete graph. Target type ``"point"``: the task is E(3)-equivariant.

Data are made in chunks of ``CHUNK`` simulations, each from its own seed
``(43, seed, split, chunk)``, so a smaller split is a prefix of a larger one and the cache
grows by chunks.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from ..core.errors import UserError
from ..core.registry import register_task
from ..core.spec import TaskSpec
from ..metrics.catalogue import task_metric
from .base import SPLITS, Task, atomic_save, cache_dir
from .symmetric import Geometry, complete_graph, particle_systems

CHUNK = 500
PROTOCOL_SEED = 43


def coulomb_forces(loc: np.ndarray, qq: np.ndarray, clip: float | None) -> np.ndarray:
    """``F_i = sum_j qq_ij (x_i - x_j) / r_ij^3`` for ``loc: [S, n, 3]``, ``qq: [S, n, n]``."""
    diff = loc[:, :, None, :] - loc[:, None, :, :]
    r2 = np.einsum("sijk,sijk->sij", diff, diff)
    n = loc.shape[1]
    r2[:, np.arange(n), np.arange(n)] = np.inf
    F = np.einsum("sij,sijk->sik", qq / r2**1.5, diff)
    if clip is not None:
        np.clip(F, -clip, clip, out=F)
    return F


def simulate(n_sims: int, rng: np.random.Generator, n_particles: int = 5, n_steps: int = 4000,
             record_every: int = 100, dt: float = 1e-3, loc_std: float = 1.0, speed: float = 0.5,
             clip: float | None = 100.0, field: float = 0.0, field_from_step: int = 0) -> dict[str, np.ndarray]:
    """Vectorised simulation of ``n_sims`` systems.

    ``field`` (``nbody_field``): a constant external field along e_z adds ``q_i * field * e_z`` to
    the force on particle i, *after* the per-component clip of the Coulomb force (the clip bounds
    the pair interaction only), on the kicks of steps >= ``field_from_step`` (0: from the start).
    ``field == 0`` runs exactly the ``nbody`` arithmetic.

    Returns ``loc, vel: [S, frames, n, 3]`` (frame k = step k * record_every; the recorded
    velocity is the leapfrog half-step velocity, as in the reference generator) and
    ``charges: [S, n]``.
    """
    q = rng.choice(np.array([1.0, -1.0]), size=(n_sims, n_particles), p=[0.5, 0.5])
    loc = rng.standard_normal((n_sims, n_particles, 3)) * loc_std
    vel = rng.standard_normal((n_sims, n_particles, 3))
    vel *= speed / np.linalg.norm(vel, axis=-1, keepdims=True)
    locs, vels = integrate(loc, vel, q, n_steps=n_steps, record_every=record_every, dt=dt, clip=clip, field=field,
                           field_from_step=field_from_step)
    return {"loc": locs, "vel": vels, "charges": q}


def integrate(loc: np.ndarray, vel: np.ndarray, q: np.ndarray, n_steps: int = 4000, record_every: int = 100,
              dt: float = 1e-3, clip: float | None = 100.0, field: float = 0.0,
              field_from_step: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Leapfrog from ``loc, vel: [S, n, 3]`` with charges ``q: [S, n]`` (unit masses); returns the
    recorded ``loc, vel: [S, frames, n, 3]`` (see ``simulate``)."""
    n_sims, n_particles = q.shape
    qq = q[:, :, None] * q[:, None, :]
    n_frames = n_steps // record_every + 1
    locs = np.empty((n_sims, n_frames, n_particles, 3))
    vels = np.empty_like(locs)
    locs[:, 0], vels[:, 0] = loc, vel
    external = None
    if field != 0.0:
        external = np.zeros((n_sims, n_particles, 3))
        external[:, :, 2] = q * field

    def forces(x: np.ndarray, step: int) -> np.ndarray:
        F = coulomb_forces(x, qq, clip)
        return F if external is None or step < field_from_step else F + external

    vel = vel + dt * forces(loc, 0)
    for step in range(1, n_steps + 1):
        loc = loc + dt * vel
        if step % record_every == 0:
            locs[:, step // record_every], vels[:, step // record_every] = loc, vel
        vel = vel + dt * forces(loc, step)
    return locs, vels


def total_energy(loc: np.ndarray, vel: np.ndarray, charges: np.ndarray) -> np.ndarray:
    """Kinetic + Coulomb energy (unit masses) of ``[..., n, 3]`` states; ``charges [..., n]``."""
    kinetic = 0.5 * (vel**2).sum(axis=(-1, -2))
    diff = loc[..., :, None, :] - loc[..., None, :, :]
    r = np.sqrt((diff**2).sum(-1))
    n = loc.shape[-2]
    iu = np.triu_indices(n, k=1)
    qq = charges[..., :, None] * charges[..., None, :]
    potential = (qq[..., iu[0], iu[1]] / r[..., iu[0], iu[1]]).sum(-1)
    return kinetic + potential


def fit_step(train: list[Data]) -> float:
    """The least-squares step of constant-velocity extrapolation ``y ≈ x + Δt v`` over every
    particle of ``train``: ``Δt = sum v·(y − x) / sum |v|^2`` (float64)."""
    v = torch.cat([d.vel for d in train]).double()
    dx = torch.cat([d.y - d.pos for d in train]).double()
    return float((v * dx).sum() / (v * v).sum())


@register_task("nbody")
class NBody(Task):
    """Charged particles: predict positions 1 000 integration steps ahead (the EGNN protocol).

    Fields: ``pos [5, 3]`` ``"point"``, ``vel [5, 3]`` ``"1o"``, ``charge [5, 1]`` ``"0e"``
    (q = +-1); ``edge_index`` the complete graph, ``edge_attr [E, 1]`` ``"0e"`` = q_i q_j; target
    ``y [5, 3]`` ``"point"`` (node level), metric ``mse``. Symmetry: E(3) (exact only with
    ``clip_force=False``).
    """

    smoke_options = {"train_size": 64, "val_size": 16, "test_size": 32}

    def __init__(self, *, n_particles: int = 5, input_frame: int = 30, target_frame: int = 40,
                 clip_force: bool = True, train_size: int = 3000, val_size: int = 2000,
                 test_size: int = 2000) -> None:
        if not 0 <= input_frame < target_frame:
            raise ValueError("need 0 <= input_frame < target_frame")
        if n_particles < 2:
            raise ValueError("need at least 2 particles")
        for name, v in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if v < 1:
                raise ValueError(f"{name} must be positive")
        super().__init__(n_particles=n_particles, input_frame=input_frame, target_frame=target_frame,
                         clip_force=clip_force, train_size=train_size, val_size=val_size,
                         test_size=test_size)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(name="nbody", domain="graph3d", group="E3",
                        inputs={"pos": "point", "vel": "1o", "charge": "0e"},
                        edge_inputs={"edge_attr": "0e"}, output="point", level="node",
                        loss="mse", metrics=("mse",))

    def _generator_params(self) -> dict[str, Any]:
        o = self.options
        return {"n_particles": o["n_particles"], "n_steps": o["target_frame"] * 100,
                "record_every": 100, "dt": 1e-3, "loc_std": 1.0, "speed": 0.5,
                "clip": 100.0 if o["clip_force"] else None}

    def provenance(self) -> dict[str, Any]:
        return {"task": "nbody", "source": "generated (numpy leapfrog)", "protocol_seed": PROTOCOL_SEED,
                "numpy": np.__version__, **self._generator_params(),
                "input_frame": self.options["input_frame"], "target_frame": self.options["target_frame"]}

    def _chunk(self, split: str, seed: int, k: int) -> dict[str, np.ndarray]:
        params = self._generator_params()
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        path = cache_dir() / "nbody" / key / f"{split}-seed{seed}-chunk{k}.pt"
        if path.exists():
            return torch.load(path, weights_only=False)
        rng = np.random.default_rng([PROTOCOL_SEED, seed, SPLITS.index(split), k])
        sim = simulate(CHUNK, rng, **params)
        a, b = self.options["input_frame"], self.options["target_frame"]
        arrays = {"pos": sim["loc"][:, a], "vel": sim["vel"][:, a], "y": sim["loc"][:, b],
                  "charges": sim["charges"]}
        atomic_save(arrays, path)
        return arrays

    def load(self, split: str, size: int | None = None, seed: int = 0) -> list[Data]:
        self.check_split(split)
        size = self.sizes[split] if size is None else size
        if size < 1:
            raise UserError(f"nbody: size must be positive, got {size}")
        n_chunks = -(-size // CHUNK)
        chunks = [self._chunk(split, seed, k) for k in range(n_chunks)]
        cat = {k: np.concatenate([c[k] for c in chunks])[:size] for k in chunks[0]}
        n = self.options["n_particles"]
        src, dst = np.where(~np.eye(n, dtype=bool))
        edge_index = torch.as_tensor(np.stack([src, dst]), dtype=torch.long)
        dt = torch.get_default_dtype()
        out = []
        for i in range(size):
            q = torch.as_tensor(cat["charges"][i], dtype=dt)
            out.append(Data(pos=torch.as_tensor(cat["pos"][i], dtype=dt),
                            vel=torch.as_tensor(cat["vel"][i], dtype=dt),
                            charge=q[:, None], edge_index=edge_index,
                            edge_attr=(q[src] * q[dst])[:, None],
                            y=torch.as_tensor(cat["y"][i], dtype=dt)))
        return out

    def symmetric_geometries(self) -> list[Geometry]:
        """With ``n_particles`` = n: a regular n-gon of equal charges at rest and spinning in its
        plane, n collinear charges, an (n-1)-gon around an opposite charge at its centre
        (``datasets.symmetric.particle_systems``; speed 0.5 as the generator's)."""
        return list(particle_systems(self.options["n_particles"], speed=0.5))

    def symmetric_data(self, geometry: Geometry) -> Data:
        """The state in the task's fields: ``pos``, ``vel``, ``charge [n, 1]``, the complete
        graph with ``edge_attr = q_i q_j``."""
        dt = torch.get_default_dtype()
        q = torch.tensor(geometry.labels, dtype=dt)
        edge_index = complete_graph(geometry.n)
        vel = np.zeros_like(geometry.pos) if geometry.vel is None else geometry.vel
        return Data(pos=torch.as_tensor(geometry.pos, dtype=dt), vel=torch.as_tensor(vel, dtype=dt),
                    charge=q[:, None], edge_index=edge_index, edge_attr=(q[edge_index[0]] * q[edge_index[1]])[:, None])

    FLOORS = {"constant_velocity": "constant-velocity extrapolation x + Δt·v with Δt fitted by least squares on the "
                                   "training split (the EGNN paper's 'Linear' row)"}
    SEED_DRAWS = "the simulated training and validation systems"

    def floors(self, train: list[Data]) -> dict[str, Callable[[Batch], torch.Tensor]]:
        """``constant_velocity``: ``x + Δt v`` with ``Δt = fit_step(train)``: no forces, only the
        inertia a model has to beat (the frame interval is 1.0, but the fitted step is lower: the
        forces mostly bend the paths back)."""
        step = fit_step(train)
        return {"constant_velocity": lambda b: b.pos + step * b.vel}

    # loss: the default, mean squared error of the predicted positions
    METRICS = (task_metric("mse", direction="lower", description="mean squared error (n-body positions)"),)

    def metric_values(self, pred: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        per_node = ((pred - batch.y) ** 2).mean(-1)
        from torch_geometric.utils import scatter
        return {"mse": scatter(per_node, batch.batch, dim=0, dim_size=int(batch.num_graphs), reduce="mean")}
