"""Planar rotations acting on image batches (the ``image2d`` domain's group actions).

Same interface as ``equibench.symmetry.group3d`` (``sample_element``, ``act_on_batch``,
``act_on_output``), so ``equivariance_error`` measures images through the same code path as graphs.

Groups: ``"C<N>"`` (cyclic, angles 2 pi k / N, k uniform) and ``"SO2"`` (angle uniform in
[0, 2 pi)). One element per image. An element rotates every image field about the image centre
(pixel (H-1)/2, (W-1)/2) by its angle, in the direction of ``torch.rot90(x, 1, dims=(-2, -1))``:

* angles that are multiples of pi/2 (within 1e-9) are applied **exactly** with ``torch.rot90``
  (a pixel permutation; every element of C4, and the even elements of C8);
* any other angle is applied by bilinear interpolation (``grid_sample``, zeros outside) and the
  result is multiplied by the disc mask of radius min(H, W)/2 (the "padded, masked disc"
  convention of the ``digits`` task). Interpolation is **approximate**: interpolated rotations do
  not compose exactly and blur the image, so an invariance error measured with them is not zero
  even for a model that is exactly invariant to continuous rotations of the underlying signal.
  Invariance error is exact only for C4 (multiples of 90 degrees).

Field types: ``"image"`` (one channel, ``[B, 1, H, W]``) or ``"image:C"`` (``C`` channels) rotate;
fields whose type is made of rotation invariants (e3nn scalars ``"0e"``/``"0o"``, e.g. ``"10x0e"``
logits) are unchanged. There is no node permutation for images (``perm`` is ``None``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TypeGuard

import torch
import torch.nn.functional as F
from torch_geometric.data import Batch

from ..core.errors import UserError
from ..core.spec import TaskSpec
from .fieldtypes import POINT, irreps

IMAGE = "image"
EXACT_TOL = 1e-9  # an angle within this of a multiple of pi/2 is applied with torch.rot90


def is_image_type(t: str) -> bool:
    """True for ``"image"`` / ``"image:C"`` field types."""
    return t == IMAGE or t.startswith(IMAGE + ":")


def image_channels(t: str) -> int:
    """Number of channels of an image field type (``"image"`` -> 1, ``"image:3"`` -> 3)."""
    if t == IMAGE:
        return 1
    m = re.fullmatch(r"image:(\d+)", t)
    if not m or int(m.group(1)) < 1:
        raise UserError(f"invalid image field type {t!r} (use 'image' or 'image:C')")
    return int(m.group(1))


def group_order(group: str) -> int:
    """|G| for "C<N>" (N >= 1); 0 for the continuous "SO2". Other names are user errors."""
    if group == "SO2":
        return 0
    m = re.fullmatch(r"C(\d+)", group)
    if not m or int(m.group(1)) < 1:
        raise UserError(f"unknown 2-D group {group!r} (known: C<N> such as C4, C8; SO2)")
    return int(m.group(1))


def is_2d_group(group: str | None) -> TypeGuard[str]:
    """True when ``group`` names a planar rotation group understood here."""
    if not group:
        return False
    try:
        group_order(group)
    except UserError:
        return False
    return True


def disc_mask(h: int, w: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``[h, w]`` 0/1 mask of the pixels whose centre lies within min(h, w)/2 of the image centre.

    Invariant under ``torch.rot90`` for square images (rot90 maps the pixel grid onto itself and
    preserves distances to the centre)."""
    ys = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    r2 = ys[:, None] ** 2 + xs[None, :] ** 2
    return (r2 <= (min(h, w) / 2) ** 2).to(dtype=dtype, device=device)


def quarter_turns(angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, exact)``: the nearest number of quarter turns (mod 4) and whether the angle is one."""
    q = angle.double() / (math.pi / 2)
    k = torch.round(q)
    exact = (q - k).abs() < EXACT_TOL
    return torch.remainder(k.long(), 4), exact


def interpolate_rotation(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Bilinear rotation of ``images [B, C, H, W]`` by ``angle [B]`` (radians, rot90 direction)
    about the image centre; zeros flow in from outside; the disc mask is applied to the result."""
    B, _, H, W = images.shape
    if H != W:
        raise UserError(f"rotations need square images, got {H}x{W}")
    c, s = torch.cos(angle.double()), torch.sin(angle.double())
    # output pixel p samples the input at R p (normalised x, y coordinates), R = [[c, -s], [s, c]]
    theta = torch.zeros(B, 2, 3, dtype=torch.float64, device=angle.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = c, -s, s, c
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out * disc_mask(H, W, images.dtype, images.device)


def rotate(images: torch.Tensor, angle: torch.Tensor | float) -> torch.Tensor:
    """Rotate each image of ``images [B, C, H, W]`` by its ``angle`` (radians; a ``[B]`` tensor or
    one float for all). Multiples of pi/2 use ``torch.rot90`` exactly; other angles interpolate
    (approximate; see the module docstring)."""
    B = images.shape[0]
    angle = torch.as_tensor(angle, dtype=torch.float64).to(images.device)
    if angle.dim() == 0:
        angle = angle.expand(B)
    if angle.shape != (B,):
        raise ValueError(f"need one angle per image: {tuple(angle.shape)} for {B} images")
    k, exact = quarter_turns(angle)
    out = torch.empty_like(images)
    for turns in range(4):
        sel = exact & (k == turns)
        if sel.any():
            out[sel] = torch.rot90(images[sel], turns, dims=(-2, -1))
    if (~exact).any():
        sel = ~exact
        out[sel] = interpolate_rotation(images[sel], angle[sel])
    return out


@dataclass
class PlanarRotation:
    """One rotation angle per image (``angle [B]``, radians, always float64 so that multiples of
    pi/2 stay recognisable); ``order`` = N for C_N elements, 0 for SO(2). No node permutation."""

    angle: torch.Tensor
    order: int = 0
    perm: None = None

    def to(self, dtype: torch.dtype | None = None,
           device: torch.device | str | None = None) -> PlanarRotation:
        """Move to ``device``; the angle stays float64 whatever ``dtype`` (the images are rotated
        in their own dtype)."""
        return PlanarRotation(self.angle.to(device=device, dtype=torch.float64), self.order)

    def inverse(self) -> PlanarRotation:
        return PlanarRotation(-self.angle, self.order)


def sample_element(batch: Batch, group: str, generator: torch.Generator, permute: bool = True,
                   **kw) -> PlanarRotation:
    """One random element of ``group`` ("C<N>": uniform k, angle 2 pi k / N; "SO2": uniform angle)
    per image of ``batch``. ``permute`` is accepted for interface compatibility and ignored
    (images have no node order); other keywords are ignored too."""
    n = group_order(group)
    B = int(batch.num_graphs)
    if n:
        k = torch.randint(n, (B,), generator=generator)
        angle = 2 * math.pi * k.double() / n
    else:
        angle = torch.rand(B, generator=generator, dtype=torch.float64) * (2 * math.pi)
    return PlanarRotation(angle, n)


def is_invariant_type(t: str) -> bool:
    """True for types made of l = 0 irreps only (unchanged by every planar rotation)."""
    if t == POINT or is_image_type(t):
        return False
    return all(ir.l == 0 for _, ir in irreps(t))  # planar rotations: every l = 0 irrep is invariant


def _act(value: torch.Tensor, t: str, g: PlanarRotation) -> torch.Tensor:
    if is_image_type(t):
        return rotate(value, g.angle.to(value.device))
    if is_invariant_type(t):
        return value
    raise UserError(f"planar rotations do not act on field type {t!r} (supported: image, invariant scalars)")


def act_on_output(out: torch.Tensor, spec: TaskSpec, g: PlanarRotation, batch: Batch) -> torch.Tensor:
    """rho_out(g) on a prediction or target: identity for invariant outputs (e.g. "10x0e" logits),
    the same rotation for image outputs (graph level, ``[B, C, H, W]``)."""
    return _act(out, spec.output, g)


def act_on_batch(batch: Batch, spec: TaskSpec, g: PlanarRotation, target: bool = True) -> Batch:
    """``g`` applied to every typed input field of ``batch`` (images rotated per image, invariant
    fields unchanged) and to the target ``y`` when ``target``. Returns a new batch."""
    new = batch.clone()
    for name, t in spec.inputs.items():
        new[name] = _act(batch[name], t, g)
    if target and "y" in batch:
        new.y = act_on_output(batch.y, spec, g, batch)
    return new


# ---- continuous affine warps (the Lie derivative on images, ``metrics/image_lie.py``) -------------
#: generators A of one-parameter subgroups exp(tA) of the planar affine group, as 3x3 matrices
#: [[A_lin, a], [0, 0]] acting on pixel coordinates p = (x, y): x to the right, y down, origin at the
#: image centre, one unit = one pixel. exp(t A) is the group element the image is pushed forward by
#: (``affine_warp``): rotation by t radians in the direction of ``rotate`` (torch.rot90's), translation
#: of the content by t pixels along +x (right) / +y (down), isotropic scaling by e^t, shear x -> x + t y.
AFFINE_GENERATORS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "rotation": ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    "translation_x": ((0.0, 0.0, 1.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    "translation_y": ((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.0, 0.0)),
    "scale": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.0)),
    "shear": ((0.0, 1.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
}


def affine_element(generator: str, t: float) -> torch.Tensor:
    """exp(t A) (float64 ``[3, 3]``) for the generator A named ``generator`` (``AFFINE_GENERATORS``)."""
    if generator not in AFFINE_GENERATORS:
        raise UserError(f"unknown affine generator {generator!r} (known: {', '.join(AFFINE_GENERATORS)})")
    return torch.linalg.matrix_exp(t * torch.tensor(AFFINE_GENERATORS[generator], dtype=torch.float64))


def affine_warp(images: torch.Tensor, g: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """``images [B, C, H, W]`` pushed forward by the affine map ``g`` (``[3, 3]`` or ``[B, 3, 3]``,
    pixel coordinates as in ``AFFINE_GENERATORS``): (g . x)(p) = x(g^-1 p), by bilinear
    interpolation (``affine_grid`` / ``grid_sample``, ``align_corners=False``), zeros flowing in from
    outside (``padding_mode``). No disc mask (``rotate`` applies one). In normalised coordinates
    (``affine_grid``'s, [-1, 1] across the image) the sampling map is D^-1 g^-1 D with
    D = diag(W/2, H/2, 1); the identity samples every pixel at its centre, so g = 1 returns the
    image unchanged (to rounding)."""
    B, _, H, W = images.shape
    g = g.to(dtype=torch.float64, device=images.device)
    if g.dim() == 2:
        g = g.expand(B, 3, 3)
    D = torch.diag(torch.tensor([W / 2, H / 2, 1.0], dtype=torch.float64, device=images.device))
    D_inv = torch.diag(torch.tensor([2 / W, 2 / H, 1.0], dtype=torch.float64, device=images.device))
    theta = (D_inv @ torch.linalg.inv(g) @ D)[:, :2].to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
