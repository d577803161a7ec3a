"""Tuning: the same grid for every (task, method) chosen on the mean validation value over at least
two seeds, a learning-rate grid that extends itself until the choice is interior (or a cap), stored
beside the suite or run in the same run; every measured row says where its settings came from and
whether the choice sits at a grid edge."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

import equibench as eb
from equibench.benches.tuning import TuningConfig
from equibench.plan.tuned import extension_settings, select_settings
from equibench.cli import main
from equibench.core.errors import UserError
from equibench.results.store import read_records
from equibench.plan.suites import read_suite

SUITE = {
    "name": "tiny",
    "seeds": [0, 1, 2],
    "train": {"steps": 12, "batch_size": 8, "eval_batch_size": 16, "warmup_steps": 1, "val_points": 3},
    "evaluate": {"equivariance_samples": 1, "equivariance_graphs": 4, "throughput": False, "lie_derivative": False},
    "tasks": {"nbody": {"train_size": 32, "val_size": 8, "test_size": 8}},
    "methods": {"baseline": {"width": 8, "depth": 1}},
    "tuning": {"grid": {"lr": [1.0e-1, 1.0e-3]}, "seeds": [0, 1], "use": "stored", "max_extensions": 0},
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
    assert len(tune_rows) == 4 and {r["seed"] for r in tune_rows} == {0, 1}  # grid on the tuning seeds only
    assert chosen["seeds"] == 2 and chosen["grid"] == {"lr": [0.001, 0.1]}
    assert chosen["edge"] in ("upper", "lower")  # two values, no extension: the choice is at an edge
    df = eb.run(suite, tmp_path / "res", run_name="after", isolate=False, progress=False)
    ok = df[df["metric"] == "test.mse"]
    assert len(ok) == 3 and all(c["lr"] == chosen["lr"] for c in ok["train_config"])
    assert set(ok["tuning_edge"]) == {chosen["edge_note"]} and "after 0 extensions" in chosen["edge_note"]
    assert all("stored tuning" in s and "tiny.tuned.yaml" in s for s in ok["setting_source"])


def test_tuning_in_the_same_run(tmp_path):
    suite = _write(tmp_path, {**SUITE, "tuning": {**SUITE["tuning"], "use": "run"}})
    df = eb.run(suite, tmp_path / "res", run_name="r", isolate=False, progress=False)
    assert (df["metric"] == "tune.best_val").sum() == 4 and (df["metric"] == "test.mse").sum() == 3
    assert all("tuned in this run (r)" in s for s in df[df["metric"] == "test.mse"]["setting_source"])


@pytest.mark.parametrize("tuning, message", [
    ({"grid": {"lr": []}}, "at least one value"),
    ({"grid": {"lrr": [0.1]}}, "unknown train option 'lrr'"),
    ({"use": "sometimes"}, "must be stored, run or off"),
    ({"seeds": [0]}, "at least two seeds"),
    ({"seeds": [3, 3]}, "at least two seeds"),
    ({"grid": {"lr": [1e-3], "weight_decay": [0.0]}, "max_extensions": 2}, "one-option grid"),
    ({"grid": {"lr": [0.0, 1e-3]}}, "positive values"),
    ({"extend_factor": 1.0}, "extend_factor > 1"),
])
def test_malformed_tuning_is_one_line(tmp_path, tuning, message):
    with pytest.raises(UserError, match=message):
        read_suite(_write(tmp_path, {**SUITE, "tuning": tuning}))


def test_a_tuning_run_without_results_is_one_clear_error(tmp_path, capsys):
    suite = _write(tmp_path, {**SUITE, "methods": {"baseline": {"width": 8, "depth": 1, "params": 10}}})
    assert main(["tune", str(suite), "--results-dir", str(tmp_path / "res"), "--no-isolate", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no tuning run" in err and err.count("\n") == 1 and not (tmp_path / "tiny.tuned.yaml").exists()


def _rows(task, method, scores):
    """tune.best_val rows for {(lr, seed): value}; value None = a failed (diverged) run."""
    out = []
    for (lr, seed), v in scores.items():
        base = {"task": task, "method": method, "seed": seed, "train_config": {"lr": lr, "steps": 10},
                "setting": {"lr": lr}, "val_metric": "mse"}
        out.append({**base, "metric": "tune.best_val", "status": "ok", "value": v} if v is not None
                   else {**base, "metric": "status", "status": "failed", "value": None})
    return out


def test_selection_uses_the_mean_over_seeds_and_a_failed_seed_loses():
    # seed 0 alone would pick lr 0.1; the mean over both seeds picks 0.01
    rows = _rows("t", "m", {(0.1, 0): 1.0, (0.1, 1): 3.0, (0.01, 0): 1.5, (0.01, 1): 1.6})
    chosen = select_settings(rows, ["lr"])[("t", "m")]
    assert chosen["setting"] == {"lr": 0.01} and chosen["val"] == pytest.approx(1.55) and chosen["seeds"] == 2
    # a setting that diverged in one seed ranks below every finished one, whatever its other seed scored
    rows = _rows("t", "m", {(0.3, 0): 0.1, (0.3, 1): None, (0.1, 0): 1.0, (0.1, 1): 1.0,
                            (0.01, 0): 2.0, (0.01, 1): 2.0})
    chosen = select_settings(rows, ["lr"], TuningConfig(grid={"lr": [0.3, 0.1, 0.01]}))[("t", "m")]
    assert chosen["setting"] == {"lr": 0.1} and chosen["scores"]["lr=0.3"] is None
    assert chosen["edge"] == "" and chosen["edge_note"] == ""  # the diverged 0.3 is its worse upper neighbour


def _tune_synthetic(score, cfg):
    """Run the waves of ``equibench tune`` against the score function lr -> validation value
    (both seeds score the same, offset by the seed); returns the final selection and the waves."""
    values = list(cfg.grid["lr"])
    rows = _rows("t", "m", {(lr, s): score(lr) + 0.01 * s for lr in values for s in cfg.seeds})
    waves = []
    for _ in range(cfg.max_extensions):
        extra = extension_settings(select_settings(rows, ["lr"], cfg), cfg)
        if not extra:
            break
        new = [d["lr"] for d in extra[("t", "m")]]
        waves.append(new)
        rows += _rows("t", "m", {(lr, s): score(lr) + 0.01 * s for lr in new for s in cfg.seeds})
    return select_settings(rows, ["lr"], cfg)[("t", "m")], waves


def test_the_grid_extends_beyond_the_edge_until_the_optimum_is_interior():
    cfg = TuningConfig(grid={"lr": [3e-3, 1e-3, 3e-4]})  # defaults: factor sqrt(10), 3 extensions, seeds (0, 1)
    chosen, waves = _tune_synthetic(lambda lr: 1 + (math.log10(lr) - math.log10(0.02)) ** 2, cfg)
    assert waves == [[0.00949], [0.03], [0.0949]]      # x sqrt(10) each wave, 3 significant digits
    assert chosen["setting"] == {"lr": 0.03} and chosen["edge"] == "" and chosen["edge_note"] == ""
    assert chosen["grid"] == {"lr": [3e-4, 1e-3, 3e-3, 0.00949, 0.03, 0.0949]}
    assert chosen["extensions"] == {"upper": 3, "lower": 0}
    # optimum below the grid: extends downwards, stops as soon as the choice has a worse lower neighbour
    chosen, waves = _tune_synthetic(lambda lr: (math.log10(lr) + 4.1) ** 2, cfg)
    assert waves == [[9.49e-05], [3e-05]] and chosen["setting"] == {"lr": 9.49e-05} and chosen["edge"] == ""


def test_the_grid_stops_at_the_cap_with_the_edge_flagged():
    cfg = TuningConfig(grid={"lr": [3e-3, 1e-3, 3e-4]}, max_extensions=2)
    chosen, waves = _tune_synthetic(lambda lr: 1.0 / lr, cfg)  # larger is always better
    assert waves == [[0.00949], [0.03]] and chosen["setting"] == {"lr": 0.03}
    assert chosen["edge"] == "upper" and chosen["extensions"]["upper"] == 2
    assert chosen["edge_note"].startswith("upper edge lr=0.03 of {0.0003, 0.001, 0.003, 0.00949, 0.03}")
    assert chosen["edge_note"].endswith("after 2 extensions")
    assert extension_settings({("t", "m"): chosen}, cfg) == {}  # the cap: no further wave


def test_waves_run_through_the_engine_and_an_edge_choice_is_an_anomaly(tmp_path):
    from equibench.report.verdicts import anomalies, assess, verdict_table

    suite = _write(tmp_path, {**SUITE, "tuning": {"grid": {"lr": [1e-3]}, "seeds": [0, 1], "use": "run",
                                                   "max_extensions": 1}})
    df = eb.run(suite, tmp_path / "res", run_name="r", isolate=False, progress=False)
    tune = df[df["metric"] == "tune.best_val"]
    # one value is at both edges: one wave tries a value on each side, each on both seeds
    assert sorted(set(c["lr"] for c in tune["train_config"])) == [0.000316, 0.001, 0.00316]
    assert len(tune) == 6 and set(tune["seed"]) == {0, 1}
    measured = df[df["metric"] == "test.mse"]
    lr = measured["train_config"].iloc[0]["lr"]
    means = tune.assign(lr=[c["lr"] for c in tune["train_config"]]).groupby("lr")["value"].mean()
    assert lr == means.idxmin()  # chosen on the mean over both seeds
    edge = set(measured["tuning_edge"])
    assert len(edge) == 1 and (edge == {""}) == (lr == 0.001)  # interior exactly when the middle value won
    assert set(df[df["task"] == "nbody"]["budget"].dropna()) == {"fixed"}
    # the banner and the verdict row: an edge choice is an anomaly of its own, and only then
    rows = df[df["metric"] != "tune.best_val"].copy()
    rows["tuning_edge"] = "upper edge lr=0.00316 of {0.000316, 0.001, 0.00316} after 1 extension"
    found = [a for a in anomalies(rows) if a.kind == "tuning at grid edge"]
    assert len(found) == 1 and "upper edge lr=0.00316" in found[0].text and found[0].method == "baseline"
    table = verdict_table(assess("nbody", rows))
    assert table is not None and any("⚠ tuned at grid edge" in cell for row in table.rows for cell in row)
    rows["tuning_edge"] = ""
    assert not [a for a in anomalies(rows) if a.kind == "tuning at grid edge"]


def test_a_narrowed_tune_keeps_the_other_stored_settings(tmp_path):
    """Re-tuning one (task, method) (``tune --task/--method``) replaces its entry only; every entry
    names the tuning run it came from, and a kept entry's specs say so."""
    from equibench.core.spec import RunSpec
    from equibench.plan.tuned import apply_selection, stored_selection, write_tuned

    cfg = TuningConfig(grid={"lr": [0.1, 0.01]}, seeds=[0, 1])

    def chosen(lr: float) -> dict:
        return {"setting": {"lr": lr}, "val_metric": "mse", "val": 1.0, "seeds": 2, "scores": {f"lr={lr}": 1.0},
                "grid": {"lr": [0.01, 0.1]}, "edge": "", "edge_note": ""}

    path = tmp_path / "s.tuned.yaml"
    write_tuned(path, "s", tmp_path / "tune-1", cfg, {("nbody", "a"): chosen(0.1), ("nbody", "b"): chosen(0.1)})
    write_tuned(path, "s", tmp_path / "tune-2", cfg, {("nbody", "b"): chosen(0.01)})
    assert "&id" not in path.read_text()  # no YAML anchors: every entry reads on its own
    doc = yaml.safe_load(path.read_text())
    assert doc["settings"]["nbody"]["a"]["lr"] == 0.1 and doc["settings"]["nbody"]["a"]["run"] == "tune-1"
    assert doc["settings"]["nbody"]["b"]["lr"] == 0.01 and doc["settings"]["nbody"]["b"]["run"] == "tune-2"
    selection, where = stored_selection(doc, ["lr"])
    specs = apply_selection([RunSpec(task="nbody", method=m) for m in ("a", "b")], selection, where, cfg.grid)
    assert "run tune-1" in specs[0].setting_source and "run tune-2" in specs[1].setting_source
    write_tuned(path, "other", tmp_path / "tune-3", cfg, {("nbody", "b"): chosen(0.1)})  # another suite's file
    assert set(yaml.safe_load(path.read_text())["settings"]["nbody"]) == {"b"}
