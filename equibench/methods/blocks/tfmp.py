"""Tensor-frame message passing: local frames, tensor representations, and PyG hooks that make
any ``MessagePassing`` layer O(3)- (or SO(3)-) equivariant.

Frames. Every node i gets a matrix ``R_i`` in O(3) whose ROWS are its frame axes, so the local
coordinates of a global vector v are ``R_i v``. Frames are equivariant:
``R_i(gX) = R_i(X) g^T`` for g in O(3) (SO(3) with ``so3=True``); hence every local coordinate
is invariant, and ``R_i^T`` maps a local output back to an equivariant global one.

* learned (tensor frames, Lippmann et al. 2024): an MLP on invariant edge scalars (radial basis
  of r_ij = |x_j - x_i|, invariant node and edge inputs) gives weights w_ij^(k),
  ``v_i^(k) = sum_j w_ij^(k) env(r_ij) (x_j - x_i) / r_ij`` (k = 1, 2, 3);
* nearest: ``v_i^(k) = x_{j_k} - x_i`` for the k-th nearest neighbour j_k.

Gram-Schmidt on v^(1), v^(2) gives x, y and z = x cross y; for O(3) the handedness is
``z <- sign(<h, z>) z`` for the first handedness vector h with ``|<h/|h|, z>| > hand_eps``.

Why handedness needs care (O(3) frames). z = x cross y is a *pseudo*-vector: under an improper g
it picks up det g = -1, so only the sign flip by an equivariant h makes the frame O(3)-equivariant.
If the k-NN neighbourhood of node i is exactly planar (points sampled on a flat mesh face; planar
molecular fragments), every vector built from it lies in the plane and ``<h, z> = 0``: the local
input is symmetric under the reflection sigma_i through that plane, and no frame built from it
alone can be O(3)-equivariant (R(sigma X) = R(X) sigma would need R = R sigma). Two variants
(``handedness``):

* ``"local"`` (the paper's construction, Lippmann et al., "Beyond canonicalization: how tensorial
  messages improve equivariant message passing", ICLR 2025): h from the neighbourhood only (the
  third learned vector, then the summed unit neighbour direction); undecided -> no flip, which is
  NOT equivariant under reflections at such nodes;
* ``"wide"``: nodes whose local frame is degenerate take further candidates from their whole
  graph (``context_vectors``: sum_j r_ij^p (x_j - x_i) over the graph for p = 0, 1, 2, the node's
  own and the graph's summed "1o" input vectors). A planar neighbourhood inside a non-planar input
  is then decided (for a convex cloud already by the centroid direction). If the whole input is
  planar and its features are symmetric under the plane's reflection sigma, nothing decides, but
  then the default z = x cross y is *consistently* a pseudo-vector at every node:
  R_i(gX) = R_i(X) sigma^[det g < 0] g^T for all i, so f(gX) = rho(g) rho(sigma)^[det g < 0] f(X);
  the model projects its output on the sigma-fixed subspace, (f + rho(sigma) f) / 2, which is what
  any O(3)-equivariant map must output on a sigma-symmetric input (0e: anything; 1o and points:
  in-plane; 1e: along the normal; 0o: zero). See ``planar_symmetry``.

What remains degenerate (``FrameStatus``): nodes with no equivariant x or y candidate (the node
sits on a rotation axis of its whole input: collinear or exactly symmetric inputs such as
methane's carbon), and, for O(3), undecided handedness in a non-planar input (a node on a mirror
plane of an exactly mirror-symmetric input). There no equivariant frame exists; the frame falls
back to the global axes and the benchmark reports the share of such nodes.

Representations. A feature carries a declared representation ``rho``: Cartesian tensors
(``TensorReps("16x0n+8x1n+2x2p")``: rank-n tensors, 3^n components, ``rho(U) T = U...U T``,
times det U for p = pseudo) or e3nn irreps (``"8x0e+4x1o+2x2e"``, Wigner-D matrices computed as
exact polynomials in U from Clebsch-Gordan recursion, D_l = C^T (D_{l-1} (x) D_1) C, so that
no Euler angles - and no acos precision loss - are involved).

Hooks. ``attach_tensor_frames(layer, {"h": "16x0n+8x1n", "edge_vec": ("1o", "global")})``
registers PyG's public propagate/message pre-hooks on a layer INSTANCE. Before ``message``:

* "local" argument (expressed in its own node's frame): ``h_j <- rho(U_ij) h_j`` with
  ``U_ij = R_i R_j^T`` (frame j -> frame i); ``h_i`` and un-suffixed edge features unchanged;
* "global" argument (expressed in the global frame): ``e <- rho(R_i) e`` for ``e``, ``e_i``, ``e_j``.

The frames come from ``propagate(..., lframes=R)`` (popped by the hook) or from
``set_frames(layer, R)`` / ``FrameWrapped`` for stock layers whose ``forward`` does not pass
extra keywords.

Degenerate inputs (no neighbour, coincident or collinear points, coplanar neighbourhoods):
outputs stay finite and deterministic, because Gram-Schmidt falls back to further candidate
vectors, first equivariant ones (the node's summed unit neighbour direction; with "wide" the
graph-wide context), finally the global axes e_x, e_y, e_z, and handedness +1.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from e3nn import o3
from torch import nn
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter

from ...metrics.profile import region
from .backbone import mlp, run_mlp

EPS = 1e-6  # decision threshold for degenerate frame vectors (norms, sines of angles)
HANDEDNESS = ("local", "wide")
DELTA = 1e-9  # length regulariser: r / sqrt(|r|^2 + DELTA^2) is smooth and 0 at r = 0


# ---------------------------------------------------------------------------------------------
# representations
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorReps:
    """Direct sum of Cartesian tensors: blocks ``(mul, rank, pseudo)``; written "16x0n+8x1n+2x2p"."""

    blocks: tuple[tuple[int, int, bool], ...]

    @property
    def dim(self) -> int:
        return sum(mul * 3**rank for mul, rank, _ in self.blocks)

    @property
    def is_invariant(self) -> bool:
        return all(rank == 0 and not pseudo for _, rank, pseudo in self.blocks)

    def __str__(self) -> str:
        return "+".join(f"{m}x{r}{'p' if p else 'n'}" for m, r, p in self.blocks)


@dataclass(frozen=True)
class IrrepsReps:
    """e3nn irreps (multiplicity-major layout), acting through Wigner-D matrices."""

    irreps: o3.Irreps

    @property
    def dim(self) -> int:
        return self.irreps.dim

    @property
    def is_invariant(self) -> bool:
        return all(ir.l == 0 and ir.p == 1 for _, ir in self.irreps)

    def __str__(self) -> str:
        return str(self.irreps)


Reps = TensorReps | IrrepsReps
_TENSOR_TERM = re.compile(r"^(?:(\d+)x)?(\d+)([np])$")


@functools.lru_cache(maxsize=128)
def _parse(text: str) -> Reps:
    terms = [t.strip() for t in text.split("+") if t.strip()]
    if terms and all(_TENSOR_TERM.match(t) for t in terms):
        blocks = []
        for t in terms:
            mul, rank, kind = _TENSOR_TERM.match(t).groups()  # type: ignore[union-attr]
            blocks.append((int(mul or 1), int(rank), kind == "p"))
        return TensorReps(tuple(b for b in blocks if b[0] > 0))
    try:
        return IrrepsReps(o3.Irreps(text))
    except (ValueError, AssertionError, TypeError):
        raise ValueError(f"invalid representation {text!r}: use tensor reps like '16x0n+8x1n+2x2p' "
                         "(n normal, p pseudo) or e3nn irreps like '16x0e+8x1o'") from None


def parse_reps(reps: str | Reps | o3.Irreps) -> Reps:
    """``TensorReps`` for "16x0n+8x1n" notation, ``IrrepsReps`` for e3nn irreps strings."""
    if isinstance(reps, (TensorReps, IrrepsReps)):
        return reps
    if isinstance(reps, o3.Irreps):
        return IrrepsReps(reps)
    if reps == "point":
        return _parse("1o")
    return _parse(str(reps))


def scale_reps(template: str | Reps, size: int) -> Reps:
    """``template`` with non-scalar multiplicities scaled so the total dimension is about ``size``;
    invariant scalars (0n / 0e) fill the remainder (used to build at a parameter budget)."""
    reps = parse_reps(template)
    factor = size / reps.dim
    if isinstance(reps, TensorReps):
        blocks = [(m, r, p) for m, r, p in reps.blocks if not (r == 0 and not p)]
        scaled = [(max(1, round(m * factor)), r, p) for m, r, p in blocks]
        n0 = max(1, size - sum(m * 3**r for m, r, _ in scaled))
        return TensorReps(((n0, 0, False), *scaled))
    items = [(mul, ir) for mul, ir in reps.irreps if not (ir.l == 0 and ir.p == 1)]
    scaled_i = [(max(1, round(mul * factor)), ir) for mul, ir in items]
    n0 = max(1, size - sum(m * ir.dim for m, ir in scaled_i))
    return IrrepsReps(o3.Irreps([(n0, (0, 1)), *scaled_i]))


def default_hidden_reps(width: int) -> TensorReps:
    """About half scalars, half vectors: ``(width - 3 n)x0n + n x1n`` with n = width // 6."""
    n1 = width // 6
    return TensorReps(((width - 3 * n1, 0, False), (n1, 1, False))) if n1 else TensorReps(((width, 0, False),))


@functools.lru_cache(maxsize=16)
def _cg(l: int) -> torch.Tensor:
    """Clebsch-Gordan coefficients (l-1) x 1 -> l in e3nn's basis (float64, unit Frobenius norm)."""
    return o3.wigner_3j(l - 1, 1, l, dtype=torch.float64)


def wigner_d(l: int, U: torch.Tensor) -> torch.Tensor:
    """Polynomial D_l(U) ``[E, 2l+1, 2l+1]`` for ``U: [E, 3, 3]`` (e3nn basis; D_1 = U).

    Built by D_l = (2l+1) C^T (D_{l-1} (x) U) C; for U = d Q (Q a rotation) it equals d^l D_l(Q).
    """
    E = U.shape[0]
    if l == 0:
        return torch.ones(E, 1, 1, dtype=U.dtype, device=U.device)
    D = U
    for k in range(2, l + 1):
        C = _cg(k).to(dtype=U.dtype, device=U.device)
        A = torch.einsum("ija,eik->ejak", C, D)
        D = torch.einsum("ejak,ejl,klb->eab", A, U, C) * (2 * k + 1)
    return D


def orthogonal_det(U: torch.Tensor) -> torch.Tensor:
    """det U in {-1, +1} for orthogonal ``U: [..., 3, 3]`` (exact sign of the triple product)."""
    det = (torch.linalg.cross(U[..., 0, :], U[..., 1, :]) * U[..., 2, :]).sum(-1)
    return torch.where(det < 0, -torch.ones_like(det), torch.ones_like(det))


def _has_pseudo(reps: Reps) -> bool:
    """Whether some block needs the det(U) factor."""
    if isinstance(reps, TensorReps):
        return any(pseudo for _, _, pseudo in reps.blocks)
    return any(ir.p != (-1) ** ir.l for _, ir in reps.irreps)


@functools.lru_cache(maxsize=256)
def _rho_plan(reps: Reps) -> tuple[bool, bool, tuple[tuple[int, int, int, int, bool], ...]]:
    """``(invariant, any pseudo block, blocks)`` of ``reps`` for ``rho``, computed once per reps:
    each block ``(start, mul, copy dim, rank or l, pseudo)``; ``pseudo`` means the det(U) factor."""
    blocks: list[tuple[int, int, int, int, bool]] = []
    start = 0
    if isinstance(reps, TensorReps):
        for mul, rank, pseudo in reps.blocks:
            blocks.append((start, mul, 3**rank, rank, pseudo))
            start += mul * 3**rank
    else:
        for mul, ir in reps.irreps:  # polynomial D carries det^l; the irrep wants p^(det<0)
            blocks.append((start, mul, ir.dim, ir.l, ir.p != (-1) ** ir.l))
            start += mul * ir.dim
    return reps.is_invariant, _has_pseudo(reps), tuple(blocks)


def rho(reps: str | Reps, U: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply the block representation ``rho_reps(U_e)`` to every row: ``x: [E, dim]``, ``U: [E, 3, 3]``."""
    reps = parse_reps(reps)
    invariant, any_pseudo, blocks = _rho_plan(reps)
    if invariant:
        return x
    E = x.shape[0]
    tensor = isinstance(reps, TensorReps)
    det = orthogonal_det(U) if any_pseudo else None
    out = []
    Ds: dict[int, torch.Tensor] = {}
    for start, mul, dim, order, pseudo in blocks:
        d = mul * dim
        t = x[:, start:start + d]
        if order == 1:  # rows u_m -> U u_m, as u_m^T U^T (rank 1 and l = 1: D_1 = U)
            t = torch.bmm(t.reshape(E, mul, 3), U.transpose(1, 2)).reshape(E, d)
        elif order > 1 and tensor:
            for axis in range(order):  # U acts on every tensor index
                t = torch.einsum("eab,emcbd->emcad", U, t.reshape(E, mul, 3**axis, 3, 3 ** (order - axis - 1)))
            t = t.reshape(E, d)
        elif order > 1:
            if order not in Ds:
                Ds[order] = wigner_d(order, U)
            t = (t.reshape(E, mul, dim) @ Ds[order].transpose(1, 2)).reshape(E, d)
        if pseudo:
            assert det is not None  # set above: reps has a pseudo block
            t = t * det[:, None]
        out.append(t)
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


def rho_matrix(reps: str | Reps, U: torch.Tensor) -> torch.Tensor:
    """The matrices ``rho_reps(U_e)``: ``[E, dim, dim]``."""
    reps = parse_reps(reps)
    E = U.shape[0]
    eye = torch.eye(reps.dim, dtype=U.dtype, device=U.device).expand(E, -1, -1)
    # column k of rho is rho applied to the k-th basis vector
    cols = rho(reps, U.repeat_interleave(reps.dim, 0), eye.reshape(E * reps.dim, reps.dim))
    return cols.reshape(E, reps.dim, reps.dim).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# frames
# ---------------------------------------------------------------------------------------------
def _normalize(v: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    n = v.norm(dim=-1)
    return v / n.clamp_min(eps).unsqueeze(-1), n


def _first_index(valid: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the first True of ``valid: [N, K]`` (0 if none)."""
    return torch.argmax(valid.to(torch.int8), dim=1)


def _pick_first(valid: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row, the value at the first True of ``valid: [N, K]`` (``values: [N, K, 3]``)."""
    idx = _first_index(valid)
    return values.gather(1, idx[:, None, None].expand(-1, 1, 3)).squeeze(1)


_HAND_EPS = {torch.float64: 1e-11, torch.float32: 1e-5}
#: ``"wide"`` frames: a y candidate at a sine below this (to x) is used only if no later equivariant
#: candidate has a larger one; float32 rounding of y is ~ u / sine (1e-4 relative at 6e-4)
_SIN_WELL = {torch.float32: 1e-3}
#: multiple of u / sine(x, y) added to ``hand_eps``: the rounding of z is ~ u |x| / |x_j - x_i| / sine.
#: Larger margins leave more nodes undecided, which is certainly wrong on an asymmetric input, while
#: a decision just above the noise is almost always right (float32, measured on normals and qm9)
ROUNDING_MARGIN = 10.0


def hand_eps(dtype: torch.dtype) -> float:
    """Threshold of the ``"wide"`` handedness decisions, of the last-resort sine test and of the
    planarity test: 1e-11 in float64, 1e-5 in float32, 1e-2 below. A sign decision does not amplify
    rounding, so it may sit far below ``EPS``; it must sit well above the rounding of |<h, z>| on
    an exactly planar or mirror-symmetric input (~1e-15 in float64, ~1e-6 in float32; ill-conditioned
    frames add ``ROUNDING_MARGIN`` u / sine in ``gram_schmidt``) and below the asymmetries real data
    carries (float32-stored coordinates break symmetries at ~1e-8 relative: in float64 those still
    decide)."""
    return _HAND_EPS.get(dtype, 1e-2)


@dataclass(frozen=True)
class FrameStatus:
    """Per node: which parts of its frame are not determined equivariantly (``[N]`` bool each).

    ``x_fallback`` / ``y_fallback``: the axis came from the global axes (no equivariant candidate);
    ``undecided``: O(3) handedness not determined by any handedness vector (left as x cross y);
    ``widened``: the node's frame needed the graph-wide context (``"wide"`` handedness);
    ``weak``: y came from a candidate at a sine below ``EPS`` to x (equivariant, but rounding is
    amplified by 1 / sine: beyond 1e-10 relative in float64).
    """

    x_fallback: torch.Tensor
    y_fallback: torch.Tensor
    undecided: torch.Tensor
    widened: torch.Tensor
    weak: torch.Tensor

    @property
    def degenerate(self) -> torch.Tensor:
        return self.x_fallback | self.y_fallback | self.undecided

    def replaced(self, idx: torch.Tensor, other: FrameStatus) -> FrameStatus:
        """This status with rows ``idx`` replaced by ``other`` (every field as it is there)."""
        def put(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a.index_put((idx,), b)
        return FrameStatus(put(self.x_fallback, other.x_fallback), put(self.y_fallback, other.y_fallback),
                           put(self.undecided, other.undecided), put(self.widened, other.widened),
                           put(self.weak, other.weak))

    def merged(self, idx: torch.Tensor, other: FrameStatus) -> FrameStatus:
        """This status with rows ``idx`` replaced by ``other`` (marked widened)."""
        def put(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            a = a.clone()
            a[idx] = b
            return a
        return FrameStatus(put(self.x_fallback, other.x_fallback), put(self.y_fallback, other.y_fallback),
                           put(self.undecided, other.undecided), put(self.widened, torch.ones_like(other.widened)),
                           put(self.weak, other.weak))


def _handedness_threshold(sine: torch.Tensor, eps: float, hand_eps: float | None,
                          dtype: torch.dtype) -> float | torch.Tensor:
    """The threshold on |<h/|h|, z>| of a handedness decision (``gram_schmidt``): ``eps``, or with
    ``hand_eps`` that plus ``ROUNDING_MARGIN`` u / sine(x, y) per row (z carries y's rounding)."""
    if hand_eps is None:
        return eps
    unit = float(torch.finfo(dtype).eps) / 2
    return hand_eps + ROUNDING_MARGIN * unit / sine.detach().clamp_min(unit)


def gram_schmidt(candidates: torch.Tensor, handedness: torch.Tensor | None = None,
                 eps: float = EPS, hand_eps: float | None = None, sin_floor: float | None = None,
                 sin_well: float | None = None,
                 return_status: bool = False) -> torch.Tensor | tuple[torch.Tensor, FrameStatus]:
    """Orthonormal frames ``[N, 3, 3]`` (rows x, y, z) from candidate vectors ``[N, K, 3]``.

    x = the first candidate with norm > eps; y = the normalised part orthogonal to x of the first
    candidate with a component orthogonal to x (sine of the angle > eps; with ``sin_floor``, if no
    candidate passes, the first with sine > sin_floor: equivariant but ill-conditioned, its
    rounding grows like 1/sine; with ``sin_well`` > eps, an equivariant candidate with sine > sin_well
    is preferred to earlier ones with a smaller sine: y carries rounding ~ u / sine, 2e-3 in float32
    at sine 3e-5, which trained weights produce, v^(2) nearly parallel to v^(1)); z = x cross y.
    The global axes are appended as last-resort
    (non-equivariant) candidates, so the result is always a rotation. With ``handedness [N, H, 3]``
    (O(3) frames), z is flipped to have a positive inner product with the first handedness vector h
    with |<h/|h|, z>| > eps (no flip if none); with ``hand_eps`` the threshold is
    hand_eps + ROUNDING_MARGIN u / sine(x, y) instead (u the unit roundoff: z carries the rounding of
    y amplified by 1 / sine, and a sign decision needs a signal above it; and the decisive h with the
    largest |<h/|h|, z>| decides, ``orient(strongest=True)``). Rows are orthonormal; det is
    +1 without handedness, +-1 with it. ``return_status=True`` also returns a ``FrameStatus``
    (which rows fell back to the global axes / stayed undecided).

    Rows whose first three candidates decide x and y (|v1| > eps, and v2 or else v3 with norm > eps
    and sine to v1 > eps, and > ``sin_well`` when set: the general rule then takes x = v1 and y from
    that candidate) are computed directly; only the other rows go through the general rule
    (``_gram_schmidt_rows``), with the same result.
    """
    N, K = candidates.shape[:2]
    if K < 3:
        R, status = _gram_schmidt_rows(candidates, handedness, eps, hand_eps, sin_floor, sin_well)
        return (R, status) if return_status else R
    u, n = _normalize(candidates[:, :3], eps)
    x = u[:, 0]
    res = u[:, 1:] - (u[:, 1:] * x[:, None]).sum(-1, keepdim=True) * x[:, None]
    r, rn = _normalize(res, eps)
    # y from v2, else from v3 (v1 itself never: its residual against x = v1 / |v1| is a few u, below eps)
    thr = max(eps, sin_well or 0.0)
    ok = (n[:, 1:] > eps) & (rn > thr)
    second = ~ok[:, 0]
    y = torch.where(second[:, None], r[:, 1], r[:, 0])
    rn = torch.where(second, rn[:, 1], rn[:, 0])
    z = torch.linalg.cross(x, y)
    direct = (n[:, 0] > eps) & ok.any(1)
    undecided = torch.zeros(N, dtype=torch.bool, device=candidates.device)
    if handedness is not None:
        h_eps = _handedness_threshold(rn, eps, hand_eps, candidates.dtype)
        z, undecided = orient(z, handedness, h_eps, eps, strongest=hand_eps is not None)
    R = torch.stack([x, y, z], dim=1)
    rest = (~direct).nonzero().flatten()
    if rest.numel():
        R2, st2 = _gram_schmidt_rows(candidates[rest], None if handedness is None else handedness[rest], eps,
                                     hand_eps, sin_floor, sin_well)
        R = R.index_put((rest,), R2)
    if not return_status:
        return R
    status = FrameStatus(torch.zeros_like(undecided), torch.zeros_like(undecided), undecided,
                         torch.zeros_like(undecided), torch.zeros_like(undecided))
    return R, (status.replaced(rest, st2) if rest.numel() else status)


def _gram_schmidt_rows(candidates: torch.Tensor, handedness: torch.Tensor | None, eps: float,
                       hand_eps: float | None, sin_floor: float | None,
                       sin_well: float | None) -> tuple[torch.Tensor, FrameStatus]:
    """``gram_schmidt`` on every row by the general rule (first candidate past each test, the global
    axes as last resort), with its ``FrameStatus``."""
    N, K = candidates.shape[:2]
    axes = torch.eye(3, dtype=candidates.dtype, device=candidates.device).expand(N, 3, 3)
    cand = torch.cat([candidates, axes], dim=1)
    u, n = _normalize(cand, eps)
    ok = n > eps
    ix = _first_index(ok)
    x = u.gather(1, ix[:, None, None].expand(-1, 1, 3)).squeeze(1)
    res = u - (u * x[:, None]).sum(-1, keepdim=True) * x[:, None]
    r, rn = _normalize(res, eps)
    iy = _first_index(ok & (rn > eps))
    if sin_well is not None and sin_well > eps:
        well = ok & (rn > sin_well)
        well[:, K:] = False  # the global axes are no equivariant candidates
        iy = torch.where(well.any(1), _first_index(well), iy)
    weak = torch.zeros(N, dtype=torch.bool, device=candidates.device)
    if sin_floor is not None and sin_floor < eps:
        ill = ok & (rn > sin_floor)
        ill[:, K:] = False
        weak = (iy >= K) & ill.any(1)
        iy = torch.where(weak, _first_index(ill), iy)
    y = r.gather(1, iy[:, None, None].expand(-1, 1, 3)).squeeze(1)
    z = torch.linalg.cross(x, y)
    undecided = torch.zeros(N, dtype=torch.bool, device=candidates.device)
    if handedness is not None:
        # z inherits the rounding of y amplified by 1 / sine: demand a signal above it too
        h_eps = _handedness_threshold(rn.gather(1, iy[:, None]).squeeze(1), eps, hand_eps, candidates.dtype)
        z, undecided = orient(z, handedness, h_eps, eps, strongest=hand_eps is not None)
    R = torch.stack([x, y, z], dim=1)
    return R, FrameStatus(ix >= K, iy >= K, undecided, torch.zeros_like(undecided), weak)


def orient(z: torch.Tensor, handedness: torch.Tensor, h_eps: float | torch.Tensor,
           eps: float = EPS, strongest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z flipped to <h, z> > 0 for the first handedness vector h [N, H, 3] with
    |<h/|h|, z>| > h_eps (a number or one per row), undecided [N])``; undecided rows keep z.

    ``strongest=True``: h is instead the decisive vector with the largest |<h/|h|, z>|. Taking the
    first decisive one flips z whenever an earlier candidate whose sign disagrees with the later
    ones crosses the threshold under rounding (float32: |<h, z>| ~ h_eps on near-planar
    neighbourhoods); the strongest one changes only at a tie of two opposite signals, both far above
    the threshold when another candidate is decisive."""
    h, hn = _normalize(handedness, eps)
    s = (h * z[:, None]).sum(-1)
    thr = h_eps[:, None] if torch.is_tensor(h_eps) else h_eps
    decisive = (hn > eps) & (s.abs() > thr)
    if strongest:
        first = torch.argmax(torch.where(decisive, s.abs(), torch.full_like(s, -1.0)), dim=1)
    else:
        first = torch.argmax(decisive.to(torch.int8), dim=1)
    s_first = s.gather(1, first[:, None]).squeeze(1)
    undecided = ~decisive.any(1)
    flip = ~undecided & (s_first < 0)
    return torch.where(flip[:, None], -z, z), undecided


@dataclass(frozen=True)
class FrameContext:
    """What the ``"wide"`` fallback may use beyond a node's neighbourhood: the graph index of every
    node (``None``: one graph), the number of graphs, and equivariant node vectors ``[N, V, 3]``
    (the "1o" inputs; ``None``: none)."""

    batch: torch.Tensor | None = None
    num_graphs: int = 1
    node_vectors: torch.Tensor | None = None


def _batch_of(pos: torch.Tensor, context: FrameContext) -> torch.Tensor:
    if context.batch is not None:
        return context.batch
    return torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)


def _centred(pos: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y = x - centroid of its graph [N, 3], node counts per graph [B])."""
    counts = torch.bincount(batch, minlength=num_graphs)
    c = scatter(pos, batch, dim=0, dim_size=num_graphs, reduce="sum") / counts.clamp_min(1).to(pos.dtype)[:, None]
    return pos - c[batch], counts


def context_vectors(pos: torch.Tensor, nodes: torch.Tensor, context: FrameContext | None) -> torch.Tensor:
    """Graph-wide equivariant candidates ``[n, 5 + 2V, 3]`` for ``nodes``, from sums over node i's
    graph (y_j = x_j - c, c the graph's centroid; M = sum_j y_j y_j^T; T = sum_j |y_j|^2 y_j):
    ``-y_i = (1/N) sum_j (x_j - x_i)``, ``M y_i``, ``T``, ``M T`` and
    ``sum_j |x_j - x_i|^2 (x_j - x_i) = T - 2 M y_i - tr(M) y_i - N |y_i|^2 y_i``; then the node's own
    "1o" input vectors and their sum over its graph. Graph-level sums make it O(N) for all nodes."""
    context = context or FrameContext()
    batch = _batch_of(pos, context)
    B = context.num_graphs
    y, counts = _centred(pos, batch, B)
    M = scatter((y[:, :, None] * y[:, None, :]).reshape(-1, 9), batch, dim=0, dim_size=B,
                reduce="sum").reshape(B, 3, 3)
    T = scatter((y * y).sum(-1, keepdim=True) * y, batch, dim=0, dim_size=B, reduce="sum")
    g, yi = batch[nodes], y[nodes]
    My = (M[g] @ yi[:, :, None]).squeeze(-1)
    trace = M[g].diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    cubic = T[g] - 2 * My - trace * yi - counts[g].to(pos.dtype)[:, None] * (yi * yi).sum(-1, keepdim=True) * yi
    vecs = [torch.stack([-yi, My, T[g], (M[g] @ T[g][:, :, None]).squeeze(-1), cubic], dim=1)]
    if context.node_vectors is not None and context.node_vectors.shape[1] > 0:
        nv = context.node_vectors
        total = scatter(nv, batch, dim=0, dim_size=B, reduce="sum")
        vecs += [nv[nodes], total[g]]
    return torch.cat(vecs, dim=1)


def _votes(pos: torch.Tensor, nodes: torch.Tensor, batch: torch.Tensor, num_graphs: int,
           values: torch.Tensor) -> torch.Tensor:
    """``sum_j v_j``, ``sum_j <y_j, y_i> v_j`` and ``sum_j |x_j - x_i|^2 v_j`` over the graph of each
    of ``nodes`` (``values [N, 3]``), ``[n, 3, 3]``, from graph-level sums."""
    y, _ = _centred(pos, batch, num_graphs)
    V = scatter(values, batch, dim=0, dim_size=num_graphs, reduce="sum")
    A = scatter((values[:, :, None] * y[:, None, :]).reshape(-1, 9), batch, dim=0, dim_size=num_graphs,
                reduce="sum").reshape(num_graphs, 3, 3)
    W = scatter((y * y).sum(-1, keepdim=True) * values, batch, dim=0, dim_size=num_graphs, reduce="sum")
    g, yi = batch[nodes], y[nodes]
    Ay = (A[g] @ yi[:, :, None]).squeeze(-1)
    return torch.stack([V[g], Ay, W[g] - 2 * Ay + (yi * yi).sum(-1, keepdim=True) * V[g]], dim=1)


def finish_frames(cand: torch.Tensor, hand: torch.Tensor | None, pos: torch.Tensor, handedness: str,
                  context: FrameContext | None) -> tuple[torch.Tensor, FrameStatus]:
    """Gram-Schmidt on local candidates. With ``handedness="wide"``, for the rows whose frame is
    degenerate: (1) redo it with the graph-wide ``context_vectors`` appended to the axis candidates
    and to the handedness vectors (and accept an ill-conditioned equivariant y, sine > ``hand_eps``,
    before the global axes); (2) orient a still-undecided z by the already decided z axes of its
    graph (true vectors; ``_votes``), so that nodes on an (approximate) mirror plane
    follow the handedness the rest of the input decided. An exactly mirror-symmetric input keeps
    them undecided: the decided z of mirror partners cancel along the plane normal."""
    if handedness == "local":
        return gram_schmidt(cand, hand, return_status=True)  # type: ignore[return-value]
    context = context or FrameContext()
    h_eps = hand_eps(pos.dtype)
    well = _SIN_WELL.get(pos.dtype)
    R, status = gram_schmidt(cand, hand, hand_eps=h_eps, sin_well=well, return_status=True)  # type: ignore[misc]
    need = status.degenerate.nonzero().flatten()
    if need.numel() == 0:
        return R, status
    wide = context_vectors(pos, need, context)
    R2, st2 = gram_schmidt(torch.cat([cand[need], wide], dim=1),
                           None if hand is None else torch.cat([hand[need], wide], dim=1),
                           hand_eps=h_eps, sin_floor=h_eps, sin_well=well,
                           return_status=True)  # type: ignore[misc]
    R = R.index_put((need,), R2)
    status = status.merged(need, st2)
    und = (status.undecided & ~status.x_fallback & ~status.y_fallback).nonzero().flatten()
    if hand is None or und.numel() == 0:
        return R, status
    with torch.no_grad():  # a sign decision
        source = ~(status.undecided | status.x_fallback | status.y_fallback)
        z_dec = R[:, 2].detach() * source[:, None].to(R.dtype)
        votes = _votes(pos.detach(), und, _batch_of(pos, context), context.num_graphs, z_dec)
        z_und = R[und, 2].detach()
        oriented, still = orient(z_und, votes, h_eps, strongest=True)
        sign = (oriented * z_und).sum(-1).sign()  # -1 where the votes flip z, else +1
    z = R[:, 2].index_put((und,), R[und, 2] * sign[:, None])
    R = torch.stack([R[:, 0], R[:, 1], z], dim=1)
    undecided = status.undecided.clone()
    undecided[und] = still
    return R, FrameStatus(status.x_fallback, status.y_fallback, undecided, status.widened, status.weak)


def _certainly_not_planar(C: torch.Tensor, max_count: int, eps: float) -> torch.Tensor:
    """``[B]``: graphs that ``planar_symmetry``'s thickness test cannot call planar, certified from
    their centred second moments ``C [B, 3, 3]`` (computed in the points' dtype) alone.

    If a graph of N points passes that test (every height |<d_i, n>| <= eps R, R = max |d_i|, n the
    computed normal), then for the exact moments C* of the same centred points lambda_min(C*) <=
    N (eps + 6u)^2 tr C* (u the unit roundoff of the dtype: heights, n and R carry a few u). With
    |C - C*| <= gamma tr C* elementwise (gamma = (N + 2) u) and, for a positive definite C,
    lambda_min(C) >= det C / (lambda_1 lambda_2) >= 4 det C / (tr C)^2, the test cannot pass when

        det C / (tr C)^3 > 10 u_64 + (3 gamma + N (eps + 6u)^2) / 2

    (det in float64 from the cross product, error <= 10 u_64 (tr C)^3; the factor 1/2 covers
    1 / (4 (1 - 3 gamma)) for 3 gamma <= 1/2, beyond which nothing is certified). The bound grows
    with N, so N = ``max_count`` (the largest graph) serves every graph. A non-finite or zero C
    certifies nothing. On a genuinely three-dimensional cloud det C / (tr C)^3 is ~1e-2 (1/27 for
    an isotropic one), far above the bound (~2e-15 for n-body in float64, ~1e-5 for 128 float32
    points)."""
    u = torch.finfo(C.dtype).eps / 2
    gamma = (max_count + 2) * u
    if 3 * gamma > 0.5:
        return torch.zeros(C.shape[0], dtype=torch.bool, device=C.device)
    bound = 10 * torch.finfo(torch.float64).eps / 2 + (3 * gamma + max_count * (eps + 6 * u) ** 2) / 2
    Cd = C.double()
    tr = Cd.diagonal(dim1=-2, dim2=-1).sum(-1)
    det = (torch.linalg.cross(Cd[:, 0], Cd[:, 1]) * Cd[:, 2]).sum(-1)
    return det > bound * tr**3


def planar_symmetry(pos: torch.Tensor, batch: torch.Tensor, num_graphs: int,
                    fields: Sequence[tuple[Reps, torch.Tensor, torch.Tensor]] = (),
                    centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Graphs whose input is symmetric under the reflection through a plane containing all its
    points: ``(planar [B] bool, normal [B, 3])``.

    A graph qualifies when its points are planar (every height over the plane of the two largest
    principal axes <= ``hand_eps`` times the largest distance from the centroid; not collinear; at
    least three points) and every typed field ``(reps, values [M, dim],
    graph index [M])`` is fixed by the reflection sigma = I - 2 n n^T (|rho(sigma) f - f| <=
    hand_eps (|f| + 1) elementwise). Then no equivariant vector has a component along n: any
    handedness "decided" there is rounding noise. Computed without gradient (a decision). When
    the second moments certify that no graph of the batch can pass the thickness test
    (``_certainly_not_planar``: the usual case) the eigen-decomposition and heights are skipped and
    ``normal`` is zeros; otherwise it is the smallest-variance axis of every graph (used where
    ``planar``). ``centre``: the graphs' centroids ``[B, 3]`` if the caller has them."""
    with torch.no_grad():
        B = num_graphs
        eps = hand_eps(pos.dtype)
        x = pos.detach()
        counts = torch.bincount(batch, minlength=B)
        if centre is None:
            c = scatter(x, batch, dim=0, dim_size=B, reduce="sum") / counts.clamp_min(1).to(x.dtype)[:, None]
        else:
            c = centre.detach()
        d = x - c[batch]
        C = scatter((d[:, :, None] * d[:, None, :]).reshape(-1, 9), batch, dim=0, dim_size=B,
                    reduce="sum").reshape(B, 3, 3)
        if B == 0 or bool(_certainly_not_planar(C, int(counts.max()), eps).all()):  # usual: no eigh, no heights
            return torch.zeros(B, dtype=torch.bool, device=x.device), x.new_zeros(B, 3)
        evals, evecs = torch.linalg.eigh(torch.nan_to_num(C.double()))
        normal = evecs[..., 0].to(x.dtype)
        # thickness from the heights over the plane (eigenvalues carry rounding ~ u lambda_max)
        height = scatter((d * normal[batch]).sum(-1).abs(), batch, dim=0, dim_size=B, reduce="max")
        radius = scatter(d.norm(dim=-1), batch, dim=0, dim_size=B, reduce="max")
        planar = (height <= eps * radius) & (evals[:, 1] > 1e-6 * evals[:, 2]) & (counts >= 3)
        if planar.any():
            sigma = torch.eye(3, dtype=x.dtype, device=x.device) - 2 * normal[:, :, None] * normal[:, None, :]
            for reps, values, index in fields:
                if reps.is_invariant or values.numel() == 0:
                    continue
                v = values.detach()
                gap = (rho(reps, sigma[index], v) - v).abs() - eps * (v.abs() + 1)
                broken = scatter((gap > 0).any(-1).to(x.dtype), index, dim=0, dim_size=B, reduce="sum") > 0
                planar = planar & ~broken
    return planar, normal


def edge_vectors(pos: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """``x_j - x_i`` ``[E, 3]`` for edges (j -> i) (``edge_index[:, e] = (j, i)``)."""
    src, dst = edge_index
    return pos.index_select(0, src) - pos.index_select(0, dst)


def unit_edges(pos: torch.Tensor, edge_index: torch.Tensor,
                vec: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit vectors (x_j - x_i)/r_ij [E, 3], regularised lengths r_ij [E]) for edges (j -> i);
    ``vec``: ``edge_vectors(pos, edge_index)`` if the caller has it."""
    vec = edge_vectors(pos, edge_index) if vec is None else vec
    r = ((vec * vec).sum(-1) + DELTA**2).sqrt()
    return vec / r[:, None], r


def gaussian_rbf(r: torch.Tensor, centers: torch.Tensor, gamma: float) -> torch.Tensor:
    """Gaussian radial basis ``exp(-gamma (r - c_k)^2)`` ``[E, K]`` of lengths ``r [E]``.

    The exponent is clamped at log(tiny / eps) of the dtype, so values below 2^-103 ~ 1e-31
    (float32; ~1e-292 in float64) read as that floor: they lie far below the rounding of any sum
    with O(1) terms they enter, and computing them costs a subnormal slow path in ``exp`` and in
    every later product with them (measured on the CPU: exp 28x, a matmul on such a feature 5x
    slower; the centres up to 5 at gamma 5.12 put exponents down to -128 on n-body and normals,
    and the float32 subnormal range starts at -87). The floor also keeps products with weights
    down to ~1e-7 normal."""
    info = torch.finfo(r.dtype)
    e = -gamma * (r[:, None] - centers.to(r.dtype)) ** 2
    return torch.exp(e.clamp_min(math.log(info.tiny / info.eps)))


def envelope(r: torch.Tensor, cutoff: float | None, p: int = 6) -> torch.Tensor:
    """Smooth polynomial envelope (1 at 0, C^2-zero at ``cutoff``); 1 everywhere without cutoff."""
    if cutoff is None:
        return torch.ones_like(r)
    x = (r / cutoff).clamp(max=1.0)
    env = (1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2))
    return env * (r < cutoff)


def sum_to(x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``out[k] = sum_{e: index_e = k} x_e``, ``[size, ...]``, as one ``index_add``."""
    return x.new_zeros((size, *x.shape[1:])).index_add_(0, index, x)


def _check_handedness(handedness: str) -> str:
    if handedness not in HANDEDNESS:
        raise ValueError(f"handedness must be one of {HANDEDNESS}, got {handedness!r}")
    return handedness


class LearnedFrames(nn.Module):
    """Tensor-frames local frames: ``v_i^(k) = sum_j w^(k)(s_ij) env(r_ij) u_ij``, Gram-Schmidt.

    ``s_ij`` = [Gaussian radial basis of r_ij, node invariants of i and j, edge invariants].
    Three learned vectors (O(3), third = handedness) or two (``so3=True``: SO(3) frames).
    The summed unit neighbour direction ``sum_j env u_ij`` is an equivariant fallback candidate;
    with ``handedness="wide"`` degenerate rows also get the graph-wide candidates of
    ``context_vectors`` (module docstring). ``forward`` returns the frames, ``compute`` also the
    ``FrameStatus``.
    """

    centers: torch.Tensor  # buffer

    def __init__(self, node_dim: int, edge_dim: int, so3: bool = False, hidden: int = 32,
                 n_rbf: int = 16, r_max: float = 5.0, cutoff: float | None = None,
                 handedness: str = "local") -> None:
        super().__init__()
        self.so3, self.cutoff, self.n_vec = so3, cutoff, 2 if so3 else 3
        self.handedness = _check_handedness(handedness)
        self.register_buffer("centers", torch.linspace(0.0, r_max, n_rbf), persistent=False)
        self.gamma = (n_rbf / r_max) ** 2 / 2
        self.mlp = mlp([n_rbf + 2 * node_dim + edge_dim, hidden, hidden, self.n_vec])

    def compute(self, pos: torch.Tensor, edge_index: torch.Tensor, node_inv: torch.Tensor,
                edge_inv: torch.Tensor, context: FrameContext | None = None, *,
                edges: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, FrameStatus]:
        """``(frames [N, 3, 3], FrameStatus)``; ``edges``: ``unit_edges(pos, edge_index)`` if the
        caller has it."""
        src, dst = edge_index
        u, r = unit_edges(pos, edge_index) if edges is None else edges
        parts = [gaussian_rbf(r, self.centers, self.gamma)]
        if node_inv.shape[1]:
            parts += [node_inv.index_select(0, dst), node_inv.index_select(0, src)]
        if edge_inv.shape[1]:
            parts.append(edge_inv)
        w = run_mlp(self.mlp, torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])
        eu = u if self.cutoff is None else envelope(r, self.cutoff)[:, None] * u
        # the learned vectors and the summed unit direction (weight 1) in one sum over neighbours
        w1 = torch.cat([w, torch.ones_like(w[:, :1])], dim=-1)
        sums = sum_to(w1[:, :, None] * eu[:, None, :], dst, pos.shape[0])  # [N, n_vec + 1, 3]
        cand = sums[:, :3] if self.so3 else sums[:, [0, 1, 3]]
        hand = None if self.so3 else sums[:, 2:]
        return finish_frames(cand, hand, pos, self.handedness, context)

    def forward(self, pos: torch.Tensor, edge_index: torch.Tensor, node_inv: torch.Tensor,
                edge_inv: torch.Tensor, context: FrameContext | None = None) -> torch.Tensor:
        return self.compute(pos, edge_index, node_inv, edge_inv, context)[0]


class NearestFrames(nn.Module):
    """Fixed frames: ``v^(k) = x_{j_k} - x_i`` for the k-th nearest neighbour (k = 1, 2, 3; the
    third only for handedness); ties in distance are broken by edge order (not equivariant).
    ``handedness`` as for ``LearnedFrames``."""

    def __init__(self, so3: bool = False, handedness: str = "local") -> None:
        super().__init__()
        self.so3 = so3
        self.handedness = _check_handedness(handedness)

    def compute(self, pos: torch.Tensor, edge_index: torch.Tensor, node_inv: torch.Tensor | None = None,
                edge_inv: torch.Tensor | None = None, context: FrameContext | None = None, *,
                edges: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, FrameStatus]:
        """``(frames [N, 3, 3], FrameStatus)``; ``edges``: ``unit_edges(pos, edge_index)`` if the
        caller has it."""
        src, dst = edge_index
        N, E = pos.shape[0], src.numel()
        vec = edge_vectors(pos, edge_index)
        u, r = unit_edges(pos, edge_index, vec) if edges is None else edges
        order = torch.argsort(r, stable=True)
        order = order[torch.argsort(dst[order], stable=True)]  # grouped by receiver, nearest first
        deg = torch.bincount(dst, minlength=N)
        rank = torch.arange(E, device=pos.device) - (torch.cumsum(deg, 0) - deg)[dst[order]]
        slot = torch.full((N, 3), E, dtype=torch.long, device=pos.device)  # E -> a zero row
        keep = rank < 3
        slot[dst[order[keep]], rank[keep]] = order[keep]
        near = torch.cat([vec, vec.new_zeros(1, 3)])[slot]  # [N, 3, 3]: k-th nearest x_j - x_i
        mean_dir = scatter(u, dst, dim=0, dim_size=N, reduce="sum")[:, None]
        cand = torch.cat([near[:, :2], mean_dir], dim=1)
        hand = None if self.so3 else torch.cat([near[:, 2:3], mean_dir], dim=1)
        return finish_frames(cand, hand, pos, self.handedness, context)

    def forward(self, pos: torch.Tensor, edge_index: torch.Tensor, node_inv: torch.Tensor | None = None,
                edge_inv: torch.Tensor | None = None, context: FrameContext | None = None) -> torch.Tensor:
        return self.compute(pos, edge_index, node_inv, edge_inv, context)[0]


# ---------------------------------------------------------------------------------------------
# hooks: any MessagePassing layer -> frame-equivariant
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArgRep:
    """Declared representation of a ``message`` argument and the frame it is expressed in."""

    reps: Reps
    frame: str = "local"  # "local" (own node's frame) | "global"

    @staticmethod
    def make(spec: Any) -> ArgRep:
        if isinstance(spec, ArgRep):
            return spec
        reps, frame = (spec, "local") if not isinstance(spec, tuple) else spec
        if frame not in ("local", "global"):
            raise ValueError(f"frame must be 'local' or 'global', got {frame!r}")
        return ArgRep(parse_reps(reps), frame)


@dataclass(frozen=True)
class EdgeFrames:
    """Per-edge frame data for one ``edge_index``: ``R_i`` (receiver frames) and
    ``U = R_i R_j^T``; compute once with ``edge_frames`` and pass as ``lframes=`` to every layer
    that uses the same edges."""

    R_i: torch.Tensor  # [E, 3, 3]
    U: torch.Tensor  # [E, 3, 3]
    flow: str = "source_to_target"


def edge_frames(frames: torch.Tensor, edge_index: torch.Tensor, flow: str = "source_to_target") -> EdgeFrames:
    """``EdgeFrames`` for node frames ``[N, 3, 3]`` on ``edge_index`` (PyG's ``_i``/``_j`` convention)."""
    i, j = (edge_index[1], edge_index[0]) if flow == "source_to_target" else (edge_index[0], edge_index[1])
    R_i = frames[i]
    return EdgeFrames(R_i, R_i @ frames[j].transpose(1, 2), flow)


class _PropagatePreHook:
    """Takes the frames (``lframes=`` or ``set_frames``: node frames or precomputed ``EdgeFrames``)
    and caches R_i, U_ij = R_i R_j^T per edge for the message hook."""

    def __call__(self, module: MessagePassing, inputs: tuple) -> tuple:
        edge_index, size, kwargs = inputs
        frames = kwargs.pop("lframes", None)
        if frames is None:
            frames = getattr(module, "_tf_frames", None)
        if frames is None:
            raise RuntimeError(f"{type(module).__name__} has tensor-frame hooks but got no frames: "
                               "pass propagate(..., lframes=R) or use set_frames(layer, R)")
        if not torch.is_tensor(edge_index) or edge_index.layout != torch.strided:
            raise TypeError("tensor-frame hooks need a dense edge_index [2, E]")
        if module.decomposed_layers != 1:
            raise ValueError("tensor-frame hooks need decomposed_layers == 1")
        if isinstance(frames, EdgeFrames):
            if frames.U.shape[0] != edge_index.shape[1] or frames.flow != module.flow:
                raise ValueError(f"EdgeFrames for {frames.U.shape[0]} edges ({frames.flow}) given to a layer "
                                 f"propagating over {edge_index.shape[1]} edges ({module.flow}); pass node frames")
        else:
            frames = edge_frames(frames, edge_index, module.flow)
        module._tf_cache = (frames.R_i, frames.U)
        return edge_index, size, kwargs


class _MessagePreHook:
    """Moves declared arguments into frame i before ``message`` (see module docstring)."""

    def __init__(self, args: dict[str, ArgRep]) -> None:
        self.args = args

    def __call__(self, module: MessagePassing, inputs: tuple) -> dict:
        (kwargs,) = inputs
        R_i, U = module._tf_cache
        with region("equibench.to_frame"):  # the profiler's label for moving features between frames
            for name, arg in self.args.items():
                if arg.reps.is_invariant:
                    continue
                if arg.frame == "local":
                    if (key := f"{name}_j") in kwargs:
                        kwargs[key] = rho(arg.reps, U, kwargs[key])
                else:
                    for key in (name, f"{name}_i", f"{name}_j"):
                        if key in kwargs:
                            kwargs[key] = rho(arg.reps, R_i, kwargs[key])
        return kwargs


class _PropagateHook:
    """Drops the per-edge cache after ``propagate``."""

    def __call__(self, module: MessagePassing, inputs: tuple, out: Any) -> None:
        module._tf_cache = None


def attach_tensor_frames(layer: MessagePassing, args: dict[str, Any]) -> MessagePassing:
    """Make ``layer`` (an instance; its class is untouched) frame-equivariant via PyG hooks.

    ``args`` maps ``message`` argument base names to a representation (``"16x0n+8x1n"``,
    ``"1o"``, ...) or ``(representation, "local"|"global")``. Returns ``layer``; the hook
    handles are kept in ``layer._tf_handles``.
    """
    if not isinstance(layer, MessagePassing):
        raise TypeError(f"expected a torch_geometric MessagePassing layer, got {type(layer).__name__}")
    declared = {name: ArgRep.make(spec) for name, spec in args.items()}
    layer._tf_args = declared
    layer._tf_frames = None
    layer._tf_cache = None
    layer._tf_handles = [
        layer.register_propagate_forward_pre_hook(_PropagatePreHook()),
        layer.register_message_forward_pre_hook(_MessagePreHook(declared)),
        layer.register_propagate_forward_hook(_PropagateHook()),
    ]
    return layer


def set_frames(layer: MessagePassing, frames: torch.Tensor | None) -> None:
    """Frames used by ``layer``'s hooks when ``propagate`` is not given ``lframes=``."""
    layer._tf_frames = frames


class FrameWrapped(nn.Module):
    """A stock layer with tensor-frame hooks: ``FrameWrapped(EdgeConv(...), {"x": ("1o",
    "global")})(x, edge_index, lframes=R)`` calls the layer unchanged, frames passed by the hook."""

    def __init__(self, layer: MessagePassing, args: dict[str, Any]) -> None:
        super().__init__()
        self.layer = attach_tensor_frames(layer, args)

    def forward(self, *args: Any, lframes: torch.Tensor, **kwargs: Any) -> Any:
        set_frames(self.layer, lframes)
        try:
            return self.layer(*args, **kwargs)
        finally:
            set_frames(self.layer, None)


__all__ = ["TensorReps", "IrrepsReps", "parse_reps", "scale_reps", "default_hidden_reps", "rho",
           "rho_matrix", "wigner_d", "gram_schmidt", "LearnedFrames", "NearestFrames", "envelope", "gaussian_rbf",
           "edge_vectors", "unit_edges", "sum_to",
           "HANDEDNESS", "FrameStatus", "FrameContext", "context_vectors", "finish_frames", "hand_eps", "orient",
           "planar_symmetry",
           "ArgRep", "EdgeFrames", "edge_frames", "attach_tensor_frames", "set_frames", "FrameWrapped"]
