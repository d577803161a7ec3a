"""Image canonicalisation: a learned C_N canonicaliser in front of the plain CNN.

A small escnn C_N canonicaliser c (``Canonicaliser``: ``steerable2d.SteerableFeatures`` on
regular fields, then one regular field, global mean) scores each group element,
c(r^m x) = roll(c(x), m); k* = argmax; the CNN phi (``cnn.ConvCore``) sees x_c = r^{-k*} x, so
f(r^m x) = f(x) exactly wherever the argmax is unique (C4 exact). Training uses a
straight-through weighting w = onehot(k*) + softmax(c) - stopgrad(softmax(c)) (forward value
exactly one-hot). Prior (``Canonicalised.prior_loss``): ``prior_weight * CE(c(x), identity
index)``; the ``canonicalization`` method reports ``identity_metric`` = share of inputs with
k* = 0. Built like every escnn image model (float32 build, float64 bases: ``steerable2d``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Batch

from ...core.spec import TaskSpec
from ...symmetry.group2d import group_order, rotate
from .cnn import ConvCore, ImageModel, group_angles
from .steerable2d import FieldLayout, SteerableFeatures, escnn_modules


class _LastCall:
    """The canonicaliser's outputs of the last forward (for the prior loss and the identity
    metric hooks); dropped by deepcopy so a model with a live graph can still be copied."""

    def __init__(self) -> None:
        self.images: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> _LastCall:
        return _LastCall()


class Canonicaliser(nn.Module):
    """Scores of the N elements of C_N: ``[B, N]`` with scores(r^m x) = roll(scores(x), m)
    (escnn regular fields, last layer one regular field, global mean over the image)."""

    def __init__(self, group: str, in_channels: int, fields: int, depth: int,
                 initialize: bool = True, recompute: bool = True) -> None:
        super().__init__()
        _, _, enn = escnn_modules()
        self.layout = FieldLayout(group, 0, 0)
        self.features = SteerableFeatures(self.layout, in_channels, fields, depth, initialize, recompute)
        self.score = enn.R2Conv(self.features.out_type, self.layout.field_type(1), 3, padding=1,
                                initialize=initialize, recompute=recompute)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, _, enn = escnn_modules()
        h = self.features(images)
        return self.score(enn.GeometricTensor(h, self.score.in_type)).tensor.mean((-2, -1))


class Canonicalised(ImageModel):
    """``canonicalization``: f(x) = phi(r^{-k*(x)} x), k* = argmax of the canonicaliser's scores."""

    angles: torch.Tensor  # buffer

    def __init__(self, spec: TaskSpec, width: int, depth: int, group: str, prior_weight: float,
                 canon_fields: int, canon_depth: int, initialize: bool = True,
                 recompute: bool = True) -> None:
        super().__init__(spec)
        self.group, self.prior_weight, self.size = group, float(prior_weight), width
        self.order = group_order(group)
        self.canonicaliser = Canonicaliser(group, self.in_channels, canon_fields, canon_depth,
                                           initialize, recompute)
        self.core = ConvCore(self.in_channels, self.n_out, width, depth)
        self.register_buffer("angles", group_angles(group), persistent=False)
        self.last = _LastCall()

    def canonical_element(self, images: torch.Tensor) -> torch.Tensor:
        """k* ``[B]`` (long): the element the canonicaliser picks."""
        return self.canonicaliser(images).argmax(-1)

    def canonicalise(self, images: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """x_c = r^{-k*} x (straight-through weights in training mode with gradients enabled)."""
        if scores is None:
            scores = self.canonicaliser(images)
        k = scores.argmax(-1)
        angles = self.angles.to(device=images.device, dtype=torch.float64)
        if not (self.training and torch.is_grad_enabled()):
            return rotate(images, -angles[k])
        soft = scores.softmax(-1)
        w = F.one_hot(k, self.order).to(soft.dtype) + (soft - soft.detach())  # forward value: one-hot
        B = images.shape[0]
        copies = torch.stack([rotate(images, -a.expand(B)) for a in angles], 1)  # [B, N, C, H, W]
        return torch.einsum("bn,bnchw->bchw", w, copies)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        scores = self.canonicaliser(images)
        self.last.images, self.last.scores = images, scores
        return self.core(self.canonicalise(images, scores))

    def scores_for(self, batch: Batch) -> torch.Tensor:
        """The scores of ``batch`` (cached from the last forward when it saw the same images)."""
        images = batch[self.field]
        if self.last.images is images and self.last.scores is not None:
            return self.last.scores
        return self.canonicaliser(images)

    def prior_loss(self, batch: Batch) -> torch.Tensor | None:
        """``prior_weight * CE(scores, identity index 0)``: pushes upright data to the identity."""
        if self.prior_weight == 0:
            return None
        scores = self.scores_for(batch)
        target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        return self.prior_weight * F.cross_entropy(scores, target)
