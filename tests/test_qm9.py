"""The ``qm9`` task: CSV parser against published values, shapes, radius graph, splits, loss."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

if importlib.util.find_spec("qm9pack") is None:
    pytest.skip("qm9pack not installed", allow_module_level=True)

import equibench as eb  # noqa: E402
from equibench.datasets import qm9 as Q  # noqa: E402
from equibench.symmetry.fieldtypes import field_dim  # noqa: E402

SMALL = dict(train_size=40, val_size=10, test_size=20)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    old = os.environ.get("EQUIBENCH_CACHE")
    os.environ["EQUIBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("EQUIBENCH_CACHE")
    else:
        os.environ["EQUIBENCH_CACHE"] = old


def test_parser_reproduces_published_values():
    mols = Q.molecules()
    assert Q.cache_path().exists()  # parsed once into the cache
    assert mols["index"].numel() == Q.N_MOLECULES and mols["ptr"][-1] == mols["z"].numel() == len(mols["pos"])
    assert mols["index"][:3].tolist() == [1, 2, 3]
    # molecule 1 is methane: C first, then four H
    assert int(mols["ptr"][1]) == 5
    assert [Q.ELEMENTS[k] for k in mols["z"][:5].tolist()] == ["C", "H", "H", "H", "H"]
    np.testing.assert_allclose(mols["pos"][0].numpy(), [-0.0126981359, 1.0858041578, 0.0080009958], atol=1e-6)
    # C-H bonds of methane are 1.09 A
    ch = (mols["pos"][1:5] - mols["pos"][0]).norm(dim=1)
    assert ((ch - 1.0919).abs() < 2e-3).all()
    props = dict(zip(Q.COLUMNS, mols["props"][0].tolist()))
    assert props["HOMO_au"] == -0.3877 and props["LUMO_au"] == 0.1171 and props["HOMO_LUMO_gap_au"] == 0.5048
    assert props["InternalEnergy_0K_au"] == -40.47893
    # molecule 2 is ammonia, molecule 3 water
    assert [Q.ELEMENTS[k] for k in mols["z"][5:12].tolist()] == ["N", "H", "H", "H", "O", "H", "H"]
    # targets in reported units
    assert Q.target_values("gap", mols)[0] == pytest.approx(0.5048 * 27.211386245988)
    assert Q.target_values("u0_atom", mols)[0] == pytest.approx(-40.47893 * 27.211386245988 / 5)
    assert Q.target_values("u0_atomization", mols)[0] == pytest.approx(-17.1722, abs=1e-3)  # PyG's U0_atom, CH4
    # columns are not shifted: gap = LUMO - HOMO up to the CSV's 4 decimals, everywhere
    p = mols["props"].numpy()
    gap, homo, lumo = (p[:, Q.COLUMNS.index(c)] for c in ("HOMO_LUMO_gap_au", "HOMO_au", "LUMO_au"))
    assert np.abs(gap - (lumo - homo)).max() <= 1.01e-4


def test_shapes_types_and_radius_graph():
    task = eb.get_task("qm9", **SMALL)
    spec = task.spec
    assert (spec.group, spec.output, spec.level) == ("E3", "0e", "graph")
    assert spec.inputs == {"pos": "point", "x": "5x0e"}
    for split, size in SMALL.items():
        data = task.load(split.replace("_size", ""))
        assert len(data) == size
        for d in data:
            n = d.pos.shape[0]
            for name, t in spec.inputs.items():
                assert d[name].shape == (n, field_dim(t)) and d[name].dtype == torch.get_default_dtype()
            assert torch.equal(d.x.sum(1), torch.ones(n))
            assert d.y.shape == (1, field_dim(spec.output))
            ei = d.edge_index
            assert ei.dtype == torch.long and ei.shape[0] == 2 and ei.min() >= 0 and ei.max() < n
            # exactly the pairs i != j within the cutoff, both directions
            dist = torch.cdist(d.pos.double(), d.pos.double())
            want = (dist <= 5.0) & ~torch.eye(n, dtype=torch.bool)
            got = torch.zeros(n, n, dtype=torch.bool)
            got[ei[1], ei[0]] = True
            assert torch.equal(got, want) and ei.shape[1] == int(want.sum())
    small = eb.get_task("qm9", cutoff=2.0, **SMALL).load("test")
    assert sum(d.num_edges for d in small) < sum(d.num_edges for d in data)
    with pytest.raises(eb.UserError):
        eb.get_task("qm9", target="polarizability_tensor")


def test_splits_disjoint_prefix_and_deterministic():
    task = eb.get_task("qm9", **SMALL)
    ids = {s: task.molecule_ids(s) for s in ("train", "val", "test")}
    allids = np.concatenate(list(ids.values()))
    assert len(set(allids.tolist())) == len(allids)
    np.testing.assert_array_equal(task.molecule_ids("test", size=40)[:20], ids["test"])  # sizes are prefixes
    assert not np.array_equal(task.molecule_ids("test", seed=1), ids["test"])
    # every seed draws from the same pools: another seed's training draw never meets seed 0's test split
    pools = {s: set(task.molecule_ids(s, size=len(Q.molecules()["index"]) // 10).tolist()) for s in ("val", "test")}
    for seed in (1, 2):
        train = task.molecule_ids("train", seed=seed)
        assert not set(train.tolist()) & (pools["val"] | pools["test"]) and len(set(train.tolist())) == len(train)
        assert set(task.molecule_ids("val", seed=seed).tolist()) <= pools["val"]
    assert not np.array_equal(task.molecule_ids("train", seed=1), task.molecule_ids("train", seed=2))
    a = task.load("val")
    b = eb.get_task("qm9", **SMALL).load("val")
    for x, y in zip(a, b):
        for k in ("pos", "x", "y", "edge_index"):
            assert torch.equal(x[k], y[k])
    # the stored target is the CSV value of that molecule
    y_all = Q.target_values("gap", Q.molecules())
    assert [d.y.item() for d in a] == pytest.approx(y_all[ids["val"]].tolist(), rel=1e-6)


def test_standardised_loss_and_mae():
    task = eb.get_task("qm9", target="homo", **SMALL)
    train = task.load("train")
    y_train = torch.tensor([d.y.item() for d in train], dtype=torch.float64)
    mean, std = task.target_stats(0)
    assert mean == pytest.approx(y_train.mean().item(), rel=1e-6)
    assert std == pytest.approx(y_train.std(unbiased=False).item(), rel=1e-5)
    assert task.provenance()["unit"] == "eV" and task.provenance()["target_mean"] == mean
    batch = Batch.from_data_list(task.load("test")[:8])
    y = batch.y.double()
    exact = (y - mean) / std
    assert task.loss(exact, batch).item() < 1e-10
    m = task.metric_values(exact, batch)
    assert set(m) == {"mae"} and m["mae"].shape == (8,) and m["mae"].max() < 1e-5
    m0 = task.metric_values(torch.zeros(8, 1, dtype=torch.float64), batch)["mae"]
    torch.testing.assert_close(m0, (mean - y.reshape(-1)).abs())
    # loading another split, of any seed, does not change the statistics; another seed's training split does
    task.load("val", size=5)
    task.load("val", size=5, seed=1)
    task.load("test", size=5, seed=1)
    assert task.target_stats(0) == (mean, std) and task.provenance()["target_mean"] == mean
    task.load("train", size=5, seed=1)
    assert task.provenance()["target_mean"] != mean and task.provenance()["stats_seed"] == 1
