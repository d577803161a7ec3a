"""The section of one task: the method table and its figures (test metric against throughput
with the Pareto front, equivariance error per method, sample efficiency over a training-size
sweep, degeneracy curves and the table of exactly symmetric inputs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics.catalogue import degeneracy_metric, equivariance_metric, throughput_metric
from . import fmt, plots
from .metricinfo import spec_for
from .render import Section, slug
from .tables import EQUIVARIANCE_COLUMNS, context_line, score_columns, seed_table, split_sweeps, task_table

THROUGHPUT_AXIS = throughput_metric("inference", "graphs_per_s")
DEGENERACY_CURVE = degeneracy_metric("gap", "rel_max")
DEGENERACY_SYMMETRIC = degeneracy_metric("config", "rel_max")


def _pareto_figure(task: str, agg: pd.DataFrame, std: pd.DataFrame, y: str, n_seeds: int, out: Path,
                   ctx: str) -> tuple[str, str] | None:
    if THROUGHPUT_AXIS not in agg:
        return None
    ys, xs = spec_for(y), spec_for(THROUGHPUT_AXIS)
    table = agg.assign(_yerr=std[y] if y in std and n_seeds > 1 else np.nan)
    path = out / f"{slug(task)}_accuracy_vs_throughput.png"
    plots.accuracy_vs_throughput(table, xs, ys, path, f"{task}: {ys.display} vs {xs.display}",
                                 y_err="_yerr" if n_seeds > 1 else None)
    front = "; dashed: Pareto front" if ys.direction else ""
    return path.name, f"Test {ys.display} (mean over seeds) against {xs.display} [{xs.unit}]{front}. {ctx}"


def _equivariance_figure(task: str, agg: pd.DataFrame, out: Path, ctx: str) -> tuple[str, str] | None:
    series = []
    for name in EQUIVARIANCE_COLUMNS:
        if name in agg:
            s = spec_for(name)
            series.append((f"{s.dtype} {s.stage}", name, equivariance_metric(s.stage or "", s.dtype or "", "rel_max")))
    if not series:
        return None
    path = out / f"{slug(task)}_equivariance.png"
    plots.equivariance_bars(agg, series, path, f"{task}: relative equivariance error")
    return path.name, ("Relative equivariance error per method, log scale; marker = mean, bar = max over graphs "
                       "and samples; dotted 1e-10, dashed 1e-4. " + ctx)


def _sample_efficiency(task: str, df: pd.DataFrame, out: Path, metric: str, ctx: str) -> tuple[str, str] | None:
    ok = df[(df["status"] == "ok") & (df["metric"] == metric)].copy()
    if ok.empty or "task_options" not in ok:
        return None
    ok["train_size"] = ok["task_options"].map(lambda o: o.get("train_size") if isinstance(o, dict) else None)
    ok = ok.dropna(subset=["train_size"])
    if ok["train_size"].nunique() < 2:
        return None
    spec = spec_for(metric)
    data = ok.groupby(["method", "train_size"], as_index=False)["value"].agg(["mean", "std"]).reset_index()
    path = out / f"{slug(task)}_sample_efficiency.png"
    plots.curves(data.rename(columns={"mean": "value"}), "train_size", "value", "method", path,
                 f"{task}: sample efficiency", "training-set size", plots.axis_label(spec), err="std",
                 logy=spec.log_scale)
    return path.name, (f"Test {spec.display} against training-set size (log-log), mean ± std over seeds "
                       f"{sorted(set(ok['seed']))}; the same training budget (steps) for every size. {ctx}")


def _degeneracy(task: str, df: pd.DataFrame, out: Path, ctx: str) -> tuple[tuple[str, str] | None, pd.DataFrame | None]:
    ok = df[df["status"] == "ok"]
    deg = ok[ok["metric"] == DEGENERACY_CURVE]
    if deg.empty:
        return None, None
    data = deg.groupby(["method", "x"])["value"].mean().reset_index()
    data["value"] = data["value"].clip(lower=1e-17)
    path = out / f"{slug(task)}_degeneracy.png"
    plots.curves(data, "x", "value", "method", path, f"{task}: equivariance error near degeneracy",
                 "covariance eigenvalue gap (0 = exactly degenerate)", "max relative equivariance error (fp64)")
    figure = (path.name, "Max relative equivariance error (fp64, trained) as the two smallest covariance "
                         "eigenvalues of the positions approach a tie. " + ctx)
    sym = ok[ok["metric"] == DEGENERACY_SYMMETRIC]
    table = None
    if len(sym):
        spec = spec_for(DEGENERACY_SYMMETRIC)
        table = sym.pivot_table(index="method", columns="x_label", values="value", aggfunc=spec.aggregate)
        table = table.map(lambda v: fmt.number(v, spec.number_format))
    return figure, table


def task_section(task: str, df_all: pd.DataFrame, out: Path) -> Section:
    """The section of ``task`` from its rows (all (method, seed) runs, sweeps included)."""
    df, _ = split_sweeps(df_all)
    agg, std = seed_table(df)
    n_seeds = df["seed"].nunique()
    ctx = context_line(df)
    section: Section = {"task": task, "context": ctx, "table": task_table(agg, std, n_seeds), "figures": [],
                        "index_label": "method", "css": "results", "tables": []}
    tests = score_columns(agg) if len(agg) else []
    figures = [_pareto_figure(task, agg, std, tests[0], n_seeds, out, ctx) if tests else None,
               _equivariance_figure(task, agg, out, ctx) if len(agg) else None,
               _sample_efficiency(task, df_all, out, tests[0], ctx) if tests else None]
    deg_figure, symmetric = _degeneracy(task, df, out, ctx)
    section["figures"] = [f for f in (*figures, deg_figure) if f]
    if symmetric is not None:
        section["tables"].append(("Max relative equivariance error on exactly symmetric inputs (fp64)", symmetric))
    return section
