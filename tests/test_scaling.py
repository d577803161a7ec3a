"""Scaling sweeps: synthetic graphs, exponent fits, sweep bookkeeping, tidy rows, resume and
the report section."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import equibench as eb
from equibench.benches.scaling import (
    ScaleConfig,
    ScalingBench,
    exponents,
    fit_exponent,
    size_option,
    sweep_points,
    synthetic_batch,
)
from equibench.core.errors import UserError
from equibench.engine.engine import run_benches
from equibench.report.sections import scaling_section
from equibench.results.store import read_records


@pytest.fixture(scope="module")
def spec():
    return eb.get_task("nbody").spec


def test_synthetic_batch_has_every_field_and_knn_edges(spec):
    b = synthetic_batch(spec, nodes=40, graphs=3, k=5, seed=1)
    assert b.num_graphs == 3 and b.num_nodes == 120 and b.edge_index.shape == (2, 120 * 5)
    assert b.pos.shape == (120, 3) and b.vel.shape == (120, 3) and b.charge.shape == (120, 1)
    assert b.edge_attr.shape == (600, 1) and b.y.shape == (120, 3)
    src, dst = b.edge_index
    assert (src != dst).all() and (torch.bincount(dst, minlength=120) == 5).all()
    assert (b.batch[src] == b.batch[dst]).all()  # no edges between graphs
    # the sources of node 0 are its 5 nearest neighbours within its graph
    d = (b.pos[:40] - b.pos[0]).norm(dim=1)
    d[0] = float("inf")
    assert set(src[dst == 0].tolist()) == set(torch.topk(d, 5, largest=False).indices.tolist())
    assert torch.equal(synthetic_batch(spec, 40, 3, 5, seed=1).pos, b.pos)  # deterministic
    with pytest.raises(UserError):
        synthetic_batch(spec, nodes=1)


def test_fit_exponent_recovers_power_laws():
    x = 2.0 ** np.arange(4, 15)
    assert fit_exponent(x, 3e-6 * x ** 1.7)["slope"] == pytest.approx(1.7, abs=1e-9)
    # a fixed overhead flattens the small sizes; the fit over the largest half sees the true slope
    y = 1e-5 + 1e-9 * x ** 2
    tail, whole = fit_exponent(x, y, tail=0.5), fit_exponent(x, y, tail=1.0)
    assert abs(tail["slope"] - 2) < 0.05 < abs(whole["slope"] - 2)
    assert tail["x_max"] == x[-1] and tail["n"] == 6
    noisy = 5e-4 * x * np.exp(np.random.default_rng(0).normal(0, 0.03, len(x)))
    assert fit_exponent(noisy, noisy * 0 + noisy)["slope"] == pytest.approx(1.0, abs=0.1)
    assert np.isnan(fit_exponent([1.0], [2.0])["slope"])


def test_size_options_and_sweep_points():
    assert size_option("baseline", "width") == "width" and size_option("e3nn", "width") == "mul"
    assert size_option("e3nn", "lmax") == "lmax" and size_option("baseline", "lmax") is None
    cfg = ScaleConfig(methods=("baseline", "e3nn"), axes=("nodes", "lmax"), nodes=(16, 32), lmax=(0, 1))
    pts = sweep_points(cfg)
    assert len(pts) == 8 and len({p["spec_hash"] for p in pts}) == 8
    assert [p["applicable"] for p in pts if p["method"] == "baseline" and p["axis"] == "lmax"] == [False] * 2
    e3 = [p for p in pts if p["method"] == "e3nn" and p["axis"] == "lmax"]
    assert [p["method_options"] for p in e3] == [{"lmax": 0}, {"lmax": 1}]
    assert [p["spec_hash"] for p in sweep_points(cfg)] == [p["spec_hash"] for p in pts]  # stable
    assert sweep_points(ScaleConfig(methods=("baseline",), nodes=(16,), repeats=9))[0]["spec_hash"] != \
        [p for p in pts if p["method"] == "baseline"][0]["spec_hash"]
    with pytest.raises(UserError):
        ScaleConfig(axes=("depth",))


def test_run_scaling_writes_tidy_rows_resumes_and_reports(tmp_path):
    cfg = ScaleConfig(methods=("baseline",), axes=("nodes", "lmax"), nodes=(8, 16, 32, 64), lmax=(1,),
                      repeats=2, warmup=0, min_sample_s=0.001, max_warmup_samples=0, flops=True,
                      method_options={"baseline": {"width": 8, "depth": 1}})
    run_dir = run_benches([ScalingBench(cfg)], tmp_path / "sc", isolate=False, progress=False)
    points = json.loads((run_dir / "points.json").read_text())["points"]
    assert (run_dir / "env.json").exists() and {p["config"]["cfg"]["k"] for p in points} == {8}
    df = eb.load_results(run_dir)
    ok = df[df["status"] == "ok"]
    assert set(ok["bench"]) == {"scaling"} and set(ok["scaling_task"]) == {"nbody"} and set(ok["x_label"]) == {"nodes"}
    t = ok[ok["metric"] == "scaling.time_s"].sort_values("x")
    assert t["x"].tolist() == [8, 16, 32, 64] and (t["value"] > 0).all()
    assert (t["batch_nodes"] == t["x"]).all()
    assert t["batch_edges"].tolist() == [8 * 7, 16 * 8, 32 * 8, 64 * 8]  # k = 8, at most n - 1
    for col in ("device_name", "dtype", "batch_size", "repeats", "threads", "spec_hash", "timer"):
        assert t[col].notna().all()
    gps = ok[ok["metric"] == "scaling.graphs_per_s"].set_index("x")["value"]
    assert np.allclose(gps.loc[t["x"]].to_numpy(), 1 / t["value"].to_numpy())  # one graph per batch
    assert (df[df["x_label"] == "lmax"]["status"] == "not_applicable").all()
    n = len(read_records(run_dir))
    run_benches([ScalingBench(cfg)], run_dir, isolate=False, progress=False)  # resume: every point is done
    assert len(read_records(run_dir)) == n
    ex = exponents(df)
    assert list(ex["method"]) == ["baseline"] and np.isfinite(ex["slope"].iloc[0])
    sec = scaling_section(df, tmp_path / "report")
    assert sec["task"].startswith("Scaling") and "nodes: time exponent" in sec["table"].columns
    assert all((tmp_path / "report" / name).exists() for name, _ in sec["figures"])
    assert "k = 8" in sec["context"] and scaling_section(df[df["bench"] == "nope"], tmp_path) is None


def test_slow_points_stop_a_sweep(tmp_path):
    cfg = ScaleConfig(methods=("baseline",), nodes=(8, 16, 32), repeats=1, warmup=0, min_sample_s=0.0,
                      max_warmup_samples=0, flops=False, max_call_s=1e-12,
                      method_options={"baseline": {"width": 8, "depth": 1}})
    # one worker process measures the sweep in order and skips what its own history predicts too slow
    df = eb.load_results(run_benches([ScalingBench(cfg)], tmp_path / "slow", progress=False))
    status = df.drop_duplicates("x").set_index("x")["status"]
    assert status[8] == "ok" and status[16] == "skipped" and status[32] == "skipped"
    assert "would take" in df[df["x"] == 16]["error"].iloc[0]
