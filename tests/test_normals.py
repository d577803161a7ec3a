"""The ``normals`` task: shapes, labels on real mesh faces, rotation settings, determinism."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

pytest.importorskip("trimesh")
pytest.importorskip("pybullet_data")

import equibench as eb  # noqa: E402
from equibench.datasets import normals as N  # noqa: E402
from equibench.datasets.base import cache_dir  # noqa: E402
from equibench.symmetry.fieldtypes import field_dim  # noqa: E402

SMALL = dict(n_points=64, k=8, train_size=6, val_size=3, test_size=5)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    old = os.environ.get("EQUIBENCH_CACHE")
    os.environ["EQUIBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("EQUIBENCH_CACHE")
    else:
        os.environ["EQUIBENCH_CACHE"] = old


def _task(**kw):
    return eb.get_task("normals", **{**SMALL, **kw})


def test_catalogue_and_mesh_split():
    cat = N.mesh_catalogue()
    assert len(cat) == len(N.candidate_meshes()) - 1 == 1008  # 999 random_urdfs + 3 named + 6 primitives
    assert "random_urdfs/168/168.obj" not in cat
    for name in ("bunny.obj", "duck.obj", "teddy2_VHACD_CHs.obj", "primitive:box", "primitive:torus"):
        assert name in cat
    pools = N.mesh_split(cat)
    allidx = np.concatenate(list(pools.values()))
    assert len(allidx) == len(set(allidx.tolist())) == len(cat)  # disjoint, by mesh, covering
    assert [len(pools[s]) for s in ("train", "val", "test")] == [706, 101, 201]


def test_shapes_types_and_knn_graph():
    task = _task()
    spec = task.spec
    assert (spec.group, spec.output, spec.level, spec.inputs) == ("O3", "1o", "node", {"pos": "point"})
    for split, size in (("train", 6), ("val", 3), ("test", 5)):
        data = task.load(split)
        assert len(data) == size
        for d in data:
            for name, t in spec.inputs.items():
                assert d[name].shape == (64, field_dim(t)) and d[name].dtype == torch.get_default_dtype()
            assert d.y.shape == (64, field_dim(spec.output))
            ei = d.edge_index
            assert ei.dtype == torch.long and ei.shape == (2, 64 * 8)
            assert ei.min() >= 0 and ei.max() < 64 and not (ei[0] == ei[1]).any()
            assert torch.equal(torch.bincount(ei[1], minlength=64), torch.full((64,), 8))
    # the sources of node i are exactly its 8 nearest other points (brute force)
    d = data[0]
    dist = torch.cdist(d.pos.double(), d.pos.double())
    dist.fill_diagonal_(float("inf"))
    kth = dist.sort(dim=1).values[:, 7]
    src, dst = d.edge_index
    assert (dist[dst, src] <= kth[dst] + 1e-12).all()
    # centred, unit RMS radius
    assert d.pos.double().mean(0).abs().max() < 1e-6
    assert abs(d.pos.double().pow(2).sum(1).mean().item() - 1.0) < 1e-5


def _check_on_faces(raw, i, pos, normal, R=np.eye(3)):
    """Points lie inside their (normalised, rotated) mesh triangle; normals are unit and ⟂ to it."""
    cat = N.mesh_catalogue()
    mesh = N.load_mesh(cat[raw["mesh"][i]])
    tri = (mesh.triangles[raw["face"][i]] - raw["centre"][i]) / raw["scale"][i] @ R.T  # [n, 3, 3]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1.0, atol=1e-6)
    for e in (e1, e2):
        cos = np.einsum("nk,nk->n", normal, e) / np.linalg.norm(e, axis=1)
        assert np.abs(cos).max() < 1e-5
    # barycentric coordinates of each point in its triangle
    rel = pos - tri[:, 0]
    assert np.abs(np.einsum("nk,nk->n", rel, normal)).max() < 1e-5  # on the face's plane
    G = np.stack([e1, e2], axis=2)  # [n, 3, 2]
    uv = np.stack([np.linalg.lstsq(G[k], rel[k], rcond=None)[0] for k in range(len(rel))])
    assert (uv >= -1e-6).all() and (uv.sum(1) <= 1 + 1e-6).all()


def test_labels_are_unit_face_normals():
    task = _task()
    raw = task.raw("test")
    data = task.load("test")
    for i in range(3):
        np.testing.assert_array_equal(data[i].y.numpy(), raw["normal"][i].astype(data[i].y.numpy().dtype))
        _check_on_faces(raw, i, raw["pos"][i], raw["normal"][i])
    # labels are the mesh's own face normals
    mesh = N.load_mesh(N.mesh_catalogue()[raw["mesh"][0]])
    np.testing.assert_array_equal(raw["normal"][0], mesh.face_normals[raw["face"][0]])


def test_rotation_settings():
    base = _task()
    raw_test, raw_train = base.raw("test"), base.raw("train")
    so3 = _task(rotation="none/SO3")
    # training data unrotated in none/SO3
    for a, b in zip(so3.load("train"), base.load("train")):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.y, b.y)
    Rs = so3.rotations("test")
    test = so3.load("test")
    for i, d in enumerate(test):
        R = Rs[i]
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert abs(np.linalg.det(R) - 1) < 1e-12 and np.abs(R - np.eye(3)).max() > 1e-2
        np.testing.assert_allclose(d.pos.double().numpy(), raw_test["pos"][i] @ R.T, atol=1e-6)
        np.testing.assert_allclose(d.y.double().numpy(), raw_test["normal"][i] @ R.T, atol=1e-6)
        assert not torch.allclose(d.pos, base.load("test")[i].pos, atol=1e-2)
        _check_on_faces(raw_test, i, d.pos.double().numpy(), d.y.double().numpy(), R)
    # O3/O3 rotates train and test, with reflections
    o3 = _task(rotation="O3/O3")
    dets = np.linalg.det(o3.rotations("train", size=64))
    np.testing.assert_allclose(np.abs(dets), 1.0, atol=1e-12)
    assert (dets < 0).any() and (dets > 0).any()
    R0 = o3.rotations("train")[0]
    d0 = o3.load("train")[0]
    np.testing.assert_allclose(d0.pos.double().numpy(), raw_train["pos"][0] @ R0.T, atol=1e-6)
    _check_on_faces(raw_train, 0, d0.pos.double().numpy(), d0.y.double().numpy(), R0)
    # the graph is the same in every setting
    assert torch.equal(d0.edge_index, base.load("train")[0].edge_index)
    with pytest.raises(eb.UserError):
        _task(rotation="SO3")


def test_determinism_cache_and_reuse():
    a = _task().load("val")
    b = _task().load("val")
    for x, y in zip(a, b):
        assert torch.equal(x.pos, y.pos) and torch.equal(x.y, y.y) and torch.equal(x.edge_index, y.edge_index)
    files = list((cache_dir() / "normals").glob("*/val-seed0-chunk0.pt"))
    assert len(files) == 1
    other = _task().load("val", seed=1)
    assert not torch.equal(other[0].pos, a[0].pos)
    # more clouds than meshes in the pool: meshes are reused with a different sample
    n_val = len(N.mesh_split(N.mesh_catalogue())["val"])
    raw = _task(val_size=n_val + 1).raw("val")
    assert raw["mesh"][n_val] == raw["mesh"][0] and len(set(raw["mesh"][:n_val].tolist())) == n_val
    assert not np.allclose(raw["pos"][n_val], raw["pos"][0])
    # noise moves the points, not the labels
    noisy = _task(noise=0.01).load("val")
    assert torch.equal(noisy[0].y, a[0].y)
    shift = (noisy[0].pos - a[0].pos).double()
    assert 0.005 < shift.std().item() < 0.02


def test_loss_and_metrics():
    task = _task()
    batch = Batch.from_data_list(task.load("train")[:3])
    y = batch.y.double()
    sign = torch.where(torch.arange(len(y)) % 2 == 0, 1.0, -1.0).double()[:, None]
    assert task.loss(3.0 * sign * y, batch).item() < 1e-6  # unoriented, scale-free
    m = task.metric_values(-2.0 * y, batch)
    assert set(m) == set(task.spec.metrics) and all(v.shape == (3,) for v in m.values())
    assert m["1-cos2"].abs().max() < 1e-6 and m["angle_deg"].max() < 0.05
    # a prediction at 60 degrees from every normal
    perp = torch.linalg.cross(y, torch.randn_like(y))
    perp = perp / perp.norm(dim=1, keepdim=True)
    pred = 0.5 * y + (3 ** 0.5 / 2) * perp
    m = task.metric_values(pred, batch)
    torch.testing.assert_close(m["1-cos2"], torch.full((3,), 0.75, dtype=torch.float64))
    torch.testing.assert_close(m["angle_deg"], torch.full((3,), 60.0, dtype=torch.float64))
    # zero prediction: loss 1, finite gradient
    zero = torch.zeros_like(y, requires_grad=True)
    loss = task.loss(zero, batch)
    loss.backward()
    assert loss.item() == 1.0 and torch.isfinite(zero.grad).all()


def test_graph_helpers_per_graph():
    from equibench.datasets.graphs import knn_graph, radius_graph

    g = torch.Generator().manual_seed(0)
    pos = torch.randn(30, 3, generator=g, dtype=torch.float64)
    pos[5] = pos[4]  # coincident points: still no self-loops, still k sources each
    batch = torch.tensor([0] * 12 + [1] * 18)
    ei = knn_graph(pos, 4, batch=batch)
    assert not (ei[0] == ei[1]).any() and (batch[ei[0]] == batch[ei[1]]).all()
    assert torch.equal(torch.bincount(ei[1], minlength=30), torch.full((30,), 4))
    assert torch.equal(ei[:, ei[1] >= 12] - 12, knn_graph(pos[12:], 4))
    er = radius_graph(pos, 1.0, batch=batch)
    assert (batch[er[0]] == batch[er[1]]).all() and not (er[0] == er[1]).any()
    assert ((pos[er[0]] - pos[er[1]]).norm(dim=1) <= 1.0).all()
    limited = radius_graph(pos, 10.0, batch=batch, max_num_neighbors=3)
    assert torch.bincount(limited[1], minlength=30).max() == 3
