"""The one writer of records: every row the store receives is made here.

* ``exception_rows``: what a point that raised wrote — its measurements never came, so one status
  row: ``out_of_memory`` for ``MemoryError`` / ``torch.OutOfMemoryError`` (``is_out_of_memory``,
  the one place out-of-memory is recognised from an exception) with the worker's peak memory and
  the limit; ``not_applicable`` / ``skipped`` for a bench's ``NotApplicable`` / ``Skipped``; else
  ``failed`` with the error's type, message and last traceback lines;
* ``status_row``: the status-only row of a point that did not run to an end (the engine's crash,
  kill, time-out, out-of-memory kill and environment failures);
* ``point_record``: a point's rows with its identity and the run-level columns (``RunColumns``:
  run id, spec hash, bench, commit, package versions, environment, executor, wall time; on Slurm
  the array job and task ids), each
  measurement's unit from the metric catalogue, and ``schema_version``, validated against
  ``schema.PointRecord``. Rows that do not fit the schema become one ``failed`` row naming why,
  so a bench's bug costs its point, not the run. A measurement row a bench marks as not measured
  by design (``NOT_MEASURED``: the name of a ``PointNotMeasured`` class, with the reason in
  ``error``; e.g. a probe's metric that cannot be taken on this device) gets that class's status.
"""
from __future__ import annotations

import datetime as _dt
import json
import sys
import traceback
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError

from ..benches.training import NonFiniteError
from ..core.errors import NotApplicable, PointNotMeasured, Skipped, UserError
from ..metrics.catalogue import STATUS, find_metric
from .schema import SCHEMA_VERSION, PointRecord
from .status import Status

Row = dict[str, Any]
#: longest error text kept on a row (CUDA out-of-memory messages run to kilobytes)
MAX_ERROR = 2000
#: errors whose message says everything (no traceback lines on the row)
PLAIN_ERRORS: tuple[type[BaseException], ...] = (UserError, NonFiniteError)
_NOT_MEASURED: dict[type[PointNotMeasured], Status] = {NotApplicable: Status.NOT_APPLICABLE,
                                                       Skipped: Status.SKIPPED}
#: the column of a measurement row not measured by design: ``NotApplicable.__name__`` or
#: ``Skipped.__name__`` (layers below this one cannot spell a ``Status``)
NOT_MEASURED = "not_measured"
#: run-level columns only some executors fill (left off the rows where they are None)
OPTIONAL_RUN_COLUMNS = ("slurm_job_id", "slurm_array_task_id", "paused_s")


@dataclass(frozen=True)
class RunColumns:
    """The run-level columns every row of a point gets from the engine."""

    run_id: str
    spec_hash: str
    bench: str
    git_commit: str
    versions: dict[str, str]
    environment: str
    executor: str
    wall_s: float
    #: ``submitit:slurm``: the array job and the array task that ran the point (absent elsewhere)
    slurm_job_id: str | None = None
    slurm_array_task_id: int | None = None
    #: ``--jobs``: seconds the worker was stopped during the point for other workers' timings
    paused_s: float | None = None


def now() -> str:
    """The current UTC time, ISO 8601 (``started_at`` / ``finished_at``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says the point ran out of memory (host ``MemoryError`` or torch's CPU/CUDA
    ``OutOfMemoryError``)."""
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return isinstance(err, MemoryError) or (oom_type is not None and isinstance(err, oom_type))


def status_row(status: Status, error: str, **details: Any) -> Row:
    """A status-only row (``metric = "status"``, no value) with the failure details given."""
    return {"metric": STATUS, "value": None, "status": Status(status), "error": error[:MAX_ERROR],
            "finished_at": now(), **details}


def memory_details(peak_rss: int | None, max_memory: int | None) -> Row:
    """The columns of an out-of-memory row: the worker's peak RSS, the limit and, when CUDA is in
    use, the device's peak allocation."""
    out: Row = {"peak_rss_bytes": peak_rss, "max_memory_bytes": max_memory}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a CUDA OOM: the device's peak matters
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def exception_rows(err: BaseException, *, peak_rss: int | None = None, max_memory: int | None = None) -> list[Row]:
    """The row of a point whose bench raised ``err`` (see the module docstring)."""
    if isinstance(err, PointNotMeasured):
        return [status_row(_NOT_MEASURED.get(type(err), Status.SKIPPED), str(err), **err.context)]
    msg = f"{type(err).__name__}: {err}"
    if is_out_of_memory(err):
        return [status_row(Status.OUT_OF_MEMORY, msg, **memory_details(peak_rss, max_memory))]
    if not isinstance(err, PLAIN_ERRORS):
        tail = traceback.format_exception(err)
        msg += " | " + " / ".join("".join(tail).strip().splitlines()[-3:])
    return [status_row(Status.FAILED, msg)]


def _measurement_status(row: Row) -> Row:
    """``row`` with the status its ``NOT_MEASURED`` column names (and no value), if it has one."""
    kind = row.get(NOT_MEASURED)
    if kind is None:
        return row
    status = {cls.__name__: s for cls, s in _NOT_MEASURED.items()}.get(str(kind), Status.SKIPPED)
    return {**{k: v for k, v in row.items() if k != NOT_MEASURED}, "status": status, "value": None}


def _plain(row: Row) -> Row:
    """``row`` as JSON values (numpy scalars to Python numbers, other objects to strings)."""
    return json.loads(json.dumps(row, default=lambda o: o.item() if hasattr(o, "item") else str(o),
                                 allow_nan=True))


def point_record(identity: Row, rows: list[Row], run: RunColumns) -> PointRecord:
    """The record of one point: ``identity`` (the point's identity columns), each of its ``rows``
    (a measurement, or a status row; its own columns win over the identity's) and the run-level
    columns (which win over both), validated. A point that produced no rows, or rows the schema
    rejects, is recorded as one ``failed`` row saying so."""
    if not rows:
        rows = [status_row(Status.FAILED, f"{run.bench} produced no rows")]
    cols = {**{k: v for k, v in asdict(run).items() if v is not None or k not in OPTIONAL_RUN_COLUMNS},
            "schema_version": SCHEMA_VERSION}
    try:
        measured = [_plain({**identity, **_measurement_status(r), **cols}) for r in rows]
        for m in measured:
            spec = find_metric(str(m.get("metric")))
            if spec is not None and spec.unit and m.get("unit") is None:
                m["unit"] = spec.unit
        return PointRecord.from_rows(measured)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"]))
        bad = status_row(Status.FAILED, f"rows do not match the record schema: {where}: {first['msg']} "
                                        f"({err.error_count()} error(s))")
        return PointRecord.from_rows([_plain({**identity, **bad, **cols})])
