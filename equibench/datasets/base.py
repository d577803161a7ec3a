"""The task interface: data, loss and metrics for one benchmark problem.

``Task.load(split, size, seed)`` returns a list of ``torch_geometric.data.Data`` holding every
field of ``spec.inputs`` (and ``spec.edge_inputs``) under its name, ``edge_index`` and target
``y``. Generated or parsed data is cached under ``cache_dir()`` (``$EQUIBENCH_CACHE`` or the
user's cache directory) so a second load is a file read.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch_geometric.data import Batch, Data

from ..core.errors import UserError
from ..core.spec import TaskSpec
from ..symmetry.fieldtypes import POINT, field_dim, irreps

SPLITS = ("train", "val", "test")


def cache_dir() -> Path:
    """Root of the on-disk data cache: ``$EQUIBENCH_CACHE`` or ``~/.cache/equibench``."""
    root = os.environ.get("EQUIBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "equibench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file then rename, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Task:
    """Base class of all tasks. Options are keyword-only ``__init__`` arguments with type hints."""

    name: ClassVar[str] = "?"

    def __init__(self, **options: Any) -> None:
        self.options = dict(options)

    @property
    def spec(self) -> TaskSpec:
        raise NotImplementedError

    def load(self, split: str, size: int | None = None, seed: int = 0) -> list[Data]:
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Scalar training loss (default: mean squared error against ``batch.y``)."""
        return torch.mean((pred - batch.y) ** 2)

    def metric_values(self, pred: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-sample values of each metric in ``spec.metrics`` (1-D tensors); the runner
        averages them over the whole test split."""
        raise NotImplementedError

    def trivial_prediction(self, train: list[Data]) -> Callable[[Batch], torch.Tensor]:
        """What a model that learned nothing but the simplest statistic of the training targets
        predicts; its test metrics (``trivial.*`` rows) tell whether a method learned anything.

        * classification (``loss == "cross_entropy"``): the majority class of the training split;
        * ``point`` outputs (positions): the input positions, i.e. no displacement;
        * irreps outputs: the training mean of every invariant (l = 0) component and 0 for every
          l >= 1 component (zero forces): the only constants an O(3)-equivariant map can output.
        Tasks with a better-suited trivial predictor override this (normals: one fixed axis).
        """
        spec = self.spec
        if spec.loss == "cross_entropy":
            labels = torch.cat([d.y.reshape(-1) for d in train]).long()
            logits = torch.zeros(field_dim(spec.output))
            logits[int(torch.bincount(labels, minlength=len(logits)).argmax())] = 1.0
            return lambda b: logits.to(b.y.device).expand(int(b.num_graphs), -1)
        if spec.output == POINT:
            field = spec.point_fields[0]
            return lambda b: b[field]
        y = torch.cat([d.y.reshape(-1, field_dim(spec.output)) for d in train]).double()
        constant = torch.zeros(y.shape[1], dtype=torch.float64)
        start = 0
        for mul, ir in irreps(spec.output):
            stop = start + mul * ir.dim
            if ir.l == 0:
                constant[start:stop] = y[:, start:stop].mean(0)
            start = stop

        def predict(b: Batch) -> torch.Tensor:
            rows = int(b.num_nodes) if spec.level == "node" else int(b.num_graphs)
            return constant.to(device=b.y.device, dtype=b.y.dtype).expand(rows, -1)
        return predict

    def provenance(self) -> dict[str, Any]:
        """Where the data comes from (package versions, generator parameters), for result rows."""
        return {"task": self.name, **self.options}

    def check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
