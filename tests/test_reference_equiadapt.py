"""``equiadapt``: equiadapt 0.1.2's canonicalisers wrapped as a method (n-body and digits): shapes,
a training step, the library's prior and identity metric against an independent computation, the
measured equivariance against the method's claim (and the causes its ``inexact_reason`` names),
and the tasks it declines."""
from __future__ import annotations

import types

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import build_model
from equibench.metrics.equivariance import cast_batch
from conftest import require

require("equiadapt")
require("torch_scatter")

F64 = torch.float64


def method(**opts):
    return eb.get_method("equiadapt", **{**type(eb.get_method("equiadapt")).smoke_options, **opts})


@pytest.fixture(scope="module")
def digits():
    task = eb.get_task("digits", source="sklearn", group="C4", train_size=8, val_size=2, test_size=8)
    return task, Batch.from_data_list(task.load("test")[:16])


def train_step(m, model, task, batch):
    model.train()
    pred = model(batch)
    aux = m.auxiliary_loss(model, batch, pred)
    assert aux is not None and torch.isfinite(aux)
    before = [p.detach().clone() for p in model.parameters()]
    (task.loss(pred, batch) + aux).backward()
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    return [not torch.equal(a, p) for a, p in zip(before, model.parameters())]


def test_nbody_training_step_prior_and_identity_metric(nbody_task, nbody_batch):
    m = method(prior_weight=2.0)
    model = build_model(m, nbody_task.spec, 0, torch.float32)
    assert m.implementation().startswith("equiadapt ") and m.counterpart == "canonicalization"
    changed = train_step(m, model, nbody_task, nbody_batch)
    canon = [c for (name, _), c in zip(model.named_parameters(), changed) if name.startswith("canonicalizer.")]
    assert canon and any(canon), "the canonicaliser got no gradient"
    model.eval()
    pos, vel = nbody_batch.pos.clone(), nbody_batch.vel.clone()
    with torch.no_grad():
        pred = model(nbody_batch)
    assert pred.shape == (nbody_batch.num_nodes, 3) and torch.isfinite(pred).all()
    assert torch.equal(nbody_batch.pos, pos) and torch.equal(nbody_batch.vel, vel)  # canonicalised on a copy
    R_node = model.rotation(nbody_batch).detach()
    R = R_node.reshape(-1, 5, 3, 3)
    assert torch.equal(R, R[:, :1].expand_as(R))  # one R per graph, repeated on its 5 nodes
    R = R[:, 0].double()
    eye = torch.eye(3, dtype=F64)
    assert torch.allclose(R @ R.transpose(1, 2), eye.expand_as(R), atol=1e-3)  # float32 Gram-Schmidt
    mse = ((R - torch.eye(3, dtype=F64)) ** 2).mean().item()
    extra = m.extra_metrics(model, nbody_batch, pred)
    assert extra["identity_metric"] == pytest.approx(1 - mse, abs=1e-6)
    assert extra["prior_mse"] == pytest.approx(mse, abs=1e-6)
    assert m.auxiliary_loss(model, nbody_batch, pred).item() == pytest.approx(2.0 * mse, rel=1e-5)
    assert method().auxiliary_loss(model, nbody_batch, pred) is None  # its n-body example: no prior


def test_digits_training_step_prior_and_identity_metric(digits):
    task, batch = digits
    m = method(prior_weight=3.0)
    model = build_model(m, task.spec, 0, torch.float32)
    assert all(train_step(m, model, task, batch)), "some parameters got no gradient"
    model.eval()
    with torch.no_grad():
        pred = model(batch)
        scores = model.canonicalizer.canonicalization_network(batch.image)  # independent of the hooks
    assert pred.shape == (16, 10) and torch.isfinite(pred).all()
    extra = m.extra_metrics(model, batch, pred)
    assert extra["identity_metric"] == pytest.approx((scores.argmax(-1) == 0).double().mean().item())
    ce = torch.nn.functional.cross_entropy(scores, torch.zeros(16, dtype=torch.long)).item()
    assert extra["prior_ce"] == pytest.approx(ce, rel=1e-5)
    assert m.auxiliary_loss(model, batch, pred).item() == pytest.approx(3.0 * ce, rel=1e-5)
    assert method().prior_weight_for("image2d") == 100.0 and method().prior_weight_for("graph3d") == 0.0


def _fp64_error(m, task, batch, patch=None) -> float:
    model = build_model(m, task.spec, 0, F64)
    if patch:
        patch(model)
    group = task.spec.group
    return eb.equivariance_error(model, batch, task.spec, n_samples=4, dtype=F64, group=group)["rel_max"]


def test_measured_equivariance_matches_the_claim(nbody_task, nbody_batch, digits):
    m = method()
    assert not m.exact_on(nbody_task.spec)
    reason = m.inexact_reason(nbody_task.spec)
    assert "Gram-Schmidt" in reason and "bias" in reason
    assert _fp64_error(m, nbody_task, nbody_batch) > 1e-2
    task, batch = digits
    assert m.exact_on(task.spec)
    assert _fp64_error(m, task, batch) < 1e-10
    model = build_model(m, task.spec, 0, torch.float32)
    assert eb.equivariance_error(model, batch, task.spec, n_samples=4, dtype=torch.float32)["rel_max"] < 1e-5


def _zero_biases(model):
    for mod in model.canonicalizer.modules():
        if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
            torch.nn.init.zeros_(mod.bias)


def _vectors_as_rows(model):
    """Gram-Schmidt over the three predicted vectors (the library indexes coordinates instead)."""
    c = model.canonicalizer
    library_gs = type(c).modified_gram_schmidt
    c.modified_gram_schmidt = types.MethodType(lambda self, v: library_gs(self, v.transpose(1, 2)), c)


def test_the_named_causes_are_the_causes(nbody_task, nbody_batch):
    """Each cause alone keeps the n-body canonicaliser far from equivariant; removing both (biases
    zeroed, Gram-Schmidt over the vectors) leaves round-off only."""
    m = method(canon_width=8)
    both = _fp64_error(m, nbody_task, nbody_batch, lambda mod: (_zero_biases(mod), _vectors_as_rows(mod)))
    assert both < 1e-8
    assert _fp64_error(m, nbody_task, nbody_batch, _zero_biases) > 1e-3
    assert _fp64_error(m, nbody_task, nbody_batch, _vectors_as_rows) > 1e-3


@pytest.mark.parametrize("task_name", ["qm9", "md", "normals"])
def test_other_graph_tasks_are_declined(task_name):
    spec = eb.get_task(task_name).spec
    reason = method().supports(spec)
    assert reason and "n-body" in reason
    with pytest.raises(ValueError, match="n-body"):
        method().build(spec)


def test_graphs_of_another_size_are_refused():
    task = eb.get_task("nbody", n_particles=6, train_size=4, val_size=2, test_size=4)
    batch = Batch.from_data_list(task.load("test")[:2])
    model = build_model(method(), task.spec, 0, torch.float32)
    with pytest.raises(ValueError, match="exactly 5 nodes"):
        model(batch)


def test_options_are_checked(digits):
    for bad in ({"canon_feature": "q"}, {"canon_kernel": 4}, {"canon_dropout": 1.0}, {"prior_weight": -1.0}):
        with pytest.raises((ValueError, eb.UserError)):
            eb.get_method("equiadapt", **bad)
    task, batch = digits  # 12 x 12 images: 3 valid 5x5 convolutions leave nothing
    model = build_model(method(canon_kernel=5, canon_layers=3), task.spec, 0, torch.float32)
    with pytest.raises(ValueError, match="too small"):
        model(cast_batch(batch, torch.float32))


def test_a_float64_copy_leaves_the_float32_model_alone(digits):
    """e2cnn shares kernel-basis modules between all its convolutions process-wide; the wrapper
    gives each model its own, so casting a float64 rebuild does not cast the float32 model."""
    task, batch = digits
    m = method()
    model = build_model(m, task.spec, 0, torch.float32)
    m64 = build_model(m, task.spec, 0, F64, model.state_dict())
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
    assert all(t.dtype == F64 for t in m64.state_dict().values() if t.is_floating_point())
    model.train()
    assert torch.isfinite(model(batch)).all()  # float32 filters expanded from float32 bases
