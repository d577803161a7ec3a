"""The metric catalogue: every metric a real run emits is declared, directions, builders, the
unknown-name error, plugin declarations, and reports that read it (undeclared names still render)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pandas as pd
import pytest
import yaml

import equibench as eb
from equibench.core.errors import UserError
from equibench.metrics import catalogue as cat

SUITE = {
    "name": "catalogue", "seeds": [0],
    "train": {"steps": 2, "batch_size": 8, "eval_batch_size": 16, "warmup_steps": 0},
    "evaluate": {"equivariance_samples": 1, "equivariance_graphs": 4, "throughput_batch": 4, "throughput_repeats": 1,
                 "throughput_min_sample_s": 0.001, "degeneracy": True},
    "tasks": {"nbody": {"train_size": 16, "val_size": 8, "test_size": 8}},
    "methods": {"baseline": {"width": 8, "depth": 1}, "canonicalization": {"width": 8, "depth": 1}},
    "scaling": {"methods": ["baseline"], "nodes": [8, 16], "repeats": 1, "warmup": 0, "min_sample_s": 0.001,
                "max_warmup_samples": 0, "method_options": {"baseline": {"width": 8, "depth": 1}}},
    "tp_bench": {"lmax": [1], "impls": ["e3nn", "gaunt"], "channel_modes": ["uvu"], "channels": 2, "batch": 4,
                 "repeats": 1, "warmup": 0, "min_sample_s": 0.001, "max_warmup_samples": 0},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny real run: n-body (degeneracy, Lie derivative, throughput with FLOPs, a
    canonicaliser's extra metrics) plus the suite's scaling and tensor-product sections."""
    root = tmp_path_factory.mktemp("catalogue")
    suite = root / "suite.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    df = eb.run(str(suite), results_dir=root / "res", run_name="c", isolate=False, progress=False)
    return root / "res" / "c", df


def test_every_emitted_metric_is_declared(run):
    _, df = run
    names = set(df["metric"])
    assert {n for n in names if cat.find_metric(n) is None} == set()
    families = {cat.get_metric(n).family for n in names}
    assert {"params", "equivariance", "lie_derivative", "degeneracy", "train", "test", "throughput", "scaling",
            "tp_bench"} <= families
    assert {"test.identity_metric", "test.prior_mse", "test.mean_angle_deg"} <= names  # method extras


def test_every_task_metric_and_bench_name_is_declared():
    for task in eb.list_tasks():
        for m in eb.get_task(task).spec.metrics:
            assert cat.find_metric(cat.test_metric(m)), (task, m)
    assert all(cat.get_metric(cat.scaling_metric(m)).family == "scaling" for m in cat.SCALING_STATS)
    assert all(cat.get_metric(cat.tp_bench_metric(m)).family == "tp_bench" for m in cat.TP_BENCH_STATS)
    for stage in cat.STAGES:
        for dtype in cat.DTYPES:
            for stat in cat.EQUIVARIANCE_STATS:
                assert cat.get_metric(cat.equivariance_metric(stage, dtype, stat)).stage == stage
    for mode in cat.THROUGHPUT_MODES:
        for stat in cat.THROUGHPUT_STATS:
            assert cat.get_metric(cat.throughput_metric(mode, stat)).mode == mode
    for name in ("final_loss", "wall_s", "steps", "steps_per_s"):
        assert cat.get_metric(cat.train_metric(name)).family == "train"
    assert cat.find_metric(cat.test_metric("prior_ce"))  # the image canonicaliser's extra metric


def test_builders_make_the_names_results_use():
    assert cat.equivariance_metric("trained", "fp64", "rel_mean") == "equivariance.trained.fp64.rel_mean"
    assert cat.lie_metric("init", "rel_max") == "lie_derivative.init.fp64.rel_max"
    assert cat.degeneracy_metric("config", "nonfinite") == "degeneracy.config.nonfinite"
    assert cat.throughput_metric("train", "peak_mem_bytes") == "throughput.train.peak_mem_bytes"
    assert cat.test_metric("mse") == "test.mse" and cat.train_metric("steps") == "train.steps"
    assert cat.scaling_metric("time_s") == "scaling.time_s" and cat.tp_bench_metric("weights") == "tp_bench.weights"
    with pytest.raises(UserError, match="did you mean 'fp64'"):
        cat.equivariance_metric("trained", "fp46", "rel_mean")


def test_directions_and_facets():
    d = {n: cat.get_metric(n).direction for n in (
        "test.mse", "test.mae", "test.force_mae", "test.angle_deg", "test.accuracy", "test.group_accuracy",
        "throughput.inference.graphs_per_s", "throughput.train.peak_mem_bytes", "equivariance.trained.fp32.rel_max",
        "params", "train.wall_s", "throughput.inference.flops", "scaling.time_s", "tp_bench.items_per_s")}
    assert d == {"test.mse": "lower", "test.mae": "lower", "test.force_mae": "lower", "test.angle_deg": "lower",
                 "test.accuracy": "higher", "test.group_accuracy": "higher",
                 "throughput.inference.graphs_per_s": "higher", "throughput.train.peak_mem_bytes": "lower",
                 "equivariance.trained.fp32.rel_max": "lower", "params": None, "train.wall_s": None,
                 "throughput.inference.flops": None, "scaling.time_s": "lower", "tp_bench.items_per_s": "higher"}
    spec = cat.get_metric("equivariance.init.fp64.rel_max")
    assert (spec.family, spec.stage, spec.dtype, spec.stat, spec.aggregate, spec.floor) == (
        "equivariance", "init", "fp64", "rel_max", "max", 1e-12)
    assert cat.get_metric("test.accuracy").higher_is_better and not cat.get_metric("test.accuracy").log_scale
    watched = {s.name for s in cat.list_metrics(watch=True)}
    assert "equivariance.trained.fp32.rel_mean" in watched and "equivariance.init.fp32.rel_mean" not in watched
    assert all(s.direction for s in cat.list_metrics(watch=True))
    assert {s.mode for s in cat.list_metrics(family="throughput")} == set(cat.THROUGHPUT_MODES)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(KeyError) as err:
        cat.get_metric("test.msee")
    assert isinstance(err.value, UserError)
    assert "unknown metric 'test.msee'" in str(err.value) and "did you mean 'test.mse'" in str(err.value)
    assert cat.find_metric("test.msee") is None
    with pytest.raises(ValueError, match="unknown MetricSpec field"):
        cat.list_metrics(colour="red")


def test_register_metric(monkeypatch):
    monkeypatch.setattr(cat, "_CATALOGUE", dict(cat._CATALOGUE))
    spec = cat.MetricSpec(cat.test_metric("iou"), "IoU", "test", direction="higher", stat="iou", watch=True)
    assert cat.register_metric(spec) is spec and cat.get_metric("test.iou") is spec
    cat.register_metric(cat.MetricSpec(cat.test_metric("iou"), "IoU", "test", direction="higher", stat="iou",
                                       watch=True))  # the same declaration again (a plugin imported twice)
    with pytest.raises(ValueError, match="already declared"):
        cat.register_metric(cat.MetricSpec("test.iou", "IoU", "test", direction="lower"))
    cat.register_metric(cat.MetricSpec("test.iou", "IoU", "test", direction="lower"), replace=True)
    assert cat.get_metric("test.iou").direction == "lower"
    with pytest.raises(ValueError, match="needs a direction"):
        cat.MetricSpec("test.x", "x", "test", watch=True)
    with pytest.raises(ValueError, match="direction"):
        cat.MetricSpec("test.x", "x", "test", direction="up")  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.direction = "lower"  # type: ignore[misc]  # frozen


def test_catalogue_imports_nothing_above_metrics():
    code = ("import sys, equibench.metrics.catalogue; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'pandas') or "
            "m.startswith(('equibench.methods', 'equibench.datasets', 'equibench.benches', 'equibench.results', "
            "'equibench.plan', 'equibench.engine', 'equibench.report', 'equibench.symmetry'))]; print(bad); "
            "assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_report_reads_the_catalogue(run, tmp_path):
    """Headers and arrows come from the catalogue; a metric it does not declare still renders
    under its raw name; the Pareto front follows each axis's direction."""
    from equibench.report.common.plots import pareto_front
    from equibench.results.store import append_block, read_records
    run_dir, _ = run
    row = next(r for r in read_records(run_dir) if r["method"] == "baseline" and r["metric"] == "test.mse")
    append_block(run_dir, [{k: v for k, v in row.items() if k not in ("block", "block_size")}
                           | {"metric": "test.undeclared_score", "value": 0.5, "spec_hash": "x"}])
    text = eb.write_report(run_dir, tmp_path / "rep").read_text()
    assert "mse ↓" in text and "inference throughput [graphs/s] ↑" in text and "test.undeclared_score" in text
    assert "Scaling: cost vs size" in text and "Tensor-product microbenchmarks" in text
    md = (tmp_path / "rep" / "README.md").read_text()
    assert "| method | parameters | mse ↓ |" in md
    x, y = [1.0, 2.0, 3.0], [0.5, 0.9, 0.7]
    assert list(pareto_front(x, y, x_higher=True, y_higher=False)) == [0, 2]
    assert list(pareto_front(x, y, x_higher=True, y_higher=True)) == [1, 2]


def test_status_rows_are_listed_first_with_their_error(tmp_path):
    from equibench.report.common.render import Page, TableView, render
    from equibench.report.common.tables import status_table
    df = pd.DataFrame([{"task": "nbody", "method": "m", "seed": 0, "status": "failed", "error": "boom | <b>x</b>",
                        "metric": "status", "value": None}])
    page = Page(title="t", status=TableView.from_frame(status_table(df)))
    html, md = render("page.html.j2", page), render("page.md.j2", page)
    assert "Runs that did not produce results" in html and "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x" not in html
    assert "boom \\| &lt;b>x&lt;/b>" in md  # a pipe inside a cell does not split the Markdown table


def test_a_probe_not_measured_in_a_finished_point_is_listed_apart_from_failed_points():
    """A point that finished ok but has a ``not_applicable`` probe row (TF32 on a CPU run) is not a
    run without results: it leaves the status table and is listed, with its reason, once per
    (task, measurement, reason) in the table of measurements not taken; a failed point stays."""
    from equibench.report.common.render import Page, TableView, render
    from equibench.report.common.tables import status_table, unmeasured_table
    why = "TF32 is a CUDA matmul mode; this point ran on cpu"
    rows = [{"task": "nbody", "method": m, "seed": s, "spec_hash": f"{m}{s}", "bench": "task", "status": "ok",
             "metric": "test.mse", "value": 0.1, "error": None} for m in ("a", "b") for s in (0, 1)]
    rows += [{**r, "metric": "tf32_equivariance.trained.fp32.tf32_on.rel_mean", "status": "not_applicable",
              "value": None, "error": why} for r in rows]
    rows.append({"task": "nbody", "method": "c", "seed": 0, "spec_hash": "c0", "bench": "task",
                 "status": "failed", "metric": "status", "value": None, "error": "boom"})
    df = pd.DataFrame(rows)
    status = status_table(df)
    assert list(status["method"]) == ["c"] and list(status["status"]) == ["failed"]
    un = unmeasured_table(df)
    assert len(un) == 1
    assert un.iloc[0].to_dict() == {"task": "nbody", "measurement": "tf32_equivariance", "methods": "a, b",
                                    "seeds": "0, 1", "status": "not_applicable", "reason": why}
    html = render("page.html.j2", Page(title="t", unmeasured=TableView.from_frame(un)))
    assert "Measurements not taken in runs that finished" in html and why in html
    assert unmeasured_table(df[df["status"] != "not_applicable"]).empty
