"""Tests of the ``escnn`` method (steerable point convolutions): the e3nn <-> escnn change of
basis, exact O(3) / SO(3) equivariance in float64 and float32 (reflections, translations, node
permutations), float64 constants, state dicts, parameter matching, shapes and options."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

import equibench as eb
from equibench.methods.base import count_parameters
from equibench.metrics.equivariance import cast_batch
from equibench.core.errors import UserError
from equibench.symmetry.fieldtypes import representation
from equibench.symmetry.group3d import GroupElement, act_on_batch
from equibench.symmetry.precision import default_dtype
from equibench.core.spec import TaskSpec
from conftest import require

require("escnn")  # installed by scripts/setup.sh (extra 'escnn')

FP64_TOL, FP32_TOL = 1e-10, 1e-4
SMALL = {"width": 3, "depth": 2}
TRANSLATING = {"O3": "E3", "SO3": "SE3"}  # the method's group plus translations

# graph level; typed node inputs (pseudo-scalar, pseudovector, l = 2), a second point field,
# invariant and vector edge fields; the output mixes parities
SYN = TaskSpec(name="synthetic", domain="graph3d", group="E3",
               inputs={"pos": "point", "vel": "1o", "x": "0e+0o+1e+2o", "anchor": "point"},
               output="0o+1e+2e", level="graph", loss="mse", metrics=("mse",),
               edge_inputs={"d": "0e", "ev": "1o"})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ep():
    from equibench.methods.architectures import escnn_point
    return escnn_point


def build(spec, dtype=torch.float32, **options):
    method = eb.get_method("escnn", **{**SMALL, **options})
    with default_dtype(dtype):
        return method, method.build(spec, seed=0)


def escnn_elements(group: str, n: int = 4, seed: int = 0):
    """Deterministic escnn group elements (every other one with the inversion for O(3))."""
    gspace = ep().make_gspace(group, 3)
    G, rng = gspace.fibergroup, np.random.default_rng(seed)
    out = []
    for k in range(n):
        q = rng.standard_normal(4)
        q /= np.linalg.norm(q)
        out.append(G.element((k % 2, q), "Q") if group == "O3" else G.element(q, "Q"))
    return gspace, out


@pytest.fixture(scope="module")
def synthetic_batch(nbody_batch) -> Batch:
    gen = torch.Generator().manual_seed(1)
    data = []
    for d in nbody_batch.to_data_list()[:8]:
        n, e = d.num_nodes, d.edge_index.shape[1]
        data.append(Data(pos=d.pos, vel=d.vel, edge_index=d.edge_index,
                         x=torch.randn(n, 10, generator=gen), anchor=d.pos + torch.randn(n, 3, generator=gen),
                         d=torch.randn(e, 1, generator=gen), ev=torch.randn(e, 3, generator=gen)))
    return Batch.from_data_list(data)


@pytest.fixture(scope="module")
def nbody_models(nbody_task):
    """O(3) models for n-body: float32 built first, then float64 (shares nothing with it)."""
    spec = nbody_task.spec
    return {torch.float32: build(spec, torch.float32)[1], torch.float64: build(spec, torch.float64)[1]}


# ---- change of basis ---------------------------------------------------------------------------
@pytest.mark.parametrize("group", ["O3", "SO3"])
def test_change_of_basis_intertwines_e3nn_and_escnn(group):
    """M D_e3nn(R_g) = rho_escnn(g) M for every irrep up to l = 3, R_g = escnn's action on R^3."""
    t = "0e+0o+1o+1e+2e+2o+3o"
    blocks = ep().type_irreps(t)
    M = ep().basis_matrix(group, blocks)
    assert np.allclose(M @ M.T, np.eye(M.shape[0]), atol=1e-13)
    gspace, elements = escnn_elements(group)
    for g in elements:
        R = np.asarray(gspace.basespace_action(g))
        assert np.isclose(abs(np.linalg.det(R)), 1.0)
        D_e = representation(t, torch.tensor(R, dtype=torch.float64)).numpy()
        rho = ep()._block_diag([np.asarray(ep().escnn_irrep(gspace, group, l, p)(g)) for l, p in blocks])
        assert np.abs(M @ D_e - rho @ M).max() < 1e-12
    # l = 1 in escnn is a signed permutation of e3nn's x, y, z (not the identity)
    Q = ep().change_of_basis(group, 1, -1)
    assert np.allclose(np.abs(Q).sum(0), 1.0) and np.allclose(np.abs(Q).sum(1), 1.0)
    assert not np.allclose(Q, np.eye(3))


@pytest.mark.parametrize("group", ["O3", "SO3"])
def test_rotated_inputs_are_escnn_rotated_fields(group, synthetic_batch):
    """Rotating the suite's inputs by R_g (incl. reflections for O(3)) transforms the model's
    escnn input field by escnn's own representation of g."""
    spec = replace(SYN, edge_inputs={})
    _, model = build(spec, torch.float64, group=group, depth=0)
    batch = cast_batch(synthetic_batch, torch.float64)
    in_type = model.out_self.linear.in_type  # the node input field type (no base space)
    gspace, elements = escnn_elements(group)
    B = int(batch.num_graphs)
    for g in elements:
        R = torch.tensor(np.asarray(gspace.basespace_action(g)), dtype=torch.float64)
        moved = act_on_batch(batch, spec, GroupElement(R.expand(B, 3, 3), torch.zeros(B, 3)), target=False)
        rho = torch.tensor(np.asarray(in_type.representation(g)), dtype=torch.float64)
        expected = model.node_input(batch) @ rho.T
        assert (model.node_input(moved) - expected).abs().max() < 1e-12


def test_message_uses_x_j_minus_x_i_like_escnn(nbody_batch):
    """EdgePointConv (our forward, edge_delta = pos_j - pos_i) equals escnn's own R3PointConv
    (edge_delta computed from coords) with the same weights."""
    from escnn import nn as enn
    gspace = ep().make_gspace("O3", 2)
    G = gspace.fibergroup
    in_type = enn.FieldType(gspace, [G.irrep(0, 0), G.irrep(1, 1)] * 2)
    out_type = enn.FieldType(gspace, [G.irrep(0, 0), G.irrep(1, 1), G.irrep(0, 2)])
    kwargs = dict(rings=[0.0, 1.5, 3.0], sigma=[1.0] * 3, frequencies_cutoff=lambda r: 2 if r > 0 else 0)
    torch.manual_seed(0)
    ours = ep().EdgePointConv(in_type, None, out_type, **kwargs)
    ref = enn.R3PointConv(in_type, out_type, **kwargs)
    ref.load_state_dict(ours.state_dict())
    h = torch.randn(nbody_batch.num_nodes, in_type.size)
    pos, ei = nbody_batch.pos, nbody_batch.edge_index
    mine = ours(h, ei, pos[ei[0]] - pos[ei[1]], torch.zeros(ei.shape[1], 0))
    theirs = ref(enn.GeometricTensor(h, in_type, coords=pos), ei).tensor
    assert torch.allclose(mine, theirs, atol=1e-5) and mine.abs().max() > 1e-3
    flipped = ours(h, ei, pos[ei[1]] - pos[ei[0]], torch.zeros(ei.shape[1], 0))
    assert not torch.allclose(flipped, theirs, atol=1e-3)


# ---- equivariance ------------------------------------------------------------------------------
@pytest.mark.parametrize("group", ["O3", "SO3"])
def test_equivariant_on_nbody_fp64_and_fp32(group, nbody_task, nbody_batch, nbody_models):
    spec = nbody_task.spec
    models = nbody_models if group == "O3" else {dt: build(spec, dt, group=group)[1] for dt in nbody_models}
    for dtype, tol in ((torch.float64, FP64_TOL), (torch.float32, FP32_TOL)):
        err = eb.equivariance_error(models[dtype], nbody_batch, spec, n_samples=6, dtype=dtype,
                                    group=TRANSLATING[group])
        assert err["rel_max"] < tol, (group, dtype, err)
    if group == "SO3":  # honest about its group: reflections are not respected
        err = eb.equivariance_error(models[torch.float64], nbody_batch, spec, n_samples=6,
                                    dtype=torch.float64, group="E3")
        assert err["rel_max"] > 1e-4


def test_general_irreps_typed_edges_graph_level_fp64(synthetic_batch):
    method, model = build(SYN, torch.float64)
    out = model(cast_batch(synthetic_batch, torch.float64))
    assert out.shape == (synthetic_batch.num_graphs, 1 + 3 + 5) and out.abs().max() > 1e-6
    err = eb.equivariance_error(model, synthetic_batch, SYN, n_samples=6, dtype=torch.float64, group="E3")
    assert err["rel_max"] < FP64_TOL


def test_float64_build_has_float64_constants_and_survives_fp32_weights(nbody_task, nbody_batch, nbody_models):
    m32, m64 = nbody_models[torch.float32], nbody_models[torch.float64]
    floats = [b for b in m64.buffers() if b.is_floating_point()]
    assert floats and all(b.dtype == torch.float64 for b in floats)
    # escnn's numpy-float64 constants were kept, not rounded through float32
    assert any((b != b.float().double()).any() for b in floats)
    # the two builds share no tensor (escnn's process-wide basis caches are bypassed)
    assert not {id(b) for b in m32.buffers()} & {id(b) for b in m64.buffers()}
    assert all(b.dtype == torch.float32 for b in m32.buffers() if b.is_floating_point())
    # state dicts hold parameters only: float32 weights loaded into a float64 build stay exact
    assert set(m32.state_dict()) == {n for n, _ in m32.named_parameters()}
    with default_dtype(torch.float64):
        m = eb.get_method("escnn", **SMALL).build(nbody_task.spec, seed=1)
    m.load_state_dict(m32.state_dict())
    err = eb.equivariance_error(m, nbody_batch, nbody_task.spec, n_samples=4, dtype=torch.float64, group="E3")
    assert err["rel_max"] < FP64_TOL


# ---- shapes, modes, options --------------------------------------------------------------------
def test_output_shapes_node_point_and_graph_scalar(nbody_task, nbody_batch, nbody_models):
    out = nbody_models[torch.float32](nbody_batch)
    assert out.shape == (nbody_batch.num_nodes, 3) and torch.isfinite(out).all()
    spec = replace(nbody_task.spec, output="0e", level="graph")
    _, model = build(spec, torch.float64, depth=1)
    out = model(cast_batch(nbody_batch, torch.float64))
    assert out.shape == (nbody_batch.num_graphs, 1)
    err = eb.equivariance_error(model, nbody_batch, spec, n_samples=4, dtype=torch.float64, group="E3")
    assert err["rel_max"] < FP64_TOL


def test_graphs_without_edges(nbody_task, nbody_batch, nbody_models):
    bare = nbody_batch.clone()
    bare.edge_index = torch.zeros(2, 0, dtype=torch.long)
    bare.edge_attr = torch.zeros(0, 1)
    out = nbody_models[torch.float32](bare)
    assert out.shape == (bare.num_nodes, 3) and torch.isfinite(out).all()
    err = eb.equivariance_error(nbody_models[torch.float64], bare, nbody_task.spec, n_samples=2,
                                dtype=torch.float64, group="E3")
    assert err["rel_max"] < FP64_TOL


def test_eval_mode_matches_train_mode_and_deep_copies(nbody_batch, nbody_task):
    _, model = build(nbody_task.spec, torch.float32, depth=1, nonlinearity="norm")
    train_out = model(nbody_batch)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(nbody_batch), train_out, atol=1e-6)
    clone = copy.deepcopy(model).double()  # escnn's eval-mode caches would break deepcopy
    assert torch.isfinite(clone(cast_batch(nbody_batch, torch.float64))).all()
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("group", ["O3", "SO3"])
def test_parameter_matching_small(group, nbody_task):
    method = eb.get_method("escnn", depth=2, params=12000, group=group)
    model = method.build(nbody_task.spec)
    assert abs(count_parameters(model) - 12000) <= 1200


@pytest.mark.slow
@pytest.mark.parametrize("group", ["O3", "SO3"])
@pytest.mark.parametrize("target", [30000, 50000])
def test_parameter_matching_default_depth(group, target, nbody_task):
    model = eb.get_method("escnn", params=target, group=group).build(nbody_task.spec)
    assert abs(count_parameters(model) - target) <= 0.1 * target


def test_options_and_supports(nbody_task):
    with pytest.raises(UserError):
        eb.get_method("escnn", group="C4")
    with pytest.raises(UserError):
        eb.get_method("escnn", nonlinearity="relu")
    with pytest.raises(UserError):
        eb.get_method("escnn", width=2.5)
    method = eb.get_method("escnn", lmax=1)
    assert method.group == "O3" and method.exact
    assert eb.get_method("escnn", group="SO3").group == "SO3"
    assert method.supports(nbody_task.spec) is None
    assert "point" in method.supports(replace(nbody_task.spec, inputs={"x": "1o"}, output="0e"))
    assert "lmax" in method.supports(replace(nbody_task.spec, output="3o"))
