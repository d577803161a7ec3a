"""The metric catalogue: every metric a result row can carry, declared once.

A ``MetricSpec`` says what a metric name means: display name, unit, direction (``"higher"`` or
``"lower"`` is better, ``None`` for context-only numbers such as parameter counts or wall time),
how it aggregates over seeds, and structured facets (``family``, ``stage``, ``dtype``, ``stat``,
``mode``, ``axis``) so that readers never parse names. Emitters build names with the builder
functions (``equivariance_metric("trained", "fp64", "rel_mean")`` ->
``"equivariance.trained.fp64.rel_mean"``); readers look them up with ``get_metric`` /
``find_metric``. Plugin tasks and methods declare their own metrics with ``register_metric``.

Scaling-sweep and tensor-product rows are namespaced (``scaling.time_s``,
``tp_bench.time_s``); records written before that carried the bare names (``time_s``), which
``equibench.results.upgrade`` maps on read.

Plain Python only: this module sits in ``metrics`` and imports nothing above ``core``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Any, Literal

from ..core.errors import UserError, did_you_mean

Direction = Literal["higher", "lower"] | None
Aggregate = Literal["mean", "median", "max", "min", "first"]
NumberFormat = Literal["g", "int", "sci", "bytes", "time"]

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

    def __post_init__(self) -> None:
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


def find_metric(name: str) -> MetricSpec | None:
    """The spec of ``name``, or None when it is not declared."""
    return _CATALOGUE.get(name)


def get_metric(name: str) -> MetricSpec:
    """The spec of ``name``; ``UnknownMetricError`` (with close matches) when not declared."""
    spec = _CATALOGUE.get(name)
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
# declarations

_STAT_WORDS = {"rel_mean": "mean rel.", "rel_median": "median rel.", "rel_max": "max rel.", "abs_max": "max abs.",
               "disp_rel_mean": "mean rel. to displacement", "disp_rel_median": "median rel. to displacement",
               "disp_rel_max": "max rel. to displacement", "nonfinite": "non-finite share"}


def _declare_equivariance() -> None:
    for stage in STAGES:
        for dtype in DTYPES:
            for stat in EQUIVARIANCE_STATS:
                register_metric(MetricSpec(
                    equivariance_metric(stage, dtype, stat), f"equiv. err {dtype} {stage}, {_STAT_WORDS[stat]}",
                    "equivariance", direction="lower", aggregate="max" if stat.endswith("_max") else "mean",
                    stage=stage, dtype=dtype, stat=stat, number_format="sci",
                    floor=FLOORS[dtype] if "rel_" in stat else None,
                    watch=stage == "trained" and stat == "rel_mean",
                    description="||f(g·X) − ρ(g) f(X)|| over test graphs and group samples; relative: / ||f(X)||; "
                                "relative to displacement (point outputs): / ||f(X) − x||"))
            for stat in EQUIVARIANCE_STATS:
                register_metric(MetricSpec(
                    broken_equivariance_metric(stage, dtype, stat),
                    f"broken-group equiv. err {dtype} {stage}, {_STAT_WORDS[stat]}", "equivariance_broken",
                    direction=None, aggregate="max" if stat.endswith("_max") else "mean", stage=stage, dtype=dtype,
                    stat=stat, number_format="sci", floor=FLOORS[dtype] if "rel_" in stat else None,
                    description="||f(g·X) − ρ(g) f(X)|| as for 'equivariance', with g drawn from the group the "
                                "task's environment breaks (TaskSpec.broken_group, e.g. E(3) for nbody_field; "
                                "the symmetry-breaking field itself is held fixed): how far a model follows "
                                "the symmetry the data do not have. Context, not a score: an accurate model "
                                "must break it"))
        for stat in LIE_STATS:
            register_metric(MetricSpec(
                lie_metric(stage, stat), f"Lie deriv. fp64 {stage}, {_STAT_WORDS[stat]}", "lie_derivative",
                direction="lower", aggregate="max" if stat == "rel_max" else "mean", stage=stage, dtype="fp64",
                stat=stat, number_format="sci", description="relative Lie derivative of the fp64 model"))
    for axis in DEGENERACY_AXES:
        for stat in DEGENERACY_STATS:
            register_metric(MetricSpec(
                degeneracy_metric(axis, stat), f"degeneracy ({axis}) {_STAT_WORDS[stat]}", "degeneracy",
                direction="lower", aggregate="max" if stat != "rel_mean" else "mean", stage="trained", dtype="fp64",
                stat=stat, axis=axis, number_format="sci", log_scale=stat != "nonfinite",
                description="equivariance error (fp64, trained) near degenerate inputs"))
    for stage in STAGES:
        for stat in SYMMETRIC_STATS:
            register_metric(MetricSpec(
                symmetric_metric(stage, stat), f"symmetric-input equiv. err fp64 {stage}, {_STAT_WORDS[stat]}",
                "symmetric", direction="lower", aggregate="mean" if stat == "rel_mean" else "max", stage=stage,
                dtype="fp64", stat=stat, number_format="sci", floor=FLOORS["fp64"] if "rel_" in stat else None,
                description="||f(g·X) − ρ(g) f(X)|| (equivariance_error, fp64 model, g = (R, t, P) sampled from the "
                            "measured group) on one exactly symmetric input X of the task (benzene, methane, a "
                            "ring of equal charges, a symmetric cloud, ...; row column symmetric_input); frame and "
                            "canonicalisation methods are exact only on inputs without a symmetry of their own "
                            "(row column exact_scope)"))


_TEST: dict[str, tuple[str, Direction, bool, str]] = {  # name: (unit, direction, log scale, description)
    "mse": ("", "lower", True, "mean squared error (n-body positions)"),
    "mae": ("target units", "lower", True, "mean absolute error of the QM9 target, in its units"),
    "energy_mae": ("eV", "lower", True, "mean absolute energy error (md)"),
    "force_mae": ("eV/Å", "lower", True, "mean absolute force error (md)"),
    "1-cos2": ("", "lower", True, "1 − cos² between predicted and true normals"),
    "angle_deg": ("deg", "lower", True, "mean unoriented angle between predicted and true normals"),
    "accuracy": ("", "higher", False, "accuracy on the primary (original-orientation) test copies"),
    "group_accuracy": ("", "higher", False, "accuracy over every rotated test copy"),
    "upright_accuracy": ("", "higher", False, "accuracy on the unrotated test copies"),
    "accuracy_6": ("", "higher", False, "accuracy on the test images of class 6 (digits; a half-turn makes a 9)"),
    "accuracy_9": ("", "higher", False, "accuracy on the test images of class 9 (digits; a half-turn makes a 6)"),
}
# method extras (canonicaliser diagnostics): context only, no better direction (on isotropic data no
# equivariant canonicaliser can stay near the identity; see methods/canonicalization.py)
_METHOD_EXTRAS: dict[str, tuple[str, bool, str]] = {  # name: (unit, log scale, description)
    "identity_metric": ("", False, "equiadapt's identity metric: 1 - MSE(R, I) of the canonicalising "
                        "rotation (graph3d); share of inputs mapped to the identity element (images)"),
    "prior_mse": ("", True, "mean((R − I)²) of the canonical rotation (graph canonicaliser)"),
    "mean_angle_deg": ("deg", False, "mean rotation angle of the canonical frame (improper = 180)"),
    "prior_ce": ("", True, "cross-entropy of the canonicaliser's scores to the identity (images)"),
    "backend_agreement": ("", True, "max |f − f_e3nn| / max |f_e3nn| per test batch (mean over batches): the "
                          "e3nn method with cuEquivariance tensor products against the same weights through "
                          "e3nn's, in the run's dtype"),
}


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
    register_metric(MetricSpec(CURVE_VAL, "validation value", "curve", stat="val", stage="training",
                               aggregate="mean", description="the task's first metric on the validation split "
                               "during training (x = step; curve_wall_s, curve_flops beside it)"))
    for key, (unit, direction, log, doc) in _TEST.items():
        register_metric(MetricSpec(test_metric(key), key, "test", unit=unit, direction=direction, stat=key,
                                   stage="trained", log_scale=log, watch=True, description=doc))
        register_metric(MetricSpec(trivial_metric(key), f"trivial {key}", "trivial", unit=unit, direction=direction,
                                   stat=key, log_scale=log, description=f"{doc}, of the task's trivial predictor"))
        register_metric(MetricSpec(floor_metric(key), f"floor {key}", "floor", unit=unit, direction=direction,
                                   stat=key, log_scale=log, description=f"{doc}, of a floor (a non-learned reference "
                                   "fitted on the training split; the row's floor column names it)"))
    for key, (unit, log, doc) in _METHOD_EXTRAS.items():
        register_metric(MetricSpec(test_metric(key), key, "test", unit=unit, stat=key, stage="trained",
                                   log_scale=log, description=doc))


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


_PROFILE_DOCS = {
    "frames": "frame / canonicalisation construction (record_function 'equibench.frames')",
    "backbone": "calls of the shared backbone (record_function 'equibench.backbone')",
    "to_frame": "mapping into / out of the frames and averaging (record_function 'equibench.to_frame')",
    "tensor_product": "tensor-product modules (e3nn, cuEquivariance) and escnn point convolutions, an "
                      "architecture without wrapper labels",
    "linear": "linear layers and matrix products outside tensor products, an architecture without wrapper labels",
    "scatter": "gathers and scatters of message passing (index_select, scatter_add, ...), an architecture "
               "without wrapper labels",
    "other": "everything else: glue outside the labelled regions (wrappers), element-wise ops and activations "
             "(architectures), and the Python of forward itself",
}
_PROFILE_DOCS = {k: f"share of one inference forward's profiled time (torch.profiler, self time of the ops, median "
                    f"over forwards) spent in {v}; context, not a score" for k, v in _PROFILE_DOCS.items()}


def _timing_spec(name: str, family: str, stat: str, mode: str | None, watch: bool = False) -> MetricSpec:
    display, unit, direction, agg, fmt, doc = _TIMING[stat]
    return MetricSpec(name, f"{mode} {display}" if mode else display, family, unit=unit, direction=direction,
                      aggregate=agg, stat=stat, mode=mode, number_format=fmt, watch=watch,
                      description=doc)


def _declare_benches() -> None:
    for mode in THROUGHPUT_MODES:
        for stat in THROUGHPUT_STATS:
            register_metric(_timing_spec(throughput_metric(mode, stat), "throughput", stat, mode,
                                         watch=stat in ("graphs_per_s", "peak_mem_bytes")))
    for mode in PROFILE_MODES:
        for region in PROFILE_REGIONS:
            register_metric(MetricSpec(
                profile_metric(mode, region), f"{mode} time share: {region.replace('_', ' ')}", "profile",
                direction=None, aggregate="mean", stat=f"{region}_share", mode=mode, number_format="g",
                log_scale=False, description=_PROFILE_DOCS[region]))
    for stat in SCALING_STATS:
        register_metric(_timing_spec(scaling_metric(stat), "scaling", stat, None))
    for stat in TP_BENCH_STATS:
        register_metric(_timing_spec(tp_bench_metric(stat), "tp_bench", stat, None))


_declare_equivariance()
_declare_runs()
_declare_benches()


# soft_equivariance (methods/wrappers/soft_equivariance.py): the penalty's strength and the tested
# model's defect; context only (a larger lam is neither better nor worse in itself)
_SOFT_EQUIVARIANCE: dict[str, tuple[str, bool, str]] = {  # name: (display, log scale, description)
    "soft_lam": ("penalty strength lam", True, "lam of the tested checkpoint: fixed, or the multiplier fitted by "
                 "dual ascent (lam_mode='dual')"),
    "soft_defect": ("relative equivariance defect", True, "mean((f(g·X) − ρ(g) f(X))²) / mean squared target "
                    "signal on the test batches, one element of the penalised group per graph, eval mode"),
}
for _key, (_display, _log, _doc) in _SOFT_EQUIVARIANCE.items():
    register_metric(MetricSpec(test_metric(_key), _display, "test", stat=_key, stage="trained", log_scale=_log,
                               number_format="g", description=_doc))
