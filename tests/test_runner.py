"""The runner, store, report and CLI: records, resume, torn writes, failure isolation, errors."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

import equibench as eb
from equibench.cli import main
from equibench.core.spec import RunSpec
from equibench.results.store import RECORDS, append_block, completed_specs, read_records

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = str(ROOT / "tests" / "plugins" / "faulty_methods.py")
TINY = dict(task="nbody", task_options={"train_size": 32, "val_size": 8, "test_size": 16},
            train={"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 16},
            evaluate={"equivariance_samples": 2, "equivariance_graphs": 4, "throughput_batch": 8,
                      "throughput_repeats": 2, "throughput_min_sample_s": 0.001, "lie_derivative": False})


def tiny(method: str, seed: int = 0, **opts) -> RunSpec:
    return RunSpec(method=method, seed=seed, method_options=opts, **TINY)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    df = eb.run("smoke", results_dir=root, run_name="smoke-test", isolate=False, progress=False,
                methods=["baseline", "e3nn"])
    return root / "smoke-test", df


def test_smoke_run_writes_tidy_records(smoke_run):
    run_dir, df = smoke_run
    assert (run_dir / RECORDS).exists() and (run_dir / "env.json").exists()
    assert (run_dir / "records.parquet").exists()
    assert set(df["method"]) == {"baseline", "e3nn"} and (df["status"] == "ok").all()
    metrics = set(df["metric"])
    for m in ("params", "test.mse", "equivariance.trained.fp64.rel_mean", "equivariance.init.fp32.rel_max",
              "lie_derivative.trained.fp64.rel_mean", "throughput.inference.graphs_per_s",
              "throughput.train.graphs_per_s", "throughput.inference.peak_mem_bytes"):
        assert m in metrics
    row = df[df["metric"] == "throughput.inference.graphs_per_s"].iloc[0]
    assert row["device_name"] and row["dtype"] == "fp32" and row["batch_size"] == 16 and row["repeats"] == 3
    assert isinstance(row["versions"], dict) and "torch" in row["versions"] and row["git_commit"]
    e3 = df[(df["method"] == "e3nn") & (df["metric"] == "equivariance.trained.fp64.rel_max")]["value"].item()
    base = df[(df["method"] == "baseline") & (df["metric"] == "equivariance.trained.fp64.rel_max")]["value"].item()
    assert e3 < 1e-10 < 1e-2 < base
    env = json.loads((run_dir / "env.json").read_text())
    assert "collect_env" in env and env["versions"]["torch"]
    pq = pd.read_parquet(run_dir / "records.parquet")
    assert len(pq) == len(df)


def test_resume_skips_finished_specs(smoke_run):
    run_dir, df = smoke_run
    lines = (run_dir / RECORDS).read_text().count("\n")
    again = eb.run("smoke", results_dir=run_dir.parent, run_name=run_dir.name, resume=True, isolate=False,
                   progress=False, methods=["baseline", "e3nn"])
    assert (run_dir / RECORDS).read_text().count("\n") == lines
    assert len(again) == len(df)


def test_report_has_tables_and_figures(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    index = eb.write_report(run_dir, tmp_path / "rep")
    text = index.read_text()
    assert "<table" in text and "Task: nbody" in text and "e3nn" in text and "baseline" in text
    for img in ("nbody_accuracy_vs_throughput.png", "nbody_equivariance.png"):
        assert (tmp_path / "rep" / img).stat().st_size > 1000 and img in text
    assert "device:" in text and "repeats" in text  # how it was measured
    assert (tmp_path / "rep" / "README.md").read_text().count("|") > 20


def test_torn_block_is_dropped_and_later_blocks_survive(tmp_path):
    rows = [{"spec_hash": "a", "task": "t", "method": "m", "seed": 0, "metric": f"x{i}", "value": i,
             "status": "ok"} for i in range(3)]
    append_block(tmp_path, rows)
    with open(tmp_path / RECORDS, "a") as f:  # a block cut off by kill -9: partial line, no newline
        f.write(json.dumps({**rows[0], "spec_hash": "b", "block": "zz", "block_size": 3})[:-7])
    assert completed_specs(tmp_path) == {"a"}
    append_block(tmp_path, [{**r, "spec_hash": "c"} for r in rows])
    recs = read_records(tmp_path)
    assert [r["spec_hash"] for r in recs] == ["a"] * 3 + ["c"] * 3
    assert completed_specs(tmp_path) == {"a", "c"}


def test_failures_are_rows_and_the_suite_goes_on(tmp_path):
    specs = [tiny("faulty_raises"), tiny("faulty_nan"), tiny("baseline", width=8, depth=1)]
    df = eb.run(specs, results_dir=tmp_path, run_name="r", isolate=False, progress=False, plugins=[PLUGIN])
    status = df.drop_duplicates("spec_hash").set_index("method")["status"]
    assert status["faulty_raises"] == "failed" and status["faulty_nan"] == "failed" and status["baseline"] == "ok"
    err = df[df["method"] == "faulty_raises"]["error"].item()
    assert "deliberate failure in build" in err
    assert "non-finite" in df[df["method"] == "faulty_nan"]["error"].item()


@pytest.mark.slow  # ~20 s of timeouts; .ci/run's slow step
def test_isolation_survives_timeouts_and_hard_exits(tmp_path):
    specs = [tiny("faulty_sleeps"), tiny("faulty_exits"), tiny("baseline", width=8, depth=1)]
    df = eb.run(specs, results_dir=tmp_path, run_name="r", isolate=True, timeout=10, progress=False,
                plugins=[PLUGIN])
    by = df.drop_duplicates("spec_hash").set_index("method")
    assert by.loc["faulty_sleeps", "status"] == eb.Status.TIMEOUT  # a timeout row since the results contract
    assert by.loc["faulty_sleeps", "error"].startswith("timeout: exceeded 10 s")
    assert by.loc["faulty_exits", "status"] == eb.Status.FAILED and "code 9" in by.loc["faulty_exits", "error"]
    assert by.loc["faulty_exits", "exit_code"] == 9 and by.loc["faulty_exits", "peak_rss_bytes"] > 0
    assert by.loc["baseline", "status"] == "ok"
    assert len(set(df["wall_s"])) == 3 and set(df["executor"]) == {"local"}


def test_not_applicable_is_not_a_failure(tmp_path):
    class Img(eb.Method):
        domains = ("image2d",)
    from equibench.core.registry import _METHODS
    _METHODS["only_images"] = Img
    Img.name = "only_images"
    try:
        df = eb.run([tiny("only_images")], results_dir=tmp_path, run_name="r", isolate=False, progress=False)
    finally:
        del _METHODS["only_images"]
    assert df["status"].tolist() == ["not_applicable"]


def test_same_seed_same_numbers(tmp_path):
    a = eb.run([tiny("augmentation", width=8, depth=1)], results_dir=tmp_path, run_name="a", isolate=False,
               progress=False)
    b = eb.run([tiny("augmentation", width=8, depth=1)], results_dir=tmp_path, run_name="b", isolate=False,
               progress=False)
    pick = lambda df: df[~df["metric"].str.startswith(("throughput", "profile", "train.wall", "train.steps_per"))]  # noqa: E731
    pd.testing.assert_series_equal(pick(a).set_index("metric")["value"], pick(b).set_index("metric")["value"])


@pytest.mark.parametrize("argv, message", [
    (["run", "smoke", "--methods", "basline"], "did you mean 'baseline'"),
    (["run", "smoke", "--tasks", "nbdy"], "did you mean 'nbody'"),
    (["run", "no_such_suite"], "unknown suite"),
    (["run", "smoke", "--seeds", "x"], "comma-separated list of int"),
    (["run", "smoke", "--plugin", "/nonexistent.py"], "plugin file not found"),
    (["report", "/nonexistent_results_dir"], "no results"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("text, message", [
    ("tasks: [nbody\nmethods: [baseline]", "malformed suite file"),
    ("tasks: [nbody]\nmethods: [baseline]\nseeds: zero", "'seeds'"),
    ("tasks: [nbody]\nmethods: [baseline]\nbogus: 1", "'bogus'"),
    ("tasks: [nbody]\nmethods: {baseline: {width: wide}}", "must be int"),
    ("tasks: [nbody]\nmethods: [baseline]\ntrain: {steps: 1.5}", "'steps'"),
    ("methods: [baseline]", "missing 'tasks'"),
])
def test_malformed_suite_files(tmp_path, text, message, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    assert main(["run", str(path), "--results-dir", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "res").exists() or not list((tmp_path / "res").rglob(RECORDS))


def test_plugin_without_methods_is_rejected(tmp_path, capsys):
    empty = tmp_path / "empty_plugin.py"
    empty.write_text("x = 1\n")
    assert main(["list", "--plugin", str(empty)]) == 2
    assert "does not register any method" in capsys.readouterr().err


def test_third_party_plugin_runs_in_the_suite_and_is_exact(tmp_path):
    """examples/egnn_plugin.py, a separate file, runs through the suite unchanged and is exact."""
    plugin = str(ROOT / "examples" / "egnn_plugin.py")
    df = eb.run([tiny("egnn_example", width=16, depth=2)], results_dir=tmp_path, run_name="p", isolate=True,
                plugins=[plugin], progress=False, timeout=300)
    assert (df["status"] == "ok").all()
    fp64 = df[df["metric"] == "equivariance.trained.fp64.rel_max"]["value"].item()
    fp32 = df[df["metric"] == "equivariance.trained.fp32.rel_max"]["value"].item()
    assert fp64 < 1e-10 and fp32 < 1e-4


def test_sample_efficiency_sweep_is_plotted_not_tabulated(tmp_path):
    suite = tmp_path / "sweep.yaml"
    suite.write_text(json.dumps({
        "name": "sweep", "tasks": {"nbody": {**TINY["task_options"], "train_size": 16}}, "train": TINY["train"],
        "evaluate": {**TINY["evaluate"], "throughput": False}, "seeds": [0, 1],
        "methods": {"baseline": {"width": 8, "depth": 1}},
        "sweeps": [{"task": "nbody", "option": "train_size", "values": [8, 16, 32]}]}))
    df = eb.run(str(suite), results_dir=tmp_path / "res", run_name="s", isolate=False, progress=False)
    assert df["spec_hash"].nunique() == 6  # 3 sizes x 2 seeds; the base size is not run twice
    index = eb.write_report(tmp_path / "res" / "s", tmp_path / "rep")
    text = index.read_text()
    for png in ("efficiency_nbody_data.png", "efficiency_nbody_compute.png"):  # report/efficiency.py's sections
        assert (tmp_path / "rep" / png).exists() and png in text
    table = text.split('<table class="results">')[1].split("</table>")[0]
    assert table.split("<tbody>")[1].count("<tr") == 1  # one row: only the base configuration is tabulated
    verdict = text.split('<table class="verdict">')[1].split("</table>")[0]
    # the method, the trivial predictor and the task's floor (constant-velocity extrapolation)
    assert verdict.split("<tbody>")[1].count("<tr") == 3 and "floor: constant_velocity" in verdict


def test_float64_rebuild_keeps_constant_buffers_but_loads_trained_ones():
    import torch
    from torch import nn
    from equibench.symmetry.precision import default_dtype
    from equibench.benches.taskrun import load_state_keep_constants

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.bn = nn.BatchNorm1d(2)
            self.register_buffer("const", torch.tensor([1 / 3, 2 ** 0.5]))  # a build-time constant

    m32 = M()
    m32.bn.running_mean += 0.25  # "trained" buffer
    with default_dtype(torch.float64):
        m64 = M().double()
    load_state_keep_constants(m64, m32.state_dict())
    assert m64.const[0].item() == 1 / 3  # full precision kept (fp32 would give 0.3333333432674408)
    assert torch.equal(m64.bn.running_mean, m32.bn.running_mean.double())
    assert torch.equal(m64.lin.weight, m32.lin.weight.double())


def test_image_methods_through_the_runner(tmp_path):
    """digits (sklearn 8x8, C4): exact image methods are invariant below 1e-5 in float32 after
    training, the CNN baseline is not, and the report has a digits section."""
    task_options = {"source": "sklearn", "group": "C4", "train_size": 64, "test_size": 16}
    train = {"steps": 5, "batch_size": 16, "warmup_steps": 1, "eval_batch_size": 16}
    evaluate = {"equivariance_samples": 4, "equivariance_graphs": 8, "throughput": False, "lie_derivative": False}
    specs = [RunSpec(task="digits", method=m, task_options=task_options, train=train, evaluate=evaluate)
             for m in ("baseline", "frame_averaging", "canonicalization", "escnn", "pca_canonicalization")]
    df = eb.run(specs, results_dir=tmp_path, run_name="img", isolate=False, progress=False)
    status = df.drop_duplicates("spec_hash").set_index("method")["status"]
    assert status["pca_canonicalization"] == "not_applicable"
    err = df[df["metric"] == "equivariance.trained.fp32.rel_max"].set_index("method")["value"]
    for m in ("frame_averaging", "canonicalization", "escnn"):
        assert err[m] < 1e-5, m
    assert err["baseline"] > 1e-4
    assert "test.group_accuracy" in set(df["metric"])
    assert "Task: digits" in eb.write_report(tmp_path / "img", tmp_path / "rep").read_text()


def test_pareto_plot_uses_the_metric_every_method_reports(smoke_run, tmp_path):
    """A metric only one method reports (canonicalisation's identity_metric) sorts before 'mse'
    but must not become the accuracy axis."""
    import shutil

    from equibench.results.store import append_block, read_records
    run_dir, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    row = next(r for r in read_records(copy) if r["method"] == "baseline" and r["metric"] == "test.mse")
    append_block(copy, [{k: v for k, v in row.items() if k not in ("block", "block_size")}
                        | {"metric": "test.aaa_only_baseline", "value": 0.5}])
    text = eb.write_report(copy, tmp_path / "rep").read_text()
    assert "Test mse (mean over seeds)" in text and "Test aaa_only_baseline (mean" not in text


def test_seed_independent_measurements_are_taken_once_per_configuration(tmp_path):
    """measure_once (the default): the planner names the first seed in every seed's spec, and only
    that seed's point carries throughput rows; ``measure_once: false`` measures in every seed."""
    from equibench.benches.taskrun import run_one
    from equibench.plan.suites import expand_suite, read_suite

    doc = {"name": "once", "seeds": [3, 1], "train": TINY["train"], "evaluate": TINY["evaluate"],
           "tasks": {"nbody": TINY["task_options"]}, "methods": {"baseline": {}}}
    path = tmp_path / "once.yaml"
    path.write_text(json.dumps(doc))
    specs = expand_suite(read_suite(str(path)))
    assert [s.seed for s in specs] == [3, 1] and {s.evaluate["architecture_seed"] for s in specs} == {3}
    rows = {s.seed: run_one(s) for s in specs}
    measured = {seed: any(r["metric"].startswith("throughput.") for r in rs) for seed, rs in rows.items()}
    assert measured == {3: True, 1: False}
    assert all(any(r["metric"] == "test.mse" for r in rs) for rs in rows.values())
    path.write_text(json.dumps({**doc, "evaluate": {**TINY["evaluate"], "measure_once": False}}))
    every = expand_suite(read_suite(str(path)))
    assert all(s.evaluate.get("architecture_seed") is None for s in every)


def test_an_unstable_timing_is_measured_again(monkeypatch):
    """Measured once per configuration, a disturbed (unstable) timing is retaken: the rows carry the
    stable retake, how often it was retaken, and the FLOPs, counted once."""
    from equibench.benches import taskrun
    from equibench.metrics import throughput

    real_time, real_flops = throughput.time_step, throughput.count_flops
    calls: list[bool] = []  # per timing: were the FLOPs counted before it (only the first is unstable)
    flop_counts: list[int] = []

    def flaky(*args, **kwargs):
        res = real_time(*args, **kwargs)
        calls.append(not flop_counts)
        first = len(calls) == 1
        return {**res, "unstable": first, "time_median_s": 1e6 if first else res["time_median_s"]}

    def counted(*args, **kwargs):
        flop_counts.append(real_flops(*args, **kwargs))
        return flop_counts[-1]

    monkeypatch.setattr(throughput, "time_step", flaky)
    monkeypatch.setattr(throughput, "count_flops", counted)
    spec = RunSpec(method="baseline", **{**TINY, "evaluate": {**TINY["evaluate"], "throughput_modes": ["inference"],
                                                               "profile": False}})
    rows = [r for r in taskrun.run_one(spec) if r["metric"].startswith("throughput.inference.")]
    gps = next(r for r in rows if r["metric"] == "throughput.inference.graphs_per_s")
    assert calls == [True, True] and len(flop_counts) == 1  # two timings, before the one FLOP count
    assert gps["remeasured"] == 1 and gps["value"] > 1.0 and not gps["unstable"]
    assert next(r for r in rows if r["metric"] == "throughput.inference.flops")["value"] > 0
