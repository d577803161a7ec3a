"""The comparison of two runs: side by side the mean over seeds of every watched metric per
(task, method) in run A and run B, B/A, the measured noise, and a verdict that calls a change only
when it is larger than that noise.

The rule is the nightly regression alarm's (``history.measure_change`` / ``Change.beyond``): B
differs from A when the relative change exceeds ``threshold`` (0.10) *and* its distance on the
log scale, |log(B / A)|, exceeds ``k`` (3) times the noise. The noise is the largest measured
spread of either run: the standard deviation of log values over seeds (of A and of B; the spread
of single seeds, which is larger than that of their mean, so the rule errs towards "no change"),
and for throughput each run's own relative IQR of the timing repeats. A metric measured once per
run without a timing spread (one seed) has no measured noise, and only the threshold applies.
Values at or below a metric's ``floor`` (equivariance errors at machine precision) are never
called different. A (task, method) present in one run only is "only in A" / "only in B" (or
"failed in B", with the run's status), never "same". Timings whose repeats disagree by more than
``UNSTABLE_REL_IQR`` (IQR / median) are marked ⚠ and listed in a note.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..metrics.throughput import UNSTABLE_REL_IQR
from ..results.runcards import cards_for
from ..results.status import Status
from ..results.store import load_results, run_dirs
from .common import fmt, plots
from .common.metricinfo import header, spec_for, stored_metrics, value
from .common.render import FigureView, Page, SectionView, TableView, slug, write_page
from .common.tables import context_line, loaded_machine_lines
from .history import measure_change, spread_rows, watched

THRESHOLD = 0.10  # the nightly alarm's defaults (``equibench nightly --threshold / --k``)
K = 3.0
LOADED_VERDICT = "not called (loaded machine)"
VERDICTS = ("better", "worse", "no change", "only in A", "only in B", LOADED_VERDICT)
TIMED_FAMILIES = ("throughput", "scaling", "tp_bench")
TIMED_STATS = ("graphs_per_s", "nodes_per_s", "items_per_s", "time_median_s", "time_s", "gflops_per_s",
               "compile_time_s")


@dataclass(frozen=True)
class Comparison:
    """Two runs compared: ``compare_runs``'s table, the summary line and the notes (loaded
    machines, unstable timings), with the rows of each run."""
    table: pd.DataFrame
    summary: str
    notes: list[str]
    a: pd.DataFrame
    b: pd.DataFrame


def compare_dirs(run_a: str | os.PathLike, run_b: str | os.PathLike, threshold: float = THRESHOLD,
                 k: float = K) -> Comparison:
    """Load two runs (run directories or results roots) and compare them (module doc); a metric this
    process does not declare is read as the runs stored it (``cards/metrics.json``)."""
    a, b = load_results(run_a), load_results(run_b)
    dirs_a, dirs_b = run_dirs(run_a), run_dirs(run_b)
    load_a, load_b = loaded_machine_lines(dirs_a), loaded_machine_lines(dirs_b)
    with stored_metrics(cards_for([*dirs_a, *dirs_b]).metrics):
        table = compare_runs(a, b, threshold, k, loaded=(bool(load_a), bool(load_b)))
    notes = [f"⚠ A: {x}" for x in load_a] + [f"⚠ B: {x}" for x in load_b]
    if load_a or load_b:
        notes.append("Timings (throughput, time) are not called better or worse when either run was on a loaded "
                     "machine: the load, not the code, moves them. Rerun both on a quiet machine to compare speed.")
    unstable = table[table["unstable A"] | table["unstable B"]]
    if len(unstable):
        names = ", ".join(sorted({f"{t}/{m}" for t, m in zip(unstable["task"], unstable["method"])}))
        notes.append(f"⚠ unstable timing (repeats disagree: IQR / median > {UNSTABLE_REL_IQR:g}) in {names}; "
                     "those throughputs carry their spread as noise, so only a large change is called.")
    return Comparison(table, summary_line(table, threshold, k), notes, a, b)


def _per_run(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per (task, method, metric): mean over seeds, log-spread over seeds, relative timing
    spread, n seeds; per (task, method): the statuses of its runs) of one run's rows."""
    status = df.drop_duplicates(["task", "method", "spec_hash"])[["task", "method", "status"]]
    ok = df[(df["status"] == Status.OK) & df["metric"].map(watched)]
    if ok.empty:
        return pd.DataFrame(columns=["task", "method", "metric", "mean", "log_std", "rel_spread", "n"]), status
    spread = spread_rows(df[df["status"] == Status.OK])
    per_seed = ok.groupby(["task", "method", "metric", "seed"], as_index=False).agg(value=("value", "mean"),
                                                                                  spec_hash=("spec_hash", "first"))
    per_seed = per_seed.merge(spread, on=["spec_hash", "metric"], how="left") if len(spread) else \
        per_seed.assign(rel_spread=np.nan)

    def log_std(v: pd.Series) -> float:
        v = v.astype(float)
        return float(np.log(v).std()) if len(v) > 1 and (v > 0).all() else 0.0
    agg = per_seed.groupby(["task", "method", "metric"], as_index=False).agg(
        mean=("value", "mean"), log_std=("value", log_std), rel_spread=("rel_spread", "max"), n=("value", "size"))
    return agg, status


def _absent(key: tuple[Any, Any], status: pd.DataFrame, run: str) -> str:
    """"only in A/B" when ``run`` has no row of (task, method), else "<status> in <run>"."""
    mine = status[(status["task"] == key[0]) & (status["method"] == key[1])]["status"]
    bad = sorted({str(s) for s in mine if s != Status.OK})
    return f"{'/'.join(bad)} in {run}" if bad else f"only in {'B' if run == 'A' else 'A'}"


def is_timing(metric: str) -> bool:
    """Whether ``metric`` is a wall-clock figure (a throughput or time; not memory or FLOPs),
    which other work on the machine changes."""
    spec = spec_for(metric)
    return spec.family in TIMED_FAMILIES and spec.stat in TIMED_STATS


def compare_runs(a: pd.DataFrame, b: pd.DataFrame, threshold: float = THRESHOLD, k: float = K,
                 loaded: tuple[bool, bool] = (False, False)) -> pd.DataFrame:
    """Columns task, method, metric, A, B, B/A, noise (log-scale spread used), ``B vs A`` (one
    of ``VERDICTS``, "<status> in A/B", or "not called (loaded machine)" for a timing when
    ``loaded`` says run A or B ran on a loaded machine), ``B better`` (True / False for a change
    beyond the noise, else None) and ``unstable A`` / ``unstable B`` (the timing's repeats
    disagree), for every watched metric of two runs' rows (module doc)."""
    (ra, sa), (rb, sb) = _per_run(a), _per_run(b)
    t = ra.merge(rb, on=["task", "method", "metric"], how="outer", suffixes=("_a", "_b"))
    t = t.sort_values(["task", "method", "metric"]).reset_index(drop=True)
    rows = []
    for _, r in t.iterrows():
        spec = spec_for(r["metric"])
        va, vb = float(r["mean_a"]), float(r["mean_b"])
        noise = float(np.nanmax([r["log_std_a"], r["log_std_b"], r["rel_spread_a"], r["rel_spread_b"], 0.0]))
        verdict, better = "no change", None
        if not np.isfinite(va):
            verdict = _absent((r["task"], r["method"]), sa, "A")
        elif not np.isfinite(vb):
            verdict = _absent((r["task"], r["method"]), sb, "B")
        elif spec.floor is not None and va <= spec.floor and vb <= spec.floor:
            verdict = "no change"  # both at machine precision
        elif any(loaded) and is_timing(r["metric"]):
            verdict = LOADED_VERDICT
        elif spec.direction is not None:
            change = measure_change(vb, pd.Series([va]), noise, spec.direction)
            if change.beyond(threshold, k):
                better = change.change < 0
                verdict = "better" if better else "worse"
        rows.append({"task": r["task"], "method": r["method"], "metric": r["metric"], "A": va, "B": vb,
                     "B/A": vb / va if np.isfinite(va) and np.isfinite(vb) and va != 0 else np.nan,
                     "noise": noise, "B vs A": verdict, "B better": better,
                     "unstable A": bool(np.isfinite(r["rel_spread_a"]) and r["rel_spread_a"] > UNSTABLE_REL_IQR),
                     "unstable B": bool(np.isfinite(r["rel_spread_b"]) and r["rel_spread_b"] > UNSTABLE_REL_IQR)})
    columns = ["task", "method", "metric", "A", "B", "B/A", "noise", "B vs A", "B better", "unstable A", "unstable B"]
    return pd.DataFrame(rows, columns=columns)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """``compare_runs``'s table as strings: quantity with unit and direction, values (⚠ where the
    timing is unstable), B/A, the noise as ± percent and the verdict."""
    specs = [spec_for(m) for m in table["metric"]]

    def cell(s: Any, v: float, unstable: bool) -> str:
        return value(s, v) + (" ⚠" if unstable else "")
    return pd.DataFrame({
        "task": table["task"], "method": table["method"],
        "quantity": [header(s) for s in specs],
        "A": [cell(s, v, u) for s, v, u in zip(specs, table["A"], table["unstable A"])],
        "B": [cell(s, v, u) for s, v, u in zip(specs, table["B"], table["unstable B"])],
        "B/A": table["B/A"].map(lambda v: fmt.number(v, "x")),
        "noise": table["noise"].map(lambda v: f"±{100 * (np.exp(v) - 1):.0f}%" if v > 0 else "–"),
        "B vs A": table["B vs A"]}).reset_index(drop=True)


def summary_line(table: pd.DataFrame, threshold: float = THRESHOLD, k: float = K) -> str:
    """One line: how many quantities changed beyond the noise, in which direction, and how many
    are present in one run only."""
    counts = table["B vs A"].value_counts()
    better, worse = int(counts.get("better", 0)), int(counts.get("worse", 0))
    one_side = int(sum(v for name, v in counts.items() if name not in ("better", "worse", "no change", LOADED_VERDICT)))
    head = (f"{better + worse} change(s) beyond the noise ({better} better, {worse} worse)" if better + worse
            else "no change beyond the noise")
    not_called = int(counts.get(LOADED_VERDICT, 0))
    return (f"{head}; {int(counts.get('no change', 0))} within it; {one_side} in one run only; "
            f"{not_called} timing(s) not called (loaded machine) "
            f"(a change counts when it exceeds {100 * threshold:.0f}% and {k:g}x the larger measured spread of "
            "the two runs, the nightly regression rule)")


def write_comparison(run_a: str | os.PathLike, run_b: str | os.PathLike, out_dir: str | os.PathLike,
                     threshold: float = THRESHOLD, k: float = K, comparison: Comparison | None = None) -> Path:
    """Side-by-side table and plot (B/A per metric, noise as whiskers) of two runs, plus
    ``comparison.csv`` (``compare_runs``'s table); returns the HTML path. ``comparison``: the
    result of ``compare_dirs`` when the caller has it already."""
    c = comparison or compare_dirs(run_a, run_b, threshold, k)
    with stored_metrics(cards_for([*run_dirs(run_a), *run_dirs(run_b)]).metrics):
        return _write_comparison(c, run_a, run_b, out_dir, k)


def _write_comparison(c: Comparison, run_a: str | os.PathLike, run_b: str | os.PathLike,
                      out_dir: str | os.PathLike, k: float) -> Path:
    table, a, b = c.table, c.a, c.b
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv", index=False)
    names = (Path(run_a).name, Path(run_b).name)
    figures = []
    for task, t in table.groupby("task"):
        t = t.dropna(subset=["B/A"])
        if t.empty:
            continue
        path = out / f"{slug(str(task))}_compare.png"
        labels = [f"{m} · {spec_for(q).display}" for m, q in zip(t["method"], t["metric"])]
        plots.ratio_bars(labels, t["B/A"].to_numpy(dtype=float), list(t["B better"]), path,
                         f"{task}: B / A per method and metric", noise=list(k * t["noise"]))
        figures.append(FigureView(path.name, f"B/A per (method, metric), log scale; green = B better, red = B worse "
                                             f"(in the metric's direction) beyond the noise, grey = no change called; "
                                             f"whiskers: {k:g}x the measured noise."))
    section = SectionView(anchor="comparison", heading="B / A per task, method and metric", context="",
                          table=TableView.from_frame(display_table(table)), tables=[],
                          notes=[c.summary, *c.notes],
                          figures=figures)
    page = Page(title=f"Comparison: A = {names[0]}, B = {names[1]}",
                intro=[f"A = {names[0]}: {context_line(a)}", f"B = {names[1]}: {context_line(b)}",
                       __doc__.split("\n\n")[1].replace("\n", " ") if __doc__ else ""],
                sections=[section])
    return write_page(page, out)

