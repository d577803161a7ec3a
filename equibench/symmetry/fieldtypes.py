"""The type vocabulary: how a field transforms under E(3).

A type is an e3nn irreps string or ``"point"``. Under g = (R, t) with R in O(3):

* irreps field ``v`` (shape ``[..., Irreps(t).dim]``): ``v -> v @ D(R)^T`` with
  ``D = Irreps(t).D_from_matrix(R)`` (for ``"1o"`` in e3nn 0.6, ``D(R) = R`` in x, y, z order);
* ``"point"`` (shape ``[..., 3]``): ``x -> x @ R^T + t``.

Wigner-D matrices are computed in the dtype of ``R`` *and* under that default dtype, which
avoids e3nn's precision trap for float64.
"""
from __future__ import annotations

import functools

import torch
from e3nn import o3

from ..core.errors import UserError
from .precision import default_dtype

POINT = "point"


@functools.lru_cache(maxsize=256)
def irreps(t: str) -> o3.Irreps:
    """Parse a field type (not ``"point"``) into e3nn ``Irreps``; bad strings are user errors."""
    if t == POINT:
        return o3.Irreps("1o")
    try:
        return o3.Irreps(t)
    except (ValueError, AssertionError, TypeError) as err:
        raise UserError(f"invalid field type {t!r}: {err}") from None


def field_dim(t: str) -> int:
    """Number of components of a field of type ``t``."""
    return 3 if t == POINT else irreps(t).dim


def is_invariant(t: str) -> bool:
    """True when a field of type ``t`` is unchanged by every element of O(3)."""
    return t != POINT and all(ir.l == 0 and ir.p == 1 for _, ir in irreps(t))


def representation(t: str, R: torch.Tensor) -> torch.Tensor:
    """The matrix ``rho_t(R)`` (``[..., d, d]``) acting on a field of type ``t``; ``R: [..., 3, 3]``.

    Block-diagonal over the irreps of ``t``. l = 0 and l = 1 blocks are written from ``R``
    directly (0e: 1, 0o: det R, 1o: R, 1e: det R * R; e3nn 0.6's Cartesian basis), exact to the
    last bit; l >= 2 blocks use e3nn's ``D_from_matrix`` under ``R``'s dtype as the default dtype
    (it goes through Euler angles: ~5e-10 relative error in fp64 within ~1e-9 of the identity).
    """
    if t in (POINT, "1o", "1x1o"):
        return R
    blocks: list[torch.Tensor] = []
    det = None
    for mul, ir in irreps(t):
        if ir.l >= 2:
            with default_dtype(R.dtype if R.dtype.is_floating_point else torch.get_default_dtype()):
                d = o3.Irrep(ir.l, ir.p).D_from_matrix(R).to(R.dtype)
        elif (ir.l == 1) == (ir.p == -1):  # 0e, 1o: no determinant factor
            d = R if ir.l == 1 else R.new_ones(*R.shape[:-2], 1, 1)
        else:  # 0o, 1e
            det = torch.linalg.det(R)[..., None, None] if det is None else det
            d = det if ir.l == 0 else det * R
        blocks.extend([d] * mul)
    return blocks[0] if len(blocks) == 1 else block_diag(blocks)


def block_diag(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Batched block-diagonal matrix of ``[..., k_i, k_i]`` blocks."""
    size = sum(b.shape[-1] for b in blocks)
    out = blocks[0].new_zeros(*blocks[0].shape[:-2], size, size)
    i = 0
    for b in blocks:
        k = b.shape[-1]
        out[..., i:i + k, i:i + k] = b
        i += k
    return out


def transform_field(value: torch.Tensor, t: str, R: torch.Tensor,
                    shift: torch.Tensor | None = None) -> torch.Tensor:
    """Apply g = (R, shift) to ``value``.

    ``R`` is ``[3, 3]`` or per-row ``[n, 3, 3]`` (matching ``value``'s rows); ``shift`` likewise
    ``[3]`` or ``[n, 3]`` and only used for ``"point"`` fields.
    """
    if is_invariant(t):
        return value
    D = representation(t, R.to(value.dtype))
    if D.dim() == 2:
        out = value @ D.T
    else:
        out = torch.einsum("nij,nj->ni", D, value)
    if t == POINT and shift is not None:
        out = out + shift.to(value.dtype)
    return out
