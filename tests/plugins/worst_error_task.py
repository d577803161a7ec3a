"""A plugin task, one file: n-body also scored on its worst particle, a metric declared next to the loss.

``nbody_worst`` is ``nbody`` with a second metric, ``max_abs_err`` (the largest coordinate error of
a graph); declaring it in ``METRICS`` is all it takes: its ``test.``, ``trivial.`` and ``floor.``
rows are then declared too, and nothing else in equibench changes.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch_geometric.utils import scatter

import equibench as eb

NBody = type(eb.get_task("nbody"))


@eb.register_task("nbody_worst")
class NBodyWorst(NBody):  # type: ignore[misc, valid-type]
    """n-body (``nbody``), scored by its mean squared error and by the worst coordinate error per graph."""

    # loss: nbody's, the mean squared error of the predicted positions
    METRICS = (*NBody.METRICS,
               eb.task_metric("max_abs_err", direction="lower", unit="distance",
                              description="largest |predicted − true| position coordinate of a graph (n-body)"))

    @property
    def spec(self) -> eb.TaskSpec:
        return replace(super().spec, name="nbody_worst", metrics=("mse", "max_abs_err"))

    def metric_values(self, pred: torch.Tensor, batch) -> dict[str, torch.Tensor]:
        worst = (pred - batch.y).abs().amax(-1)
        return {**super().metric_values(pred, batch),
                "max_abs_err": scatter(worst, batch.batch, dim=0, dim_size=int(batch.num_graphs), reduce="max")}
