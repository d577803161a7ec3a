"""Frame averaging (whole-model and per-layer FA-GNN), PCA canonicalisation and learned
canonicalisation (methods/wrappers/frame_averaging.py, fa_gnn.py, canonicalization.py,
pca_canonicalization.py, methods/blocks/pca_frames.py)."""
from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch
from torch_geometric.utils import scatter

import equibench as eb
from equibench.methods.base import count_parameters
from equibench.methods.blocks.pca_frames import exact_rep, frame_set, gram_schmidt, into_frame
from equibench.metrics.equivariance import cast_batch
from equibench.symmetry.fieldtypes import representation
from equibench.symmetry.group3d import act_on_batch, sample_element, sample_rotations
from equibench.symmetry.precision import default_dtype

FRAME_METHODS = [("frame_averaging", {}), ("frame_averaging", {"group": "SO3"}),
                 ("frame_averaging", {"stochastic": True}), ("pca_canonicalization", {}),
                 ("pca_canonicalization", {"group": "SO3"}), ("canonicalization", {}),
                 ("canonicalization", {"group": "SO3"}), ("fa_gnn", {}), ("fa_gnn", {"group": "SO3"})]


@pytest.fixture(scope="module")
def nbody():
    task = eb.get_task("nbody", train_size=100, val_size=100, test_size=100)
    return task.spec, task.load("test")


def batch_of(data, n=16, start=0, dtype=torch.float64):
    return cast_batch(Batch.from_data_list(data[start:start + n]), dtype)


def build(name, spec, dtype=torch.float64, seed=0, **opts):
    torch.manual_seed(seed)
    with default_dtype(dtype):
        return eb.get_method(name, **opts).build(spec, seed)


def measure_group(method) -> str:
    return "SE3" if method.group == "SO3" else "E3"


@pytest.mark.parametrize("name,opts", FRAME_METHODS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_exact_equivariance(nbody, name, opts, dtype, tol):
    spec, data = nbody
    method = eb.get_method(name, **opts)
    assert method.exact and method.group == opts.get("group", "O3")
    model = build(name, spec, dtype, **opts)
    err = eb.equivariance_error(model, batch_of(data), spec, n_samples=4, dtype=dtype, group=measure_group(method))
    assert err["rel_max"] < tol, err


@pytest.mark.parametrize("name", ["frame_averaging", "pca_canonicalization", "canonicalization"])
def test_so3_variants_are_not_reflection_equivariant(nbody, name):
    spec, data = nbody
    model = build(name, spec, group="SO3")
    err = eb.equivariance_error(model, batch_of(data, 8), spec, n_samples=4, group="E3")
    assert err["rel_max"] > 1e-3  # the declared group is the true one: reflections break it


def test_frame_sets(nbody):
    spec, data = nbody
    b = batch_of(data, 8)
    model = build("frame_averaging", spec)
    F, t = model.frames(b)
    assert F.shape == (8, 8, 3, 3)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(F.transpose(-1, -2) @ F, eye.expand_as(F), atol=1e-12)
    c = b.pos - t[b.batch]
    C = torch.einsum("ni,nj->nij", c, c).reshape(-1, 9)
    C = torch.zeros(8, 9, dtype=torch.float64).index_add_(0, b.batch, C).reshape(8, 3, 3)
    D = F.transpose(-1, -2) @ C.unsqueeze(1) @ F  # diagonal with decreasing entries in every frame
    assert torch.allclose(D - torch.diag_embed(torch.diagonal(D, dim1=-2, dim2=-1)), torch.zeros_like(D), atol=1e-10)
    diag = torch.diagonal(D, dim1=-2, dim2=-1)
    assert (diag[..., :-1] >= diag[..., 1:]).all()
    assert len({tuple(torch.sign(torch.diagonal(F[0, 0].T @ F[0, k])).tolist()) for k in range(8)}) == 8
    Fs = frame_set(F[:, 0], "SO3")
    assert Fs.shape[1] == 4 and torch.allclose(torch.linalg.det(Fs), torch.ones(8, 4, dtype=torch.float64))


def reference_loop(model, batch, spec):
    """Frame averaging written out as a Python loop over the frames, with explicit formulas:
    pos -> F^T (x - t), vel -> F^T v, output y -> F y + t."""
    F, t = model.frames(batch)
    outs = []
    for k in range(F.shape[1]):
        Fk = F[:, k][batch.batch]
        framed = batch.clone()
        framed.pos = torch.einsum("nji,nj->ni", Fk, batch.pos - t[batch.batch])
        framed.vel = torch.einsum("nji,nj->ni", Fk, batch.vel)
        y = model.backbone(framed)
        outs.append(torch.einsum("nij,nj->ni", Fk, y) + t[batch.batch])
    return torch.stack(outs)


def test_batched_fa_equals_python_loop(nbody):
    spec, data = nbody
    b = batch_of(data, 8)
    for group in ("O3", "SO3"):
        model = build("frame_averaging", spec, group=group).eval()
        with torch.no_grad():
            ref = reference_loop(model, b, spec)
            assert ref.shape[0] == (8 if group == "O3" else 4)
            assert (model(b) - ref.mean(0)).abs().max() < 1e-12


def test_stochastic_fa_train_samples_one_frame_eval_averages(nbody):
    spec, data = nbody
    b = batch_of(data, 8)
    sto = build("frame_averaging", spec, stochastic=True)
    full = build("frame_averaging", spec)
    full.load_state_dict(sto.state_dict())
    with torch.no_grad():
        per_frame = reference_loop(sto, b, spec)  # [8, N, 3]
        sto.train()
        a, c = sto(b), sto(b)
        assert (a - c).abs().max() > 1e-6  # a fresh random frame per call
        for out in (a, c):  # every graph's prediction is exactly one frame's prediction
            dist = (per_frame - out).abs().amax(-1)  # [8, N]
            per_graph = scatter(dist, b.batch, dim=1, dim_size=8, reduce="max")
            assert per_graph.min(0).values.max() < 1e-12
        sto.eval()
        full.eval()
        assert (sto(b) - full(b)).abs().max() < 1e-14


def test_parameter_counts(nbody):
    spec, _ = nbody
    base = count_parameters(build("baseline", spec))
    assert count_parameters(build("frame_averaging", spec)) == base
    assert count_parameters(build("pca_canonicalization", spec)) == base
    canon = count_parameters(build("canonicalization", spec))
    assert canon > base  # unmatched: backbone width 64 plus the canonicaliser
    # FA / PCA canonicalisation add no parameters; their backbone is sized by Baseline.build_backbone
    assert build("frame_averaging", spec, width=48).backbone.net.width == 48
    matched = build("canonicalization", spec, params=base)
    assert abs(count_parameters(matched) - base) <= 0.1 * base
    assert matched.backbone.net.width < 64  # the canonicaliser's parameters are paid by the backbone


@pytest.mark.parametrize("group", ["O3", "SO3"])
def test_learned_rotation_is_orthogonal_and_equivariant(nbody, group):
    spec, data = nbody
    b = batch_of(data, 16)
    model = build("canonicalization", spec, group=group)
    with torch.no_grad():
        R = model.rotation(b)
        eye = torch.eye(3, dtype=torch.float64).expand_as(R)
        assert torch.allclose(R @ R.transpose(-1, -2), eye, atol=1e-12)
        det = torch.linalg.det(R)
        assert torch.allclose(det.abs(), torch.ones(16, dtype=torch.float64), atol=1e-12)
        g = sample_element(b, "E3" if group == "O3" else "SE3", torch.Generator().manual_seed(1), permute=True)
        R_g = model.rotation(act_on_batch(b, spec, g, target=False))
        # F(gX) = Q F(X) with F = R^T, i.e. R(gX) = R(X) Q^T (and det R(gX) = det Q det R(X))
        assert torch.allclose(R_g, R @ g.R.transpose(-1, -2), atol=1e-10)
    if group == "SO3":
        assert torch.allclose(det, torch.ones(16, dtype=torch.float64))


@pytest.mark.parametrize("group", ["O3", "SO3"])
def test_pca_canonical_input_gives_identity(nbody, group):
    spec, data = nbody
    b = batch_of(data, 16)
    model = build("pca_canonicalization", spec, group=group)
    F, t = model.frame(b)
    canon = act_on_batch(b, spec, into_frame(F, t), target=False)  # R (x - t), R v with R = F^T
    R2 = model.rotation(canon)
    assert torch.allclose(R2, torch.eye(3, dtype=torch.float64).expand_as(R2), atol=1e-10)
    assert torch.allclose(model.frame(canon)[1], torch.zeros(16, 3, dtype=torch.float64), atol=1e-12)
    if group == "SO3":
        assert torch.allclose(torch.linalg.det(F), torch.ones(16, dtype=torch.float64))


class FixedVectors(torch.nn.Module):
    """A stand-in canonicaliser returning the same vectors for every graph (not equivariant)."""

    def __init__(self, u: torch.Tensor) -> None:
        super().__init__()
        self.u = torch.nn.Parameter(u)

    def forward(self, batch, x_bar):
        return self.u.expand(int(batch.num_graphs), -1, -1)


def test_prior_loss_and_identity_metric(nbody):
    spec, data = nbody
    b = batch_of(data, 8)
    method = eb.get_method("canonicalization", prior_weight=7.0)
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        model = method.build(spec)
    pred = model(b)
    R = model.rotation(b)
    loss = method.auxiliary_loss(model, b, pred)
    assert loss.item() > 0 and torch.isclose(loss, 7.0 * (R - torch.eye(3, dtype=torch.float64)).pow(2).mean())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.canonicaliser.parameters())
    model.canonicaliser = FixedVectors(torch.cat([torch.eye(3), torch.zeros(1, 3)]).double())
    pred = model(b)
    assert method.auxiliary_loss(model, b, pred).item() == 0.0
    metrics = method.extra_metrics(model, b, pred)
    assert metrics["identity_metric"] == 1.0 and metrics["identity_share"] == 1.0
    tilt = torch.linalg.matrix_exp(torch.tensor([[0, -0.3, 0], [0.3, 0, 0], [0, 0, 0]], dtype=torch.float64))
    model.canonicaliser = FixedVectors(torch.cat([tilt.T, torch.zeros(1, 3, dtype=torch.float64)]))
    pred = model(b)  # R = tilt^T: 0.3 rad = 17.2 degrees from the identity
    metrics = method.extra_metrics(model, b, pred)
    assert metrics["identity_share"] == 0.0 and abs(metrics["mean_angle_deg"] - 17.1887) < 1e-3
    # equiadapt's identity metric: 1 - MSE(R, I) = 1 - (6 - 2 tr R) / 9, tr R = 1 + 2 cos(0.3)
    expected = 1.0 - (4.0 - 4.0 * torch.cos(torch.tensor(0.3, dtype=torch.float64)).item()) / 9.0
    assert abs(metrics["identity_metric"] - expected) < 1e-12
    assert abs(metrics["prior_mse"] - (1.0 - expected)) < 1e-12


def test_canonicalisation_prior_defaults_follow_equiadapt(nbody):
    """No prior on n-body (equiadapt's n-body example), weight 100 on images (its image setting)."""
    spec, data = nbody
    method = eb.get_method("canonicalization")
    assert method.prior_weight_for("graph3d") == 0.0 and method.prior_weight_for("image2d") == 100.0
    model = build("canonicalization", spec)
    b = batch_of(data, 4)
    assert method.auxiliary_loss(model, b, model(b)) is None
    assert eb.get_method("canonicalization", prior_weight=3.0).prior_weight_for("image2d") == 3.0


@pytest.mark.parametrize("name,opts", FRAME_METHODS)
def test_exactly_degenerate_inputs_stay_finite(nbody, name, opts):
    spec, data = nbody
    b = batch_of(data, 4)
    model = build(name, spec, **opts).train()
    worst = b.clone()
    worst.pos = torch.zeros_like(b.pos) + 1.5  # coincident points: zero covariance, zero edges
    worst.vel = torch.zeros_like(b.vel)  # and no velocity: every equivariant vector is zero
    line = b.clone()
    line.pos = torch.linspace(-1, 1, b.num_nodes, dtype=torch.float64)[:, None] * torch.tensor([1.0, 2.0, 0.5])
    for bad in (worst, line):
        out = model(bad)
        assert torch.isfinite(out).all()
        out.pow(2).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gram_schmidt_guards_and_handedness():
    u = torch.randn(64, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Q = sample_rotations(64, True, torch.Generator().manual_seed(1))
    F = gram_schmidt(u, "O3")
    assert torch.allclose(gram_schmidt(u @ Q.transpose(-1, -2), "O3"), Q @ F, atol=1e-12)  # rows u_k -> Q u_k
    assert torch.allclose(torch.linalg.det(gram_schmidt(u, "SO3")), torch.ones(64, dtype=torch.float64))
    zero = torch.zeros(2, 3, 3, dtype=torch.float64)
    zero[1, 1] = torch.tensor([0.0, 0.0, 1.0])  # u1 = 0, u2 along z
    F0 = gram_schmidt(zero, "O3")
    assert torch.isfinite(F0).all()
    assert torch.allclose(F0.transpose(-1, -2) @ F0, torch.eye(3, dtype=torch.float64).expand(2, 3, 3))


def test_exact_rep_matches_e3nn_and_is_exact_near_identity():
    types = "2x0e+0o+1o+1e+2e+2x2o"
    R = sample_rotations(16, True, torch.Generator().manual_seed(0))
    with default_dtype(torch.float64):
        assert torch.allclose(exact_rep(types, R), representation(types, R), atol=1e-12)
    A = torch.tensor([[0, -1e-9, 0], [1e-9, 0, 0], [0, 0, 0]], dtype=torch.float32)
    Rn = torch.linalg.matrix_exp(A)
    assert torch.equal(exact_rep("1o", Rn), Rn)
    assert torch.equal(exact_rep("1e", -Rn), Rn)
