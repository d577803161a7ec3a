"""The ``tune`` bench: the same small hyper-parameter grid for every (task, method), chosen on
the validation split, with a learning-rate grid that extends itself until the choice is interior.

One point per (task, method, grid setting, seed): the model is trained with the suite's budget
and the setting's options (e.g. ``lr``) and only what selection needs is measured — the best
validation value of the task's first metric (``tune.best_val``, its direction that metric's), the
step it was reached at and the convergence verdict. No test metric, equivariance or throughput:
those run once per chosen setting and seed in the task runs that follow.

Selection (``plan.tuned.select_settings``): per (task, method), the setting with the best *mean* validation
value over the tuning seeds (at least two, ``TuningConfig.seeds``); a setting that failed or
diverged in any seed is worse than every finished one.

Extension (``plan.tuned.extension_settings``, one-option grids such as ``{lr: [...]}``): when the best
setting is the largest (smallest) value tried, the next value up (down) by ``extend_factor``
(√10 by default: half a decade on a log axis) is tried in the next wave, until the best setting
has a worse (or failed) neighbour on both sides or ``max_extensions`` waves have run. A choice
still at an edge after the cap is recorded as such (``edge``, ``edge_note``) and every measured
row of it carries the note in ``tuning_edge``; the report flags it.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch

from ..core.config import Config
from ..core.errors import NotApplicable
from ..core.registry import get_method, get_task
from ..core.spec import RunSpec
from ..metrics import catalogue
from .base import Bench, Point, Row, register_bench, stable_hash
from .taskrun import build_model, load_split, spec_identity, validate_spec
from .training import TrainConfig, train

TaskMethod = tuple[str, str]


class TuningConfig(Config):
    """The tuning grid (the suite file's ``tuning:`` mapping).

    ``grid``: train options and the values tried (every combination); ``seeds``: seeds per
    setting (at least two: the choice is made on the mean over them); ``train``: overrides of the
    suite's train settings for the tuning runs (default: the same budget as the measured runs);
    ``use``: ``stored`` applies the settings saved by an earlier ``equibench tune`` next to the
    suite file (when present), ``run`` tunes first in the same run, ``off`` ignores tuning.
    ``max_extensions``: waves of grid extension (one-option grids only; 0 = a fixed grid);
    ``extend_factor``: the ratio between an edge value and the next one tried beyond it."""

    grid: dict[str, list[float]] = {"lr": [3e-3, 1e-3, 3e-4]}
    seeds: tuple[int, ...] = (0, 1)
    train: dict[str, Any] = {}
    use: str = "stored"
    max_extensions: int = 3
    extend_factor: float = math.sqrt(10.0)

    def settings(self) -> list[dict[str, float]]:
        """Every combination of the grid, in a fixed order."""
        keys = sorted(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


def tune_one(spec: RunSpec) -> list[Row]:
    """Train ``spec`` with validation and return the rows selection needs. A run whose loss or
    prediction becomes non-finite raises ``NonFiniteError`` (the engine records a failed row: a
    diverged setting, worse than any other, ``plan.tuned.select_settings``)."""
    task = get_task(spec.task, **spec.task_options)
    method = get_method(spec.method, **spec.method_options)
    tspec = task.spec
    reason = method.supports(tspec)
    cfg = TrainConfig.from_dict(spec.train)
    base = {**spec_identity(spec), "setting": {k: spec.train[k] for k in sorted(spec.train)}, "budget": cfg.budget}
    if reason:
        raise NotApplicable(reason, budget=cfg.budget)
    val_metric = tspec.metrics[0]
    higher = bool(task.primary_metric.higher_is_better)
    model = build_model(method, tspec, spec.seed, torch.float32)
    result = train(model, method, task, load_split(task, "train", spec.seed), cfg, spec.seed, spec.device,
                   val_data=load_split(task, "val", spec.seed), val_metric=val_metric, higher_is_better=higher)
    ctx = {**base, "val_metric": val_metric, "convergence": result.convergence}
    rows = [{**ctx, "metric": catalogue.tune_metric("best_val"), "value": result.summary.get("best_val")},
            {**ctx, "metric": catalogue.tune_metric("best_step"), "value": result.summary.get("best_step")},
            {**ctx, "metric": catalogue.tune_metric("wall_s"), "value": result.summary["wall_s"]}]
    return [r for r in rows if r["value"] is not None]


@register_bench("tune")
class TuneBench(Bench):
    """Tuning runs: one point per (task, method, grid setting, seed) of ``specs``; with
    ``settings_for``, only the settings it lists per (task, method) (an extension wave)."""

    def __init__(self, specs: list[RunSpec], cfg: TuningConfig,
                 settings_for: Mapping[TaskMethod, list[dict[str, float]]] | None = None) -> None:
        self.specs, self.cfg = list(dict.fromkeys(specs)), cfg
        self.settings_for = dict(settings_for) if settings_for is not None else None

    def tuning_specs(self) -> list[RunSpec]:
        out = []
        for s in self.specs:  # measured seeds collapse: the grid runs on the tuning seeds only
            settings = (self.cfg.settings() if self.settings_for is None
                        else self.settings_for.get((s.task, s.method), []))
            for setting in settings:
                for seed in self.cfg.seeds:
                    out.append(RunSpec(task=s.task, method=s.method, seed=seed, task_options=s.task_options,
                                       method_options=s.method_options,
                                       train={**s.train, **self.cfg.train, **setting}, evaluate={},
                                       device=s.device))
        return list(dict.fromkeys(out))

    def points(self) -> list[Point]:
        out = []
        keys = sorted(self.cfg.grid)
        for s in self.tuning_specs():
            validate_spec(s)
            h = stable_hash({"tune": s.to_dict()})
            setting = {k: s.train[k] for k in keys}
            out.append(Point(bench=self.kind, hash=h, label=f"tune/{s.label}/" + ",".join(
                f"{k}={s.train[k]:g}" for k in keys), config=s.to_dict(),
                identity={**spec_identity(s), "spec_hash": h, "setting": setting}, method=s.method,
                device=s.device))
        return out

    @classmethod
    def run_point(cls, point: Point, history: list[Row]) -> list[Row]:
        return tune_one(RunSpec.from_dict(point.config))
