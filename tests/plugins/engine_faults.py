"""Methods that break the engine's limits on purpose (loaded with --plugin by tests/test_engine.py).

* ``memory_hog``: its forward pass allocates and touches memory in 64 MiB steps up to
  $EQUIBENCH_TEST_HOG_BYTES (default 4 GiB), so it is resident and the runner's RSS poll sees it;
* ``raises_memory_error``: raises ``MemoryError`` while building (the worker's own OOM path);
* ``disk_full``: a small backbone whose worker cannot write its result (ENOSPC) while the file
  named by $EQUIBENCH_TEST_DISK_FULL exists — a disk that is full until someone frees space.
"""
from __future__ import annotations

import errno
import os
import time

import torch

from equibench.core.registry import register_method
from equibench.methods.base import Method
from equibench.methods.blocks.backbone import BackboneModel


class HogModel(BackboneModel):
    def forward(self, batch):
        total = int(os.environ.get("EQUIBENCH_TEST_HOG_BYTES", 4 * 2**30))
        chunks = []
        while len(chunks) * 64 * 2**20 < total:
            chunks.append(torch.ones(64 * 2**20, dtype=torch.uint8))  # written, hence resident
            time.sleep(0.01)
        return super().forward(batch)


@register_method("memory_hog")
class MemoryHog(Method):
    """Allocates gigabytes in its forward pass."""

    def build(self, spec, seed=0):
        return HogModel(spec, width=8, depth=1)


@register_method("raises_memory_error")
class RaisesMemoryError(Method):
    """Raises MemoryError while building."""

    def build(self, spec, seed=0):
        raise MemoryError("deliberate: cannot allocate the model")


def _full_disk_write(write):
    def patched(path, text):
        flag = os.environ.get("EQUIBENCH_TEST_DISK_FULL")
        if flag and os.path.exists(flag) and str(path).endswith(".json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(path, text)
    return patched


@register_method("disk_full")
class DiskFull(Method):
    """A small backbone; its worker's result file hits ENOSPC while $EQUIBENCH_TEST_DISK_FULL exists."""

    def build(self, spec, seed=0):
        from equibench.engine import jobs
        if not getattr(jobs.write_durably, "patched", False):
            jobs.write_durably = _full_disk_write(jobs.write_durably)
            jobs.write_durably.patched = True
        return BackboneModel(spec, width=8, depth=1)
