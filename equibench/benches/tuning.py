"""The ``tune`` bench: the same small hyper-parameter grid for every (task, method), chosen on
the validation split.

One point per (task, method, grid setting, seed): the model is trained with the suite's budget
and the setting's options (e.g. ``lr``) and only what selection needs is measured — the best
validation value of the task's first metric (``tune.best_val``, its direction that metric's), the
step it was reached at and the convergence verdict. No test metric, equivariance or throughput:
those run once per chosen setting and seed in the task runs that follow. ``select_settings``
picks, per (task, method), the grid setting with the best mean validation value over seeds.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch

from ..core.config import Config
from ..core.registry import get_method, get_task
from ..core.spec import RunSpec
from ..metrics import catalogue
from .base import Bench, Point, Row, register_bench, stable_hash
from .taskrun import build_model, spec_identity, validate_spec
from .training import TrainConfig, train


class TuningConfig(Config):
    """The tuning grid (the suite file's ``tuning:`` mapping).

    ``grid``: train options and the values tried (every combination); ``seeds``: seeds per
    setting; ``train``: overrides of the suite's train settings for the tuning runs (default: the
    same budget as the measured runs); ``use``: ``stored`` applies the settings saved by an earlier
    ``equibench tune`` next to the suite file (when present), ``run`` tunes first in the same run,
    ``off`` ignores tuning."""

    grid: dict[str, list[float]] = {"lr": [3e-3, 1e-3, 3e-4]}
    seeds: tuple[int, ...] = (0,)
    train: dict[str, Any] = {}
    use: str = "stored"

    def settings(self) -> list[dict[str, float]]:
        """Every combination of the grid, in a fixed order."""
        keys = sorted(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


def tune_one(spec: RunSpec) -> list[Row]:
    """Train ``spec`` with validation and return the rows selection needs."""
    task = get_task(spec.task, **spec.task_options)
    method = get_method(spec.method, **spec.method_options)
    tspec = task.spec
    reason = method.supports(tspec)
    base = {**spec_identity(spec), "setting": {k: spec.train[k] for k in sorted(spec.train)}}
    if reason:
        return [{**base, "metric": catalogue.STATUS, "value": None, "status": "not_applicable", "error": reason}]
    cfg = TrainConfig.from_dict(spec.train)
    val_metric = tspec.metrics[0]
    higher = bool(catalogue.get_metric(catalogue.test_metric(val_metric)).higher_is_better)
    model = build_model(method, tspec, spec.seed, torch.float32)
    result = train(model, method, task, task.load("train"), cfg, spec.seed, spec.device,
                   val_data=task.load("val"), val_metric=val_metric, higher_is_better=higher)
    ctx = {**base, "status": "ok", "error": "", "val_metric": val_metric, "convergence": result.convergence}
    rows = [{**ctx, "metric": catalogue.tune_metric("best_val"), "value": result.summary.get("best_val")},
            {**ctx, "metric": catalogue.tune_metric("best_step"), "value": result.summary.get("best_step")},
            {**ctx, "metric": catalogue.tune_metric("wall_s"), "value": result.summary["wall_s"]}]
    return [r for r in rows if r["value"] is not None]


@register_bench("tune")
class TuneBench(Bench):
    """Tuning runs: one point per (task, method, grid setting, seed) of ``specs``."""

    def __init__(self, specs: list[RunSpec], cfg: TuningConfig) -> None:
        self.specs, self.cfg = list(dict.fromkeys(specs)), cfg

    def tuning_specs(self) -> list[RunSpec]:
        out = []
        for s in self.specs:  # measured seeds collapse: the grid runs on the tuning seeds only
            for setting in self.cfg.settings():
                for seed in self.cfg.seeds:
                    out.append(RunSpec(task=s.task, method=s.method, seed=seed, task_options=s.task_options,
                                       method_options=s.method_options,
                                       train={**s.train, **self.cfg.train, **setting}, evaluate={},
                                       device=s.device))
        return list(dict.fromkeys(out))

    def points(self) -> list[Point]:
        out = []
        for s in self.tuning_specs():
            validate_spec(s)
            h = stable_hash({"tune": s.to_dict()})
            out.append(Point(bench=self.kind, hash=h, label=f"tune/{s.label}/" + ",".join(
                f"{k}={s.train[k]:g}" for k in sorted(self.cfg.grid)), config=s.to_dict(),
                identity={**spec_identity(s), "spec_hash": h}, method=s.method, device=s.device))
        return out

    @classmethod
    def run_point(cls, point: Point, history: list[Row]) -> list[Row]:
        return tune_one(RunSpec.from_dict(point.config))


def select_settings(rows: list[Row], grid_keys: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (task, method): the grid setting with the best mean validation value over seeds, with
    every setting's mean (``scores``) and the metric it was chosen on."""
    groups: dict[tuple[str, str], dict[tuple[float, ...], list[float]]] = {}
    meta: dict[tuple[str, str], tuple[str, bool]] = {}
    best_val = catalogue.tune_metric("best_val")
    for r in rows:
        if r.get("metric") != best_val or r.get("status") != "ok" or r.get("value") is None:
            continue
        key = (r["task"], r["method"])
        setting = tuple(float(r["train_config"][k]) for k in grid_keys)
        groups.setdefault(key, {}).setdefault(setting, []).append(float(r["value"]))
        higher = bool(catalogue.get_metric(catalogue.test_metric(r["val_metric"])).higher_is_better)
        meta[key] = (r["val_metric"], higher)
    out = {}
    for key, by_setting in groups.items():
        metric, higher = meta[key]
        means = {s: sum(v) / len(v) for s, v in by_setting.items()}
        best = (max if higher else min)(means, key=lambda s: means[s])
        out[key] = {"setting": dict(zip(grid_keys, best)), "val_metric": metric, "val": means[best],
                    "scores": {",".join(f"{k}={x:g}" for k, x in zip(grid_keys, s)): m for s, m in means.items()}}
    return out
