"""The fast paths of the frame wrappers (issue 20, item 3: wrappers close to their backbone) compute
the same function as the generic paths they short-cut: ``framed_batch`` / ``output_from_frame``
against ``act_on_batch`` / ``act_on_output``, the sign-frame forward of ``frame_averaging`` and
``fa_gnn`` (one projection on W times the sign vectors, chunked backbone calls on the CPU) against
the per-copy 3 x 3 products of the generic forward, ``pca_frame`` against
``covariance`` / ``principal_axes`` / ``skew_signs``, the PCA basis and third-moment signs against
``pca_frame``, ``pca_canonicalization``'s sign-frame forward against ``apply_in_frame``, and the
chunked framed copies against ``act_on_batch`` on ``replicate``."""
from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.methods.blocks import pca_frames
from equibench.methods.blocks.pca_frames import (
    framed_batch,
    into_frame,
    out_of_frame,
    output_from_frame,
    pca_frame,
    principal_axes,
    skew_signs,
)
from equibench.methods.wrappers import fa_gnn, frame_averaging
from equibench.metrics.equivariance import cast_batch
from equibench.symmetry.group3d import act_on_batch, act_on_output, sample_rotations
from equibench.symmetry.precision import default_dtype


@pytest.fixture(scope="module")
def nbody():
    task = eb.get_task("nbody", train_size=20, val_size=20, test_size=20)
    return task.spec, cast_batch(Batch.from_data_list(task.load("test")[:12]), torch.float64)


def build(name, spec, **opts):
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        return eb.get_method(name, **opts).build(spec, 0).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_framed_batch_matches_act_on_batch(nbody):
    spec, batch = nbody
    B = int(batch.num_graphs)
    F = sample_rotations(B, True, torch.Generator().manual_seed(1))
    t = torch.randn(B, 3, dtype=torch.float64)
    fast = framed_batch(batch, spec, F, t)
    ref = act_on_batch(batch, spec, into_frame(F, t), target=False)
    for name in (*spec.inputs, *spec.edge_inputs):
        assert rel(fast[name], ref[name]) < 1e-14, name
    assert fast.edge_index is batch.edge_index and torch.equal(fast.y, batch.y)  # shared, untouched
    out = torch.randn(batch.num_nodes, 3, dtype=torch.float64)
    assert rel(output_from_frame(out, spec, F, t, batch), act_on_output(out, spec, out_of_frame(F, t), batch)) < 1e-14


@pytest.mark.parametrize("group", ["O3", "SO3"])
def test_pca_frame_matches_its_definition(nbody, group):
    spec, batch = nbody
    pos, index, B = batch.pos, batch.batch, int(batch.num_graphs)
    F, t = pca_frame(pos, index, B, group)
    t_ref = pca_frames.scatter(pos, index, dim=0, dim_size=B, reduce="mean")
    _, V = principal_axes(pca_frames.covariance(pos, t_ref, index, B))
    F_ref = V * skew_signs(pos, t_ref, V, index, B)[:, None, :]
    if group == "SO3":
        F_ref = torch.stack([F_ref[..., 0], F_ref[..., 1], torch.linalg.cross(F_ref[..., 0], F_ref[..., 1])], -1)
    assert rel(t, t_ref) < 1e-14
    assert rel(F, F_ref) < 1e-12


@pytest.mark.parametrize("opts", [{}, {"group": "SO3"}])
@pytest.mark.parametrize("edges_per_call", [None, 1])  # None: one call; 1: one copy per backbone call
def test_frame_averaging_sign_path_matches_generic(nbody, monkeypatch, opts, edges_per_call):
    spec, batch = nbody
    model = build("frame_averaging", spec, params=5000, **opts)
    if edges_per_call is not None:
        monkeypatch.setattr(pca_frames, "CPU_EDGES_PER_CALL", edges_per_call)
    with torch.no_grad():
        fast = model(batch)
        monkeypatch.setattr(frame_averaging, "sign_frames_supported", lambda spec: False)
        ref = model(batch)
    assert rel(fast, ref) < 1e-12


@pytest.mark.parametrize("opts", [{}, {"group": "SO3"}, {"residual": True}])
@pytest.mark.parametrize("edges_per_call", [None, 1])
def test_fa_gnn_sign_path_matches_generic(nbody, monkeypatch, opts, edges_per_call):
    spec, batch = nbody
    model = build("fa_gnn", spec, width=15, depth=3, **opts)
    if edges_per_call is not None:
        monkeypatch.setattr(pca_frames, "CPU_EDGES_PER_CALL", edges_per_call)
    with torch.no_grad():
        fast = model(batch)
        averages = model.frame_averages
        monkeypatch.setattr(fa_gnn, "sign_frames_supported", lambda spec: False)
        ref = model(batch)
    assert averages == model.frame_averages - averages == model.depth
    assert rel(fast, ref) < 1e-10


def test_copies_per_call_bounds_the_cpu_batch(nbody, monkeypatch):
    spec, batch = nbody
    size = batch.edge_index.shape[1] + batch.num_nodes
    for budget, expected in ((1, 1), (size, 1), (3 * size, 3), (5 * size, 4), (100 * size, 8)):
        monkeypatch.setattr(pca_frames, "CPU_EDGES_PER_CALL", budget)
        assert pca_frames.copies_per_call(batch, 8) == expected, budget  # the fewest equal chunks


@pytest.mark.parametrize("group", ["O3", "SO3"])
def test_pca_basis_and_signs_give_pca_frame(nbody, group):
    """``pca_basis`` holds the axes of ``pca_axes`` (``proper_base`` for SO(3)) and the coordinates
    W^T (x - t); ``third_moment_signs`` gives ``pca_frame = W diag(sigma)``, bit for bit."""
    spec, batch = nbody
    pos, index, B = batch.pos, batch.batch, int(batch.num_graphs)
    basis = pca_frames.pca_basis(pos, index, B, group)
    V, t = pca_frames.pca_axes(pos, index, B)
    assert torch.equal(basis.W, pca_frames.proper_base(V, group)) and torch.equal(basis.t, t)
    assert torch.equal(basis.t_rows, t[index]) and torch.equal(basis.W_rows, basis.W[index])
    assert rel(basis.proj, torch.einsum("nd,ndk->nk", pos - t[index], basis.W[index])) < 1e-14
    sig = pca_frames.third_moment_signs(basis, index, B, group)
    F, _ = pca_frame(pos, index, B, group)
    assert torch.equal(basis.W * sig[:, None, :], F)
    assert torch.equal(sig[:, :2], skew_signs(pos, t, V, index, B)[:, :2])
    assert torch.equal(_, t)


@pytest.mark.parametrize("opts", [{}, {"group": "SO3"}])
def test_pca_canonicalization_sign_path_matches_the_framed_backbone(nbody, opts):
    """The sign-frame forward of ``pca_canonicalization`` is ``apply_in_frame`` with ``pca_frame``,
    bit for bit (every difference is a sign flip)."""
    spec, batch = nbody
    model = build("pca_canonicalization", spec, params=5000, **opts)
    assert model.signs
    with torch.no_grad():
        F, t = model.frame(batch)
        ref = pca_frames.apply_in_frame(model.backbone, batch, spec, F, t)
        assert torch.equal(model(batch), ref)


def test_sign_framed_chunks_match_the_generic_framing(nbody):
    """Chunks share one projection and their structure; chunk k holds the copies framed by
    F_k = W diag(sigma_k), as ``act_on_batch(replicate(...), into_frame(F_k, t))`` (a chunk of one
    copy too)."""
    spec, batch = nbody
    B = int(batch.num_graphs)
    W = sample_rotations(B, True, torch.Generator().manual_seed(2)).to(torch.float64)
    t = torch.randn(B, 3, dtype=torch.float64)
    sig = pca_frames.frame_signs("O3", torch.float64, W.device).unsqueeze(1)  # [8, 1, 3]
    for size, sizes in ((3, [3, 3, 2]), (1, [1] * 8)):
        chunks = list(pca_frames.sign_framed_chunks(batch, spec, W, t, sig, size))
        assert [int(c.num_graphs) for c in chunks] == [m * B for m in sizes]
        k = 0
        for m, chunk in zip(sizes, chunks):
            Fk = (W.unsqueeze(0) * sig[k:k + m, :, None, :]).reshape(m * B, 3, 3)  # copy-major, W diag(sigma)
            ref = act_on_batch(pca_frames.replicate(batch, spec, m), spec, into_frame(Fk, t.repeat(m, 1)),
                               target=False)
            for name in (*spec.inputs, *spec.edge_inputs):
                assert rel(chunk[name], ref[name]) < 1e-14, name
            assert torch.equal(chunk.edge_index, ref.edge_index) and torch.equal(chunk.batch, ref.batch)
            k += m


def test_canonicaliser_folds_its_edge_vectors_into_the_point_coefficient(nbody):
    """The canonicaliser's output sum_i sum_v a_iv V_iv + sum_e b_e (x_j - x_i), per graph, computed
    with the edge terms folded into the centred point's node coefficient (beta_i = sum of b_e over
    the edges leaving i minus those entering i), equals the direct edge sum."""
    from equibench.methods.blocks.backbone import run_mlp
    from equibench.methods.wrappers.canonicalization import CanonicalisedModel

    spec, batch = nbody
    model = build("canonicalization", spec, params=5000)
    assert isinstance(model, CanonicalisedModel)
    c = model.canonicaliser
    B = int(batch.num_graphs)
    x_bar = pca_frames.centroid(batch.pos, batch.batch, B)
    with torch.no_grad():
        S, V = c.node_inputs(batch, x_bar)
        iu = torch.triu_indices(c.n_v, c.n_v)
        h = c.embed(torch.cat([S, (V @ V.transpose(1, 2))[:, iu[0], iu[1]]], dim=-1))
        src, dst = batch.edge_index
        evec = batch.pos[src] - batch.pos[dst]
        e_s = torch.cat([(evec * evec).sum(-1, keepdim=True), batch.edge_attr], dim=-1)
        for phi, psi in zip(c.phi, c.psi):
            m = phi(torch.cat([h[dst], h[src], e_s], dim=-1))
            h = h + psi(torch.cat([h, torch.zeros_like(h).index_add_(0, dst, m)], dim=-1))
        a = c.node_coef(h).reshape(-1, c.n_v, c.n_out)
        b = c.edge_coef(m)
        u_node = torch.zeros(B, c.n_out, 3, dtype=V.dtype).index_add_(0, batch.batch, a.transpose(1, 2) @ V)
        u_edge = torch.zeros(B, c.n_out, 3, dtype=V.dtype).index_add_(
            0, batch.batch[dst], b.unsqueeze(-1) * evec.unsqueeze(1))
        assert rel(c(batch, x_bar), u_node + u_edge) < 1e-12
        x = torch.randn(5, c.embed[0].in_features, dtype=S.dtype)
        assert torch.equal(run_mlp(c.embed, x), c.embed(x))  # the functional MLP is the module, bit for bit
