"""The report's view of the metric catalogue: the spec of any name a row carries (the catalogue's,
else the one the run stored, else a stand-in without direction, so such rows still render),
canonical names on a results frame, row selection by facets, headers and formatted values."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import pandas as pd

from ...metrics.catalogue import MetricSpec, find_metric
from . import fmt

ARROWS = {"higher": "↑", "lower": "↓"}
#: the metric specs the runs being reported stored (``cards/metrics.json``), while a report is written
_STORED: ContextVar[Mapping[str, MetricSpec]] = ContextVar("stored_metric_specs", default=MappingProxyType({}))


@contextlib.contextmanager
def stored_metrics(specs: Mapping[str, MetricSpec]) -> Iterator[None]:
    """While the block runs, a name this process's catalogue does not declare (a plugin's metric,
    the plugin not loaded) is looked up in ``specs``: what the process that wrote the run declared
    (``RunCards.metrics``)."""
    token = _STORED.set(specs)
    try:
        yield
    finally:
        _STORED.reset(token)


def known_spec(name: str) -> MetricSpec | None:
    """The catalogue's spec of ``name``, else the run's stored one (``stored_metrics``); None when neither."""
    return find_metric(name) or _STORED.get().get(name)


def spec_for(name: str) -> MetricSpec:
    """The spec of ``name`` (``known_spec``), or a context-only stand-in (family "unknown",
    displayed under its raw name, no direction)."""
    return known_spec(name) or MetricSpec(name=name, display=name, family="unknown",
                                          description="not declared in the metric catalogue")


def select(df: pd.DataFrame, **facets: Any) -> pd.DataFrame:
    """Rows whose metric's spec has the given field values, e.g. ``select(df, family="test")``."""
    names = [m for m in df["metric"].unique() if all(getattr(spec_for(m), k) == v for k, v in facets.items())]
    return df[df["metric"].isin(names)]


def metric_names(names: Any, **facets: Any) -> list[str]:
    """The names among ``names`` whose spec has the given field values (order kept)."""
    return [m for m in dict.fromkeys(names) if all(getattr(spec_for(m), k) == v for k, v in facets.items())]


def unit_label(spec: MetricSpec) -> str:
    """The unit a formatted value is shown in ("" when the value carries its own)."""
    if spec.number_format == "bytes":
        return "MB"
    return "" if spec.number_format == "time" else spec.unit


def header(spec: MetricSpec, label: str | None = None, arrow: bool = True) -> str:
    """Column header: display name (or ``label``), [unit], and ↑ / ↓ for the better direction."""
    unit = unit_label(spec)
    text = (label or spec.display) + (f" [{unit}]" if unit else "")
    return text + (f" {ARROWS[spec.direction]}" if arrow and spec.direction else "")


def better_word(spec: MetricSpec) -> str:
    """"higher is better" / "lower is better" / "" (context only)."""
    return f"{spec.direction} is better" if spec.direction else ""


def value(spec: MetricSpec, v: Any) -> str:
    """``v`` formatted as the catalogue says (``spec.number_format``)."""
    return fmt.number(v, spec.number_format)
