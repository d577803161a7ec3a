"""Tuning: the same grid for every (task, method) chosen on validation, stored beside the suite or
run in the same run; every measured row says where its settings came from."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import equibench as eb
from equibench.benches.tuning import select_settings
from equibench.cli import main
from equibench.core.errors import UserError
from equibench.suite.store import read_records
from equibench.suite.suites import read_suite

SUITE = {
    "name": "tiny",
    "seeds": [0, 1],
    "train": {"steps": 12, "batch_size": 8, "eval_batch_size": 16, "warmup_steps": 1, "val_points": 3},
    "evaluate": {"equivariance_samples": 1, "equivariance_graphs": 4, "throughput": False, "lie_derivative": False},
    "tasks": {"nbody": {"train_size": 32, "val_size": 8, "test_size": 8}},
    "methods": {"baseline": {"width": 8, "depth": 1}},
    "tuning": {"grid": {"lr": [1.0e-1, 1.0e-3]}, "seeds": [0], "use": "stored"},
}


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_select_settings_picks_the_best_mean_in_the_metric_direction():
    rows = [{"metric": "tune.best_val", "status": "ok", "task": "t", "method": "m", "val_metric": metric,
             "train_config": {"lr": lr}, "value": v}
            for metric, lr, v in [("mse", 0.1, 2.0), ("mse", 0.1, 4.0), ("mse", 0.01, 2.5)]]
    chosen = select_settings(rows, ["lr"])[("t", "m")]
    assert chosen["setting"] == {"lr": 0.01} and chosen["val"] == 2.5 and chosen["scores"]["lr=0.1"] == 3.0
    acc = [{**r, "val_metric": "accuracy", "task": "d"} for r in rows]
    assert select_settings(acc, ["lr"])[("d", "m")]["setting"] == {"lr": 0.1}  # higher is better


def test_tune_stores_settings_and_the_run_uses_them(tmp_path):
    suite = _write(tmp_path, SUITE)
    df = eb.run(suite, tmp_path / "res", run_name="before", isolate=False, progress=False)
    assert set(df["setting_source"].dropna()) == {"suite file"}
    # through the worker subprocesses, as a user runs it
    assert main(["tune", str(suite), "--results-dir", str(tmp_path / "res"), "--name", "t", "--quiet"]) == 0
    stored = yaml.safe_load((tmp_path / "tiny.tuned.yaml").read_text())
    chosen = stored["settings"]["nbody"]["baseline"]
    assert chosen["lr"] in (0.1, 0.001) and set(chosen["scores"]) == {"lr=0.1", "lr=0.001"}
    tune_rows = [r for r in read_records(tmp_path / "res" / "t") if r["metric"] == "tune.best_val"]
    assert len(tune_rows) == 2 and {r["seed"] for r in tune_rows} == {0}  # grid on the tuning seed only
    df = eb.run(suite, tmp_path / "res", run_name="after", isolate=False, progress=False)
    ok = df[df["metric"] == "test.mse"]
    assert len(ok) == 2 and all(c["lr"] == chosen["lr"] for c in ok["train_config"])
    assert all("stored tuning" in s and "tiny.tuned.yaml" in s for s in ok["setting_source"])


def test_tuning_in_the_same_run(tmp_path):
    suite = _write(tmp_path, {**SUITE, "tuning": {**SUITE["tuning"], "use": "run"}})
    df = eb.run(suite, tmp_path / "res", run_name="r", isolate=False, progress=False)
    assert (df["metric"] == "tune.best_val").sum() == 2 and (df["metric"] == "test.mse").sum() == 2
    assert all("tuned in this run (r)" in s for s in df[df["metric"] == "test.mse"]["setting_source"])


@pytest.mark.parametrize("tuning, message", [
    ({"grid": {"lr": []}}, "at least one value"),
    ({"grid": {"lrr": [0.1]}}, "unknown train option 'lrr'"),
    ({"use": "sometimes"}, "must be stored, run or off"),
])
def test_malformed_tuning_is_one_line(tmp_path, tuning, message):
    with pytest.raises(UserError, match=message):
        read_suite(_write(tmp_path, {**SUITE, "tuning": tuning}))


def test_a_tuning_run_without_results_is_one_clear_error(tmp_path, capsys):
    suite = _write(tmp_path, {**SUITE, "methods": {"baseline": {"width": 8, "depth": 1, "params": 10}}})
    assert main(["tune", str(suite), "--results-dir", str(tmp_path / "res"), "--no-isolate", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no tuning run" in err and err.count("\n") == 1 and not (tmp_path / "tiny.tuned.yaml").exists()
