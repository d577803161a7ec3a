"""Tests of the ``e3nn`` adapter: exact O(3) equivariance (fp64 / fp32) on n-body and on a
graph-level synthetic spec, reflections (parity), parameter matching, options, supports()."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from e3nn import o3
from torch_geometric.data import Batch, Data

import equibench as eb
from equibench.methods.base import count_parameters
from equibench.methods.architectures.e3nn_tp import E3NN, SplitTensorProduct, parameter_count
from equibench.metrics.equivariance import cast_batch
from equibench.symmetry.group3d import GroupElement, act_on_batch
from equibench.symmetry.precision import default_dtype
from equibench.core.spec import TaskSpec

FP64_TOL, FP32_TOL = 1e-10, 1e-4

# graph level, several typed inputs (an extra point field too), invariant and equivariant
# edge fields; SYN_PARITY outputs a pseudoscalar + pseudovector so parity matters
SYN = TaskSpec(name="synthetic", domain="graph3d", group="E3",
               inputs={"pos": "point", "x": "2x0e+1o", "anchor": "point"},
               output="0e", level="graph", loss="mse", metrics=("mse",),
               edge_inputs={"d": "0e", "v": "1o"})
SYN_PARITY = replace(SYN, name="synthetic_parity", output="0o+1e", inputs={"pos": "point"},
                     edge_inputs={})


@pytest.fixture(scope="module")
def nbody():
    task = eb.get_task("nbody", train_size=16, test_size=16)
    return task.spec, Batch.from_data_list(task.load("test", size=16))


@pytest.fixture(scope="module")
def default_models(nbody):
    """Default options (lmax 2, mul 16, depth 3), built under each default dtype."""
    spec, _ = nbody
    return {dtype: build(spec, dtype) for dtype in (torch.float64, torch.float32)}


def random_graphs(sizes=(4, 5, 6, 7), seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for n in sizes:
        src, dst = torch.where(~torch.eye(n, dtype=torch.bool))
        graphs.append(Data(pos=torch.randn(n, 3, generator=g), x=torch.randn(n, 5, generator=g),
                           anchor=torch.randn(n, 3, generator=g), edge_index=torch.stack([src, dst]),
                           d=torch.randn(src.numel(), 1, generator=g),
                           v=torch.randn(src.numel(), 3, generator=g)))
    return Batch.from_data_list(graphs)


def build(spec: TaskSpec, dtype: torch.dtype, **options):
    with default_dtype(dtype):
        return eb.get_method("e3nn", **options).build(spec, seed=0)


def check_equivariance(models, spec, batch):
    """fp64 / fp32 relative error below tolerance (reflections, translations, permutations)
    and a non-trivial output."""
    for dtype, tol in ((torch.float64, FP64_TOL), (torch.float32, FP32_TOL)):
        err = eb.equivariance_error(models[dtype], batch, spec, n_samples=8, dtype=dtype, group="E3")
        assert err["rel_max"] < tol, (dtype, err)
        with torch.no_grad(), default_dtype(dtype):
            x = cast_batch(batch, dtype)
            out = models[dtype](x)
        if spec.output == "point":  # the network's own part: the displacement
            out = out - x[spec.point_fields[0]]
        assert torch.isfinite(out).all() and out.abs().max() > 1e-3


def inversion(batch: Batch) -> GroupElement:
    B = int(batch.num_graphs)
    return GroupElement(-torch.eye(3, dtype=torch.float64).expand(B, 3, 3).clone(),
                        torch.zeros(B, 3, dtype=torch.float64))


def test_registered_attributes():
    method = eb.get_method("e3nn")
    assert isinstance(method, E3NN) and "e3nn" in eb.list_methods()
    assert method.exact is True and method.group == "O3" and method.domains == ("graph3d",)


def test_nbody_equivariance_default_options(nbody, default_models):
    spec, batch = nbody
    check_equivariance(default_models, spec, batch)


def test_nbody_equivariance_other_options(nbody):
    spec, batch = nbody
    model = build(spec, torch.float64, lmax=3, mul=3, depth=2, cutoff=True, r_max=3.0)
    assert eb.equivariance_error(model, batch, spec, n_samples=4)["rel_max"] < FP64_TOL


def test_nbody_output_shape_and_point_readout(nbody, default_models):
    spec, batch = nbody
    model = default_models[torch.float32]
    with torch.no_grad():
        out = model(batch)
        attr, inv = model.edge_features(batch)
        h = model.node_input(batch)
        for layer in model.layers:
            h = layer(h, batch.edge_index, attr, inv)
        disp = model.head(h)
    assert out.shape == (batch.num_nodes, 3)
    assert torch.allclose(out, batch.pos + disp)  # point output = first point + a "1o" displacement
    assert model.irreps_in == o3.Irreps("1o+0e")  # vel then charge, in spec order


def test_nbody_inversion(nbody, default_models):
    spec, batch = nbody
    model = default_models[torch.float64].eval()
    with torch.no_grad(), default_dtype(torch.float64):
        x = cast_batch(batch, torch.float64)
        assert torch.allclose(model(act_on_batch(x, spec, inversion(x), target=False)), -model(x),
                              atol=1e-10)


def test_graph_level_invariant_spec_equivariance():
    batch = random_graphs()
    models = {dtype: build(SYN, dtype, mul=4, depth=2) for dtype in (torch.float64, torch.float32)}
    check_equivariance(models, SYN, batch)
    assert models[torch.float32](batch).shape == (4, 1)
    # the equivariant edge field joins the tensor product's second operand
    assert models[torch.float32].irreps_edge == o3.Irreps("0e+1o+2e+1o")


def test_reflections_flip_pseudo_outputs():
    """A pseudoscalar/pseudovector output must change sign under the inversion -I and stay
    put under a proper rotation: an SO(3)-only model with ordinary parities would fail."""
    batch = random_graphs(seed=1)
    model = build(SYN_PARITY, torch.float64, mul=4).eval()
    with torch.no_grad(), default_dtype(torch.float64):
        x = cast_batch(batch, torch.float64)
        fx = model(x)
        f_inv = model(act_on_batch(x, SYN_PARITY, inversion(x), target=False))
    assert fx[:, 0].abs().min() > 1e-6  # the chirality-sensitive pseudoscalar is not zero
    # rho(-I) on 0o+1e is diag(-1, +1, +1, +1)
    assert torch.allclose(f_inv[:, 0], -fx[:, 0], atol=1e-10)
    assert torch.allclose(f_inv[:, 1:], fx[:, 1:], atol=1e-10)
    err = eb.equivariance_error(model, batch, SYN_PARITY, n_samples=8, dtype=torch.float64, group="E3")
    assert err["rel_max"] < FP64_TOL


def test_split_tensor_product_equals_fully_connected():
    """Per-output-irrep products, with the weights regrouped, give the e3nn FCTP exactly."""
    with default_dtype(torch.float64):
        a, b = o3.Irreps("3x0e+2x1o+2x1e+1x2e"), o3.Irreps("0e+1o+2e")
        c = o3.Irreps("4x0e+2x0o+2x1o+1x2o")
        full = o3.FullyConnectedTensorProduct(a, b, c, shared_weights=False, internal_weights=False)
        split = SplitTensorProduct(a, b, c)
        assert split.weight_numel == full.weight_numel
        w = torch.randn(5, full.weight_numel)
        blocks, off = {k: [] for k in range(len(c))}, 0
        for ins in full.instructions:
            n = int(torch.tensor(ins.path_shape).prod())
            blocks[ins.i_out].append(w[:, off:off + n])
            off += n
        w_split = torch.cat([torch.cat(blocks[k], 1) for k in range(len(c))], 1)
        x1, x2 = torch.randn(5, a.dim), o3.spherical_harmonics(b, torch.randn(5, 3), True)
        assert torch.allclose(full(x1, x2, w), split(x1, x2, w_split), atol=1e-12)


def test_params_option_within_tolerance(nbody):
    spec, _ = nbody
    model = eb.get_method("e3nn", params=30000).build(spec)
    assert abs(count_parameters(model) - 30000) <= 3000
    for target in (3000, 50000, 200000):  # analytic count, exact per the test below
        method = eb.get_method("e3nn", params=target)
        assert abs(method.count(spec, *method.sizes_for(spec, target)) - target) <= 0.10 * target
    with pytest.raises(ValueError, match="within 10%"):
        eb.get_method("e3nn", params=50).build(spec)  # below the smallest model


@pytest.mark.parametrize("spec_name, options", [("nbody", dict(mul=5, lmax=1, depth=2)),
                                                ("synthetic", dict(mul=2, lmax=3, radial_hidden=7))])
def test_analytic_parameter_count(nbody, spec_name, options):
    spec = nbody[0] if spec_name == "nbody" else SYN
    method = eb.get_method("e3nn", **options)
    model = method.build(spec)
    assert count_parameters(model) == parameter_count(
        spec, model.mul, method.lmax, method.depth, method.num_basis, model.radial_hidden)


def test_lmax_changes_spherical_harmonics(nbody):
    spec, _ = nbody
    for lmax in (1, 3):
        model = build(spec, torch.float32, lmax=lmax, mul=2, depth=1)
        assert model.sh.irreps_out == o3.Irreps.spherical_harmonics(lmax)
        assert model.layers[0].irreps_out.lmax == lmax


def test_supports_and_unsupported_specs(nbody):
    spec, _ = nbody
    method = eb.get_method("e3nn")
    assert method.supports(spec) is None and method.supports(SYN) is None
    no_point = TaskSpec(name="np", domain="graph3d", group="O3", inputs={"x": "4x0e+1o"},
                        output="0e", level="graph", loss="mse", metrics=("mse",))
    reason = method.supports(no_point)
    assert isinstance(reason, str) and "point" in reason
    with pytest.raises(ValueError, match="point"):
        method.build(no_point)
    image = TaskSpec(name="img", domain="image2d", group="C4", inputs={"img": "0e"}, output="0e",
                     level="graph", loss="ce", metrics=("accuracy",))
    assert "domain" in method.supports(image)
    too_high = replace(SYN, output="3o")
    assert "lmax" in method.supports(too_high)


def test_bad_options_rejected():
    with pytest.raises(eb.UserError):
        eb.get_method("e3nn", lmax="2")
    with pytest.raises(eb.UserError):
        eb.get_method("e3nn", mul=0)


def test_seeded_build_and_training_step(nbody):
    spec, batch = nbody
    a, b = (eb.get_method("e3nn", mul=4, depth=2).build(spec, seed=3) for _ in range(2))
    assert torch.equal(a(batch), b(batch))
    c = eb.get_method("e3nn", mul=4, depth=2).build(spec, seed=4)
    assert not torch.allclose(a(batch), c(batch))
    before = [p.detach().clone() for p in a.parameters()]
    opt = torch.optim.Adam(a.parameters(), 1e-3)
    loss = ((a(batch) - batch.y) ** 2).mean()
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in a.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert torch.isfinite(a(batch)).all()
