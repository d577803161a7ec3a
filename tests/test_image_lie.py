"""The Lie derivative on images (``equibench.metrics.image_lie``, issue 22 item 3): the warp, the
derivative against analytic and independent finite differences, models of known behaviour, and the
probe through the runner."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch, Data

import equibench as eb
from equibench.benches.taskrun import EvalConfig, run_one
from equibench.core.spec import RunSpec
from equibench.metrics import catalogue
from equibench.metrics.image_lie import GENERATORS, ImageLieDerivativeProbe, image_lie_derivative, image_lie_metric
from equibench.symmetry import group2d
from equibench.symmetry.precision import default_dtype


@pytest.fixture(scope="module")
def task():
    return eb.get_task("digits", source="sklearn", group="C4", train_size=16, test_size=4)


def blobs(size: int, n: int, seed: int = 0, spread: float = 1 / 3,
          sigma: tuple[float, float] = (1.0, 2.0)) -> list[Data]:
    """``n`` smooth images of three random anisotropic Gaussians each (widths uniform in ``sigma``
    pixels), centred within ``spread * size / 2`` of the image centre."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    out = []
    for _ in range(n):
        img = torch.zeros(size, size, dtype=torch.float64)
        for _ in range(3):
            cx, cy = (torch.rand(2, generator=gen, dtype=torch.float64) - 0.5) * size * spread
            a = float(torch.rand(1, generator=gen)) * math.pi
            sx, sy = sigma[0] + (sigma[1] - sigma[0]) * torch.rand(2, generator=gen, dtype=torch.float64)
            u = math.cos(a) * (xs - cx) + math.sin(a) * (ys - cy)
            v = -math.sin(a) * (xs - cx) + math.cos(a) * (ys - cy)
            img += torch.exp(-(u / sx) ** 2 / 2 - (v / sy) ** 2 / 2)
        out.append(Data(image=img[None, None], num_nodes=1))
    return out


class Weighted(nn.Module):
    """f(x) = (<w_k, x>)_k for fixed weight images ``w [K, H, W]`` (plus a constant logit 1)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = batch.image[:, 0]
        return torch.cat([torch.einsum("khw,bhw->bk", self.w.to(x.dtype), x), torch.ones_like(x[:, :1, 0])], 1)


class PooledLinear(nn.Module):
    """conv 3x3 (zero padding) -> global mean over pixels -> linear: linear in the image, exactly
    translation invariant for content away from the border."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.conv(batch.image).mean((-2, -1)))


def tangent(x: torch.Tensor, generator: str) -> torch.Tensor:
    """d/dt (exp(tA) . x) at t = 0 as the pixel grid resolves it: -(v . grad_c x), v(p) = A p in
    pixel coordinates (x right, y down, origin at the centre), grad_c the central difference with
    zeros outside."""
    H, W = x.shape[-2:]
    A = torch.tensor(group2d.AFFINE_GENERATORS[generator], dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) - (H - 1) / 2,
                            torch.arange(W, dtype=torch.float64) - (W - 1) / 2, indexing="ij")
    vx = A[0, 0] * xs + A[0, 1] * ys + A[0, 2]
    vy = A[1, 0] * xs + A[1, 1] * ys + A[1, 2]
    p = torch.nn.functional.pad(x, (1, 1, 1, 1))
    gx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2
    gy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2
    return -(vx * gx + vy * gy)


# ---- the warp ---------------------------------------------------------------------------------------

def test_affine_warp_is_the_rotation_and_the_shift_of_group2d():
    x = torch.cat([d.image for d in blobs(12, 3)])
    mask = group2d.disc_mask(12, 12, torch.float64)
    for t in (0.3, -1.1, 2.0):
        warped = group2d.affine_warp(x, group2d.affine_element("rotation", t)) * mask
        assert torch.allclose(warped, group2d.rotate(x, t), atol=1e-13)
    assert torch.allclose(group2d.affine_warp(x, torch.eye(3, dtype=torch.float64)), x, atol=1e-14)
    right = group2d.affine_warp(x, group2d.affine_element("translation_x", 1.0))  # content moves one pixel right
    down = group2d.affine_warp(x, group2d.affine_element("translation_y", 2.0))
    assert torch.allclose(right[..., 1:], x[..., :-1], atol=1e-13) and right[..., 0].abs().max() < 1e-13
    assert torch.allclose(down[..., 2:, :], x[..., :-2, :], atol=1e-13)
    big = group2d.affine_warp(x, group2d.affine_element("scale", math.log(2.0)))  # x2 about the centre
    assert big[..., 5:7, 5:7].sum() > 0 and not torch.allclose(big, x)
    with pytest.raises(eb.UserError, match="unknown affine generator"):
        group2d.affine_element("rotaton", 0.1)


# ---- (a) the derivative against an analytic one and against an independent finite difference ----

def test_linear_model_matches_the_analytic_derivative(task):
    """f(x) = <w, x>: L_A f = <w, -(v . grad x)> exactly (the central difference of a bilinear warp
    is the central-difference image gradient along v, up to O(h) cross terms)."""
    data = blobs(16, 4, spread=0.5)
    w = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = image_lie_derivative(Weighted(w), data, task.spec, step=1e-6)
    x = torch.cat([d.image for d in data])
    for g in GENERATORS:  # exact for translations and shear (v has one component); O(h |v|) else
        want = torch.einsum("khw,bhw->bk", w, tangent(x, g)[:, 0])
        got = res[g]["derivative"][:, :3]
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), g
        assert res[g]["derivative"][:, 3].abs().max() < 1e-9  # the constant logit
    # the relative statistics: per image ||D f|| / RMS distance of the logits from their mean
    fx = res["rotation"]["logits"]
    spread = (fx - fx.mean(0)).norm(dim=-1).pow(2).mean().sqrt()
    rel = res["rotation"]["derivative"].norm(dim=-1) / spread
    assert res["rotation"]["rel_mean"] == pytest.approx(rel.mean().item(), rel=1e-9)
    assert res["rotation"]["rel_max"] == pytest.approx(rel.max().item(), rel=1e-9)


def test_rotation_derivative_agrees_with_group2d_rotate(task):
    """A CNN's rotation derivative equals the central difference of the same CNN on
    ``group2d.rotate`` at +-h (an independent implementation of the warp, with its disc mask, which
    the digits' own mask makes irrelevant)."""
    spec = dataclasses.replace(task.spec, group="SO2")
    with default_dtype(torch.float64):
        torch.manual_seed(0)
        model = eb.get_method("baseline", width=8, depth=2).build(spec, 0).eval()
    data = task.load("test")[::4]
    h = 1e-5
    res = image_lie_derivative(model, data, spec, step=h, generators=("rotation",))
    x = Batch.from_data_list(data)
    x.image = x.image.double()
    outs = []
    with torch.no_grad():
        for t in (h, -h):
            xt = x.clone()
            xt.image = group2d.rotate(x.image, t)
            outs.append(model(xt))
    want = (outs[0] - outs[1]) / (2 * h)
    got = res["rotation"]["derivative"]
    assert want.abs().max() > 1e-4
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


# ---- (b), (c) models of known behaviour -------------------------------------------------------------

def test_global_average_pooling_is_translation_invariant_away_from_the_border(task):
    """conv -> mean over pixels -> linear: translation (and rotation) derivative at rounding on
    content far from the border, not scaling; a position-weighted model (w = x coordinate) has
    L_x f = sum of the pixels exactly."""
    data = blobs(20, 4, spread=0.3)
    for d in data:  # compact support: zero outside the central 10 x 10 pixels
        d.image[..., :5, :], d.image[..., 15:, :], d.image[..., :5], d.image[..., 15:] = 0.0, 0.0, 0.0, 0.0
    with default_dtype(torch.float64):
        torch.manual_seed(0)
        pooled = PooledLinear()
    res = image_lie_derivative(pooled, data, task.spec, step=1e-4)
    # it sees the sum of the pixels, whose derivative is -sum_p v . grad_c x = sum_p x div v: zero for
    # translations and rotations (div v = 0; rotation to the O(h) bilinear cross terms)
    assert res["translation_x"]["rel_max"] < 1e-9 and res["translation_y"]["rel_max"] < 1e-9
    assert res["rotation"]["rel_max"] < 1e-7
    assert res["scale"]["rel_mean"] > 1e-2  # div v = 2: the sum grows as e^2t
    xs = torch.arange(20, dtype=torch.float64) - 9.5
    weighted = Weighted(torch.stack([xs.expand(20, 20), xs[:, None].expand(20, 20)]))
    res = image_lie_derivative(weighted, data, task.spec, step=1e-4)
    mass = torch.stack([d.image.sum() for d in data])
    dx, dy = res["translation_x"]["derivative"], res["translation_y"]["derivative"]
    assert torch.allclose(dx[:, 0], mass, rtol=1e-8) and dx[:, 1].abs().max() < 1e-8  # the centroid moves right
    assert torch.allclose(dy[:, 1], mass, rtol=1e-8) and dy[:, 0].abs().max() < 1e-8
    assert res["translation_x"]["rel_mean"] > 0.1


def test_escnn_so2_rotation_derivative_is_far_below_a_plain_cnns(task):
    """At initialisation, on smooth random images: escnn SO(2) (one steerable block, so no strided
    pooling before its global mean) has a rotation Lie derivative set by discretisation, an order of
    magnitude below the plain CNN of the same depth, and of the size of its own translation
    derivative; escnn C4 (exact for quarter turns only) lies in between."""
    data = blobs(20, 8, sigma=(1.5, 3.0))

    def rel(kind: str, group: str, width: int) -> dict[str, float]:
        spec = dataclasses.replace(task.spec, group=group)
        with default_dtype(torch.float64):
            torch.manual_seed(0)
            model = eb.get_method(kind, width=width, depth=1).build(spec, 0)
        return {g: r["rel_mean"] for g, r in image_lie_derivative(model, data, spec).items()}

    cnn, so2, c4 = rel("baseline", "C4", 8), rel("escnn", "SO2", 14), rel("escnn", "C4", 8)
    assert so2["rotation"] < cnn["rotation"] / 4, (so2, cnn)
    assert so2["rotation"] < 3 * so2["translation_x"], so2
    assert so2["rotation"] < c4["rotation"] < 1.5 * cnn["rotation"], (so2, c4, cnn)


# ---- (d) the probe ---------------------------------------------------------------------------------

def test_probe_declaration_and_settings():
    names = {s.name for s in ImageLieDerivativeProbe.METRICS}
    assert names == {image_lie_metric(st, g, s) for st in ("init", "trained") for g in GENERATORS
                     for s in ("rel_mean", "rel_max")}
    spec = catalogue.get_metric("image_lie.trained.fp64.rotation.rel_mean")
    assert (spec.family, spec.direction, spec.role, spec.unit, spec.axis, spec.stage) == (
        "image_lie", "lower", "measurement", "per rad", "rotation", "trained")
    assert "grid_sample" in spec.description and "zero padding" in spec.description
    cfg = EvalConfig.from_dict({"equivariance_graphs": 6, "image_lie_derivative_step": 1e-3})
    assert cfg.settings(ImageLieDerivativeProbe) == ImageLieDerivativeProbe.Settings(images=6, step=1e-3)
    with pytest.raises(eb.UserError):
        image_lie_metric("trained", "stretch", "rel_mean")


def test_probe_through_the_runner():
    """A tiny digits point: the probe's rows carry every declared metric at init and trained,
    finite, with the number of upright test images measured; graph tasks do not run it."""
    evaluate = {"equivariance_samples": 1, "equivariance_graphs": 6, "throughput": False, "image_lie_derivative": True}
    spec = RunSpec(task="digits", method="baseline", method_options={"width": 8, "depth": 2},
                   task_options={"source": "sklearn", "group": "C4", "train_size": 16, "val_size": 4, "test_size": 8},
                   train={"steps": 2, "batch_size": 8, "eval_batch_size": 8, "warmup_steps": 0}, evaluate=evaluate)
    rows = [r for r in run_one(spec) if r["metric"].startswith("image_lie.")]
    assert {r["metric"] for r in rows} == {s.name for s in ImageLieDerivativeProbe.METRICS}
    assert all(math.isfinite(r["value"]) and r["value"] > 0 and r["batch_size"] == 6 and r["dtype"] == "fp64"
               for r in rows)
    nbody = eb.get_task("nbody", train_size=8, val_size=4, test_size=4).spec
    assert not ImageLieDerivativeProbe.applies_to(nbody)
