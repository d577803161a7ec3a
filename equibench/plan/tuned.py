"""Tuned settings stored with a suite: ``<suite>.tuned.yaml`` beside the suite file.

``equibench tune SUITE`` runs the suite's tuning grid (``benches/tuning.py``), extending it in
waves where a choice sits at its edge, and writes, per task and method, the chosen setting with the
validation value it was chosen on and the number of seeds, every setting's score (the grid as
extended: ``grid`` per method), whether the choice is still at an edge after the cap (``edge``,
``edge_note``, ``extensions``), the tuning run, its commit and date. A suite whose
``tuning.use`` is ``stored`` applies the file when it exists, and every measured row says so in
``setting_source``; without the file the suite's own settings are used and ``setting_source``
says "suite file". A choice left at an edge also sets ``RunSpec.tuning_edge``, which every
measured row carries (column ``tuning_edge``).
"""
from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..benches.base import Row
from ..benches.tuning import TaskMethod, TuningConfig
from ..core.envinfo import git_commit
from ..core.errors import UserError
from ..core.spec import RunSpec
from ..metrics import catalogue
from ..results.status import FAILURES, Status

SUFFIX = ".tuned.yaml"
Selection = dict[tuple[str, str], dict[str, Any]]


def tuned_path(suite_source: str) -> Path:
    """Where the tuned settings of the suite read from ``suite_source`` live (a built-in suite's
    beside its YAML in the package, a suite file's beside the file)."""
    path = Path(suite_source)
    if path.suffix in (".yaml", ".yml"):
        return path.with_name(path.stem + SUFFIX)
    return Path(str(resources.files("equibench.suites") / f"{suite_source}{SUFFIX}"))


class _PlainDumper(yaml.SafeDumper):
    """Safe YAML without anchors: repeated values (each entry's tuning budget) are written out."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write_tuned(path: Path, suite: str, run_dir: Path, cfg: TuningConfig, selection: Selection) -> Path:
    """Write the selection (atomically) with where it came from. Every entry names the tuning run,
    date, commit, tuning budget (``train_overrides``) and extension cap it came from; entries of an
    existing file for the same suite that this selection does not cover (a tune narrowed with
    ``--task`` / ``--method``) are kept as they were, so re-tuning one (task, method) never drops
    the others."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    origin = {"run": run_dir.name, "tuned_at": now, "commit": git_commit(), "train_overrides": dict(cfg.train),
              "max_extensions": cfg.max_extensions}
    settings: dict[str, dict[str, Any]] = {}
    old = read_tuned(path) if path.is_file() else None
    if old and old.get("suite") == suite:
        old_origin = {k: old.get(k) for k in origin}
        for task, methods in (old.get("settings") or {}).items():
            for method, entry in methods.items():
                if (task, method) not in selection:
                    settings.setdefault(task, {})[method] = {**entry, **{k: entry.get(k, v)
                                                                          for k, v in old_origin.items()}}
    for (task, method), chosen in sorted(selection.items()):
        entry = {**chosen["setting"], "val_metric": chosen["val_metric"], "val": chosen["val"],
                 "seeds": chosen.get("seeds"), "scores": chosen["scores"],
                 "grid": {k: list(v) for k, v in chosen.get("grid", {}).items()}}
        for k in ("edge", "edge_note", "extensions"):
            if k in chosen:
                entry[k] = chosen[k]
        settings.setdefault(task, {})[method] = {**entry, **origin}
    settings = {t: dict(sorted(ms.items())) for t, ms in sorted(settings.items())}
    doc = {"suite": suite, **origin, "grid": {k: list(v) for k, v in cfg.grid.items()},
           "extend_factor": cfg.extend_factor, "seeds": list(cfg.seeds), "settings": settings,
           "at_edge": [f"{t}/{m}" for t, ms in settings.items() for m, e in ms.items() if e.get("edge_note")]}
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(yaml.dump(doc, Dumper=_PlainDumper, sort_keys=False))
    os.replace(tmp, path)
    return path


def read_tuned(path: Path) -> dict[str, Any] | None:
    """The stored tuned settings at ``path`` (None when there are none)."""
    if not path.is_file():
        return None
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"malformed tuned settings {path}: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("settings"), dict):
        raise UserError(f"malformed tuned settings {path}: expected a mapping with 'settings'")
    return doc


def stored_selection(doc: dict[str, Any], grid_keys: list[str]) -> tuple[Selection, str]:
    """(selection, description of where it came from) from a stored tuned-settings document."""
    selection: Selection = {}
    for task, methods in doc["settings"].items():
        for method, chosen in methods.items():
            selection[(task, method)] = {"setting": {k: chosen[k] for k in grid_keys if k in chosen},
                                         "val_metric": chosen.get("val_metric"), "val": chosen.get("val"),
                                         "grid": chosen.get("grid") or {}, "seeds": chosen.get("seeds"),
                                         "edge_note": chosen.get("edge_note") or ""}
            if chosen.get("run") and chosen.get("run") != doc.get("run"):  # kept from an earlier tune
                selection[(task, method)]["where"] = _origin(chosen)
    return selection, _origin(doc)


def _origin(entry: dict[str, Any]) -> str:
    """Where a stored setting came from; ``from_suite`` names another suite's tuning run whose entry
    was adopted (the same network, parameters and batch: ``efficiency`` reuses ``verdict-cpu``'s)."""
    suite = f" of suite {entry['from_suite']}" if entry.get("from_suite") else ""
    return (f"stored tuning (run {entry.get('run')}{suite}, {str(entry.get('tuned_at') or '?')[:10]}, "
            f"commit {entry.get('commit', '?')})")


def apply_selection(specs: list[RunSpec], selection: Selection, where: str, grid: dict[str, Any]) -> list[RunSpec]:
    """``specs`` with each (task, method)'s chosen setting in its train options and a
    ``setting_source`` saying where it came from (the grid as extended for that method when the
    selection records it) and ``tuning_edge`` (the selection's ``edge_note``: empty when interior);
    specs without a selection keep the suite's."""
    out = []
    for s in specs:
        chosen = selection.get((s.task, s.method))
        if chosen is None or not chosen["setting"]:
            out.append(s)
            continue
        setting = ", ".join(f"{k}={v:g}" for k, v in sorted(chosen["setting"].items()))
        val = chosen.get("val")
        tried = chosen.get("grid") or grid
        grid_text = "; ".join(f"{k} in {{{', '.join(f'{v:g}' for v in sorted(vals))}}}"
                              for k, vals in sorted(tried.items()))
        seeds = chosen.get("seeds")
        source = (f"{setting} chosen on validation {chosen.get('val_metric')}"
                  + (f" ({val:.4g}" + (f", mean of {seeds} seeds)" if seeds else ")")
                     if isinstance(val, (int, float)) else "")
                  + f" from grid {grid_text}; {chosen.get('where') or where}")
        out.append(RunSpec(task=s.task, method=s.method, seed=s.seed, task_options=s.task_options,
                           method_options=s.method_options, train={**s.train, **chosen["setting"]},
                           evaluate=s.evaluate, device=s.device, setting_source=source,
                           tuning_edge=str(chosen.get("edge_note") or "")))
    return out


# ---------------------------------------------------------------------------------------------
# choosing from the tuning rows (``benches.tuning``: the grid points)

def extended_value(value: float, factor: float, up: bool) -> float:
    """The next grid value beyond ``value`` (× or ÷ ``factor``), to 3 significant digits."""
    return float(f"{(value * factor if up else value / factor):.3g}")


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
        if r.get("status") in FAILURES:
            failed.setdefault(key, set()).add(setting)
            groups.setdefault(key, {}).setdefault(setting, [])
            continue
        if r.get("metric") != best_val or r.get("status") != Status.OK or r.get("value") is None:
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
