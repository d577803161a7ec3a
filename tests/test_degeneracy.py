"""The degeneracy stress test (equibench/metrics/degeneracy.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch

import equibench as eb
from equibench.metrics.degeneracy import (DEFAULT_GAPS, TOP_EIGENVALUE, degeneracy_curve, robust_equivariance_error,
                                        symmetric_configurations, symmetric_curve, with_eigenvalues)
from equibench.metrics.equivariance import cast_batch
from equibench.symmetry.group3d import common_group
from equibench.symmetry.precision import default_dtype

MINE = ["frame_averaging", "pca_canonicalization", "canonicalization", "baseline"]
STAT_KEYS = ("rel_mean", "rel_median", "rel_max", "abs_max", "nonfinite")


@pytest.fixture(scope="module")
def nbody():
    task = eb.get_task("nbody", train_size=100, val_size=100, test_size=100)
    return task.spec, task.load("test")


def batch_of(data, n=6):
    return cast_batch(Batch.from_data_list(data[:n]), torch.float64)


def build(name, spec, **opts):
    method = eb.get_method(name, **{**type(eb.get_method(name)).smoke_options, **opts})
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        model = method.build(spec, 0)
    return method, model


def group_for(method, spec):
    return common_group(spec.group, method.group) if method.exact else spec.group


def covariance_eigenvalues(pos, index, B):
    t = torch.zeros(B, 3, dtype=pos.dtype).index_add_(0, index, pos) / torch.bincount(index)[:, None]
    c = pos - t[index]
    C = torch.zeros(B, 9, dtype=pos.dtype).index_add_(0, index, (c[:, :, None] * c[:, None, :]).reshape(-1, 9))
    return torch.linalg.eigvalsh(C.reshape(B, 3, 3)), t


@pytest.mark.parametrize("gap", [1.0, 1e-4, 0.0])
def test_with_eigenvalues_sets_the_spectrum_and_keeps_the_rest(nbody, gap):
    spec, data = nbody
    b = batch_of(data)
    lam0, t0 = covariance_eigenvalues(b.pos, b.batch, 6)
    new = with_eigenvalues(b, spec, gap)
    lam, t = covariance_eigenvalues(new.pos, new.batch, 6)
    target = torch.tensor([1.0, 1.0 + gap, TOP_EIGENVALUE], dtype=torch.float64)
    expected = target * lam0.sum(-1, keepdim=True) / target.sum()
    assert torch.allclose(lam, expected, rtol=0, atol=1e-12)
    assert torch.allclose(t, t0, atol=1e-14)  # centroid kept
    assert torch.equal(new.vel, b.vel) and torch.equal(new.charge, b.charge)  # only positions change
    raw = with_eigenvalues(b, spec, gap, keep_scale=False)
    assert torch.allclose(covariance_eigenvalues(raw.pos, raw.batch, 6)[0], target.expand(6, 3), atol=1e-12)


class NaNForGraphZero(nn.Module):
    """f(X) = positions (exactly E(3)-equivariant), NaN on graph 0's nodes."""

    def forward(self, batch):
        out = batch.pos.clone()
        out[batch.batch == 0] = float("nan")
        return out


def test_nonfinite_outputs_are_counted_and_excluded(nbody):
    spec, data = nbody
    b = batch_of(data, 4)
    res = robust_equivariance_error(NaNForGraphZero(), b, spec, n_samples=3)
    assert res["nonfinite"] == pytest.approx(1 / 4)  # 5 of 20 nodes, in f(X) and every f(gX)
    assert all(math.isfinite(res[k]) for k in STAT_KEYS) and res["rel_max"] < 1e-14
    rows = degeneracy_curve(NaNForGraphZero(), b, spec, gaps=(1.0, 0.0), n_samples=2)
    assert [r["gap"] for r in rows] == [1.0, 0.0] and all(r["nonfinite"] == pytest.approx(0.25) for r in rows)


def test_robust_error_equals_equivariance_error_when_finite(nbody):
    spec, data = nbody
    b = batch_of(data)
    _, model = build("baseline", spec)
    ours = robust_equivariance_error(model, b, spec, n_samples=3, seed=5)
    ref = eb.equivariance_error(model, b, spec, n_samples=3, seed=5)
    for k in ("rel_mean", "rel_median", "rel_max", "abs_max"):
        assert ours[k] == pytest.approx(ref[k], rel=1e-12)
    assert ours["nonfinite"] == 0.0


def test_frame_averaging_error_grows_as_the_gap_closes(nbody):
    spec, data = nbody
    method, model = build("frame_averaging", spec)
    rows = degeneracy_curve(model, batch_of(data), spec, group=group_for(method, spec))
    assert [r["gap"] for r in rows] == list(DEFAULT_GAPS)
    by_gap = {r["gap"]: r for r in rows}
    assert all(r["nonfinite"] == 0.0 and all(math.isfinite(r[k]) for k in STAT_KEYS) for r in rows)
    assert by_gap[1.0]["rel_max"] < 1e-12  # well-separated spectrum: exact
    assert by_gap[0.0]["rel_max"] > 1e4 * by_gap[1.0]["rel_max"]  # tie: the frame is ill-defined
    assert by_gap[1e-8]["rel_max"] > by_gap[1e-4]["rel_max"] > by_gap[1.0]["rel_max"]  # ~ eps / gap


@pytest.mark.parametrize("name", eb.list_methods())
def test_every_graph3d_method_gives_finite_curves(nbody, name):
    spec, data = nbody
    method = eb.get_method(name)
    if method.supports(spec) is not None:
        pytest.skip(method.supports(spec))
    method, model = build(name, spec)
    rows = degeneracy_curve(model, batch_of(data, 4), spec, gaps=(1.0, 1e-8, 0.0), n_samples=2,
                            group=group_for(method, spec))
    assert len(rows) == 3
    for r in rows:
        assert all(math.isfinite(r[k]) for k in STAT_KEYS), r
        if name in MINE:
            assert r["nonfinite"] == 0.0


def test_symmetric_configurations_are_symmetric():
    configs = symmetric_configurations(5)
    assert set(configs) == {"polygon", "pyramid", "tetrahedron", "mirror", "line", "coincident"}
    assert set(symmetric_configurations(6)) >= {"octahedron"} and "cube" in symmetric_configurations(9)

    def same_set(a, b):
        return torch.cdist(a, b).min(1).values.max() < 1e-12

    for name, p in configs.items():
        assert torch.allclose(p.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-14)
        assert p.pow(2).sum(-1).mean().sqrt().item() == pytest.approx(0.0 if name == "coincident" else 1.0)
    c, s = math.cos(2 * math.pi / 5), math.sin(2 * math.pi / 5)
    rot5 = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
    assert same_set(configs["polygon"] @ rot5.T, configs["polygon"])
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    assert same_set(configs["mirror"] @ mirror, configs["mirror"])
    assert same_set(-configs["line"], configs["line"])
    lam = torch.linalg.eigvalsh(configs["tetrahedron"].T @ configs["tetrahedron"])
    assert torch.allclose(lam, lam.mean().expand(3), atol=1e-12)  # isotropic: a triple tie


def test_symmetric_curve(nbody):
    spec, data = nbody
    b = batch_of(data, 4)
    results = {}
    for name in MINE:
        method, model = build(name, spec)
        rows = symmetric_curve(model, b, spec, n_samples=2, group=group_for(method, spec))
        assert all(r["nonfinite"] == 0.0 and all(math.isfinite(r[k]) for k in STAT_KEYS) for r in rows)
        results[name] = {r["config"]: r["rel_max"] for r in rows}
    assert set(results["baseline"]) == {"polygon", "pyramid", "tetrahedron", "mirror", "line", "coincident"}
    # the learned canonicaliser's frame comes from velocities too, which break the symmetry: exact
    assert max(results["canonicalization"].values()) < 1e-10
    # PCA frames: ill-defined for the polygon; FA survives a mirror (distinct eigenvalues, signs averaged)
    assert results["frame_averaging"]["polygon"] > 1e-6 and results["pca_canonicalization"]["polygon"] > 1e-6
    assert results["frame_averaging"]["mirror"] < 1e-10
