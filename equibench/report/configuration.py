"""The configuration that ran (issue 19, item 3): each task section's collapsible "Configuration
that ran" table, read from the ``resolved.json`` the runner writes into every run directory
(``engine.runner.record_resolved``; entries from ``plan.suites.resolved_configs``).

One row per (method, configuration): the parameter count (counted when the run was planned,
else the run's own ``params`` rows), seeds, device, and every task option, training setting,
evaluate setting and method option that is *not* at its default, each with where it came from
(``default`` / ``smoke scale`` / ``suite file`` / ``suite file (task_overrides.T)`` / ``sweep`` /
``tuning`` / ``command line`` / ``RunSpec``). Parts every row shares (a task's sizes, the
training budget) are stated once, in a first row "every method". The entries' notes
(a task or method the suite does not configure, and at which scale it ran) become the section's
notes. A report stays a function of its run directories: several directories' entries are
merged (the same configuration's seeds united), and runs written before ``resolved.json``
existed simply have no table.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ..engine.runner import RESOLVED_FILE, SUITE_FILE
from ..metrics.catalogue import PARAMS
from ..plan.suites import DEFAULT
from .common.render import TableView

#: the option groups of an entry, in the table's column order, with their column headers
PARTS = (("task_options", "task options"), ("train", "train"), ("evaluate", "evaluate"),
         ("method_options", "method options"))
SUMMARY = "Configuration that ran"
AT_DEFAULTS = "all at defaults"
EVERY_METHOD, AS_ABOVE = "every method", "as above"


def _identity(entry: dict[str, Any]) -> str:
    """What makes two entries the same configuration: everything but seeds, parameter count and
    the runs that hold it."""
    return json.dumps({k: v for k, v in entry.items() if k not in ("seeds", "params", "runs")}, sort_keys=True,
                      default=str)


def read_suite_document(run_dir: Path) -> dict[str, Any]:
    """The suite document a run stored (its ``suite.json``: name, purpose, ``published``,
    ``compare``, ...); ``{}`` for a run without one (a ``RunSpec`` list, an older run) or with an
    unreadable one. The one reader of that file in the report."""
    try:
        doc = json.loads((Path(run_dir) / SUITE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def read_resolved(dirs: Iterable[Path]) -> list[dict[str, Any]]:
    """The resolved-configuration entries of ``dirs`` (their ``resolved.json``), one per distinct
    (task, method, configuration): the seeds of every directory united, the first known parameter
    count, and ``runs`` (the directories' names). A directory without the file (an older run) or
    with an unreadable one contributes nothing."""
    merged: dict[str, dict[str, Any]] = {}
    for d in dirs:
        try:
            doc = json.loads((Path(d) / RESOLVED_FILE).read_text())
        except (OSError, ValueError):
            continue
        entries = doc.get("entries") if isinstance(doc, dict) else None
        for e in entries if isinstance(entries, list) else []:
            if not (isinstance(e, dict) and isinstance(e.get("task"), str) and isinstance(e.get("method"), str)):
                continue
            key = _identity(e)
            seeds = [s for s in e.get("seeds") or [] if isinstance(s, int)]
            if key not in merged:
                merged[key] = {**e, "seeds": [], "params": None, "runs": []}
            out = merged[key]
            out["seeds"] = sorted(set(out["seeds"]) | set(seeds))
            if out["params"] is None and isinstance(e.get("params"), int):
                out["params"] = e["params"]
            if Path(d).name not in out["runs"]:
                out["runs"].append(Path(d).name)
    return list(merged.values())


def options_text(options: Any) -> str:
    """``a=1, b=2 (suite file); c=3 (command line)``: the options not at their default, grouped by
    where they came from (in order of first appearance); ``AT_DEFAULTS`` when every one is."""
    groups: dict[str, list[str]] = {}
    for name, v in (options.items() if isinstance(options, dict) else ()):
        if not isinstance(v, dict) or v.get("source", DEFAULT) == DEFAULT:
            continue
        value = v.get("value")
        shown = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        groups.setdefault(str(v.get("source")), []).append(f"{name}={shown}")
    return "; ".join(f"{', '.join(items)} ({source})" for source, items in groups.items()) or AT_DEFAULTS


def _params(entry: dict[str, Any], df: pd.DataFrame) -> str:
    """The entry's parameter count; when the runner did not count it before the run (a plugin,
    a method with extra requirements), the run's own ``params`` rows of this method (a range
    when its configurations differ); "–" when neither has it."""
    n = entry.get("params")
    if not isinstance(n, int) and len(df) and {"metric", "method", "value"} <= set(df.columns):
        rows = df[(df["metric"] == PARAMS) & (df["method"] == entry["method"])]["value"].dropna()
        if len(rows):
            lo, hi = int(rows.min()), int(rows.max())
            return _count(lo) if lo == hi else f"{_count(lo)}–{_count(hi)}"
    return _count(n) if isinstance(n, int) else "–"


def _count(n: int) -> str:
    return f"{n:,}".replace(",", " ")


def configuration_table(entries: list[dict[str, Any]], df: pd.DataFrame | None = None) -> TableView | None:
    """The "Configuration that ran" table of one task's ``entries`` (``read_resolved``), rows of
    the task's results in ``df`` filling parameter counts the entries lack; None without entries.
    A part every method shares (the task's sizes, the training budget) is shown once, in a first
    row "every method", and as "as above" in the methods' rows."""
    if not entries:
        return None
    df = df if df is not None else pd.DataFrame()
    entries = sorted(entries, key=lambda e: (str(e["method"]), e.get("seeds") or [], _identity(e)))
    texts = {key: [options_text(e.get(key)) for e in entries] for key, _ in PARTS}
    shared = {key: vals[0] for key, vals in texts.items()
              if len(entries) > 1 and key != "method_options" and len(set(vals)) == 1}
    devices = {str(e.get("device", "–")) for e in entries}
    runs = sorted({r for e in entries for r in e.get("runs", [])})
    settings = any(e.get("setting_source") for e in entries)
    rows, index = [], []
    if shared:
        rows.append({"params": "–", "seeds": "–", **{label: shared.get(key, "–") for key, label in PARTS}})
        index.append(EVERY_METHOD)
    for i, e in enumerate(entries):
        row = {"params": _params(e, df), "seeds": ", ".join(map(str, e.get("seeds") or [])) or "–"}
        row.update({label: AS_ABOVE if key in shared else texts[key][i] for key, label in PARTS})
        if len(devices) > 1:
            row["device"] = str(e.get("device", "–"))
        if settings:
            row["settings from"] = e.get("setting_source") or "–"
        if len(runs) > 1:
            row["runs"] = ", ".join(e.get("runs", []))
        rows.append(row)
        index.append(str(e["method"]))
    frame = pd.DataFrame(rows, index=pd.Index(index, name="method")).fillna("–")
    caption = (f"{SUMMARY}, as resolved before the run (resolved.json of run{'s' if len(runs) > 1 else ''} "
               f"{', '.join(runs)}){', on ' + next(iter(devices)) if len(devices) == 1 else ''}: per method its "
               "parameter count, seeds, and every task option, training and evaluate setting and method option "
               "that is not at its default, with where it came from: smoke scale (the class's smoke_options, for a "
               "task or method the suite does not configure), suite file, suite file (task_overrides.T), sweep, "
               "tuning, command line or RunSpec; options at their defaults are omitted (resolved.json holds every "
               f"value)" + (f"; '{EVERY_METHOD}': what every method shares ('{AS_ABOVE}' in its row)" if shared
                            else "") + ".")
    return TableView.from_frame(frame, "method", css="configuration", caption=caption)


def configuration_notes(entries: list[dict[str, Any]]) -> list[str]:
    """The entries' notes, each once (e.g. "task qm9 is not configured by suite smoke: it runs at
    its smoke scale (QM9Task.smoke_options)")."""
    return list(dict.fromkeys(str(n) for e in entries for n in e.get("notes") or []))
