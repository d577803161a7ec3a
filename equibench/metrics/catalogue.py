"""The metric catalogue: every metric a result row can carry, declared once, by its owner.

A ``MetricSpec`` says what a metric name means: display name, unit, direction (``"higher"`` or
``"lower"`` is better, ``None`` for context-only numbers such as parameter counts or wall time),
how it aggregates over seeds, its ``role`` in a report, and structured facets (``family``,
``stage``, ``dtype``, ``stat``, ``mode``, ``axis``) so that readers never parse names. Emitters
build names with the builder functions (``equivariance_metric("trained", "fp64", "rel_mean")``
-> ``"equivariance.trained.fp64.rel_mean"``); readers look them up with ``get_metric`` /
``find_metric``.

Who declares what (the catalogue is assembled from what is registered):

* a **task** declares its metrics next to its loss (``Task.METRICS``, built with ``task_metric``);
  registering the task declares each ``test.<name>`` spec and its ``trivial.<name>`` /
  ``floor.<name>`` variants (``declare_task_metrics``);
* a **probe** (``metrics/probe.py``: equivariance, Lie derivative, symmetric inputs, degeneracy,
  throughput, profile, learning curve) declares the metrics it emits (``Probe.METRICS``);
* a **method** declares its extra metrics (``Method.METRICS``, ``test.<name>``, role diagnostic);
* this module declares what every run reports about itself (``params``, ``status``, ``train.*``,
  ``tune.*``) and the scaling / tensor-product bench metrics.

A name not declared yet is looked up again after the registered plugins are loaded
(``core.autoimport.load``), so ``get_metric`` answers for every registered declaration in any
process. Plugins may also call ``register_metric`` directly.

Scaling-sweep and tensor-product rows are namespaced (``scaling.time_s``,
``tp_bench.time_s``); records written before that carried the bare names (``time_s``), which
``equibench.results.upgrade`` maps on read.

Plain Python only: this module sits in ``metrics`` and imports nothing above ``core``.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Literal

from ..core import autoimport
from ..core.errors import UserError, did_you_mean

Direction = Literal["higher", "lower"] | None
Aggregate = Literal["mean", "median", "max", "min", "first"]
NumberFormat = Literal["g", "int", "sci", "bytes", "time"]
Role = Literal["primary", "task", "diagnostic", "reference", "measurement", "context"]
ROLES: tuple[Role, ...] = ("primary", "task", "diagnostic", "reference", "measurement", "context")
#: the role of a spec declared without one, by family (any other family: "measurement")
FAMILY_ROLES: dict[str, Role] = {"test": "diagnostic", "trivial": "reference", "floor": "reference",
                                 "params": "context", "status": "context", "train": "context", "tune": "context"}

# the families of the built-in metrics (a plugin may declare more; readers never need the list)
FAMILIES = ("params", "status", "equivariance", "equivariance_broken", "lie_derivative", "degeneracy", "symmetric",
            "train",
            "curve", "test", "trivial", "floor", "tune", "throughput", "profile", "scaling", "tp_bench")
STAGES = ("init", "trained")
DTYPES = ("fp32", "fp64")
EQUIVARIANCE_STATS = ("rel_mean", "rel_median", "rel_max", "abs_max", "disp_rel_mean", "disp_rel_median",
                      "disp_rel_max")  # disp_*: relative to the predicted displacement (point outputs)
LIE_STATS = ("rel_mean", "rel_max")
DEGENERACY_AXES = ("gap", "config")
DEGENERACY_STATS = ("rel_mean", "rel_max", "nonfinite")
SYMMETRIC_STATS = ("rel_mean", "rel_max", "abs_max", "disp_rel_max")  # disp_rel_max: point outputs only
THROUGHPUT_MODES = ("inference", "train")
THROUGHPUT_STATS = ("graphs_per_s", "nodes_per_s", "time_median_s", "time_iqr_s", "peak_mem_bytes", "flops",
                    "gflops_per_s", "compile_time_s")
#: where inference time goes (``metrics/profile.py``): the wrappers' labelled regions (frames, backbone, to_frame)
#: or, for architectures without labels, op categories (tensor_product, linear, scatter); "other" in both
PROFILE_MODES = ("inference",)
PROFILE_REGIONS = ("frames", "backbone", "to_frame", "tensor_product", "linear", "scatter", "other")
SCALING_STATS = ("time_s", "time_iqr_s", "graphs_per_s", "nodes_per_s", "peak_mem_bytes", "flops", "gflops_per_s")
TP_BENCH_STATS = ("time_s", "time_iqr_s", "items_per_s", "peak_mem_bytes", "flops", "gflops_per_s",
                  "compile_time_s", "rel_err_vs_e3nn", "weights")
PARAMS = "params"
CURVE_VAL = "curve.val"  # one row per validation during training (learning curves)
STATUS = "status"
FLOORS = {"fp64": 1e-12, "fp32": 1e-6}  # relative equivariance errors at machine precision


class UnknownMetricError(UserError, KeyError):
    """A metric name the catalogue does not declare (a ``UserError`` and a ``KeyError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class MetricSpec:
    """What one metric name means.

    ``direction``: "higher" / "lower" is better, None = context only (never ranked or flagged).
    ``aggregate``: how values of several seeds combine. ``number_format``: "g", "int", "sci",
    "bytes" or "time" (how reports print it). ``log_scale``: plot on a log axis. ``floor``: values
    at or below it are machine precision, not compared. ``watch``: the nightly regression rule
    and the run comparison track it (needs a direction).

    ``role``: what the number is to a reader, one of ``ROLES``:

    * ``"primary"``: a task's headline metric, the first of its ``spec.metrics``. A role a task
      gives per instance (``Task.metric_specs``), never stored in the shared catalogue, where the
      same ``test.<name>`` may be one task's headline and another's secondary metric;
    * ``"task"``: a task's own metric on the test split (``task_metric``);
    * ``"diagnostic"``: a method's extra metric (``Method.METRICS``, ``extra_metrics``);
    * ``"reference"``: the task's metrics of its trivial predictor and floors (``trivial.*``,
      ``floor.*``): what a method must beat;
    * ``"measurement"``: what a probe measures of the model (equivariance, Lie derivative,
      throughput, profile, learning curve, ...) and the scaling / tensor-product benches;
    * ``"context"``: what qualifies the others (parameters, training time and steps, tuning).

    Left out (``None``), it follows the family (``FAMILY_ROLES``, else ``"measurement"``).
    """
    name: str
    display: str
    family: str
    unit: str = ""
    direction: Direction = None
    aggregate: Aggregate = "mean"
    stage: str | None = None
    dtype: str | None = None
    stat: str | None = None
    mode: str | None = None
    axis: str | None = None
    number_format: NumberFormat = "g"
    log_scale: bool = True
    floor: float | None = None
    watch: bool = False
    description: str = ""
    role: Role | None = None

    def __post_init__(self) -> None:
        if self.role is None:
            object.__setattr__(self, "role", FAMILY_ROLES.get(self.family, "measurement"))
        if self.role not in ROLES:
            raise ValueError(f"{self.name}: role must be one of {', '.join(ROLES)}, not {self.role!r}")
        if not self.name or not self.display:
            raise ValueError("a MetricSpec needs a name and a display name")
        if self.direction not in ("higher", "lower", None):
            raise ValueError(f"{self.name}: direction must be 'higher', 'lower' or None, not {self.direction!r}")
        if self.aggregate not in ("mean", "median", "max", "min", "first"):
            raise ValueError(f"{self.name}: unknown aggregate {self.aggregate!r}")
        if self.number_format not in ("g", "int", "sci", "bytes", "time"):
            raise ValueError(f"{self.name}: unknown number_format {self.number_format!r}")
        if self.watch and self.direction is None:
            raise ValueError(f"{self.name}: a watched metric needs a direction")

    @property
    def higher_is_better(self) -> bool | None:
        """True / False from ``direction``; None for context-only metrics."""
        return None if self.direction is None else self.direction == "higher"


_CATALOGUE: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec, replace: bool = False) -> MetricSpec:
    """Declare ``spec``; registering an identical spec again is a no-op, a different one under a
    taken name raises ``ValueError`` unless ``replace``."""
    old = _CATALOGUE.get(spec.name)
    if old is not None and old != spec and not replace:
        raise ValueError(f"metric {spec.name!r} is already declared differently: {old}")
    _CATALOGUE[spec.name] = spec
    return spec


def _complete(name: str | None = None) -> None:
    """Load the registered plugins (built-in probes, tasks and methods, entry points), whose
    registration declares their metrics: what the catalogue is assembled from. With ``name``,
    stop at the first kind that declares it (probes and tasks load in a fraction of the methods'
    time)."""
    for kind in ("probe", "task", "method"):
        autoimport.load(kind)
        if name is not None and name in _CATALOGUE:
            return


def find_metric(name: str) -> MetricSpec | None:
    """The spec of ``name``, or None when nothing registered declares it."""
    spec = _CATALOGUE.get(name)
    if spec is None:
        _complete(name)
        spec = _CATALOGUE.get(name)
    return spec


def get_metric(name: str) -> MetricSpec:
    """The spec of ``name``; ``UnknownMetricError`` (with close matches) when not declared."""
    spec = find_metric(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(_CATALOGUE), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownMetricError(f"unknown metric {name!r}{hint} ({len(_CATALOGUE)} declared: list_metrics() "
                                 f"lists them; register_metric(MetricSpec(...)) declares a new one)")
    return spec


def list_metrics(**facets: Any) -> list[MetricSpec]:
    """Declared specs in declaration order, optionally filtered by field values, e.g.
    ``list_metrics(family="equivariance", stage="trained")``."""
    known = {f.name for f in fields(MetricSpec)}
    bad = set(facets) - known
    if bad:
        raise ValueError(f"unknown MetricSpec field(s) {sorted(bad)}")
    _complete()
    return [s for s in _CATALOGUE.values() if all(getattr(s, k) == v for k, v in facets.items())]


# ---------------------------------------------------------------------------------------------
# name builders (the only place names are assembled)

def _check(kind: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise did_you_mean(kind, value, allowed)
    return value


def equivariance_metric(stage: str, dtype: str, stat: str) -> str:
    """``equivariance.<stage>.<dtype>.<stat>``, e.g. relative error of the trained fp64 model."""
    return (f"equivariance.{_check('stage', stage, STAGES)}.{_check('dtype', dtype, DTYPES)}."
            f"{_check('equivariance stat', stat, EQUIVARIANCE_STATS)}")


def broken_equivariance_metric(stage: str, dtype: str, stat: str) -> str:
    """``equivariance_broken.<stage>.<dtype>.<stat>``: the equivariance error measured under the
    task's *broken* group (``TaskSpec.broken_group``, e.g. E(3) on ``nbody_field``), for tasks
    whose environment breaks a larger symmetry."""
    return (f"equivariance_broken.{_check('stage', stage, STAGES)}.{_check('dtype', dtype, DTYPES)}."
            f"{_check('equivariance stat', stat, EQUIVARIANCE_STATS)}")


def lie_metric(stage: str, stat: str) -> str:
    """``lie_derivative.<stage>.fp64.<stat>`` (the Lie derivative is measured in fp64 only)."""
    return f"lie_derivative.{_check('stage', stage, STAGES)}.fp64.{_check('Lie derivative stat', stat, LIE_STATS)}"


def degeneracy_metric(axis: str, stat: str) -> str:
    """``degeneracy.<axis>.<stat>``: axis "gap" (eigenvalue-gap curve) or "config" (symmetric inputs)."""
    _check("degeneracy axis", axis, DEGENERACY_AXES)
    return f"degeneracy.{axis}.{_check('degeneracy stat', stat, DEGENERACY_STATS)}"


def symmetric_metric(stage: str, stat: str) -> str:
    """``symmetric.<stage>.fp64.<stat>``: the equivariance error (fp64) on one of the task's standard
    exactly symmetric inputs (``Task.symmetric_inputs``); its rows name the input in
    ``symmetric_input`` (and its point group in ``point_group``)."""
    return f"symmetric.{_check('stage', stage, STAGES)}.fp64.{_check('symmetric-input stat', stat, SYMMETRIC_STATS)}"


def throughput_metric(mode: str, stat: str) -> str:
    """``throughput.<mode>.<stat>``, mode "inference" or "train"."""
    _check("throughput mode", mode, THROUGHPUT_MODES)
    return f"throughput.{mode}.{_check('throughput stat', stat, THROUGHPUT_STATS)}"


def profile_metric(mode: str, region: str) -> str:
    """``profile.<mode>.<region>_share``: the share of the profiled time of one forward spent in
    ``region`` (``metrics/profile.py``), mode "inference"."""
    _check("profile mode", mode, PROFILE_MODES)
    return f"profile.{mode}.{_check('profile region', region, PROFILE_REGIONS)}_share"


def train_metric(name: str) -> str:
    """``train.<name>`` (final_loss, wall_s, steps, steps_per_s)."""
    return f"train.{name}"


def test_metric(name: str) -> str:
    """``test.<name>``: a task metric or a method's extra metric on the test split."""
    return f"test.{name}"


def tune_metric(name: str) -> str:
    """``tune.<name>``: what a tuning run reports (best_val, best_step, wall_s)."""
    return f"tune.{name}"


def trivial_metric(name: str) -> str:
    """``trivial.<name>``: task metric ``name`` of the task's trivial predictor on the test split
    (training mean / zero vectors / majority class: ``Task.trivial_prediction``)."""
    return f"trivial.{name}"


def floor_metric(name: str) -> str:
    """``floor.<name>``: task metric ``name`` of one of the task's floors on the test split: a cheap
    non-learned reference fitted on the training split (``Task.floors``; the row's ``floor`` column
    names it, e.g. ``constant_velocity``)."""
    return f"floor.{name}"


def scaling_metric(stat: str) -> str:
    """``scaling.<stat>``: one point of a scaling sweep (bench ``scaling``)."""
    return f"scaling.{_check('scaling stat', stat, SCALING_STATS)}"


def tp_bench_metric(stat: str) -> str:
    """``tp_bench.<stat>``: one tensor-product microbenchmark point (bench ``tp_bench``)."""
    return f"tp_bench.{_check('tp_bench stat', stat, TP_BENCH_STATS)}"


# ---------------------------------------------------------------------------------------------
# declaring: what owners call (tasks, probes, benches)

#: words for the equivariance-type statistics in display names
STAT_WORDS = {"rel_mean": "mean rel.", "rel_median": "median rel.", "rel_max": "max rel.", "abs_max": "max abs.",
              "disp_rel_mean": "mean rel. to displacement", "disp_rel_median": "median rel. to displacement",
              "disp_rel_max": "max rel. to displacement", "nonfinite": "non-finite share"}


def task_metric(key: str, *, direction: Direction, unit: str = "", display: str | None = None, log_scale: bool = True,
                description: str = "") -> MetricSpec:
    """The ``test.<key>`` spec of a task's metric, what a task declares next to its loss
    (``Task.METRICS``; ``Task.metric_values`` returns per-graph values under ``key``): role
    ``"task"`` (the first of an instance's ``spec.metrics`` is its ``"primary"``,
    ``Task.metric_specs``), watched by the nightly regression rule."""
    return MetricSpec(test_metric(key), display or key, "test", unit=unit, direction=direction, stat=key,
                      stage="trained", log_scale=log_scale, watch=True, description=description, role="task")


def method_metric(key: str, *, direction: Direction = None, unit: str = "", display: str | None = None,
                  log_scale: bool = True, number_format: NumberFormat = "g", description: str = "") -> MetricSpec:
    """The ``test.<key>`` spec of a method's extra metric (``Method.METRICS``; ``extra_metrics``
    returns it under ``key``): role ``"diagnostic"``, not watched."""
    return MetricSpec(test_metric(key), display or key, "test", unit=unit, direction=direction, stat=key,
                      stage="trained", log_scale=log_scale, number_format=number_format, description=description,
                      role="diagnostic")


def reference_metrics(spec: MetricSpec) -> tuple[MetricSpec, MetricSpec]:
    """The ``trivial.<key>`` and ``floor.<key>`` variants of the task metric ``spec``
    (``task_metric``): the same number for the task's trivial predictor and for its floors, role
    ``"reference"``."""
    key = spec.stat or spec.name

    def variant(name: str, family: str, of_what: str) -> MetricSpec:
        return MetricSpec(name, f"{family} {spec.display}", family, unit=spec.unit, direction=spec.direction,
                          stat=key, log_scale=spec.log_scale, description=f"{spec.description}, {of_what}",
                          role="reference")
    return (variant(trivial_metric(key), "trivial", "of the task's trivial predictor"),
            variant(floor_metric(key), "floor", "of a floor (a non-learned reference fitted on the training "
                                                "split; the row's floor column names it)"))


def declare_task_metrics(specs: Iterable[MetricSpec]) -> None:
    """Register a task's metrics (``task_metric`` specs) with their ``trivial.*`` / ``floor.*``
    variants: every name a task point emits for them."""
    for spec in specs:
        if spec.family != "test" or spec.name != test_metric(spec.stat or ""):
            raise ValueError(f"{spec.name}: a task declares its metrics with task_metric(...) (test.<key>, "
                             f"family 'test'), got family {spec.family!r}")
        register_metric(spec)
        for variant in reference_metrics(spec):
            register_metric(variant)


def declare(specs: Iterable[MetricSpec]) -> None:
    """Register every spec of ``specs`` (a probe's or a method's ``METRICS``)."""
    for spec in specs:
        register_metric(spec)


def _declare_runs() -> None:
    register_metric(MetricSpec(PARAMS, "parameters", "params", number_format="int", aggregate="first",
                               description="trainable parameters"))
    register_metric(MetricSpec(STATUS, "status", "status", aggregate="first",
                               description="a run without measurements (failed / not_applicable / skipped)"))
    train: dict[str, tuple[str, str, Direction, str]] = {
        "final_loss": ("final loss", "", "lower", "mean training loss over the last 10% of steps"),
        "wall_s": ("training wall time", "s", None, "wall-clock training time"),
        "steps": ("training steps", "", None, "optimiser steps taken"),
        "steps_per_s": ("training steps/s", "steps/s", "higher", "optimiser steps per second"),
        "flops": ("training FLOPs", "FLOP", None, "forward+backward FLOPs of the first step x steps taken"),
        "best_val": ("best validation value", "", None,
                     "best validation value of the task's first metric (its direction is that metric's)"),
        "best_step": ("best validation step", "", None, "step of the checkpoint with the best validation value"),
        "val_improvement_last_fifth": ("validation gain, last fifth", "", None,
                                       "relative improvement of the best validation value over the last fifth "
                                       "of the budget (runs before the convergence rule of issue 18)"),
        "val_improvement": ("validation gain, judged window", "", None,
                            "relative improvement of the best validation value over the window the convergence "
                            "verdict judges: fixed budgets, budget fractions 0.3 to 0.5 (learning rate >= half "
                            "its peak); convergence-driven budgets, the last `patience` validations before the "
                            "cool-down"),
        "val_noise": ("validation noise (SE)", "", None,
                      "standard error of the validation mean over graphs (s / sqrt(n)) at the reference value "
                      "of the convergence judgement: the noise an improvement must exceed"),
        "plateau_step": ("plateau step", "", None,
                         "convergence-driven budgets: step at which the validation plateau was detected "
                         "(absent when a cap was reached first)"),
        "cooldown_steps": ("cool-down steps", "", None,
                           "convergence-driven budgets: steps of the final linear decay of the learning rate "
                           "to 0 (cooldown_fraction x the steps before it)")}
    for key, (display, unit, direction, doc) in train.items():
        register_metric(MetricSpec(train_metric(key), display, "train", unit=unit, direction=direction, stat=key,
                                   stage="trained",
                                   number_format="int" if key in ("steps", "plateau_step", "cooldown_steps") else "g",
                                   description=doc))
    register_metric(MetricSpec(tune_metric("best_val"), "tuning: best validation value", "tune", stat="best_val",
                               description="best validation value of the task's first metric in a tuning run "
                               "(its direction is that metric's)"))
    register_metric(MetricSpec(tune_metric("best_step"), "tuning: best step", "tune", stat="best_step",
                               number_format="int", description="step of the best validation value"))
    register_metric(MetricSpec(tune_metric("wall_s"), "tuning: training time", "tune", unit="s", stat="wall_s",
                               description="training wall time of the tuning run"))


# stat: (display, unit, direction, aggregate, number format, description)
_TIMING: dict[str, tuple[str, str, Direction, Aggregate, NumberFormat, str]] = {
    "graphs_per_s": ("throughput", "graphs/s", "higher", "mean", "int", "graphs per second"),
    "nodes_per_s": ("node throughput", "nodes/s", "higher", "mean", "int", "nodes per second"),
    "items_per_s": ("throughput", "pairs/s", "higher", "mean", "int", "input pairs per second"),
    "time_median_s": ("time per batch", "s", "lower", "mean", "time", "median time per batch"),
    "time_s": ("time per call", "s", "lower", "mean", "time", "median time per call"),
    "time_iqr_s": ("time IQR", "s", None, "mean", "time", "interquartile range of the timed samples"),
    "peak_mem_bytes": ("peak memory", "B", "lower", "max", "bytes", "peak memory of one step"),
    "flops": ("FLOPs", "FLOP", None, "first", "g", "floating-point operations per step (counted)"),
    "gflops_per_s": ("FLOP rate", "GFLOP/s", "higher", "mean", "g", "counted FLOPs / median time"),
    "compile_time_s": ("compile time", "s", "lower", "mean", "time", "torch.compile time of the first call"),
    "rel_err_vs_e3nn": ("rel. err vs e3nn", "", "lower", "max", "sci", "max relative difference to e3nn's output"),
    "weights": ("weights", "", None, "first", "int", "trainable weights of the module"),
}


def timing_spec(name: str, family: str, stat: str, mode: str | None, watch: bool = False) -> MetricSpec:
    """The spec of timing statistic ``stat`` (``_TIMING``) under ``name``: the throughput probe,
    scaling sweeps and tensor-product microbenchmarks share these definitions."""
    display, unit, direction, agg, fmt, doc = _TIMING[stat]
    return MetricSpec(name, f"{mode} {display}" if mode else display, family, unit=unit, direction=direction,
                      aggregate=agg, stat=stat, mode=mode, number_format=fmt, watch=watch,
                      description=doc)


def _declare_benches() -> None:
    """The scaling-sweep and tensor-product bench metrics (``benches/scaling.py``, ``tp_bench.py``)."""
    for stat in SCALING_STATS:
        register_metric(timing_spec(scaling_metric(stat), "scaling", stat, None))
    for stat in TP_BENCH_STATS:
        register_metric(timing_spec(tp_bench_metric(stat), "tp_bench", stat, None))


_declare_runs()
_declare_benches()
