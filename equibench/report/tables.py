"""Tables of the per-task report sections: aggregation over seeds (as the catalogue says), the
method table with headers, units and sort order from the catalogue, the list of runs without
results, the "how it was measured" line and the split of sweep variants from the base runs."""
from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from ..core.registry import method_class
from ..metrics.catalogue import (
    PARAMS,
    THROUGHPUT_MODES,
    equivariance_metric,
    lie_metric,
    list_metrics,
    throughput_metric,
    train_metric,
)
from . import fmt
from .metricinfo import header, metric_names, select, spec_for, value

_AGGREGATES = ["mean", "median", "max", "min", "first"]

EQUIVARIANCE_COLUMNS = (equivariance_metric("trained", "fp32", "rel_mean"),
                        equivariance_metric("trained", "fp64", "rel_mean"),
                        equivariance_metric("init", "fp64", "rel_mean"))
LIE_COLUMN = lie_metric("trained", "rel_mean")


def seed_table(df: pd.DataFrame, index: str = "method") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(aggregate over seeds, std over seeds) of every metric of the ok rows; index = ``index``,
    columns = metric. Each metric aggregates as its catalogue spec says (mean, max, ...)."""
    ok = df[(df["status"] == "ok") & df["value"].notna()] if len(df) else df
    if ok.empty:
        return pd.DataFrame(), pd.DataFrame()
    stats = ok.groupby([index, "metric"])["value"].agg([*_AGGREGATES, "std"])
    pick = [_AGGREGATES.index(spec_for(m).aggregate) for m in stats.index.get_level_values("metric")]
    agg = pd.Series(stats[_AGGREGATES].to_numpy()[np.arange(len(stats)), pick], index=stats.index)
    return agg.unstack("metric"), stats["std"].unstack("metric")


def _declared_order(names: Iterable[str]) -> list[str]:
    order = {s.name: i for i, s in enumerate(list_metrics())}
    return sorted(names, key=lambda m: (order.get(m, len(order)), m))


def score_columns(agg: pd.DataFrame) -> list[str]:
    """The test-split metrics in ``agg``: the primary one first, then in catalogue order."""
    cols = _declared_order(metric_names(agg.columns, family="test"))
    primary = primary_metric(agg, cols)
    return ([primary] if primary else []) + [c for c in cols if c != primary]


def undeclared_columns(agg: pd.DataFrame) -> list[str]:
    """Metrics the catalogue does not declare: shown under their raw names, never ranked."""
    return sorted(metric_names(agg.columns, family="unknown"))


def primary_metric(agg: pd.DataFrame, candidates: list[str] | None = None) -> str | None:
    """The test metric the most methods report; ties go to ranked task metrics (with a
    direction), then to catalogue order. None when there is no test metric."""
    cols = candidates if candidates is not None else _declared_order(metric_names(agg.columns, family="test"))
    if not cols:
        return None
    reported = {c: int(agg[c].notna().to_numpy().sum()) for c in cols}
    return max(cols, key=lambda c: (reported[c], spec_for(c).direction is not None, -cols.index(c)))


def sort_best_first(agg: pd.DataFrame, metric: str | None) -> list[Any]:
    """Methods ordered best first by ``metric`` (its catalogue direction; missing last);
    alphabetical when there is no metric or it has no direction."""
    methods = sorted(agg.index, key=str)
    spec = spec_for(metric) if metric else None
    if spec is None or spec.direction is None or metric not in agg:
        return methods
    sign = -1.0 if spec.direction == "higher" else 1.0
    vals = agg[metric]

    def key(method: Any) -> tuple[bool, float, str]:
        v = float(vals.get(method, np.nan))
        return (not np.isfinite(v), sign * v if np.isfinite(v) else 0.0, str(method))
    return sorted(methods, key=key)


def _wraps_backbone(method: str) -> bool:
    try:
        return bool(getattr(method_class(method), "wraps_backbone", False))
    except Exception:  # e.g. a plugin method not registered in this process
        return False


def task_table(agg: pd.DataFrame, std: pd.DataFrame, n_seeds: int) -> pd.DataFrame:
    """One row per method (best first by the primary test metric), formatted strings: parameters,
    test metrics (± std over seeds), relative equivariance errors, Lie derivative, throughput
    (± IQR), peak memory, FLOP rate and time against the shared backbone. Columns no method has
    are left out."""
    if agg.empty:
        return pd.DataFrame()
    tests, undeclared = score_columns(agg), undeclared_columns(agg)
    base = agg.loc["baseline"] if "baseline" in agg.index else None
    rows: dict[Any, dict[str, str]] = {}
    for method in sort_best_first(agg, tests[0] if tests else None):
        m, s = agg.loc[method], std.loc[method] if method in std.index else pd.Series(dtype=float)
        r: dict[str, str] = {header(spec_for(PARAMS)): value(spec_for(PARAMS), m.get(PARAMS))}
        for c in (*tests, *undeclared):
            cell = value(spec_for(c), m.get(c))
            if n_seeds > 1 and np.isfinite(s.get(c, np.nan)) and cell != fmt.MISSING:
                cell += f" ± {value(spec_for(c), s[c])}"
            r[header(spec_for(c))] = cell
        for c in (*EQUIVARIANCE_COLUMNS, LIE_COLUMN):
            r[header(spec_for(c))] = value(spec_for(c), m.get(c))
        for mode in THROUGHPUT_MODES:
            gps, mem = throughput_metric(mode, "graphs_per_s"), throughput_metric(mode, "peak_mem_bytes")
            med, iqr = m.get(throughput_metric(mode, "time_median_s")), m.get(throughput_metric(mode, "time_iqr_s"))
            cell = value(spec_for(gps), m.get(gps))
            if cell != fmt.MISSING and not fmt.missing(iqr) and not fmt.missing(med) and med > 0:
                cell += f" (IQR {100 * iqr / med:.0f}%)"
            r[header(spec_for(gps))] = cell
            r[header(spec_for(mem))] = value(spec_for(mem), m.get(mem))
        flops = throughput_metric("inference", "gflops_per_s")
        r[header(spec_for(flops))] = value(spec_for(flops), m.get(flops))
        for mode in THROUGHPUT_MODES:
            key = throughput_metric(mode, "time_median_s")
            ok = (base is not None and method != "baseline" and _wraps_backbone(str(method))
                  and np.isfinite(m.get(key, np.nan)) and np.isfinite(base.get(key, np.nan)))
            ratio = m[key] / base[key] if ok and base is not None else None
            r[f"{mode} time vs backbone"] = fmt.number(ratio, "x")
        rows[method] = r
    table = pd.DataFrame.from_dict(rows, orient="index")
    return table.loc[:, (table != fmt.MISSING).any(axis=0)]


def status_table(df: pd.DataFrame, exclude_tasks: Iterable[str] = ()) -> pd.DataFrame:
    """(task, method, seed) runs that failed, timed out or do not apply, with their error; the
    tasks in ``exclude_tasks`` (scaling, tensor products) list their skipped points themselves."""
    bad = df[(df["status"] != "ok") & ~df["task"].isin(list(exclude_tasks))]
    bad = bad.drop_duplicates(["task", "method", "seed"])
    cols = [c for c in ("task", "method", "seed", "status", "error") if c in bad]
    return bad[cols].reset_index(drop=True)


def _first(series: pd.Series) -> Any:
    s = series.dropna()
    return s.iloc[0] if len(s) else None


def _ints(values: Iterable[Any]) -> str:
    return ", ".join(str(int(v)) for v in sorted(set(values)))


def context_line(df: pd.DataFrame) -> str:
    """How the numbers of ``df`` were measured: device, throughput dtype / batch / repeats /
    threads / timer, equivariance graphs × group samples, training steps, seeds, commit."""
    ok = df[df["status"] == "ok"]
    tp, eq = select(ok, family="throughput"), select(ok, family="equivariance")
    steps = ok[ok["metric"] == train_metric("steps")]
    parts = ["device: " + (", ".join(sorted(set(ok.get("device_name", pd.Series(dtype=str)).dropna()))) or "?")]
    if len(tp):
        threads = int(_first(tp["threads"]) or 0) if "threads" in tp else "?"
        parts.append(f"throughput: dtype {', '.join(sorted(set(tp['dtype'].dropna())))}, batch "
                     f"{_ints(tp['batch_size'].dropna())} graphs, {int(_first(tp['repeats']) or 0)} repeats "
                     f"(median, IQR), {threads} threads, timer {_first(tp['timer'])}")
    if len(eq):
        parts.append(f"equivariance: {int(_first(eq['batch_size']))} test graphs × {int(_first(eq['repeats']))} "
                     f"group samples ({', '.join(sorted(set(eq['group'].dropna())))}; translation and node "
                     f"permutation included), fp32 as deployed, fp64 rebuilt under a float64 default")
    if len(steps):
        parts.append(f"training: {int(steps['value'].max())} steps, batch {int(_first(steps['batch_size']))}")
    parts.append(f"seeds: {', '.join(str(s) for s in sorted(set(df['seed'].dropna())))}")
    parts.append("commit: " + fmt.commits(df.get("git_commit", pd.Series(dtype=str)).dropna()))
    return "; ".join(parts)


def _options_key(opts: Any) -> str:
    return json.dumps(opts if isinstance(opts, dict) else {}, sort_keys=True)


def split_sweeps(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of the task's base configuration, all rows): the base configuration is the task
    options shared by the most (method, seed) runs; sweep variants are plotted, not tabulated."""
    if "task_options" not in df:
        return df, df
    keys = df["task_options"].map(_options_key)
    counts = df.assign(_k=keys).drop_duplicates("spec_hash").groupby("_k").size()
    base = counts.idxmax() if len(counts) else None
    return df[keys == base], df
