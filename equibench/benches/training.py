"""The one training loop and evaluation every method goes through.

Same optimiser (Adam), schedule (linear warm-up then cosine decay to 0), gradient clipping and
step budget for every method; method-specific behaviour enters only through the hooks
``train_transform``, ``auxiliary_loss`` and ``extra_metrics`` and the model's train/eval mode.
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
from ..datasets.base import Task
from ..methods.base import Method


class NonFiniteError(RuntimeError):
    """The loss or a prediction became NaN/inf."""


class TrainConfig(Config):
    """The shared optimisation budget and model selection (the suite file's ``train:`` mapping).

    Budget: ``steps`` optimiser steps, or ``epochs`` passes over the training split (overrides
    ``steps``), optionally capped by ``max_seconds`` of training wall time and ``max_flops``
    training FLOPs (FLOPs of the first step, counted with ``FlopCounterMode``, times the steps
    taken); training stops at whichever budget is spent first, and the learning-rate schedule
    (linear warm-up, then cosine decay to 0) follows the fraction of that budget spent.
    Selection: the task's first metric on the validation split is measured ``val_points`` times,
    evenly over the budget; with ``select="best_val"`` the checkpoint with the best validation
    value is the one tested. Convergence: a run whose best validation value still improved by
    more than ``converge_tol`` (relative) over the last fifth of its budget is ``not_converged``.
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, d, "train")

    def step_budget(self, n_train: int) -> int:
        """Optimiser steps the budget allows at most (``epochs`` x batches per epoch, else ``steps``)."""
        if self.epochs is None:
            return self.steps
        per_epoch = n_train // self.batch_size if n_train > self.batch_size else 1
        return self.epochs * max(1, per_epoch)


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay in the fraction of the budget spent."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class CurvePoint:
    """One validation of a learning curve."""

    step: int
    wall_s: float
    flops: float | None
    train_loss: float
    val: float


@dataclass
class TrainResult:
    """What training reports: summary numbers (``train.*`` metrics), the learning curve, and
    the selection and convergence verdicts."""

    summary: dict[str, float]
    curve: list[CurvePoint] = field(default_factory=list)
    val_metric: str = ""
    convergence: str = "unknown"  # "converged" | "not_converged" | "unknown" (too few validations)


def convergence(curve: list[CurvePoint], budget_fraction: list[float], higher_is_better: bool,
                tol: float) -> tuple[str, float | None]:
    """(verdict, relative improvement of the best validation value over the last fifth).

    With v the validation values in minimisation form, b0 the best before 80 % of the budget and
    b1 the best overall: improvement = (b0 - b1) / |b0|; ``not_converged`` when it exceeds ``tol``.
    Fewer than two validations before the last fifth, or none in it: ``unknown``."""
    sign = -1.0 if higher_is_better else 1.0
    before = [sign * c.val for c, f in zip(curve, budget_fraction) if f <= 0.8 + 1e-9]
    after = [sign * c.val for c, f in zip(curve, budget_fraction) if f > 0.8 + 1e-9]
    if len(before) < 2 or not after:
        return "unknown", None
    b0, b1 = min(before), min(before + after)
    improvement = (b0 - b1) / max(abs(b0), 1e-300)
    return ("not_converged" if improvement > tol else "converged"), improvement


def _step_flops(run_step: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    with FlopCounterMode(display=False) as counter:
        loss = run_step()
    return loss, int(counter.get_total_flops())


def train(model: nn.Module, method: Method, task: Task, data: list[Data], cfg: TrainConfig,
          seed: int, device: torch.device | str = "cpu", val_data: list[Data] | None = None,
          val_metric: str | None = None, higher_is_better: bool = False) -> TrainResult:
    """Train ``model`` in place to the budget of ``cfg``; with ``val_data``, validate ``val_metric``
    (default: the task's first metric) ``cfg.val_points`` times and, with ``select="best_val"``,
    leave the best checkpoint in ``model``."""
    device = torch.device(device)
    spec = task.spec
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=len(data) > cfg.batch_size,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    max_steps = cfg.step_budget(len(data))
    validate = bool(val_data) and cfg.val_points > 0
    if val_data and cfg.val_graphs:
        val_data = val_data[:cfg.val_graphs]
    val_metric = val_metric or spec.metrics[0]
    model.to(device).train()
    step, losses, flops_per_step, train_s = 0, [], None, 0.0
    curve: list[CurvePoint] = []
    fractions: list[float] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    next_val = 1

    def progress() -> float:
        parts = [step / max(1, max_steps)]
        if cfg.max_seconds:
            parts.append(train_s / cfg.max_seconds)
        if cfg.max_flops and flops_per_step:
            parts.append(step * flops_per_step / cfg.max_flops)
        return max(parts)

    done = False
    while not done:
        for batch in loader:
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, progress(), cfg)
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
            train_s += time.perf_counter() - t0
            frac = progress()
            done = frac >= 1.0 - 1e-12
            if validate and (done or frac >= next_val / cfg.val_points):
                while next_val / cfg.val_points <= frac + 1e-12:
                    next_val += 1
                assert val_data is not None
                val = evaluate(model, method, task, val_data, cfg.eval_batch_size, device)[val_metric]
                model.train()
                recent = losses[-max(1, len(losses) // 10):]
                curve.append(CurvePoint(step, train_s, float(step * flops_per_step) if flops_per_step else None,
                                        sum(recent) / len(recent), val))
                fractions.append(frac)
                key = -val if higher_is_better else val
                if best is None or key < best[0]:
                    best = (key, copy.deepcopy(model.state_dict()))
            if done:
                break
    tail = losses[-max(1, len(losses) // 10):]
    summary: dict[str, float] = {"final_loss": sum(tail) / len(tail), "wall_s": train_s, "steps": step,
                                 "steps_per_s": step / train_s if train_s > 0 else float("nan")}
    if flops_per_step is not None:
        summary["flops"] = float(step * flops_per_step)
    result = TrainResult(summary, curve, val_metric)
    if curve:
        verdict, improvement = convergence(curve, fractions, higher_is_better, cfg.converge_tol)
        result.convergence = verdict
        best_i = min(range(len(curve)), key=lambda i: -curve[i].val if higher_is_better else curve[i].val)
        summary["best_val"] = curve[best_i].val
        summary["best_step"] = curve[best_i].step
        if improvement is not None:
            summary["val_improvement_last_fifth"] = improvement
        if cfg.select == "best_val" and best is not None:
            model.load_state_dict(best[1])
    return result


@torch.no_grad()
def evaluate(model: nn.Module, method: Method, task: Task, data: list[Data], batch_size: int,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Task metrics averaged over every graph of ``data`` (plus the method's extra metrics,
    averaged over batches), with the model in eval mode."""
    model.to(device).eval()
    sums: dict[str, list[torch.Tensor]] = {}
    extras: dict[str, list[float]] = {}
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        batch = batch.to(device)
        pred = model(batch)
        if not torch.isfinite(pred).all():
            raise NonFiniteError("non-finite prediction on the test split")
        for k, v in task.metric_values(pred, batch).items():
            sums.setdefault(k, []).append(v.detach().double().cpu())
        for k, x in method.extra_metrics(model, batch, pred).items():
            extras.setdefault(k, []).append(float(x))
    out = {k: torch.cat(v).mean().item() for k, v in sums.items()}
    out.update({k: sum(v) / len(v) for k, v in extras.items()})
    return out
