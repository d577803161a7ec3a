"""soft_equivariance: lam = 0 is the baseline step for step, a large lam drives the learned
equivariance error down by an order of magnitude, the penalty vanishes on an exact model, and the
dual mode's multiplier follows its update rule and is reported."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import build_model
from equibench.benches.training import TrainConfig, evaluate, train
from equibench.core.spec import TaskSpec
from equibench.methods.wrappers.soft_equivariance import (
    SoftEquivariantModel,
    equivariance_defect,
    penalty_group,
    target_signal,
)

SMALL = {"width": 16, "depth": 2}


def _train(method, task, data, steps=20, seed=0):
    model = build_model(method, task.spec, seed, torch.float32)
    cfg = TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=5, val_points=0)
    result = train(model, method, task, data, cfg, seed=seed)
    return model, result


def test_lam_zero_is_the_baseline_step_for_step(nbody_task):
    data = nbody_task.load("train")
    base, soft = eb.get_method("baseline", **SMALL), eb.get_method("soft_equivariance", lam=0.0, **SMALL)
    m_base, m_soft = build_model(base, nbody_task.spec, 3, torch.float32), build_model(soft, nbody_task.spec, 3,
                                                                                       torch.float32)
    assert isinstance(m_soft, SoftEquivariantModel)
    for a, b in zip(m_base.parameters(), m_soft.parameters(), strict=True):
        assert torch.equal(a, b)  # same initialisation under the same seed
    m_base, r_base = _train(base, nbody_task, data, seed=3)
    m_soft, r_soft = _train(soft, nbody_task, data, seed=3)
    assert r_base.summary["final_loss"] == r_soft.summary["final_loss"]
    for a, b in zip(m_base.parameters(), m_soft.parameters(), strict=True):
        assert torch.equal(a, b)  # same trajectory: identical weights after 20 steps


def test_penalty_vanishes_on_an_exact_model_and_not_on_the_baseline(nbody_task, nbody_batch):
    spec, gen = nbody_task.spec, torch.Generator().manual_seed(0)
    with torch.no_grad():
        defects = {}
        for name in ("frame_averaging", "baseline"):
            method = eb.get_method(name, **SMALL)
            model = build_model(method, spec, 0, torch.float64)
            batch = nbody_batch.clone()
            for k in ("pos", "vel", "charge", "edge_attr", "y"):
                batch[k] = batch[k].double()
            pred = model(batch)
            defects[name] = float(equivariance_defect(model, batch, spec, pred, "E3", 2, gen)
                                  / target_signal(batch, spec))
    assert defects["frame_averaging"] < 1e-20  # squared relative defect at fp64 round-off
    assert defects["baseline"] > 1e-4


def test_penalty_group_follows_the_declared_broken_group(nbody_task):
    spec = nbody_task.spec
    assert penalty_group(spec, "full") == penalty_group(spec, "exact") == "E3"  # nothing broken
    if "broken_group" not in {f.name for f in dataclasses.fields(TaskSpec)}:
        pytest.skip("TaskSpec declares no broken group yet")
    broken = dataclasses.replace(spec, group="O2z", broken_group="E3")
    assert penalty_group(broken, "full") == "E3"
    assert penalty_group(broken, "exact") == "O2z"


def test_dual_update_follows_its_rule(nbody_task, nbody_batch):
    method = eb.get_method("soft_equivariance", lam_mode="dual", lam=0.5, dual_lr=2.0, tolerance=0.001,
                           relax_cost=10.0, **SMALL)
    model = build_model(method, nbody_task.spec, 0, torch.float32)
    gen_copy = copy.deepcopy(model._gen)
    pred = model(nbody_batch)
    aux = method.auxiliary_loss(model, nbody_batch, pred)
    with torch.no_grad():
        d = equivariance_defect(model, nbody_batch, nbody_task.spec, pred, "E3", 1, gen_copy.gen)
        r = float(d / target_signal(nbody_batch, nbody_task.spec))
    assert aux is not None and float(aux.detach()) == pytest.approx(0.5 * float(d), rel=1e-5)  # old lam in the loss
    expected = max(0.0, 0.5 + 2.0 * (r - 0.001 - 0.5 / 10.0))
    assert float(model.lam) == pytest.approx(expected, rel=1e-5)
    extra = method.extra_metrics(model, nbody_batch, pred)
    assert extra["soft_lam"] == pytest.approx(expected, rel=1e-5) and extra["soft_defect"] > 0


def test_dual_mode_fits_and_reports_lam(nbody_task):
    method = eb.get_method("soft_equivariance", lam_mode="dual", lam=0.0, dual_lr=5.0, **SMALL)
    model, _ = _train(method, nbody_task, nbody_task.load("train"), steps=30)
    fitted = float(model.lam)
    assert fitted > 0  # the untrained backbone's defect is far above the tolerance: lam rose
    out = evaluate(model, method, nbody_task, nbody_task.load("test"), 32)
    assert out["soft_lam"] == pytest.approx(fitted)
    fp64 = build_model(method, nbody_task.spec, 0, torch.float64, state=model.state_dict())
    assert float(fp64.lam) == pytest.approx(fitted)  # the rebuilt model carries the fitted lam


def test_large_lam_drives_the_equivariance_error_down():
    """150 steps on 300 n-body systems (width 16, depth 2, batch 32, lr 1e-3), fp64 rel. error
    over E(3) on 32 test graphs x 4 elements. Measured (seeds 0 / 1): baseline 0.067 / 0.075,
    lam = 1000 0.0033 / 0.0030 (20-25x lower); held to 10x. (Exact methods sit at ~1e-16: a
    penalty approaches them only as lam and the budget grow.)"""
    task = eb.get_task("nbody", train_size=300, val_size=16, test_size=64)
    data, batch = task.load("train"), Batch.from_data_list(task.load("test")[:32])
    cfg = TrainConfig(steps=150, batch_size=32, lr=1e-3, val_points=0)
    errs = {}
    for name, opts in (("baseline", {}), ("soft_equivariance", {"lam": 1000.0})):
        method = eb.get_method(name, **SMALL, **opts)
        model = build_model(method, task.spec, 0, torch.float32)
        train(model, method, task, data, cfg, seed=0)
        fp64 = build_model(method, task.spec, 0, torch.float64, state=model.state_dict())
        errs[name] = eb.equivariance_error(fp64, batch, task.spec, n_samples=4, dtype=torch.float64,
                                           group="E3")["rel_mean"]
    assert errs["soft_equivariance"] < errs["baseline"] / 10, errs
