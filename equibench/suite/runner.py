"""The runner: ``run_one(spec)`` measures one (task, method, seed); ``run(...)`` maps it over a
suite with resume, per-spec process isolation and one atomic block of rows per spec.

``run_one`` is pure and picklable: build data (cached), build the model, measure equivariance at
init, train to the shared budget, evaluate the task metrics on the test split, measure
equivariance (fp32 as deployed; fp64 on a copy rebuilt under a float64 default, the e3nn
precision trap), the Lie derivative, optional degeneracy curves, and throughput + memory.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import multiprocessing as mp
import os
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch_geometric.data import Batch

from ..core.envinfo import environment, git_commit, package_versions
from ..metrics.equivariance import equivariance_error, lie_derivative
from ..core.errors import UserError
from ..symmetry.group3d import common_group
from ..symmetry.precision import default_dtype, dtype_name
from ..core.registry import get_method, get_task, load_plugin
from ..core.spec import RunSpec, config_from_dict
from .store import append_block, completed_specs, load_results, write_json_atomic, write_parquet
from ..metrics.throughput import device_name, measure_throughput
from ..benches.training import NonFiniteError, TrainConfig, evaluate, train


@dataclass(frozen=True)
class EvalConfig:
    equivariance_samples: int = 8
    equivariance_graphs: int = 32
    lie_derivative: bool = True
    degeneracy: bool = False
    throughput: bool = True
    throughput_batch: int = 100
    throughput_modes: tuple[str, ...] = ("inference", "train")
    throughput_min_sample_s: float = 0.05
    throughput_repeats: int = 10
    throughput_threads: int = 0  # CPU threads while timing; 0 = torch's default
    flops: bool = True
    compile: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalConfig":
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


def _base_row(spec: RunSpec) -> dict[str, Any]:
    return {"spec_hash": spec.hash, "task": spec.task, "method": spec.method, "seed": spec.seed,
            "task_options": spec.task_options, "method_options": spec.method_options,
            "train_config": spec.train, "eval_config": spec.evaluate, "device": spec.device,
            "git_commit": git_commit(), "versions": package_versions()}


def status_rows(spec: RunSpec, status: str, error: str = "") -> list[dict[str, Any]]:
    """A single row recording a spec that did not produce measurements."""
    return [{**_base_row(spec), "metric": "status", "value": float("nan"), "status": status,
             "error": error, "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat()}]


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


def run_one(spec: RunSpec) -> list[dict[str, Any]]:
    """Measure one spec; returns tidy rows. Exceptions become a single ``failed`` row."""
    started = _dt.datetime.now(_dt.timezone.utc).isoformat()
    try:
        return _run_one(spec, started)
    except Exception as err:  # any failure is a result, not a crash of the suite
        msg = f"{type(err).__name__}: {err}"
        if not isinstance(err, (NonFiniteError, UserError)):
            msg += " | " + " / ".join(traceback.format_exc().strip().splitlines()[-3:])
        return status_rows(spec, "failed", msg)


def _run_one(spec: RunSpec, started: str) -> list[dict[str, Any]]:
    task = get_task(spec.task, **spec.task_options)
    method = get_method(spec.method, **spec.method_options)
    tspec = task.spec
    reason = method.supports(tspec)
    if reason:
        return status_rows(spec, "not_applicable", reason)
    cfg, ecfg = TrainConfig.from_dict(spec.train), EvalConfig.from_dict(spec.evaluate)
    device = torch.device(spec.device)
    base = {**_base_row(spec), "provenance": task.provenance(), "device_name": device_name(device),
            "status": "ok", "error": "", "started_at": started}
    rows: list[dict[str, Any]] = []

    def add(metric: str, value: Any, **ctx: Any) -> None:
        rows.append({**base, "metric": metric, "value": None if value is None else float(value), **ctx})

    train_data, test_data = task.load("train"), task.load("test")
    eq_batch = Batch.from_data_list(test_data[:ecfg.equivariance_graphs])
    group = common_group(tspec.group, method.group) if method.exact and tspec.domain == "graph3d" else tspec.group
    model = build_model(method, tspec, spec.seed, torch.float32)
    from ..methods.base import count_parameters
    add("params", count_parameters(model))

    def measure_equivariance(stage: str) -> None:
        fp64 = build_model(method, tspec, spec.seed, torch.float64, state=model.state_dict())
        for dtype, m in ((torch.float32, model), (torch.float64, fp64)):
            res = equivariance_error(m.to(device), eq_batch, tspec, n_samples=ecfg.equivariance_samples,
                                     dtype=dtype, group=group, seed=spec.seed)
            for stat in ("rel_mean", "rel_median", "rel_max", "abs_max"):
                add(f"equivariance.{stage}.{dtype_name(dtype)}.{stat}", res[stat], stage=stage,
                    dtype=dtype_name(dtype), group=group, batch_size=res["n_graphs"],
                    repeats=res["n_samples"])
        if ecfg.lie_derivative and tspec.domain == "graph3d":
            lie = lie_derivative(fp64.to(device), eq_batch, tspec)
            for stat in ("rel_mean", "rel_max"):
                add(f"lie_derivative.{stage}.fp64.{stat}", lie[stat], stage=stage, dtype="fp64",
                    batch_size=int(eq_batch.num_graphs), repeats=3)
        if stage == "trained" and ecfg.degeneracy and tspec.domain == "graph3d":
            from ..metrics import degeneracy
            for curve in (degeneracy.degeneracy_curve, degeneracy.symmetric_curve):
                for r in curve(fp64.to(device), eq_batch, tspec, group=group):
                    x_label = "gap" if "gap" in r else "config"
                    x_val = r.get("gap", r.get("config"))
                    for stat in ("rel_mean", "rel_max", "nonfinite"):
                        add(f"degeneracy.{x_label}.{stat}", r[stat], stage=stage, dtype="fp64", group=group,
                            x=x_val if x_label == "gap" else None, x_label=str(x_val),
                            batch_size=int(eq_batch.num_graphs))

    measure_equivariance("init")
    hist = train(model, method, task, train_data, cfg, spec.seed, device)
    for k, v in hist.items():
        add(f"train.{k}", v, batch_size=cfg.batch_size)
    for k, v in evaluate(model, method, task, test_data, cfg.eval_batch_size, device).items():
        add(f"test.{k}", v, batch_size=cfg.eval_batch_size, n_graphs=len(test_data))
    measure_equivariance("trained")
    if ecfg.throughput:
        tp_data = (test_data * (ecfg.throughput_batch // len(test_data) + 1))[:ecfg.throughput_batch]
        tp_batch = Batch.from_data_list(tp_data)
        for mode in ecfg.throughput_modes:
            res = measure_throughput(model, tp_batch, mode=mode, device=device, repeats=ecfg.throughput_repeats,
                                     min_sample_s=ecfg.throughput_min_sample_s, flops=ecfg.flops,
                                     compile=ecfg.compile, loss_fn=task.loss,
                                     threads=ecfg.throughput_threads or None)
            ctx = {k: res[k] for k in ("mode", "dtype", "batch_nodes", "batch_edges", "repeats", "threads",
                                       "timer", "compiled", "mem_method", "calls_per_sample")}
            ctx["batch_size"] = res["batch_graphs"]
            for stat in ("graphs_per_s", "nodes_per_s", "time_median_s", "time_iqr_s", "peak_mem_bytes",
                         "flops", "gflops_per_s", "compile_time_s"):
                if res[stat] is not None:
                    add(f"throughput.{mode}.{stat}", res[stat], **ctx)
    finished = _dt.datetime.now(_dt.timezone.utc).isoformat()
    for r in rows:
        r["finished_at"] = finished
    return rows


# ---------------------------------------------------------------------------------------------
# running many specs

def _worker(spec_dict: dict[str, Any], out_path: str, log_path: str, plugins: Sequence[str]) -> None:
    """Entry point of an isolated spec process: output goes to ``log_path``, rows to ``out_path``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for p in plugins:
        load_plugin(p)
    rows = run_one(RunSpec.from_dict(spec_dict))
    write_json_atomic(Path(out_path), rows)


def _log_tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " / ".join(lines[-n:])


def run_isolated(spec: RunSpec, run_dir: Path, timeout: float | None, plugins: Sequence[str]) -> list[dict[str, Any]]:
    """``run_one`` in a fresh spawned process; a crash, kill or timeout becomes a failed row."""
    work = run_dir / "work"
    work.mkdir(exist_ok=True)
    out, log = work / f"{spec.hash}.json", work / f"{spec.hash}.log"
    out.unlink(missing_ok=True)
    proc = mp.get_context("spawn").Process(target=_worker, args=(spec.to_dict(), str(out), str(log), list(plugins)))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return status_rows(spec, "failed", f"timeout: exceeded {timeout:g} s")
    if proc.exitcode != 0 or not out.exists():
        return status_rows(spec, "failed", f"worker exited with code {proc.exitcode}: {_log_tail(log)}")
    rows = json.loads(out.read_text())
    out.unlink()
    return rows


def resolve_specs(suite_or_runspecs: str | os.PathLike | Sequence[RunSpec], tasks: list[str] | None = None,
                  methods: list[str] | None = None, seeds: list[int] | None = None,
                  device: str | None = None) -> tuple[str, list[RunSpec], dict[str, Any]]:
    """(suite name, specs, suite document) from a suite name, a suite file path or a list of
    ``RunSpec`` (document ``{}``)."""
    from .suites import expand_suite, read_suite
    if isinstance(suite_or_runspecs, (str, os.PathLike)):
        doc = read_suite(suite_or_runspecs)
        return doc["name"], expand_suite(doc, tasks, methods, seeds, device), doc
    specs = list(suite_or_runspecs)
    if not specs or not all(isinstance(s, RunSpec) for s in specs):
        raise UserError("run() takes a suite name, a suite file or a non-empty list of RunSpec")
    return "custom", specs, {}


def _progress(iterable: Iterable, total: int, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc="equibench", unit="run", file=sys.stderr)


def run(suite_or_runspecs: str | os.PathLike | Sequence[RunSpec], results_dir: str | os.PathLike = "results",
        executor: str = "local", *, run_name: str | None = None, resume: bool = False,
        isolate: bool = True, timeout: float | None = None, plugins: Sequence[str] = (),
        tasks: list[str] | None = None, methods: list[str] | None = None, seeds: list[int] | None = None,
        device: str | None = None, progress: bool = True, executor_options: dict[str, Any] | None = None,
        extras: bool | None = None):
    """Run every spec not already finished in ``results_dir/<run_name>``; returns the run's rows
    as a DataFrame (``load_results``). ``executor`` is "local" or "submitit". The suite's
    ``scaling`` / ``tp_bench`` sections (``extras.py``) run afterwards when ``extras`` is True,
    or when it is None and neither ``tasks`` nor ``methods`` narrows the suite."""
    for p in plugins:
        load_plugin(p)
    suite_name, specs, doc = resolve_specs(suite_or_runspecs, tasks, methods, seeds, device)
    for s in specs:
        validate_spec(s)
    if executor not in ("local", "submitit"):
        raise UserError(f"unknown executor {executor!r} (known: local, submitit)")
    root = Path(results_dir)
    if run_name is None:
        previous = sorted(root.glob(f"{suite_name}-*")) if resume and root.exists() else []
        run_name = previous[-1].name if previous else \
            f"{suite_name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = root / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "env.json").exists():
        write_json_atomic(run_dir / "env.json", environment())
    write_json_atomic(run_dir / "specs.json", {"suite": suite_name, "specs": [s.to_dict() for s in specs]})
    done = completed_specs(run_dir)
    pending = [s for s in dict.fromkeys(specs) if s.hash not in done]
    if executor == "submitit":
        from .scaleout import run_submitit
        run_submitit(pending, run_dir, list(plugins), executor_options or {}, timeout)
    else:
        bar = _progress(pending, len(pending), progress)
        for spec in bar:
            if progress and hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(spec.label)
            t0 = time.perf_counter()
            rows = run_isolated(spec, run_dir, timeout, plugins) if isolate else run_one(spec)
            for r in rows:
                r["run_id"] = run_name
                r["wall_s"] = time.perf_counter() - t0
            append_block(run_dir, rows)
    if extras or (extras is None and tasks is None and methods is None):
        from .extras import run_extras
        run_extras(doc, root, run_name, device or doc.get("device", "cpu"),
                   progress=functools.partial(print, flush=True) if progress else None)
    write_parquet(run_dir)
    return load_results(run_dir)
