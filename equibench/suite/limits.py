"""Resource limits of one measurement point: memory (bytes) and wall time (seconds).

``parse_size("4G")`` reads a size as the CLI and ``run(max_memory=...)`` take it (binary units:
``K``/``M``/``G``/``T``, optional ``B``/``iB``, decimals allowed; a bare number is bytes); any other
text is a one-line ``UserError``. ``default_max_memory()`` is 75 % of the machine's RAM: a point
that grows past it is stopped before the kernel's OOM killer picks a victim (possibly the runner).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..core.errors import UserError

DEFAULT_FRACTION = 0.75
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """Bytes in ``text`` ("4G", "512M", "1.5GiB", "1000000"); ``UserError`` when it is not a size."""
    if isinstance(text, bool):
        raise UserError(f"invalid memory size {text!r} (expected e.g. 4G, 512M or a number of bytes)")
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise UserError(f"invalid memory size {text!r} (expected e.g. 4G, 512M or a number of bytes)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise UserError(f"invalid memory size {text!r}: must be positive")
    return value


def format_size(n: int | float | None) -> str:
    """``n`` bytes as a short human-readable string ("1.5 GiB")."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def default_max_memory() -> int:
    """75 % of the machine's total RAM (bytes)."""
    import psutil
    return int(psutil.virtual_memory().total * DEFAULT_FRACTION)


@dataclass(frozen=True)
class Limits:
    """Per-point limits a worker runs under: ``max_memory`` (bytes of resident memory of the
    worker's process tree) and ``timeout`` (seconds per point); ``None`` = unlimited."""

    max_memory: int | None = None
    timeout: float | None = None

    @classmethod
    def make(cls, max_memory: int | str | None, timeout: float | None) -> Limits:
        """Validated limits; ``max_memory=None`` means ``default_max_memory()``."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout <= 0):
            raise UserError(f"invalid timeout {timeout!r}: must be a positive number of seconds")
        mem = default_max_memory() if max_memory is None else parse_size(max_memory)
        return cls(max_memory=mem, timeout=None if timeout is None else float(timeout))
