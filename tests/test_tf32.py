"""TF32 and the float32 equivariance error (issue 22, item 5): the ``tf32_equivariance`` probe
writes not_applicable rows with the reason where TF32 does not exist (every CPU point), restores
the TF32 settings however the measurement ends, measures both settings on the same samples, and
declares every metric it emits. The CUDA measurement itself runs in the GPU-marked test at the end
(``scripts/gpu-check.sh``)."""
from __future__ import annotations

import math

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import EvalConfig, TaskBench, build_model, run_one
from equibench.core.spec import RunSpec
from equibench.engine.engine import run_benches
from equibench.metrics import catalogue, tf32
from equibench.metrics.catalogue import EQUIVARIANCE_STATS
from equibench.metrics.tf32 import (
    tf32_equivariance,
    tf32_metric,
    tf32_mode,
    tf32_state,
    tf32_summary_metric,
    tf32_unavailable,
)
from equibench.results.rows import RunColumns, point_record
from equibench.results.status import Status
from equibench.results.store import point_statuses

TINY = {"task": "nbody", "task_options": {"train_size": 16, "val_size": 8, "test_size": 8},
        "method_options": {"width": 8, "depth": 1},
        "train": {"steps": 2, "batch_size": 8, "eval_batch_size": 8, "warmup_steps": 0},
        "evaluate": {"equivariance_samples": 2, "equivariance_graphs": 4, "throughput": False,
                     "lie_derivative": False, "symmetric_inputs": False, "tf32_equivariance": True}}
CPU_REASON = "TF32 is a CUDA matmul mode; this point ran on cpu"


@pytest.fixture
def keep_tf32():
    """The process's TF32 settings, put back after the test whatever it did to them."""
    before = tf32_state()
    yield before
    tf32.set_tf32_state(before)


def switches() -> tuple[bool, bool]:
    return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)


def nbody_egnn():
    task = eb.get_task("nbody", train_size=8, val_size=4, test_size=6)
    model = build_model(eb.get_method("egnn", width=8, depth=1), task.spec, 0, torch.float32)
    return task, model, Batch.from_data_list(task.load("test"))


def test_on_the_cpu_the_probe_writes_not_applicable_rows_with_the_reason(tmp_path):
    """Through the engine: one not_applicable row per setting (no value, the reason, a tf32 column),
    and the point itself stays ok (a status that is neither failure nor ok does not make it worse)."""
    run_dir = run_benches([TaskBench([RunSpec(method="egnn", **TINY)])], tmp_path / "run", isolate=False,
                          progress=False)
    df = eb.load_results(run_dir)
    rows = df[df["metric"].str.startswith("tf32_equivariance.")]
    assert sorted(rows["metric"]) == [tf32_metric("off", "rel_mean"), tf32_metric("on", "rel_mean")]
    assert (rows["status"] == Status.NOT_APPLICABLE).all() and (rows["error"] == CPU_REASON).all()
    assert rows["value"].isna().all() and sorted(rows["tf32"]) == ["off", "on"]
    assert (rows["stage"] == "trained").all() and (rows["dtype"] == "fp32").all()
    assert list(point_statuses(run_dir).values()) == [Status.OK]
    assert (df[~df["metric"].str.startswith("tf32_equivariance.")]["status"] == Status.OK).all()
    assert "not_measured" not in rows  # the marker became the status (results.rows)


def test_the_one_writer_turns_the_marker_into_the_status():
    """``results.rows.point_record``: a row marked ``not_measured`` (a ``core.errors`` class name,
    what a probe below the results layer can spell) gets that class's status, keeps its reason,
    loses its value and the marker; the other rows and the point stay as they were."""
    run = RunColumns(run_id="r", spec_hash="h", bench="task", git_commit="c", versions={}, environment="main",
                     executor="local", wall_s=1.0)
    rows = [{"metric": "params", "value": 10.0},
            {"metric": tf32_metric("on", "rel_mean"), "value": 3.0, "error": CPU_REASON, **tf32.NOT_MEASURED},
            {"metric": tf32_metric("off", "rel_mean"), "value": None, "error": "later", "not_measured": "Skipped"}]
    record = point_record({"task": "nbody", "method": "egnn", "seed": 0}, rows, run)
    out = record.rows()
    assert [(r["status"], r["value"], r["error"]) for r in out] == [
        (Status.OK, 10.0, ""), (Status.NOT_APPLICABLE, None, CPU_REASON), (Status.SKIPPED, None, "later")]
    assert not any("not_measured" in r for r in out) and record.status == Status.OK


def test_off_by_default_and_its_keys_are_the_equivariance_probes():
    assert not any(r["metric"].startswith("tf32_") for r in run_one(RunSpec(
        method="baseline", **{**TINY, "evaluate": {**TINY["evaluate"], "tf32_equivariance": False}})))
    cfg = EvalConfig.from_dict({"tf32_equivariance": True, "equivariance_samples": 3, "equivariance_graphs": 5})
    settings = cfg.settings(tf32.TF32EquivarianceProbe)
    assert (settings.samples, settings.graphs) == (3, 5)


def test_tf32_exists_only_on_cuda_from_ampere_on(monkeypatch):
    assert tf32_unavailable(torch.device("cpu")) == CPU_REASON
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert tf32_unavailable(torch.device("cuda")) == ("TF32 needs compute capability 8.0 (Ampere) or newer; "
                                                      "Tesla V100 has 7.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert tf32_unavailable(torch.device("cuda")) is None


@pytest.mark.parametrize("fail_in", ["on", "off"])
def test_the_settings_are_restored_when_the_measurement_raises(fail_in, monkeypatch, keep_tf32):
    """Both switches are set for each half (on: both True, off: both False) and put back as they
    were, from a state that is neither default (matmul TF32 on, cuDNN TF32 off), when the
    equivariance measurement raises in either half."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = False
    before = tf32_state()
    seen: list[tuple[bool, bool]] = []

    def measured(*args, **kwargs):
        seen.append(switches())
        if len(seen) == tf32.MODES.index(fail_in) + 1:
            raise RuntimeError("the measurement broke")
        return {"rel_mean": 1e-7}

    monkeypatch.setattr(tf32, "equivariance_error", measured)
    task, model, batch = nbody_egnn()
    with pytest.raises(RuntimeError, match="the measurement broke"):
        tf32_equivariance(model, batch, task.spec, n_samples=1)
    assert seen == [(True, True), (False, False)][:tf32.MODES.index(fail_in) + 1]
    assert switches() == (True, False) and tf32_state() == before


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_tf32_mode_restores_every_setting(precision, keep_tf32):
    """The float32 matmul precision (medium allows bf16, which the matmul switch alone cannot
    express) and, on torch >= 2.9, the per-backend fp32_precision strings come back exactly."""
    torch.set_float32_matmul_precision(precision)
    before = tf32_state()
    assert before["float32_matmul_precision"] == precision
    for enabled in (True, False):
        with tf32_mode(enabled):
            assert switches() == (enabled, enabled)
        assert tf32_state() == before
    with pytest.raises(KeyError), tf32_mode(True):
        raise KeyError("anything")
    assert tf32_state() == before


def test_both_settings_measure_the_same_samples(keep_tf32):
    """On the CPU TF32 does not exist: the two halves (same graphs, same group samples) agree to the
    last bit, and so do the outputs; an exact model's float32 error is rounding."""
    task, model, batch = nbody_egnn()
    res = tf32_equivariance(model, batch, task.spec, n_samples=3, seed=1)
    assert res["on"] == res["off"] and res[tf32.RATIO] == 1.0
    assert res[tf32.OUTPUT_DEV] == 0.0 and res[tf32.RERUN_DEV] == 0.0
    assert 0 < res["off"]["rel_mean"] < 1e-5 and res["off"]["n_samples"] == 3


def test_where_tf32_exists_the_probe_emits_every_declared_metric(monkeypatch):
    """The CUDA path's rows, on the CPU (TF32 made to look available): ok rows for both settings
    (every equivariance statistic of a point output) and the three summaries, all declared."""
    monkeypatch.setattr(tf32, "tf32_unavailable", lambda device: None)
    rows = {r["metric"]: r for r in run_one(RunSpec(method="egnn", **TINY)) if r["metric"].startswith("tf32_")}
    expected = {tf32_metric(m, s) for m in tf32.MODES for s in EQUIVARIANCE_STATS}
    expected |= {tf32_summary_metric(k) for k in (tf32.RATIO, tf32.OUTPUT_DEV, tf32.RERUN_DEV)}
    assert set(rows) == expected
    assert all(r.get("status", Status.OK) == Status.OK and math.isfinite(r["value"]) for r in rows.values())
    on, off = rows[tf32_metric("on", "rel_mean")], rows[tf32_metric("off", "rel_mean")]
    assert (on["tf32"], off["tf32"], on["batch_size"], on["repeats"]) == ("on", "off", 4, 2)
    assert on["value"] == off["value"] < 1e-5 and rows[tf32_summary_metric(tf32.RATIO)]["value"] == 1.0


def test_the_catalogue_declares_the_metrics():
    specs = catalogue.list_metrics(family="tf32_equivariance")
    assert len(specs) == 2 * len(EQUIVARIANCE_STATS) + 3
    spec = catalogue.get_metric(tf32_metric("on", "rel_mean"))
    assert (spec.direction, spec.stage, spec.dtype, spec.axis, spec.role, spec.floor) == (
        "lower", "trained", "fp32", "tf32_on", "measurement", 1e-6)
    assert catalogue.get_metric(tf32_summary_metric(tf32.RATIO)).direction is None
    with pytest.raises(ValueError, match="unknown TF32 mode"):
        tf32_metric("sometimes", "rel_mean")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_both_settings_are_measured_and_restored(keep_tf32):
    task, model, batch = nbody_egnn()
    reason = tf32_unavailable(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    before = tf32_state()
    res = tf32_equivariance(model.cuda(), batch.cuda(), task.spec, n_samples=4)
    assert tf32_state() == before
    assert res["off"]["rel_mean"] < 1e-4 and math.isfinite(res["on"]["rel_mean"])
    assert math.isfinite(res[tf32.OUTPUT_DEV]) and math.isfinite(res[tf32.RERUN_DEV])
