"""The n-body generator follows the EGNN / frame-averaging protocol."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import equibench as eb
from equibench.datasets.nbody import CHUNK, coulomb_forces, simulate, total_energy
from equibench.core.errors import UserError


def test_shapes_types_and_graph(nbody_task):
    data = nbody_task.load("train", size=10)
    assert len(data) == 10
    d = data[0]
    spec = nbody_task.spec
    assert spec.inputs == {"pos": "point", "vel": "1o", "charge": "0e"} and spec.output == "point"
    assert d.pos.shape == d.vel.shape == d.y.shape == (5, 3) and d.charge.shape == (5, 1)
    assert d.edge_index.shape == (2, 20)  # complete graph without self loops
    assert not (d.edge_index[0] == d.edge_index[1]).any()
    src, dst = d.edge_index
    assert torch.equal(d.edge_attr[:, 0], d.charge[src, 0] * d.charge[dst, 0])  # q_i q_j


def test_charges_and_initial_speed():
    sim = simulate(400, np.random.default_rng(0), n_steps=200)
    q = sim["charges"]
    assert set(np.unique(q)) == {-1.0, 1.0}
    # p = 1/2: 2000 draws, 5 sigma band
    assert abs((q > 0).mean() - 0.5) < 5 * np.sqrt(0.25 / q.size)
    np.testing.assert_allclose(np.linalg.norm(sim["vel"][:, 0], axis=-1), 0.5, rtol=1e-12)
    # positions ~ N(0, 1)
    assert abs(sim["loc"][:, 0].std() - 1.0) < 0.05


def test_forces_are_coulomb_and_clipped():
    loc = np.array([[[0.0, 0, 0], [1.0, 0, 0]]])
    qq = np.array([[[1.0, 1.0], [1.0, 1.0]]])
    F = coulomb_forces(loc, qq, clip=None)
    np.testing.assert_allclose(F[0], [[-1, 0, 0], [1, 0, 0]])  # like charges repel
    close = np.array([[[0.0, 0, 0], [0.01, 0, 0]]])
    assert np.abs(coulomb_forces(close, qq, clip=100.0)).max() == 100.0


def test_energy_is_conserved_without_clipping():
    sim = simulate(200, np.random.default_rng(1), n_steps=4000, clip=None)
    # the reference stores leapfrog half-step velocities; energy from them oscillates at O(dt)
    E = total_energy(sim["loc"], sim["vel"], sim["charges"][:, None, :])
    drift = np.abs(E[:, 40] - E[:, 30]) / np.abs(E[:, 30]).clip(min=1e-3)
    assert np.median(drift) < 1e-2
    # strong clipping breaks conservation (a check that the test can tell the difference)
    clipped = simulate(200, np.random.default_rng(1), n_steps=4000, clip=1.0)
    Ec = total_energy(clipped["loc"], clipped["vel"], clipped["charges"][:, None, :])
    drift_c = np.abs(Ec[:, 40] - Ec[:, 30]) / np.abs(Ec[:, 30]).clip(min=1e-3)
    assert np.median(drift_c) > 10 * np.median(drift)


def test_target_is_1000_steps_after_input(nbody_task):
    d = nbody_task.load("train", size=3)
    rng = np.random.default_rng([43, 0, 0, 0])  # the first chunk's seed: (protocol, seed, split, chunk)
    sim = simulate(CHUNK, rng, n_steps=4000)
    np.testing.assert_allclose(d[2].pos.numpy(), sim["loc"][2, 30], rtol=1e-6)
    np.testing.assert_allclose(d[2].y.numpy(), sim["loc"][2, 40], rtol=1e-6)
    np.testing.assert_allclose(d[2].vel.numpy(), sim["vel"][2, 30], rtol=1e-6)


def test_deterministic_prefix_and_cached(nbody_task, tmp_path, monkeypatch):
    a = nbody_task.load("test", size=5)
    b = nbody_task.load("test", size=30)
    for x, y in zip(a, b):
        assert torch.equal(x.pos, y.pos) and torch.equal(x.y, y.y)
    train = nbody_task.load("train", size=5)
    assert not torch.equal(train[0].pos, a[0].pos)  # splits differ
    monkeypatch.setenv("EQUIBENCH_CACHE", str(tmp_path))
    eb.get_task("nbody").load("val", size=2)
    assert list(tmp_path.glob("nbody/*/val-seed0-chunk0.pt"))


def test_bad_options():
    with pytest.raises(UserError):
        eb.get_task("nbody", input_frame=40, target_frame=30)
    with pytest.raises(UserError, match="must be int"):
        eb.get_task("nbody", n_particles="five")
    with pytest.raises(UserError, match="unknown split"):
        eb.get_task("nbody").load("dev")
