"""A backbone method whose forward pass sleeps $EQUIBENCH_TEST_SLEEP_MS (a deliberately slowed
method for the regression-alarm test)."""
from __future__ import annotations

import os
import time

from equibench.methods.blocks.backbone import BackboneModel
from equibench.methods.wrappers.baseline import Baseline
from equibench.core.registry import register_method


class SlowModel(BackboneModel):
    def forward(self, batch):
        ms = float(os.environ.get("EQUIBENCH_TEST_SLEEP_MS", "0"))
        if ms:
            time.sleep(ms / 1000)
        return super().forward(batch)


@register_method("slowable")
class Slowable(Baseline):
    """The backbone, optionally slowed down."""

    def build(self, spec, seed=0):
        return SlowModel(spec, self.width, self.depth)
