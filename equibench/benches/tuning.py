"""The ``tune`` bench: the same small hyper-parameter grid for every (task, method), chosen on
the validation split, with a learning-rate grid that extends itself until the choice is interior.

One point per (task, method, grid setting, seed): the model is trained with the suite's budget
and the setting's options (e.g. ``lr``) and only what selection needs is measured — the best
validation value of the task's first metric (``tune.best_val``, its direction that metric's), the
step it was reached at and the convergence verdict. No test metric, equivariance or throughput:
those run once per chosen setting and seed in the task runs that follow.

Selection (``select_settings``): per (task, method), the setting with the best *mean* validation
value over the tuning seeds (at least two, ``TuningConfig.seeds``); a setting that failed or
diverged in any seed is worse than every finished one.

Extension (``extension_settings``, one-option grids such as ``{lr: [...]}``): when the best
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
from ..core.registry import get_method, get_task
from ..core.spec import RunSpec
from ..metrics import catalogue
from .base import Bench, Point, Row, register_bench, stable_hash
from .taskrun import build_model, load_split, spec_identity, validate_spec
from .training import NonFiniteError, TrainConfig, train

FAILED = ("failed", "out_of_memory", "timeout")
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


def extended_value(value: float, factor: float, up: bool) -> float:
    """The next grid value beyond ``value`` (× or ÷ ``factor``), to 3 significant digits."""
    return float(f"{(value * factor if up else value / factor):.3g}")


def tune_one(spec: RunSpec) -> list[Row]:
    """Train ``spec`` with validation and return the rows selection needs (a run whose loss or
    prediction became non-finite is a ``failed`` row: a diverged setting, worse than any other)."""
    task = get_task(spec.task, **spec.task_options)
    method = get_method(spec.method, **spec.method_options)
    tspec = task.spec
    reason = method.supports(tspec)
    cfg = TrainConfig.from_dict(spec.train)
    base = {**spec_identity(spec), "setting": {k: spec.train[k] for k in sorted(spec.train)}, "budget": cfg.budget}
    if reason:
        return [{**base, "metric": catalogue.STATUS, "value": None, "status": "not_applicable", "error": reason}]
    val_metric = tspec.metrics[0]
    higher = bool(catalogue.get_metric(catalogue.test_metric(val_metric)).higher_is_better)
    model = build_model(method, tspec, spec.seed, torch.float32)
    try:
        result = train(model, method, task, load_split(task, "train", spec.seed), cfg, spec.seed, spec.device,
                       val_data=load_split(task, "val", spec.seed), val_metric=val_metric, higher_is_better=higher)
    except NonFiniteError as err:
        return [{**base, "metric": catalogue.STATUS, "value": None, "status": "failed",
                 "error": f"NonFiniteError: {err}", "val_metric": val_metric}]
    ctx = {**base, "status": "ok", "error": "", "val_metric": val_metric, "convergence": result.convergence}
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


def _label(keys: list[str], setting: tuple[float, ...]) -> str:
    return ",".join(f"{k}={x:g}" for k, x in zip(keys, setting))


def select_settings(rows: list[Row], grid_keys: list[str],
                    cfg: TuningConfig | None = None) -> dict[TaskMethod, dict[str, Any]]:
    """Per (task, method): the grid setting with the best mean validation value over seeds.

    Returns ``setting``, ``val_metric``, ``val`` (the chosen mean), ``seeds`` (how many seeds it
    was chosen on), ``scores`` (every setting tried: its mean, or None when a seed failed or
    diverged; such a setting ranks below every finished one) and ``grid`` (the values tried per
    option, as extended). With ``cfg`` and a one-option grid also ``edge`` ("upper", "lower",
    "upper and lower" or "" when the choice has a tried neighbour on both sides), ``extensions``
    (values tried beyond the initial grid, per side) and ``edge_note`` (the text measured rows
    carry in ``tuning_edge``; empty when interior)."""
    groups: dict[TaskMethod, dict[tuple[float, ...], list[float]]] = {}
    failed: dict[TaskMethod, set[tuple[float, ...]]] = {}
    meta: dict[TaskMethod, tuple[str, bool]] = {}
    best_val = catalogue.tune_metric("best_val")
    for r in rows:
        if not isinstance(r.get("train_config"), dict) or not all(k in r["train_config"] for k in grid_keys):
            continue
        if not isinstance(r.get("setting"), dict) and r.get("metric") != best_val:
            continue  # not a tuning row (a measured run sharing the run directory)
        key = (str(r["task"]), str(r["method"]))
        setting = tuple(float(r["train_config"][k]) for k in grid_keys)
        if r.get("status") in FAILED:
            failed.setdefault(key, set()).add(setting)
            groups.setdefault(key, {}).setdefault(setting, [])
            continue
        if r.get("metric") != best_val or r.get("status") != "ok" or r.get("value") is None:
            continue
        value = float(r["value"])
        if not math.isfinite(value):
            failed.setdefault(key, set()).add(setting)
        groups.setdefault(key, {}).setdefault(setting, []).append(value)
        higher = bool(catalogue.get_metric(catalogue.test_metric(r["val_metric"])).higher_is_better)
        meta[key] = (r["val_metric"], higher)
    out = {}
    for key, by_setting in groups.items():
        if key not in meta:
            continue  # every setting failed: nothing to choose
        metric, higher = meta[key]
        bad = failed.get(key, set())
        means = {s: (sum(v) / len(v) if v and s not in bad else None) for s, v in by_setting.items()}
        finished = {s: m for s, m in means.items() if m is not None}
        if not finished:
            continue
        best = (max if higher else min)(finished, key=lambda s: finished[s])
        tried = {k: sorted({s[i] for s in by_setting}) for i, k in enumerate(grid_keys)}
        chosen: dict[str, Any] = {
            "setting": dict(zip(grid_keys, best)), "val_metric": metric, "val": finished[best],
            "seeds": len(by_setting[best]), "scores": {_label(grid_keys, s): m for s, m in sorted(means.items())},
            "grid": tried}
        if cfg is not None and len(grid_keys) == 1:
            k = grid_keys[0]
            values, initial = tried[k], cfg.grid[k]
            upper, lower = best[0] >= values[-1], best[0] <= values[0]
            ext = {"upper": sum(v > max(initial) for v in values), "lower": sum(v < min(initial) for v in values)}
            sides = [side for side, at in (("upper", upper), ("lower", lower)) if at]
            chosen["edge"] = " and ".join(sides)
            chosen["extensions"] = ext
            chosen["edge_note"] = "; ".join(f"{side} edge {k}={best[0]:g} of {{{', '.join(f'{v:g}' for v in values)}}} "
                                            f"after {ext[side]} extension{'s' if ext[side] != 1 else ''}"
                                            for side in sides)
        out[key] = chosen
    return out


def extension_settings(selection: Mapping[TaskMethod, dict[str, Any]],
                       cfg: TuningConfig) -> dict[TaskMethod, list[dict[str, float]]]:
    """The next wave: per (task, method) whose choice sits at an edge of the values tried, the
    value beyond that edge (× or ÷ ``cfg.extend_factor``), unless that side already had
    ``cfg.max_extensions`` extensions. Empty for grids of more than one option."""
    if len(cfg.grid) != 1 or cfg.max_extensions <= 0:
        return {}
    (k,) = cfg.grid
    out: dict[TaskMethod, list[dict[str, float]]] = {}
    for key, chosen in selection.items():
        values, ext = chosen["grid"][k], chosen.get("extensions", {})
        new = []
        if "upper" in chosen.get("edge", "") and ext.get("upper", 0) < cfg.max_extensions:
            new.append({k: extended_value(values[-1], cfg.extend_factor, up=True)})
        if "lower" in chosen.get("edge", "") and ext.get("lower", 0) < cfg.max_extensions:
            new.append({k: extended_value(values[0], cfg.extend_factor, up=False)})
        if new:
            out[key] = new
    return out
