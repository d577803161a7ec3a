"""Image networks of the ``image2d`` domain and the hooks the existing methods need for images.

Every model maps a ``Batch`` with an image field ``[B, C, H, W]`` (the first input of type
``"image"``/``"image:C"``) to invariant logits ``[B, n]``, n = ``field_dim(spec.output)``.
Rotations act as in ``equibench.symmetry.group2d`` (C4 exact with ``rot90``; other angles
interpolated, approximate).

Kinds (``build_image_model``), wired into the method names of the same name:

* ``baseline``: plain CNN ``ConvCore`` (conv 5x5 then 3x3, BatchNorm, ReLU, 2x2 average pool
  after the first two blocks, global mean, linear head); ``width`` = channels.
* ``augmentation``: the same CNN; ``image_train_transform`` rotates each training image by a
  random element of the task's group.
* ``escnn``: steerable CNN ``SteerableCNN``: escnn ``R2Conv`` layers on the regular
  representation of C_N (``width`` channels = width // N regular fields), or for SO(2) on
  band-limited Fourier fields (irreps 0..L) with the nonlinearity applied on ``n_samples``
  points of the circle; BatchNorm per field (statistics pooled over the group axis), ReLU, 2x2
  average pool (linear, so equivariant for any representation). Invariant head: group pooling
  (max over the N group channels for C_N; frequency-0 value and norms |c_k| for SO(2)), global
  mean, linear. Exact over every grid symmetry of the group (C4 and C8's quarter turns).
* ``frame_averaging``: exact group averaging f(x) = 1/|G| sum_g phi(g x) of the CNN phi over a
  cyclic group C_N (C4 exact; C8 through interpolation); the |G| outputs are summed in sorted
  order so the average does not depend on the order of the copies. ``stochastic=True``: one
  random element per image in training mode, the full average in eval mode.
* ``canonicalization``: a small escnn C_N canonicaliser c scores each group element,
  c(r^m x) = roll(c(x), m); k* = argmax; the CNN sees x_c = r^{-k*} x, so f(r^m x) = f(x)
  exactly wherever the argmax is unique (C4 exact). Training uses a straight-through weighting
  w = onehot(k*) + softmax(c) - stopgrad(softmax(c)) (forward value exactly one-hot). Prior:
  ``prior_weight * CE(c(x), identity index)``; ``identity_metric`` = share of inputs with k* = 0.

Parameter counts: ``params`` matches the whole model to +-10 % with ``build_at_params``; without
``params`` and ``width`` every kind is matched to the default baseline CNN (``DEFAULT_WIDTH``
channels, same depth), so default comparisons are parameter-matched.

Precision: escnn cannot build under a float64 default (its basis solver mixes dtypes) and
samples its kernel bases in float32, which breaks the exact rot90 symmetry of the filters at
~1e-7. Models are therefore built under float32, every escnn kernel basis is re-sampled in
float64 (``resample_bases_float64``) and the model is cast to the caller's default dtype; escnn's
own pooling modules (which allocate float32 outputs) are not used.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Batch

from ..core.errors import UserError
from ..symmetry.fieldtypes import field_dim
from ..symmetry.group2d import (act_on_batch, group_order, image_channels, is_2d_group, is_image_type,
                             is_invariant_type, rotate, sample_element)
from ..symmetry.precision import default_dtype
from ..core.spec import TaskSpec
from .base import build_at_params, count_parameters

DEFAULT_WIDTH = 32
DEFAULT_DEPTH = 4
POOLED_BLOCKS = 2  # 2x2 average pooling after the first POOLED_BLOCKS conv blocks
SO2_FALLBACK = "C8"  # discrete group used by frame averaging / canonicalisation for an SO(2) task

#: exact invariance by construction (over the grid symmetries: C4 exactly)
IMAGE_EXACT = {"escnn": True, "frame_averaging": True, "canonicalization": True,
               "baseline": False, "augmentation": False}
KIND_OPTIONS = {
    "baseline": {},
    "augmentation": {},
    "escnn": {"max_frequency": 3, "n_samples": 16},
    "frame_averaging": {"stochastic": False},
    "canonicalization": {"prior_weight": 1.0, "canon_width": None, "canon_depth": 2},
}


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
    """``baseline`` / ``augmentation``: the CNN on the image as given."""

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
    """``frame_averaging``: f(x) = 1/N sum_k phi(r^k x) over C_N (the frame is the whole group)."""

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


# ---- escnn steerable CNN ------------------------------------------------------------------------
def _escnn():
    from escnn import gspaces, group as egroup, nn as enn  # imported lazily (slow import)
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
    from escnn.nn.modules.basismanager.basisexpansion_singleblock import (SingleBlockBasisExpansion,
                                                                          normalize_basis)
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
        gspaces, egroup, enn = _escnn()
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
        _, _, enn = _escnn()
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
        _, _, enn = _escnn()
        self.layout, self.fields, self.pool = layout, fields, pool
        self.conv = enn.R2Conv(in_type, layout.field_type(fields), kernel, padding=kernel // 2,
                               initialize=initialize, recompute=recompute)
        self.norm = nn.BatchNorm3d(fields)
        if not layout.order:
            A = layout.sampling_matrix()
            self.register_buffer("A", A)
            self.register_buffer("A_pinv", torch.linalg.pinv(A))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, enn = _escnn()
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
        _, _, enn = _escnn()
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


# ---- canonicalisation ----------------------------------------------------------------------------
class _LastCall:
    """The canonicaliser's outputs of the last forward (for the prior loss and the identity
    metric hooks); dropped by deepcopy so a model with a live graph can still be copied."""

    def __init__(self) -> None:
        self.images: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> "_LastCall":
        return _LastCall()


class Canonicaliser(nn.Module):
    """Scores of the N elements of C_N: ``[B, N]`` with scores(r^m x) = roll(scores(x), m)
    (escnn regular fields, last layer one regular field, global mean over the image)."""

    def __init__(self, group: str, in_channels: int, fields: int, depth: int,
                 initialize: bool = True, recompute: bool = True) -> None:
        super().__init__()
        _, _, enn = _escnn()
        self.layout = FieldLayout(group, 0, 0)
        self.features = SteerableFeatures(self.layout, in_channels, fields, depth, initialize, recompute)
        self.score = enn.R2Conv(self.features.out_type, self.layout.field_type(1), 3, padding=1,
                                initialize=initialize, recompute=recompute)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, _, enn = _escnn()
        h = self.features(images)
        return self.score(enn.GeometricTensor(h, self.score.in_type)).tensor.mean((-2, -1))


class Canonicalised(ImageModel):
    """``canonicalization``: f(x) = phi(r^{-k*(x)} x), k* = argmax of the canonicaliser's scores."""

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


# ---- building ------------------------------------------------------------------------------------
def _check_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    if kind not in KIND_OPTIONS:
        raise UserError(f"unknown image model kind {kind!r} (known: {', '.join(KIND_OPTIONS)})")
    unknown = set(options) - set(KIND_OPTIONS[kind])
    if unknown:
        raise TypeError(f"image model {kind!r} got unknown option(s) {sorted(unknown)} "
                        f"(known: {sorted(KIND_OPTIONS[kind])})")
    return {**KIND_OPTIONS[kind], **options}


def _factory(kind: str, spec: TaskSpec, depth: int, group: str | None, opts: dict[str, Any]):
    """``(factory(size, fast) -> model, size of the default width, largest size to try)``."""
    if kind in ("baseline", "augmentation"):
        return (lambda w, fast=False: CNNClassifier(spec, w, depth)), 1, 512
    if kind == "frame_averaging":
        g = resolve_group(group, spec, discrete=True)
        return (lambda w, fast=False: GroupAveraged(spec, w, depth, g, bool(opts["stochastic"]))), 1, 512
    if kind == "canonicalization":
        g = resolve_group(group, spec, discrete=True)
        if opts["canon_width"] is not None and opts["canon_width"] < 1 or opts["canon_depth"] < 1:
            raise ValueError("canon_width and canon_depth must be positive")

        def canon(w: int, fast: bool = False) -> nn.Module:
            fields = opts["canon_width"] or max(2, w // (2 * group_order(g)))
            return Canonicalised(spec, w, depth, g, opts["prior_weight"], fields, opts["canon_depth"],
                                 initialize=not fast, recompute=not fast)
        return canon, 1, 512
    g = resolve_group(group, spec, discrete=False)
    order = group_order(g)
    dim = order or 2 * opts["max_frequency"] + 1

    def steerable(fields: int, fast: bool = False) -> nn.Module:
        return SteerableCNN(spec, fields, depth, g, opts["max_frequency"], opts["n_samples"],
                            initialize=not fast, recompute=not fast)
    return steerable, dim, max(4, 512 // dim)


def build_image_model(kind: str, spec: TaskSpec, *, width: int | None = None, depth: int | None = None,
                      params: int | None = None, group: str | None = None, **kind_options: Any) -> nn.Module:
    """The image model of method ``kind`` for ``spec`` (``model(batch) -> logits [B, n]``).

    ``width``: channels (escnn: ``width // |field|`` fields; default ``DEFAULT_WIDTH``);
    ``depth``: conv blocks (default ``DEFAULT_DEPTH``); ``params``: match the whole model's
    parameter count to +-10 % (``build_at_params``); with neither ``width`` nor ``params`` the
    target is the default baseline CNN's count. ``group``: a 2-D group ("C4", "C8", "SO2"); None
    or a 3-D name means the task's group. ``kind_options``: escnn ``max_frequency``,
    ``n_samples`` (SO(2) only); frame_averaging ``stochastic``; canonicalization
    ``prior_weight``, ``canon_width`` (canonicaliser fields; default width // (2N), at least 2),
    ``canon_depth``. The model is built under float32 (escnn needs it) and returned in the
    current default dtype."""
    opts = _check_options(kind, kind_options)
    depth = DEFAULT_DEPTH if depth is None else depth
    if depth < 1 or (width is not None and width < 1) or (params is not None and params < 1):
        raise ValueError("width, depth and params must be positive")
    target = params
    if width is None and params is None and kind not in ("baseline", "augmentation", "frame_averaging"):
        with default_dtype(torch.float32):
            target = count_parameters(CNNClassifier(spec, DEFAULT_WIDTH, depth))
    outer = torch.get_default_dtype()
    rng = torch.random.get_rng_state()
    with default_dtype(torch.float32):
        factory, dim, hi = _factory(kind, spec, depth, group, opts)
        default = max(1, (width or DEFAULT_WIDTH) // dim)
        if target is None:
            size = default
        else:  # match on cheap models (no init, cached escnn bases), then build the real one
            size = build_at_params(lambda s: factory(s, True), target, default, lo=1, hi=hi).size
        torch.random.set_rng_state(rng)
        model = factory(size)
        resample_bases_float64(model)
    return model.to(outer)


# ---- wiring helpers and hooks for the methods ---------------------------------------------------
def is_image_model(model: nn.Module) -> bool:
    """True for models built by ``build_image_model`` (lets hooks that get no ``spec`` dispatch)."""
    return isinstance(model, ImageModel)


def image_size_options(method: Any) -> dict[str, Any]:
    """``width``, ``depth``, ``params`` and ``group`` for ``build_image_model`` from a ``Method``'s
    options. ``width`` / ``depth`` are passed only when set to something other than the method's
    own (graph-tuned) defaults, so that image models default to the parameter-matched image sizes;
    ``params`` is passed as is; a 3-D ``group`` is dropped (the task's 2-D group is used)."""
    sig = inspect.signature(type(method).__init__).parameters
    opts = getattr(method, "options", {})
    out: dict[str, Any] = {"params": opts.get("params")}
    for name in ("width", "depth"):
        value = opts.get(name)
        default = sig[name].default if name in sig else inspect.Parameter.empty
        out[name] = None if value is None or value == default else value
    group = opts.get("group")
    out["group"] = group if is_2d_group(group) else None
    return out


def image_train_transform(batch: Batch, spec: TaskSpec, generator: torch.Generator) -> Batch:
    """Augmentation: every training image rotated by its own random element of the task's group
    (C4 exactly; C8 / SO(2) by interpolation)."""
    g = sample_element(batch, spec.group, generator, permute=False)
    return act_on_batch(batch, spec, g)


def image_auxiliary_loss(model: nn.Module, batch: Batch, pred: torch.Tensor) -> torch.Tensor | None:
    """The canonicaliser's prior (``Canonicalised.prior_loss``); None for other models."""
    return model.prior_loss(batch) if isinstance(model, Canonicalised) else None


@torch.no_grad()
def image_extra_metrics(model: nn.Module, batch: Batch, pred: torch.Tensor) -> dict[str, float]:
    """Canonicalisation: ``identity_metric`` (share of inputs mapped to the identity element) and
    ``prior_ce`` (cross-entropy of the scores to the identity index); {} for other models."""
    if not isinstance(model, Canonicalised):
        return {}
    scores = model.scores_for(batch)
    zero = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return {"identity_metric": (scores.argmax(-1) == 0).double().mean().item(),
            "prior_ce": F.cross_entropy(scores, zero).item()}
