"""Nightly history and regression alarms.

``results/history.parquet`` holds the rows of every run appended by ``equibench nightly``. The
watched metrics are those the catalogue marks ``watch`` (test metrics, the trained models'
mean relative equivariance errors, throughput in graphs/s and peak memory); their better
direction comes from the catalogue, and a metric without one is never compared. A regression is
a (task, method, metric) whose value in the new run is worse than the median of the previous
``window`` runs by more than ``threshold`` (relative) *and* by more than ``k`` times the measured
spread. All watched quantities are positive and their noise is multiplicative, so the spread is
taken on log values: the standard deviation of log(previous values), and for throughput at
least the run's own relative IQR. Values at or below a metric's ``floor`` (equivariance errors
at machine precision: 1e-12 fp64, 1e-6 fp32) are never flagged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics.catalogue import THROUGHPUT_MODES, throughput_metric
from ..results.status import Status
from ..results.store import load_results
from .common.metricinfo import known_spec

KEEP = ["run_id", "spec_hash", "bench", "task", "method", "seed", "metric", "value", "status", "git_commit",
        "device_name", "dtype", "batch_size", "repeats", "finished_at"]


def watched(metric: str) -> bool:
    """Whether the regression rule and the run comparison track ``metric`` (declared, marked
    ``watch`` and with a better direction)."""
    spec = known_spec(metric)
    return bool(spec and spec.watch and spec.direction)


def spread_rows(ok: pd.DataFrame) -> pd.DataFrame:
    """(spec_hash, metric, rel_spread): the relative IQR of each run's timing, attached to its
    graphs/s throughput metric."""
    parts = []
    for mode in THROUGHPUT_MODES:
        iqr = ok[ok["metric"] == throughput_metric(mode, "time_iqr_s")][["spec_hash", "value"]]
        med = ok[ok["metric"] == throughput_metric(mode, "time_median_s")][["spec_hash", "value"]]
        m = iqr.merge(med, on="spec_hash", suffixes=("_iqr", "_med"))
        parts.append(pd.DataFrame({"spec_hash": m["spec_hash"], "metric": throughput_metric(mode, "graphs_per_s"),
                                   "rel_spread": m["value_iqr"] / m["value_med"]}))
    return pd.concat(parts, ignore_index=True).drop_duplicates(["spec_hash", "metric"])


def append_history(run_dir: str | os.PathLike, history: str | os.PathLike,
                   results: pd.DataFrame | None = None) -> pd.DataFrame:
    """Add a run's ok rows to the Parquet history (atomically); returns the whole history.
    ``results``: the run's rows when the caller has them (else read from ``run_dir``)."""
    df = load_results(run_dir) if results is None else results
    ok = df[df["status"] == Status.OK].copy()
    rows = ok[[c for c in KEEP if c in ok]].copy()
    spread = spread_rows(ok)
    if len(spread):
        rows = rows.merge(spread, on=["spec_hash", "metric"], how="left")
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


def run_order(hist: pd.DataFrame) -> list[str]:
    """Run ids of the history, oldest first (by their first finished_at)."""
    first = hist.groupby("run_id")["finished_at"].min().sort_values()
    return list(first.index)


@dataclass(frozen=True)
class Change:
    """``value`` against ``reference`` (the median of earlier values): ``change`` is relative and
    signed so that positive = worse in the metric's direction; ``distance`` and ``noise`` are on
    the log scale for positive values (multiplicative noise), else absolute."""
    reference: float
    change: float
    distance: float
    noise: float

    def beyond(self, threshold: float, k: float) -> bool:
        """The rule of the regression alarm and of ``compare``: the change is larger than
        ``threshold`` (relative) and than ``k`` times the measured noise."""
        return abs(self.change) > threshold and self.distance > k * self.noise


def measure_change(value: float, past: pd.Series, rel_spread: float, direction: str) -> Change:
    """How far ``value`` lies from ``past`` (module doc): the noise is the standard deviation of
    log(past) (0 for one value), at least ``rel_spread`` (a measured relative spread, e.g. the
    timing's IQR / median; NaN = none)."""
    reference = float(past.median())
    sign = -1.0 if direction == "higher" else 1.0
    change = sign * (value - reference) / max(abs(reference), 1e-300)
    if value > 0 and (past > 0).all():  # multiplicative noise: compare on log scale
        distance = abs(np.log(value / reference))
        noise = float(np.log(past).std()) if len(past) > 1 else 0.0
        if np.isfinite(rel_spread):
            noise = max(noise, float(rel_spread))
    else:
        distance = abs(value - reference)
        noise = float(past.std()) if len(past) > 1 else 0.0
    return Change(reference, change, float(distance), noise)


def _is_regression(value: float, past: pd.Series, rel_spread: float, direction: str, threshold: float,
                   k: float) -> tuple[bool, float, float, float]:
    """(flagged, reference, signed relative change, noise) of ``value`` against ``past``."""
    c = measure_change(value, past, rel_spread, direction)
    return c.change > threshold and c.beyond(threshold, k), c.reference, c.change, c.noise


def find_regressions(hist: pd.DataFrame, run_id: str, threshold: float = 0.1, window: int = 5,
                     k: float = 3.0) -> list[Regression]:
    """Regressions of ``run_id`` against the ``window`` runs before it in ``hist`` (module doc)."""
    order = run_order(hist)
    if run_id not in order:
        return []
    previous = order[max(0, order.index(run_id) - window):order.index(run_id)]
    if not previous:
        return []
    h = hist[hist["metric"].map(watched)]
    if "rel_spread" not in h:
        h = h.assign(rel_spread=np.nan)
    per_run = h.groupby(["run_id", "task", "method", "metric"], as_index=False).agg(
        value=("value", "mean"), rel_spread=("rel_spread", "max"))
    cur = per_run[per_run["run_id"] == run_id]
    ref = per_run[per_run["run_id"].isin(previous)].set_index(["task", "method", "metric"])["value"].sort_index()
    out = []
    for _, row in cur.iterrows():
        key = (row["task"], row["method"], row["metric"])
        spec = known_spec(row["metric"])
        if key not in ref.index or spec is None or spec.direction is None or not np.isfinite(row["value"]):
            continue
        value = float(row["value"])
        if spec.floor is not None and value <= spec.floor:
            continue
        past = ref.loc[[key]].astype(float)
        flagged, reference, change, noise = _is_regression(value, past, float(row["rel_spread"]), spec.direction,
                                                           threshold, k)
        if flagged:
            out.append(Regression(row["task"], row["method"], row["metric"], value, reference, change, noise))
    return sorted(out, key=lambda r: -r.change)


def trend_table(hist: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (task, method): the mean value of ``metric`` in each run, runs in time order."""
    order = {r: i for i, r in enumerate(run_order(hist))}
    t = hist[hist["metric"] == metric].groupby(["task", "method", "run_id"])["value"].mean().reset_index()
    t["night"] = t["run_id"].map(order)
    return t.sort_values("night")
