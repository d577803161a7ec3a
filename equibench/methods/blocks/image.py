"""Building an image model (``image2d`` domain): sizes, parameter matching, dtype.

A method's ``build`` on an image task passes ``build_image_model`` a factory
``factory(size, depth, fast) -> ImageModel`` made of the image blocks (``cnn``, ``steerable2d``,
``canon2d``) and the sizes from its options (``image_size_options``).

Parameter counts: ``params`` matches the whole model to +-10 % with ``build_at_params``; without
``params`` and ``width``, a model built with ``match_baseline=True`` is matched to the default
baseline CNN (``cnn.DEFAULT_WIDTH`` channels, same depth), so default comparisons are
parameter-matched (the CNN-only models, ``baseline`` / ``augmentation`` / ``frame_averaging``,
are that CNN already and are built at ``DEFAULT_WIDTH`` directly).

Precision: every model is built under float32 (escnn needs it), its escnn kernel bases are
re-sampled in float64 (``steerable2d.resample_bases_float64``; nothing to do for plain CNNs) and
it is returned in the caller's default dtype.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...core.spec import TaskSpec
from ...symmetry.group2d import is_2d_group
from ...symmetry.precision import default_dtype
from ..base import build_at_params, count_parameters
from .cnn import DEFAULT_DEPTH, DEFAULT_WIDTH, CNNClassifier, ImageModel
from .steerable2d import resample_bases_float64

#: ``factory(size, depth, fast) -> model``; ``fast=True`` builds a throw-away model only to count
#: its parameters (no initialisation, cached escnn bases); the model exposes its ``size``
ImageFactory = Callable[[int, int, bool], ImageModel]


def build_image_model(factory: ImageFactory, spec: TaskSpec, *, width: int | None = None,
                      depth: int | None = None, params: int | None = None, field_size: int = 1,
                      max_size: int = 512, match_baseline: bool = False) -> nn.Module:
    """``factory(size, depth)`` at the requested size, in the current default dtype.

    ``width``: channels, i.e. ``size = width // field_size`` (``field_size`` = channels of one
    field: 1 for a plain CNN, N for regular C_N fields; default ``DEFAULT_WIDTH``); ``depth``: conv
    blocks (default ``DEFAULT_DEPTH``); ``params``: match the whole model's parameter count to
    +-10 % (``build_at_params``, sizes 1..``max_size``); with neither ``width`` nor ``params`` and
    ``match_baseline``, the target is the default baseline CNN's count. The RNG state the final
    model is initialised from is the one at the start of the size search."""
    depth = DEFAULT_DEPTH if depth is None else depth
    if depth < 1 or (width is not None and width < 1) or (params is not None and params < 1):
        raise ValueError("width, depth and params must be positive")
    target = params
    if width is None and params is None and match_baseline:
        with default_dtype(torch.float32):
            target = count_parameters(CNNClassifier(spec, DEFAULT_WIDTH, depth))
    outer = torch.get_default_dtype()
    rng = torch.random.get_rng_state()
    with default_dtype(torch.float32):
        default = max(1, (width or DEFAULT_WIDTH) // field_size)
        if target is None:
            size = default
        else:  # match on cheap models (no init, cached escnn bases), then build the real one
            size = build_at_params(lambda s: factory(s, depth, True), target, default, lo=1, hi=max_size).size
        torch.random.set_rng_state(rng)
        model = factory(size, depth, False)
        resample_bases_float64(model)
    return model.to(outer)


def image_size_options(method: Any) -> dict[str, Any]:
    """``width``, ``depth``, ``params`` and ``group`` for an image build from a ``Method``'s
    options. ``width`` / ``depth`` are passed only when set to something other than the method's
    own (graph-tuned) defaults, so that image models default to the parameter-matched image sizes;
    ``params`` is passed as is; a 3-D ``group`` is dropped (None: the task's 2-D group is used)."""
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
