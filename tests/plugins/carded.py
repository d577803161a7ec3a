"""A plugin task and a plugin method whose report depends on what only they declare (the cards test,
``tests/test_cards.py``): a report of their run must read the same in a process without this file.

* task ``carded_nbody``: n-body with a primary metric of its own, ``carded_score`` = 1 / (1 + mse)
  per graph (higher is better, unit "pts"), then ``mse``; floors and trivial predictor as nbody's;
* method ``carded_method``: the backbone (it wraps it), a library model (``origin``) whose
  counterpart is ``baseline``, with a diagnostic of its own, ``carded_diag``.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from equibench import MetricSpec, register_method, register_metric, register_task
from equibench.datasets.nbody import NBody
from equibench.methods.wrappers.baseline import Baseline
from equibench.metrics import catalogue

_SCORE = dict(unit="pts", direction="higher", log_scale=False,
              description="1 / (1 + mse) per graph, a score of the carded plugin")
if hasattr(catalogue, "task_metric"):  # tasks declare their metrics next to their loss (issue 21, item 3)
    CARDED_METRICS = (catalogue.task_metric("carded_score", display="carded score", **_SCORE),)
else:
    CARDED_METRICS = ()
    for family, prefix in (("test", ""), ("trivial", "trivial "), ("floor", "floor ")):
        register_metric(MetricSpec(f"{family}.carded_score", f"{prefix}carded score", family, stat="carded_score",
                                   **_SCORE))
register_metric(MetricSpec("test.carded_diag", "carded diagnostic", "test", unit="widgets", stat="carded_diag",
                           log_scale=False, description="a diagnostic only the carded plugin declares"))


@register_task("carded_nbody")
class CardedNBody(NBody):
    """n-body scored by the carded plugin's own primary metric."""

    METRICS = (*CARDED_METRICS, *getattr(NBody, "METRICS", ()))

    @property
    def spec(self):
        return replace(super().spec, name="carded_nbody", metrics=("carded_score", "mse"))

    def metric_values(self, pred, batch):
        values = super().metric_values(pred, batch)
        return {"carded_score": 1.0 / (1.0 + values["mse"]), **values}


@register_method("carded_method")
class CardedMethod(Baseline):
    """The shared backbone, posing as a library's model (a plugin for the cards test)."""

    origin = "carded-lib"
    counterpart = "baseline"
    float32_caveat = "none measured: a test plugin"

    def extra_metrics(self, model, batch, pred):
        return {"carded_diag": float(torch.as_tensor(pred).abs().mean()) * 0 + 7.0}
