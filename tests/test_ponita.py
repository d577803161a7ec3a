"""PONITA (``equibench/methods/architectures/ponita.py``): its orientation grids, its separable
convolution against a direct sum, and its exactness claim as the module states it: exact (fp64
round-off) for the orthogonal maps that permute the grid (all 120 elements of I_h on the
icosahedral grids), translations and node permutations; a clearly non-zero discretisation error
for random rotations, falling as the grid grows."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import build_model
from equibench.core.errors import UserError
from equibench.core.spec import TaskSpec
from equibench.methods.architectures.ponita import (
    PonitaModel,
    fibonacci_grid,
    icosahedral_grid,
    icosahedral_rotations,
    icosahedron,
    orientation_grid,
    polynomial_features,
    repulsion_grid,
    riesz_energy,
)
from equibench.methods.base import count_parameters
from equibench.symmetry.group3d import sample_rotations
from equibench.symmetry.precision import default_dtype

F64 = torch.float64
ICO_COUNTS = (12, 20, 42, 92)


@functools.cache
def ih() -> torch.Tensor:
    """The 120 elements of I_h: the icosahedral rotations and their products with -1."""
    return torch.cat([icosahedral_rotations(), -icosahedral_rotations()])


def small(**opts) -> eb.Method:
    return eb.get_method("ponita", **{"width": 8, "depth": 2, "basis_dim": 8, "num_ori": 12, **opts})


def nbody_batch(n_graphs: int = 4) -> tuple[TaskSpec, Batch]:
    task = eb.get_task("nbody", train_size=8, val_size=2, test_size=8)
    return task.spec, Batch.from_data_list(task.load("test")[:n_graphs])


def f64(batch: Batch) -> Batch:
    out = batch.clone()
    for k in ("pos", "vel", "charge", "edge_attr", "y"):
        out[k] = out[k].to(F64)
    return out


def rotate(batch, R: torch.Tensor, t: torch.Tensor | None = None):
    out = batch.clone()
    out.pos = batch.pos @ R.T + (0 if t is None else t)
    out.vel = batch.vel @ R.T
    return out


def max_rel_error(model, batch: Batch, elements: torch.Tensor) -> float:
    """max over g of |f(g X) - g f(X)| / |f(X) - x| (the displacement, n-body's prediction); all
    transformed copies in one forward."""
    graphs = batch.to_data_list()
    copies = Batch.from_data_list([rotate(d, R) for R in elements for d in graphs])
    with torch.no_grad():
        fx = model(batch)
        fgx = model(copies).reshape(len(elements), *fx.shape)
    want = torch.einsum("gij,nj->gni", elements, fx)
    return ((fgx - want).flatten(1).norm(dim=1) / (fx - batch.pos).norm()).max().item()


# ---- grids --------------------------------------------------------------------------------------
def test_icosahedron_and_its_rotation_group():
    v, faces = icosahedron()
    assert v.shape == (12, 3) and len(faces) == 20
    assert torch.allclose(v.norm(dim=-1), torch.ones(12, dtype=F64))
    R = icosahedral_rotations()
    assert R.shape == (60, 3, 3)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=F64).expand(60, 3, 3), atol=1e-13)
    assert torch.allclose(torch.linalg.det(R), torch.ones(60, dtype=F64), atol=1e-13)
    distinct = torch.cdist(R.reshape(60, 9), R.reshape(60, 9)) + 10 * torch.eye(60, dtype=F64)
    assert distinct.min() > 0.1
    traces = sorted(round(float(t), 6) for t in torch.einsum("gii->g", R))
    # identity, 15 half turns (-1), 20 third turns (0), 12 + 12 fifth turns (1 +- phi... : 1.618, -0.618)
    assert traces.count(3.0) == 1 and traces.count(-1.0) == 15 and traces.count(0.0) == 20
    assert traces.count(round((1 + math.sqrt(5)) / 2, 6)) == 12 and traces.count(round((1 - math.sqrt(5)) / 2, 6)) == 12


@pytest.mark.parametrize("n", ICO_COUNTS)
def test_icosahedral_grids_are_permuted_by_ih(n):
    """Every element of I_h = I x {+-1} maps the grid onto itself (a permutation, to round-off)."""
    g = icosahedral_grid(n)
    assert g.shape == (n, 3) and torch.allclose(g.norm(dim=-1), torch.ones(n, dtype=F64))
    assert (torch.cdist(g, g) + 9 * torch.eye(n, dtype=F64)).min() > 0.1  # no duplicates
    for R in ih():
        d = ((g @ R.T)[:, None, :] - g[None, :, :]).norm(dim=-1)  # not cdist: its sqrt loses ~1e-8
        assert d.min(dim=1).values.max() < 1e-14
        assert torch.equal(d.argmin(dim=1).sort().values, torch.arange(n))


def test_icosahedral_grid_counts_and_errors():
    for n in (13, 16, 32, 60):
        with pytest.raises(ValueError, match="10 f"):
            icosahedral_grid(n)
    with pytest.raises(UserError, match="10 f"):
        eb.get_method("ponita", grid="icosahedron", num_ori=16)
    with pytest.raises(UserError, match="grid must be one of"):
        eb.get_method("ponita", grid="healpix")


def test_repulsion_grid_finds_the_known_minima():
    """Thomson problem: 12 charges settle on the icosahedron (energy 49.165253058), 20 at 150.881568334."""
    g12 = repulsion_grid(12)
    assert abs(riesz_energy(g12).item() - 49.165253058) < 1e-6
    edge = 4 / math.sqrt(10 + 2 * math.sqrt(5))  # edge of the unit-radius icosahedron
    assert abs((torch.cdist(g12, g12) + 9 * torch.eye(12, dtype=F64)).min().item() - edge) < 1e-6
    assert abs(riesz_energy(repulsion_grid(20)).item() - 150.881568334) < 1e-6
    g16 = repulsion_grid(16)  # relaxation lowers the energy of its Fibonacci start, deterministically
    assert riesz_energy(g16) < riesz_energy(fibonacci_grid(16)) - 0.2
    assert torch.equal(g16, repulsion_grid(16))


def test_grid_quadrature_of_the_lift_and_readout():
    """Lifting v to o . v and reading out (1/O) sum_o (o . v) o gives v / 3 exactly on a spherical
    2-design (the icosahedral grids are 5-designs), only approximately on the Fibonacci lattice."""
    v = torch.tensor([0.3, -1.2, 0.7], dtype=F64)
    for n in ICO_COUNTS:
        g = icosahedral_grid(n)
        assert torch.allclose((g @ v) @ g / n, v / 3, atol=1e-15)
        assert g.sum(0).abs().max() < 1e-14  # centrally symmetric: a constant field reads out as 0
    g = fibonacci_grid(20)
    assert ((g @ v) @ g / 20 - v / 3).abs().max() > 1e-3


# ---- building blocks ------------------------------------------------------------------------------
def test_polynomial_features_match_the_tensor_powers():
    a = torch.tensor([[2.0, 3.0]], dtype=F64)
    p = polynomial_features(a, 3)
    assert p.shape == (1, 14)
    assert p[0].tolist() == [2, 3, 4, 6, 6, 9, 8, 12, 12, 18, 12, 18, 18, 27]


def test_separable_convolution_against_a_direct_sum():
    """u_i(o) = sum_{j -> i} K B(o.(x_j - x_i), |perp|) f_j(o) + K B(0, 0) f_i(o);
    v_i(p) = (1/O) sum_o Kf Bf(o . p) u_i(o) + b, computed by loops."""
    torch.manual_seed(0)
    spec, batch = nbody_batch(2)
    with default_dtype(F64):
        model = PonitaModel(spec, orientation_grid("fibonacci", 6), width=4, depth=1, basis_dim=5)
    batch = f64(batch)
    layer = model.layers[0].conv
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(batch.num_nodes, 6, 4, dtype=F64)
    got = layer(x, *model.geometry(batch))
    g, pos = model.grid, batch.pos
    src, dst = batch.edge_index
    want = torch.zeros_like(x)
    for i in range(batch.num_nodes):
        u = torch.zeros(6, 4, dtype=F64)
        for o in range(6):
            terms = [(j, pos[j] - pos[i]) for j in src[dst == i].tolist()] + [(i, torch.zeros(3, dtype=F64))]
            for j, d in terms:
                a1 = d @ g[o]
                a2 = (d - a1 * g[o]).norm()
                u[o] += layer.kernel(model.basis(torch.stack([a1, a2]))) * x[j, o]
        for p in range(6):
            want[i, p] = sum(layer.fiber_kernel(model.fiber_basis((g[o] @ g[p]).reshape(1))) * u[o]
                             for o in range(6)) / 6 + layer.bias
    assert torch.allclose(got, want, atol=1e-12)


def test_calibration_on_the_first_training_batch():
    """The first training forward rescales each layer's kernels so that std(u) = std(f) and
    std(v) = std(u) on that batch; later forwards and eval forwards leave them alone."""
    spec, batch = nbody_batch()
    model = build_model(small(), spec, 0, torch.float32)
    model.eval()
    w = model.layers[0].conv.kernel.weight.detach().clone()
    model(batch)
    assert torch.equal(w, model.layers[0].conv.kernel.weight) and not model.layers[0].conv.calibrated
    model.train()
    model(batch)
    conv = model.layers[0].conv
    assert conv.calibrated and not torch.equal(w, conv.kernel.weight)
    geometry = model.geometry(batch)
    x = model.embed(model.lift(batch))
    with torch.no_grad():
        u = conv.spatial(x, *geometry[:4])
        v = conv.spherical(u, geometry[4])
    assert torch.isclose(u.std(), x.std(), rtol=1e-4) and torch.isclose(v.std(), x.std(), rtol=1e-4)
    w = conv.kernel.weight.detach().clone()
    model(batch)
    assert torch.equal(w, conv.kernel.weight)


def test_paper_setting_parameter_count():
    """main_nbody.py: hidden 128, basis 256, degree 3, 5 layers, widening 4: counted by hand."""
    spec, _ = nbody_batch()
    C, B, L = 128, 256, 5
    basis = (14 * C + C + C * B + B) + (3 * C + C + C * B + B)
    layer = 2 * B * C + C + 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C) + C
    want = basis + 2 * C + L * layer + L * (C + 1)
    assert count_parameters(eb.get_method("ponita").build(spec)) == want == 1_058_181


# ---- exactness ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ico_model():
    spec, batch = nbody_batch()
    model = build_model(small(grid="icosahedron", num_ori=12, layer_scale=1.0), spec, 0, F64)
    return model.eval(), f64(batch)


def test_exact_for_the_icosahedral_group_with_reflections(ico_model):
    model, batch = ico_model
    assert max_rel_error(model, batch, ih()) < 1e-10


def test_not_exact_for_random_rotations(ico_model):
    model, batch = ico_model
    R = sample_rotations(8, True, torch.Generator().manual_seed(0))
    assert max_rel_error(model, batch, R) > 1e-4


def test_translations_and_permutations_are_exact():
    spec, batch = nbody_batch()
    model = build_model(small(layer_scale=1.0), spec, 0, F64).eval()
    batch = f64(batch)
    t = torch.tensor([3.0, -1.0, 2.0], dtype=F64)
    with torch.no_grad():
        fx = model(batch)
        assert torch.allclose(model(rotate(batch, torch.eye(3, dtype=F64), t)), fx + t, atol=1e-12)
        perm = torch.randperm(batch.num_nodes, generator=torch.Generator().manual_seed(1))
        inv = torch.argsort(perm)
        permuted = batch.clone()
        for k in ("pos", "vel", "charge", "batch"):
            permuted[k] = batch[k][perm]
        permuted.edge_index = inv[batch.edge_index]
        perm_e = torch.randperm(batch.edge_index.shape[1], generator=torch.Generator().manual_seed(2))
        permuted.edge_index = permuted.edge_index[:, perm_e]
        assert torch.allclose(model(permuted), fx[perm], atol=1e-12)


def test_error_falls_as_the_grid_grows():
    """Random O(3) elements, icosahedral grids of 12 and 92 points (layer_scale=1): error at 92
    below a third of the error at 12 (measured, max relative to the displacement: 1.2e-1 -> 2.4e-2)."""
    spec, batch = nbody_batch()
    R = sample_rotations(8, True, torch.Generator().manual_seed(0))
    errs = [max_rel_error(build_model(small(grid="icosahedron", num_ori=n, layer_scale=1.0), spec, 0, F64).eval(),
                          f64(batch), R) for n in (12, 92)]
    assert errs[1] < errs[0] / 3


def test_claims_no_exactness_and_says_why():
    m = small()
    for name in ("nbody", "normals"):
        spec = eb.get_task(name).spec
        assert not m.exact_on(spec) and "permute" in m.inexact_reason(spec)
    assert not eb.get_method("ponita", grid="icosahedron", num_ori=42).exact_on(eb.get_task("nbody").spec)


# ---- tasks ---------------------------------------------------------------------------------------
def test_unsupported_tasks_say_why():
    m = small()

    def spec(**kw) -> TaskSpec:
        base = dict(name="t", domain="graph3d", group="E3", inputs={"pos": "point"}, output="1o", level="node",
                    loss="mse", metrics=("mse",))
        return TaskSpec(**{**base, **kw})

    assert m.supports(spec()) is None and m.supports(spec(output="2x0e+1o", level="graph")) is None
    assert "'1o' node inputs only" in m.supports(spec(inputs={"pos": "point", "s": "1e"}))
    assert "not '1e'" in m.supports(spec(output="1e"))
    assert "not '2e'" in m.supports(spec(output="2e"))
    assert "one point field" in m.supports(spec(inputs={"s": "0e"}))
    assert "invariant edge inputs" in m.supports(spec(edge_inputs={"e": "1o"}))
    assert "node level" in m.supports(spec(output="point", level="graph"))
    with pytest.raises(ValueError, match="'2e'"):
        m.build(spec(output="2e"))


def test_mixed_output_layout_and_graph_readout():
    """An "0e + 1o" graph-level output: the scalar (mean over the grid) first, then the vector, each
    summed over nodes; the vector rotates with the input on an icosahedral grid."""
    base, batch = nbody_batch()
    spec = TaskSpec(name="t", domain="graph3d", group="E3", inputs=base.inputs, output="0e+1o", level="graph",
                    loss="mse", metrics=("mse",))
    model = build_model(small(grid="icosahedron", layer_scale=1.0), spec, 0, F64).eval()
    batch = f64(batch)
    R = icosahedral_rotations()[7]
    with torch.no_grad():
        out, rot = model(batch), model(rotate(batch, R))
    assert out.shape == (batch.num_graphs, 4)
    assert torch.allclose(rot[:, 0], out[:, 0], atol=1e-12)
    assert torch.allclose(rot[:, 1:], out[:, 1:] @ R.T, atol=1e-12)


def test_conservative_forces_on_md():
    task = eb.get_task("md", equilibration=10, stride=2, train_size=4, val_size=2, test_size=2)
    batch = Batch.from_data_list(task.load("test")[:2])
    model = build_model(small(forces="conservative"), task.spec, 0, torch.float32)
    out = model(batch)
    assert out.shape == (batch.num_nodes, 3) and torch.isfinite(out).all()
    assert out.reshape(2, -1, 3).sum(1).abs().max() < 1e-4  # -dE/dx of a translation-invariant E sums to 0
