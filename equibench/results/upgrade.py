"""Upgrade on read: every record layout earlier code wrote is brought to ``schema.SCHEMA_VERSION``.

Readers (``store.read_records`` and everything built on it: ``load_results``, resume, the report,
history) call ``upgrade`` on each stored row, so a run directory written by any earlier commit
loads and renders with today's code (``tests/data/run-v1`` is such a directory, kept as written).

Version 1 (no ``schema_version``; everything before the results contract):

* no ``bench`` column: the kind is read off the row — ``task`` = ``"scaling"`` / ``"tp_bench"``
  were those benches posing as tasks (now ``bench``, with ``task`` empty; a scaling row's task is
  in ``scaling_task``), a row with a tuning ``setting`` or a ``tune.*`` metric is a ``tune`` point,
  every other row a ``task`` point;
* scaling and tensor-product rows written before metric names were namespaced carry bare names
  (``time_s``): they become ``scaling.time_s`` / ``tp_bench.time_s``;
* a time-out was written as a ``failed`` row whose error starts with "timeout": it is a
  ``timeout`` row; a row without a status (appended by hand) is ``ok``.
"""
from __future__ import annotations

from typing import Any

from ..metrics.catalogue import STATUS
from .schema import SCHEMA_VERSION
from .status import Status

Row = dict[str, Any]
#: the bench kinds version 1 wrote into ``task``
V1_BENCH_TASKS = ("scaling", "tp_bench")
#: the bench kinds version 1 left implicit
V1_TUNE, V1_TASK = "tune", "task"


def version_of(row: Row) -> int:
    """The schema version ``row`` was written under (1 when it says none)."""
    v = row.get("schema_version")
    return int(v) if isinstance(v, (int, float)) and v == v else 1


def _v1_bench(row: Row) -> str:
    task = row.get("task")
    if task in V1_BENCH_TASKS:
        return str(task)
    if isinstance(row.get("setting"), dict) or str(row.get("metric") or "").startswith(f"{V1_TUNE}."):
        return V1_TUNE
    return V1_TASK


def _from_v1(row: Row) -> Row:
    out = dict(row)
    bench = out.get("bench") or _v1_bench(out)
    out["bench"] = bench
    if out.get("task") in V1_BENCH_TASKS:
        out["task"] = None
        metric = str(out.get("metric") or "")
        if metric and metric != STATUS and "." not in metric:
            out["metric"] = f"{bench}.{metric}"
    if out.get("status") in (None, ""):  # a row appended without one (a bench's own rows, by hand)
        out["status"] = Status.OK.value
    if out.get("status") == Status.FAILED and str(out.get("error") or "").startswith("timeout"):
        out["status"] = Status.TIMEOUT.value
    out["schema_version"] = 2
    return out


def upgrade(row: Row) -> Row:
    """``row`` in the layout of ``SCHEMA_VERSION`` (the same dict when it is already; a row of a
    newer version than this code knows is returned as it is)."""
    if version_of(row) >= SCHEMA_VERSION:
        return row
    if version_of(row) == 1:
        row = _from_v1(row)
    return row
