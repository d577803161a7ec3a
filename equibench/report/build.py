"""``write_report``: one HTML page (plus a Markdown twin, both from the jinja2 templates in
``templates/``) comparing methods per task.

Above everything, a banner lists every anomaly with a link to the row that shows it
(``verdicts.anomalies``: failed specs, unconverged runs, exact methods over their limits, methods
no better than their task's trivial predictor; nightly regressions). Each task's section opens
with its verdict table (``verdicts.verdict_table``: ranked by the task's first metric with 95 %
t-intervals and groups by Holm-corrected pooled-variance t-tests against the best, the trivial predictor and
the task's floors as rows, equivariance error, throughput,
convergence and settings), then (``task_section``) a collapsible full table under grouped headers
(aggregated over seeds as the metric catalogue says, ± std when there are several) of
parameters, test metrics, relative equivariance error (fp32 as deployed, fp64 structural; at init
and trained), Lie derivative and method diagnostics, inference/train throughput with spread, FLOP
rate and overhead against the shared backbone, peak memory, training steps / time / FLOPs and
convergence; plots of the learning curves (validation value against step, seconds and FLOPs,
trivial predictor as reference), the test metric vs throughput (with the Pareto front),
equivariance error per method (log scale) and, when measured, degeneracy curves. Scaling sweeps
and tensor-product microbenchmarks have their own sections (``sections``), and so have training-size
sweeps (``efficiency``: data- and compute-efficiency curves, power laws, crossovers, frontiers);
a suite's ``compare:`` variants of one method are paired per task (``variants``: paired seeds);
nightly pages add regressions and trend plots (``history``, ``trends``). Every
table and figure states how it was measured: device, dtype, batch, repeats, threads, group
samples, seeds, training budget, commit. ``write_comparison`` (``compare``) renders two runs side
by side.

The report is a function of the run directories alone: their records and their cards
(``results.runcards.cards_for``: each method's counterpart, origin, whether it wraps the backbone
and its force kind; each task's primary metric, metric roles, trivial reference, floors and seed
draws; the spec of every metric the runs reported, used where this process's catalogue does not
declare it). It never asks the registry, a method or task class or a docstring, so a run
directory reports the same in a process without the plugins that produced it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ..benches.taskrun import TaskBench
from ..benches.tuning import TuneBench
from ..results.runcards import RunCards, cards_for
from ..results.status import Status
from ..results.store import load_results, run_dirs, upgrade_frame
from .approximate import approximate_sections
from .common.metricinfo import stored_metrics
from .common.render import BannerItem, Page, Section, TableView, md_anchor, section_view, versions_text, write_page
from .common.tables import loaded_machine_lines, status_table, unmeasured_table
from .compare import write_comparison
from .configuration import configuration_notes, configuration_table, read_resolved, read_suite_document
from .efficiency import efficiency_sections
from .references import reference_sections
from .sections import SECTIONS, SPECIAL_BENCHES
from .task_section import task_section
from .trends import trend_figures
from .variants import variant_sections
from .verdicts import anomalies, t_interval

__all__ = ["write_report", "write_comparison"]

_HOW_TO_READ_TABLE = {
    True: "Each task opens with its verdict: methods ranked by the task's first metric (mean over seeds ± "
          "95 % t-interval; group 1 = not distinguishable from the best by a pooled-variance t-test "
          "against the best with Holm's correction), ",
    False: "Each task opens with a summary table, not a verdict: this run is not meant to rank methods, so the "
           "table has no rank or group column; methods are listed by the task's first metric (mean over seeds ± "
           "95 % t-interval, read as a check that the numbers are plausible, not as an ordering), ",
}
_HOW_TO_READ_REST = ("its trivial predictor and floors (cheap non-learned references) as rows with, per "
               "method, whether it beats the strongest floor, and beside them equivariance error, throughput, "
               "convergence and where the settings came from; "
               "the full table below it (click to open) has every measured number{configuration}. Arrows in the "
               "headers: ↓ lower is better, ↑ higher is better (from the metric catalogue). Equivariance error is "
               "||f(g·X) − ρ(g) f(X)|| / ||f(X)|| per graph (mean over graphs and sampled group elements). Exact "
               "methods sit near 1e-15 (fp64) / 1e-7 (fp32); learned or approximate equivariance shows up between. "
               "'time vs backbone' is the wrapper's time per batch divided by the shared backbone's (baseline) at "
               "the same batch.")


def how_to_read(ranked: bool = True, configured: bool = False) -> str:
    """The report's how-to-read paragraph; ``ranked=False`` (a run not meant for verdicts, e.g. a
    smoke run, whose verdict tables have no ranks) says the first table does not rank methods;
    ``configured``: the runs stored their resolved configuration (the sections' "Configuration
    that ran" tables)."""
    conf = (", and 'Configuration that ran' (click to open) every option each method ran with that is not at its "
            "default, with where it came from" if configured else "")
    return _HOW_TO_READ_TABLE[ranked] + _HOW_TO_READ_REST.format(configuration=conf)


# ---------------------------------------------------------------------------------------------
# what kind of run the report shows (the suite's ``purpose:``, stored in the run's suite.json)

#: the first line of a report of a run with this purpose (None: a verdict run, nothing to say)
PURPOSE_LINES: dict[str, str | None] = {
    "smoke": "Smoke run, not for verdicts: a seconds-long check that the pipeline works (a few training steps); "
             "methods are not ranked and no number here says which method is better",
    "quick": "Screening run (quick): one small, fixed training budget; the ranking holds at this budget only, "
             "confirm it with a verdict suite before drawing conclusions",
    "sweep": "Sweep: read the curves over the swept parameter; each verdict table holds at one setting of it",
    "paper": "Paper protocol: measured under a published protocol, beside the published numbers",
    "reference": "Reference run: our implementations beside their libraries' at equal settings",
    "verdict": None,
}
#: purposes whose reports rank methods (a smoke run does not: its methods are not trained)
RANKED_PURPOSES = frozenset({"quick", "verdict", "paper", "sweep", "reference"})
_STRICTNESS = ("smoke", "quick", "sweep", "reference", "paper", "verdict")  # the weakest purpose speaks first


def run_purposes(dirs: list[Path]) -> dict[str, str | None]:
    """Run id -> the purpose its suite declared (``suite.json``; None for a run of ``RunSpec``
    lists or one written before purposes existed)."""
    out: dict[str, str | None] = {}
    for d in dirs:
        purpose = read_suite_document(d).get("purpose")
        out[d.name] = purpose if isinstance(purpose, str) else None
    return out


def report_purpose(purposes: dict[str, str | None]) -> str | None:
    """The purpose a report of these runs speaks for: the weakest of them (a report mixing a
    smoke run with a verdict run is a smoke report); None when no run declares one."""
    known = [p for p in purposes.values() if p in _STRICTNESS]
    return min(known, key=_STRICTNESS.index) if known else None


def _sections(df: pd.DataFrame, out: Path, ranked: bool = True,
              resolved: list[dict[str, Any]] | None = None, cards: RunCards | None = None) -> list[Section]:
    """A section per task of the task runs in ``df`` (with their tuning runs), then one per bench
    with a section of its own (``sections.SECTIONS``: scaling, tensor products), selected by the
    ``bench`` column; ``resolved`` (``configuration.read_resolved``) adds each task section's
    "Configuration that ran" table and its notes."""
    sections = []
    runs = df[df["bench"].isin([TaskBench.kind, TuneBench.kind])]
    for task, g in runs.groupby("task", sort=True):
        section = task_section(str(task), g, out, ranked=ranked, cards=cards)
        if section:
            entries = [e for e in resolved or [] if e["task"] == task]
            section["configuration"] = configuration_table(entries, g)
            section["notes"] = [*configuration_notes(entries), *section.get("notes", [])]
            sections.append(section)
    for bench, make in SECTIONS.items():
        if (df["bench"] == bench).any() and (own := make(df, out)):
            sections.append(own)
    return sections


def write_report(paths: str | os.PathLike | Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                 title: str | None = None, regressions: list[str] | None = None,
                 history: pd.DataFrame | None = None, results: pd.DataFrame | None = None) -> Path:
    """Write ``out_dir/index.html`` and ``out_dir/README.md`` (+ PNGs); returns the HTML path.

    ``regressions`` (one line each) are listed first; ``history`` adds trend plots per task;
    ``results``: the rows of ``paths`` when the caller has them (``load_results(paths)``, e.g.
    the run just made: ``RunRecords.frame()``), else read here. Everything the page says comes
    from the run directories: records and cards (module doc)."""
    df = load_results(paths) if results is None else upgrade_frame(results)
    dirs = run_dirs(paths)
    cards = cards_for(dirs, df)
    with stored_metrics(cards.metrics):
        return _write_report(df, dirs, cards, Path(out_dir), title, regressions, history)


def _write_report(df: pd.DataFrame, dirs: list[Path], cards: RunCards, out: Path, title: str | None,
                  regressions: list[str] | None, history: pd.DataFrame | None) -> Path:
    merged = df.attrs.get("merged", [])  # which runs were merged, which reruns counted once
    out.mkdir(parents=True, exist_ok=True)
    purpose = report_purpose(run_purposes(dirs))
    ranked = purpose is None or purpose in RANKED_PURPOSES
    title = title or f"equibench report: {', '.join(sorted(set(df['run_id'].dropna())))}"
    first = PURPOSE_LINES.get(purpose or "verdict")
    if first:  # the first line says what kind of run this is
        title = f"{first.split(':')[0]} — {title}"
    resolved = read_resolved(dirs)  # the configuration that ran (absent in runs older than resolved.json)
    intro = ([f"{first}."] if first else []) + [how_to_read(ranked, configured=bool(resolved))]
    if merged:
        intro.append("Runs merged: " + "; ".join(merged) + ".")
    sweeps = (approximate_sections(df, out, cards)  # sweeps of a symmetry-breaking field (report/approximate.py)
              + efficiency_sections(df, out, cards))  # train_size sweeps: data and compute efficiency (efficiency.py)
    sections = (published_sections(df, dirs) + reference_sections(df, cards)
                + variant_sections(df, dirs, cards)  # a suite's ``compare:`` pairs (report/variants.py)
                + _sections(df, out, ranked, resolved, cards))
    # a sweep suite's report opens with its curves, crossovers and frontiers; other reports end with them
    sections = sweeps + sections if purpose == "sweep" else sections + sweeps
    if history is not None:
        for s in sections:
            s["figures"] = [*s.get("figures", []), *trend_figures(history, s["task"], out)]
    status = status_table(df, SPECIAL_BENCHES)
    unmeasured = unmeasured_table(df)
    versions = next((v for v in df["versions"] if isinstance(v, dict)), {}) if "versions" in df else {}
    page = Page(title=title, intro=intro, regressions=regressions,
                status=TableView.from_frame(status, css="status", row_ids=status.attrs.get("row_ids"))
                if len(status) else None,
                unmeasured=TableView.from_frame(unmeasured, css="status") if len(unmeasured) else None,
                sections=[section_view(s) for s in sections], versions=versions_text(versions),
                banner=banner(df, regressions, loaded_machine_lines(dirs), cards))
    return write_page(page, out)


def banner(df: pd.DataFrame, regressions: list[str] | None = None,
           load_lines: list[str] | None = None, cards: RunCards | None = None) -> list[BannerItem]:
    """The banner's entries: the runs made on a loaded machine (``load_lines``, one each), every
    anomaly of ``df`` (``verdicts.anomalies``, by the runs' ``cards``), then one entry for the
    nightly regressions when there are any."""
    items = [BannerItem("loaded machine", line, "anomalies") for line in load_lines or []]
    items += [BannerItem(a.kind, a.text, a.anchor, a.md_anchor) for a in anomalies(df, cards)]
    if regressions:
        items.append(BannerItem("regression", f"{len(regressions)} regression(s) against the nightly history",
                                "regressions", md_anchor(f"Regressions ({len(regressions)})")))
    return items


# ---------------------------------------------------------------------------------------------
# published numbers beside the measured ones (a suite's ``published:``, read from the run's suite.json)

def suite_documents(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """The suite document of each run directory whose suite carries ``published`` figures."""
    docs = [{**read_suite_document(d), "run_id": d.name} for d in run_dirs]
    return [doc for doc in docs if doc.get("published")]


def published_table(df: pd.DataFrame, published: dict[str, Any]) -> pd.DataFrame:
    """One row per published method: published value and source, measured mean ± 95 % interval
    (seeds), measured / published, convergence of the measured runs."""
    metric, task = published["metric"], published["task"]
    rows = []
    for method, pub in published["values"].items():
        g = df[(df["task"] == task) & (df["method"] == method) & (df["metric"] == metric) & (df["status"] == Status.OK)]
        mean, half, n = t_interval(g["value"].tolist())
        conv = g["convergence"].dropna().tolist() if "convergence" in g else []
        unconverged = sum(c in ("not_converged", "cap_reached") for c in conv)  # cap_reached: capped before a plateau
        measured = ("not run" if n == 0 else f"{mean:.4g}" + (f" ± {half:.2g}" if n > 1 else " (1 seed)")
                    + f" ({n} seeds)" * (n > 1))
        rows.append({"method": method, "as published": pub.get("label") or method,
                     f"published {metric}": f"{pub['value']:.4g}", "source": pub["source"],
                     "measured (mean ± 95 % CI)": measured,
                     "measured / published": f"{mean / pub['value']:.2f}" if n else "–",
                     "converged": "–" if not conv else ("yes" if not unconverged else f"⚠ {unconverged} of {len(conv)} "
                                                                                       "runs not converged")})
    return pd.DataFrame(rows).set_index("method")


def _learning_rates(runs: pd.DataFrame) -> str:
    """``method lr, ...`` as the task points ran (a tuned rate replaces the suite's), or "" when unknown."""
    if "train_config" not in runs or "method" not in runs:
        return ""
    rates: dict[str, set[float]] = {}
    for method, cfg in runs.drop_duplicates("spec_hash")[["method", "train_config"]].itertuples(index=False):
        if isinstance(cfg, str):
            try:
                cfg = json.loads(cfg)
            except ValueError:
                continue
        if isinstance(cfg, dict) and isinstance(cfg.get("lr"), (int, float)):
            rates.setdefault(str(method), set()).add(float(cfg["lr"]))
    return ", ".join(f"{m} {'/'.join(f'{r:g}' for r in sorted(v))}" for m, v in sorted(rates.items()))


def published_sections(df: pd.DataFrame, run_dirs: list[Path]) -> list[Section]:
    """A section per suite document with published figures."""
    out: list[Section] = []
    for doc in suite_documents(run_dirs):
        pub = doc["published"]
        runs = df[df["run_id"] == doc["run_id"]] if "run_id" in df else df
        budget = json.dumps(doc.get("train", {}), sort_keys=True)
        rates = _learning_rates(runs)
        out.append({"task": f"published-{doc['name']}", "heading": f"Published numbers: suite {doc['name']}",
                    "context": (f"Task {pub['task']}, metric {pub['metric']}; protocol: {pub.get('protocol', '')}; "
                                f"this run's training settings: {budget}"
                                + (f" (the suite's; learning rate as run, per method: {rates})" if rates else "")
                                + f"; seeds: {doc.get('seeds')}. Measured "
                                "values are the mean over seeds with a 95 % t-interval; a budget smaller than the "
                                "published one makes the values incomparable in size, only the ordering can be "
                                "compared."),
                    "table": published_table(runs, pub), "index_label": "method", "css": "published",
                    "figures": [], "tables": [], "notes": []})
    return out
