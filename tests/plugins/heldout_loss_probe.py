"""A plugin probe, one file: the task's training loss on the first test graphs, after training.

Switched on in a suite's ``evaluate:`` mapping with ``heldout_loss: true`` (``heldout_loss_graphs``
sets how many test graphs); its metric is declared here and nowhere else.
"""
from __future__ import annotations

import torch

import equibench as eb


@eb.register_probe("heldout_loss")
class HeldoutLoss(eb.Probe):
    """The task's training loss (``Task.loss``) of the trained model on the first test graphs."""

    METRICS = (eb.MetricSpec("heldout_loss", "held-out loss", "heldout_loss", unit="loss", direction="lower",
                             description="the task's training loss on the first test graphs, after training"),)
    phases = ("trained",)
    enabled = False  # on with `heldout_loss: true`

    class Settings(eb.ProbeSettings):
        graphs: int = 16  # suite key: heldout_loss_graphs

    def measure(self, ctx: eb.ProbeContext, phase: str) -> list[dict]:
        batch = ctx.test_batch(self.settings.graphs).to(ctx.device)
        with torch.no_grad():
            loss = ctx.task.loss(ctx.model(batch), batch)
        return [{"metric": "heldout_loss", "value": float(loss), "batch_size": int(batch.num_graphs)}]
