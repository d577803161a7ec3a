"""``pca_canonicalization``: the shared backbone on ONE deterministic PCA frame per graph.

Frame (``blocks.pca_frames.pca_frame``): t = centroid of the first point field; axes v_1, v_2,
v_3 = eigenvectors of C = sum_i (x_i - t)(x_i - t)^T by decreasing eigenvalue, each with the sign
that makes the third moment sum_i <x_i - t, v_k>^3 positive ("O3": all three axes, det F = +-1;
"SO3": the first two, v_3 = v_1 x v_2, det F = +1). Then

    f(X) = rho_out(F, t) phi((F^T, -F^T t) . X)

with no averaging. Exactly E(3)- (resp. SE(3)-) equivariant when the eigenvalues are distinct
AND every used third moment is non-zero; it is ill-defined at eigenvalue ties and for
mirror-/point-symmetric inputs (zero skewness; the rule then picks +1, finite but not
equivariant). Adds no parameters; no gradient through the frame.
"""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.data import Batch

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ..base import Method
from ..blocks.pca_frames import apply_in_frame, check_group, first_point_field, frame_support, pca_frame
from .baseline import Baseline


class PCACanonicalModel(nn.Module):
    def __init__(self, backbone: nn.Module, spec: TaskSpec, group: str) -> None:
        super().__init__()
        self.backbone, self.spec, self.group = backbone, spec, group
        self.point = first_point_field(spec)

    def frame(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F [B, 3, 3] columns = axes, t [B, 3])``; inputs are rotated by R = F^T."""
        return pca_frame(batch[self.point], batch.batch, int(batch.num_graphs), self.group)

    def rotation(self, batch: Batch) -> torch.Tensor:
        return self.frame(batch)[0].transpose(-1, -2)

    def forward(self, batch: Batch) -> torch.Tensor:
        F, t = self.frame(batch)
        return apply_in_frame(self.backbone, batch, self.spec, F, t)


@register_method("pca_canonicalization")
class PCACanonicalization(Baseline):
    exact = True
    group = "O3"

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None,
                 group: str = "O3") -> None:
        super().__init__(width=width, depth=depth, params=params)
        self.group = check_group(group)
        self.options.update(group=group)

    def supports(self, spec: TaskSpec) -> str | None:
        return Method.supports(self, spec) or frame_support(spec)

    domains = ("graph3d",)

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        return PCACanonicalModel(self.build_backbone(spec), spec, self.group)
