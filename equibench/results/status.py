"""``Status``: how a row (and a point) of a run ended — the only place the status strings are spelled.

Every row of ``records.jsonl`` carries one. A point's status is the worst of its rows' (``worst``):
a failure (``failed``, ``timeout``, ``out_of_memory``) over ``ok`` over the outcomes that are
neither (``not_applicable``: the method cannot run on the task or axis; ``skipped``: not measured
by design, e.g. a sweep size predicted too slow or a backend missing on this machine).
"""
from __future__ import annotations

from collections.abc import Iterable
from enum import Enum


class Status(str, Enum):
    """The outcome of a measurement row; compares and hashes equal to its string value."""

    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    NOT_APPLICABLE = "not_applicable"
    SKIPPED = "skipped"

    def __str__(self) -> str:  # "ok", not "Status.OK" (Python 3.10 to 3.12 differ otherwise)
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self, spec)

    @property
    def failed(self) -> bool:
        """Whether the point did not finish its measurement (the CLI exits 4 when one did not)."""
        return self in FAILURES

    @property
    def meaning(self) -> str:
        return MEANINGS[self]


#: statuses of a point that did not finish its measurement
FAILURES: tuple[Status, ...] = (Status.FAILED, Status.TIMEOUT, Status.OUT_OF_MEMORY)
#: statuses of a point that ran as asked (measured, or not measured by design)
FINISHED: tuple[Status, ...] = (Status.OK, Status.NOT_APPLICABLE, Status.SKIPPED)

MEANINGS: dict[Status, str] = {
    Status.OK: "measured",
    Status.FAILED: "the point raised, its worker crashed or was killed, or its environment could not be built",
    Status.TIMEOUT: "the point ran past `--timeout` and its worker was killed",
    Status.OUT_OF_MEMORY: "the worker's resident memory went over `--max-memory` (killed), or the point raised "
                          "`MemoryError` / `torch.OutOfMemoryError`",
    Status.NOT_APPLICABLE: "the method cannot run on this task (or has no option for the swept axis)",
    Status.SKIPPED: "not measured by design (a sweep size predicted too slow, a backend this machine lacks)",
}

_RANK = {**{s: 2 for s in FAILURES}, Status.OK: 1}


def parse(value: object) -> Status:
    """The ``Status`` of a stored value (a missing one is ``ok``, as rows before statuses had)."""
    return Status(str(value)) if value not in (None, "") else Status.OK


def worst(statuses: Iterable[object]) -> Status:
    """The status of a point from its rows': a failure over ``ok`` over the rest (the first
    failure when there are several)."""
    found = [parse(s) for s in statuses]
    if not found:
        return Status.OK
    return max(found, key=lambda s: _RANK.get(s, 0))
