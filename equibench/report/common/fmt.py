"""Number formatting of the report's tables (plain strings; "–" for a missing value)."""
from __future__ import annotations

from typing import Any

import numpy as np

MISSING = "–"


def missing(v: Any) -> bool:
    """None, NaN, ±inf or not a number."""
    if v is None:
        return True
    try:
        return not np.isfinite(float(v))
    except (TypeError, ValueError):
        return True


def time(v: Any) -> str:
    """Seconds in s / ms / µs with three significant digits."""
    if missing(v):
        return MISSING
    v = float(v)
    if v >= 1:
        return f"{v:.3g} s"
    if v >= 1e-3:
        return f"{v * 1e3:.3g} ms"
    return f"{v * 1e6:.3g} µs"


def number(v: Any, kind: str = "g") -> str:
    """``kind``: "g" (4 significant digits), "int" (thousands separators), "sci" (1.2e-03),
    "bytes" (as MiB, 2 decimals), "time" (see ``time``) or "x" (a ratio, 2 decimals and ×)."""
    if missing(v):
        return MISSING
    v = float(v)
    if kind == "int":
        return f"{int(round(v)):,}"
    if kind == "sci":
        return f"{v:.1e}"
    if kind == "bytes":
        return f"{v / 2**20:.2f}"
    if kind == "time":
        return time(v)
    if kind == "x":
        return f"{v:.2f}×"
    return f"{v:.4g}"


def commits(values: Any) -> str:
    """Distinct git commits, shortened to 10 characters (+dirty kept)."""
    out = sorted({str(c)[:10] + ("+dirty" if str(c).endswith("+dirty") else "") for c in values if c == c and c})
    return ", ".join(out) or "?"
