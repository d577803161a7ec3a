"""The ``md`` task (Langevin MD with GFN2-xTB) and the energy -> forces helper."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

import equibench as eb
from equibench.methods.blocks.energy_forces import ForcesFromEnergy, energy_spec, energy_to_forces
from equibench.symmetry.fieldtypes import field_dim
from equibench.symmetry.precision import default_dtype

TINY = dict(train_size=6, val_size=3, test_size=4, stride=2, equilibration=10)


@pytest.fixture(scope="module")
def md():
    pytest.importorskip("tblite")
    pytest.importorskip("ase")
    from equibench.datasets import md as md_module
    return md_module


@pytest.fixture(scope="module")
def cache(md, tmp_path_factory):
    """One tiny generated data set per module, in a private cache directory."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("md_cache")
        mp.setenv("EQUIBENCH_CACHE", str(path))
        task = eb.get_task("md", **TINY)
        data = {split: task.load(split) for split in ("train", "val", "test")}
        with default_dtype(torch.float64):
            data64 = task.load("train")
        yield {"path": path, "task": task, "data": data, "data64": data64, "e_ref": task.reference()["energy"]}


@pytest.fixture
def in_cache(cache, monkeypatch):
    monkeypatch.setenv("EQUIBENCH_CACHE", str(cache["path"]))
    return cache


def _no_simulation(*args, **kwargs):
    raise AssertionError("simulate() called although the data are cached")


def test_forces_task_types_and_shapes(in_cache):
    task, data = in_cache["task"], in_cache["data"]
    spec = task.spec
    assert (spec.domain, spec.group, spec.level, spec.output) == ("graph3d", "E3", "node", "1o")
    assert spec.inputs == {"pos": "point", "x": "3x0e"} and spec.metrics == ("force_mae",)
    assert [len(data[s]) for s in ("train", "val", "test")] == [6, 3, 4]
    for d in data["train"]:
        assert d.pos.shape == (9, 3) and d.y.shape == (9, 3) and d.energy.shape == (1,)
        assert d.x.shape == (9, field_dim(spec.inputs["x"]))
        assert torch.equal(d.x.sum(-1), torch.ones(9))  # one-hot over (H, C, O)
        assert torch.equal(d.x.argmax(-1), torch.tensor([{1: 0, 6: 1, 8: 2}[int(z)] for z in d.z]))
        assert d.edge_index.shape == (2, 72) and bool((d.edge_index[0] != d.edge_index[1]).all())
    batch = Batch.from_data_list(data["test"])
    assert batch.y.shape == (4 * 9, field_dim(spec.output)) and batch.energy.shape == (4,)
    # energies are relative to the relaxed geometry: positive, about (3N - 6)/2 kT to 3N kT
    energies = torch.cat([d.energy for d in data["train"]])
    assert bool((energies > 0).all()) and bool((energies < 3.0).all())
    assert 0.2 < torch.cat([d.y for d in data["train"]]).std().item() < 5.0  # eV/A
    vals = task.metric_values(batch.y + 0.25, batch)
    assert set(vals) == {"force_mae"} and vals["force_mae"].shape == (4,)
    assert torch.allclose(vals["force_mae"], torch.full((4,), 0.25))
    prov = task.provenance()
    for key in ("tblite", "ase", "molecule", "temperature_K", "timestep_fs", "friction_per_fs",
                "stride", "xtb_method"):
        assert key in prov
    assert prov["xtb_method"] == "GFN2-xTB" and prov["energy_reference_eV"] == in_cache["e_ref"]


def test_energy_variant_reuses_the_trajectory(in_cache, md, monkeypatch):
    monkeypatch.setattr(md, "simulate", _no_simulation)
    task = eb.get_task("md", target="energy", **TINY)
    spec = task.spec
    assert (spec.level, spec.output, spec.metrics) == ("graph", "0e", ("energy_mae",))
    data = task.load("test")
    for d, f in zip(data, in_cache["data"]["test"]):
        assert d.y.shape == (1, 1) and torch.equal(d.y.reshape(1), f.energy)
        assert torch.equal(d.pos, f.pos)
    batch = Batch.from_data_list(data)
    assert batch.y.shape == (4, field_dim(spec.output))
    vals = task.metric_values(batch.y - 0.1, batch)
    assert vals["energy_mae"].shape == (4,) and torch.allclose(vals["energy_mae"], torch.full((4,), 0.1))


def test_forces_are_the_negative_gradient_of_the_energy(in_cache, md):
    d = in_cache["data64"][3]
    z, pos = d.z.numpy(), d.pos.numpy().copy()
    energy, forces = md.xtb_energy_forces(z, pos)
    # the stored values are what a fresh single point gives (up to SCF convergence)
    assert abs(energy - in_cache["e_ref"] - d.energy.item()) < 1e-6
    assert np.abs(forces - d.y.numpy()).max() < 1e-4
    h = 1e-3
    for atom, k in ((0, 0), (2, 1), (5, 2)):  # a C, the O and an H
        plus, minus = pos.copy(), pos.copy()
        plus[atom, k] += h
        minus[atom, k] -= h
        fd = -(md.xtb_energy_forces(z, plus)[0] - md.xtb_energy_forces(z, minus)[0]) / (2 * h)
        assert abs(fd - forces[atom, k]) < 1e-4, (atom, k, fd, forces[atom, k])


@pytest.mark.parametrize("reflect", [False, True])
def test_rotation_rotates_forces_and_keeps_energy(in_cache, md, reflect):
    d = in_cache["data64"][1]
    z, pos = d.z.numpy(), d.pos.numpy()
    q, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((3, 3)))
    R = q * np.sign(np.linalg.det(q)) * (-1.0 if reflect else 1.0)
    assert np.isclose(np.linalg.det(R), -1.0 if reflect else 1.0)
    energy, forces = md.xtb_energy_forces(z, pos)
    energy_r, forces_r = md.xtb_energy_forces(z, pos @ R.T + np.array([0.3, -1.0, 2.0]))
    assert abs(energy_r - energy) < 1e-6
    assert np.abs(forces_r - forces @ R.T).max() < 1e-6


def test_determinism_prefix_and_cache(in_cache, md, monkeypatch, tmp_path):
    train = in_cache["data"]["train"]
    monkeypatch.setattr(md, "simulate", _no_simulation)  # everything below 'fresh' is cached
    task = in_cache["task"]
    again = task.load("train")
    assert all(torch.equal(a.pos, b.pos) and torch.equal(a.y, b.y) for a, b in zip(train, again))
    prefix = task.load("train", size=4)
    assert len(prefix) == 4 and all(torch.equal(a.pos, b.pos) for a, b in zip(train, prefix))
    # splits are independent trajectories
    test = in_cache["data"]["test"]
    assert not any(torch.allclose(a.pos, b.pos, atol=1e-2) for a, b in zip(train, test))
    # a fresh cache regenerates bit for bit; a short run is a prefix of a longer one
    monkeypatch.undo()
    monkeypatch.setenv("EQUIBENCH_CACHE", str(tmp_path))
    fresh = eb.get_task("md", **TINY)
    short = fresh.load("train", size=3)
    full = fresh.load("train")
    for a, b in zip(train, full):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.y, b.y) and torch.equal(a.energy, b.energy)
    assert all(torch.equal(a.pos, b.pos) for a, b in zip(short, full))
    other_seed = fresh.load("train", size=2, seed=1)
    assert not torch.allclose(other_seed[0].pos, train[0].pos, atol=1e-2)


def test_bad_options_and_molecules(md):
    with pytest.raises(eb.UserError, match="target"):
        eb.get_task("md", target="dipole")
    with pytest.raises(eb.UserError, match="unknown molecule"):
        eb.get_task("md", molecule="unobtainium")
    with pytest.raises(eb.UserError):
        eb.get_task("md", stride=0)
    aspirin = eb.get_task("md", molecule="aspirin")  # built-in table; the spec needs no xTB run
    assert aspirin.atoms0.get_chemical_formula() == "C9H8O4" and aspirin.spec.inputs["x"] == "3x0e"
    assert eb.get_task("md", molecule="CH3OH").spec.inputs["x"] == "3x0e"


# --- forces from an energy model --------------------------------------------------------------
class PairPotential(torch.nn.Module):
    """E_b = sum over unordered pairs (i, j) of graph b of k (r_ij - r0)^2 (edges in both directions)."""

    def __init__(self, k: float = 0.7, r0: float = 1.2) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=torch.float64))
        self.r0 = r0

    def forward(self, batch: Batch) -> torch.Tensor:
        src, dst = batch.edge_index
        r = (batch.pos[src] - batch.pos[dst]).norm(dim=-1)
        pair = 0.5 * self.k * (r - self.r0) ** 2  # each pair appears twice
        return torch.zeros(int(batch.num_graphs), dtype=r.dtype).index_add(0, batch.batch[src], pair)[:, None]


def _random_batch(sizes=(4, 5, 3), seed=0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    graphs = []
    for n in sizes:
        src, dst = torch.nonzero(~torch.eye(n, dtype=torch.bool), as_tuple=True)
        graphs.append(Data(pos=torch.randn(n, 3, generator=gen, dtype=torch.float64) * 1.5,
                           edge_index=torch.stack([src, dst])))
    return Batch.from_data_list(graphs)


def _analytic_forces(model: PairPotential, batch: Batch) -> torch.Tensor:
    k, r0 = model.k.detach(), model.r0
    forces = torch.zeros_like(batch.pos)
    src, dst = batch.edge_index
    for i, j in zip(dst.tolist(), src.tolist()):  # F_i = -sum_j 2k (r_ij - r0) (x_i - x_j) / r_ij
        diff = batch.pos[i] - batch.pos[j]
        r = diff.norm()
        forces[i] -= 2 * k * (r - r0) * diff / r
    return forces


def test_energy_to_forces_matches_a_pair_potential():
    model, batch = PairPotential(), _random_batch()
    expected = _analytic_forces(model, batch)
    energy, forces = energy_to_forces(model, batch, training=False)
    assert energy.shape == (3,) and forces.shape == batch.pos.shape
    assert (forces - expected).abs().max().item() < 1e-12
    assert not forces.requires_grad and not batch.pos.requires_grad  # the batch is untouched
    with torch.no_grad():  # eval-time use, e.g. inside equivariance_error
        assert torch.allclose(energy_to_forces(model, batch)[1], expected, atol=1e-12, rtol=0)
    # training: the force loss reaches the parameters (F is linear in k, so d(sum F c)/dk = sum F c / k)
    c = torch.randn_like(forces)
    _, forces_t = energy_to_forces(model, batch, training=True)
    loss = (forces_t * c).sum()
    loss.backward()
    assert torch.allclose(model.k.grad, loss.detach() / model.k.detach(), rtol=1e-10, atol=0)
    # the wrapper module and the spec helper
    wrapped = ForcesFromEnergy(model).eval()
    assert torch.allclose(wrapped(batch), expected, atol=1e-12, rtol=0)


def test_forces_from_an_invariant_energy_are_equivariant(in_cache):
    spec = in_cache["task"].spec
    assert (energy_spec(spec).output, energy_spec(spec).level) == ("0e", "graph")
    batch = Batch.from_data_list(in_cache["data64"])
    model = ForcesFromEnergy(PairPotential())
    err = eb.equivariance_error(model, batch, spec, n_samples=4, dtype=torch.float64)
    assert err["rel_max"] < 1e-10
    assert torch.allclose(model.eval()(batch), _analytic_forces(model.energy_model, batch), atol=1e-12, rtol=0)
