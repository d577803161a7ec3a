"""Nightly history and regression alarms.

``results/history.parquet`` holds the rows of every run appended by ``equibench nightly``. A
regression is a (task, method, metric) whose value in the new run is worse than the median of the
previous ``window`` runs by more than ``threshold`` (relative) *and* by more than ``k`` times the
measured spread. All watched quantities are positive and their noise is multiplicative, so the
spread is taken on log values: the standard deviation of log(previous values), and for throughput
at least the run's own relative IQR. Directions: test errors, equivariance errors and memory are lower-is-better; throughput and
accuracies higher-is-better. Equivariance errors below the floating-point floor (1e-12 fp64,
1e-6 fp32) are machine precision and never flagged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..suite.store import load_results

WATCHED_PREFIXES = ("test.", "equivariance.trained.", "throughput.inference.graphs_per_s",
                    "throughput.train.graphs_per_s", "throughput.inference.peak_mem_bytes",
                    "throughput.train.peak_mem_bytes")
KEEP = ["run_id", "spec_hash", "task", "method", "seed", "metric", "value", "status", "git_commit",
        "device_name", "dtype", "batch_size", "repeats", "finished_at"]
FLOORS = {"fp64": 1e-12, "fp32": 1e-6}


def watched(metric: str) -> bool:
    if metric.startswith("equivariance.trained."):
        return metric.endswith(".rel_mean")
    return metric.startswith(WATCHED_PREFIXES)


def higher_is_better(metric: str) -> bool:
    return "graphs_per_s" in metric or "nodes_per_s" in metric or "accuracy" in metric


def append_history(run_dir: str | os.PathLike, history: str | os.PathLike) -> pd.DataFrame:
    """Add a run's ok rows to the Parquet history (atomically); returns the whole history."""
    df = load_results(run_dir)
    ok = df[df["status"] == "ok"].copy()
    rows = ok[[c for c in KEEP if c in ok]].copy()
    iqr = ok[ok["metric"].str.endswith(".time_iqr_s")].copy()
    med = ok[ok["metric"].str.endswith(".time_median_s")].copy()
    if len(iqr) and len(med):
        spread = (iqr.assign(metric=iqr["metric"].str.replace(".time_iqr_s", ".graphs_per_s"))
                  .merge(med.assign(metric=med["metric"].str.replace(".time_median_s", ".graphs_per_s")),
                         on=["spec_hash", "metric"], suffixes=("_iqr", "_med")))
        spread["rel_spread"] = spread["value_iqr"] / spread["value_med"]
        rows = rows.merge(spread[["spec_hash", "metric", "rel_spread"]], on=["spec_hash", "metric"], how="left")
    path = Path(history)
    old = pd.read_parquet(path) if path.exists() else pd.DataFrame()
    if len(old) and "run_id" in old:
        old = old[old["run_id"] != rows["run_id"].iloc[0]]  # re-appending a run replaces it
    hist = pd.concat([old, rows], ignore_index=True)
    for col in hist.columns:
        if hist[col].dtype == object:
            hist[col] = hist[col].astype("string")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    hist.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return hist


@dataclass(frozen=True)
class Regression:
    task: str
    method: str
    metric: str
    value: float
    reference: float
    change: float  # relative, signed so that positive = worse
    spread: float

    def describe(self) -> str:
        return (f"{self.task}/{self.method} {self.metric}: {self.value:.4g} vs recent median "
                f"{self.reference:.4g} ({100 * self.change:+.1f}% worse; log-spread {self.spread:.3g})")


def _run_order(hist: pd.DataFrame) -> list[str]:
    first = hist.groupby("run_id")["finished_at"].min().sort_values()
    return list(first.index)


def find_regressions(hist: pd.DataFrame, run_id: str, threshold: float = 0.1, window: int = 5,
                     k: float = 3.0) -> list[Regression]:
    """Regressions of ``run_id`` against the ``window`` runs before it in ``hist`` (module doc)."""
    order = _run_order(hist)
    if run_id not in order:
        return []
    previous = order[max(0, order.index(run_id) - window):order.index(run_id)]
    if not previous:
        return []
    h = hist[hist["metric"].map(watched)]
    per_run = h.groupby(["run_id", "task", "method", "metric"], as_index=False).agg(
        value=("value", "mean"), rel_spread=("rel_spread", "max") if "rel_spread" in h else ("value", "size"))
    if "rel_spread" not in h:
        per_run["rel_spread"] = np.nan
    cur = per_run[per_run["run_id"] == run_id]
    ref = per_run[per_run["run_id"].isin(previous)]
    out = []
    for _, row in cur.iterrows():
        past = ref[(ref["task"] == row["task"]) & (ref["method"] == row["method"]) & (ref["metric"] == row["metric"])]
        if past.empty or not np.isfinite(row["value"]):
            continue
        reference = float(past["value"].median())
        value = float(row["value"])
        if row["metric"].startswith("equivariance."):
            floor = FLOORS.get(row["metric"].split(".")[2], 0.0)
            if value <= floor:
                continue
        sign = -1.0 if higher_is_better(row["metric"]) else 1.0
        change = sign * (value - reference) / max(abs(reference), 1e-300)
        positive = value > 0 and (past["value"] > 0).all()
        if positive:  # multiplicative noise: compare on log scale
            distance = abs(np.log(value / reference))
            noise = float(np.log(past["value"]).std()) if len(past) > 1 else 0.0
            if np.isfinite(row["rel_spread"]):
                noise = max(noise, float(row["rel_spread"]))
        else:
            distance = abs(value - reference)
            noise = float(past["value"].std()) if len(past) > 1 else 0.0
        if change > threshold and distance > k * noise:
            out.append(Regression(row["task"], row["method"], row["metric"], value, reference, change, noise))
    return sorted(out, key=lambda r: -r.change)


def trend_table(hist: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (task, method): the mean value of ``metric`` in each run, runs in time order."""
    order = {r: i for i, r in enumerate(_run_order(hist))}
    t = hist[hist["metric"] == metric].groupby(["task", "method", "run_id"], as_index=False)["value"].mean()
    t["night"] = t["run_id"].map(order)
    return t.sort_values("night")


def compare_runs(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Side-by-side mean of every watched metric per (task, method) in two runs, with B/A."""
    def agg(df: pd.DataFrame) -> pd.DataFrame:
        ok = df[(df["status"] == "ok") & df["metric"].map(watched)]
        return ok.groupby(["task", "method", "metric"])["value"].mean()
    t = pd.concat({"A": agg(a), "B": agg(b)}, axis=1)
    t["B/A"] = t["B"] / t["A"]
    return t.reset_index()
