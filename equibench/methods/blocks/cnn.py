"""Image models of the ``image2d`` domain: the common base, the plain CNN and group averaging.

Every image model maps a ``Batch`` with an image field ``[B, C, H, W]`` (the first input of type
``"image"``/``"image:C"``) to invariant logits ``[B, n]``, n = ``field_dim(spec.output)``.
Rotations act as in ``equibench.symmetry.group2d`` (C4 exact with ``rot90``; other angles
interpolated, approximate).

* ``ConvCore`` / ``CNNClassifier``: the plain, non-equivariant CNN (conv 5x5 then 3x3,
  BatchNorm, ReLU, 2x2 average pool after the first ``POOLED_BLOCKS`` blocks, global mean,
  linear head); ``width`` = channels. The image model of ``baseline`` and ``augmentation``, and
  the phi that ``GroupAveraged`` and ``canon2d.Canonicalised`` wrap.
* ``GroupAveraged``: exact group averaging f(x) = 1/|G| sum_g phi(g x) of the CNN phi over a
  cyclic group C_N (C4 exact; C8 through interpolation); the |G| outputs are summed in sorted
  order so the average does not depend on the order of the copies. ``stochastic=True``: one
  random element per image in training mode, the full average in eval mode.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch_geometric.data import Batch

from ...core.errors import UserError
from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import field_dim
from ...symmetry.group2d import group_order, image_channels, is_2d_group, is_image_type, is_invariant_type, rotate

DEFAULT_WIDTH = 32
DEFAULT_DEPTH = 4
POOLED_BLOCKS = 2  # 2x2 average pooling after the first POOLED_BLOCKS conv blocks
SO2_FALLBACK = "C8"  # discrete group used by frame averaging / canonicalisation for an SO(2) task


# ---- helpers -------------------------------------------------------------------------------------
def image_field(spec: TaskSpec) -> tuple[str, int]:
    """(name, channels) of the task's image input (the first input of an image type)."""
    for name, t in spec.inputs.items():
        if is_image_type(t):
            return name, image_channels(t)
    raise UserError(f"task {spec.name!r} has no image input (types: {spec.inputs})")


def resolve_group(group: str | None, spec: TaskSpec, discrete: bool) -> str:
    """The 2-D group a model uses: ``group`` when it names one, else the task's (3-D names such as
    the graph methods' default "O3" count as unset); SO(2) becomes ``SO2_FALLBACK`` when a
    discrete group is needed."""
    g = group if is_2d_group(group) else spec.group
    group_order(g)  # validates
    if discrete and g == "SO2":
        g = SO2_FALLBACK
    return g


class ImageModel(nn.Module):
    """Base: ``forward(batch) = self.logits(batch[field])``."""

    size: int  # the size it was built at (set by subclasses; ``blocks.image.build_image_model``)

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__()
        self.field, self.in_channels = image_field(spec)
        if not is_invariant_type(spec.output):
            raise UserError(f"image models predict invariant outputs (e.g. '10x0e'), not {spec.output!r}")
        self.n_out = field_dim(spec.output)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.logits(batch[self.field])


# ---- plain CNN -----------------------------------------------------------------------------------
class ConvCore(nn.Module):
    """The shared non-equivariant CNN: images ``[B, C, H, W]`` -> logits ``[B, n_out]``."""

    def __init__(self, in_channels: int, n_out: int, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(depth):
            k = 5 if i == 0 else 3
            layers += [nn.Conv2d(c, width, k, padding=k // 2), nn.BatchNorm2d(width), nn.ReLU()]
            if i < POOLED_BLOCKS:
                layers.append(nn.AvgPool2d(2))
            c = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_out)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((-2, -1)))


class CNNClassifier(ImageModel):
    """The CNN on the image as given (``baseline`` / ``augmentation``)."""

    def __init__(self, spec: TaskSpec, width: int, depth: int) -> None:
        super().__init__(spec)
        self.core = ConvCore(self.in_channels, self.n_out, width, depth)
        self.size = width

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.core(images)


# ---- group averaging -----------------------------------------------------------------------------
def group_angles(group: str) -> torch.Tensor:
    """The angles 2 pi k / N of C_N (float64)."""
    n = group_order(group)
    return 2 * math.pi * torch.arange(n, dtype=torch.float64) / n


class GroupAveraged(ImageModel):
    """f(x) = 1/N sum_k phi(r^k x) over C_N (the frame is the whole group; ``frame_averaging``)."""

    angles: torch.Tensor  # buffer

    def __init__(self, spec: TaskSpec, width: int, depth: int, group: str, stochastic: bool) -> None:
        super().__init__(spec)
        self.core = ConvCore(self.in_channels, self.n_out, width, depth)
        self.group, self.stochastic, self.size = group, stochastic, width
        self.register_buffer("angles", group_angles(group), persistent=False)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        B, N = images.shape[0], self.angles.numel()
        angles = self.angles.to(device=images.device, dtype=torch.float64)
        if self.stochastic and self.training:
            pick = torch.randint(N, (B,), device=images.device)
            return self.core(rotate(images, angles[pick]))
        copies = torch.cat([rotate(images, a.expand(B)) for a in angles])  # copy-major [N*B, ...]
        out = self.core(copies).reshape(N, B, -1)
        # sum in sorted order: bitwise independent of the order of the copies
        return out.sort(dim=0).values.sum(0) / N
