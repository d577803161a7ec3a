"""Kinds of measurement and the one small interface the runner drives them all through.

A *bench* turns its configuration into measurement *points* (``points()``); one point is
measured by ``run_point(point, history)`` in a worker process and yields tidy rows (one per
metric, each with its measurement context). The engine (``equibench.engine``) owns
everything else for every kind alike: run directory, lock, ``env.json``, resume by point hash,
worker processes with memory and time limits, isolated environments, failed rows and the store.

Kinds: ``task`` (train + evaluate one (task, method, seed), ``taskrun.py``), ``scaling`` (cost
against size, ``scaling.py``), ``tp_bench`` (tensor-product microbenchmarks, ``tp_bench.py``).
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar

from ..core.autoimport import import_all
from ..core.errors import did_you_mean

Row = dict[str, Any]
B = TypeVar("B", bound="type[Bench]")


def stable_hash(obj: Any, n: int = 12) -> str:
    """``n`` hex digits of sha256 over the canonical JSON of ``obj``."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


@dataclass(frozen=True)
class Point:
    """One unit of measurement: what the runner schedules, resumes and isolates.

    ``config`` holds everything that determines the result (JSON values); ``identity`` the
    columns every row of the point carries, failed rows included (task, method, seed, x, ...);
    ``method`` names the registered method whose ``requirements`` pick the environment;
    points with the same non-empty ``group`` may run one after another in one worker (a scaling
    sweep reuses its model), in the order given.
    """

    bench: str
    hash: str
    label: str
    config: dict[str, Any]
    identity: dict[str, Any]
    method: str | None = None
    device: str = "cpu"
    group: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        return cls(**d)


class Bench(ABC):
    """A kind of measurement. Subclasses set ``kind`` and register with ``@register_bench``."""

    kind: ClassVar[str]

    @abstractmethod
    def points(self) -> list[Point]:
        """Every point of this bench's configuration (validated: bad input raises ``UserError``)."""

    @classmethod
    @abstractmethod
    def run_point(cls, point: Point, history: list[Row]) -> list[Row]:
        """Measure ``point``; ``history`` holds the rows already measured for the points of its
        ``group`` (earlier points of a sweep). Returns tidy rows; an exception becomes a ``failed``
        row, a ``MemoryError`` / CUDA out-of-memory an ``out_of_memory`` row."""

    @classmethod  # noqa: B027 (an optional hook: most benches keep nothing between points)
    def release(cls) -> None:
        """Drop whatever a worker kept between points (models, caches)."""


_BENCHES: dict[str, type[Bench]] = {}


def register_bench(kind: str) -> Callable[[B], B]:
    def decorator(cls: B) -> B:
        cls.kind = kind
        _BENCHES[kind] = cls
        return cls
    return decorator


def bench_class(kind: str) -> type[Bench]:
    """The bench registered as ``kind`` (built-in benches are imported on first use)."""
    if kind not in _BENCHES:
        import_all("equibench.benches")  # every bench module registers itself when imported
    if kind not in _BENCHES:
        raise did_you_mean("bench", kind, _BENCHES)
    return _BENCHES[kind]
