"""Methods built as their papers build them: ``fa_gnn`` (frame averaging at every layer, Puny et al.
2022), ``egnn`` (Satorras et al. 2021, n-body ``EGNN_vel``), ``e3nn_nequip`` (NequIP's
convolution), and equiadapt's canonicalisation settings and identity metric."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch_geometric.data import Batch, Data

import equibench as eb
from equibench.core.spec import TaskSpec
from equibench.methods.architectures.nequip_style import BesselBasis, polynomial_cutoff
from equibench.methods.base import count_parameters
from equibench.methods.wrappers.canonicalization import graph_canon_metrics
from equibench.metrics.equivariance import cast_batch
from equibench.symmetry.fieldtypes import field_dim
from equibench.symmetry.precision import default_dtype

NEW = ["fa_gnn", "egnn", "e3nn_nequip"]
SMALL = {"fa_gnn": {"width": 15, "depth": 3}, "egnn": {"width": 16, "depth": 2},
         "e3nn_nequip": {"mul": 4, "depth": 2, "radial_hidden": 16}}


@pytest.fixture(scope="module")
def nbody():
    task = eb.get_task("nbody", train_size=64, val_size=16, test_size=64)
    return task, task.load("train"), task.load("test")


def batch_of(data, n=8, start=0, dtype=torch.float64):
    return cast_batch(Batch.from_data_list(data[start:start + n]), dtype)


def build(name, spec, dtype=torch.float64, seed=0, **opts):
    torch.manual_seed(seed)
    with default_dtype(dtype):
        return eb.get_method(name, **opts).build(spec, seed)


# ---- all three -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_builds_predicts_and_trains_on_nbody(nbody, name):
    task, train, test = nbody
    model = build(name, task.spec, torch.float32, **SMALL[name])
    b = batch_of(test, 8, dtype=torch.float32)
    out = model(b)
    assert out.shape == (b.num_nodes, 3) and torch.isfinite(out).all()
    tb = batch_of(train, 16, dtype=torch.float32)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = task.loss(model(tb), tb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("name,opts,group", [("fa_gnn", {}, "E3"), ("fa_gnn", {"group": "SO3"}, "SE3"),
                                             ("egnn", {}, "E3"), ("e3nn_nequip", {}, "E3")])
def test_exact_in_float64_at_the_defaults(nbody, name, opts, group):
    task, _, test = nbody
    method = eb.get_method(name, **opts)
    assert method.exact
    model = build(name, task.spec, **opts)
    err = eb.equivariance_error(model, batch_of(test, 16), task.spec, n_samples=4, dtype=torch.float64, group=group)
    assert err["rel_max"] < 1e-10, err


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("target", [20_000, 80_000])
def test_parameter_matching(nbody, name, target):
    task, _, _ = nbody
    n = count_parameters(eb.get_method(name, params=target).build(task.spec))
    assert abs(n - target) <= 0.1 * target


def test_default_sizes_follow_the_papers(nbody):
    task, _, _ = nbody
    fa = build("fa_gnn", task.spec, torch.float32)
    assert fa.width == 60 and fa.depth == 4  # Puny et al. n-body: 4 layers, width 60
    eg = build("egnn", task.spec, torch.float32)
    assert eg.width == 64 and eg.depth == 4  # EGNN n-body: nf 64, 4 layers
    assert all(isinstance(m, torch.nn.SiLU) for m in eg.layers[0].phi_e if not isinstance(m, torch.nn.Linear))


def synthetic_batch(spec: TaskSpec, n_graphs=4, n_nodes=6, seed=0, dtype=torch.float64) -> Batch:
    """Random complete graphs carrying every typed field of ``spec`` (for tasks whose data is slow to load)."""
    g = torch.Generator().manual_seed(seed)
    src, dst = zip(*[(j, i) for i in range(n_nodes) for j in range(n_nodes) if i != j])
    graphs = []
    for _ in range(n_graphs):
        d = Data(edge_index=torch.tensor([src, dst]))
        for k, t in spec.inputs.items():
            d[k] = torch.randn(n_nodes, 3 if t == "point" else field_dim(t), generator=g, dtype=dtype)
        for k, t in spec.edge_inputs.items():
            d[k] = torch.randn(len(src), field_dim(t), generator=g, dtype=dtype)
        graphs.append(d)
    return Batch.from_data_list(graphs)


OTHER_SPECS = {
    "normals": TaskSpec(name="normals", domain="graph3d", group="O3", inputs={"pos": "point"}, output="1o",
                        level="node", loss="1-cos2", metrics=("1-cos2",)),
    "qm9": TaskSpec(name="qm9", domain="graph3d", group="E3", inputs={"pos": "point", "x": "5x0e"}, output="0e",
                    level="graph", loss="mse", metrics=("mae",)),
    "md_forces": TaskSpec(name="md", domain="graph3d", group="E3", inputs={"pos": "point", "x": "3x0e"},
                          output="1o", level="node", loss="mse", metrics=("force_mae",)),
}


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("task", list(OTHER_SPECS))
def test_other_graph_tasks_are_supported_and_exact(name, task):
    spec = OTHER_SPECS[task]
    method = eb.get_method(name, **SMALL[name])
    assert method.supports(spec) is None
    model = build(name, spec, **SMALL[name])
    b = synthetic_batch(spec)
    out = model(b)
    rows = b.num_graphs if spec.level == "graph" else b.num_nodes
    assert out.shape == (rows, 3 if spec.output == "1o" else 1)
    assert eb.equivariance_error(model, b, spec, n_samples=3, group=spec.group)["rel_max"] < 1e-10


def test_unsupported_tasks_say_why():
    pseudo = TaskSpec(name="p", domain="graph3d", group="O3", inputs={"pos": "point"}, output="1e", level="node",
                      loss="mse", metrics=("mse",))
    assert "1e" in eb.get_method("egnn").supports(pseudo)
    no_point = TaskSpec(name="q", domain="graph3d", group="O3", inputs={"x": "1o"}, output="0e", level="graph",
                        loss="mse", metrics=("mse",))
    for name in NEW:
        assert eb.get_method(name).supports(no_point)


# ---- fa_gnn ----------------------------------------------------------------------------------
SIGNS = {"O3": list(itertools.product((1.0, -1.0), repeat=3)), "SO3": list(itertools.product((1.0, -1.0), repeat=2))}


def pca_frames(points: torch.Tensor, group: str) -> list[torch.Tensor]:
    """Every PCA frame of one point set ``[M, 3]`` (columns = axes), computed independently of the package."""
    c = points - points.mean(0)
    _, V = torch.linalg.eigh(c.T @ c)
    V = V.flip(-1)
    if group == "O3":
        return [V * torch.tensor(s, dtype=V.dtype) for s in SIGNS[group]]
    out = []
    for s1, s2 in SIGNS[group]:
        a, b = s1 * V[:, 0], s2 * V[:, 1]
        out.append(torch.stack([a, b, torch.linalg.cross(a, b)], dim=-1))
    return out


def fa_gnn_by_hand(model, graph: Data, per_layer: bool = True) -> torch.Tensor:
    """FA-GNN on one graph written as loops over frames; ``per_layer=False`` is the whole-model
    average of the same network (frame the input once, run every layer, average the output)."""
    pos, vel, q = graph.pos, graph.vel, graph.charge
    t = pos.mean(0)
    src, dst = graph.edge_index
    e = torch.cat([((pos[src] - pos[dst]) ** 2).sum(-1, keepdim=True), graph.edge_attr], dim=-1)
    frames = pca_frames(pos, model.group)
    hs = [model.embed(torch.cat([(pos - t) @ F, vel @ F, q], dim=-1)) for F in frames]
    for i, layer in enumerate(model.layers):
        hs = [layer(h, graph.edge_index, e) for h in hs]
        if per_layer and i < model.depth - 1:
            v = torch.stack([h.reshape(len(pos), -1, 3) @ F.T for h, F in zip(hs, frames)]).mean(0)  # F_k v
            frames = pca_frames(v.reshape(-1, 3), model.group)
            c = v.reshape(-1, 3).mean(0)
            hs = [((v - c) @ F).reshape(len(pos), -1) for F in frames]  # F_k^T (v - c)
    return torch.stack([model.decoder(h) @ F.T + t for h, F in zip(hs, frames)]).mean(0)


@pytest.mark.parametrize("group", ["O3", "SO3"])
def test_fa_gnn_averages_at_every_layer(nbody, group):
    task, _, test = nbody
    model = build("fa_gnn", task.spec, group=group, width=15, depth=3).eval()
    b = batch_of(test, 4)
    with torch.no_grad():
        before = model.frame_averages
        out = model(b)
        assert model.frame_averages - before == model.depth  # depth - 1 latent averages + the output
        graphs = [cast_batch(Batch.from_data_list([d]), torch.float64) for d in test[:4]]
        ref = torch.cat([fa_gnn_by_hand(model, g) for g in graphs])
        whole = torch.cat([fa_gnn_by_hand(model, g, per_layer=False) for g in graphs])
    assert (out - ref).abs().max() < 1e-12
    assert (out - whole).norm() > 1e-2 * out.norm()  # not a whole-model average in disguise


def test_fa_gnn_differs_from_whole_model_frame_averaging_in_kind(nbody):
    """``frame_averaging`` averages once around the shared backbone; ``fa_gnn`` re-frames in between."""
    task, _, test = nbody
    fa = build("frame_averaging", task.spec)
    assert not hasattr(fa, "frame_averages") and type(fa.backbone).__name__ == "BackboneModel"
    model = build("fa_gnn", task.spec)
    model(batch_of(test, 2))
    assert model.frame_averages == 4


def test_fa_gnn_residual_option_changes_only_the_point_shift(nbody):
    task, _, test = nbody
    b = batch_of(test, 4)
    plain = build("fa_gnn", task.spec, width=15, depth=2)
    res = build("fa_gnn", task.spec, width=15, depth=2, residual=True)
    res.load_state_dict(plain.state_dict())
    t = torch.zeros(4, 3, dtype=torch.float64).index_add(0, b.batch, b.pos) / 5
    with torch.no_grad():
        assert torch.allclose(res(b) - b.pos, plain(b) - t[b.batch], atol=1e-12)
    assert eb.equivariance_error(res, b, task.spec, n_samples=2)["rel_max"] < 1e-10


# ---- egnn ------------------------------------------------------------------------------------
def test_egnn_uses_the_velocity_as_a_vector(nbody):
    task, _, test = nbody
    model = build("egnn", task.spec, **SMALL["egnn"])
    b = batch_of(test, 4)
    flipped = b.clone()
    flipped.vel = -b.vel  # same |v| (h unchanged): only the phi_v(h) v term sees the sign
    with torch.no_grad():
        out, out_f = model(b), model(flipped)
        assert (out - out_f).abs().max() > 1e-6
        h0, vectors = model.inputs(b)
        assert torch.allclose(h0[:, :1], b.vel.norm(dim=-1, keepdim=True)) and torch.equal(vectors[0], b.vel)
        # the velocity term alone: with every phi_x zeroed, x_L - x_0 = sum_l phi_v^l(h^l) v
        for layer in model.layers:
            layer.phi_x[-1].weight.zero_()
        disp = model(b) - b.pos
        cos = torch.nn.functional.cosine_similarity(disp, b.vel, dim=-1).abs()
        assert torch.allclose(cos, torch.ones_like(cos), atol=1e-9)


def test_egnn_node_scalars_option_gives_the_reference_input(nbody):
    task, _, test = nbody
    model = build("egnn", task.spec, node_scalars=False, **SMALL["egnn"])
    h0, _ = model.inputs(batch_of(test, 2))
    assert h0.shape[1] == 1  # the reference's h^0 = |v_i|; charges only through q_i q_j edges


# ---- e3nn_nequip -----------------------------------------------------------------------------
def test_nequip_uses_uvu_and_tfn_uses_uvw(nbody):
    task, _, _ = nbody
    nequip = build("e3nn_nequip", task.spec, torch.float32, **SMALL["e3nn_nequip"])
    modes = {ins.connection_mode for layer in nequip.layers for ins in layer.tp.instructions}
    assert modes == {"uvu"}
    assert all(layer.gate.irreps_in == layer.linear_2.irreps_out for layer in nequip.layers)
    tfn = build("e3nn", task.spec, torch.float32, mul=4, depth=2)
    assert {ins.connection_mode for layer in tfn.layers for tp in layer.tp.tps for ins in tp.instructions} == {"uvw"}


def test_nequip_layer_schedule_follows_nequip(nbody):
    """Invariant outputs: no self-connection in layer 1, scalars only after the last layer (as
    NequIP's energy model); with vector node inputs (n-body) every layer keeps its self-connection."""
    qm9 = build("e3nn_nequip", OTHER_SPECS["qm9"], torch.float32, **SMALL["e3nn_nequip"])
    assert qm9.layers[0].sc is None and qm9.layers[1].sc is not None
    assert str(qm9.layers[-1].irreps_out) == "4x0e"
    task, _, _ = nbody
    nb = build("e3nn_nequip", task.spec, torch.float32, **SMALL["e3nn_nequip"])
    assert all(layer.sc is not None for layer in nb.layers) and nb.layers[-1].irreps_out.lmax == 1
    defaults = eb.get_method("e3nn_nequip")
    assert (defaults.lmax, defaults.mul, defaults.depth, defaults.radial_hidden) == (1, 32, 4, 64)
    tfn = eb.get_method("e3nn", params=20_000).sizes_for(task.spec, 20_000)[0]
    assert eb.get_method("e3nn_nequip").sizes_for(task.spec, 20_000)[0] > tfn  # wider at matched parameters


def test_nequip_messages_vanish_smoothly_at_the_cutoff():
    d = torch.linspace(0.0, 1.2, 1201, dtype=torch.float64, requires_grad=True)
    u = polynomial_cutoff(d, 6)
    (du,) = torch.autograd.grad(u.sum(), d, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), d)
    at_one = torch.isclose(d, torch.tensor(1.0, dtype=torch.float64))
    assert u[0] == 1.0 and (u[d >= 1] == 0).all()
    assert du[at_one].abs().max() < 1e-9 and d2u[at_one].abs().max() < 1e-6
    assert torch.isfinite(BesselBasis(8)(torch.tensor([0.0, 1e-12, 1.0], dtype=torch.float32), 4.0)).all()


def test_nequip_edge_weights_go_to_zero_at_r_max(nbody):
    task, _, _ = nbody
    model = build("e3nn_nequip", task.spec, r_max=2.0, avg_num_neighbors=4.0, **SMALL["e3nn_nequip"])
    r = torch.tensor([0.5, 1.9, 1.99, 1.999, 2.0, 2.5], dtype=torch.float64)
    q = torch.ones(len(r), 1, dtype=torch.float64)
    env = polynomial_cutoff(r / 2.0, model.cutoff_p).unsqueeze(-1)
    w = model.layers[0].radial(torch.cat([model.basis(r, 2.0), q], -1) * env).abs().amax(-1)
    assert w[0] > 1e-3 and (w[-2:] == 0).all()
    assert w[1] > w[2] > w[3] > 0 and w[3] < 1e-5 * w[0]  # smooth decay (~ (1 - r / r_max)^3)
    # a whole batch: an edge at the cutoff contributes exactly nothing (its graph = the graph without it)
    pos = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.3, 0.4, 0.1]], dtype=torch.float64)
    full = Data(pos=pos, vel=torch.randn(3, 3, dtype=torch.float64), charge=torch.ones(3, 1, dtype=torch.float64),
                edge_index=torch.tensor([[0, 1, 0, 2, 1, 2], [1, 0, 2, 0, 2, 1]]),
                edge_attr=torch.ones(6, 1, dtype=torch.float64))
    cut = full.clone()
    cut.edge_index, cut.edge_attr = full.edge_index[:, 2:], full.edge_attr[2:]
    model.eval()
    with torch.no_grad():
        a, b = model(Batch.from_data_list([full])), model(Batch.from_data_list([cut]))
    assert torch.allclose(a, b, atol=1e-14)


def test_nequip_statistics_come_from_the_training_data(nbody):
    task, train, test = nbody
    model = build("e3nn_nequip", task.spec, **SMALL["e3nn_nequip"])
    stats = model.stats
    assert not stats.ready
    model.eval()
    model(batch_of(test, 4))
    assert not stats.ready  # an eval batch is used, not stored
    tb = batch_of(train, 8)
    model.train()
    model(tb)
    lengths = (tb.pos[tb.edge_index[0]] - tb.pos[tb.edge_index[1]]).norm(dim=-1)
    assert stats.ready and float(stats.avg_num_neighbors) == tb.num_edges / tb.num_nodes == 4.0
    assert abs(float(stats.r_max) - 1.1 * float(lengths.max())) < 1e-12
    fresh = build("e3nn_nequip", task.spec, **SMALL["e3nn_nequip"])
    fresh.load_state_dict(model.state_dict())
    assert fresh.stats.ready and fresh.stats.values == stats.values
    model(batch_of(train, 8, start=8))
    assert stats.values == fresh.stats.values  # kept after the first training batch


# ---- canonicalisation (equiadapt) ---------------------------------------------------------------
def test_nequip_radial_scale_makes_the_network_independent_of_the_length_unit():
    """With ``radial_scale`` the Bessel basis is a function of r / r_max only: on normals (r_max
    estimated from each batch) scaling every position by 7 leaves the predicted normals unchanged,
    and the features stay of order one; NequIP's own formula (the default) is another network in
    other units, and on unit-radius clouds its outputs are orders of magnitude larger."""
    task = eb.get_task("normals", n_points=64, k=8, train_size=8, val_size=4, test_size=8)
    x = cast_batch(Batch.from_data_list(task.load("test")[:3]), torch.float64)
    x7 = x.clone()
    x7.pos = x.pos * 7.0
    with default_dtype(torch.float64):
        scale_free = eb.get_method("e3nn_nequip", mul=8, depth=3, radial_scale=5.0).build(task.spec, seed=0).eval()
        nequip = eb.get_method("e3nn_nequip", mul=8, depth=3).build(task.spec, seed=0).eval()
        out, out7 = scale_free(x), scale_free(x7)
        assert torch.allclose(out, out7, rtol=1e-9, atol=1e-12)
        assert out.abs().max() < 10.0
        assert not torch.allclose(nequip(x), nequip(x7), rtol=1e-3)
        assert nequip(x).abs().max() > 1e3 * out.abs().max()


def test_identity_metric_is_equiadapts_one_minus_mse():
    angle = 0.7
    c, s = torch.cos(torch.tensor(angle, dtype=torch.float64)), torch.sin(torch.tensor(angle, dtype=torch.float64))
    Rz = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    R = torch.stack([torch.eye(3, dtype=torch.float64), Rz, -torch.eye(3, dtype=torch.float64)])
    m = graph_canon_metrics(R, identity_angle=10.0)
    eye = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    assert abs(m["identity_metric"] - (1 - torch.nn.functional.mse_loss(R, eye)).item()) < 1e-15
    expected = 1 - ((4 - 4 * c) / 9 + 12 / 9) / 3  # identity: 0, Rz: (6 - 2 tr) / 9, -I: 12 / 9
    assert abs(m["identity_metric"] - expected.item()) < 1e-15
    assert m["identity_share"] == pytest.approx(1 / 3)  # only the identity is within 10 degrees
    assert eb.get_method("canonicalization").prior_weight_for("graph3d") == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NEW)
def test_runs_trains_and_stays_exact_on_cuda(nbody, name):
    task, train, test = nbody
    model = build(name, task.spec, torch.float64, **SMALL[name]).cuda()
    tb = batch_of(train, 16).cuda()
    loss = task.loss(model(tb), tb)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None or p.grad.is_cuda for p in model.parameters())
    err = eb.equivariance_error(model, batch_of(test, 16).cuda(), task.spec, n_samples=4, dtype=torch.float64)
    assert err["rel_max"] < 1e-10
