"""Tensor frames: representations, frames, the PyG hook wrapper, and the two methods."""
from __future__ import annotations

import pytest
import torch
from e3nn import o3
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import EdgeConv, GINEConv

import equibench as eb
from equibench.core.errors import UserError
from equibench.methods.blocks.backbone import BackboneLayer, mlp
from equibench.methods.blocks.tfmp import (
    FrameWrapped,
    LearnedFrames,
    NearestFrames,
    attach_tensor_frames,
    edge_frames,
    gram_schmidt,
    rho,
    rho_matrix,
    wigner_d,
)
from equibench.methods.wrappers.tensor_frames import frame_invariants
from equibench.symmetry.group3d import sample_rotations
from equibench.symmetry.precision import default_dtype

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids oversubscription on shared CI cores (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def nbody_batch(n_graphs: int = 8, n: int = 5, seed: int = 0, dtype: torch.dtype = F64) -> Batch:
    """A random n-body batch with the ``nbody`` task's fields (complete graphs, charges +-1)."""
    g = torch.Generator().manual_seed(seed)
    src, dst = (~torch.eye(n, dtype=torch.bool)).nonzero().T
    data = []
    for _ in range(n_graphs):
        q = torch.randint(0, 2, (n, 1), generator=g).to(dtype) * 2 - 1
        data.append(Data(pos=torch.randn(n, 3, generator=g, dtype=dtype),
                         vel=torch.randn(n, 3, generator=g, dtype=dtype) * 0.5, charge=q,
                         edge_index=torch.stack([src, dst]), edge_attr=q[src] * q[dst],
                         y=torch.randn(n, 3, generator=g, dtype=dtype)))
    return Batch.from_data_list(data)


def spec():
    return eb.get_task("nbody").spec


def random_o3(n: int, seed: int, reflections: bool = True) -> torch.Tensor:
    return sample_rotations(n, reflections, torch.Generator().manual_seed(seed))


# ---- (i) rho(R_i R_j^T) equals "to global, then to frame i" ------------------------------------
def _direct(kind: str, R: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Independent representation action of per-row ``R`` on global features ``f``."""
    det = torch.linalg.det(R)[:, None]
    if kind in ("1n", "1p"):
        out = torch.einsum("eab,eb->ea", R, f)
        return out * det if kind == "1p" else out
    if kind in ("2n", "2p"):
        T = f.reshape(-1, 3, 3)
        out = (R @ T @ R.transpose(1, 2)).reshape(-1, 9)
        return out * det if kind == "2p" else out
    return torch.einsum("eab,eb->ea", o3.Irreps(kind).D_from_matrix(R), f)


@pytest.mark.parametrize("kind", ["1n", "2n", "1p", "2p", "1o+2e", "0o+1e+3o"])
def test_rho_moves_features_between_frames(kind):
    E = 64
    with default_dtype(F64):
        R_i, R_j = random_o3(E, 1), random_o3(E, 2)
        dim = {"1n": 3, "1p": 3, "2n": 9, "2p": 9}.get(kind) or o3.Irreps(kind).dim
        f_global = torch.randn(E, dim, generator=torch.Generator().manual_seed(3), dtype=F64)
        f_j = _direct(kind, R_j, f_global)  # the feature as stored at node j (its own frame)
        expected = _direct(kind, R_i, f_global)  # the same feature expressed in frame i
        got = rho(kind, R_i @ R_j.transpose(1, 2), f_j)
        assert (got - expected).abs().max() < 1e-12
        # the matrix form agrees, and is a representation: rho(AB) = rho(A) rho(B)
        M = rho_matrix(kind, R_i)
        assert (torch.einsum("eab,eb->ea", M, f_global) - _direct(kind, R_i, f_global)).abs().max() < 1e-12
        assert (rho_matrix(kind, R_i @ R_j) - M @ rho_matrix(kind, R_j)).abs().max() < 1e-12


def test_mixed_reps_act_blockwise_and_wigner_d_is_e3nn():
    with default_dtype(F64):
        U = random_o3(16, 4)
        x = torch.randn(16, 2 + 3 + 9)
        y = rho("2x0n+1x1n+1x2p", U, x)
        assert torch.equal(y[:, :2], x[:, :2])
        assert torch.allclose(y[:, 2:5], _direct("1n", U, x[:, 2:5]), atol=1e-13)
        assert torch.allclose(y[:, 5:], _direct("2p", U, x[:, 5:]), atol=1e-13)
        for l in range(5):
            ref = o3.Irreps([(1, (l, (-1) ** l))]).D_from_matrix(U)
            assert (wigner_d(l, U) - ref).abs().max() < 1e-12


# ---- (ii) frames are equivariant: R(gX) = R(X) g^T ---------------------------------------------
@pytest.mark.parametrize("kind", ["learned", "nearest"])
@pytest.mark.parametrize("so3", [False, True])
def test_frames_equivariant(kind, so3):
    torch.manual_seed(0)
    with default_dtype(F64):
        b = nbody_batch(6)
        frames = LearnedFrames(2, 3, so3=so3) if kind == "learned" else NearestFrames(so3=so3)
        node_inv, edge_inv = torch.randn(b.num_nodes, 2), torch.randn(b.num_edges, 3)
        R = frames(b.pos, b.edge_index, node_inv, edge_inv)
        dets = torch.linalg.det(R)
        for k, g in enumerate(random_o3(6, 10, reflections=not so3)):
            Rg = frames(b.pos @ g.T + torch.randn(3), b.edge_index, node_inv, edge_inv)
            assert (Rg - R @ g.T).abs().max() < 1e-10, k
        if so3:
            assert torch.allclose(dets, torch.ones_like(dets))
        else:  # reflections flip the handedness: some frame must be able to be left-handed
            g = -torch.eye(3)
            assert torch.allclose(torch.linalg.det(frames(b.pos @ g.T, b.edge_index, node_inv, edge_inv)), -dets)


# ---- (iii) hooks: stock EdgeConv and the shared BackboneLayer ----------------------------------
class StockNet(nn.Module):
    """Stock PyG layers EdgeConv -> GINEConv -> EdgeConv on (vel, pos) -> a point prediction. With
    ``frames`` the instances get tensor-frame hooks: vel is global "1o"; hidden features are
    local "4x0n+2x1n"; GINEConv's edge_attr [r^2 (x4), r_ij, |r_ij| r_ij] is global
    "4x0n+2x1n"; the last layer's output is a local vector, mapped back with R_i^T."""

    def __init__(self, frames: bool) -> None:
        super().__init__()
        self.use_frames = frames
        convs = [EdgeConv(mlp([6, 16, 10])), GINEConv(mlp([10, 16, 10])), EdgeConv(mlp([20, 16, 3]))]
        if frames:
            self.frames = NearestFrames()
            hidden = "4x0n+2x1n"
            convs = [FrameWrapped(convs[0], {"x": ("1o", "global")}),
                     FrameWrapped(convs[1], {"x": hidden, "edge_attr": (hidden, "global")}),
                     FrameWrapped(convs[2], {"x": hidden})]
        self.convs = nn.ModuleList(convs)

    def forward(self, batch: Batch) -> torch.Tensor:
        ei = batch.edge_index
        r = batch.pos[ei[0]] - batch.pos[ei[1]]
        d = r.norm(dim=-1, keepdim=True)
        edge_attr = torch.cat([d.expand(-1, 4) ** 2, r, d * r], dim=-1)
        kw = {"lframes": self.frames(batch.pos, ei)} if self.use_frames else {}
        h = self.convs[0](batch.vel, ei, **kw)
        h = self.convs[1](h, ei, edge_attr, **kw)
        h = self.convs[2](h, ei, **kw)
        if self.use_frames:
            h = torch.einsum("nji,nj->ni", kw["lframes"], h)
        return batch.pos + h


def test_hooks_make_stock_layers_equivariant():
    torch.manual_seed(0)
    with default_dtype(F64):
        wrapped, plain = StockNet(frames=True), StockNet(frames=False)
        b = nbody_batch(8)
        err_wrapped = eb.equivariance_error(wrapped, b, spec(), n_samples=4)["rel_max"]
        err_plain = eb.equivariance_error(plain, b, spec(), n_samples=4)["rel_max"]
    assert err_wrapped < 1e-10
    assert err_plain > 1e-3
    # hooks live on the instances only: a fresh EdgeConv has none
    fresh = EdgeConv(mlp([6, 3]))
    assert not fresh._message_forward_pre_hooks and not fresh._propagate_forward_pre_hooks
    with pytest.raises(RuntimeError, match="no frames"):
        wrapped.convs[0].layer(b.vel, b.edge_index)


def test_hooks_on_backbone_layer_transform_h_j_and_edge_vec():
    torch.manual_seed(0)
    with default_dtype(F64):
        b = nbody_batch(3)
        layer = attach_tensor_frames(BackboneLayer(8, 1), {"h": "2x0n+2x1n", "edge_vec": ("1o", "global")})
        seen = {}
        layer.register_message_forward_pre_hook(lambda m, inp: seen.update(inp[0]))  # runs after ours
        R = random_o3(b.num_nodes, 5)
        h = torch.randn(b.num_nodes, 8)
        src, dst = b.edge_index
        vec = b.pos[src] - b.pos[dst]
        layer(h, b.edge_index, vec, vec.norm(dim=-1, keepdim=True), lframes=R)
        U = R[dst] @ R[src].transpose(1, 2)
        assert torch.allclose(seen["h_i"], h[dst])
        assert torch.allclose(seen["h_j"][:, :2], h[src][:, :2])
        vj = h[src][:, 2:].reshape(-1, 2, 3)
        assert torch.allclose(seen["h_j"][:, 2:].reshape(-1, 2, 3), torch.einsum("eab,ekb->eka", U, vj))
        assert torch.allclose(seen["edge_vec"], torch.einsum("eab,eb->ea", R[dst], vec))
        assert layer._tf_cache is None  # per-call state dropped after propagate
        out = layer(h, b.edge_index, vec, vec.norm(dim=-1, keepdim=True), lframes=R)
        shared = edge_frames(R, b.edge_index)  # precomputed per-edge frames give the same result
        assert torch.equal(layer(h, b.edge_index, vec, vec.norm(dim=-1, keepdim=True), lframes=shared), out)
        with pytest.raises(ValueError, match="EdgeFrames"):
            layer(h, b.edge_index[:, :-1], vec[:-1], vec[:-1, :1], lframes=shared)


# ---- (iv) degenerate inputs stay finite --------------------------------------------------------
@pytest.mark.parametrize("case", ["collinear", "coincident"])
@pytest.mark.parametrize("name,opts", [("tensor_frames", {}), ("tensor_frames", {"frames": "nearest"}),
                                       ("local_canonicalization", {"so3": True})])
def test_degenerate_inputs_finite(case, name, opts):
    torch.manual_seed(0)
    b = nbody_batch(4, dtype=torch.float32)
    if case == "collinear":
        b.pos = torch.linspace(-1, 1, b.num_nodes)[:, None] * torch.tensor([[1.0, 2.0, -0.5]])
        b.vel = torch.zeros_like(b.vel)
    else:
        b.pos[1] = b.pos[0]
        b.pos[6:10] = b.pos[5]  # a graph with all points coincident
    model = eb.get_method(name, **opts).build(spec())
    out = model(b)
    assert torch.isfinite(out).all()
    ((out - b.y) ** 2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    R = model.frames(b.pos, b.edge_index, *frame_invariants(b, model.spec, b.pos))
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand_as(R), atol=1e-5)
    # deterministic
    assert torch.equal(model(b), model(b))


# ---- (v) Gram-Schmidt --------------------------------------------------------------------------
def test_gram_schmidt_orthonormal_with_degenerate_candidates():
    g = torch.Generator().manual_seed(0)
    with default_dtype(F64):
        c = torch.randn(40, 3, 3, generator=g)
        c[:5, 0] = 0  # zero first vector
        c[5:10, 1] = 3 * c[5:10, 0]  # parallel
        c[10:15] = 0  # nothing at all -> global axes
        c[15:20, :, 2] = 0  # coplanar
        for hand in (None, torch.randn(40, 1, 3, generator=g)):
            R = gram_schmidt(c, hand)
            assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(40, 3, 3), atol=1e-12)
            det = torch.linalg.det(R)
            assert torch.allclose(det.abs(), torch.ones(40))
            if hand is None:
                assert torch.allclose(det, torch.ones(40))
            else:
                assert (det < 0).any() and (det > 0).any()
                s = (R[:, 2] * hand[:, 0]).sum(-1)
                assert (s >= 0).all()  # handedness follows the third vector
        # generic rows: x along v1, y in span(v1, v2) on v2's side
        R = gram_schmidt(c[20:])
        v1, v2 = c[20:, 0], c[20:, 1]
        assert torch.allclose(R[:, 0], v1 / v1.norm(dim=-1, keepdim=True))
        assert torch.allclose((R[:, 2] * v2).sum(-1), torch.zeros(20), atol=1e-12)
        assert ((R[:, 1] * v2).sum(-1) > 0).all()


# ---- the methods -------------------------------------------------------------------------------
CASES = [("tensor_frames", {}), ("tensor_frames", {"so3": True}), ("tensor_frames", {"frames": "nearest"}),
         ("tensor_frames", {"hidden_reps": "8x0e+2x1o+1x2e+1x1e", "depth": 2}),
         ("tensor_frames", {"hidden_reps": "8x0n+2x1n+1x2p", "depth": 2}),
         ("local_canonicalization", {}), ("local_canonicalization", {"frames": "nearest", "so3": True})]


@pytest.mark.parametrize("name,opts", CASES)
def test_methods_exactly_equivariant(name, opts):
    method = eb.get_method(name, **opts)
    assert method.exact and method.group == ("SO3" if opts.get("so3") else "O3")
    b = nbody_batch(16, seed=1)
    group = "SE3" if method.group == "SO3" else "E3"
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-4)):
        torch.manual_seed(0)
        with default_dtype(dtype):
            model = method.build(spec())
        assert eb.equivariance_error(model, b, spec(), n_samples=4, dtype=dtype, group=group)["rel_max"] < tol


def test_so3_frames_are_not_reflection_equivariant():
    torch.manual_seed(0)
    with default_dtype(F64):
        model = eb.get_method("tensor_frames", so3=True).build(spec())
        assert eb.equivariance_error(model, nbody_batch(8), spec(), n_samples=4)["rel_max"] > 1e-3


def test_tensor_messages_differ_from_local_canonicalization():
    """Same weights, same frames: only the rho(R_i R_j^T) on h_j differs, and it matters."""
    torch.manual_seed(0)
    tf = eb.get_method("tensor_frames", width=24, depth=2).build(spec())
    lc = eb.get_method("local_canonicalization", width=24, depth=2).build(spec())
    lc.load_state_dict(tf.state_dict())
    b = nbody_batch(4, dtype=torch.float32)
    assert (tf(b) - lc(b)).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["tensor_frames", "local_canonicalization"])
def test_params_and_options(name):
    model = eb.get_method(name, params=30000).build(spec())
    assert abs(sum(p.numel() for p in model.parameters()) - 30000) <= 3000
    with pytest.raises(UserError):
        eb.get_method(name, frames="random")
    if name == "tensor_frames":
        with pytest.raises(UserError):
            eb.get_method(name, hidden_reps="3x1q")
        m = eb.get_method(name, hidden_reps="8x0n+2x1n+1x2n", params=40000).build(spec())
        assert abs(sum(p.numel() for p in m.parameters()) - 40000) <= 4000


def test_general_field_types_node_and_graph_level():
    """Pseudo-scalar/pseudo-vector/rank-2 inputs, a global edge vector input, irreps outputs."""
    from equibench.core.spec import TaskSpec

    g = torch.Generator().manual_seed(0)
    src, dst = (~torch.eye(6, dtype=torch.bool)).nonzero().T
    data = []
    for _ in range(6):
        pos = torch.randn(6, 3, generator=g, dtype=F64)
        data.append(Data(pos=pos, f=torch.randn(6, 11, generator=g, dtype=F64), edge_index=torch.stack([src, dst]),
                         ea=torch.cat([torch.randn(src.numel(), 1, generator=g, dtype=F64), pos[src] - pos[dst]], -1)))
    b = Batch.from_data_list(data)
    for level in ("node", "graph"):
        s = TaskSpec(name="synthetic", domain="graph3d", group="E3", inputs={"pos": "point", "f": "2x0e+1e+2e+0o"},
                     output="0e+1o+1e+2e", level=level, loss="mse", metrics=("mse",), edge_inputs={"ea": "0e+1o"})
        torch.manual_seed(0)
        with default_dtype(F64):
            model = eb.get_method("tensor_frames", hidden_reps="4x0e+1x1o+1x1e+1x2e+1x0o", depth=2).build(s)
            out = model(b)
            assert out.shape == (6 if level == "graph" else b.num_nodes, 1 + 3 + 3 + 5)
            assert eb.equivariance_error(model, b, s, n_samples=3)["rel_max"] < 1e-10


# ---- (vi) "wide" frames: graph-level candidates ------------------------------------------------
def test_context_vectors_and_votes_match_pairwise_sums():
    """The closed forms from graph-level moments equal the pairwise sums they stand for."""
    from equibench.methods.blocks.tfmp import FrameContext, _votes, context_vectors

    g = torch.Generator().manual_seed(0)
    pos = torch.randn(13, 3, generator=g, dtype=F64) * 2 + 1
    batch = torch.tensor([0] * 5 + [1] * 8)
    vel = torch.randn(13, 1, 3, generator=g, dtype=F64)
    z = torch.randn(13, 3, generator=g, dtype=F64)
    nodes = torch.tensor([0, 3, 5, 12])
    got = context_vectors(pos, nodes, FrameContext(batch, 2, vel))
    votes = _votes(pos, nodes, batch, 2, z)
    for row, i in enumerate(nodes.tolist()):
        same = batch == batch[i]
        d = pos[same] - pos[i]
        c = pos[same].mean(0)
        y, yi = pos[same] - c, pos[i] - c
        M = y.T @ y
        T = ((y * y).sum(-1, keepdim=True) * y).sum(0)
        want = torch.stack([-yi, M @ yi, T, M @ T, ((d * d).sum(-1, keepdim=True) * d).sum(0),
                            vel[i, 0], vel[same, 0].sum(0)])
        assert torch.allclose(got[row], want, atol=1e-10)
        zs = z[same]
        want_votes = torch.stack([zs.sum(0), (zs * (y @ yi)[:, None]).sum(0),
                                  (zs * (d * d).sum(-1, keepdim=True)).sum(0)])
        assert torch.allclose(votes[row], want_votes, atol=1e-10)


def test_wide_frames_are_equivariant_where_local_ones_are_undecided():
    """A cloud whose first node has an exactly planar neighbourhood: local handedness stays
    undecided there (status), "wide" decides it from the graph, equivariantly."""
    torch.manual_seed(0)
    with default_dtype(F64):
        pos = torch.randn(12, 3)
        pos[:6, 2] = 0  # nodes 0-5 coplanar; node 0's neighbours are 1-5
        knn = torch.cdist(pos, pos).topk(6, largest=False).indices[:, 1:]
        knn[0] = torch.tensor([1, 2, 3, 4, 5])
        src = knn.reshape(-1)
        dst = torch.arange(12).repeat_interleave(5)
        ei = torch.stack([src, dst])
        for handedness in ("local", "wide"):
            frames = NearestFrames(handedness=handedness)
            R, st = frames.compute(pos, ei)
            assert bool(st.undecided[0]) == (handedness == "local")
            errs = []
            for g in random_o3(6, 5):
                Rg = frames(pos @ g.T + 1.0, ei)
                errs.append(float((Rg[0] - R[0] @ g.T).abs().max()))
            if handedness == "wide":
                assert max(errs) < 1e-10
            else:  # left as x cross y: flips under the reflections among the samples
                assert max(errs) > 0.1


def test_handedness_option_is_validated():
    with pytest.raises(UserError):
        eb.get_method("tensor_frames", handedness="global")
    assert eb.get_method("local_canonicalization").options["handedness"] == "wide"


def test_wide_handedness_takes_the_strongest_signal_not_the_first_past_the_threshold():
    """float32, qm9-like: an earlier handedness vector whose sign disagrees sits at |<h, z>| ~ hand_eps;
    rounding moving it across the threshold must not flip z (measured: 2e-2 relative output error)."""
    from equibench.methods.blocks.tfmp import gram_schmidt
    cand = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]).expand(2, -1, -1)
    hand = torch.tensor([[[1.0, 0.0, -1.2e-5], [0.0, 1.0, 8e-5]],    # just above the threshold
                         [[1.0, 0.0, -1.0e-5], [0.0, 1.0, 8e-5]]])   # just below it
    R = gram_schmidt(cand, hand, hand_eps=1e-5)
    assert torch.equal(R[0, 2], R[1, 2]) and R[0, 2, 2] > 0


def test_wide_frames_float32_avoid_nearly_parallel_y_candidate():
    """float32: v2 at a sine of 3e-5 to v1 (trained weights do this) amplifies rounding ~ u / sine;
    a later equivariant candidate at a large sine gives a frame equivariant to float32 rounding."""
    from equibench.methods.blocks.tfmp import finish_frames
    gen = torch.Generator().manual_seed(0)
    v1 = torch.tensor([6.0, 1.0, -2.0], dtype=torch.float64)
    v2 = 0.5 * v1 + 3e-5 * 6.4 * torch.tensor([0.3, -0.6, -0.6], dtype=torch.float64)
    md = torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)
    cand = torch.stack([v1, v2, md])[None]
    hand = torch.stack([md + torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64)])[None]
    pos = torch.zeros(1, 3)
    errs = []
    for g in sample_rotations(8, True, gen):
        R0 = finish_frames(cand.float(), hand.float(), pos, "wide", None)[0]
        Rg = finish_frames((cand @ g.T).float(), (hand @ g.T).float(), pos, "wide", None)[0]
        errs.append((Rg - R0 @ g.T.float()).abs().max().item())
    assert max(errs) < 1e-5, errs


# ---- (vii) the fast paths compute what the general rules do ------------------------------------
def test_gram_schmidt_direct_rows_match_the_general_rule():
    """Rows decided by the first candidates (computed directly) and the rest (general rule) give
    exactly the frames and statuses of the general rule on every row, near its thresholds too."""
    from equibench.methods.blocks.tfmp import _gram_schmidt_rows

    g = torch.Generator().manual_seed(0)
    for dtype, hand_eps, well in ((F64, 1e-11, None), (torch.float32, 1e-5, 1e-3)):
        c = torch.randn(400, 4, 3, generator=g, dtype=F64)
        c[:40, 0] *= 1e-7  # x from a later candidate
        c[40:80, 1] = c[40:80, 0] * 2 + 1e-5 * torch.randn(40, 3, generator=g, dtype=F64)  # y near parallel
        c[80:120, 1] = c[80:120, 0] * 3 + 4e-4 * c[80:120, 2]  # sine between eps and the well threshold
        c[120:140, :3] = 0  # nothing: the global axes
        hand = torch.randn(400, 2, 3, generator=g, dtype=F64)
        hand[140:200] = torch.linalg.cross(c[140:200, 0], c[140:200, 1])[:, None] * 1e-12  # undecided
        c, hand = c.to(dtype), hand.to(dtype)
        for h in (None, hand):
            R, st = gram_schmidt(c, h, hand_eps=hand_eps, sin_well=well, return_status=True)
            R0, st0 = _gram_schmidt_rows(c, h, 1e-6, hand_eps, None, well)
            assert torch.equal(R, R0)
            for field in ("x_fallback", "y_fallback", "undecided", "widened", "weak"):
                assert torch.equal(getattr(st, field), getattr(st0, field)), field
            assert st.degenerate.any()  # the general rows were exercised


def test_planarity_certificate_never_excludes_a_planar_graph():
    """``_certainly_not_planar`` (which lets ``planar_symmetry`` skip its eigen-decomposition) never
    certifies a graph that the thickness test calls planar, for thicknesses around the threshold."""
    from torch_geometric.utils import scatter

    from equibench.methods.blocks.tfmp import _certainly_not_planar, hand_eps

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, F64):
        eps = hand_eps(dtype)
        B, n = 400, 7
        pos = torch.randn(B, n, 3, generator=g, dtype=F64)
        decades = 3 - torch.log10(torch.tensor(eps, dtype=F64))  # thickness from 1e-3 eps to 1
        pos[:, :, 2] *= eps * 10 ** (torch.rand(B, generator=g, dtype=F64) * decades - 3)[:, None]
        pos = (pos @ random_o3(B, 1).to(F64).transpose(1, 2) + 5 * torch.randn(B, 1, 3, generator=g, dtype=F64))
        pos = pos.to(dtype).reshape(-1, 3)
        batch = torch.arange(B).repeat_interleave(n)
        counts = torch.bincount(batch, minlength=B)
        d = pos - (scatter(pos, batch, dim=0, dim_size=B, reduce="sum") / n)[batch]
        C = scatter((d[:, :, None] * d[:, None, :]).reshape(-1, 9), batch, dim=0, dim_size=B).reshape(B, 3, 3)
        evals, evecs = torch.linalg.eigh(C.double())
        height = scatter((d * evecs[..., 0].to(dtype)[batch]).sum(-1).abs(), batch, dim=0, dim_size=B, reduce="max")
        radius = scatter(d.norm(dim=-1), batch, dim=0, dim_size=B, reduce="max")
        planar = (height <= eps * radius) & (evals[:, 1] > 1e-6 * evals[:, 2])
        certified = _certainly_not_planar(C, int(counts.max()), eps)
        assert planar.any() and certified.any() and not (planar & certified).any()


def test_gaussian_rbf_has_no_subnormals():
    from equibench.methods.blocks.tfmp import gaussian_rbf

    centers = torch.linspace(0.0, 5.0, 16)
    for dtype in (torch.float32, F64):
        r = torch.linspace(0.0, 20.0, 400, dtype=dtype)  # exponents down to -2048
        rbf = gaussian_rbf(r, centers, 5.12)
        plain = torch.exp(-5.12 * (r[:, None] - centers.to(dtype)) ** 2)  # the formula without the floor
        info = torch.finfo(dtype)
        assert (rbf >= info.tiny).all()  # normal numbers only
        big = plain > info.tiny / info.eps
        assert torch.equal(rbf[big], plain[big]) and (~big).any()
        assert (rbf[~big] <= 1.01 * info.tiny / info.eps).all()


def test_only_tensorial_hidden_features_get_hooks():
    """Edge vectors are moved into the receiver frames once per forward; the layers of local
    canonicalisation (invariant hidden features) carry no hooks, those of tensor frames one per layer."""
    tf = eb.get_method("tensor_frames", width=24, depth=2).build(spec())
    lc = eb.get_method("local_canonicalization", width=24, depth=2).build(spec())
    assert all(layer._message_forward_pre_hooks for layer in tf.net.layers)
    assert set(tf.net.layers[0]._tf_args) == {"h"}
    assert not any(layer._message_forward_pre_hooks or layer._propagate_forward_pre_hooks for layer in lc.net.layers)
