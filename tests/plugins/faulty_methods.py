"""Methods that fail on purpose, loaded with --plugin by the reliability tests."""
from __future__ import annotations

import os
import time

import torch
from torch import nn

from equibench.methods.blocks.backbone import BackboneModel
from equibench.methods.base import Method
from equibench.core.registry import register_method


@register_method("faulty_raises")
class Raises(Method):
    """Raises while building."""

    def build(self, spec, seed=0):
        raise RuntimeError("deliberate failure in build")


class NaNModel(BackboneModel):
    def forward(self, batch):
        return super().forward(batch) * torch.tensor(float("nan"))


@register_method("faulty_nan")
class ReturnsNaN(Method):
    """Predicts NaN."""

    def build(self, spec, seed=0):
        return NaNModel(spec, width=8, depth=1)


@register_method("faulty_sleeps")
class Sleeps(Method):
    """Sleeps far past any time limit."""

    def build(self, spec, seed=0):
        time.sleep(float(os.environ.get("FAULTY_SLEEP_S", "600")))
        return BackboneModel(spec, width=8, depth=1)


@register_method("faulty_exits")
class HardExit(Method):
    """Kills its own process (as a segfault or OOM kill would)."""

    def build(self, spec, seed=0):
        os._exit(9)
