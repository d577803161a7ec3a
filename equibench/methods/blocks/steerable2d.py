"""escnn steerable CNNs on images: fields, blocks, invariant pooling, float64 basis re-sampling.

``SteerableCNN`` (the ``escnn`` method's image model): escnn ``R2Conv`` layers on the regular
representation of C_N (``width`` channels = width // N regular fields), or for SO(2) on
band-limited Fourier fields (irreps 0..L) with the nonlinearity applied on ``n_samples`` points of
the circle; BatchNorm per field (statistics pooled over the group axis), ReLU, 2x2 average pool
(linear, so equivariant for any representation). Invariant head: group pooling (max over the N
group channels for C_N; frequency-0 value and norms |c_k| for SO(2)), global mean, linear. Exact
over every grid symmetry of the group (C4 and C8's quarter turns). ``SteerableFeatures`` (the
equivariant trunk) is also the body of the image canonicaliser (``canon2d``).

Precision: escnn cannot build under a float64 default (its basis solver mixes dtypes) and
samples its kernel bases in float32, which breaks the exact rot90 symmetry of the filters at
~1e-7. Models are therefore built under float32, every escnn kernel basis is re-sampled in
float64 (``resample_bases_float64``) and the model is cast to the caller's default dtype
(``image.build_image_model`` does all three); escnn's own pooling modules (which allocate
float32 outputs) are not used. escnn is imported lazily (slow import), only when a block is built.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.spec import TaskSpec
from ...symmetry.group2d import group_order
from .cnn import POOLED_BLOCKS, ImageModel


# ---- escnn steerable CNN ------------------------------------------------------------------------
def field_size(group: str, max_frequency: int) -> int:
    """Channels of one field (``FieldLayout.dim``, without importing escnn): N for a regular C_N
    field, 2L + 1 for an SO(2) field band-limited to frequency L = ``max_frequency``."""
    return group_order(group) or 2 * max_frequency + 1


def escnn_modules():
    """escnn's ``(gspaces, group, nn)`` modules."""
    # imported lazily (slow import)
    from escnn import group as egroup
    from escnn import gspaces
    from escnn import nn as enn
    return gspaces, egroup, enn


_FLOAT64_BASES: dict[Any, torch.Tensor] = {}


def resample_bases_float64(module: nn.Module) -> None:
    """Re-sample every escnn kernel basis inside ``module`` in float64 (escnn samples in float32,
    which breaks the exact rot90 symmetry of the filters at ~1e-7). The analytic basis is copied
    before casting (escnn caches and shares basis objects between layers and models); results are
    memoised per (basis, points, mask), like escnn's own cache."""
    if not any(type(m).__module__.startswith("escnn.") for m in module.modules()):
        return  # nothing to do (and no slow escnn import) for plain CNNs
    from escnn.nn.modules.basismanager.basisexpansion_blocks import BlocksBasisExpansion
    from escnn.nn.modules.basismanager.basisexpansion_singleblock import SingleBlockBasisExpansion, normalize_basis
    for m in module.modules():
        if not isinstance(m, BlocksBasisExpansion):
            continue
        for sub in m.children():
            if not isinstance(sub, SingleBlockBasisExpansion):
                continue
            key = (sub.basis, m.points.tobytes(), sub._mask.numpy().tobytes())
            if key not in _FLOAT64_BASES:
                basis = copy.deepcopy(sub.basis).to(torch.float64)
                sampled = basis.sample(torch.as_tensor(m.points, dtype=torch.float64)).permute(1, 2, 3, 0)
                sizes = torch.tensor([attr["shape"][0] for attr in basis], dtype=torch.float64)
                _FLOAT64_BASES[key] = normalize_basis(sampled, sizes)[sub._mask]
            sampled = _FLOAT64_BASES[key]
            if sampled.shape != sub.sampled_basis.shape:
                raise RuntimeError("escnn basis re-sampling changed the basis shape")
            sub.sampled_basis = sampled.clone()


class FieldLayout:
    """How one feature field is laid out: C_N regular (``dim`` = N group channels) or SO(2)
    band-limited (irreps 0..L, ``dim`` = 2L + 1, sampled on ``n_samples`` circle points)."""

    def __init__(self, group: str, max_frequency: int, n_samples: int) -> None:
        gspaces, egroup, enn = escnn_modules()
        self.group, self.order = group, group_order(group)
        if self.order:
            self.gspace = gspaces.rot2dOnR2(N=self.order)
            self.repr = self.gspace.regular_repr
        else:
            if max_frequency < 1 or n_samples <= 2 * max_frequency:
                raise ValueError("SO(2) fields need max_frequency >= 1 and n_samples > 2 * max_frequency")
            self.gspace = gspaces.rot2dOnR2(N=-1, maximum_frequency=max(6, 2 * max_frequency))
            G = self.gspace.fibergroup
            self.repr = egroup.directsum([G.irrep(k) for k in range(max_frequency + 1)],
                                         name=f"bl{max_frequency}")
        self.max_frequency, self.n_samples = max_frequency, n_samples
        self.dim = self.repr.size
        self.trivial = self.gspace.trivial_repr

    def field_type(self, n: int):
        _, _, enn = escnn_modules()
        return enn.FieldType(self.gspace, n * [self.repr])

    def sampling_matrix(self) -> torch.Tensor:
        """SO(2): ``A [n_samples, dim]`` with f(theta_i) = A_i c, A_i = [rho_k(theta_i)^-1]_{0,:}
        concatenated over k, so rotating c by rho(phi) shifts f by phi (float64)."""
        import numpy as np
        G = self.gspace.fibergroup
        rows = []
        for i in range(self.n_samples):
            g = G.element(2 * math.pi * i / self.n_samples)
            rows.append(np.concatenate([np.asarray(G.irrep(k)(g), dtype=np.float64).T[0]
                                        for k in range(self.max_frequency + 1)]))
        return torch.tensor(np.stack(rows), dtype=torch.float64)


class SteerableBlock(nn.Module):
    """R2Conv -> BatchNorm per field -> ReLU (-> 2x2 average pool), on plain tensors."""

    def __init__(self, layout: FieldLayout, in_type, fields: int, kernel: int, pool: bool,
                 initialize: bool, recompute: bool) -> None:
        super().__init__()
        _, _, enn = escnn_modules()
        self.layout, self.fields, self.pool = layout, fields, pool
        self.conv = enn.R2Conv(in_type, layout.field_type(fields), kernel, padding=kernel // 2,
                               initialize=initialize, recompute=recompute)
        self.norm = nn.BatchNorm3d(fields)
        if not layout.order:
            A = layout.sampling_matrix()
            self.register_buffer("A", A)
            self.register_buffer("A_pinv", torch.linalg.pinv(A))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, enn = escnn_modules()
        y = self.conv(enn.GeometricTensor(x, self.conv.in_type)).tensor
        B, _, H, W = y.shape
        y = y.reshape(B, self.fields, self.layout.dim, H, W)
        if self.layout.order:  # regular fields: group channels are function values on C_N
            y = F.relu(self.norm(y))
        else:  # Fourier fields: sample on the circle, normalise + ReLU there, transform back
            s = torch.einsum("sd,bfdhw->bfshw", self.A.to(y.dtype), y)
            y = torch.einsum("ds,bfshw->bfdhw", self.A_pinv.to(y.dtype), F.relu(self.norm(s)))
        y = y.reshape(B, -1, H, W)
        return F.avg_pool2d(y, 2) if self.pool else y


class SteerableFeatures(nn.Module):
    """``depth`` steerable blocks (first kernel 5x5, then 3x3): images -> equivariant fields."""

    def __init__(self, layout: FieldLayout, in_channels: int, fields: int, depth: int,
                 initialize: bool = True, recompute: bool = True) -> None:
        super().__init__()
        _, _, enn = escnn_modules()
        in_type = enn.FieldType(layout.gspace, in_channels * [layout.trivial])
        blocks = []
        for i in range(depth):
            blocks.append(SteerableBlock(layout, in_type, fields, 5 if i == 0 else 3, i < POOLED_BLOCKS,
                                         initialize, recompute))
            in_type = blocks[-1].conv.out_type
        self.blocks = nn.ModuleList(blocks)
        self.out_type = in_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def invariant_pool(x: torch.Tensor, layout: FieldLayout, fields: int) -> torch.Tensor:
    """Group pooling of ``[B, fields * dim, H, W]``: max over the N channels of each regular C_N
    field; for SO(2) fields the frequency-0 value and the norm of each frequency k >= 1."""
    B, _, H, W = x.shape
    x = x.reshape(B, fields, layout.dim, H, W)
    if layout.order:
        return x.amax(2)
    parts = [x[:, :, :1]]
    for k in range(1, layout.max_frequency + 1):
        parts.append((x[:, :, 2 * k - 1:2 * k + 1].pow(2).sum(2, keepdim=True) + 1e-12).sqrt())
    return torch.cat(parts, 2).reshape(B, -1, H, W)


class SteerableCNN(ImageModel):
    """``escnn``: steerable features, invariant group pooling, global mean, linear head."""

    def __init__(self, spec: TaskSpec, fields: int, depth: int, group: str, max_frequency: int,
                 n_samples: int, initialize: bool = True, recompute: bool = True) -> None:
        super().__init__(spec)
        self.layout = FieldLayout(group, max_frequency, n_samples)
        self.features = SteerableFeatures(self.layout, self.in_channels, fields, depth, initialize, recompute)
        n_inv = fields * (1 if self.layout.order else max_frequency + 1)
        self.head = nn.Linear(n_inv, self.n_out)
        self.group, self.fields, self.size = group, fields, fields

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        h = invariant_pool(self.features(images), self.layout, self.fields)
        return self.head(h.mean((-2, -1)))
