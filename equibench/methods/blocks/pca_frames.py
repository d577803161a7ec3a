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

import copy
import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch_geometric.data import Batch
from torch_geometric.utils import scatter

from ...core.errors import UserError
from ...core.spec import TaskSpec
from ...metrics.profile import REGIONS as PROFILE_LABELS
from ...metrics.profile import region
from ...symmetry.fieldtypes import POINT, is_invariant, representation
from ...symmetry.group3d import GroupElement, act_on_batch, act_on_output

__all__ = ["FRAME_GROUPS", "FrameElement", "apply_in_frame", "centroid", "check_group", "covariance",
           "exact_rep", "first_point_field", "frame_set", "frame_support", "gram_schmidt", "into_frame", "out_of_frame",
           "pca_degeneracy", "pca_frame", "principal_axes", "replicate", "skew_signs", "GAP_TOL", "SKEW_MARGIN",
           "DEGENERATE_MODES", "FrameList", "average_in_frames", "candidate_vectors", "check_degenerate",
           "gather_graphs", "stabiliser_projection", "symmetric_frames", "region", "framed_batch",
           "output_from_frame", "REGIONS", "pca_axes", "proper_base", "frame_signs",
           "sign_frames_supported", "sign_framed_copies", "average_sign_frames", "copies_per_call",
           "CPU_EDGES_PER_CALL", "sum_per_graph", "PCABasis", "pca_basis", "third_moment_signs",
           "framed_coordinates", "sign_framed_chunks"]

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


#: the profiler labels of the frame wrappers (``metrics.profile``, which reads them): frame /
#: canonicalisation construction, calls of the shared backbone, mapping into / out of frames
REGIONS = tuple(PROFILE_LABELS)


# ---- PCA --------------------------------------------------------------------------------------
def sum_per_graph(x: torch.Tensor, index: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """``out[b] = sum_{i: index_i = b} x_i`` for b < ``num_graphs`` (per graph, or per node for edge
    messages), ``[num_graphs, ...]``, as one ``index_add``."""
    return x.new_zeros((num_graphs, *x.shape[1:])).index_add_(0, index, x)


def centroid(pos: torch.Tensor, index: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """Mean of each graph's points, ``[B, 3]`` (an empty graph gives 0)."""
    count = torch.bincount(index, minlength=num_graphs).clamp_min(1).to(pos.dtype)
    return sum_per_graph(pos, index, num_graphs) / count.unsqueeze(-1)


def covariance(pos: torch.Tensor, t: torch.Tensor, index: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """``C_b = sum_{i in b} (x_i - t_b)(x_i - t_b)^T``, ``[B, 3, 3]`` (exactly symmetric)."""
    c = pos - t.index_select(0, index)
    return sum_per_graph(c.unsqueeze(-1) * c.unsqueeze(-2), index, num_graphs)


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


def frame_signs(group: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[K, 3]``: the sign vectors sigma_k of the frame set, ``frame_set(V)[:, k] = W diag(sigma_k)``
    with W = V ("O3", K = 8) or W = [v1, v2, v1 x v2] ("SO3", K = 4, sigma_k = (s1, s2, s1 s2))."""
    table = torch.tensor(_sign_table(check_group(group)), dtype=dtype, device=device)
    if group == "SO3":
        table = torch.cat([table, table[:, :1] * table[:, 1:]], dim=-1)
    return table


def proper_base(V: torch.Tensor, group: str) -> torch.Tensor:
    """W of ``frame_signs``: V for "O3", ``[v1, v2, v1 x v2]`` for "SO3"."""
    if check_group(group) == "O3":
        return V
    return torch.stack([V[..., 0], V[..., 1], torch.linalg.cross(V[..., 0], V[..., 1])], dim=-1)


def frame_set(V: torch.Tensor, group: str) -> torch.Tensor:
    """All sign-flipped frames ``[B, K, 3, 3]``: K = 8 for "O3" (``V diag(s)``), K = 4 for "SO3"
    (``[s1 v1, s2 v2, s1 v1 x s2 v2]``, det +1). Frame 0 is V itself (resp. its proper version)."""
    signs = torch.tensor(_sign_table(check_group(group)), dtype=V.dtype, device=V.device)
    if group == "O3":
        return V.unsqueeze(1) * signs[None, :, None, :]
    a = V[:, None, :, 0] * signs[None, :, 0, None]
    b = V[:, None, :, 1] * signs[None, :, 1, None]
    return torch.stack([a, b, torch.linalg.cross(a, b)], dim=-1)


def _project(c: torch.Tensor, Vn: torch.Tensor) -> torch.Tensor:
    """``[N, 3]`` rows ``c_i^T V_i`` (the coordinates of c_i along the columns of ``Vn [N, 3, 3]``;
    ``torch.bmm``, which ``@`` dispatches to, called directly)."""
    return torch.bmm(c.unsqueeze(-2), Vn).squeeze(-2)


def skew_signs(pos: torch.Tensor, t: torch.Tensor, V: torch.Tensor, index: torch.Tensor,
               num_graphs: int) -> torch.Tensor:
    """``s_k = sign(sum_i <x_i - t, v_k>^3)`` per graph and axis, ``[B, 3]``; a zero third
    moment (symmetric input: the rule is ill-defined there) gives +1, so it stays finite."""
    proj = _project((pos - t.index_select(0, index)).detach(), V.index_select(0, index))
    m3 = sum_per_graph(proj**3, index, num_graphs)
    return torch.where(m3 >= 0, 1.0, -1.0).to(m3.dtype)


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
    undefined = _sign_undefined(x, t, evals, V, index, num_graphs)
    sign = undefined[:, :3 if group == "O3" else 2].any(-1)
    return {"tie": tie, "sign": sign, "degenerate": tie | sign}


def _sign_undefined(x: torch.Tensor, t: torch.Tensor, evals: torch.Tensor, V: torch.Tensor,
                    index: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """``[B, 3]``: the third moment along axis k is zero within ``SKEW_MARGIN`` times its rounding
    (``pca_degeneracy``'s "sign" rule, per axis; float64 inputs)."""
    lam1 = evals[:, 0].clamp_min(0)
    gaps = (evals[:, :-1] - evals[:, 1:]).clamp_min(0)
    tiny = torch.finfo(torch.float64).tiny
    proj = torch.einsum("nd,ndk->nk", x - t[index], V[index])
    m3 = scatter(proj**3, index, dim=0, dim_size=num_graphs, reduce="sum")
    m2 = scatter(proj**2, index, dim=0, dim_size=num_graphs, reduce="sum")
    R = scatter((x - t[index]).norm(dim=-1), index, dim=0, dim_size=num_graphs, reduce="max")
    u = torch.finfo(torch.float64).eps / 2
    delta = u * R * (1 + lam1 / gaps.min(-1).values.clamp_min(tiny))
    return m3.abs() <= SKEW_MARGIN * 3 * delta[:, None] * m2


def pca_frame(pos: torch.Tensor, index: torch.Tensor, num_graphs: int,
              group: str = "O3") -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic PCA frame per graph: ``(F [B, 3, 3], t [B, 3])``.

    Axes by decreasing variance, each oriented so the third moment of the projections is
    positive; "SO3" takes the third axis as the cross product of the first two (det +1).
    """
    basis = pca_basis(pos, index, num_graphs, group)
    return (basis.W * third_moment_signs(basis, index, num_graphs, group)[:, None, :]).detach(), basis.t


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
    stays orthogonal and finite (not equivariant at that degeneracy); the fallback directions are
    built only when some row needs them.
    """
    u1, u2, u3 = u[:, 0], u[:, 1], u[:, 2]
    n1 = (u1 * u1).sum(-1, keepdim=True)
    if bool((n1 > _EPS**2).all()):  # the usual case: no fallback (the same values as _safe_normalize)
        e1 = u1 / n1.sqrt()
    else:
        ex = torch.zeros_like(u1)
        ex[:, 0] = 1.0
        e1 = _safe_normalize(u1, ex)
    w = u2 - (u2 * e1).sum(-1, keepdim=True) * e1
    nw = (w * w).sum(-1, keepdim=True)
    if bool((nw > _EPS**2).all()):
        e2 = w / nw.sqrt()
    else:
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




def _vector_like(t: str) -> bool:
    """Fields whose representation is R itself (``representation``): points and l = 1 vectors."""
    return t in (POINT, "1o", "1x1o")


def _into(value: torch.Tensor, t: str, F: torch.Tensor, origin: torch.Tensor | None, rows: torch.Tensor,
          Fn: torch.Tensor | None) -> torch.Tensor:
    """Field ``value`` of type ``t`` into the frames ``F [B, 3, 3]`` of its rows' graphs:
    points ``F^T (x - t)``, l = 1 vectors ``F^T v`` (as rows: ``v^T F``, with ``Fn = F[rows]``
    gathered once by the caller), other irreps ``D(F^T) v``, invariants unchanged."""
    if is_invariant(t):
        return value
    if _vector_like(t):
        if t == POINT and origin is not None:
            value = value - origin.index_select(0, rows)
        return _project(value, F.index_select(0, rows) if Fn is None else Fn)
    D = representation(t, F.transpose(-1, -2).to(value.dtype))[rows]
    return torch.einsum("nij,nj->ni", D, value)


def framed_batch(batch: Batch, spec: TaskSpec, F: torch.Tensor, t: torch.Tensor,
                 Fn: torch.Tensor | None = None) -> Batch:
    """``(F^T, -F^T t) . X`` for every typed node and edge input (``act_on_batch`` with
    ``into_frame(F, t)``, ``target=False``), as a shallow copy of ``batch``: the untouched
    tensors (``edge_index``, ``batch``, invariants, the target) are shared, not cloned. ``Fn``:
    ``F[batch.batch]`` if the caller has it."""
    rows = batch.batch
    if Fn is None:
        Fn = F.index_select(0, rows)
    new = copy.copy(batch)
    for name, typ in spec.inputs.items():
        new[name] = _into(batch[name], typ, F, t, rows, Fn)
    if spec.edge_inputs:
        erows = None
        for name, typ in spec.edge_inputs.items():
            if not is_invariant(typ):
                erows = rows.index_select(0, batch.edge_index[0]) if erows is None else erows
                new[name] = _into(batch[name], typ, F, t, erows, F.index_select(0, erows))
    return new


def output_from_frame(out: torch.Tensor, spec: TaskSpec, F: torch.Tensor, t: torch.Tensor, batch: Batch,
                      Fn: torch.Tensor | None = None) -> torch.Tensor:
    """``rho_out(F, t) . out`` (``act_on_output`` with ``out_of_frame(F, t)``): points ``F y + t``,
    l = 1 vectors ``F y``, other irreps ``D(F) y``; node-level rows use ``Fn = F[batch.batch]``."""
    t_out = spec.output
    if is_invariant(t_out):
        return out
    if not _vector_like(t_out):
        return act_on_output(out, spec, out_of_frame(F, t), batch)
    origin: torch.Tensor | None
    if spec.level == "graph":
        Fo, origin = F, (t if t_out == POINT else None)
    else:
        Fo = F.index_select(0, batch.batch) if Fn is None else Fn
        origin = t.index_select(0, batch.batch) if t_out == POINT else None
    res = _project(out, Fo.transpose(-1, -2))
    return res + origin if origin is not None else res


def apply_in_frame(backbone: torch.nn.Module, batch: Batch, spec: TaskSpec, F: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """``rho_out(F, t) . backbone((F^T, -F^T t) . X)``: run ``backbone`` on the canonical input
    (points ``F^T (x - t)``, irreps ``D(F^T) v``) and map its prediction back to the world frame."""
    with region("equibench.to_frame"):
        Fn = F.index_select(0, batch.batch)
        framed = framed_batch(batch, spec, F, t, Fn)
    with region("equibench.backbone"):
        out = backbone(framed)
    with region("equibench.to_frame"):
        return output_from_frame(out, spec, F, t, batch, Fn)


# ---- all sign frames as one batch (frame averaging) ---------------------------------------------
@torch.no_grad()
def _descending_axes(cov: torch.Tensor) -> torch.Tensor:
    """``principal_axes(cov)[1]`` for an exactly symmetric ``cov`` (``covariance``'s: entry (a, b)
    and (b, a) are the same products summed in the same order), where its symmetrisation is the
    identity: the same eigenvectors, without the eigenvalues."""
    c = torch.nan_to_num(cov.detach().double(), nan=0.0, posinf=0.0, neginf=0.0)
    return torch.linalg.eigh(c)[1].flip(-1).to(cov.dtype)


def pca_axes(pos: torch.Tensor, index: torch.Tensor, num_graphs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V [B, 3, 3], t [B, 3])``: ``principal_axes(covariance(pos, t))`` eigenvectors (no
    gradient) and the centroid t (with its gradient)."""
    t = centroid(pos, index, num_graphs)
    return _descending_axes(covariance(pos.detach(), t.detach(), index, num_graphs)), t


@dataclass
class PCABasis:
    """The PCA basis of each graph and its nodes' coordinates in it (``pca_basis``): centroids
    ``t [B, 3]`` and ``t_rows = t[index]`` (with their gradient); ``W [B, 3, 3]`` (columns: the
    principal axes by decreasing variance, for "SO3" the third replaced by v1 x v2: ``proper_base``;
    no gradient) and ``W_rows = W[index]``; ``proj [N, 3]`` = ``W_rows^T (x - t_rows)`` (with the
    gradient of x - t)."""

    t: torch.Tensor
    t_rows: torch.Tensor
    W: torch.Tensor
    W_rows: torch.Tensor
    proj: torch.Tensor


def pca_basis(pos: torch.Tensor, index: torch.Tensor, num_graphs: int, group: str = "O3") -> PCABasis:
    """``PCABasis`` of the points ``pos`` (the same t and axes as ``pca_axes`` / ``proper_base``): the
    centred points are formed once, for the covariance and for the coordinates."""
    t = centroid(pos, index, num_graphs)
    t_rows = t.index_select(0, index)
    c = pos - t_rows
    cd = c.detach()
    W = proper_base(_descending_axes(sum_per_graph(cd.unsqueeze(-1) * cd.unsqueeze(-2), index, num_graphs)), group)
    W_rows = W.index_select(0, index)
    return PCABasis(t, t_rows, W, W_rows, _project(c, W_rows))


def third_moment_signs(basis: PCABasis, index: torch.Tensor, num_graphs: int, group: str = "O3") -> torch.Tensor:
    """``[B, 3]``: the signs sigma with ``pca_frame = W diag(sigma)``: s_k = sign(sum_i <x_i - t, w_k>^3)
    (``skew_signs``, +1 for a zero moment) for "O3"; (s_1, s_2, s_1 s_2) for "SO3" (the third axis is
    the cross product of the first two oriented ones)."""
    m3 = sum_per_graph(basis.proj.detach() ** 3, index, num_graphs)
    s = torch.where(m3 >= 0, 1.0, -1.0).to(m3.dtype)
    if check_group(group) == "SO3":
        s = torch.cat([s[:, :2], s[:, :1] * s[:, 1:2]], dim=-1)
    return s


def sign_frames_supported(spec: TaskSpec) -> bool:
    """Whether ``sign_framed_copies`` / ``average_sign_frames`` cover ``spec``: every non-invariant
    node input and the output are points or l = 1 vectors, and every edge input is invariant."""
    return (all(is_invariant(t) or _vector_like(t) for t in spec.inputs.values())
            and all(is_invariant(t) for t in spec.edge_inputs.values())
            and (is_invariant(spec.output) or _vector_like(spec.output)))


#: on the CPU a frame average runs the backbone on at most about this many edges + nodes per call,
#: in equal chunks of whole copies: larger calls outgrow the L2 cache (4 MB here: an edge tensor of
#: the width-64 backbone is ~0.5 kB per edge) and, past glibc's 32 MB mmap threshold, every large
#: tensor is a fresh mapping whose pages fault in on first write. Measured (one thread, 20k
#: parameters): n-body 21 us per graph at 50 graphs per call, 16 us at 200, 17-26 us at 400 (8 frames
#: x 50 graphs); normals (128 points, k = 8) 0.78 ms per graph at 25 graphs, 0.98 ms at 50, 2.2 ms at 400
CPU_EDGES_PER_CALL = 8192


def copies_per_call(batch: Batch, copies: int) -> int:
    """How many of ``copies`` framed copies of ``batch`` one backbone call takes: all of them on an
    accelerator; on the CPU the fewest equal chunks that keep a call under ``CPU_EDGES_PER_CALL``
    edges + nodes (at least one copy per call)."""
    if batch.batch.device.type != "cpu":
        return copies
    size = int(batch.edge_index.shape[1]) + int(batch.num_nodes)
    calls = min(copies, max(1, math.ceil(copies * size / CPU_EDGES_PER_CALL)))
    return math.ceil(copies / calls)


def sign_framed_copies(batch: Batch, spec: TaskSpec, W: torch.Tensor, t: torch.Tensor,
                       sig: torch.Tensor) -> Batch:
    """``replicate(batch, spec, K)`` with copy k framed by ``F_k = W diag(sigma_k)``, as
    ``act_on_batch(replicate(...), into_frame(F_k, t))`` (``sign_frames_supported`` specs).

    ``sig``: ``[K, 1, 3]`` (the same K sign vectors for every graph) or ``[K, B, 3]``. Each field is
    projected on W once, ``W^T (x - t)``, and copy k is that times sigma_k (exact: a sign flip),
    instead of one 3 x 3 product per copy and node. (``sign_framed_chunks`` with one chunk.)"""
    return next(sign_framed_chunks(batch, spec, W, t, sig, sig.shape[0]))


def framed_coordinates(batch: Batch, spec: TaskSpec, W_rows: torch.Tensor, t_rows: torch.Tensor,
                       known: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``W_i^T (x_i - t_i)`` for every point input and ``W_i^T v_i`` for every l = 1 input, ``[N, 3]``
    each (rows ``W_rows = W[batch.batch]``, ``t_rows = t[batch.batch]``); ``known``: fields already
    projected (``PCABasis.proj`` for the frame's own point field)."""
    out = dict(known or {})
    for name, typ in spec.inputs.items():
        if name in out or is_invariant(typ):
            continue
        val = batch[name]
        out[name] = _project(val - t_rows if typ == POINT else val, W_rows)
    return out


def sign_framed_chunks(batch: Batch, spec: TaskSpec, W: torch.Tensor, t: torch.Tensor, sig: torch.Tensor,
                       chunk: int, projected: dict[str, torch.Tensor] | None = None,
                       W_rows: torch.Tensor | None = None) -> Iterator[Batch]:
    """``sign_framed_copies(batch, spec, W, t, sig[k:k + chunk])`` for k = 0, chunk, 2 chunk, ...:
    every field is projected on W once for all chunks (``framed_coordinates``; ``projected`` and
    ``W_rows`` if the caller has them), and the graph structure of a chunk (edge_index, batch
    vector, repeated invariant fields) is built once per chunk size. A chunk of one copy is a
    shallow copy of ``batch`` with the framed fields replaced (nothing else is copied)."""
    index = batch.batch
    N, B, K = batch.num_nodes, int(batch.num_graphs), sig.shape[0]
    if W_rows is None:
        W_rows = W.index_select(0, index)
    need_t = any(typ == POINT and name not in (projected or {}) for name, typ in spec.inputs.items())
    proj = framed_coordinates(batch, spec, W_rows, t.index_select(0, index) if need_t else t, projected)
    sig_n = sig if sig.shape[1] == 1 else sig[:, index]
    structure: dict[int, Batch] = {}
    for k0 in range(0, K, chunk):
        s = sig_n[k0:k0 + chunk]
        m = s.shape[0]
        if m == 1:
            new = copy.copy(batch)
            for name, value in proj.items():
                new[name] = value * s[0]
            yield new
            continue
        if m not in structure:  # a Batch holding the structure, copied (shallow) for each chunk
            template = Batch()
            for name in [*spec.inputs, *spec.edge_inputs]:
                if name not in proj:
                    template[name] = batch[name].repeat(m, *([1] * (batch[name].dim() - 1)))
            k = torch.arange(m, device=index.device)
            template.edge_index = (batch.edge_index.unsqueeze(0)
                                   + (k * N)[:, None, None]).permute(1, 0, 2).reshape(2, -1)
            template.batch = (index.unsqueeze(0) + (k * B)[:, None]).reshape(-1)
            template._num_graphs = m * B
            structure[m] = template
        new = copy.copy(structure[m])
        for name, value in proj.items():
            new[name] = (value.unsqueeze(0) * s).reshape(m * N, 3)
        yield new


def average_sign_frames(out: torch.Tensor, spec: TaskSpec, W: torch.Tensor, t: torch.Tensor, sig: torch.Tensor,
                        batch: Batch, W_rows: torch.Tensor | None = None,
                        t_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``1/K sum_k rho_out(F_k, t) y_k`` for the copy-major predictions ``out [K * M, d]`` of
    ``sign_framed_copies``: ``W (1/K sum_k sigma_k * y_k) + t`` for points (linear in y, so the
    frame map is applied once to the average), the plain mean for invariant outputs (K = 1: no
    mean). ``W_rows`` / ``t_rows``: ``W[batch.batch]`` / ``t[batch.batch]`` if the caller has them."""
    K = sig.shape[0]
    y = out.reshape(K, -1, out.shape[-1])
    if is_invariant(spec.output):
        return out if K == 1 else y.mean(0)
    rows = batch.batch if spec.level == "node" else None
    if sig.shape[1] != 1 and rows is not None:
        sig = sig[:, rows]
    avg = out * sig[0] if K == 1 else (y * sig).mean(0)
    if rows is None:
        Wr, tr = W, t
    else:
        Wr = W.index_select(0, rows) if W_rows is None else W_rows
        tr = (t.index_select(0, rows) if t_rows is None else t_rows) if spec.output == POINT else t
    res = _project(avg, Wr.transpose(-1, -2))
    return res + tr if spec.output == POINT else res


# ---- frames that stay exact on symmetric inputs (option ``degenerate="average"``) ---------------
#: the ``degenerate`` option of the PCA frame methods: "arbitrary" (the default and the behaviour
#: before the option existed: eigh's basis of a tied eigenspace, +1 for an undefined third-moment
#: sign) or "average" (``symmetric_frames``: the frames the input's own symmetry leaves undecided)
DEGENERATE_MODES = ("arbitrary", "average")


def check_degenerate(mode: str) -> str:
    if mode not in DEGENERATE_MODES:
        raise UserError(f"degenerate must be one of {DEGENERATE_MODES}, got {mode!r}")
    return mode


@dataclass
class FrameList:
    """Weighted frames of a batch (``symmetric_frames``): frame m (``F [M, 3, 3]``, columns = axes)
    belongs to graph ``graph[m]`` with weight ``weight[m]`` (summing to 1 per graph); ``t [B, 3]``
    the origins (centroids, with their gradient); ``stab [B]`` the residual continuous stabiliser
    to project on after averaging (0: none, 1: rotations about ``axis [B, 3]`` (with the mirrors
    through planes containing it for O(3)), 2: every rotation (and reflection) about ``t``);
    ``tied [B]`` the graphs whose frames came from the tie-breaking construction."""

    F: torch.Tensor
    graph: torch.Tensor
    weight: torch.Tensor
    t: torch.Tensor
    axis: torch.Tensor
    stab: torch.Tensor
    tied: torch.Tensor
    group: str


def candidate_vectors(batch: Batch, spec: TaskSpec, t: torch.Tensor) -> torch.Tensor:
    """``[N, C, 3]``: the equivariant (polar) vectors that may break a tie, per node: every point
    field relative to the centroid ``t`` and every "1o" input field (velocities)."""
    rows = batch.batch
    vecs = [batch[name] - t[rows] if typ == POINT else batch[name]
            for name, typ in spec.inputs.items() if typ in (POINT, "1o")]
    return torch.stack(vecs, dim=1)


def _sign_frames(V2: torch.Tensor, free: tuple[int, ...], group: str) -> torch.Tensor:
    """``[M * K, 3, 3]``: the frames ``V2 diag(s)`` with s = +-1 on the columns ``free`` (the axes
    whose sign the input leaves open) and +1 elsewhere; for "SO3" the last free column is not
    flipped but the last column is multiplied by det, so every frame is proper."""
    if group == "SO3":
        free = tuple(k for k in free if k != 2)
    out = []
    for flips in itertools.product((1.0, -1.0), repeat=len(free)):
        s = torch.ones(3, dtype=V2.dtype, device=V2.device)
        for k, f in zip(free, flips):
            s[k] = f
        F = V2 * s
        if group == "SO3":
            F = torch.cat([F[..., :2], F[..., 2:] * torch.linalg.det(F)[..., None, None]], dim=-1)
        out.append(F)
    return torch.stack(out, dim=1).reshape(-1, 3, 3)


def _complete(u: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``[3, 3]`` (columns) whose first column is the unit vector ``u``."""
    e = _least_aligned_axis(u[None])[0]
    e = e - (e @ u) * u
    e = e / e.norm()
    return torch.stack([u, e, torch.linalg.cross(u, e)], dim=-1)


def _frames_axial(c: torch.Tensor, n: torch.Tensor, Vb: torch.Tensor, top: bool, group: str, tol: float,
                  scale: float) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Frames of a graph whose covariance has one tied pair: the plane P orthogonal to the simple
    eigenvector ``n`` (``top``: the tied pair is the largest, so n is the last axis). Candidates
    are the projections of ``c [C', 3]`` on P; those of largest norm (within ``tol``) each give
    ``V' = [u, n x u, n]`` (``top``) or ``[n, u, n x u]``, u the unit projection, and all their sign
    frames (the sign of u is decided by u itself: those of the other two axes only). None in P:
    the input is fixed by every rotation about n -> eigh's basis and stab 1."""
    p = c - (c @ n)[:, None] * n
    r = p.norm(dim=-1)
    rmax = float(r.max()) if r.numel() else 0.0
    if rmax <= tol * scale:
        return frame_set(Vb[None], group)[0], 1, n
    shell = r >= (1 - tol) * rmax
    u = p[shell] / r[shell, None]
    nn_ = n.expand_as(u)
    w = torch.linalg.cross(nn_, u)
    V2 = torch.stack([u, w, nn_], dim=-1) if top else torch.stack([nn_, u, w], dim=-1)
    return _sign_frames(V2, (1, 2) if top else (0, 2), group), 0, torch.zeros_like(n)


def _frames_isotropic(c: torch.Tensor, Vb: torch.Tensor, group: str, tol: float,
                      scale: float) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Frames of a graph with three tied eigenvalues: first axis u from each candidate of largest
    norm, second from each candidate of largest norm orthogonal to u (Gram-Schmidt), third +-u x e
    (one proper frame each for SO(3)). No candidate: stab 2; all candidates on one line: stab 1."""
    r = c.norm(dim=-1)
    rmax = float(r.max()) if r.numel() else 0.0
    if rmax <= tol * scale:
        return frame_set(Vb[None], group)[0], 2, torch.zeros_like(Vb[:, 0])
    out = []
    for u in c[r >= (1 - tol) * rmax] / rmax:
        u = u / u.norm()
        q = c - (c @ u)[:, None] * u
        qn = q.norm(dim=-1)
        qmax = float(qn.max())
        if qmax <= tol * rmax:
            return frame_set(_complete(u)[None], group)[0], 1, u
        e = q[qn >= (1 - tol) * qmax] / qn[qn >= (1 - tol) * qmax, None]
        uu = u.expand_as(e)
        out.append(_sign_frames(torch.stack([uu, e, torch.linalg.cross(uu, e)], dim=-1), (2,), group))
    return torch.cat(out), 0, torch.zeros_like(Vb[:, 0])


@torch.no_grad()
def symmetric_frames(pos: torch.Tensor, cands: torch.Tensor, index: torch.Tensor, num_graphs: int,
                     group: str = "O3", canonical: bool = False) -> FrameList | None:
    """Frames that stay equivariant where the PCA frame is undecided (``degenerate="average"``).

    Frame averaging is exact whenever the frame *set* is equivariant, F(gX) = g F(X) (Puny et al.
    2022, Thm. 1); the PCA sign set is, unless covariance eigenvalues tie. Here, per graph:

    * distinct eigenvalues: the usual sign frames (``frame_set``; with ``canonical`` the one
      third-moment frame of ``pca_frame``, and both signs of every axis whose third moment is
      zero within its rounding, ``pca_degeneracy``'s "sign" rule);
    * a tied pair (relative gap < ``GAP_TOL``; oblate: benzene, a regular polygon, a square and
      its centre; prolate: linear molecules, collinear particles): in-plane axes from the
      candidates ``cands [N, C, 3]`` (``candidate_vectors``: points relative to the centroid,
      velocities) projected on the tied plane, those of largest norm (ties within sqrt(eps) of the
      input dtype), each with the 4 sign choices of the other two axes (2 proper ones for SO(3)):
      24 frames for benzene (= |D6h|), 20 for a regular pentagon;
    * three tied eigenvalues (methane, a cube, any isotropic cloud): ordered pairs of candidates
      (largest norm, then largest norm orthogonal to the first) and +-their cross product (one
      proper frame for SO(3)): 24 frames for methane (= |Td|).

    Each set is built from equivariant vectors by rules that only compare invariants, so it is
    equivariant as a set (with multiplicity), and the (equally weighted) average over it is
    exact. Where no candidate breaks the tie (no in-plane candidate: every point and vector on
    the axis, e.g. CO2 with no velocities; no candidate at all: every point at the centroid),
    every framed input is the same whatever basis of the tied space is used, and the remaining
    arbitrariness is a rotation about the axis (resp. any rotation), which fixes the input: the
    average is then projected on the subspace that stabiliser fixes (``stabiliser_projection``,
    stab 1 / 2), which is what every equivariant map must output there. Returns None when no
    graph of the batch needs any of this (the caller's plain PCA path is then exact as it is).

    Exact (to rounding) on every input whose non-invariant fields are points and "1o" vectors and
    whose outputs have l <= 1 (l <= 3 for the axial projection, l <= 2 for the full one). Not
    covered: inputs with pseudo-vector ("1e") or higher-order fields (they break no tie here and
    may break the stabiliser the projection assumes), and decisions at the thresholds
    themselves (a relative eigenvalue gap within rounding of ``GAP_TOL``, candidate norms within
    rounding of the shell tolerance). Just above ``GAP_TOL`` the ordinary frames are used and are
    ill-conditioned (eigenvector error ~ u / gap <= ~1e-10 in float64).
    """
    check_group(group)
    B = num_graphs
    tol = math.sqrt(torch.finfo(pos.dtype).eps)
    x = pos.detach().double()
    c_all = cands.detach().double()
    t = centroid(x, index, B)
    evals, V = principal_axes(covariance(x, t, index, B))
    lam1 = evals[:, 0].clamp_min(0)
    small = lam1 <= torch.finfo(torch.float64).tiny
    tie12 = ((evals[:, 0] - evals[:, 1]) <= GAP_TOL * lam1) | small
    tie23 = ((evals[:, 1] - evals[:, 2]) <= GAP_TOL * lam1) | small
    tied = tie12 | tie23
    used = 3 if group == "O3" else 2
    undef = torch.zeros(B, used, dtype=torch.bool, device=x.device)
    if canonical:
        undef = _sign_undefined(x, t, evals, V, index, B)[:, :used] & ~tied[:, None]
    if not bool(tied.any() or undef.any()):
        return None
    frames: list[torch.Tensor] = []
    graphs: list[torch.Tensor] = []
    stab = torch.zeros(B, dtype=torch.long, device=x.device)
    axis = torch.zeros(B, 3, dtype=x.dtype, device=x.device)

    def add(b: int, F: torch.Tensor) -> None:
        frames.append(F.reshape(-1, 3, 3))
        graphs.append(torch.full((F.reshape(-1, 9).shape[0],), b, dtype=torch.long, device=x.device))

    if canonical:
        F0 = V * skew_signs(x, t, V, index, B)[:, None, :]
        for b in range(B):
            if bool(tied[b]):
                continue
            free = undef[b].nonzero().flatten().tolist()
            for flips in itertools.product((1.0, -1.0), repeat=len(free)):
                F = F0[b].clone()
                for k, f in zip(free, flips):
                    F[:, k] = F[:, k] * f
                if group == "SO3":
                    F[:, 2] = torch.linalg.cross(F[:, 0], F[:, 1])
                add(b, F)
    else:
        base = frame_set(V, group)
        for b in (~tied).nonzero().flatten().tolist():
            add(b, base[b])
    for b in tied.nonzero().flatten().tolist():
        nodes = index == b
        c = c_all[nodes].reshape(-1, 3)
        scale = max(float(c.norm(dim=-1).max()) if c.numel() else 0.0, float(x[nodes].norm(dim=-1).max()))
        if bool(tie12[b] & tie23[b]):
            F, kind, ax = _frames_isotropic(c, V[b], group, tol, scale)
        else:
            top = bool(tie12[b])
            F, kind, ax = _frames_axial(c, V[b, :, 2] if top else V[b, :, 0], V[b], top, group, tol, scale)
        add(b, F)
        stab[b], axis[b] = kind, ax
    graph = torch.cat(graphs)
    # frames follow graph order so that a graph's copies are contiguous (stable order within)
    order = torch.argsort(graph, stable=True)
    graph = graph[order]
    weight = 1.0 / torch.bincount(graph, minlength=B).to(x.dtype)[graph]
    t_grad = centroid(pos, index, B)
    return FrameList(torch.cat(frames)[order].to(pos.dtype), graph, weight.to(pos.dtype), t_grad,
                     axis.to(pos.dtype), stab, tied, group)


def gather_graphs(batch: Batch, spec: TaskSpec, graph_ids: torch.Tensor) -> tuple[Batch, torch.Tensor]:
    """A batch of copies of the graphs ``graph_ids [M]`` (in that order, repeats allowed) holding the
    typed node/edge fields, ``edge_index`` and ``batch`` (like ``replicate``), and for each of its
    nodes the index of the original node ``[sum_m N_(graph_ids[m])]``. Nodes of a graph must be
    contiguous (as in every PyG batch)."""
    B, dev = int(batch.num_graphs), batch.batch.device
    M = graph_ids.numel()
    counts = torch.bincount(batch.batch, minlength=B)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    rep = counts[graph_ids]
    copy_of_node = torch.repeat_interleave(torch.arange(M, device=dev), rep)
    offs = rep.cumsum(0) - rep
    node_idx = ptr[graph_ids][copy_of_node] + torch.arange(int(rep.sum()), device=dev) - offs[copy_of_node]
    egraph = batch.batch[batch.edge_index[0]]
    order = torch.argsort(egraph, stable=True)
    ecounts = torch.bincount(egraph, minlength=B)
    eptr = torch.cat([ecounts.new_zeros(1), ecounts.cumsum(0)])
    erep = ecounts[graph_ids]
    ecopy = torch.repeat_interleave(torch.arange(M, device=dev), erep)
    eoffs = erep.cumsum(0) - erep
    esel = order[eptr[graph_ids][ecopy] + torch.arange(int(erep.sum()), device=dev) - eoffs[ecopy]]
    new = Batch()
    for name in spec.inputs:
        new[name] = batch[name][node_idx]
    for name in spec.edge_inputs:
        new[name] = batch[name][esel]
    new.edge_index = batch.edge_index[:, esel] - ptr[graph_ids][ecopy] + offs[ecopy]
    new.batch = copy_of_node
    new._num_graphs = M
    return new, node_idx


@functools.lru_cache(maxsize=4)
def _tetrahedral(reflections: bool) -> tuple[tuple[float, ...], ...]:
    """The 12 rotations of T (D2 x the 3 cyclic axis permutations), with -1 x them for O(3): a
    finite group with no invariant vector and no invariant l = 2 tensor."""
    P = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    d2 = [torch.diag(torch.tensor(s, dtype=torch.float64)) for s in
          ((1.0, 1.0, 1.0), (1.0, -1.0, -1.0), (-1.0, 1.0, -1.0), (-1.0, -1.0, 1.0))]
    els = [D @ torch.linalg.matrix_power(P, k) for D in d2 for k in range(3)]
    if reflections:
        els = els + [-R for R in els]
    return tuple(tuple(R.flatten().tolist()) for R in els)


def _axial_elements(axis: torch.Tensor, reflections: bool) -> torch.Tensor:
    """``[B, K, 3, 3]``: the rotations by k pi / 2 about each unit ``axis [B, 3]`` (C4), with their
    products with one mirror through a plane containing the axis for O(3) (C4v): their average
    projects l <= 3 fields exactly as the average over the whole axial group O(2) (SO(2)) does."""
    a = axis / axis.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    e = _least_aligned_axis(a)
    e = e - (e * a).sum(-1, keepdim=True) * a
    e = e / e.norm(dim=-1, keepdim=True)
    f = torch.linalg.cross(a, e)
    aa, ee, ff = (v[:, :, None] * v[:, None, :] for v in (a, e, f))
    fe = f[:, :, None] * e[:, None, :]
    rots = [aa + c * (ee + ff) + s * (fe - fe.transpose(-1, -2)) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1))]
    if reflections:
        sigma = torch.eye(3, dtype=a.dtype, device=a.device) - 2 * ee
        rots = rots + [R @ sigma for R in rots]
    return torch.stack(rots, dim=1)


def stabiliser_projection(out: torch.Tensor, spec: TaskSpec, batch: Batch, frames: FrameList) -> torch.Tensor:
    """Project each graph's output on the subspace fixed by its residual stabiliser (``frames.stab``):
    ``(1/|H|) sum_h rho_out(h) y`` with h = (R, t - R t) about the centroid, over C4 (C4v for O(3))
    about ``frames.axis`` (stab 1) or over T (T x {+-1}) (stab 2). Exactly the projection over the
    continuous stabiliser for outputs with l <= 1 (the Reynolds operator; points: keep the axial
    component about t, resp. t itself; 1o: the axial component, resp. 0; 0e unchanged). Such
    stabilisers fix every node (all points on the axis, resp. at t), so no permutation enters."""
    reflections = frames.group == "O3"
    node_rows = spec.level == "node"
    for kind in (1, 2):
        mask = frames.stab == kind
        if not bool(mask.any()):
            continue
        B = mask.shape[0]
        dt = out.dtype
        if kind == 1:
            els = _axial_elements(frames.axis.to(dt), reflections)
        else:
            T = torch.tensor(_tetrahedral(reflections), dtype=dt, device=out.device).reshape(-1, 3, 3)
            els = T.unsqueeze(0).expand(B, -1, -1, -1)
        eye = torch.eye(3, dtype=dt, device=out.device).expand(B, 3, 3)
        t = frames.t.to(dt)
        acc = torch.zeros_like(out)
        for k in range(els.shape[1]):
            R = torch.where(mask[:, None, None], els[:, k], eye)
            g = GroupElement(R, t - (R @ t.unsqueeze(-1)).squeeze(-1))
            acc = acc + act_on_output(out, spec, g, batch)
        rows = mask[batch.batch] if node_rows else mask
        out = torch.where(rows[:, None], acc / els.shape[1], out)
    return out


def average_in_frames(backbone: torch.nn.Module, batch: Batch, spec: TaskSpec, frames: FrameList) -> torch.Tensor:
    """``sum_m w_m rho_out(F_m, t) . backbone((F_m^T, -F_m^T t) . X_(graph m))`` per graph, all
    frames as one batch (``gather_graphs``), then ``stabiliser_projection``."""
    with region("equibench.to_frame"):
        big, node_idx = gather_graphs(batch, spec, frames.graph)
        tk = frames.t[frames.graph]
        framed = act_on_batch(big, spec, into_frame(frames.F, tk), target=False)
    with region("equibench.backbone"):
        out = backbone(framed)
    out = act_on_output(out, spec, out_of_frame(frames.F, tk), big)
    w = frames.weight.to(out.dtype)
    if spec.level == "graph":
        res = out.new_zeros(int(batch.num_graphs), out.shape[-1]).index_add(0, frames.graph, out * w[:, None])
    else:
        res = out.new_zeros(batch.num_nodes, out.shape[-1]).index_add(0, node_idx, out * w[big.batch][:, None])
    return stabiliser_projection(res, spec, batch, frames)
