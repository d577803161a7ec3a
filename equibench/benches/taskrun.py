"""The ``task`` bench: train and evaluate one (task, method, seed) — ``run_one(spec)``.

``run_one`` is pure and picklable: build data (cached), build the model, measure equivariance at
init, train to the shared budget (``training.py``), evaluate the task metrics on the test split,
measure equivariance (fp32 as deployed; fp64 on a copy rebuilt under a float64 default, the e3nn
precision trap) under the task's group and, where the task declares one, under the group its
environment breaks (``equivariance_broken.*``, ``TaskSpec.broken_group``), the Lie derivative (along
the generators of the measured group), the fp64 error on each of the task's exactly symmetric
inputs (``symmetric.*``, at init and trained; ``Task.symmetric_inputs``, built in float64), optional
degeneracy curves, and throughput + memory. Every metric name comes from the catalogue
(``equibench.metrics.catalogue``).
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

from ..core.config import Config, config_from_dict
from ..core.errors import NotApplicable, UserError
from ..core.registry import get_method, get_task
from ..core.spec import RunSpec, TaskSpec
from ..datasets.base import Task
from ..methods.base import Method, count_parameters
from ..metrics import catalogue, degeneracy
from ..metrics.equivariance import equivariance_error, lie_derivative
from ..metrics.profile import profile_breakdown
from ..metrics.symmetric import symmetric_input_errors
from ..metrics.throughput import device_name, measure_throughput
from ..symmetry.group3d import common_group, lie_generators
from ..symmetry.precision import default_dtype, dtype_name
from .base import Bench, Point, Row, register_bench
from .training import TrainConfig, evaluate, train


class EvalConfig(Config):
    """What is measured after training and how (the suite file's ``evaluate:`` mapping)."""

    equivariance_samples: int = 8
    equivariance_graphs: int = 32
    lie_derivative: bool = True
    degeneracy: bool = False
    #: the fp64 equivariance error on each of the task's exactly symmetric inputs (``symmetric.*``)
    symmetric_inputs: bool = True
    throughput: bool = True
    throughput_batch: int = 100
    throughput_modes: tuple[str, ...] = ("inference", "train")
    throughput_min_sample_s: float = 0.05
    throughput_repeats: int = 10
    throughput_threads: int = 0  # CPU threads while timing; 0 = torch's default
    #: an unstable timing (IQR / median > 0.25) is measured again up to this many times (rows: ``remeasured``)
    throughput_remeasure: int = 2
    #: where inference time goes: torch.profiler shares of the wrappers' labelled regions (frames,
    #: backbone, to_frame) or of op categories (``metrics/profile.py``), in the architecture point
    profile: bool = True
    flops: bool = True
    compile: bool = False
    #: throughput, memory and FLOPs depend on the architecture and the batch, not on the trained
    #: weights or the seed: measure them in one seed's point per configuration (the planner sets
    #: ``architecture_seed`` to the first seed of the suite) instead of in every seed's
    measure_once: bool = True
    #: the seed whose point takes the seed-independent measurements (None: every seed); set by the
    #: planner when ``measure_once``, the same value in every seed's spec of a configuration
    architecture_seed: int | None = None

    def measures_architecture(self, seed: int) -> bool:
        """Whether the point of ``seed`` takes the seed-independent measurements (throughput,
        memory, FLOPs)."""
        return self.throughput and (self.architecture_seed is None or seed == self.architecture_seed)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        return config_from_dict(cls, d, "evaluate")


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

    def add(metric: str, value: Any, **ctx: Any) -> None:
        catalogue.get_metric(metric)  # every number a row carries is declared once (register_metric)
        rows.append({**base, "metric": metric, "value": None if value is None else float(value), **ctx})

    train_data, test_data = load_splits(task, spec.seed)
    eq_batch = Batch.from_data_list(test_data[:ecfg.equivariance_graphs])
    symmetric: list[tuple[str, Data]] = []
    if ecfg.symmetric_inputs and tspec.domain == "graph3d":
        with default_dtype(torch.float64):  # exactly symmetric in float64, not only to float32 rounding
            symmetric = task.symmetric_inputs()
    point_groups = {g.name: g.point_group for g in task.symmetric_geometries()} if symmetric else {}
    exact = claims_exactness(method, tspec)
    group = common_group(tspec.group, method.group) if exact and tspec.domain == "graph3d" else tspec.group
    broken = broken_group(tspec, method, exact)
    model = build_model(method, tspec, spec.seed, torch.float32)
    add(catalogue.PARAMS, count_parameters(model))

    fp64_copy: list[torch.nn.Module] = []  # built once per point, then loaded with each stage's weights

    def float64_copy() -> torch.nn.Module:
        """The model rebuilt under a float64 default (float64 build-time constants) holding the
        current weights: built at the first stage, re-loaded (``load_state_keep_constants``) at
        the next, in train mode so no eval-time cache of the previous weights survives."""
        if not fp64_copy:
            fp64_copy.append(build_model(method, tspec, spec.seed, torch.float64, state=model.state_dict()))
        else:
            fp64_copy[0].train()
            load_state_keep_constants(fp64_copy[0], model.state_dict())
        return fp64_copy[0]

    def measure_equivariance(stage: str) -> None:
        fp64 = float64_copy()
        # under the task's group, and under the group its environment breaks where it declares one
        measured = [(group, catalogue.equivariance_metric)]
        if broken is not None:
            measured.append((broken, catalogue.broken_equivariance_metric))
        for dtype, m in ((torch.float32, model), (torch.float64, fp64)):
            for grp, metric in measured:
                res = equivariance_error(m.to(device), eq_batch, tspec, n_samples=ecfg.equivariance_samples,
                                         dtype=dtype, group=grp, seed=spec.seed)
                for stat in catalogue.EQUIVARIANCE_STATS:
                    if stat in res:  # disp_*: point outputs only
                        add(metric(stage, dtype_name(dtype), stat), res[stat], stage=stage, dtype=dtype_name(dtype),
                            group=grp, batch_size=res["n_graphs"], repeats=res["n_samples"])
        for r in symmetric_input_errors(fp64.to(device), symmetric, tspec, n_samples=ecfg.equivariance_samples,
                                        group=group, seed=spec.seed):
            for stat in catalogue.SYMMETRIC_STATS:
                if stat in r:  # disp_rel_max: point outputs only
                    add(catalogue.symmetric_metric(stage, stat), r[stat], stage=stage, dtype="fp64", group=group,
                        symmetric_input=r["input"], point_group=point_groups.get(r["input"]), batch_size=1,
                        repeats=r["n_samples"], **({"symmetric_error": r["error"]} if "error" in r else {}))
        if ecfg.lie_derivative and tspec.domain == "graph3d":
            lie = lie_derivative(fp64.to(device), eq_batch, tspec, generators=lie_generators(group))
            for stat in ("rel_mean", "rel_max"):
                add(catalogue.lie_metric(stage, stat), lie[stat], stage=stage, dtype="fp64", group=group,
                    batch_size=int(eq_batch.num_graphs), repeats=len(lie_generators(group)))
        if stage == "trained" and ecfg.degeneracy and tspec.domain == "graph3d":
            for curve in (degeneracy.degeneracy_curve, degeneracy.symmetric_curve):
                for r in curve(fp64.to(device), eq_batch, tspec, group=group):
                    x_label = "gap" if "gap" in r else "config"
                    x_val = r.get("gap", r.get("config"))
                    for stat in ("rel_mean", "rel_max", "nonfinite"):
                        add(catalogue.degeneracy_metric(x_label, stat), r[stat], stage=stage, dtype="fp64", group=group,
                            x=x_val if x_label == "gap" else None, x_label=str(x_val),
                            batch_size=int(eq_batch.num_graphs))

    measure_equivariance("init")
    val_metric = tspec.metrics[0]
    higher = catalogue.get_metric(catalogue.test_metric(val_metric)).higher_is_better
    val_data = load_split(task, "val", spec.seed) if cfg.val_points > 0 or cfg.budget == "converge" else None
    result = train(model, method, task, train_data, cfg, spec.seed, device, val_data=val_data,
                   val_metric=val_metric, higher_is_better=bool(higher))
    base["convergence"] = result.convergence  # on every row of the run, so no number is read without it
    for r in rows:
        r["convergence"] = result.convergence
    for k, v in result.summary.items():
        add(catalogue.train_metric(k), v, batch_size=cfg.batch_size, val_metric=val_metric, select=cfg.select)
    for c in result.curve:
        add(catalogue.CURVE_VAL, c.val, x=c.step, x_label="step", curve_wall_s=c.wall_s, curve_flops=c.flops,
            train_loss=c.train_loss, val_se=c.val_se, val_metric=val_metric, stage="training")
    for k, v in evaluate(model, method, task, test_data, cfg.eval_batch_size, device).items():
        add(catalogue.test_metric(k), v, batch_size=cfg.eval_batch_size, n_graphs=len(test_data))
    for k, v in trivial_metrics(task, train_data, test_data, cfg.eval_batch_size).items():
        add(catalogue.trivial_metric(k), v, n_graphs=len(test_data))
    for name, scores in floor_metrics(task, train_data, test_data, cfg.eval_batch_size).items():
        for k, v in scores.items():
            add(catalogue.floor_metric(k), v, floor=name, n_graphs=len(test_data))
    measure_equivariance("trained")
    if ecfg.measures_architecture(spec.seed):
        tp_data = (test_data * (ecfg.throughput_batch // len(test_data) + 1))[:ecfg.throughput_batch]
        tp_batch = Batch.from_data_list(tp_data)
        for mode in ecfg.throughput_modes:
            # measured once per configuration, so a disturbed timing is not averaged out by other
            # seeds: an unstable one is taken again (``throughput_remeasure``)
            res = measure_throughput(model, tp_batch, mode=mode, device=device, repeats=ecfg.throughput_repeats,
                                     min_sample_s=ecfg.throughput_min_sample_s, flops=ecfg.flops,
                                     compile=ecfg.compile, loss_fn=task.loss,
                                     threads=ecfg.throughput_threads or None, remeasure=ecfg.throughput_remeasure)
            ctx = {k: res[k] for k in ("mode", "dtype", "batch_nodes", "batch_edges", "repeats", "threads",
                                       "timer", "compiled", "mem_method", "calls_per_sample", "unstable",
                                       "load_avg_1min", "remeasured")}
            ctx["batch_size"] = res["batch_graphs"]
            for stat in ("graphs_per_s", "nodes_per_s", "time_median_s", "time_iqr_s", "peak_mem_bytes",
                         "flops", "gflops_per_s", "compile_time_s"):
                if res[stat] is not None:
                    add(catalogue.throughput_metric(mode, stat), res[stat], **ctx)
        if ecfg.profile:
            prof = profile_breakdown(model, tp_batch, device, threads=ecfg.throughput_threads or None)
            pctx = {"mode": "inference", "batch_size": int(tp_batch.num_graphs), "threads": prof["threads"],
                    "repeats": prof["calls"], "profile_scheme": prof["scheme"], "profile_time_s": prof["time_s"],
                    "profile_method": prof["method"]}
            for region, share in prof["shares"].items():
                add(catalogue.profile_metric("inference", region), share, **pctx)
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
