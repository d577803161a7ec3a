"""Image builds of the methods (``image2d``; blocks in ``equibench.methods.blocks``): exact rot90
invariance of the exact methods, the canonicaliser's equivariance and identity property, hooks,
parameter matching and dtypes."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.core.registry import method_class
from equibench.methods.base import count_parameters
from equibench.methods.blocks.canon2d import Canonicalised
from equibench.methods.blocks.cnn import ImageModel
from equibench.symmetry.group2d import is_2d_group
from equibench.symmetry.precision import default_dtype

SMALL = {"width": 16, "depth": 2}
KINDS = sorted(m for m in eb.list_methods() if "image2d" in method_class(m).domains)
EXACT = [k for k in KINDS if eb.get_method(k).is_exact("image2d")]


def test_image_methods_and_their_exactness():
    assert KINDS == ["augmentation", "baseline", "canonicalization", "equiadapt", "escnn", "frame_averaging"]
    assert EXACT == ["canonicalization", "equiadapt", "escnn", "frame_averaging"]


@pytest.fixture(scope="module")
def task():
    return eb.get_task("digits", source="sklearn", group="C4", train_size=32, test_size=8)


@pytest.fixture(scope="module")
def batch(task):
    return Batch.from_data_list(task.load("test")[:12])


def method(kind, **kw):
    return eb.get_method(kind, **{**SMALL, **kw})


def build(kind, spec, dtype=torch.float32, seed=0, group=None, **kw):
    """``kind``'s image model; a 2-D ``group`` builds it for that group (on the same images)."""
    if is_2d_group(group):
        spec = dataclasses.replace(spec, group=group)
    elif group is not None:
        kw["group"] = group
    with default_dtype(dtype):
        torch.manual_seed(seed)
        return method(kind, **kw).build(spec, seed)


def rot90_batch(batch, k):
    new = batch.clone()
    new.image = torch.rot90(batch.image, k, dims=(-2, -1))
    return new


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_hooks_and_a_training_step(kind, task, batch):
    m = method(kind)
    model = build(kind, task.spec)
    assert count_parameters(model) > 0
    model.train()
    gen = torch.Generator().manual_seed(0)
    tb = m.train_transform(batch, task.spec, gen)
    assert (tb is batch) == (kind != "augmentation")
    pred = model(tb)
    assert pred.shape == (12, 10) and torch.isfinite(pred).all()
    loss = task.loss(pred, tb)
    aux = m.auxiliary_loss(model, tb, pred)
    assert (aux is not None) == (kind in ("canonicalization", "equiadapt"))  # their canonicalisers' priors
    total = loss if aux is None else loss + aux
    before = [p.detach().clone() for p in model.parameters()]
    total.backward()
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert all(changed), "some parameters got no gradient"  # incl. the canonicaliser (straight-through)
    model.eval()
    out = model(batch)
    assert torch.isfinite(out).all()
    extra = m.extra_metrics(model, batch, out)
    assert set(extra) == ({"identity_metric", "prior_ce"} if kind in ("canonicalization", "equiadapt") else set())
    assert all(isinstance(v, float) for v in extra.values())


def test_augmentation_rotates_each_image_by_a_quarter_turn(task, batch):
    out = method("augmentation").train_transform(batch, task.spec, torch.Generator().manual_seed(1))
    ks = []
    for i in range(12):
        hits = [k for k in range(4)
                if torch.equal(out.image[i], torch.rot90(batch.image[i], k, dims=(-2, -1)))]
        assert hits
        ks.append(hits[0])
    assert len(set(ks)) > 1 and torch.equal(out.y, batch.y)


@pytest.mark.parametrize("kind,group", [(k, "C4") for k in EXACT] + [("escnn", "C8"), ("escnn", "SO2")])
def test_exact_models_are_rot90_invariant(kind, group, task, batch):
    """Logits unchanged under rot90 (float32 < 1e-5 through the shared metric code path; float64,
    built under a float64 default, < 1e-10); C8 / SO(2) models are exact on quarter turns too."""
    model = build(kind, task.spec, group=group).eval()
    with torch.no_grad():
        ref = model(batch)
        for k in (1, 2, 3):
            assert (model(rot90_batch(batch, k)) - ref).abs().max() < 1e-5 * ref.abs().max()
    assert eb.equivariance_error(model, batch, task.spec, n_samples=4, dtype=torch.float32)["rel_max"] < 1e-5
    m64 = build(kind, task.spec, dtype=torch.float64, group=group)
    m64.load_state_dict(model.state_dict())
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    assert eb.equivariance_error(m64, batch, task.spec, n_samples=4, dtype=torch.float64)["rel_max"] < 1e-10


def test_baseline_is_not_invariant(task, batch):
    model = build("baseline", task.spec)
    model.train()  # a few steps so the logits depend on the image
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        task.loss(model(batch), batch).backward()
        opt.step()
    assert eb.equivariance_error(model, batch, task.spec, n_samples=6, dtype=torch.float32)["rel_max"] > 1e-3


@pytest.mark.parametrize("group", ["C4", "C8"])
def test_canonicaliser_equivariance_and_identity_on_canonical_outputs(group, task, batch):
    model = build("canonicalization", task.spec, group=group).eval()
    assert isinstance(model, Canonicalised)
    N, x = model.order, batch.image
    with torch.no_grad():
        s = model.canonicaliser(x)
        for k in (1, 2, 3):  # a quarter turn is the element N/4: scores shift cyclically
            sk = model.canonicaliser(torch.rot90(x, k, dims=(-2, -1)))
            assert torch.allclose(sk, s.roll(k * N // 4, dims=-1), atol=1e-5)
        kstar = s.argmax(-1)
        assert len(set(kstar.tolist())) > 1  # a random canonicaliser does not pick the identity always
        exact = (kstar * 4) % N == 0  # canonical images made by exact quarter turns
        canon = model.canonicalise(x)
        again = model.canonical_element(canon)
        assert (again[exact] == 0).all()  # the identity element on its own canonical outputs
        if (~exact).any():  # C8's odd elements rotate by interpolation: approximately the identity
            assert (again[~exact] == 0).float().mean() >= 0.5


def test_straight_through_forward_equals_hard_selection(task, batch):
    model = build("canonicalization", task.spec).eval()
    x = batch.image
    scores = model.canonicaliser(x)  # with gradients
    hard = model.canonicalise(x, scores.detach())
    model.train()
    soft = model.canonicalise(x, scores)
    assert soft.requires_grad and torch.equal(soft, hard)  # forward value exactly the hard selection
    soft.pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.canonicaliser.parameters())


def test_prior_and_identity_metric(task, batch):
    model = build("canonicalization", task.spec, prior_weight=2.0).eval()
    with torch.no_grad():
        pred = model(batch)
        scores = model.canonicaliser(batch.image)
    canon = method("canonicalization", prior_weight=2.0)
    m = canon.extra_metrics(model, batch, pred)
    assert m["identity_metric"] == pytest.approx((scores.argmax(-1) == 0).double().mean().item())
    target = torch.zeros(12, dtype=torch.long)
    assert canon.auxiliary_loss(model, batch, pred).item() == pytest.approx(
        2.0 * torch.nn.functional.cross_entropy(scores, target).item(), rel=1e-5)
    no_prior = method("canonicalization", prior_weight=0.0)
    assert no_prior.auxiliary_loss(build("canonicalization", task.spec, prior_weight=0.0), batch, pred) is None


def test_frame_averaging_stochastic_training(task, batch):
    model = build("frame_averaging", task.spec, stochastic=True)
    model.train()
    torch.manual_seed(0)
    a = model(batch)
    assert a.shape == (12, 10)
    model.eval()
    assert eb.equivariance_error(model, batch, task.spec, n_samples=4, dtype=torch.float32)["rel_max"] < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_matching(kind, task):
    target = 12000
    model = eb.get_method(kind, params=target, depth=2).build(task.spec)
    assert abs(count_parameters(model) - target) <= 0.1 * target


@pytest.mark.parametrize("kind", ["escnn", "canonicalization"])
def test_default_is_parameter_matched_to_the_baseline(kind, task):
    base = count_parameters(eb.get_method("baseline", depth=2).build(task.spec))
    other = count_parameters(eb.get_method(kind, depth=2).build(task.spec))
    assert abs(other - base) <= 0.1 * base


def test_build_is_seeded_and_options_checked(task, batch):
    a, b = build("escnn", task.spec, seed=3), build("escnn", task.spec, seed=3)
    with torch.no_grad():
        assert torch.equal(a.eval()(batch), b.eval()(batch))
    with pytest.raises(eb.UserError):
        eb.get_method("baseline", prior_weight=1.0)
    with pytest.raises(eb.UserError):
        eb.get_method("resnet")
    with pytest.raises(ValueError):
        eb.get_method("baseline", width=0).build(task.spec)
    # a 3-D group name (the graph methods' default) means "the task's group"
    assert build("frame_averaging", task.spec, group="O3").group == "C4"


def test_wiring_helpers(task):
    from equibench.methods.blocks.image import image_size_options

    class FakeMethod:  # graph-tuned defaults must not leak into image sizes
        def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None, group: str = "O3"):
            self.options = {"width": width, "depth": depth, "params": params, "group": group}

    assert image_size_options(FakeMethod()) == {"width": None, "depth": None, "params": None, "group": None}
    assert image_size_options(FakeMethod(width=24, params=9000, group="C8")) == \
        {"width": 24, "depth": None, "params": 9000, "group": "C8"}
    assert isinstance(build("baseline", task.spec), ImageModel)
