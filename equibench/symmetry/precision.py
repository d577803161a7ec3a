"""Default-dtype handling.

e3nn builds its so(3) generators and Clebsch-Gordan constants in the *default* dtype, so a
float64 equivariance measurement must build the model (and every Wigner-D matrix) while
``torch.get_default_dtype() is torch.float64`` (REFERENCES.md, "precision trap").
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..core.errors import UserError


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set ``torch``'s default floating dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "fp64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise UserError(f"unknown dtype {name!r} (known: {', '.join(table)})")
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16",
            torch.bfloat16: "bf16"}[dtype]
