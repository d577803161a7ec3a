"""``frame_averaging_pytorch``: the shared backbone averaged over the frames of the
``frame-averaging-pytorch`` library (``FrameAverage``, lucidrains; Puny et al., "Frame Averaging
for Invariant and Equivariant Network Design", ICLR 2022).

What the library does: for a dense batch of point clouds ``[B, n, 3]`` (padding masked), centroid
t, covariance C = sum_i (x_i - t)(x_i - t)^T, eigenvectors V of C by *increasing* eigenvalue
(``torch.linalg.eigh``) and the 2^3 = 8 frames F_f = V diag(s_f), s_f in {-1, +1}^3; framed inputs
F_f^T (x - t), and an averaging function that maps per-frame outputs back, 1/8 sum_f F_f y_f.

How it is wrapped: the library computes the centroid and the frame set of each graph's first
point field (its ``return_framed_inputs_and_averaging_function`` mode on the padded batch); the
frames are read back from its averaging function (applied to one frame's identity matrix at a
time: 8 x avg(e_f (x) I)^T = F_f), and the shared backbone then runs on every framed copy of the
whole typed input exactly as in ``frame_averaging`` (``FrameAveragedModel``: points, vectors and
every other field framed, the output mapped back with rho_out(F_f) and the centroid, averaged).
The library frames only point coordinates; the other typed fields need the frames themselves,
which is why they are read back rather than only the framed points used.

Alignment with ``frame_averaging`` (equibench's own): ours sorts the eigenvectors by *decreasing*
eigenvalue, the library by increasing; a frame's column order decides which coordinate the
backbone reads first, so the library's columns are reversed (``align=True``, default) to make the
two frame *sets* equal. Then the two models compute the same average over the same 8 frames in
another order, and agree to float64 round-off (``tests/test_reference_methods.py`` holds them to
1e-10). ``align=False`` keeps the library's order (still exact, a different function).
O(3) only: the library has no proper-rotation (SO(3)) frame set. Exact wherever the covariance
eigenvalues are distinct, like ``frame_averaging``.
"""
from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.utils import to_dense_batch

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ..base import GENERIC_INPUTS, Method
from ..blocks.pca_frames import frame_support
from ..wrappers.baseline import Baseline
from ..wrappers.frame_averaging import FrameAveragedModel

LIBRARY = "frame-averaging-pytorch"


def _library() -> Any:
    from frame_averaging_pytorch import FrameAverage  # optional dependency (extra "reference")
    return FrameAverage


class LibraryFramedModel(FrameAveragedModel):
    """``FrameAveragedModel`` with the centroid and frames computed by the library."""

    def __init__(self, backbone: nn.Module, spec: TaskSpec, align: bool) -> None:
        super().__init__(backbone, spec, "O3", stochastic=False)
        self.align = align
        self.fa = _library()(dim=3)

    def frames(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        pos = batch[self.point]
        dense, mask = to_dense_batch(pos.detach(), batch.batch, batch_size=int(batch.num_graphs))
        framed, average = self.fa(dense, frame_average_mask=mask, return_framed_inputs_and_averaging_function=True)
        B, K = dense.shape[0], self.fa.num_frames
        eye = torch.eye(3, dtype=dense.dtype, device=dense.device)
        cols = []
        for f in range(K):  # avg(e_f (x) I)[b, i, d] = F_f[b, d, i] / K
            probe = torch.zeros(B, K, 3, 3, dtype=dense.dtype, device=dense.device)
            probe[:, f] = eye
            cols.append(average(probe).transpose(-1, -2) * K)
        F = torch.stack(cols, dim=1)  # [B, K, 3, 3], columns = axes
        if self.align:
            F = F.flip(-1)  # increasing -> decreasing eigenvalue order, as equibench's frames
        counts = mask.sum(1, keepdim=True).clamp(min=1).to(dense.dtype)
        t = (dense * mask[..., None]).sum(1) / counts  # the library's (masked) centroid
        return F, t.to(pos.dtype)


@register_method("frame_averaging_pytorch")
class FrameAveragingPytorch(Baseline):
    """The shared backbone averaged over frame-averaging-pytorch's PCA frames (O(3), 8 frames)."""

    exact = True
    exact_scope = GENERIC_INPUTS  # the PCA frames are undecided on symmetric inputs
    group = "O3"
    domains = ("graph3d",)
    exact_by_domain: ClassVar[dict[str, bool]] = {"graph3d": True}  # Baseline's says False
    origin: ClassVar[str] = LIBRARY
    counterpart: ClassVar[str | None] = "frame_averaging"

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None, align: bool = True) -> None:
        super().__init__(width=width, depth=depth, params=params)
        self.align = align
        self.options.update(align=align)

    def supports(self, spec: TaskSpec) -> str | None:
        if importlib.util.find_spec("frame_averaging_pytorch") is None:
            return f"{LIBRARY} is not installed (pip install -e .[reference])"
        return Method.supports(self, spec) or frame_support(spec)

    def build_graph(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        return LibraryFramedModel(self.build_backbone(spec), spec, self.align)
