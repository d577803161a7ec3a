"""``augmentation``: the shared backbone trained on randomly transformed copies.

Each training batch gets one Haar-random g = (R, t) per graph, R in O(3) (reflections
included when the task's group has them), t ~ N(0, I), applied to every input field and the
target through their types. Equivariance is learned, never exact.
"""
from __future__ import annotations

import torch
from torch_geometric.data import Batch

from ..symmetry.group3d import act_on_batch, sample_element
from ..core.registry import register_method
from ..core.spec import TaskSpec
from .baseline import Baseline


@register_method("augmentation")
class Augmentation(Baseline):
    image_kind = "augmentation"

    def train_transform(self, batch: Batch, spec: TaskSpec, generator: torch.Generator) -> Batch:
        if spec.domain == "image2d":
            from .image_models import image_train_transform
            return image_train_transform(batch, spec, generator)
        g = sample_element(batch, spec.group, generator, permute=False)
        return act_on_batch(batch, spec, g.to(batch[spec.point_fields[0]].dtype if spec.point_fields
                                              else torch.get_default_dtype()))
