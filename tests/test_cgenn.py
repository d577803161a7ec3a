"""Tests of the ``cgenn`` method and its Clifford algebra (``blocks/clifford.py``): known blade
products, associativity, the outermorphism as an algebra automorphism and as the Clifford group's
twisted conjugation (rotations and reflections), the sparse path products against the dense
geometric product, O(3)-equivariance of every layer in float64, the reference's parameter count,
option variants, the fused product kernel against tensor operations (values, gradients, double
backward), and the one-line reason on unsupported tasks."""
from __future__ import annotations

import pytest
import torch

import equibench as eb
from equibench.core.spec import TaskSpec
from equibench.methods.architectures import cgenn
from equibench.methods.base import count_parameters
from equibench.methods.blocks import clifford as cl
from equibench.methods.blocks import clifford_kernel as ck
from equibench.symmetry.group3d import sample_rotations
from equibench.symmetry.precision import default_dtype

F64 = torch.float64
BLADE = {name: i for i, name in enumerate(["1", "e1", "e2", "e3", "e12", "e13", "e23", "e123"])}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blade(name: str, coef: float = 1.0) -> torch.Tensor:
    x = torch.zeros(8, dtype=F64)
    x[BLADE[name]] = coef
    return x


def gp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return cl.geometric_product(x, y, cl.cayley_table(dtype=F64))


def orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` rotations followed by ``n`` reflections (det -1), float64."""
    rot = sample_rotations(n, reflections=False, generator=torch.Generator().manual_seed(seed))
    return torch.cat([rot, -rot])


@pytest.mark.parametrize("a, b, coef, out", [
    ("e1", "e1", 1.0, "1"), ("e2", "e2", 1.0, "1"), ("e1", "e2", 1.0, "e12"), ("e2", "e1", -1.0, "e12"),
    ("e12", "e12", -1.0, "1"), ("e123", "e123", -1.0, "1"), ("e1", "e23", 1.0, "e123"),
    ("e2", "e13", -1.0, "e123"), ("e12", "e2", 1.0, "e1"), ("e13", "e12", 1.0, "e23"), ("e123", "e1", 1.0, "e23"),
])
def test_blade_products(a, b, coef, out):
    assert torch.equal(gp(blade(a), blade(b)), blade(out, coef))


def test_the_algebra_is_associative_with_unit_and_twenty_paths():
    g = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(50, 8, generator=g, dtype=F64) for _ in range(3))
    assert torch.allclose(gp(gp(x, y), z), gp(x, gp(y, z)), atol=1e-12)
    assert torch.equal(gp(blade("1").expand(50, 8), x), x) and torch.equal(gp(x, blade("1").expand(50, 8)), x)
    v = cl.embed(torch.randn(50, 3, generator=g, dtype=F64), 1)
    assert torch.allclose(gp(v, v)[:, 0], (v * v).sum(-1))
    assert torch.equal(gp(v, v)[:, 1:], torch.zeros(50, 7, dtype=F64))
    assert cl.N_PATHS == 20 and len(set(cl.PATHS)) == 20
    # q(x^(k)) = <reverse(x^(k)) x^(k)>_0 is the sum of squares per grade (positive definite in Cl(3,0))
    q = torch.stack([gp(cl.reverse(cl.grade_project(x, k)), cl.grade_project(x, k))[:, 0] for k in range(4)], -1)
    assert torch.allclose(q, cl.grade_quadratic(x), atol=1e-12)


def test_outermorphism_is_an_orthogonal_grade_preserving_automorphism():
    Q = orthogonal(4)
    rho = cl.outermorphism(Q)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 8, 8, generator=g, dtype=F64)
    for i in range(len(Q)):
        assert torch.allclose(cl.act(Q[i], gp(x, y)), gp(cl.act(Q[i], x), cl.act(Q[i], y)), atol=1e-12)
        assert torch.allclose(rho[i] @ rho[i].T, torch.eye(8, dtype=F64), atol=1e-12)
        assert torch.equal(rho[i][1:4, 1:4], Q[i])
        assert torch.allclose(rho[i][7, 7], torch.linalg.det(Q[i]))
    off = torch.ones(8, 8, dtype=torch.bool)
    for s in cl.GRADE_SLICES:
        off[s, s] = False
    assert torch.equal(rho[:, off], torch.zeros_like(rho[:, off]))


def test_outermorphism_equals_the_clifford_group_action():
    """A unit vector n acts by x -> n alpha(x) n^-1 (the paper's twisted conjugation): the reflection
    I - 2 n n^T; the rotor ab of two unit vectors acts by x -> (ab) x (ab)^-1: the rotation Q_a Q_b."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 8, generator=g, dtype=F64)
    a, b = torch.nn.functional.normalize(torch.randn(2, 3, generator=g, dtype=F64), dim=-1)
    ref = [torch.eye(3, dtype=F64) - 2 * torch.outer(n, n) for n in (a, b)]
    va, vb = cl.embed(a, 1), cl.embed(b, 1)  # unit vectors are their own inverses
    assert torch.allclose(gp(gp(va, cl.grade_involution(x)), va), cl.act(ref[0], x), atol=1e-12)
    rotor, rotor_inv = gp(va, vb), gp(vb, va)
    assert torch.allclose(gp(gp(rotor, x), rotor_inv), cl.act(ref[0] @ ref[1], x), atol=1e-12)


def test_path_products_sum_to_the_geometric_product():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 5, 4, 8, generator=g, dtype=F64)
    with default_dtype(F64):
        paths = cl.ProductPaths()
    parts = paths.split(paths(x, y))
    full = gp(x, y)
    for k, part in enumerate(parts):
        n_k = sum(p[2] == k for p in cl.PATHS)
        assert part.shape == (5, 4, n_k, full[..., cl.GRADE_SLICES[k]].shape[-1])
        assert torch.allclose(part.sum(-2), full[..., cl.GRADE_SLICES[k]], atol=1e-12)
    # each path alone: the grade-k part of the product of the grade-i and grade-j parts
    for k, part in enumerate(parts):
        for n, p in enumerate(paths.path_of_grade[k]):
            i, j, kk = cl.PATHS[p]
            ref = gp(cl.grade_project(x, i), cl.grade_project(y, j))[..., cl.GRADE_SLICES[kk]]
            assert torch.allclose(part[..., n, :], ref, atol=1e-12)


def test_weighted_products_are_the_sums_over_paths():
    """The channel-wise layer's fused product (signed weights) and the fully connected layer's per-grade contraction
    both equal sum_paths w_p <x^(i) y^(j)>_k written out path by path; the fully connected layer
    with a diagonal (channel-wise) weight equals the channel-wise layer."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(2, 6, 3, 8, generator=g, dtype=F64)
    with default_dtype(F64):
        cw, fc = cl.GeometricProductLayer(3, 3), cl.GeometricProductLayer(3, 3, fully_connected=True)
    expected = torch.zeros(6, 3, 8, dtype=F64)
    for p, (i, j, k) in enumerate(cl.PATHS):
        term = cl.grade_project(gp(cl.grade_project(x, i), cl.grade_project(y, j)), k)
        expected += cw.weight[:, p, None].detach() * term
    assert torch.allclose(cw.product(x, y), expected, atol=1e-12)
    with torch.no_grad():
        fc.weight.zero_()
        fc.weight[torch.arange(3), torch.arange(3)] = cw.weight
    assert torch.allclose(fc.product(x, y), expected, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fused_product_kernel_agrees_with_tensor_operations(dtype):
    """The compiled channel-wise product (``clifford_kernel``) against the same formula as tensor
    operations and against the path-by-path sum: values and all three gradients, on non-contiguous
    inputs with two leading dimensions."""
    pair = cl.pair_table()[0]
    assert ck.uses_kernel(torch.zeros(1, dtype=dtype), pair), "the kernel did not build (scripts/setup.sh builds it)"
    g = torch.Generator().manual_seed(11)
    x, y = (t.transpose(0, 1) for t in torch.randn(2, 5, 3, 4, 8, generator=g, dtype=dtype))  # [3, 5, 4, 8]
    weight = torch.randn(4, cl.N_PATHS, generator=g, dtype=dtype)
    expected = sum(weight[:, p, None] * cl.grade_project(cl.geometric_product(
        cl.grade_project(x, i), cl.grade_project(y, j)), k) for p, (i, j, k) in enumerate(cl.PATHS))
    grads = torch.randn(3, 5, 4, 8, generator=g, dtype=dtype)
    results = []
    for route in (ck.channelwise_product, ck.product_torch):
        xs, ys, ws = (t.detach().clone().requires_grad_() for t in (x, y, weight))
        out = route(xs, ys, cl.signed_weights(ws), pair)
        out.backward(grads)
        results.append([out.detach(), xs.grad, ys.grad, ws.grad])
    tol = 1e-12 if dtype == F64 else 1e-5
    assert torch.allclose(results[0][0], expected, atol=tol * 10)
    for fused, tensor_ops in zip(*results):
        assert torch.allclose(fused, tensor_ops, atol=tol * 10, rtol=tol), float((fused - tensor_ops).abs().max())


def test_fused_product_double_backward_matches_tensor_operations():
    """A differentiable backward (create_graph, as forces -dE/dx in training need) through the kernel
    gives the same second derivatives as the tensor-operation route."""
    pair = cl.pair_table()[0]
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(2, 6, 3, 8, generator=g, dtype=F64)
    k = cl.signed_weights(torch.randn(3, cl.N_PATHS, generator=g, dtype=F64))
    second = []
    for route in (ck.channelwise_product, ck.product_torch):
        xs, ys, ks = (t.detach().clone().requires_grad_() for t in (x, y, k))
        (gx,) = torch.autograd.grad(route(xs, ys, ks, pair).pow(2).sum(), xs, create_graph=True)
        second.append(torch.autograd.grad(gx.sin().sum(), (xs, ys, ks)))
    for a, b in zip(*second):
        assert torch.allclose(a, b, atol=1e-12)


def test_the_kernel_switch_and_a_bad_table(monkeypatch):
    monkeypatch.setenv(ck.ENV_SWITCH, "0")
    ck.extension.cache_clear()
    try:
        assert not ck.uses_kernel(torch.zeros(1), cl.pair_table()[0])
    finally:
        monkeypatch.delenv(ck.ENV_SWITCH)
        ck.extension.cache_clear()
    assert ck.uses_kernel(torch.zeros(1), cl.pair_table()[0])
    with pytest.raises(ValueError, match="each blade 8 times"):
        ck.source((0,) * 64)


def layers() -> dict[str, torch.nn.Module]:
    c = 5
    return {
        "MVLinear": cl.MVLinear(4, c), "MVLinear_shared": cl.MVLinear(4, c, per_grade=False),
        "GradeNorm": cl.GradeNorm(4, init=0.3), "MVLayerNorm": cl.MVLayerNorm(4),
        "MVGate_quadratic": cl.MVGate(4), "MVGate_scalar": cl.MVGate(4, gate="scalar"),
        "GP_channelwise": cl.GeometricProductLayer(4, 4), "GP_fully_connected": cl.GeometricProductLayer(4, c, True),
        "CEMLP": cgenn.CEMLP(4, c, fully_connected=False, gate="quadratic"),
    }


@pytest.mark.parametrize("name", list(layers()))
def test_each_layer_is_o3_equivariant_in_float64(name):
    with default_dtype(F64):
        torch.manual_seed(0)
        layer = layers()[name]
        for p in layer.parameters():  # away from the init values (ones, zeros) that could hide a bug
            p.data.add_(0.3 * torch.randn_like(p))
    x = torch.randn(7, 4, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    fx = layer(x)
    assert fx.shape[:-2] == (7,) and torch.isfinite(fx).all()
    for Q in orthogonal(3, seed=5):
        err = (layer(cl.act(Q, x)) - cl.act(Q, fx)).abs().max() / fx.abs().max()
        assert err < 1e-12, (name, float(err))


@pytest.mark.parametrize("edge_dim", [0, 2])
def test_edge_mlp_with_its_first_linear_on_the_nodes_is_the_concatenated_one(edge_dim):
    """``CEMLP.forward_edges``: the first MVLinear applied to the nodes, then gathered, equals the CEMLP on
    the per-edge concatenation [h_i - h_j, a_ij] (invariant a_ij: grade 0 only), values and gradients."""
    with default_dtype(F64):
        torch.manual_seed(1)
        mlp = cgenn.CEMLP(4 + edge_dim, 5, fully_connected=False, gate="quadratic")
        for p in mlp.parameters():
            p.data.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    h = torch.randn(6, 4, 8, generator=g, dtype=F64, requires_grad=True)
    a = cl.embed(torch.randn(9, edge_dim, 1, generator=g, dtype=F64), 0).requires_grad_()
    src, dst = torch.randint(6, (9,), generator=g), torch.randint(6, (9,), generator=g)
    ref = mlp(torch.cat([h[dst] - h[src], a], dim=-2))
    out = mlp.forward_edges(h, src, dst, a)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((ref * w).sum(), [h, a, *mlp.parameters()])
    fast = torch.autograd.grad((out * w).sum(), [h, a, *mlp.parameters()], allow_unused=True)
    for name, x, y in zip(["h", "a", *dict(mlp.named_parameters())], grads, fast):
        if name == "a":  # the fast route reads the scalar blade only (the others are zero by construction)
            x, y = x[..., 0], y[..., 0]
        torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-12, msg=name)


def test_a_layer_that_ignores_the_grades_is_caught():
    """The equivariance check above can fail: mixing grade 1 into grade 2 is not O(3)-equivariant."""
    x = torch.randn(7, 4, 8, generator=torch.Generator().manual_seed(6), dtype=F64)
    mix = torch.eye(8, dtype=F64)
    mix[4:7, 1:4] = 0.5 * torch.eye(3, dtype=F64)
    Q = orthogonal(1)[0]
    assert ((cl.act(Q, x) @ mix.T) - cl.act(Q, x @ mix.T)).abs().max() > 1e-3


def test_channelwise_product_needs_equal_channels():
    with pytest.raises(ValueError, match="channel-wise"):
        cl.GeometricProductLayer(3, 4)


@pytest.fixture(scope="module")
def nbody():
    return eb.get_task("nbody", train_size=4, val_size=2, test_size=8)


def test_reference_parameter_count_and_sizes(nbody):
    """Width 28, depth 3 on n-body: the reference NBodyCGGNN's count, per layer 52 c^2 + 144 c
    (edge CEMLP 24 c^2 + 74 c, node CEMLP 28 c^2 + 70 c), embedding 3 c + c, projection 4 c + 1."""
    c = 28
    model = eb.get_method("cgenn").build(nbody.spec)
    assert count_parameters(model) == 3 * (52 * c * c + 144 * c) + 4 * c + 4 * c + 1 == 134625
    fc = eb.get_method("cgenn", width=4, depth=1, product="fully_connected").build(nbody.spec)
    cw = eb.get_method("cgenn", width=4, depth=1).build(nbody.spec)
    # 4 GP layers (2 per CEMLP): c * c instead of c weights per path
    assert count_parameters(fc) - count_parameters(cw) == 4 * 20 * (4 * 4 - 4)
    assert abs(count_parameters(eb.get_method("cgenn", params=20000).build(nbody.spec)) - 20000) <= 2000


@pytest.mark.parametrize("options", [{"product": "fully_connected"}, {"gate": "scalar"}])
def test_option_variants_are_exact_on_nbody(options, nbody):
    from torch_geometric.data import Batch
    batch = Batch.from_data_list(nbody.load("test")[:4])
    with default_dtype(F64):
        model = eb.get_method("cgenn", width=4, depth=1, **options).build(nbody.spec)
    err = eb.equivariance_error(model, batch, nbody.spec, n_samples=4, dtype=F64, group="E3")
    assert err["rel_max"] < 1e-10


def test_output_is_input_position_plus_grade_one_displacement(nbody):
    from torch_geometric.data import Batch
    batch = Batch.from_data_list(nbody.load("test")[:2])
    model = eb.get_method("cgenn", width=4, depth=1).build(nbody.spec)
    torch.nn.init.zeros_(model.projection.weight)
    assert torch.equal(model(batch), batch.pos)


SPEC = dict(name="syn", domain="graph3d", group="E3", loss="mse", metrics=("mse",), level="node")


@pytest.mark.parametrize("spec, words", [
    (TaskSpec(inputs={"pos": "point"}, output="1e", **SPEC), "not '1e'"),
    (TaskSpec(inputs={"pos": "point", "s": "2e"}, output="1o", **SPEC), "node inputs only"),
    (TaskSpec(inputs={"pos": "point"}, output="1o", edge_inputs={"d": "1o"}, **SPEC), "edge inputs"),
    (TaskSpec(inputs={"s": "0e"}, output="0e", **SPEC), "'point' input"),
    (TaskSpec(**{**SPEC, "level": "graph"}, inputs={"pos": "point"}, output="1o"), "graph level"),
])
def test_unsupported_tasks_give_a_one_line_reason(spec, words):
    method = eb.get_method("cgenn")
    reason = method.supports(spec)
    assert reason and "\n" not in reason and words in reason and reason.startswith("cgenn")
    with pytest.raises(ValueError, match="cgenn"):
        method.build(spec)
    assert "image2d" in eb.get_method("cgenn").supports(TaskSpec(**{**SPEC, "domain": "image2d"},
                                                                 inputs={"image": "image"}, output="0e"))


def test_supported_tasks():
    method = eb.get_method("cgenn")
    for name in ("nbody", "normals", "qm9", "md"):
        assert method.supports(eb.get_task(name).spec) is None, name
    assert method.supports(eb.get_task("md", target="energy").spec) is None
    assert eb.get_method("cgenn", forces="conservative").supports(eb.get_task("md").spec) is None


def test_conservative_forces_on_md_are_exact():
    """forces="conservative": F = -dE/dx of the grade-0 energy readout, E(3)-equivariant in float64."""
    from torch_geometric.data import Batch
    task = eb.get_task("md", equilibration=10, stride=2, train_size=2, val_size=2, test_size=4)
    batch = Batch.from_data_list(task.load("test")[:2])
    with default_dtype(F64):
        model = eb.get_method("cgenn", width=4, depth=1, forces="conservative").build(task.spec)
    assert type(model).__name__ == "ForcesFromEnergy"
    err = eb.equivariance_error(model, batch, task.spec, n_samples=3, dtype=F64, group="E3")
    assert err["rel_max"] < 1e-10
