"""Probes: the per-run measurements of a task point, registered like methods and tasks.

A probe measures something of the model of one (task, method, seed) point and emits rows of the
metrics it declares. It is one class, in the file of what it measures (a plugin: one file,
``tests/plugins/heldout_loss_probe.py``)::

    @register_probe("heldout_loss")
    class HeldoutLoss(Probe):
        '''The task's training loss on the first test graphs, after training.'''
        METRICS = (MetricSpec("heldout_loss", "held-out loss", "heldout_loss", unit="loss", direction="lower"),)
        phases = ("trained",)
        enabled = False  # on with `heldout_loss: true` in a suite's evaluate:

        class Settings(ProbeSettings):
            graphs: int = 16  # suite key: heldout_loss_graphs

        def measure(self, ctx: ProbeContext, phase: str) -> list[Reading]:
            batch = ctx.test_batch(self.settings.graphs).to(ctx.device)
            with torch.no_grad():
                loss = ctx.task.loss(ctx.model(batch), batch)
            return [reading("heldout_loss", loss, batch_size=int(batch.num_graphs))]

What the class declares:

* ``METRICS``: every metric it may emit (``MetricSpec``; registered in the catalogue with the
  class; a reading of an undeclared name is an error);
* ``Settings``: its settings, a pydantic model (``ProbeSettings``). In a suite's ``evaluate:`` mapping the probe
  is switched by its name (``lie_derivative: false``) and each setting is ``<probe>_<setting>``
  (``throughput_batch: 50``), unless ``keys`` names the suite key of a setting: several probes
  may read one key (``equivariance_graphs`` sizes the batch of the equivariance, Lie derivative
  and degeneracy probes), which then has one type and one default;
* ``phases``: when it runs (``PHASES``): ``init`` (the freshly built model), ``training`` (right
  after training, with ``ctx.train_result``), ``trained`` (after the test metrics), or
  ``architecture`` (after ``trained``, in one seed's point per configuration only: measurements
  that depend on the architecture and the batch, not on the weights or the seed, ``measure_once``);
* ``order`` (lower first within a phase; ties by name), ``domains`` (None: every domain),
  ``enabled`` (the default of its switch) and ``requires`` (probes that must be on as well).

``EvalSettings`` is the ``evaluate:`` mapping of a point, assembled from the registered probes
(``evaluate_model``); the keys of every built-in suite and of every stored run directory
(``lie_derivative: true``, ``degeneracy: false``, ``equivariance_samples: 4``,
``throughput_batch: 50``, ``flops``, ``measure_once``, ``architecture_seed`` ...) are the keys of
the built-in probes, so suite files, spec hashes and stored runs are unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, create_model, model_validator
from torch import nn
from torch_geometric.data import Batch, Data

from ..core.config import Config, config_from_dict
from ..core.errors import UserError
from ..core.registry import probe_classes
from ..core.spec import TaskSpec
from .catalogue import MetricSpec, declare

#: when a probe runs, in this order (module docstring)
PHASES = ("init", "training", "trained", "architecture")
#: one measured number: ``metric``, ``value`` and the row columns that qualify it (stage, dtype, group, ...)
Reading = dict[str, Any]


def reading(metric: str, value: Any, **context: Any) -> Reading:
    """One measured number of a probe, with the columns that qualify it."""
    return {"metric": metric, "value": value, **context}


@dataclass
class ProbeContext:
    """What a probe sees of the point it measures.

    ``task`` and ``method`` are the point's ``Task`` and ``Method`` (typed loosely here: probes sit
    in ``metrics``, below ``datasets`` and ``methods``). ``model`` is the float32 model as it is at
    the phase (initial weights at ``init``); ``float64()`` the same weights in a copy built under a
    float64 default (float64 build-time constants; built once per point, re-loaded at the next
    phase). ``group`` is the measured group (narrowed to what an exact method declares),
    ``broken_group`` the group the task's environment breaks (None when it declares none).
    """

    task: Any
    method: Any
    spec: TaskSpec
    seed: int
    device: torch.device
    test_data: list[Data]
    model: nn.Module
    group: str
    broken_group: str | None
    float64_factory: Callable[[], nn.Module]
    phase: str = ""
    #: what training reported (``benches.training.TrainResult``), from the ``training`` phase on
    train_result: Any = None
    _float64: tuple[str, nn.Module] | None = field(default=None, repr=False)
    _batches: dict[tuple[str, int], Batch] = field(default_factory=dict, repr=False)

    def float64(self) -> nn.Module:
        """The float64 copy holding the current weights (one copy per phase)."""
        if self._float64 is None or self._float64[0] != self.phase:
            self._float64 = (self.phase, self.float64_factory())
        return self._float64[1]

    def test_batch(self, graphs: int) -> Batch:
        """The first ``graphs`` test graphs (at most the split) as one batch, built once."""
        key = ("test", graphs)
        if key not in self._batches:
            self._batches[key] = Batch.from_data_list(self.test_data[:graphs])
        return self._batches[key]

    def timing_batch(self, graphs: int) -> Batch:
        """Exactly ``graphs`` graphs (the test split repeated as often as needed) as one batch."""
        key = ("timing", graphs)
        if key not in self._batches:
            data = (self.test_data * (graphs // len(self.test_data) + 1))[:graphs]
            self._batches[key] = Batch.from_data_list(data)
        return self._batches[key]


class ProbeSettings(Config):
    """Base of a probe's settings: frozen, strict types, unknown keys rejected (``Config``)."""


class NoSettings(ProbeSettings):
    """A probe without settings."""


class Probe:
    """Base class of the per-run measurements (module docstring)."""

    name: ClassVar[str] = "?"
    METRICS: ClassVar[tuple[MetricSpec, ...]] = ()
    Settings: ClassVar[type[ProbeSettings]] = NoSettings
    keys: ClassVar[dict[str, str]] = {}
    phases: ClassVar[tuple[str, ...]] = ("trained",)
    order: ClassVar[float] = 100.0
    domains: ClassVar[tuple[str, ...] | None] = None
    enabled: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: ProbeSettings) -> None:
        self.settings: Any = settings

    @classmethod
    def on_register(cls) -> None:
        """Check the declaration and declare ``METRICS`` (``core.registry`` calls this)."""
        bad = [p for p in cls.phases if p not in PHASES]
        if bad:
            raise ValueError(f"probe {cls.name!r}: unknown phase(s) {bad} (known: {', '.join(PHASES)})")
        unknown = sorted(set(cls.keys.values()) - set(cls.Settings.model_fields))
        if unknown:
            raise ValueError(f"probe {cls.name!r}: keys name no setting {unknown}")
        declare(cls.METRICS)

    @classmethod
    def setting_keys(cls) -> dict[str, str]:
        """``{evaluate key: setting}``: ``keys``, and ``<name>_<setting>`` for every other setting."""
        named = set(cls.keys.values())
        return {**{f"{cls.name}_{f}": f for f in cls.Settings.model_fields if f not in named}, **cls.keys}

    @classmethod
    def applies_to(cls, spec: TaskSpec) -> bool:
        """Whether the probe measures anything on a task of ``spec`` (its ``domains``)."""
        return cls.domains is None or spec.domain in cls.domains

    def prepare(self, task: Any, spec: TaskSpec) -> None:
        """Build what the probe needs from the task, before the model is built (default: nothing)."""

    def measure(self, ctx: ProbeContext, phase: str) -> list[Reading]:
        """The readings of ``phase`` (one of the class's ``phases``)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# the evaluate: mapping, assembled from the registered probes

class EvalSettings(Config):
    """What is measured after training and how (a suite's ``evaluate:`` mapping): one switch per
    registered probe (its name), its settings (``Probe.setting_keys``), and when the
    architecture measurements are taken. ``from_dict`` validates against the probes registered
    at the time (plugins included)."""

    #: throughput, memory, FLOPs and the profile depend on the architecture and the batch, not on
    #: the trained weights or the seed: measure them in one seed's point per configuration (the
    #: planner sets ``architecture_seed`` to the first seed of the suite) instead of in every seed's
    measure_once: bool = True
    #: the seed whose point takes the seed-independent measurements (None: every seed); set by the
    #: planner when ``measure_once``, the same value in every seed's spec of a configuration
    architecture_seed: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalSettings:
        return config_from_dict(evaluate_model(), d, "evaluate")

    @model_validator(mode="after")
    def _probe_settings_valid(self) -> EvalSettings:
        for probe in _probes():
            self.settings(probe)  # a probe's own checks of its settings, as one evaluate error
        return self

    def measures_architecture(self, seed: int) -> bool:
        """Whether the point of ``seed`` takes the ``architecture`` phase (``measure_once``)."""
        return self.architecture_seed is None or seed == self.architecture_seed

    def is_on(self, probe: type[Probe]) -> bool:
        """Whether ``probe`` is switched on, and every probe it ``requires``."""
        on = getattr(self, probe.name, probe.enabled)
        return bool(on) and all(getattr(self, r, False) for r in probe.requires)

    def settings(self, probe: type[Probe]) -> ProbeSettings:
        """``probe``'s settings from this mapping's keys."""
        values = {setting: getattr(self, key) for key, setting in probe.setting_keys().items() if hasattr(self, key)}
        try:
            return probe.Settings.model_validate(values)
        except ValueError as err:
            raise ValueError(f"probe {probe.name!r}: {err}") from None

    def probes(self, spec: TaskSpec) -> list[Probe]:
        """An instance of every switched-on probe that applies to ``spec``, in run order."""
        return [p(self.settings(p)) for p in _probes() if self.is_on(p) and p.applies_to(spec)]


def _probes() -> list[type[Probe]]:
    """The registered probes in run order (``order``, then name)."""
    return sorted(probe_classes(), key=lambda p: (p.order, p.name))


_MODELS: dict[tuple[type[Probe], ...], type[EvalSettings]] = {}


def evaluate_model() -> type[EvalSettings]:
    """The ``EvalSettings`` model of the probes registered now (built once per set of probes):
    a bool switch per probe (default ``Probe.enabled``) and one field per setting key, typed and
    defaulted by the probe's ``Settings``; a key read by several probes must agree on both."""
    probes = tuple(_probes())
    if probes in _MODELS:
        return _MODELS[probes]
    fields: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for p in probes:
        for key, value in [(p.name, (bool, p.enabled)),
                           *((k, _field(p.Settings, s)) for k, s in p.setting_keys().items())]:
            if key in EvalSettings.model_fields or (key in fields and fields[key] != value):
                raise UserError(f"evaluate key {key!r} of probe {p.name!r} clashes with "
                                f"{owner.get(key, 'EvalSettings')!r} (a shared key needs one type and one default)")
            fields[key], owner[key] = value, p.name
    model = create_model("EvalConfig", __base__=EvalSettings, **fields)
    model.__doc__ = EvalSettings.__doc__
    _MODELS[probes] = model
    return model


def _field(model: type[BaseModel], name: str) -> tuple[Any, Any]:
    info = model.model_fields[name]
    return info.annotation, info.default


__all__ = ["PHASES", "EvalSettings", "NoSettings", "Probe", "ProbeContext", "ProbeSettings", "Reading",
           "evaluate_model", "reading"]
