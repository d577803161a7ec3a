"""Nightly history, regression alarms and run comparison."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from equibench.cli import main
from equibench.metrics.catalogue import get_metric
from equibench.report.history import find_regressions

ROOT = Path(__file__).resolve().parents[1]


def synthetic(values: dict[str, list[float]], metric: str, spread: float = 0.0) -> pd.DataFrame:
    rows = []
    for method, vals in values.items():
        for night, v in enumerate(vals):
            rows.append({"run_id": f"n{night}", "task": "t", "method": method, "metric": metric, "value": v,
                         "finished_at": f"2026-01-0{night + 1}", "rel_spread": spread})
    return pd.DataFrame(rows)


def test_throughput_drop_is_flagged_noise_is_not():
    h = synthetic({"a": [100, 104, 60], "b": [100, 96, 93]}, "throughput.inference.graphs_per_s", spread=0.02)
    regs = find_regressions(h, "n2", threshold=0.1)
    assert [(r.method, r.metric) for r in regs] == [("a", "throughput.inference.graphs_per_s")]
    assert regs[0].change == pytest.approx((102 - 60) / 102)  # against the median of earlier nights


def test_spread_and_direction():
    # a 20% drop inside a 30% measured spread is not a regression
    assert not find_regressions(synthetic({"a": [100, 100, 80]}, "throughput.train.graphs_per_s", 0.3), "n2")
    # error going up is a regression; accuracy going up is not
    assert find_regressions(synthetic({"a": [0.1, 0.1, 0.2]}, "test.mse"), "n2")
    assert not find_regressions(synthetic({"a": [0.8, 0.8, 0.9]}, "test.accuracy"), "n2")
    assert find_regressions(synthetic({"a": [0.9, 0.9, 0.5]}, "test.accuracy"), "n2")
    assert get_metric("test.group_accuracy").direction == "higher" and get_metric("test.mae").direction == "lower"


def test_metrics_without_a_direction_are_never_flagged():
    # a canonicaliser diagnostic (context only in the catalogue) and a name the catalogue does not declare
    assert get_metric("test.identity_metric").direction is None
    assert not find_regressions(synthetic({"a": [0.1, 0.1, 0.9]}, "test.identity_metric"), "n2")
    assert not find_regressions(synthetic({"a": [0.1, 0.1, 0.9]}, "test.not_declared"), "n2")
    assert not find_regressions(synthetic({"a": [1.0, 1.0, 90.0]}, "train.wall_s"), "n2")


def test_machine_precision_equivariance_is_never_flagged():
    h = synthetic({"e3nn": [1e-16, 1e-16, 9e-16]}, "equivariance.trained.fp64.rel_mean")
    assert not find_regressions(h, "n2")
    h = synthetic({"aug": [1e-3, 1e-3, 5e-3]}, "equivariance.trained.fp64.rel_mean")
    assert find_regressions(h, "n2")


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """Three nightly runs of a tiny suite; the third has the 'slowable' method slowed 50 ms/forward."""
    root = tmp_path_factory.mktemp("nightly")
    suite = root / "tiny.yaml"
    suite.write_text(json.dumps({
        "name": "tiny", "tasks": {"nbody": {"train_size": 32, "test_size": 16}},
        "train": {"steps": 3, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 16},
        "evaluate": {"equivariance_samples": 1, "equivariance_graphs": 4, "throughput_batch": 8,
                     "throughput_repeats": 7, "throughput_min_sample_s": 0.05,
                     "throughput_threads": 1, "lie_derivative": False,
                     "throughput_modes": ["inference"], "flops": False},
        "methods": {"baseline": {"width": 8, "depth": 1}, "slowable": {"width": 8, "depth": 1}}}))
    plugin = str(ROOT / "tests" / "plugins" / "slowable.py")
    common = [str(suite), "--results-dir", str(root / "res"), "--reports-dir", str(root / "rep"), "--no-isolate",
              "--quiet", "--plugin", plugin, "--threshold", "0.9"]
    # 0.9 = more than 10x slower: the 50 ms sleep makes 'slowable' ~200x slower, while this host's own
    # speed swings 2x between seconds (a 0.5 threshold flagged the untouched baseline once in CI)
    codes = [main(["nightly", *common, "--name", f"night{i}"]) for i in range(2)]
    import os
    os.environ["EQUIBENCH_TEST_SLEEP_MS"] = "50"
    try:
        codes.append(main(["nightly", *common, "--name", "night2"]))
    finally:
        del os.environ["EQUIBENCH_TEST_SLEEP_MS"]
    return root, codes


@pytest.mark.slow  # three nightly runs (~50 s); .ci/run's slow step
def test_nightly_flags_exactly_the_slowed_method(nights, capsys):
    root, codes = nights
    assert codes == [0, 0, 1]
    history = pd.read_parquet(root / "res" / "history.parquet")
    assert set(history["run_id"]) == {"night0", "night1", "night2"}
    from equibench.report.history import find_regressions
    regs = find_regressions(history, "night2", threshold=0.9)
    assert {(r.method, r.metric) for r in regs} == {("slowable", "throughput.inference.graphs_per_s")}
    html = (root / "rep" / "night2" / "index.html").read_text()
    assert html.index("Regressions (1)") < html.index("Task: nbody")  # listed first
    assert "slowable" in html.split("Task: nbody")[0]
    assert list((root / "rep" / "night2").glob("nbody_trend_*.png"))


@pytest.mark.slow  # three nightly runs (~50 s); .ci/run's slow step
def test_compare_two_runs(nights, capsys):
    root, _ = nights
    out = root / "cmp"
    assert main(["compare", str(root / "res" / "night1"), str(root / "res" / "night2"), "--out", str(out)]) == 0
    text = (out / "index.html").read_text()
    assert "B/A" in text and "slowable" in text and (out / "nbody_compare.png").exists()
