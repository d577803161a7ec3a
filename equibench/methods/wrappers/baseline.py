"""``baseline``: the shared model alone, trained on upright data; no symmetry at all.

graph3d: the shared message-passing backbone (``blocks.backbone.BackboneModel``) at the requested
width / parameter count.

image2d: the plain CNN ``blocks.cnn.CNNClassifier`` (conv 5x5 then 3x3, BatchNorm, ReLU, 2x2
average pool after the first two blocks, global mean, linear head; ``width`` = channels, default
``blocks.cnn.DEFAULT_WIDTH``: the reference every default image model is parameter-matched to).

``Baseline.build`` carries the domain dispatch of every backbone-wrapping method: ``build_image``
on ``image2d`` tasks, ``build_graph`` on ``graph3d`` tasks; each subclass overrides the two in its
own file. It also applies the shared ``field_input`` option (``blocks.breaking``): with
``field_input=True`` a task's symmetry-breaking fields (``TaskSpec.breaking_inputs``, e.g.
nbody_field's external field) are built in as typed inputs; by default they are ignored.

``forces`` (``blocks.energy_forces.ForcesOption``; baseline and augmentation): ``"direct"``
(default) reads md forces off the backbone's node head; ``"conservative"`` builds the backbone for
a graph-level energy (sum of per-node outputs) on a force task and predicts F = -dE/dx, with the
graph kept in training (a force loss trains through the second derivative). ``params`` sizes the
energy network. The frame and canonicalisation wrappers do not take it (their forces would be
differentiated through the frames).
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ..base import Method, build_at_params
from ..blocks.backbone import BackboneModel
from ..blocks.breaking import FieldInputOption
from ..blocks.cnn import CNNClassifier
from ..blocks.energy_forces import ForcesOption
from ..blocks.image import build_image_model, image_size_options


@register_method("baseline")
class Baseline(FieldInputOption, ForcesOption, Method):
    """The shared message-passing backbone alone, trained on the data as given: no symmetry at all."""
    exact = False
    group: str | None = None  # (the declared type, so that subclasses may name a group)
    wraps_backbone = True
    smoke_options = {"width": 16, "depth": 2}
    domains: ClassVar[tuple[str, ...]] = ("graph3d", "image2d")
    exact_by_domain: ClassVar[dict[str, bool]] = {"graph3d": False, "image2d": False}

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None,
                 field_input: bool = False, forces: str = "direct") -> None:
        super().__init__(width=width, depth=depth, params=params)
        self.width, self.depth, self.params = width, depth, params
        self.set_field_input(field_input)
        self.set_forces(forces)  # recorded only when set (subclasses without the option: "direct")

    def build_backbone(self, spec: TaskSpec) -> nn.Module:
        """The bare backbone at the requested width/parameter count (used by wrappers too)."""
        return build_at_params(lambda w: BackboneModel(spec, w, self.depth), self.params, self.width)

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        spec = self.model_spec(spec)  # + the symmetry-breaking inputs under field_input=True
        if spec.domain == "image2d":
            return self.build_image(spec)
        return self.with_forces(self.build_graph(self.network_spec(spec), seed), spec)

    def build_graph(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        return self.build_backbone(spec)

    def build_image(self, spec: TaskSpec) -> nn.Module:
        """The plain CNN (image sizes from ``image_size_options``; no group involved)."""
        sizes = image_size_options(self)
        sizes.pop("group")
        return build_image_model(lambda w, depth, fast: CNNClassifier(spec, w, depth), spec, **sizes)
