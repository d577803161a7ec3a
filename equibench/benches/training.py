"""The one training loop and evaluation every method goes through.

Same optimiser (Adam), schedule (linear warm-up then cosine decay to 0), gradient clipping and
step budget for every method; method-specific behaviour enters only through the hooks
``train_transform``, ``auxiliary_loss`` and ``extra_metrics`` and the model's train/eval mode.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from ..core.config import Config, config_from_dict
from ..datasets.base import Task
from ..methods.base import Method


class NonFiniteError(RuntimeError):
    """The loss or a prediction became NaN/inf."""


class TrainConfig(Config):
    """The shared optimisation budget (the suite file's ``train:`` mapping)."""

    steps: int = 500
    batch_size: int = 100
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 10.0
    eval_batch_size: int = 200

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return config_from_dict(cls, d, "train")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(model: nn.Module, method: Method, task: Task, data: list[Data], cfg: TrainConfig,
          seed: int, device: torch.device | str = "cpu") -> dict[str, float]:
    """Train ``model`` in place for ``cfg.steps`` steps; returns final loss, wall time and steps/s."""
    device = torch.device(device)
    spec = task.spec
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=len(data) > cfg.batch_size,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    model.to(device).train()
    step, losses, t0 = 0, [], time.perf_counter()
    while step < cfg.steps:
        for batch in loader:
            if step >= cfg.steps:
                break
            batch = method.train_transform(batch, spec, gen).to(device)
            pred = model(batch)
            loss = task.loss(pred, batch)
            aux = method.auxiliary_loss(model, batch, pred)
            total = loss if aux is None else loss + aux
            if not torch.isfinite(total):
                raise NonFiniteError(f"non-finite training loss {total.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
    wall = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 10):]
    return {"final_loss": sum(tail) / len(tail), "wall_s": wall, "steps": step,
            "steps_per_s": step / wall if wall > 0 else float("nan")}


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
        for k, v in method.extra_metrics(model, batch, pred).items():
            extras.setdefault(k, []).append(float(v))
    out = {k: torch.cat(v).mean().item() for k, v in sums.items()}
    out.update({k: sum(v) / len(v) for k, v in extras.items()})
    return out
