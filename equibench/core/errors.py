"""Errors that mean "the user asked for something wrong" (exit code 2, one clear line)."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user: unknown name, malformed suite file, wrong option type.

    The CLI prints ``str(err)`` as a single line on stderr and exits with code 2.
    """


def closest(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` naming the choices closest to ``name`` (difflib), or ``""``."""
    close = difflib.get_close_matches(str(name), sorted(map(str, choices)), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def did_you_mean(kind: str, name: str, choices: Iterable[str]) -> UserError:
    """A ``UserError`` for an unknown ``name`` with close matches from ``choices``."""
    choices = sorted(choices)
    return UserError(f"unknown {kind} {name!r}{closest(name, choices)} (known: {', '.join(choices) or 'none'})")


class StorageError(Exception):
    """The results directory cannot be written (disk full, over quota, read-only, no permission).

    The run stops; every finished block is intact and ``--resume`` finishes the run once the
    cause is fixed. The CLI prints ``str(err)`` as a single line on stderr and exits with code 3.
    """


class PointNotMeasured(Exception):
    """Raised by a bench when a point ends without measurements by design, not by failure; the
    engine's one writer (``results.rows``) records it as a status row with ``str(err)`` as the
    reason. ``context`` (keyword arguments) adds columns to that row."""

    def __init__(self, reason: str, **context: object) -> None:
        super().__init__(reason)
        self.context = context


class NotApplicable(PointNotMeasured):
    """The method cannot run on this task (``Method.supports``), or has no option for a swept axis."""


class Skipped(PointNotMeasured):
    """Not measured on purpose: a sweep size predicted too slow, a backend this machine lacks."""
