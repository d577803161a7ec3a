"""The comparison of two runs: side by side the mean of every watched metric per (task,
method) in run A and run B, B/A, and whether B is better in the metric's catalogue direction;
one B/A bar plot per task."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..suite.store import load_results
from .common import fmt, plots
from .common.metricinfo import canonicalise, header, spec_for, value
from .common.render import FigureView, Page, SectionView, TableView, slug, write_page
from .common.tables import context_line
from .history import watched


def compare_runs(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Columns task, method, metric, A, B, B/A and ``B better`` (True / False; None when the
    values are equal or missing) for every watched metric of two runs' rows."""
    def agg(df: pd.DataFrame) -> pd.Series:
        df = canonicalise(df)
        ok = df[(df["status"] == "ok") & df["metric"].map(watched)]
        return ok.groupby(["task", "method", "metric"])["value"].mean()
    t = pd.concat({"A": agg(a), "B": agg(b)}, axis=1).reset_index()
    t["B/A"] = t["B"] / t["A"]

    def better(row: pd.Series) -> bool | None:
        if not (np.isfinite(row["A"]) and np.isfinite(row["B"])) or row["A"] == row["B"]:
            return None
        return (row["B"] > row["A"]) == (spec_for(row["metric"]).direction == "higher")
    t["B better"] = [better(r) for _, r in t.iterrows()] if len(t) else []
    return t


def _display(table: pd.DataFrame) -> pd.DataFrame:
    specs = [spec_for(m) for m in table["metric"]]
    verdict = {True: "better", False: "worse", None: "same / –"}
    return pd.DataFrame({
        "task": table["task"], "method": table["method"], "metric": table["metric"],
        "quantity": [header(s) for s in specs],
        "A": [value(s, v) for s, v in zip(specs, table["A"])],
        "B": [value(s, v) for s, v in zip(specs, table["B"])],
        "B/A": table["B/A"].map(lambda v: fmt.number(v, "x")),
        "B vs A": table["B better"].map(lambda v: verdict.get(v, verdict[None]))})


def write_comparison(run_a: str | os.PathLike, run_b: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Side-by-side table and plot (B/A per metric) of two runs; returns the HTML path."""
    a, b = load_results(run_a), load_results(run_b)
    table = compare_runs(a, b)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = (Path(run_a).name, Path(run_b).name)
    figures = []
    for task, t in table.groupby("task"):
        t = t.dropna(subset=["B/A"])
        if t.empty:
            continue
        path = out / f"{slug(str(task))}_compare.png"
        labels = [f"{m} · {spec_for(k).display}" for m, k in zip(t["method"], t["metric"])]
        plots.ratio_bars(labels, t["B/A"].to_numpy(dtype=float), list(t["B better"]), path,
                         f"{task}: B / A per method and metric")
        figures.append(FigureView(path.name, "B/A per (method, metric), log scale; green = B better, red = B worse "
                                             "(in the metric's direction), grey = equal."))
    section = SectionView(anchor="comparison", heading="B / A per task, method and metric", context="",
                          table=TableView.from_frame(_display(table)), tables=[], notes=[], figures=figures)
    page = Page(title=f"Comparison: A = {names[0]}, B = {names[1]}",
                intro=[f"A = {names[0]}: {context_line(a)}", f"B = {names[1]}: {context_line(b)}"],
                sections=[section])
    return write_page(page, out)
