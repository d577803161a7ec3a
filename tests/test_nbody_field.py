"""``nbody_field`` (n-body in a constant field along e_z): the data, its remaining group O(2)_z,
the broken-group metrics and the shared ``field_input`` option of the wrapping methods."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import broken_group, build_model, run_one
from equibench.benches.training import TrainConfig, evaluate, train
from equibench.core.errors import UserError
from equibench.core.spec import RunSpec
from equibench.datasets.nbody import integrate
from equibench.metrics import catalogue
from equibench.metrics.equivariance import cast_batch, lie_derivative
from equibench.symmetry.group3d import (
    act_on_batch,
    common_group,
    group_flags_axial,
    lie_generators,
    sample_axial,
    sample_element,
)

F64 = torch.float64
#: small, fast data: 400 leapfrog steps (input frame 3, target frame 4)
SMALL = dict(input_frame=3, target_frame=4, train_size=8, val_size=4, test_size=16)
EXACT_WRAPPERS = ["frame_averaging", "canonicalization", "pca_canonicalization", "tensor_frames",
                  "local_canonicalization", "fa_gnn"]


def small_method(name: str, **opts):
    return eb.get_method(name, **{**type(eb.get_method(name)).smoke_options, **opts})


@pytest.fixture(scope="module")
def task():
    return eb.get_task("nbody_field", field=1.0, **SMALL)


@pytest.fixture(scope="module")
def batch(task) -> Batch:
    return Batch.from_data_list(task.load("test")[:6])


# ---- data --------------------------------------------------------------------------------------
def test_zero_field_is_nbody():
    a = eb.get_task("nbody", **SMALL).load("test")
    b = eb.get_task("nbody_field", field=0.0, **SMALL).load("test")
    assert len(a) == len(b) == SMALL["test_size"]
    for x, y in zip(a, b):
        for key in ("pos", "vel", "charge", "edge_attr", "edge_index", "y"):
            assert torch.equal(x[key], y[key]), key
        assert torch.equal(y.field, torch.zeros_like(y.pos))


def test_field_switched_on_at_the_input_frame():
    """``field_on="at_input"``: the input state is nbody's (field-free), the target is not."""
    a = eb.get_task("nbody", **SMALL).load("test")
    b = eb.get_task("nbody_field", field=1.0, field_on="at_input", **SMALL).load("test")
    for x, y in zip(a, b):
        assert torch.equal(x.pos, y.pos) and torch.equal(x.vel, y.vel)
    assert all(not torch.allclose(x.y, y.y, atol=1e-3) for x, y in zip(a, b))
    with pytest.raises(UserError, match="field_on"):
        eb.get_task("nbody_field", field_on="later")


def test_spec_declares_both_groups_and_the_field(task, batch):
    spec = task.spec
    assert spec.group == "O2z" and spec.broken_group == "E3"
    assert spec.breaking_inputs == {"field": "1o"} and "field" not in spec.inputs
    assert torch.equal(batch.field, torch.tensor([0.0, 0.0, 1.0]).expand(batch.num_nodes, 3))
    merged = spec.with_breaking_inputs()
    assert merged.inputs["field"] == "1o" and not merged.breaking_inputs
    nbody = eb.get_task("nbody").spec
    assert nbody.with_breaking_inputs() is nbody


def _trajectory_under(R: np.ndarray, t: np.ndarray, field: float) -> float:
    """max |sim(g.x0) - g.sim(x0)| / max |sim(x0)| for g = (R, t), without the clip."""
    rng = np.random.default_rng(7)
    q = rng.choice([1.0, -1.0], size=(16, 5))
    loc, vel = rng.standard_normal((16, 5, 3)), 0.5 * rng.standard_normal((16, 5, 3))
    kw = dict(n_steps=500, record_every=100, clip=None, field=field)
    L, V = integrate(loc, vel, q, **kw)
    Lg, Vg = integrate(loc @ R.T + t, vel @ R.T, q, **kw)
    err = max(np.abs(Lg - (L @ R.T + t)).max(), np.abs(Vg - V @ R.T).max())
    return float(err / np.abs(L).max())


def test_dynamics_are_exactly_o2z_symmetric_and_not_o3():
    gen = torch.Generator().manual_seed(0)
    for R in sample_axial(6, True, gen).numpy():
        assert _trajectory_under(R, np.array([0.3, -1.0, 2.0]), field=1.0) < 1e-10
    c, s = math.cos(0.7), math.sin(0.7)
    about_x = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    assert _trajectory_under(about_x, np.zeros(3), field=1.0) > 1e-3
    assert _trajectory_under(np.diag([1.0, 1.0, -1.0]), np.zeros(3), field=1.0) > 1e-3  # mirror z -> -z
    assert _trajectory_under(about_x, np.zeros(3), field=0.0) < 1e-10  # without the field: O(3)


def test_field_drives_charges_along_z():
    """Field on from the start. Charge-signed z displacement between input (t = 0.3) and target
    (t = 0.4): the field alone
    gives q dz = field (t_in dt + dt^2 / 2) = 3 (0.03 + 0.005) = 0.105 on average (the random
    initial velocities and the Coulomb forces average out); 0 without the field."""
    for field, expected in ((3.0, 0.105), (0.0, 0.0)):
        data = eb.get_task("nbody_field", field=field, field_on="always", **SMALL).load("test")
        dz = torch.cat([(d.y - d.pos)[:, 2] for d in data])
        q = torch.cat([d.charge[:, 0] for d in data])
        assert abs((dz * q).mean().item() - expected) < 0.03


# ---- groups ------------------------------------------------------------------------------------
def test_axial_group_elements_fix_the_axis():
    R = sample_axial(200, True, torch.Generator().manual_seed(1))
    ez = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    assert torch.allclose(R @ ez, ez.expand(200, 3), atol=0, rtol=0)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=F64).expand(200, 3, 3), atol=1e-15)
    det = torch.linalg.det(R)
    assert (det > 0).sum() > 60 and (det < 0).sum() > 60
    assert torch.allclose(torch.linalg.det(sample_axial(50, False, torch.Generator().manual_seed(2))),
                          torch.ones(50, dtype=F64))
    assert group_flags_axial("O2z") == (True, True, True) and group_flags_axial("SO2z") == (False, True, True)


def test_common_group_and_lie_generators():
    assert common_group("O2z", "O3") == "O2z"
    assert common_group("O2z", "SO3") == "SO2z"
    assert common_group("O2z", None) == "O2z"
    assert common_group("E3", "O3") == "E3" and common_group("E3", "SO3") == "SE3"
    assert lie_generators("O2z") == (2,) and lie_generators("E3") == (0, 1, 2)


def test_sampled_o2z_element_leaves_the_field_fixed(task, batch):
    """Acting on the field as a vector with an O(2)_z element leaves it where it is."""
    g = sample_element(batch, "O2z", torch.Generator().manual_seed(3), permute=False)
    moved = act_on_batch(batch, task.spec.with_breaking_inputs(), g.to(batch.pos.dtype))
    assert torch.allclose(moved.field, batch.field, atol=1e-6)
    assert not torch.allclose(moved.pos, batch.pos, atol=1e-3)


# ---- the field_input option ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["baseline", "augmentation", *EXACT_WRAPPERS])
def test_field_input_is_used_only_when_asked(name, task, batch):
    x = cast_batch(batch, F64)
    stronger = x.clone()
    stronger.field = 2 * x.field
    for field_input in (False, True):
        method = small_method(name, field_input=field_input)
        assert method.options["field_input"] is field_input
        model = build_model(method, task.spec, 0, F64).eval()
        with torch.no_grad():
            diff = (model(x) - model(stronger)).abs().max().item()
        assert (diff > 1e-6) if field_input else (diff == 0.0), (name, field_input, diff)


@pytest.mark.parametrize("name", EXACT_WRAPPERS)
def test_field_input_keeps_exact_methods_exact_on_o2z(name, task, batch):
    """With the field as input: O(2)_z-exact with the field fixed, O(3)-exact jointly in (X, field),
    and (the field breaks it) not E(3)-equivariant in X alone; exactness claims are unchanged."""
    method = small_method(name, field_input=True)
    assert method.exact_on(task.spec)
    group = common_group(task.spec.group, method.group)
    assert group == "O2z"
    model = build_model(method, task.spec, 0, F64)
    err = eb.equivariance_error(model, batch, task.spec, n_samples=3, dtype=F64, group=group)["rel_max"]
    assert err < 1e-10
    joint = eb.equivariance_error(model, batch, task.spec.with_breaking_inputs(), n_samples=3, dtype=F64,
                                  group="E3")["rel_max"]
    assert joint < 1e-10
    broken = eb.equivariance_error(model, batch, task.spec, n_samples=3, dtype=F64, group="E3")["rel_max"]
    assert broken > 1e-6
    lie = lie_derivative(model, batch, task.spec, generators=lie_generators(group))["rel_max"]
    assert lie < 1e-6


def test_without_field_input_an_exact_method_stays_o3_exact(task, batch):
    method = small_method("frame_averaging")
    model = build_model(method, task.spec, 0, F64)
    assert eb.equivariance_error(model, batch, task.spec, n_samples=3, dtype=F64, group="E3")["rel_max"] < 1e-10


def test_augmentation_over_the_full_group_moves_the_field(task, batch):
    gen = torch.Generator().manual_seed(0)
    full = small_method("augmentation", field_input=True, over="full").train_transform(batch, task.spec, gen)
    own = small_method("augmentation", field_input=True).train_transform(batch, task.spec, gen)
    ez = batch.field
    assert torch.allclose(own.field, ez, atol=1e-6)
    assert not torch.allclose(full.field, ez, atol=1e-2)
    assert torch.allclose(full.field.norm(dim=-1), ez.norm(dim=-1), atol=1e-5)
    with pytest.raises(UserError, match="over"):
        eb.get_method("augmentation", over="everything")


# ---- the runner ------------------------------------------------------------------------------------
def test_broken_group_rows_in_a_tiny_run():
    """Real rows: ``equivariance_broken.*`` under E(3) beside ``equivariance.*`` under O(2)_z; an
    O(3)-exact method without the field input is E(3)-exact, with it E(3) is broken."""
    values: dict[bool, dict[str, float]] = {}
    for field_input in (False, True):
        spec = RunSpec(task="nbody_field", method="frame_averaging", seed=0,
                       task_options=dict(field=1.0, **SMALL),
                       method_options=dict(width=8, depth=1, field_input=field_input),
                       train=dict(steps=2, batch_size=4, val_points=0),
                       evaluate=dict(throughput=False, lie_derivative=False, equivariance_graphs=4,
                                     equivariance_samples=2))
        rows = run_one(spec)
        by = {r["metric"]: r for r in rows}
        for stage in catalogue.STAGES:
            for dtype in catalogue.DTYPES:
                main = by[catalogue.equivariance_metric(stage, dtype, "rel_max")]
                other = by[catalogue.broken_equivariance_metric(stage, dtype, "rel_max")]
                assert main["group"] == "O2z" and other["group"] == "E3"
        values[field_input] = {m: r["value"] for m, r in by.items()}
    name = catalogue.broken_equivariance_metric("trained", "fp64", "rel_max")
    assert values[False][name] < 1e-10 < 1e-4 < values[True][name]
    main = catalogue.equivariance_metric("trained", "fp64", "rel_max")
    assert values[False][main] < 1e-10 and values[True][main] < 1e-10
    assert catalogue.get_metric(name).family == "equivariance_broken"


def test_broken_group_only_where_declared():
    fa = small_method("frame_averaging", group="SO3")
    assert broken_group(eb.get_task("nbody").spec, fa, True) is None
    spec = eb.get_task("nbody_field", **SMALL).spec
    assert broken_group(spec, fa, True) == "SE3"
    assert broken_group(spec, small_method("baseline"), False) == "E3"


def test_the_wrong_symmetry_has_a_floor_the_field_input_removes():
    """Field 3 switched on at the input frame, a target window of 1 time unit: an O(3)-exact model
    without the field input cannot predict the field's displacement q field e_z / 2 (its best
    equivariant guess is 0), a floor of field^2 / 12 = 0.75 in the per-component MSE; the same
    model given the field as input goes well below it after the same 100 steps."""
    field = 3.0
    task = eb.get_task("nbody_field", field=field, input_frame=3, target_frame=13, train_size=500, val_size=10,
                       test_size=100)
    train_data, test_data = task.load("train"), task.load("test")
    cfg = TrainConfig.from_dict(dict(steps=100, batch_size=50, lr=3e-3, val_points=0))
    mse = {}
    for field_input in (False, True):
        method = eb.get_method("frame_averaging", width=16, depth=2, field_input=field_input)
        model = build_model(method, task.spec, 0, torch.float32)
        train(model, method, task, train_data, cfg, 0)
        mse[field_input] = evaluate(model, method, task, test_data, 100)["mse"]
    floor = field**2 / 12
    assert mse[False] > 0.8 * floor
    assert mse[True] < 0.25 * floor
