"""Shared helpers of the frame-based wrappers (frame averaging, PCA / learned canonicalisation).

A *frame* of graph b is an orthogonal matrix ``F_b`` (columns = axes) and an origin ``t_b``. The
framed input is ``g_b . X`` with ``g_b = (F_b^T, -F_b^T t_b)``: points ``F^T (x - t)``, irreps
fields ``D(F^T) v``, invariant fields unchanged; a prediction y made in the frame is mapped back
with ``g_b^{-1} = (F_b, t_b)``: ``F y + t`` for points, ``D(F) y`` for irreps outputs.

PCA frames: ``t`` = centroid of the first point field, ``C = sum_i (x_i - t)(x_i - t)^T``,
``C = V diag(lambda) V^T`` (``torch.linalg.eigh`` in float64, *no gradient*, columns sorted by
decreasing eigenvalue). Under x -> Qx + s (Q in O(3)): t -> Qt + s, C -> Q C Q^T and, for distinct
eigenvalues, V -> Q V S with an unknown sign matrix S; hence the *set* {V diag(s)} of the 8 sign
flips is O(3)-equivariant, and {[s1 v1, s2 v2, s1 v1 x s2 v2]} (4 frames, det +1) is
SO(3)-equivariant. Ties in lambda make V ill-defined (the benchmark's degeneracy test); eigh
stays finite there, and the no-gradient frame avoids eigh's 1/(lambda_i - lambda_j) gradients.
``pca_degeneracy`` flags, per graph, near-ties (relative gap < ``GAP_TOL``: float64 eigenvectors
then move by more than ~1e-10 under a rotation) and third moments whose sign is below their
rounding (the sign rule of ``pca_frame`` is then arbitrary): the inputs where a single PCA frame
cannot be equivariant, reported by the methods as a share of test graphs.
"""
from __future__ import annotations

import functools
import itertools

import torch
from torch_geometric.data import Batch
from torch_geometric.utils import scatter

from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import representation
from ...symmetry.group3d import GroupElement, act_on_batch, act_on_output

__all__ = ["FRAME_GROUPS", "FrameElement", "apply_in_frame", "centroid", "check_group", "covariance",
           "exact_rep", "first_point_field", "frame_set", "frame_support", "gram_schmidt", "into_frame", "out_of_frame",
           "pca_degeneracy", "pca_frame", "principal_axes", "replicate", "skew_signs", "GAP_TOL", "SKEW_MARGIN"]

FRAME_GROUPS = ("O3", "SO3")
_EPS = 1e-12
#: relative eigenvalue gap (lambda_k - lambda_{k+1}) / lambda_1 below which a PCA frame counts as
#: tied: float64 eigenvectors then move by up to u / gap ~ 1e-10 under a rotation of the input
GAP_TOL = 1e-6
#: a third moment within this many times its rounding error of zero has an undefined sign
SKEW_MARGIN = 30.0


def check_group(group: str) -> str:
    if group not in FRAME_GROUPS:
        raise ValueError(f"group must be one of {FRAME_GROUPS}, got {group!r}")
    return group


# ---- representations that are exact for l <= 1 -----------------------------------------------
#: kept as a name for this module's users; the suite's ``representation`` is exact for l <= 1
exact_rep = representation


FrameElement = GroupElement  # representations are exact for l <= 1 in ``representation``


def into_frame(F: torch.Tensor, t: torch.Tensor) -> FrameElement:
    """``g = (F^T, -F^T t)``: world -> frame coordinates (``F: [B, 3, 3]`` columns = axes)."""
    Ft = F.transpose(-1, -2)
    return FrameElement(Ft, -(Ft @ t.unsqueeze(-1)).squeeze(-1))


def out_of_frame(F: torch.Tensor, t: torch.Tensor) -> FrameElement:
    """``g^{-1} = (F, t)``: frame -> world coordinates."""
    return FrameElement(F, t)


# ---- PCA --------------------------------------------------------------------------------------
def centroid(pos: torch.Tensor, index: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """Mean of each graph's points, ``[B, 3]``."""
    return scatter(pos, index, dim=0, dim_size=num_graphs, reduce="mean")


def covariance(pos: torch.Tensor, t: torch.Tensor, index: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """``C_b = sum_{i in b} (x_i - t_b)(x_i - t_b)^T``, ``[B, 3, 3]``."""
    c = pos - t[index]
    outer = c.unsqueeze(-1) * c.unsqueeze(-2)
    return scatter(outer.reshape(-1, 9), index, dim=0, dim_size=num_graphs, reduce="sum").reshape(-1, 3, 3)


@torch.no_grad()
def principal_axes(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``[B, 3]`` (decreasing) and eigenvectors ``[B, 3, 3]`` (columns) of ``cov``.

    Computed in float64 without gradient; non-finite entries are zeroed first so that eigh
    never fails (the prediction of such a graph is non-finite anyway). Exact ties and a zero
    matrix give *some* orthonormal basis (finite, not equivariant).
    """
    c = torch.nan_to_num(cov.detach().double(), nan=0.0, posinf=0.0, neginf=0.0)
    c = 0.5 * (c + c.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(c)
    return evals.flip(-1).to(cov.dtype), evecs.flip(-1).to(cov.dtype)


@functools.lru_cache(maxsize=4)
def _sign_table(group: str) -> tuple[tuple[float, ...], ...]:
    n = 3 if group == "O3" else 2
    return tuple(itertools.product((1.0, -1.0), repeat=n))


def frame_set(V: torch.Tensor, group: str) -> torch.Tensor:
    """All sign-flipped frames ``[B, K, 3, 3]``: K = 8 for "O3" (``V diag(s)``), K = 4 for "SO3"
    (``[s1 v1, s2 v2, s1 v1 x s2 v2]``, det +1). Frame 0 is V itself (resp. its proper version)."""
    signs = torch.tensor(_sign_table(check_group(group)), dtype=V.dtype, device=V.device)
    if group == "O3":
        return V.unsqueeze(1) * signs[None, :, None, :]
    a = V[:, None, :, 0] * signs[None, :, 0, None]
    b = V[:, None, :, 1] * signs[None, :, 1, None]
    return torch.stack([a, b, torch.linalg.cross(a, b)], dim=-1)


def skew_signs(pos: torch.Tensor, t: torch.Tensor, V: torch.Tensor, index: torch.Tensor,
               num_graphs: int) -> torch.Tensor:
    """``s_k = sign(sum_i <x_i - t, v_k>^3)`` per graph and axis, ``[B, 3]``; a zero third
    moment (symmetric input: the rule is ill-defined there) gives +1, so it stays finite."""
    proj = torch.einsum("nd,ndk->nk", (pos - t[index]).detach(), V[index])
    m3 = scatter(proj**3, index, dim=0, dim_size=num_graphs, reduce="sum")
    return torch.where(m3 >= 0, torch.ones_like(m3), -torch.ones_like(m3))


@torch.no_grad()
def pca_degeneracy(pos: torch.Tensor, index: torch.Tensor, num_graphs: int,
                   group: str = "O3") -> dict[str, torch.Tensor]:
    """Which graphs' PCA frames are undefined or ill-conditioned, ``[B]`` bool each.

    * ``"tie"``: two covariance eigenvalues (near-)tied, ``min_k (lambda_k - lambda_{k+1}) / lambda_1
      < GAP_TOL`` (symmetric tops such as NH3 or CH4, isotropic clouds; all points coincident);
      the eigenvectors in a tied eigenspace are arbitrary, so no frame rule is equivariant there.
    * ``"sign"``: a third moment ``m_k = sum_i <x_i - t, v_k>^3`` used by the sign rule (axes 1-3
      for "O3", 1-2 for "SO3") is zero within ``SKEW_MARGIN`` times its rounding error
      ``3 delta sum_i <x_i - t, v_k>^2``, ``delta = u R (1 + lambda_1 / gap)`` (u the float64 unit
      roundoff, R the largest |x_i - t|): mirror-symmetric inputs, and the normal axis of an
      exactly planar input. ``skew_signs`` then picks +1, which is finite but not equivariant.
    * ``"degenerate"``: either.

    For frame averaging only ``"tie"`` matters (it averages over every sign). Computed in float64
    without gradient, like ``pca_frame``.
    """
    check_group(group)
    x = pos.detach().double()
    t = centroid(x, index, num_graphs)
    evals, V = principal_axes(covariance(x, t, index, num_graphs))
    lam1 = evals[:, 0].clamp_min(0)
    gaps = (evals[:, :-1] - evals[:, 1:]).clamp_min(0)
    tiny = torch.finfo(torch.float64).tiny
    tie = (gaps.min(-1).values <= GAP_TOL * lam1) | (lam1 <= tiny)
    proj = torch.einsum("nd,ndk->nk", x - t[index], V[index])
    m3 = scatter(proj**3, index, dim=0, dim_size=num_graphs, reduce="sum")
    m2 = scatter(proj**2, index, dim=0, dim_size=num_graphs, reduce="sum")
    R = scatter((x - t[index]).norm(dim=-1), index, dim=0, dim_size=num_graphs, reduce="max")
    u = torch.finfo(torch.float64).eps / 2
    delta = u * R * (1 + lam1 / gaps.min(-1).values.clamp_min(tiny))
    undefined = m3.abs() <= SKEW_MARGIN * 3 * delta[:, None] * m2
    sign = undefined[:, :3 if group == "O3" else 2].any(-1)
    return {"tie": tie, "sign": sign, "degenerate": tie | sign}


def pca_frame(pos: torch.Tensor, index: torch.Tensor, num_graphs: int,
              group: str = "O3") -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic PCA frame per graph: ``(F [B, 3, 3], t [B, 3])``.

    Axes by decreasing variance, each oriented so the third moment of the projections is
    positive; "SO3" takes the third axis as the cross product of the first two (det +1).
    """
    t = centroid(pos, index, num_graphs)
    _, V = principal_axes(covariance(pos, t, index, num_graphs))
    s = skew_signs(pos, t, V, index, num_graphs)
    F = V * s[:, None, :]
    if check_group(group) == "SO3":
        F = torch.stack([F[..., 0], F[..., 1], torch.linalg.cross(F[..., 0], F[..., 1])], dim=-1)
    return F.detach(), t


# ---- Gram-Schmidt for learned frames ----------------------------------------------------------
def _safe_normalize(u: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    n2 = (u * u).sum(-1, keepdim=True)
    ok = n2 > _EPS**2
    u_n = u / n2.clamp_min(_EPS**2).sqrt()
    return torch.where(ok, u_n, fallback)


def _least_aligned_axis(e: torch.Tensor) -> torch.Tensor:
    """The standard basis vector least aligned with ``e`` (a fallback direction)."""
    idx = e.abs().argmin(-1)
    return torch.nn.functional.one_hot(idx, 3).to(e.dtype)


def gram_schmidt(u: torch.Tensor, group: str = "O3") -> torch.Tensor:
    """Frames ``[B, 3, 3]`` (columns e1, e2, e3) from three vectors ``u: [B, 3, 3]`` (u[:, k]).

    e1 = u1/|u1|, e2 = normalised u2 - <u2, e1> e1, e3 = e1 x e2; for "O3" e3 is multiplied by
    sign(<u3, e1 x e2>), which makes u -> F O(3)-equivariant (F(Qu) = Q F(u), det F = +-1);
    "SO3" keeps det F = +1 and ignores u3. Zero / parallel vectors fall back to fixed axes so F
    stays orthogonal and finite (not equivariant at that degeneracy).
    """
    u1, u2, u3 = u[:, 0], u[:, 1], u[:, 2]
    ex = torch.zeros_like(u1)
    ex[:, 0] = 1.0
    e1 = _safe_normalize(u1, ex)
    w = u2 - (u2 * e1).sum(-1, keepdim=True) * e1
    fb = _least_aligned_axis(e1)
    fb = fb - (fb * e1).sum(-1, keepdim=True) * e1
    fb = fb / fb.norm(dim=-1, keepdim=True)
    e2 = _safe_normalize(w, fb)
    e3 = torch.linalg.cross(e1, e2)
    if check_group(group) == "O3":
        s = (u3 * e3).sum(-1, keepdim=True)
        e3 = torch.where(s >= 0, e3, -e3)
    return torch.stack([e1, e2, e3], dim=-1)


# ---- batch replication ------------------------------------------------------------------------
def replicate(batch: Batch, spec: TaskSpec, copies: int) -> Batch:
    """A batch of ``copies`` stacked copies of ``batch`` (copy-major: graph ``k * B + b`` is copy k
    of graph b), holding the typed node/edge fields, ``edge_index`` and ``batch`` only."""
    N, B = batch.num_nodes, int(batch.num_graphs)
    new = Batch()
    for name in spec.inputs:
        new[name] = torch.cat([batch[name]] * copies, dim=0)
    for name in spec.edge_inputs:
        new[name] = torch.cat([batch[name]] * copies, dim=0)
    k = torch.arange(copies, device=batch.edge_index.device)
    new.edge_index = (batch.edge_index.unsqueeze(0) + (k * N)[:, None, None]).permute(1, 0, 2).reshape(2, -1)
    new.batch = (batch.batch.unsqueeze(0) + (k * B)[:, None]).reshape(-1)
    new._num_graphs = copies * B
    return new


def first_point_field(spec: TaskSpec) -> str | None:
    points = spec.point_fields
    return points[0] if points else None


def frame_support(spec: TaskSpec) -> str | None:
    """Reason a PCA/learned-frame wrapper cannot run ``spec`` (None if it can)."""
    if spec.domain != "graph3d":
        return f"frame methods need a graph3d task, got {spec.domain!r}"
    if not spec.point_fields:
        return "frame methods need a 'point' input field to build frames from"
    return None




def apply_in_frame(backbone: torch.nn.Module, batch: Batch, spec: TaskSpec, F: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """``rho_out(F, t) . backbone((F^T, -F^T t) . X)``: run ``backbone`` on the canonical input
    (points ``F^T (x - t)``, irreps ``D(F^T) v``) and map its prediction back to the world frame."""
    out = backbone(act_on_batch(batch, spec, into_frame(F, t), target=False))
    return act_on_output(out, spec, out_of_frame(F, t), batch)
