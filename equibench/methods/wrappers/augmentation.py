"""``augmentation``: the shared model trained on randomly transformed copies.

graph3d: each training batch gets one Haar-random g = (R, t) per graph, R in O(3) (reflections
included when the task's group has them), t ~ N(0, I), applied to every input field and the
target through their types.

image2d: the baseline's plain CNN (``Baseline.build_image``); every training image is rotated by
its own random element of the task's group (``equibench.symmetry.group2d``: C4 exactly with
``rot90``; C8 / SO(2) by interpolation).

Option ``over`` (graph3d): ``"task"`` (default) draws g from the task's own group; ``"full"``
from the larger group its environment breaks (``TaskSpec.broken_group``: E(3) on
``nbody_field``, whose own group is O(2)_z plus translations), i.e. augmentation over the wrong,
too large symmetry; tasks without a broken group use their own. With the shared ``field_input``
option (``blocks.breaking``) the symmetry-breaking field is an input and is transformed with the
rest (joint augmentation of (X, field)); without it the model never sees the field.

Equivariance is learned, never exact. Reference setting: the usual data-augmentation baseline
(a Haar-random group element per example and step), as in the rotation-augmented baselines that
learned-canonicalisation papers compare against (Kaba et al., ICML 2023).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch_geometric.data import Batch

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry import group2d
from ...symmetry.group3d import act_on_batch, sample_element
from .baseline import Baseline

OVER = ("task", "full")


@register_method("augmentation")
class Augmentation(Baseline):
    """The shared backbone trained on randomly transformed copies (one group element per graph and step)."""
    exact_by_domain: ClassVar[dict[str, bool]] = {"graph3d": False, "image2d": False}

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None,
                 field_input: bool = False, over: str = "task", forces: str = "direct") -> None:
        if over not in OVER:
            raise ValueError(f"over must be one of {OVER}, got {over!r}")
        super().__init__(width=width, depth=depth, params=params, field_input=field_input, forces=forces)
        self.over = over
        self.options["over"] = over

    def train_transform(self, batch: Batch, spec: TaskSpec, generator: torch.Generator) -> Batch:
        if spec.domain == "image2d":
            rot = group2d.sample_element(batch, spec.group, generator, permute=False)
            return group2d.act_on_batch(batch, spec, rot)
        group = spec.broken_group if self.over == "full" and spec.broken_group else spec.group
        g = sample_element(batch, group, generator, permute=False)
        spec = self.model_spec(spec)  # the symmetry-breaking field moves with the rest when it is an input
        return act_on_batch(batch, spec, g.to(batch[spec.point_fields[0]].dtype if spec.point_fields
                                              else torch.get_default_dtype()))
