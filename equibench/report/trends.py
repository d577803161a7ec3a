"""Trend figures of the nightly report: each trended metric per method across the nights of
the history. Trended: the task's test metrics, the trained fp32 mean relative equivariance error
and inference throughput (names from the catalogue's builders, log axes as it says)."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ..metrics.catalogue import equivariance_metric, throughput_metric
from .common import plots
from .common.metricinfo import metric_names, spec_for
from .common.render import slug
from .history import trend_table

TRENDED = (equivariance_metric("trained", "fp32", "rel_mean"), throughput_metric("inference", "graphs_per_s"))


def trend_metrics(names: Iterable[str]) -> list[str]:
    """The trended metrics among ``names``: test metrics and ``TRENDED``, sorted."""
    names = list(dict.fromkeys(names))
    return sorted(set(metric_names(names, family="test")) | {m for m in names if m in TRENDED})


def trend_figures(history: pd.DataFrame, task: str, out: Path) -> list[tuple[str, str]]:
    """One PNG per trended metric of ``task`` measured in at least two nights."""
    figs = []
    h = history[history["task"] == task]
    for metric in trend_metrics(h["metric"].unique()):
        t = trend_table(h, metric)
        if t["night"].nunique() < 2:
            continue
        spec = spec_for(metric)
        path = out / f"{slug(task)}_trend_{slug(metric)}.png"
        plots.curves(t, "night", "value", "method", path, f"{task}: {spec.display} per night", "night (oldest = 0)",
                     plots.axis_label(spec), logx=False, logy=spec.log_scale)
        figs.append((path.name, f"{spec.display} ({metric}) across the nights in the history (mean over seeds "
                                f"per night)."))
    return figs
