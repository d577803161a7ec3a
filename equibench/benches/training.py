"""The one training loop and evaluation every method goes through.

Same optimiser (Adam), schedule, gradient clipping and budget for every method; method-specific
behaviour enters only through the hooks ``train_transform``, ``auxiliary_loss`` and
``extra_metrics`` and the model's train/eval mode.

Two kinds of budget (``TrainConfig.budget``, recorded in every row as ``budget``):

* ``fixed``: a given number of steps (or epochs, seconds, FLOPs); linear warm-up, then cosine
  decay to 0 over the budget. Its convergence verdict is judged on the part of the run trained at
  at least half the peak learning rate (``convergence``), so a decayed schedule cannot make it.
* ``converge``: warm-up, then a *constant* learning rate until the validation metric has not
  improved by more than its own noise (the standard error of its mean over the validation graphs)
  for ``patience`` consecutive validations (a plateau), then a cool-down (linear decay to 0) over
  ``cooldown_fraction`` of the steps taken so far, keeping the best-validation checkpoint. Caps on
  steps, seconds and FLOPs bound the whole run; a run that reaches a cap before a plateau cools
  down in the share of the cap reserved for that and is ``cap_reached``.

The learning curve (the validations of a run) is reported by the ``curve`` probe, beside it.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader

from ..core.config import Config, config_from_dict
from ..core.errors import UserError
from ..core.quiet import paused_s
from ..core.registry import register_probe
from ..datasets.base import Task
from ..methods.base import Method
from ..metrics.catalogue import CURVE_VAL, MetricSpec
from ..metrics.probe import Probe, ProbeContext, Reading, reading


class NonFiniteError(RuntimeError):
    """The loss or a prediction became NaN/inf."""


class TrainConfig(Config):
    """The shared optimisation budget and model selection (the suite file's ``train:`` mapping).

    ``budget="fixed"`` (the default). Budget: ``steps`` optimiser steps, or ``epochs`` passes over
    the training split (overrides ``steps``), optionally capped by ``max_seconds`` of training
    wall time and ``max_flops`` training FLOPs (FLOPs of the first step, counted with
    ``FlopCounterMode``, times the steps taken); training stops at whichever budget is spent
    first, and the learning-rate schedule (linear warm-up, then cosine decay to 0) follows the
    fraction of that budget spent.
    Selection: the task's first metric on the validation split is measured ``val_points`` times,
    evenly over the budget; with ``select="best_val"`` the checkpoint with the best validation
    value is the one tested. Convergence (``convergence``): judged on the validations taken while
    the cosine learning rate was at least half its peak (the first half of the budget); a run whose
    best validation value improved over the last two tenths of the budget before that point
    (fractions 0.3 to 0.5) by more than δ = max(``noise_factor`` · SE, ``converge_tol`` · |best|)
    is ``not_converged``, SE being the standard error of the validation mean over graphs.

    ``budget="converge"``: warm-up over ``warmup_steps``, then the constant rate ``lr``; the
    validation metric is measured every ``val_every`` steps (``val_points`` and ``steps`` /
    ``epochs`` are not used). A validation "improves" when it beats the value of the last
    improvement by more than δ (as above, SE of that value); ``patience`` validations in a row
    without an improvement are a plateau (``converged``). Then the learning rate decays linearly to
    0 over ``cooldown_fraction`` × the steps taken so far, with validations continuing, and the best
    checkpoint over the whole run is kept. Caps: ``max_steps`` (this mode only), ``max_seconds``,
    ``max_flops`` bound the whole run, cool-down included: the plateau search stops at
    1 / (1 + ``cooldown_fraction``) of the tightest cap, and a run stopped there cools down and is
    ``cap_reached``.
    """

    steps: int = 500
    epochs: int | None = None
    max_seconds: float | None = None
    max_flops: float | None = None
    batch_size: int = 100
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 10.0
    eval_batch_size: int = 200
    val_points: int = 10
    val_graphs: int = 0
    select: Literal["best_val", "last"] = "best_val"
    converge_tol: float = 0.01
    budget: Literal["fixed", "converge"] = "fixed"
    val_every: int = 25
    patience: int = 5
    noise_factor: float = 1.0
    cooldown_fraction: float = 0.2
    max_steps: int = 20000

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        cfg = config_from_dict(cls, d, "train")
        if cfg.budget == "converge":
            if cfg.val_every < 1 or cfg.patience < 1 or cfg.max_steps < 1:
                raise UserError("train: budget 'converge' needs val_every, patience and max_steps >= 1")
            if not 0.0 <= cfg.cooldown_fraction < 1.0:
                raise UserError(f"train: cooldown_fraction must be in [0, 1), got {cfg.cooldown_fraction}")
        if cfg.noise_factor < 0 or cfg.converge_tol < 0:
            raise UserError("train: noise_factor and converge_tol must be >= 0")
        return cfg

    def step_budget(self, n_train: int) -> int:
        """Optimiser steps the budget allows at most (``epochs`` x batches per epoch, else ``steps``)."""
        if self.epochs is None:
            return self.steps
        per_epoch = n_train // self.batch_size if n_train > self.batch_size else 1
        return self.epochs * max(1, per_epoch)


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Fixed budgets: linear warm-up over ``warmup_steps``, then cosine decay in the fraction of
    the budget spent (at least half the peak while that fraction is at most 1/2)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def converge_lr_factor(step: int, cfg: TrainConfig, cool_start: int | None, cool_steps: int) -> float:
    """Convergence-driven budgets: linear warm-up, then 1 (constant) until the cool-down starts at
    step ``cool_start``, then linear decay over ``cool_steps`` steps: (C - k) / C at its k-th step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cool_start is None:
        return 1.0
    return max(0.0, (cool_steps - (step - cool_start)) / max(1, cool_steps))


@dataclass
class CurvePoint:
    """One validation of a learning curve (``val_se``: standard error of the validation mean
    over graphs)."""

    step: int
    wall_s: float
    flops: float | None
    train_loss: float
    val: float
    val_se: float | None = None


@dataclass
class TrainResult:
    """What training reports: summary numbers (``train.*`` metrics), the learning curve, and
    the selection and convergence verdicts."""

    summary: dict[str, float]
    curve: list[CurvePoint] = field(default_factory=list)
    val_metric: str = ""
    # "converged" | "not_converged" | "unknown" (fixed budgets: too few validations to judge);
    # "converged" | "cap_reached" (convergence-driven budgets)
    convergence: str = "unknown"
    budget: str = "fixed"


@register_probe("curve")
class CurveProbe(Probe):
    """The learning curve: one ``curve.val`` row per validation during training (x = step), from
    the run's ``TrainResult`` (the validations are training's own, ``val_points``)."""

    METRICS = (MetricSpec(CURVE_VAL, "validation value", "curve", stat="val", stage="training", aggregate="mean",
                          description="the task's first metric on the validation split during training (x = step; "
                                      "curve_wall_s, curve_flops beside it)"),)
    phases = ("training",)
    order = 0

    def measure(self, ctx: ProbeContext, phase: str) -> list[Reading]:
        result: TrainResult = ctx.train_result
        return [reading(CURVE_VAL, c.val, x=c.step, x_label="step", curve_wall_s=c.wall_s, curve_flops=c.flops,
                        train_loss=c.train_loss, val_se=c.val_se, val_metric=result.val_metric, stage="training")
                for c in result.curve]


FIXED_WINDOW = (0.3, 0.5)  # fractions of a fixed budget judged: the last two tenths at lr >= peak / 2


def noise_threshold(best: float, se: float | None, tol: float, noise_factor: float) -> float:
    """δ = max(noise_factor · SE, tol · |best|): the improvement that counts as real."""
    return max(noise_factor * (se if se is not None and math.isfinite(se) else 0.0), tol * abs(best))


def convergence(curve: list[CurvePoint], budget_fraction: list[float], higher_is_better: bool,
                tol: float, noise_factor: float = 1.0,
                window: tuple[float, float] = FIXED_WINDOW) -> tuple[str, float | None]:
    """Fixed budgets: (verdict, relative improvement of the best validation value over ``window``).

    The cosine schedule is at least half its peak exactly while the fraction of the budget spent is
    at most 1/2, so the judgement looks only there: with v the validation values in minimisation
    form, b0 the best up to fraction ``window[0]`` (0.3), SE0 its standard error and b1 the best
    up to ``window[1]`` (0.5), the run is ``not_converged`` when b0 - b1 > δ = max(noise_factor ·
    SE0, tol · |b0|). Whatever happens once the learning rate has decayed further cannot make a
    run ``converged``: a run still improving by more than its noise at half the peak rate was cut
    short by its schedule. Fewer than two validations up to ``window[0]``, or none in the window:
    ``unknown``. The improvement returned is (b0 - b1) / |b0|."""
    sign = -1.0 if higher_is_better else 1.0
    lo, hi = window
    before = [(sign * c.val, c.val_se) for c, f in zip(curve, budget_fraction) if f <= lo + 1e-9]
    within = [(sign * c.val, c.val_se) for c, f in zip(curve, budget_fraction) if lo + 1e-9 < f <= hi + 1e-9]
    if len(before) < 2 or not within:
        return "unknown", None
    b0, se0 = min(before, key=lambda p: p[0])
    b1 = min(p[0] for p in before + within)
    improvement = (b0 - b1) / max(abs(b0), 1e-300)
    delta = noise_threshold(b0, se0, tol, noise_factor)
    return ("not_converged" if b0 - b1 > delta else "converged"), improvement


def _step_flops(run_step: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    with FlopCounterMode(display=False) as counter:
        loss = run_step()
    return loss, int(counter.get_total_flops())


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error of the mean s / sqrt(n), s with ddof 1; nan for n = 1)."""
    values = values.double()
    n = values.numel()
    se = (values.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else float("nan")
    return values.mean().item(), se


class _Plateau:
    """Convergence-driven budgets: the plateau detector. An improvement is a value better than the
    last improvement's by more than δ (``noise_threshold`` with that value's SE); ``patience``
    validations in a row without one are a plateau."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.anchor: tuple[float, float | None] | None = None  # (value in minimisation form, its SE)
        self.since = 0

    def update(self, key: float, se: float | None) -> bool:
        if self.anchor is None or key < self.anchor[0] - noise_threshold(
                self.anchor[0], self.anchor[1], self.cfg.converge_tol, self.cfg.noise_factor):
            self.anchor, self.since = (key, se), 0
        else:
            self.since += 1
        return self.since >= self.cfg.patience


def train(model: nn.Module, method: Method, task: Task, data: list[Data], cfg: TrainConfig,
          seed: int, device: torch.device | str = "cpu", val_data: list[Data] | None = None,
          val_metric: str | None = None, higher_is_better: bool = False) -> TrainResult:
    """Train ``model`` in place to the budget of ``cfg``; with ``val_data``, validate ``val_metric``
    (default: the task's first metric) ``cfg.val_points`` times (``budget="converge"``: every
    ``cfg.val_every`` steps, and ``val_data`` is required) and, with ``select="best_val"``, leave the
    best checkpoint in ``model``."""
    device = torch.device(device)
    spec = task.spec
    converge = cfg.budget == "converge"
    if converge and not val_data:
        raise UserError("train: budget 'converge' needs a validation split (it stops on a validation plateau)")
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=len(data) > cfg.batch_size,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    max_steps = cfg.max_steps if converge else cfg.step_budget(len(data))
    validate = bool(val_data) and (converge or cfg.val_points > 0)
    if val_data and cfg.val_graphs:
        val_data = val_data[:cfg.val_graphs]
    val_metric = val_metric or spec.metrics[0]
    model.to(device).train()
    step, flops_per_step, train_s = 0, None, 0.0
    losses: list[float] = []
    curve: list[CurvePoint] = []
    fractions: list[float] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    next_val = 1
    plateau = _Plateau(cfg)
    cool_start: int | None = None
    cool_steps = 0
    verdict = "unknown"
    search_end = 1.0 / (1.0 + cfg.cooldown_fraction)  # share of a cap the plateau search may use

    def progress() -> float:
        parts = [step / max(1, max_steps)]
        if cfg.max_seconds:
            parts.append(train_s / cfg.max_seconds)
        if cfg.max_flops and flops_per_step:
            parts.append(step * flops_per_step / cfg.max_flops)
        return max(parts)

    def run_validation() -> None:
        nonlocal best
        assert val_data is not None
        values, _ = metric_values(model, method, task, val_data, cfg.eval_batch_size, device)
        val, se = mean_and_se(values[val_metric])
        model.train()
        recent = losses[-max(1, len(losses) // 10):]
        curve.append(CurvePoint(step, train_s, float(step * flops_per_step) if flops_per_step else None,
                                sum(recent) / len(recent), val, se))
        fractions.append(progress())
        key = -val if higher_is_better else val
        if best is None or key < best[0]:
            best = (key, copy.deepcopy(model.state_dict()))

    def start_cooldown(why: str) -> None:
        """Cool down over ceil(cooldown_fraction x steps so far), never past the step or FLOP cap
        (the wall-clock cap can be overrun by the cool-down's share of time measurement noise)."""
        nonlocal cool_start, cool_steps, verdict
        step_cap = max_steps
        if cfg.max_flops and flops_per_step:
            step_cap = min(step_cap, int(cfg.max_flops // flops_per_step))
        cool_start, verdict = step, why
        cool_steps = max(0, min(math.ceil(cfg.cooldown_fraction * step), step_cap - step))

    done = False
    while not done:
        for batch in loader:
            t0, paused0 = time.perf_counter(), paused_s()
            factor = (converge_lr_factor(step, cfg, cool_start, cool_steps) if converge
                      else lr_factor(step, progress(), cfg))
            for g in opt.param_groups:
                g["lr"] = cfg.lr * factor
            batch = method.train_transform(batch, spec, gen).to(device)

            def run_step(batch: Batch = batch, step: int = step) -> torch.Tensor:
                pred = model(batch)
                loss = task.loss(pred, batch)
                aux = method.auxiliary_loss(model, batch, pred)
                total = loss if aux is None else loss + aux
                if not torch.isfinite(total):
                    raise NonFiniteError(f"non-finite training loss {total.item()} at step {step}")
                opt.zero_grad(set_to_none=True)
                total.backward()
                return loss

            if flops_per_step is None:
                loss, flops_per_step = _step_flops(run_step)
            else:
                loss = run_step()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
            step += 1
            train_s += time.perf_counter() - t0 - (paused_s() - paused0)  # not while stopped (--jobs)
            if converge:
                if cool_start is None:
                    validated = step % cfg.val_every == 0
                    if validated:
                        run_validation()
                        if plateau.update(-curve[-1].val if higher_is_better else curve[-1].val, curve[-1].val_se):
                            start_cooldown("converged")
                    if cool_start is None and progress() >= search_end - 1e-12:
                        if not validated:
                            run_validation()
                        start_cooldown("cap_reached")
                    done = cool_start is not None and cool_steps == 0
                else:
                    into = step - cool_start
                    done = into >= cool_steps
                    if done or into % cfg.val_every == 0:
                        run_validation()
            else:
                frac = progress()
                done = frac >= 1.0 - 1e-12
                if validate and (done or frac >= next_val / cfg.val_points):
                    while next_val / cfg.val_points <= frac + 1e-12:
                        next_val += 1
                    run_validation()
            if done:
                break
    tail = losses[-max(1, len(losses) // 10):]
    summary: dict[str, float] = {"final_loss": sum(tail) / len(tail), "wall_s": train_s, "steps": step,
                                 "steps_per_s": step / train_s if train_s > 0 else float("nan")}
    if flops_per_step is not None:
        summary["flops"] = float(step * flops_per_step)
    result = TrainResult(summary, curve, val_metric, budget=cfg.budget)
    if curve:
        sign = -1.0 if higher_is_better else 1.0
        if converge:
            result.convergence = verdict
            searched = [c for c in curve if cool_start is None or c.step <= cool_start]
            if verdict == "converged":
                summary["plateau_step"] = float(cool_start or 0)
            summary["cooldown_steps"] = float(cool_steps)
            if plateau.anchor is not None and plateau.anchor[1] is not None:
                summary["val_noise"] = plateau.anchor[1]
            if len(searched) > cfg.patience:  # gain of the best over the last `patience` validations
                b0 = min(sign * c.val for c in searched[:-cfg.patience])
                b1 = min(sign * c.val for c in searched)
                summary["val_improvement"] = (b0 - b1) / max(abs(b0), 1e-300)
        else:
            verdict, improvement = convergence(curve, fractions, higher_is_better, cfg.converge_tol,
                                               cfg.noise_factor)
            result.convergence = verdict
            if improvement is not None:
                summary["val_improvement"] = improvement
                b0_point = min((c for c, f in zip(curve, fractions) if f <= FIXED_WINDOW[0] + 1e-9),
                               key=lambda c: sign * c.val)
                if b0_point.val_se is not None and math.isfinite(b0_point.val_se):
                    summary["val_noise"] = b0_point.val_se
        best_i = min(range(len(curve)), key=lambda i: sign * curve[i].val)
        summary["best_val"] = curve[best_i].val
        summary["best_step"] = curve[best_i].step
        if cfg.select == "best_val" and best is not None:
            model.load_state_dict(best[1])
    return result


@torch.no_grad()
def metric_values(model: nn.Module, method: Method, task: Task, data: list[Data], batch_size: int,
                  device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(per-graph values of every task metric over ``data`` as float64 tensors, the method's extra
    metrics averaged over batches), with the model in eval mode."""
    model.to(device).eval()
    sums: dict[str, list[torch.Tensor]] = {}
    extras: dict[str, list[float]] = {}
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        batch = batch.to(device)
        pred = model(batch)
        if not torch.isfinite(pred).all():
            raise NonFiniteError("non-finite prediction")
        for k, v in task.metric_values(pred, batch).items():
            sums.setdefault(k, []).append(v.detach().double().cpu())
        for k, x in method.extra_metrics(model, batch, pred).items():
            extras.setdefault(k, []).append(float(x))
    return {k: torch.cat(v) for k, v in sums.items()}, {k: sum(v) / len(v) for k, v in extras.items()}


def evaluate(model: nn.Module, method: Method, task: Task, data: list[Data], batch_size: int,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Task metrics averaged over every graph of ``data`` (plus the method's extra metrics,
    averaged over batches), with the model in eval mode."""
    values, extras = metric_values(model, method, task, data, batch_size, device)
    out = {k: v.mean().item() for k, v in values.items()}
    out.update(extras)
    return out
