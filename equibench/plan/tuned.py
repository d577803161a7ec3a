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
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..benches.tuning import TuningConfig
from ..core.envinfo import git_commit
from ..core.errors import UserError
from ..core.spec import RunSpec

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
    return (f"stored tuning (run {entry.get('run')}, {str(entry.get('tuned_at') or '?')[:10]}, "
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
