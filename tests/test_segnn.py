"""SEGNN (``segnn``): its steerable building blocks are O(3)-equivariant (reflections included) in
float64, its attributes and inputs are the paper's n-body ones on a hand-built graph, its parameter
count is known from the irreps alone, and it names the reason for a task it cannot take."""
from __future__ import annotations

import math

import pytest
import torch
from e3nn import o3
from torch_geometric.data import Batch, Data

import equibench as eb
from equibench.benches.taskrun import build_model
from equibench.core.errors import UserError
from equibench.core.spec import TaskSpec
from equibench.methods.architectures.segnn import (
    GatedSteerableLinear,
    Layout,
    SEGNNLayer,
    SEGNNModel,
    SteerableLinear,
    balanced_mul,
    parameter_count,
    sh_irreps,
)
from equibench.methods.base import count_parameters
from equibench.methods.blocks.energy_forces import ForcesFromEnergy
from equibench.symmetry.precision import default_dtype

F64 = torch.float64
NBODY = TaskSpec(name="nbody", domain="graph3d", group="E3", inputs={"pos": "point", "vel": "1o", "charge": "0e"},
                 edge_inputs={"edge_attr": "0e"}, output="point", level="node", loss="mse", metrics=("mse",))
QM9 = TaskSpec(name="qm9", domain="graph3d", group="E3", inputs={"pos": "point", "x": "5x0e"},
               output="0e", level="graph", loss="mse", metrics=("mae",))
NORMALS = TaskSpec(name="normals", domain="graph3d", group="O3", inputs={"pos": "point"},
                   output="1o", level="node", loss="1-cos2", metrics=("1-cos2",))
MD = TaskSpec(name="md", domain="graph3d", group="E3", inputs={"pos": "point", "x": "3x0e"},
              output="1o", level="node", loss="mse", metrics=("force_mae",))


def o3_elements(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Random O(3) elements in float64, every second one a reflection (det -1)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=F64))
        q = q * torch.sign(torch.diagonal(r))
        q = q * torch.linalg.det(q).sign()
        out.append(-q if k % 2 else q)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ---------------------------------------------------------------- (a) building blocks
@pytest.mark.parametrize("block", [SteerableLinear, GatedSteerableLinear])
def test_steerable_blocks_are_o3_equivariant_fp64(block):
    """L(D_in x; D_attr a) = D_out L(x; a) for rotations and reflections, with inputs of both parities
    and l = 0..2, attributes Y_0..Y_2 (checked with e3nn's Wigner matrices, D_from_matrix)."""
    irreps_in, attr = o3.Irreps("3x0e+2x1o+1x1e+2x2e+1x0o"), sh_irreps(2)
    irreps_out = o3.Irreps("4x0e+3x1o+2x2e")
    with default_dtype(F64):
        torch.manual_seed(0)
        f = block(irreps_in, irreps_out, attr)
        x, a = irreps_in.randn(7, -1), attr.randn(7, -1)
        y = f(x, a)
        assert y.shape == (7, irreps_out.dim) and y.abs().max() > 0.1
        for R in o3_elements(4):
            D_in, D_a, D_out = (ir.D_from_matrix(R) for ir in (irreps_in, attr, irreps_out))
            assert rel_err(f(x @ D_in.T, a @ D_a.T), y @ D_out.T) < 1e-12


def test_steerable_blocks_break_under_a_parity_violating_attribute():
    """The check above can fail: attributes of the wrong parity ("1e" where Y_1 is "1o") break reflections."""
    with default_dtype(F64):
        torch.manual_seed(0)
        f = SteerableLinear(o3.Irreps("2x0e+2x1o"), o3.Irreps("2x0e+2x1o"), o3.Irreps("0e+1o"))
        x, a = o3.Irreps("2x0e+2x1o").randn(5, -1), o3.Irreps("0e+1o").randn(5, -1)
        R = -o3_elements(1)[0]  # a reflection
        wrong = o3.Irreps("0e+1e").D_from_matrix(R)  # transforms a as if it were a pseudo-vector
        D = o3.Irreps("2x0e+2x1o").D_from_matrix(R)
        assert rel_err(f(x @ D.T, a @ wrong.T), f(x, a) @ D.T) > 1e-2


def test_steerable_linear_groups_input_entries_by_irrep():
    """An input "2x0e+1x1o+3x0e" is regrouped to "5x0e+1x1o" (columns permuted) before the tensor
    product: the same map as a block built on the grouped layout, with the same weights."""
    with default_dtype(F64):
        torch.manual_seed(0)
        f = SteerableLinear(o3.Irreps("2x0e+1x1o+3x0e"), o3.Irreps("2x0e+2x1o"), sh_irreps(1))
        g = SteerableLinear(o3.Irreps("5x0e+1x1o"), o3.Irreps("2x0e+2x1o"), sh_irreps(1))
        g.load_state_dict(f.state_dict())
        s1, v, s2, a = torch.randn(4, 2), torch.randn(4, 3), torch.randn(4, 3), sh_irreps(1).randn(4, -1)
        assert torch.allclose(f(torch.cat([s1, v, s2], -1), a), g(torch.cat([s1, s2, v], -1), a), atol=1e-14)
        assert not torch.allclose(f(torch.cat([s1, v, s2], -1), a), g(torch.cat([s1, v, s2], -1), a), atol=1e-3)


def test_segnn_layer_is_o3_equivariant_fp64():
    """One message-passing layer on a random graph: features, edge and node attributes transformed
    together, the edge scalars invariant."""
    hidden, attr = sh_irreps(2, 3), sh_irreps(2)
    with default_dtype(F64):
        torch.manual_seed(1)
        layer = SEGNNLayer(hidden, attr, n_edge_scalars=2)
        n, e = 6, 14
        h, a_n, a_e = hidden.randn(n, -1), attr.randn(n, -1), attr.randn(e, -1)
        s = torch.randn(e, 2)
        edge_index = torch.randint(0, n, (2, e), generator=torch.Generator().manual_seed(2))
        y = layer(h, edge_index, a_e, s, a_n)
        for R in o3_elements(4, seed=3):
            D_h, D_a = hidden.D_from_matrix(R), attr.D_from_matrix(R)
            assert rel_err(layer(h @ D_h.T, edge_index, a_e @ D_a.T, s, a_n @ D_a.T), y @ D_h.T) < 1e-12


def test_steerable_linear_has_the_reference_parametrisation():
    """No e3nn path normalisation (the reference divides it out): on scalars, L(x; 1) = x W + b
    exactly, with weights and bias in U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    with default_dtype(F64):
        torch.manual_seed(0)
        f = SteerableLinear(o3.Irreps("16x0e"), o3.Irreps("5x0e"))
        w = f.weight.view(16, 1, 5)[:, 0, :]
        x = torch.randn(4, 16)
        assert torch.allclose(f(x), x @ w + f.bias, rtol=0, atol=1e-13)
        assert w.abs().max() <= 0.25 and f.bias.abs().max() <= 0.25 and w.abs().max() > 0.2


# ---------------------------------------------------------------- (c) the paper setting
def three_body() -> Batch:
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=F64)
    vel = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=F64)
    charge = torch.tensor([[1.0], [-1.0], [1.0]], dtype=F64)
    src = torch.tensor([1, 2, 0, 2, 0, 1])
    dst = torch.tensor([0, 0, 1, 1, 2, 2])
    data = Data(pos=pos, vel=vel, charge=charge, edge_index=torch.stack([src, dst]),
                edge_attr=charge[src] * charge[dst])
    return Batch.from_data_list([data])


def test_node_attribute_is_mean_edge_harmonics_plus_velocity_harmonics():
    """a_i = mean_j Y(x_j - x_i) + Y(v_i) with l = 0 set to 1 (the reference's O3Transform and
    catch_isolated_nodes), "integral" normalisation: Y_1(u) = sqrt(3 / 4 pi) u / |u|, written out."""
    batch = three_body()
    with default_dtype(F64):
        model = SEGNNModel(NBODY, mul=2)
        edge_attr, node_attr = model.attributes(batch)
    c1 = math.sqrt(3 / (4 * math.pi))
    pos, vel = batch.pos, batch.vel
    unit = torch.nn.functional.normalize
    expected_l1 = torch.stack([
        (unit(pos[1] - pos[0], dim=0) + unit(pos[2] - pos[0], dim=0)) / 2 + unit(vel[0], dim=0),
        (unit(pos[0] - pos[1], dim=0) + unit(pos[2] - pos[1], dim=0)) / 2,  # zero velocity: no Y_1
        (unit(pos[0] - pos[2], dim=0) + unit(pos[1] - pos[2], dim=0)) / 2 + unit(vel[2], dim=0),
    ]) * c1
    assert node_attr.shape == (3, 4)
    assert torch.equal(node_attr[:, 0], torch.ones(3, dtype=F64))
    assert torch.allclose(node_attr[:, 1:], expected_l1, atol=1e-14)
    # edge attribute of edge 1 -> 0: Y(x_1 - x_0), l = 0 entry 1 / sqrt(4 pi)
    assert torch.allclose(edge_attr[0], torch.tensor([1 / math.sqrt(4 * math.pi), c1, 0.0, 0.0], dtype=F64))


def test_paper_nbody_inputs_and_edge_scalars():
    """f_i = [q_i, |v_i|, v_i, x_i - centroid] (irreps 2x0e + 1o + 1o), s_ij = [|x_i - x_j|^2, q_i q_j]."""
    batch = three_body()
    with default_dtype(F64):
        model = SEGNNModel(NBODY, mul=2)
        f, s = model.node_features(batch), model.edge_scalars(batch)
    assert model.irreps_in == o3.Irreps("2x0e+1x1o+1x1o")
    centre = batch.pos.mean(0)
    expected = torch.cat([batch.charge, batch.vel.norm(dim=-1, keepdim=True), batch.vel, batch.pos - centre], -1)
    assert torch.allclose(f, expected, atol=1e-15)
    assert torch.allclose(s[:, 0], torch.tensor([1.0, 4.0, 1.0, 5.0, 4.0, 5.0], dtype=F64))
    assert torch.equal(s[:, 1], batch.edge_attr[:, 0])


def test_paper_nbody_width_and_parameter_count():
    """64 hidden features at lmax_h = lmax_attr = 1 are 32x0e + 32x1o (the reference's
    WeightBalancedIrreps: 4 mul^2 >= 64^2); 4 layers give 147 488 parameters on n-body."""
    assert balanced_mul(64, 1, 1) == 32 and balanced_mul(63, 1, 1) == 32 and balanced_mul(65, 1, 1) == 33
    method = eb.get_method("segnn")
    assert method.mul_for(NBODY) == 32
    assert method.count(NBODY, 32) == 147488


@pytest.mark.parametrize("spec,opts", [(NBODY, {}), (QM9, {"lmax_h": 2, "lmax_attr": 2}),
                                       (NORMALS, {"depth": 1}), (MD, {"forces": "conservative"}),
                                       (NBODY, {"centroid": False, "lmax_h": 0})])
def test_parameter_count_matches_the_built_model(spec, opts):
    method = eb.get_method("segnn", **{"depth": 2, **opts})
    with torch.random.fork_rng(devices=[]):
        net = SEGNNModel(method.network_spec(spec), 3, method.lmax_h, method.lmax_attr, method.depth,
                         centroid=method.centroid)
    assert count_parameters(net) == method.count(spec, 3) > method.count(spec, 2)


def test_params_option_matches_20000():
    method = eb.get_method("segnn", params=20000)
    mul = method.mul_for(NBODY)
    assert abs(parameter_count(NBODY, mul, 1, 1, 4) - 20000) <= 2000


def test_centroid_is_on_where_the_task_has_vector_inputs():
    assert Layout.of(NBODY, None).centroid and not Layout.of(QM9, None).centroid
    assert not Layout.of(NORMALS, None).centroid and Layout.of(NORMALS, True).centroid


def test_point_output_is_the_input_position_plus_a_displacement():
    """A zero head predicts the input positions (the reference's loc_pred = pos + model(graph))."""
    batch = three_body()
    with default_dtype(F64):
        model = SEGNNModel(NBODY, mul=2)
        with torch.no_grad():
            model.pre_2.weight.zero_()
            model.pre_2.bias.zero_()
        assert torch.equal(model(batch), batch.pos)


def test_conservative_forces_are_o3_equivariant_fp64():
    """forces="conservative": F = -dE/dx of the graph-level energy, equivariant under reflections."""
    gen = torch.Generator().manual_seed(0)
    data = [Data(pos=torch.randn(5, 3, generator=gen), x=torch.eye(3)[torch.randint(0, 3, (5,), generator=gen)],
                 edge_index=torch.tensor([[i, j] for i in range(5) for j in range(5) if i != j]).T)
            for _ in range(2)]
    batch = Batch.from_data_list(data)
    method = eb.get_method("segnn", hidden=8, depth=2, forces="conservative")
    model = build_model(method, MD, 0, F64)
    assert isinstance(model, ForcesFromEnergy)
    err = eb.equivariance_error(model, batch, MD, n_samples=4, dtype=F64, group="E3")
    assert err["rel_max"] < 1e-10


# ---------------------------------------------------------------- (b) unsupported tasks
@pytest.mark.parametrize("spec,opts,phrase", [
    (TaskSpec(name="t", domain="graph3d", group="O3", inputs={"pos": "point"}, output="1o", level="graph",
              loss="mse", metrics=()), {}, "graph-level readout"),
    (TaskSpec(name="t", domain="graph3d", group="O3", inputs={"pos": "point"}, output="2o", level="node",
              loss="mse", metrics=()), {}, "cannot reach output irreps ['2o']"),
    (TaskSpec(name="t", domain="graph3d", group="O3", inputs={"pos": "point"}, output="3e", level="node",
              loss="mse", metrics=()), {"lmax_h": 1, "lmax_attr": 1}, "raise lmax_h"),
    (TaskSpec(name="t", domain="graph3d", group="O3", inputs={"pos": "point"}, edge_inputs={"e": "1o"},
              output="0e", level="graph", loss="mse", metrics=()), {}, "invariant edge inputs"),
    (TaskSpec(name="t", domain="graph3d", group="O3", inputs={"x": "0e"}, output="0e", level="graph",
              loss="mse", metrics=()), {}, "needs a 'point' input"),
    (TaskSpec(name="t", domain="image2d", group="C4", inputs={"image": "image"}, output="10x0e", level="graph",
              loss="cross_entropy", metrics=()), {}, "domains"),
])
def test_unsupported_tasks_give_a_one_line_reason(spec, opts, phrase):
    method = eb.get_method("segnn", **opts)
    reason = method.supports(spec)
    assert reason is not None and phrase in reason and "\n" not in reason
    with pytest.raises(ValueError, match="segnn|domains"):
        method.build(spec)


def test_reachable_outputs_are_supported():
    method = eb.get_method("segnn")
    for spec in (NBODY, QM9, NORMALS, MD):
        assert method.supports(spec) is None
    node_2e = TaskSpec(name="t", domain="graph3d", group="O3", inputs={"pos": "point"}, output="2e", level="node",
                       loss="mse", metrics=())
    assert method.supports(node_2e) is None  # 1o (x) Y_1 reaches 2e


def test_bad_options_are_user_errors():
    for opts in ({"pool": "max"}, {"sh_normalization": "unit"}, {"hidden": 0}, {"lmax_attr": 0}):
        with pytest.raises(UserError, match="segnn"):
            eb.get_method("segnn", **opts)
