"""``baseline``: the shared backbone alone, trained on upright data; no symmetry at all.

``Baseline`` also carries the domain dispatch of every backbone-wrapping method: on ``image2d``
tasks ``build`` returns ``image_models.build_image_model(self.image_kind, ...)`` (a CNN of
matched size, or the method's image counterpart), on ``graph3d`` tasks ``build_graph``.
"""
from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..core.registry import register_method
from ..core.spec import TaskSpec
from .backbone import BackboneModel
from .base import Method, build_at_params


@register_method("baseline")
class Baseline(Method):
    exact = False
    group = None
    wraps_backbone = True
    smoke_options = {"width": 16, "depth": 2}
    domains = ("graph3d", "image2d")
    #: which image model of ``image_models`` this method builds on image2d tasks
    image_kind: ClassVar[str] = "baseline"

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None) -> None:
        super().__init__(width=width, depth=depth, params=params)
        self.width, self.depth, self.params = width, depth, params

    def build_backbone(self, spec: TaskSpec) -> nn.Module:
        """The bare backbone at the requested width/parameter count (used by wrappers too)."""
        return build_at_params(lambda w: BackboneModel(spec, w, self.depth), self.params, self.width)

    def image_options(self) -> dict[str, Any]:
        """Method-specific options forwarded to ``build_image_model`` (e.g. ``stochastic``)."""
        return {}

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        if spec.domain == "image2d":
            from .image_models import build_image_model, image_size_options
            return build_image_model(self.image_kind, spec, **image_size_options(self), **self.image_options())
        return self.build_graph(spec, seed)

    def build_graph(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        return self.build_backbone(spec)
