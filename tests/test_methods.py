"""Every registered method, tested the same way (parametrised over the registry, like timm's
tests over ``list_models()``): shapes, a training step, and — for methods declared exact —
float64 relative equivariance error < 1e-10 and float32 < 1e-4, at init and after training, for
the group each declares (O(3) with reflections unless it declares SO(3)); plus translations and
node permutations. A method that cannot take n-body's typed inputs (an energy model such as
``mace``) is tested on ``md`` (forces, also ``[N, 3]``); one that takes neither here (its library
is not installed in this environment) is skipped with its reason."""
from __future__ import annotations

import functools

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import build_model
from equibench.benches.training import TrainConfig, train
from equibench.methods.base import count_parameters
from equibench.symmetry.group3d import common_group
from conftest import missing_reference

FP64_TOL, FP32_TOL = 1e-10, 1e-4


def graph3d_methods() -> list[str]:
    return [m for m in eb.list_methods() if "graph3d" in eb.get_method(m).domains]


def exact_methods() -> list[str]:
    return [m for m in graph3d_methods() if eb.get_method(m).exact]


def small(name: str):
    cls = type(eb.get_method(name))
    return eb.get_method(name, **cls.smoke_options)


@functools.cache
def md_task():
    return eb.get_task("md", equilibration=10, stride=2, train_size=40, val_size=2, test_size=16)


def task_for(name: str, nbody_task):
    """n-body when the method takes it, else md; ``pytest.skip`` with the method's reason otherwise."""
    method = small(name)
    reasons = []
    for task in (nbody_task, md_task()):
        reason = method.supports(task.spec)
        if reason is None:
            return task
        reasons.append(reason)
    text = reasons[0] if reasons[0] == reasons[1] else "; ".join(reasons)
    if not method.requirements and "not installed" in text:  # a reference library setup.sh installs
        missing_reference(f"{name}: {text}")
    pytest.skip(text)


def batch_for(task, nbody_task, nbody_batch) -> Batch:
    return nbody_batch if task is nbody_task else Batch.from_data_list(task.load("test")[:16])


def measure(method, task, model, batch, dtype):
    group = common_group(task.spec.group, method.group) if method.exact else task.spec.group
    m = model if dtype == torch.float32 else build_model(method, task.spec, 0, torch.float64, model.state_dict())
    return eb.equivariance_error(m, batch, task.spec, n_samples=4, dtype=dtype, group=group)


def test_registry_has_the_core_methods():
    assert {"baseline", "augmentation", "e3nn"} <= set(eb.list_methods())


@pytest.mark.parametrize("name", graph3d_methods())
def test_shapes_and_a_training_step(name, nbody_task, nbody_batch):
    task = task_for(name, nbody_task)
    nbody_task, nbody_batch = task, batch_for(task, nbody_task, nbody_batch)
    method = small(name)
    model = build_model(method, nbody_task.spec, 0, torch.float32)
    assert count_parameters(model) > 0
    out = model(nbody_batch)
    assert out.shape == (nbody_batch.num_nodes, 3) and torch.isfinite(out).all()
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    batch = method.train_transform(nbody_batch, nbody_task.spec, torch.Generator().manual_seed(0))
    pred = model(batch)
    loss = nbody_task.loss(pred, batch)
    aux = method.auxiliary_loss(model, batch, pred)
    total = loss if aux is None else loss + aux
    assert torch.isfinite(total)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    total.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "no parameter changed"
    model.eval()
    assert torch.isfinite(model(nbody_batch)).all()
    extra = method.extra_metrics(model, nbody_batch, model(nbody_batch))
    assert all(isinstance(v, float) for v in extra.values())
    undeclared = [k for k in extra if eb.get_metric(f"test.{k}").role != "diagnostic"]
    assert not undeclared, f"extra metrics not declared as the method's diagnostics (Method.METRICS): {undeclared}"


@pytest.mark.parametrize("name", exact_methods())
def test_exact_methods_are_equivariant_at_init(name, nbody_task, nbody_batch):
    task = task_for(name, nbody_task)
    nbody_task, nbody_batch = task, batch_for(task, nbody_task, nbody_batch)
    method = small(name)
    model = build_model(method, nbody_task.spec, 0, torch.float32)
    assert measure(method, nbody_task, model, nbody_batch, torch.float64)["rel_max"] < FP64_TOL
    assert measure(method, nbody_task, model, nbody_batch, torch.float32)["rel_max"] < FP32_TOL


@pytest.fixture(scope="module")
def trained():
    """Every nbody method trained briefly with the shared loop (cached per module); ``get(name,
    task)`` trains on another task (md) for a method that does not take n-body."""
    task = eb.get_task("nbody", train_size=200, test_size=64)
    cfg = TrainConfig(steps=60, batch_size=20, lr=3e-3, warmup_steps=5)
    cache = {}

    def get(name, on=task):
        if name not in cache:
            method = small(name)
            model = build_model(method, on.spec, 0, torch.float32)
            train(model, method, on, on.load("train"), cfg, seed=0)
            cache[name] = (method, model)
        return cache[name]
    return task, Batch.from_data_list(task.load("test")[:16]), get


@pytest.mark.parametrize("name", exact_methods())
def test_exact_methods_stay_equivariant_after_training(name, trained):
    task, batch, get = trained
    on = task_for(name, task)
    task, batch = on, batch_for(on, task, batch)
    method, model = get(name, on)
    assert measure(method, task, model, batch, torch.float64)["rel_max"] < FP64_TOL
    assert measure(method, task, model, batch, torch.float32)["rel_max"] < FP32_TOL


def test_baseline_is_not_and_augmentation_is_partly_equivariant(trained):
    task, batch, get = trained
    errs = {}
    for name in ("baseline", "augmentation"):
        method, model = get(name)
        errs[name] = measure(method, task, model, batch, torch.float64)["rel_mean"]
    assert errs["baseline"] > 1e-2
    assert FP32_TOL < errs["augmentation"] < errs["baseline"]


@pytest.mark.parametrize("name", graph3d_methods())
def test_parameter_matching(name, nbody_task):
    nbody_task = task_for(name, nbody_task)
    method = eb.get_method(name, **{**type(eb.get_method(name)).smoke_options, "params": 12000})
    n = count_parameters(build_model(method, nbody_task.spec, 0, torch.float32))
    assert abs(n - 12000) <= 0.1 * 12000
