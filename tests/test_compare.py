"""``equibench compare`` knows its noise (the nightly alarm's rule), marks methods present in one
run only, refuses to call timings of a loaded machine; unstable timings are flagged in the row
and the report; env.json records the load average (issue 19, item 4)."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

import equibench as eb
from equibench.cli import main
from equibench.core.envinfo import load_average, load_record, loaded
from equibench.metrics import throughput
from equibench.report.common.tables import UNSTABLE_MARK, loaded_machine_lines, seed_table, task_table, unstable_timings
from equibench.report.compare import LOADED_VERDICT, compare_dirs, compare_runs
from equibench.results.store import append_block, load_results

TP = "throughput.inference.graphs_per_s"


def rows(method: str, seed: int, *, mse: float = 0.5, gps: float = 1000.0, rel_iqr: float = 0.02,
         run_id: str = "r", status: str = "ok") -> list[dict]:
    """One (task, method, seed) run's rows as the task bench writes them (the subset compare and
    the report read): a test metric, an equivariance error, and a throughput with its timing."""
    base = {"run_id": run_id, "spec_hash": f"t-{method}-{seed}", "task": "nbody", "method": method, "seed": seed,
            "status": status}
    if status != "ok":
        return [{**base, "metric": "status", "value": None}]
    median = 10.0 / gps  # 10 graphs per batch
    return [{**base, "metric": "test.mse", "value": mse},
            {**base, "metric": "equivariance.trained.fp32.rel_mean", "value": 1e-3},
            {**base, "metric": TP, "value": gps, "batch_size": 10, "repeats": 5,
             "unstable": rel_iqr > throughput.UNSTABLE_REL_IQR},
            {**base, "metric": "throughput.inference.time_median_s", "value": median},
            {**base, "metric": "throughput.inference.time_iqr_s", "value": rel_iqr * median}]


def write(tmp_path, name: str, runs: list[list[dict]], load: list[float] | None = None):
    d = tmp_path / name
    d.mkdir(parents=True)
    for r in runs:
        append_block(d, [{**x, "run_id": name} for x in r])
    env = {"cpus": 2, "load": [{"before": load, "after": load, "cpus": 2}]} if load else {}
    (d / "env.json").write_text(json.dumps(env))
    return d


def test_a_run_compared_with_itself_reports_no_change(tmp_path, capsys):
    a = write(tmp_path, "a", [rows("baseline", s, mse=0.4 + 0.1 * s, gps=900 + 50 * s) for s in range(3)]
              + [rows("e3nn", s, mse=0.3, gps=200) for s in range(3)])
    c = compare_dirs(a, a)
    assert set(c.table["B vs A"]) == {"no change"} and c.table["B better"].isna().all()
    assert (c.table["B/A"] == 1.0).all()
    assert main(["compare", str(a), str(a), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "no change beyond the noise" in out and "0 in one run only" in out
    assert "e3nn" in out and "B vs A" in out  # the terminal table, not just the output path
    assert (tmp_path / "cmp" / "index.html").exists() and (tmp_path / "cmp" / "nbody_compare.png").exists()
    assert len(pd.read_csv(tmp_path / "cmp" / "comparison.csv")) == len(c.table)


def test_a_method_in_one_run_only_is_marked_never_same(tmp_path):
    a = write(tmp_path, "a", [rows("baseline", 0), rows("only_a", 0), rows("broken", 0)])
    b = write(tmp_path, "b", [rows("baseline", 0), rows("only_b", 0), rows("broken", 0, status="failed")])
    t = compare_runs(load_results(a), load_results(b)).set_index(["method", "metric"])["B vs A"]
    assert set(t.loc["only_a"]) == {"only in A"}
    assert set(t.loc["only_b"]) == {"only in B"}
    assert set(t.loc["broken"]) == {"failed in B"}
    assert set(t.loc["baseline"]) == {"no change"}


def test_a_change_counts_only_beyond_the_measured_spread_of_both_runs():
    def frame(gps: float, rel_iqr: float, mse: float) -> pd.DataFrame:
        return pd.DataFrame(rows("m", 0, gps=gps, rel_iqr=rel_iqr, mse=mse))
    # throughput halves with a 2 % timing spread: worse; accuracy 2x better with no spread: better
    t = compare_runs(frame(1000, 0.02, 0.5), frame(500, 0.02, 0.25)).set_index("metric")
    assert t.loc[TP, "B vs A"] == "worse" and t.loc[TP, "B better"] is False
    assert t.loc["test.mse", "B vs A"] == "better"
    # the same halving inside a 30 % spread of run B (3 x 0.30 > log 2): no change called
    t = compare_runs(frame(1000, 0.02, 0.5), frame(500, 0.30, 0.5)).set_index("metric")
    assert t.loc[TP, "B vs A"] == "no change" and math.isclose(t.loc[TP, "noise"], 0.30)
    assert bool(t.loc[TP, "unstable B"]) and not bool(t.loc[TP, "unstable A"])
    # 5 % changes are under the 10 % threshold even without any spread
    t = compare_runs(frame(1000, 0.0, 0.5), frame(950, 0.0, 0.525)).set_index("metric")
    assert set(t["B vs A"]) == {"no change"}
    # a loaded machine: timings are not called, accuracy still is
    t = compare_runs(frame(1000, 0.02, 0.5), frame(500, 0.02, 0.25), loaded=(False, True)).set_index("metric")
    assert t.loc[TP, "B vs A"] == LOADED_VERDICT and t.loc["test.mse", "B vs A"] == "better"


def test_loaded_machine_is_read_from_env_json(tmp_path):
    quiet = write(tmp_path, "quiet", [rows("m", 0)], load=[0.5, 0.4, 0.3])
    busy = write(tmp_path, "busy", [rows("m", 0, gps=400)], load=[5.0, 4.0, 3.0])
    assert loaded_machine_lines([quiet]) == []
    assert "loaded machine" in loaded_machine_lines([busy])[0] and "2 CPUs" in loaded_machine_lines([busy])[0]
    c = compare_dirs(quiet, busy)
    assert c.table.set_index("metric").loc[TP, "B vs A"] == LOADED_VERDICT
    assert any(n.startswith("⚠ B:") for n in c.notes)


def test_load_record_and_loaded():
    now = load_average()
    assert now is None or (len(now) == 3 and all(x >= 0 for x in now))
    rec = load_record([3.0, 1.0, 1.0], [0.1, 0.1, 0.1])
    assert rec["cpus"] >= 1 and set(rec) >= {"before", "after", "cpus", "finished_at"}
    assert loaded({"before": [3.0, 1, 1], "after": [0.5, 1, 1], "cpus": 2})
    assert not loaded({"before": [1.9, 9, 9], "after": [2.0, 9, 9], "cpus": 2})  # 1-minute average at most cpus
    assert not loaded({"before": None, "after": None, "cpus": 2})
    # after a run: its own workers (one per CPU) are in the average; other work on top of them is not
    assert not loaded({"before": [0.8, 1, 1], "after": [2.15, 2, 2], "cpus": 2})
    assert loaded({"before": [0.8, 1, 1], "after": [3.1, 2, 2], "cpus": 2})
    assert loaded({"before": [2.2, 1, 1], "after": [2.15, 2, 2], "cpus": 2})  # before the run: nothing of its own


@pytest.mark.parametrize("samples, flagged", [([1.0, 1.01, 0.99, 1.02, 1.0], False),
                                              ([1.0, 1.6, 0.7, 1.5, 0.8], True)])
def test_time_step_flags_repeats_that_disagree(monkeypatch, samples, flagged):
    monkeypatch.setattr(throughput, "sample_times", lambda run, **kw: {
        "samples": samples, "inner": 1, "warmup_calls": 0, "warmup_samples": 0, "stable": True})
    res = throughput.time_step(lambda: None, "cpu", threads=1)
    assert res["unstable"] is flagged
    assert res["unstable"] == (res["time_iqr_s"] / res["time_median_s"] > throughput.UNSTABLE_REL_IQR)
    assert res["load_avg_1min"] is None or res["load_avg_1min"] >= 0


def test_is_unstable_edges():
    assert throughput.is_unstable(0.3, 1.0) and not throughput.is_unstable(0.25, 1.0)
    assert not throughput.is_unstable(None, 1.0) and not throughput.is_unstable(0.5, 0.0)
    assert not throughput.is_unstable(float("nan"), 1.0)


def test_report_marks_unstable_throughput_with_a_note(tmp_path):
    run = write(tmp_path, "r", [rows("steady", 0, rel_iqr=0.02), rows("shaky", 0, rel_iqr=0.6)])
    df = load_results(run)
    assert unstable_timings(df) == {("shaky", "inference")}
    # rows written before the flag existed: the same rule from their own timing numbers
    assert unstable_timings(df.drop(columns="unstable")) == {("shaky", "inference")}
    agg, std = seed_table(df)
    table = task_table(agg, std, 1, "test.mse", None, unstable_timings(df))
    speed = table.xs("speed", axis=1, level=0)
    cell = speed.filter(like="inference").iloc[:, 0]
    assert UNSTABLE_MARK in cell["shaky"] and UNSTABLE_MARK not in cell["steady"]
    text = eb.write_report(run, tmp_path / "rep").with_name("README.md").read_text()
    assert "⚠ unstable: the timing's repeats disagree" in text and "shaky (inference)" in text
