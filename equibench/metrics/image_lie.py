"""The Lie derivative on images (issue 22, item 3): local equivariance error per continuous generator.

Gruver, Finzi, Goldblum and Wilson, "The Lie derivative for measuring learned equivariance"
(ICLR 2023, arXiv 2210.02984): for a one-parameter group g_t = exp(tA) acting on images and an
invariant classifier f (logits), the Lie derivative

    L_A f(x) = d/dt f(g_t . x) |_{t=0},      (g . x)(p) = x(g^-1 p),

is zero for every x exactly when f is invariant under the whole subgroup; its norm is their
"local equivariance error". Here A runs over five generators of the planar affine group
(``group2d.AFFINE_GENERATORS``; pixel coordinates, x right, y down, origin at the image centre):

* ``rotation``: A = [[0, 1], [-1, 0]], t in radians (the direction of ``group2d.rotate``);
* ``translation_x`` / ``translation_y``: a = e_x / e_y, t in pixels (content moves right / down);
* ``scale``: A = 1, t = log of the isotropic scale factor;
* ``shear``: A = [[0, 1], [0, 0]] (x -> x + t y), t dimensionless.

How it is computed: g_t . x is an explicit affine warp (``group2d.affine_warp``: ``affine_grid`` /
``grid_sample``, bilinear, ``align_corners=False``, **zero padding**: background flows in from
outside, the digits' own background; no disc mask), and the derivative is the central difference

    D_A(x) = [f(g_h . x) - f(g_-h . x)] / (2h),      h = ``step`` (default 1e-4),

of the model rebuilt in float64 (``ProbeContext.float64``), in eval mode. At t = 0 the warp samples
every pixel at its centre; for h below one pixel of displacement the difference of the two warped
images is -h (v . grad_c x) per side up to O(h^2) bilinear cross terms, with v(p) = A p the velocity
field and grad_c the central-difference image gradient: the measured quantity is the derivative of
f along the image's own tangent -v . grad_c x, the continuum Lie derivative as the pixel grid
resolves it (aliasing included, as in the paper). Reported per generator, relative to how far
apart the logits of different images are:

    rel_b = ||D_A(x_b)|| / s,      s = sqrt(mean_b ||f(x_b) - mean_b' f(x_b')||^2) + 1e-12

(the RMS distance of the images' logits from their mean; for a single image, its logits' norm),
over the first ``images`` test images (their upright copies where the task's items carry an
``angle``: digits holds each test image under every test element): ``rel_mean`` and ``rel_max``
over images. Gruver et al. report the norm of L_A f itself; some scale is needed to compare models
whose logits differ in size. Not the logits' own norm per image (as the graph3d ``lie_derivative``
does): at initialisation an image classifier's logits are dominated by what they share across
inputs (the head's bias and the mean activation), so on digits (sklearn, 32 images, init) the plain
CNN's logits have norm 0.31 but differ between images by 5.5e-4, and relative to their norm it
would read as rotation-invariant to 4e-3 while an escnn model, whose logits depend more on the
input, read 6 to 16x worse; relative to the spread between images the CNN reads 2.1 per radian and
escnn SO(2) 0.5 (docs/design.md, "The Lie derivative on images"). The measured images should
differ in content: ``s`` is the scale of what distinguishes them.

What to expect: a linear model with global average pooling is translation invariant away from the
border (bilinear shifts preserve the sum of the pixels); a CNN adds the aliasing of its
nonlinearities and strided pooling; an escnn SO(2) model has a rotation Lie derivative set by the
discretisation of its filters, of its circle-sampled nonlinearity and of the grid (and by strided
pooling); exact C4/C8 methods are exact only for the discrete rotations, so their continuous
rotation derivative need not vanish. Probe ``image_lie_derivative``
(image2d, init and trained), metrics ``image_lie.<stage>.fp64.<generator>.<stat>``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch_geometric.data import Batch, Data

from ..core.errors import UserError, did_you_mean
from ..core.registry import register_probe
from ..core.spec import TaskSpec
from ..symmetry.group2d import AFFINE_GENERATORS, affine_element, affine_warp, is_image_type
from ..symmetry.precision import default_dtype
from .catalogue import LIE_STATS, STAGES, STAT_WORDS, MetricSpec
from .equivariance import EPS, cast_batch, model_in_dtype
from .probe import Probe, ProbeContext, ProbeSettings, Reading, reading

GENERATORS = tuple(AFFINE_GENERATORS)
#: the unit of t per generator (the relative derivative is per unit of t)
UNITS = {"rotation": "per rad", "translation_x": "per px", "translation_y": "per px", "scale": "per log-scale",
         "shear": "per unit shear"}
#: images per forward pass (the warped copies of the measured images are stacked up to this many)
MAX_BATCH = 256


def image_lie_metric(stage: str, generator: str, stat: str) -> str:
    """``image_lie.<stage>.fp64.<generator>.<stat>`` (stage in ``STAGES``, stat in ``LIE_STATS``)."""
    for kind, value, allowed in (("stage", stage, STAGES), ("affine generator", generator, GENERATORS),
                                 ("Lie derivative stat", stat, LIE_STATS)):
        if value not in allowed:
            raise did_you_mean(kind, value, allowed)
    return f"image_lie.{stage}.fp64.{generator}.{stat}"


def image_field(spec: TaskSpec) -> str:
    """The name of the task's first image input."""
    for name, t in spec.inputs.items():
        if is_image_type(t):
            return name
    raise UserError(f"task {spec.name!r} has no image input (types: {spec.inputs})")


def upright_images(data: Sequence[Data], n: int) -> list[Data]:
    """The first ``n`` items of ``data`` whose ``angle`` is 0 (the upright copy of each test image
    on digits); all items when none carries an ``angle``."""
    upright = [d for d in data if "angle" in d and float(d.angle.reshape(-1)[0]) == 0.0]
    return list(upright or data)[:n]


@torch.no_grad()
def image_lie_derivative(model: nn.Module, data: Sequence[Data], spec: TaskSpec, step: float = 1e-4,
                         generators: Sequence[str] = GENERATORS, dtype: torch.dtype = torch.float64,
                         device: torch.device | None = None) -> dict[str, dict[str, Any]]:
    """Per generator: ``rel_mean``, ``rel_max`` (module docstring), ``abs_max`` (max |D_A f|
    elementwise) and ``derivative`` (``[B, n_out]``, the central difference itself) of ``model``
    on the images of ``data``; ``images`` = how many."""
    if step <= 0:
        raise ValueError(f"the step must be positive, got {step}")
    field = image_field(spec)
    model = model_in_dtype(model, dtype)
    was_training = model.training
    model.eval()
    try:
        with default_dtype(dtype):
            x = cast_batch(Batch.from_data_list(list(data)), dtype)
            if device is not None:
                x = x.to(device)
            images = x[field]
            warped = [images] + [affine_warp(images, affine_element(g, s * step)) for g in generators for s in (1, -1)]
            out = _forward(model, list(data), field, warped, dtype, images.device)
            fx = out[0]
            scale = logit_spread(fx)
            res: dict[str, dict[str, Any]] = {}
            for i, g in enumerate(generators):
                deriv = (out[1 + 2 * i] - out[2 + 2 * i]) / (2 * step)
                rel = (deriv.reshape(len(deriv), -1).norm(dim=-1) / scale).double()
                res[g] = {"rel_mean": rel.mean().item(), "rel_max": rel.max().item(),
                          "abs_max": deriv.abs().max().item(), "derivative": deriv, "logits": fx,
                          "images": len(data)}
    finally:
        model.train(was_training)
    return res


def logit_spread(fx: torch.Tensor) -> torch.Tensor:
    """The scale the derivatives are measured against: the RMS distance of the images' logits
    ``fx [B, n]`` from their mean over the images, sqrt(mean_b ||f(x_b) - mean f||^2) (+ 1e-12);
    for a single image, its logits' norm."""
    flat = fx.reshape(len(fx), -1)
    if len(flat) < 2:
        return flat.norm(dim=-1).max() + EPS
    return (flat - flat.mean(0)).pow(2).sum(-1).mean().sqrt() + EPS


def _forward(model: nn.Module, data: list[Data], field: str, images: list[torch.Tensor], dtype: torch.dtype,
             device: torch.device) -> list[torch.Tensor]:
    """``model`` on each image stack of ``images`` (each ``[B, C, H, W]``, the items of ``data``
    with their image replaced), as few stacks per forward as ``MAX_BATCH`` allows."""
    per = max(1, MAX_BATCH // max(len(data), 1))
    outs: list[torch.Tensor] = []
    batches: dict[int, Batch] = {}
    for i in range(0, len(images), per):
        chunk = images[i:i + per]
        if len(chunk) not in batches:
            batches[len(chunk)] = cast_batch(Batch.from_data_list(data * len(chunk)), dtype).to(device)
        batch = batches[len(chunk)].clone()
        batch[field] = torch.cat(chunk)
        outs += list(model(batch).split(len(data)))
    return outs


# ---------------------------------------------------------------------------------------------
# the probe

def _specs() -> tuple[MetricSpec, ...]:
    what = {"rotation": "rotation about the image centre (t in radians)",
            "translation_x": "translation along x (t in pixels)", "translation_y": "translation along y (t in pixels)",
            "scale": "isotropic scaling about the image centre (t = log scale factor)",
            "shear": "shear x -> x + t y about the image centre"}
    return tuple(MetricSpec(
        image_lie_metric(stage, g, stat), f"image Lie deriv. {g.replace('_', ' ')} fp64 {stage}, {STAT_WORDS[stat]}",
        "image_lie", unit=UNITS[g], direction="lower", aggregate="max" if stat == "rel_max" else "mean",
        stage=stage, dtype="fp64", stat=stat, axis=g, number_format="sci", role="measurement",
        description=f"Lie derivative of the logits along {what[g]} (Gruver et al., ICLR 2023): central "
                    "difference [f(g_h x) - f(g_-h x)] / 2h of an explicit affine warp of the image "
                    "(affine_grid / grid_sample, bilinear, zero padding), h = image_lie_derivative_step "
                    "(default 1e-4), of the float64 model in eval mode; its norm per image relative to the RMS "
                    "distance of the images' logits from their mean (how far apart different images' logits "
                    f"are), {'mean' if stat == 'rel_mean' else 'max'} over the upright copies of the first "
                    "equivariance_graphs test images")
        for stage in STAGES for g in GENERATORS for stat in LIE_STATS)


@register_probe("image_lie_derivative")
class ImageLieDerivativeProbe(Probe):
    """Relative Lie derivative of the logits along rotation, translations, scaling and shear
    (``image_lie_derivative``) of the float64 model, at init and trained, on the first ``images``
    test images (image2d)."""

    METRICS = _specs()
    phases = ("init", "trained")
    order = 31
    domains = ("image2d",)
    keys = {"equivariance_graphs": "images"}

    class Settings(ProbeSettings):
        images: int = 32  # test images measured (suite key equivariance_graphs)
        step: float = 1e-4  # central-difference step in the group parameter t (suite key image_lie_derivative_step)

    def measure(self, ctx: ProbeContext, phase: str) -> list[Reading]:
        data = upright_images(ctx.test_data, self.settings.images)
        res = image_lie_derivative(ctx.float64().to(ctx.device), data, ctx.spec, step=self.settings.step,
                                   device=ctx.device)
        return [reading(image_lie_metric(phase, g, stat), res[g][stat], stage=phase, dtype="fp64", group=ctx.group,
                        batch_size=len(data), repeats=1) for g in GENERATORS for stat in LIE_STATS]


__all__ = ["GENERATORS", "ImageLieDerivativeProbe", "image_lie_derivative", "image_lie_metric", "upright_images"]
