"""The shared training loop: budgets in steps / epochs / seconds / FLOPs, best-validation
selection, learning curves and the convergence verdict."""
from __future__ import annotations

import math

import pytest
import torch

import equibench as eb
from equibench.benches.training import (
    CurvePoint,
    TrainConfig,
    converge_lr_factor,
    convergence,
    evaluate,
    lr_factor,
    mean_and_se,
    train,
)
from equibench.core.errors import UserError

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


def _curve(values, se=None):
    return [CurvePoint(step=i + 1, wall_s=0.0, flops=None, train_loss=0.0, val=v, val_se=se)
            for i, v in enumerate(values)]


TENTHS = [(i + 1) / 10 for i in range(10)]


@pytest.mark.parametrize("values, higher, verdict", [
    # flat from 0.3 on (half-peak window 0.3-0.5 included): converged
    ([1.0, 0.5, 0.3, 0.2999, 0.2998, 0.2997, 0.2996, 0.2995, 0.2994, 0.2993], False, "converged"),
    # still falling fast at half the peak learning rate (0.3 -> 0.5), flat afterwards
    ([1.0, 0.6, 0.4, 0.3, 0.2, 0.19, 0.19, 0.19, 0.19, 0.19], False, "not_converged"),
    ([0.5, 0.6, 0.7, 0.8, 0.9, 0.91, 0.91, 0.91, 0.91, 0.91], True, "not_converged"),   # accuracy still rising
    ([0.5, 0.7, 0.9, 0.9005, 0.9007, 0.95, 0.96, 0.96, 0.96, 0.96], True, "converged"),  # late gains don't count
])
def test_convergence_verdict(values, higher, verdict):
    assert convergence(_curve(values), TENTHS, higher, tol=0.01)[0] == verdict


def test_too_few_validations_before_the_window_is_unknown():
    assert convergence(_curve([1.0, 0.5, 0.4]), [1 / 3, 2 / 3, 1.0], False, tol=0.01)[0] == "unknown"


def test_a_cosine_schedule_alone_cannot_make_a_fixed_budget_converged():
    """The issue's case: validation still falling fast while the cosine rate is above half its peak,
    then flat because the rate decayed to 0. The old rule (best improved < 1 % over the last fifth)
    calls this converged; the half-peak rule must not."""
    cfg = TrainConfig(steps=1000, warmup_steps=0)
    fractions = TENTHS
    lr = [lr_factor(int(f * 1000), f, cfg) for f in fractions]
    values = [1.0, 0.7, 0.5, 0.35, 0.25, 0.22, 0.215, 0.2149, 0.2148, 0.2148]
    curve = _curve(values, se=0.005)
    last_fifth_gain = (min(values[:8]) - min(values)) / min(values[:8])
    assert last_fifth_gain < 0.01 and lr[7] < 0.21  # the schedule alone would satisfy the old rule
    assert all(x >= 0.5 - 1e-12 for x in lr[:5])    # fractions 0.1-0.5 run at >= half the peak
    verdict, gain = convergence(curve, fractions, False, tol=0.01)
    assert verdict == "not_converged" and gain == pytest.approx((0.5 - 0.25) / 0.5)


def test_fixed_judgement_uses_the_validation_noise():
    values = [1.0, 0.6, 0.50, 0.49, 0.48, 0.47, 0.47, 0.47, 0.47, 0.47]  # 4 % better in the window
    assert convergence(_curve(values, se=0.005), TENTHS, False, tol=0.0)[0] == "not_converged"
    assert convergence(_curve(values, se=0.05), TENTHS, False, tol=0.0)[0] == "converged"  # within 1 SE
    assert convergence(_curve(values, se=0.005), TENTHS, False, tol=0.0, noise_factor=5.0)[0] == "converged"


def test_mean_and_se_and_converge_schedule():
    mean, se = mean_and_se(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and se == pytest.approx((5 / 3) ** 0.5 / 2)
    cfg = TrainConfig(budget="converge", warmup_steps=4)
    assert [converge_lr_factor(s, cfg, None, 0) for s in (0, 3, 4, 500)] == [0.25, 1.0, 1.0, 1.0]
    assert [converge_lr_factor(s, cfg, 100, 20) for s in (100, 110, 119, 120)] == [1.0, 0.5, 0.05, 0.0]


@pytest.mark.parametrize("options, message", [
    ({"budget": "converge", "cooldown_fraction": 1.0}, "cooldown_fraction"),
    ({"budget": "converge", "patience": 0}, "patience"),
    ({"budget": "sometimes"}, "budget"),
])
def test_bad_converge_options_are_one_line(options, message):
    with pytest.raises(UserError, match=message):
        TrainConfig.from_dict(options)


def test_converge_budget_stops_on_a_plateau_and_cools_down(nbody):
    task, data, val = nbody
    method, model = fresh(task)
    cfg = TrainConfig(budget="converge", batch_size=20, warmup_steps=5, lr=1e-2, val_every=5, patience=4,
                      max_steps=3000, eval_batch_size=40)
    res = train(model, method, task, data, cfg, seed=0, val_data=val)
    assert res.convergence == "converged" and res.budget == "converge"
    plateau = int(res.summary["plateau_step"])
    assert plateau % 5 == 0 and res.summary["cooldown_steps"] == math.ceil(0.2 * plateau)
    assert res.summary["steps"] == plateau + res.summary["cooldown_steps"] < 3000
    # the plateau: the last `patience` validations before it beat none of the earlier ones by more than δ
    before = [c for c in res.curve if c.step <= plateau]
    anchor = min(before[:-4], key=lambda c: c.val)
    delta = max(anchor.val_se, 0.01 * anchor.val)
    assert min(c.val for c in before[-4:]) >= anchor.val - delta - 1e-12
    assert res.summary["val_noise"] > 0 and all(c.val_se and c.val_se > 0 for c in res.curve)
    assert [c.step for c in res.curve if c.step > plateau][-1] == res.summary["steps"]  # validated at the end
    best = min(c.val for c in res.curve)
    assert evaluate(model, method, task, val, 40)["mse"] == pytest.approx(best, rel=1e-6)


def test_converge_budget_capped_before_a_plateau_is_cap_reached(nbody):
    task, data, val = nbody
    method, model = fresh(task)
    cfg = TrainConfig(budget="converge", batch_size=20, warmup_steps=2, lr=1e-3, val_every=2, patience=50,
                      max_steps=12)
    res = train(model, method, task, data, cfg, seed=0, val_data=val)
    # the search may use 1 / 1.2 of the cap (10 steps), the cool-down the rest (ceil(0.2 * 10) = 2)
    assert res.convergence == "cap_reached" and res.summary["steps"] == 12
    assert res.summary["cooldown_steps"] == 2 and "plateau_step" not in res.summary
    # 13 steps: the search stops at step 11 (>= 13 / 1.2); ceil(0.2 * 11) = 3 would overrun, the cap wins
    method, model = fresh(task)
    res = train(model, method, task, data, cfg.model_copy(update={"max_steps": 13}), seed=0, val_data=val)
    assert res.summary["steps"] == 13 and res.summary["cooldown_steps"] == 2
    with pytest.raises(UserError, match="validation split"):
        train(model, method, task, data, cfg, seed=0)
