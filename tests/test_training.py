"""The shared training loop: budgets in steps / epochs / seconds / FLOPs, best-validation
selection, learning curves and the convergence verdict."""
from __future__ import annotations

import pytest
import torch

import equibench as eb
from equibench.benches.training import CurvePoint, TrainConfig, convergence, evaluate, train

OPTS = {"width": 16, "depth": 2}


@pytest.fixture(scope="module")
def nbody():
    task = eb.get_task("nbody", train_size=120, val_size=40, test_size=40)
    return task, task.load("train"), task.load("val")


def fresh(task):
    torch.manual_seed(0)
    method = eb.get_method("baseline", **OPTS)
    return method, method.build(task.spec, seed=0)


def test_epochs_budget_counts_batches_and_curve_has_val_points(nbody):
    task, data, val = nbody
    method, model = fresh(task)
    cfg = TrainConfig(epochs=3, batch_size=20, warmup_steps=2, val_points=4)
    res = train(model, method, task, data, cfg, seed=0, val_data=val)
    assert res.summary["steps"] == 3 * (120 // 20)
    assert [c.step for c in res.curve] == [5, 9, 14, 18]  # first step at or past each quarter
    assert res.curve[-1].step == 18 and all(c.flops and c.flops > 0 for c in res.curve)
    assert res.summary["flops"] == pytest.approx(res.curve[-1].flops)


def test_flops_budget_stops_training(nbody):
    task, data, val = nbody
    method, model = fresh(task)
    probe = train(model, method, task, data, TrainConfig(steps=1, batch_size=20, warmup_steps=0, val_points=0),
                  seed=0)
    per_step = probe.summary["flops"]
    method, model = fresh(task)
    res = train(model, method, task, data, TrainConfig(steps=1000, max_flops=7.5 * per_step, batch_size=20,
                                                       warmup_steps=0, val_points=0), seed=0)
    assert res.summary["steps"] == 8  # the first step whose cumulative FLOPs reach the budget


def test_seconds_budget_stops_training(nbody):
    task, data, _ = nbody
    method, model = fresh(task)
    res = train(model, method, task, data, TrainConfig(steps=10**6, max_seconds=0.5, batch_size=20,
                                                       warmup_steps=0, val_points=0), seed=0)
    assert 0 < res.summary["steps"] < 10**6 and res.summary["wall_s"] >= 0.5


def test_best_validation_checkpoint_is_the_one_kept(nbody):
    task, data, val = nbody
    method, model = fresh(task)
    cfg = TrainConfig(steps=30, batch_size=20, warmup_steps=2, lr=3e-2, val_points=6, eval_batch_size=40)
    res = train(model, method, task, data, cfg, seed=0, val_data=val)
    best = min(c.val for c in res.curve)
    assert res.summary["best_val"] == best
    assert evaluate(model, method, task, val, 40)["mse"] == pytest.approx(best, rel=1e-6)
    method, last = fresh(task)
    res_last = train(last, method, task, data, cfg.model_copy(update={"select": "last"}), seed=0, val_data=val)
    assert evaluate(last, method, task, val, 40)["mse"] == pytest.approx(res_last.curve[-1].val, rel=1e-6)


def _curve(values):
    return [CurvePoint(step=i + 1, wall_s=0.0, flops=None, train_loss=0.0, val=v) for i, v in enumerate(values)]


@pytest.mark.parametrize("values, higher, verdict", [
    ([1.0, 0.5, 0.3, 0.25, 0.2499], False, "converged"),       # flat over the last fifth
    ([1.0, 0.5, 0.3, 0.25, 0.10], False, "not_converged"),     # still falling fast
    ([0.5, 0.7, 0.8, 0.9, 0.95], True, "not_converged"),       # accuracy still rising
    ([0.5, 0.7, 0.9, 0.95, 0.951], True, "converged"),
    ([1.0, 0.5], False, "unknown"),                            # too few validations to say
])
def test_convergence_verdict(values, higher, verdict):
    fractions = [(i + 1) / len(values) for i in range(len(values))]
    assert convergence(_curve(values), fractions, higher, tol=0.01)[0] == verdict
