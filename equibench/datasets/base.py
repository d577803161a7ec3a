"""The task interface: data, loss and metrics for one benchmark problem.

A task declares the metrics it reports next to its loss (``METRICS``, one ``task_metric`` spec
each: direction, unit, description); registering the task declares them, with their
``trivial.*`` / ``floor.*`` variants, in the metric catalogue. ``spec.metrics`` names the ones an
instance reports (options may choose among them), the first its primary metric.

``Task.load(split, size, seed)`` returns a list of ``torch_geometric.data.Data`` holding every
field of ``spec.inputs`` (and ``spec.edge_inputs``) under its name, ``edge_index`` and target
``y``. Generated or parsed data is cached under ``cache_dir()`` (``$EQUIBENCH_CACHE`` or the
user's cache directory) so a second load is a file read.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch_geometric.data import Batch, Data

from ..core.cache import cache_dir  # noqa: F401  (re-exported: the task modules import it from here)
from ..core.errors import UserError
from ..core.spec import TaskSpec
from ..metrics.catalogue import MetricSpec, Role, declare_task_metrics, find_metric, reference_metrics, test_metric
from ..symmetry.fieldtypes import POINT, field_dim, irreps
from .symmetric import Geometry

SPLITS = ("train", "val", "test")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file then rename, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Task:
    """Base class of all tasks. Options are keyword-only ``__init__`` arguments with type hints."""

    name: ClassVar[str] = "?"
    #: the task's floors (``floors``): name -> what it predicts, one sentence for the verdict caption
    FLOORS: ClassVar[dict[str, str]] = {}
    #: what the run's seed draws in the data (``load_splits``), for the verdict caption
    SEED_DRAWS: ClassVar[str] = ""
    #: options of a small, fast instance (split sizes): what a suite with ``scale: smoke`` runs a
    #: task it does not configure with (as methods' ``smoke_options``)
    smoke_options: ClassVar[dict[str, Any]] = {}
    #: every metric the task may report (``task_metric`` specs, ``test.<key>``), declared in the
    #: catalogue with its ``trivial.*`` / ``floor.*`` variants when the class is registered;
    #: ``spec.metrics`` names those an instance reports (the keys of ``metric_values``)
    METRICS: ClassVar[tuple[MetricSpec, ...]] = ()

    def __init__(self, **options: Any) -> None:
        self.options = dict(options)

    @classmethod
    def on_register(cls) -> None:
        """Declare ``METRICS`` (``core.registry`` calls this when the class is registered)."""
        declare_task_metrics(cls.METRICS)

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

    def metric_specs(self) -> list[MetricSpec]:
        """The declared spec (``METRICS``) of each metric in ``spec.metrics``, in order; the first
        with role ``"primary"`` (the task's headline metric: validation, tuning, verdicts), the
        others ``"task"``. A metric the class does not declare is taken from the catalogue (a
        plugin written before ``METRICS`` registered ``test.<name>`` itself); ``UserError`` when
        nothing declares it."""
        declared = {m.stat: m for m in self.METRICS}
        specs = [declared.get(k) or find_metric(test_metric(k)) for k in self.spec.metrics]
        missing = [k for k, s in zip(self.spec.metrics, specs) if s is None]
        if missing:
            raise UserError(f"task {self.name!r} reports metric(s) {missing} but declares no MetricSpec for them: "
                            f"add task_metric({missing[0]!r}, direction=...) to {type(self).__name__}.METRICS")
        return [replace(s, role="primary" if i == 0 else "task") for i, s in enumerate(specs) if s is not None]

    @property
    def primary_metric(self) -> MetricSpec:
        """The task's headline metric (``metric_specs()[0]``): validated, tuned and ranked on."""
        return self.metric_specs()[0]

    def metric_roles(self) -> dict[str, Role]:
        """``{metric name: role}`` of the names this task's points emit for its own metrics:
        ``test.<key>`` primary / task, ``trivial.<key>`` and ``floor.<key>`` reference. The roles
        of probe and method metrics are their catalogue specs' (``MetricSpec.role``)."""
        roles: dict[str, Role] = {}
        for spec in self.metric_specs():
            roles[spec.name] = spec.role or "task"
            roles.update({v.name: v.role or "reference" for v in reference_metrics(spec)})
        return roles

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

    # ---- exactly symmetric inputs (datasets/symmetric.py) ----------------------------------
    def symmetric_geometries(self) -> list[Geometry]:
        """The task's standard exactly symmetric inputs as geometries (canonical orientation,
        known stabiliser; ``datasets.symmetric``); empty for a task that offers none."""
        return []

    def symmetric_data(self, geometry: Geometry) -> Data:
        """One symmetric geometry in the task's own fields: every field of ``spec.inputs`` (and
        ``spec.edge_inputs``, ``spec.breaking_inputs``) and ``edge_index``, built the task's way.
        No target ``y``: these inputs measure equivariance only."""
        raise NotImplementedError(f"task {self.name!r} declares symmetric geometries but does not build them")

    def symmetric_inputs(self) -> list[tuple[str, Data]]:
        """``(name, Data)`` for each standard exactly symmetric input of the task (molecules with
        D6h, Td, linear, C2v, D2h symmetry; symmetric particle systems; symmetric clouds), in the
        task's fields and default dtype. A method exact only on inputs without a symmetry of their
        own is not held to exactness on these (``Method.exactness_scope``)."""
        return [(g.name, self.symmetric_data(g)) for g in self.symmetric_geometries()]

    def floors(self, train: list[Data]) -> dict[str, Callable[[Batch], torch.Tensor]]:
        """The task's floors: its strongest cheap non-learned references beside the trivial
        predictor, each fitted on the training split ``train`` (closed form, no training) and
        returned as a predictor of a batch, with the output the model would give (same scale as
        ``metric_values`` expects). Scored on the test split as ``floor.<metric>`` rows; the
        verdict says per method whether it beats the strongest. Keys: those of ``FLOORS``.
        Default: none (the trivial predictor is the only reference)."""
        return {}

    def provenance(self) -> dict[str, Any]:
        """Where the data comes from (package versions, generator parameters), for result rows."""
        return {"task": self.name, **self.options}

    def check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
