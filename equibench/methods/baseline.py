"""``baseline``: the shared backbone alone, trained on upright data; no symmetry at all."""
from __future__ import annotations

from torch import nn

from ..suite.registry import register_method
from ..suite.spec import TaskSpec
from .backbone import BackboneModel
from .base import Method, build_at_params


@register_method("baseline")
class Baseline(Method):
    exact = False
    group = None
    wraps_backbone = True
    smoke_options = {"width": 16, "depth": 2}

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None) -> None:
        super().__init__(width=width, depth=depth, params=params)
        self.width, self.depth, self.params = width, depth, params

    def build_backbone(self, spec: TaskSpec) -> nn.Module:
        """The bare backbone at the requested width/parameter count (used by wrappers too)."""
        return build_at_params(lambda w: BackboneModel(spec, w, self.depth), self.params, self.width)

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        return self.build_backbone(spec)
