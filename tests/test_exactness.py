"""Exactness audited on real data: every registered method, on every task it supports, is held to
its own claim (``Method.exact_on(spec)``) on a few REAL test graphs of that task in float64:
relative equivariance error < 1e-10 for the group the runner measures with
(``common_group(task.group, method.group)`` on graph3d, the task's group on image2d), with O(3)
elements including reflections, translations and node permutations.

The graphs are chosen to contain the inputs where frame methods degenerate:

* ``normals`` (128 points, k = 8): clouds 10, 15, 27, 29 and 38 of the test split hold exactly
  planar k-NN neighbourhoods (points sampled on one flat mesh face; checked below), cloud 25 a
  neighbourhood flat to 1e-8; 0 and 1 are ordinary clouds;
* ``qm9``: test molecules 0-3, plus 240, 1275 and 1409 (mirror-symmetric to float32 rounding:
  nodes on the mirror plane have no local handedness, a reflection-equivariant frame must take it
  from elsewhere) and 2263 (planar to float32 rounding);
* ``nbody``, ``md`` (thermal ethanol, a short trajectory), ``digits`` (scikit-learn 8x8): the
  first test graphs.

A method that cannot be exact somewhere must not claim it there (``inexact_reason`` says why) and
must report how often it degenerates (``frame_*`` / ``pca_*`` extra metrics, declared in the
catalogue). Runtime: ~20 s on one core with warm data caches.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter

import equibench as eb
from equibench.benches.taskrun import build_model
from equibench.metrics import catalogue
from equibench.metrics.equivariance import cast_batch
from equibench.symmetry.group3d import common_group, sample_rotations
from equibench.symmetry.precision import default_dtype

LIMIT = 1e-10
F64 = torch.float64

TASKS: dict[str, tuple[dict, list[int] | None]] = {
    "nbody": (dict(train_size=4, val_size=2, test_size=8), None),
    "normals": (dict(n_points=128, k=8, train_size=4, val_size=2, test_size=40), [0, 1, 10, 15, 25, 27, 29, 38]),
    "qm9": (dict(train_size=4, val_size=2, test_size=2264), [0, 1, 2, 3, 240, 1275, 1409, 2263]),
    "md": (dict(equilibration=10, stride=2, train_size=2, val_size=2, test_size=4), None),
    "digits": (dict(source="sklearn", train_size=4, val_size=2, test_size=8), None),
}
PLANAR_NORMALS = [10, 15, 27, 29, 38]  # positions in the normals test split (see module docstring)
#: qm9 test molecules with a node near a rotation axis of the whole molecule (to float32 rounding):
#: the learned canonicaliser measures up to 1e-10 there at init (kept out of the registry-wide audit)
NEAR_AXIS_QM9 = [344, 1750]

#: option variants audited beside each method's defaults (SO(3)-only frames, PCA, nearest frames)
VARIANTS = {"tensor_frames": [{"so3": True}, {"frames": "nearest"}],
            "local_canonicalization": [{"so3": True}],
            "pca_canonicalization": [{"group": "SO3"}]}


@functools.cache
def task_of(name: str):
    return eb.get_task(name, **TASKS[name][0])


@functools.cache
def real_batch(name: str) -> Batch:
    data = task_of(name).load("test")
    select = TASKS[name][1]
    return Batch.from_data_list([data[i] for i in select] if select else data[:8])


def small(name: str, **opts):
    return eb.get_method(name, **{**type(eb.get_method(name)).smoke_options, **opts})


def cases() -> list:
    """(method, options, task) for every task each method takes; a method that takes none here
    (its library is not installed in this environment) is one case skipped with its reason."""
    out = []
    for name in eb.list_methods():
        for opts in [{}, *VARIANTS.get(name, [])]:
            method = small(name, **opts)
            reasons = {task: method.supports(task_of(task).spec) for task in TASKS}
            for task, reason in reasons.items():
                if reason is None:
                    tag = ",".join(f"{k}={v}" for k, v in opts.items())
                    out.append(pytest.param(name, opts, task, id=f"{name}[{tag}]-{task}" if tag else f"{name}-{task}"))
            if not opts and None not in reasons.values() and len(set(reasons.values())) == 1:
                out.append(pytest.param(name, opts, None, id=name,
                                        marks=pytest.mark.skip(reason=next(iter(reasons.values())))))
    return out


def measure(method, task, batch: Batch, seed: int = 0) -> float:
    spec = task.spec
    group = common_group(spec.group, method.group) if spec.domain == "graph3d" else spec.group
    model = build_model(method, spec, seed, F64)
    return eb.equivariance_error(model, batch, spec, n_samples=4, dtype=F64, group=group)["rel_max"]


# ---- the audit -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,opts,task_name", cases())
def test_claimed_exactness_holds_on_real_test_data(name, opts, task_name):
    method = small(name, **opts)
    task = task_of(task_name)
    claim, reason = method.exact_on(task.spec), method.inexact_reason(task.spec)
    assert isinstance(claim, bool) and claim == (reason is None)
    if not claim:
        assert isinstance(reason, str) and reason
        return
    rel = measure(method, task, real_batch(task_name))
    assert rel < LIMIT, f"{name}{opts or ''} claims exactness on {task_name} but measures rel_max {rel:.2e}"


def test_the_selection_holds_what_it_should():
    """The normals clouds named in PLANAR_NORMALS have exactly planar k-NN neighbourhoods."""
    data = task_of("normals").load("test")
    for i in PLANAR_NORMALS:
        d = data[i]
        src, dst = d.edge_index
        vec = (d.pos[src] - d.pos[dst]).double()
        cov = scatter(vec[:, :, None] * vec[:, None, :], dst, dim=0, dim_size=d.num_nodes)
        ev = torch.linalg.eigvalsh(cov)
        assert (ev[:, 0] <= 1e-20 * ev[:, 2]).any(), i


# ---- tensor frames: local vs wide handedness ---------------------------------------------------
@pytest.mark.parametrize("name", ["tensor_frames", "local_canonicalization"])
@pytest.mark.parametrize("task_name", ["normals", "qm9"])
def test_local_handedness_is_not_exact_and_does_not_claim_it(name, task_name):
    """The paper's local handedness breaks reflection equivariance on planar neighbourhoods (and on
    mirror-plane atoms); it claims no O(3) exactness, and its frame report counts the nodes. On
    qm9 the mirror-plane atoms carry handedness signals of ~1e-9 (float32-rounded coordinates),
    below the local threshold 1e-6 but robust in float64: "wide" decides them (threshold 1e-11)."""
    task, batch = task_of(task_name), real_batch(task_name)
    local, wide = small(name, handedness="local"), small(name)
    assert not local.exact_on(task.spec) and "planar" in local.inexact_reason(task.spec)
    assert not local.exact and wide.exact and wide.exact_on(task.spec)
    assert measure(local, task, batch) > 100 * LIMIT
    model = build_model(local, task.spec, 0, F64)
    report = local.extra_metrics(model, cast_batch(batch, F64), model(cast_batch(batch, F64)))
    assert report["frame_degenerate_share"] > 0
    model = build_model(wide, task.spec, 0, F64)
    report = wide.extra_metrics(model, cast_batch(batch, F64), model(cast_batch(batch, F64)))
    assert report["frame_degenerate_share"] == 0
    if task_name == "normals":  # exactly planar: decided by the graph-wide context
        assert report["frame_widened_share"] > 0
    for key, value in report.items():
        assert catalogue.get_metric(catalogue.test_metric(key)).family == "test" and isinstance(value, float)


@pytest.mark.parametrize("name", ["tensor_frames", "local_canonicalization"])
def test_near_axis_molecules_take_their_frame_from_the_graph(name):
    """Near a rotation axis of the whole molecule (to float32 rounding) the learned axis candidates
    are nearly collinear; the graph-wide candidates (second moments) give a well-conditioned frame."""
    task = task_of("qm9")
    data = task.load("test")
    batch = Batch.from_data_list([data[i] for i in NEAR_AXIS_QM9])
    for opts in ({}, {"so3": True}):
        method = small(name, **opts)
        assert measure(method, task, batch) < LIMIT
        model = build_model(method, task.spec, 0, F64)
        report = model.frame_report(cast_batch(batch, F64))
        assert report["frame_widened_share"] > 0 and report["frame_degenerate_share"] == 0


def apex_batch(perturbation: float) -> Batch:
    """An apex over an equilateral triangle (C3v about the z axis through the apex), complete graph;
    one base point moved by ``perturbation`` along x."""
    pos = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [-0.5, 0.75**0.5, 0.0], [-0.5, -(0.75**0.5), 0.0]], dtype=F64)
    pos[1, 0] += perturbation
    src, dst = (~torch.eye(4, dtype=torch.bool)).nonzero().T
    return Batch.from_data_list([Data(pos=pos, edge_index=torch.stack([src, dst]), y=torch.zeros(4, 3, dtype=F64))])


def test_frames_on_a_symmetry_axis_are_weak_or_degenerate():
    """On the axis of an exactly C3v input no equivariant frame exists (frame_degenerate_share > 0);
    1e-8 off symmetry one exists but is ill-conditioned: kept (equivariant, rounding amplified
    ~1e8, frame_weak_share > 0) rather than replaced by the non-equivariant global axes."""
    task = task_of("normals")
    method = small("tensor_frames", so3=True)
    model = build_model(method, task.spec, 0, F64)
    exact, near = apex_batch(0.0), apex_batch(1e-8)
    assert model.frame_report(exact)["frame_degenerate_share"] > 0
    report = model.frame_report(near)
    assert report["frame_weak_share"] > 0 and report["frame_degenerate_share"] == 0
    assert measure(method, task, near) < 1e-5


def planar_batch(n_graphs: int = 3, n: int = 12, k: int = 4, seed: int = 0, vel: bool = False) -> Batch:
    """Exactly planar clouds (z = 0, then rotated) with kNN graphs."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n_graphs):
        pos = torch.randn(n, 3, generator=g, dtype=F64)
        pos[:, 2] = 0
        Q = sample_rotations(1, True, g)[0]
        pos = pos @ Q.T
        d = torch.cdist(pos, pos) + torch.eye(n, dtype=F64) * 1e9
        src = d.topk(k, largest=False).indices.reshape(-1)
        dst = torch.arange(n).repeat_interleave(k)
        item = Data(pos=pos, edge_index=torch.stack([src, dst]), y=torch.zeros(n, 3, dtype=F64))
        if vel:
            v = torch.randn(n, 3, generator=g, dtype=F64)
            v[:, 2] = 0
            item.vel, item.charge = v @ Q.T, torch.ones(n, 1, dtype=F64)
            item.edge_attr = torch.ones(src.numel(), 1, dtype=F64)
        data.append(item)
    return Batch.from_data_list(data)


@pytest.mark.parametrize("name", ["tensor_frames", "local_canonicalization"])
@pytest.mark.parametrize("task_name", ["normals", "nbody"])
def test_planar_inputs_are_projected_on_the_mirror_fixed_subspace(name, task_name):
    """A wholly planar, reflection-symmetric input has no handedness anywhere: an O(3)-equivariant
    vector (or point) output must lie in the plane. "wide" projects on it and stays exact; "local"
    does not."""
    task = task_of(task_name)
    batch = planar_batch(vel=task_name == "nbody")
    wide = small(name)
    model = build_model(wide, task.spec, 0, F64)
    with default_dtype(F64):
        out = model(batch)
        info = model.compute_frames(batch)
    assert bool(info.planar.all()) and not bool(info.degenerate.any())
    normal = info.normal[batch.batch]
    offset = 0 if task_name == "normals" else scatter(batch.pos, batch.batch, dim=0, reduce="mean")[batch.batch]
    assert ((out - offset) * normal).sum(-1).abs().max() < 1e-12  # in the plane
    assert measure(wide, task, batch) < LIMIT
    assert measure(small(name, handedness="local"), task, batch) > 1e-6


def test_planar_input_with_an_out_of_plane_vector_is_not_symmetrised():
    """Planar positions but velocities off the plane: the input is not mirror-symmetric; the
    velocities decide the handedness and nothing is projected."""
    task = task_of("nbody")
    batch = planar_batch(vel=True)
    batch.vel = batch.vel + 0.3 * torch.randn(batch.vel.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    method = small("tensor_frames")
    model = build_model(method, task.spec, 0, F64)
    with default_dtype(F64):
        info = model.compute_frames(batch)
    assert not bool(info.planar.any()) and not bool(info.degenerate.any()) and bool(info.status.widened.any())
    assert measure(method, task, batch) < LIMIT


def test_scalar_outputs_need_no_projection_and_mirror_atoms_follow_the_rest():
    """qm9 (invariant output): on mirror-symmetric molecules the nodes on the mirror plane take the
    handedness the rest of the molecule decided (frame_degenerate_share 0), so the prediction is
    exactly invariant, where the local variant is not."""
    task = task_of("qm9")
    data = task.load("test")
    batch = Batch.from_data_list([data[i] for i in (240, 1275, 1409)])
    for name in ("tensor_frames", "local_canonicalization"):
        assert measure(small(name), task, batch) < LIMIT


# ---- PCA ---------------------------------------------------------------------------------------
def test_pca_degeneracy_metrics():
    method = small("pca_canonicalization")
    task = task_of("nbody")
    model = build_model(method, task.spec, 0, F64)
    b = cast_batch(real_batch("nbody"), F64)
    report = method.extra_metrics(model, b, model(b))
    assert report == {"pca_degenerate_share": 0.0, "pca_tie_share": 0.0, "pca_sign_share": 0.0}
    for key in report:
        assert catalogue.get_metric(catalogue.test_metric(key)).direction in ("lower", None)
    # a regular tetrahedron (triple tie), a square (tie + zero skew) and a planar generic cloud
    # (undefined sign along the normal: O(3) only)
    tet = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=F64)
    square = torch.tensor([[1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0]], dtype=F64)
    flat = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    flat[:, 2] = 0
    sym = b.clone()
    sym.pos = b.pos.clone()
    for gi, p in enumerate((tet, square, flat)):
        sym.pos[(b.batch == gi).nonzero().flatten()[:4]] = p
        sym.pos[(b.batch == gi).nonzero().flatten()[4:]] = p.mean(0)  # the fifth particle at the centroid
    report = model.degeneracy(sym)
    assert report["pca_tie_share"] == pytest.approx(2 / 8)
    assert report["pca_sign_share"] >= 3 / 8 - 1e-12
    so3 = build_model(small("pca_canonicalization", group="SO3"), task.spec, 0, F64)
    assert so3.degeneracy(sym)["pca_sign_share"] < report["pca_sign_share"]  # the normal's sign is not used


# ---- the claim interface -------------------------------------------------------------------------
def test_every_method_states_a_claim_per_task():
    for name in eb.list_methods():
        method = eb.get_method(name)
        for task in TASKS:
            spec = task_of(task).spec
            if method.supports(spec) is not None:
                continue
            claim = method.exact_on(spec)
            assert claim == (method.inexact_reason(spec) is None)
            assert claim == method.is_exact(spec.domain) or not claim


def test_disp_rel_is_reported_for_point_outputs():
    task = task_of("nbody")
    model = build_model(small("tensor_frames"), task.spec, 0, F64)
    res = eb.equivariance_error(model, real_batch("nbody"), task.spec, n_samples=2, dtype=F64, group="E3")
    assert res["disp_rel_max"] < LIMIT and not math.isnan(res["disp_rel_mean"])
    assert res["disp_rel_max"] >= res["rel_max"] * 0.0  # present and finite
