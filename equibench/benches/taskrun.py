"""The ``task`` bench: train and evaluate one (task, method, seed) — ``run_one(spec)``.

``run_one`` is pure and picklable: build data (cached), build the model, run the probes of the
``init`` phase, train to the shared budget (``training.py``), run the ``training`` probes (the
learning curve), evaluate the task metrics on the test split (and its trivial predictor and
floors), run the ``trained`` probes and, in one seed's point per configuration, the
``architecture`` probes. The probes (``metrics/probe.py``; built in: equivariance in fp32 as
deployed and fp64 on a copy rebuilt under a float64 default, the e3nn precision trap, under the
task's group and its broken group; the Lie derivative; the fp64 error on the task's exactly
symmetric inputs; degeneracy curves; throughput, memory and FLOPs; the profile) are switched and
set by the suite's ``evaluate:`` mapping (``EvalConfig``). Every row's metric is declared by its
owner: the task (``Task.METRICS``), the method (``Method.METRICS``), the probe
(``Probe.METRICS``) or the catalogue (params, ``train.*``).
"""
from __future__ import annotations

import datetime as _dt
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader

from ..core.errors import NotApplicable, UserError
from ..core.registry import get_method, get_task
from ..core.spec import RunSpec, TaskSpec
from ..datasets.base import Task
from ..methods.base import Method, count_parameters
from ..metrics import catalogue
from ..metrics.probe import Probe, ProbeContext, evaluate_model
from ..metrics.throughput import device_name
from ..symmetry.group3d import common_group
from ..symmetry.precision import default_dtype
from .base import Bench, Point, Row, register_bench
from .training import TrainConfig, evaluate, train

#: the ``evaluate:`` settings of a task point (a suite file's ``evaluate:`` mapping): one switch per
#: registered probe and its settings (``metrics.probe.EvalSettings``), assembled from the probes
#: registered at import (the built-in ones); ``EvalConfig.from_dict`` validates against the probes
#: registered at the time of the call, plugins included
EvalConfig = evaluate_model()


def validate_spec(spec: RunSpec) -> None:
    """Raise ``UserError`` for unknown names or bad option types before anything runs."""
    get_task(spec.task, **spec.task_options)
    get_method(spec.method, **spec.method_options)
    TrainConfig.from_dict(spec.train)
    EvalConfig.from_dict(spec.evaluate)
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {spec.device!r} requested but CUDA is not available")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def spec_identity(spec: RunSpec) -> Row:
    """The columns every row of a task run carries (failed rows included)."""
    return {"spec_hash": spec.hash, "task": spec.task, "method": spec.method, "seed": spec.seed,
            "task_options": spec.task_options, "method_options": spec.method_options,
            "train_config": spec.train, "eval_config": spec.evaluate, "device": spec.device}


def load_state_keep_constants(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict`` that keeps the model's own value of every *buffer* the state only
    repeats at lower precision (equal within float32 rounding): such buffers are build-time
    constants — e3nn's Wigner-3j tables, escnn's kernel bases — and a float64 rebuild must keep
    its float64 values, or the structural error measured is float32's (~1e-9). Buffers present on
    one side only are eval-mode caches and are skipped; every parameter must be present."""
    own = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    missing = sorted(params - set(state))
    if missing:
        raise KeyError(f"state has no value for parameter(s) {missing[:5]}")
    merged = {}
    for k, v in state.items():
        if k not in own:  # a cache buffer the other copy made in eval mode (escnn R2Conv filters)
            continue
        mine = own.get(k)
        constant = (k not in params and mine is not None and torch.is_tensor(v) and v.is_floating_point()
                    and mine.shape == v.shape and mine.dtype != v.dtype
                    and torch.allclose(mine.to(v.dtype), v, rtol=1e-5, atol=1e-7))
        merged[k] = mine if constant else v
    model.load_state_dict(merged, strict=False)  # every parameter is present (checked above)


def build_model(method, spec_task, seed: int, dtype: torch.dtype, state: dict | None = None):
    """Build under ``dtype`` as the default dtype (so build-time constants are in ``dtype``),
    with the same seed; optionally load ``state`` (parameters cast to ``dtype``; constant
    buffers keep their ``dtype`` values, see ``load_state_keep_constants``)."""
    with default_dtype(dtype):
        seed_everything(seed)
        model = method.build(spec_task, seed=seed)
        model = model.to(dtype)
        if state is not None:
            load_state_keep_constants(model, state)
    return model


def claims_exactness(method: Method, spec: TaskSpec) -> bool:
    """Whether ``method`` claims exact equivariance on a task of ``spec`` (``exact_on(spec)`` where
    the method defines it, else its claim for the task's domain)."""
    exact_on = getattr(method, "exact_on", None)
    return bool(exact_on(spec)) if callable(exact_on) else method.is_exact(spec.domain)


def broken_group(spec: TaskSpec, method: Method, exact: bool) -> str | None:
    """The group of the ``equivariance_broken.*`` measurement: the task's ``broken_group`` (None
    when it declares none; graph3d only), narrowed like the main measurement to what an exact
    method declares (``common_group``: an SO(3)-exact method is measured on SE(3))."""
    if spec.broken_group is None or spec.domain != "graph3d":
        return None
    return common_group(spec.broken_group, method.group) if exact else spec.broken_group


TEST_SEED = 0  # the test split is drawn with this seed in every run, so methods share one test set


def load_split(task: Task, split: str, seed: int) -> list[Data]:
    """Split ``split`` of ``task`` for a run with ``seed``: the seed draws the training and
    validation data (the subset drawn from a fixed pool, or the systems simulated: each task's
    ``load`` says which, ``Task.SEED_DRAWS``), while the test split is always that of
    ``TEST_SEED``, so every seed and method is scored on the same test set and the seeds' spread
    covers initialisation, batch order and the training-data draw, not the test draw."""
    return task.load(split, seed=TEST_SEED if split == "test" else seed)


def load_splits(task: Task, seed: int) -> tuple[list[Data], list[Data]]:
    """(train, test) of a run with ``seed`` (``load_split``)."""
    return load_split(task, "train", seed), load_split(task, "test", seed)


@torch.no_grad()
def score_predictor(task: Task, predict: Callable[[Batch], torch.Tensor], test_data: list[Data],
                    batch_size: int) -> dict[str, float]:
    """The task's metrics of a non-learned predictor on ``test_data``, averaged like the methods'
    (``evaluate``)."""
    sums: dict[str, list[torch.Tensor]] = {}
    for batch in DataLoader(test_data, batch_size=batch_size, shuffle=False):
        for k, v in task.metric_values(predict(batch), batch).items():
            sums.setdefault(k, []).append(v.detach().double().cpu())
    return {k: torch.cat(v).mean().item() for k, v in sums.items()}


def trivial_metrics(task: Task, train_data: list[Data], test_data: list[Data], batch_size: int) -> dict[str, float]:
    """The task's metrics for its trivial predictor (``Task.trivial_prediction``) on the test split."""
    return score_predictor(task, task.trivial_prediction(train_data), test_data, batch_size)


def floor_metrics(task: Task, train_data: list[Data], test_data: list[Data],
                  batch_size: int) -> dict[str, dict[str, float]]:
    """Per floor (``Task.floors``, fitted on ``train_data``), its metrics on the test split."""
    return {name: score_predictor(task, predict, test_data, batch_size)
            for name, predict in task.floors(train_data).items()}


def declared_reading(probe: Probe, reading: dict[str, Any]) -> dict[str, Any]:
    """``reading`` as ``add``'s arguments, after checking that ``probe`` declares its metric."""
    if reading["metric"] not in {m.name for m in probe.METRICS}:
        raise RuntimeError(f"probe {probe.name!r} emitted {reading['metric']!r}, which it does not declare "
                           f"(add its MetricSpec to {type(probe).__name__}.METRICS)")
    return reading


def run_one(spec: RunSpec) -> list[dict[str, Any]]:
    """Measure one spec; returns tidy rows (the spec's identity and measurement context; the
    engine adds the run-level columns). Raises ``NotApplicable`` when the method does not
    support the task; any other exception propagates: the engine's one writer
    (``results.rows.exception_rows``) records it as the point's ``failed`` / ``out_of_memory`` row."""
    return _run_one(spec, _dt.datetime.now(_dt.timezone.utc).isoformat())


def _run_one(spec: RunSpec, started: str) -> list[dict[str, Any]]:
    task = get_task(spec.task, **spec.task_options)
    method = get_method(spec.method, **spec.method_options)
    tspec = task.spec
    reason = method.supports(tspec)
    if reason:
        raise NotApplicable(reason)
    cfg, ecfg = TrainConfig.from_dict(spec.train), EvalConfig.from_dict(spec.evaluate)
    device = torch.device(spec.device)
    base = {**spec_identity(spec), "provenance": task.provenance(), "device_name": device_name(device),
            "started_at": started, "exact_claim": claims_exactness(method, tspec),
            "exact_scope": method.exactness_scope(tspec),
            "setting_source": spec.setting_source or "suite file", "implementation": method.implementation(),
            "tuning_edge": spec.tuning_edge, "budget": cfg.budget,
            "float32_caveat": method.float32_caveat}
    rows: list[dict[str, Any]] = []

    def add(metric: str, value: Any, **columns: Any) -> None:
        catalogue.get_metric(metric)  # every number a row carries is declared by its owner
        rows.append({**base, "metric": metric, "value": None if value is None else float(value), **columns})

    train_data, test_data = load_splits(task, spec.seed)
    probes = ecfg.probes(tspec)
    for probe in probes:
        probe.prepare(task, tspec)
    exact = claims_exactness(method, tspec)
    group = common_group(tspec.group, method.group) if exact and tspec.domain == "graph3d" else tspec.group
    model = build_model(method, tspec, spec.seed, torch.float32)
    add(catalogue.PARAMS, count_parameters(model))

    fp64_copy: list[torch.nn.Module] = []  # built once per point, then loaded with each phase's weights

    def float64_copy() -> torch.nn.Module:
        """The model rebuilt under a float64 default (float64 build-time constants) holding the
        current weights: built at the first phase that asks, then re-loaded
        (``load_state_keep_constants``), in train mode so no eval-time cache of the previous
        weights survives."""
        if not fp64_copy:
            fp64_copy.append(build_model(method, tspec, spec.seed, torch.float64, state=model.state_dict()))
        else:
            fp64_copy[0].train()
            load_state_keep_constants(fp64_copy[0], model.state_dict())
        return fp64_copy[0]

    ctx = ProbeContext(task=task, method=method, spec=tspec, seed=spec.seed, device=device, test_data=test_data,
                       model=model, group=group, broken_group=broken_group(tspec, method, exact),
                       float64_factory=float64_copy)

    def run_probes(phase: str) -> None:
        ctx.phase = phase
        for probe in probes:
            if phase in probe.phases:
                for r in probe.measure(ctx, phase):
                    add(**declared_reading(probe, r))

    run_probes("init")
    val_metric = tspec.metrics[0]
    val_data = load_split(task, "val", spec.seed) if cfg.val_points > 0 or cfg.budget == "converge" else None
    result = train(model, method, task, train_data, cfg, spec.seed, device, val_data=val_data,
                   val_metric=val_metric, higher_is_better=bool(task.primary_metric.higher_is_better))
    base["convergence"] = result.convergence  # on every row of the run, so no number is read without it
    for r in rows:
        r["convergence"] = result.convergence
    for k, v in result.summary.items():
        add(catalogue.train_metric(k), v, batch_size=cfg.batch_size, val_metric=val_metric, select=cfg.select)
    ctx.train_result = result
    run_probes("training")
    for k, v in evaluate(model, method, task, test_data, cfg.eval_batch_size, device).items():
        add(catalogue.test_metric(k), v, batch_size=cfg.eval_batch_size, n_graphs=len(test_data))
    for k, v in trivial_metrics(task, train_data, test_data, cfg.eval_batch_size).items():
        add(catalogue.trivial_metric(k), v, n_graphs=len(test_data))
    for name, scores in floor_metrics(task, train_data, test_data, cfg.eval_batch_size).items():
        for k, v in scores.items():
            add(catalogue.floor_metric(k), v, floor=name, n_graphs=len(test_data))
    run_probes("trained")
    if ecfg.measures_architecture(spec.seed):
        run_probes("architecture")
    finished = _dt.datetime.now(_dt.timezone.utc).isoformat()
    for r in rows:
        r["finished_at"] = finished
    return rows


@register_bench("task")
class TaskBench(Bench):
    """Task runs: one point per ``RunSpec`` (its hash is the point's), each in its own worker."""

    def __init__(self, specs: list[RunSpec]) -> None:
        self.specs = list(dict.fromkeys(specs))

    def points(self) -> list[Point]:
        for s in self.specs:
            validate_spec(s)
        return [Point(bench=self.kind, hash=s.hash, label=s.label, config=s.to_dict(), identity=spec_identity(s),
                      method=s.method, device=s.device) for s in self.specs]

    @classmethod
    def run_point(cls, point: Point, history: list[Row]) -> list[Row]:
        return run_one(RunSpec.from_dict(point.config))
