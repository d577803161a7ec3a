"""Nothing silent (issue 19, items 1-3 and 6): exit codes that count failed points, one run
directory per invocation, each point counted once across directories, the resolved configuration
printed and stored, command-line task/method options, and bad input refused before anything runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import equibench as eb
from equibench.cli import EXIT_FAILURES, main
from equibench.core.errors import UserError
from equibench.core.spec import RunSpec
from equibench.report.configuration import configuration_notes, configuration_table, read_resolved
from equibench.engine.runner import RESOLVED_FILE, format_resolved, run_dir_for
from equibench.results.store import RECORDS, merge_runs, read_records
from equibench.plan.suites import plan, read_suite

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = str(ROOT / "tests" / "plugins" / "faulty_methods.py")
TASK = {"train_size": 32, "val_size": 8, "test_size": 16}
TRAIN = {"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 16}
EVALUATE = {"equivariance_samples": 2, "equivariance_graphs": 4, "throughput_batch": 8, "throughput_repeats": 2,
            "throughput_min_sample_s": 0.001, "lie_derivative": False, "flops": False}


def write_suite(path: Path, methods: dict, **extra) -> Path:
    path.write_text(yaml.safe_dump({"name": "tiny", "tasks": {"nbody": TASK}, "train": TRAIN, "evaluate": EVALUATE,
                                    "methods": methods, **extra}))
    return path


# ---- 1. exit codes -------------------------------------------------------------------------------

def test_failed_point_exits_4_and_allow_failures_exits_0(tmp_path, capsys):
    suite = write_suite(tmp_path / "s.yaml", {"baseline": {"width": 8, "depth": 1}, "faulty_raises": {}})
    argv = ["run", str(suite), "--results-dir", str(tmp_path / "res"), "--name", "a", "--no-isolate", "--quiet",
            "--no-report", "--plugin", PLUGIN, "--task-option", "nbody.train_size=24"]
    assert main(argv) == EXIT_FAILURES == 4
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "points: 1 ok, 1 failed (exit 4)"
    # --task-option reached the run and its resolved configuration says where it came from
    rows = read_records(tmp_path / "res" / "a")
    assert {r["task_options"]["train_size"] for r in rows} == {24}
    entries = json.loads((tmp_path / "res" / "a" / RESOLVED_FILE).read_text())["entries"]
    base = next(e for e in entries if e["method"] == "baseline")
    assert base["task_options"]["train_size"] == {"value": 24, "source": "command line"}
    assert base["task_options"]["val_size"] == {"value": 8, "source": "suite file"}
    assert base["task_options"]["n_particles"]["source"] == "default"
    assert base["params"] == next(r["value"] for r in rows if r["method"] == "baseline" and r["metric"] == "params")
    assert any("resolved configuration" in line for line in out)

    # the same name again: refused, nothing added
    lines = (tmp_path / "res" / "a" / RECORDS).read_text()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err and "--resume" in err and "--append" in err
    assert (tmp_path / "res" / "a" / RECORDS).read_text() == lines

    # resuming it with --allow-failures: nothing reruns (the failed point is recorded), exit 0
    assert main(argv + ["--resume", "--allow-failures"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("points: 1 ok, 1 failed (exit 0") and "--allow-failures" in last
    assert (tmp_path / "res" / "a" / RECORDS).read_text() == lines


def test_timeouts_and_memory_kills_count_as_failures(tmp_path, capsys):
    from equibench.results.store import append_block, point_statuses
    append_block(tmp_path, [{"spec_hash": "a", "metric": "status", "status": "failed",
                             "error": "timeout: exceeded 10 s (worker killed)"}])
    append_block(tmp_path, [{"spec_hash": "b", "metric": "status", "status": "out_of_memory", "error": "rss"}])
    append_block(tmp_path, [{"spec_hash": "c", "metric": "x", "status": "ok"},
                            {"spec_hash": "c", "metric": "y", "status": "not_applicable"}])
    append_block(tmp_path, [{"spec_hash": "d", "metric": "status", "status": "not_applicable"}])
    assert point_statuses(tmp_path) == {"a": "timeout", "b": "out_of_memory", "c": "ok", "d": "not_applicable"}


# ---- 2. run identity ----------------------------------------------------------------------------

def test_existing_run_name_needs_resume_or_append(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / RECORDS).write_text("")
    with pytest.raises(UserError, match="already holds a run"):
        run_dir_for(tmp_path, "tiny", "x", resume=False)
    assert run_dir_for(tmp_path, "tiny", "x", resume=True) == tmp_path / "x"
    assert run_dir_for(tmp_path, "tiny", "x", resume=False, append=True) == tmp_path / "x"
    assert run_dir_for(tmp_path, "tiny", "new", resume=False) == tmp_path / "new"


def _rows(run: str, seed: int, value: float, finished: str, status: str = "ok", h: str = "h0") -> list[dict]:
    return [{"spec_hash": h, "run_id": run, "task": "nbody", "method": "baseline", "seed": seed, "metric": m,
             "value": value, "status": status, "finished_at": finished} for m in ("test.mse", "params")]


def test_a_rerun_point_is_counted_once_from_the_newest_finished_run(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    kept, notes = merge_runs([(a, _rows("a", 0, 1.0, "2026-01-01")), (b, _rows("b", 0, 2.0, "2026-01-02")),
                              (c, _rows("c", 0, float("nan"), "2026-01-03", status="failed"))])
    assert [r["value"] for r in kept if r["metric"] == "test.mse"] == [2.0]  # newest ok run, not the failed rerun
    assert notes[0] == "merged 3 runs: a, b, c"
    assert any("run a were measured again in run b" in n for n in notes)
    assert any("run c were measured again in run b" in n for n in notes)
    # the same (task, method, seed) under different settings in two runs is named, not merged
    kept, notes = merge_runs([(a, _rows("a", 0, 1.0, "1")), (b, _rows("b", 0, 2.0, "2", h="h1"))])
    assert len(kept) == 4 and any("seed 0 was measured under different settings in runs a, b" in n for n in notes)


def test_report_over_two_directories_holding_the_same_seed_counts_it_once(tmp_path):
    spec = RunSpec(task="nbody", method="baseline", seed=0, task_options=TASK, method_options={"width": 8, "depth": 1},
                   train=TRAIN, evaluate=EVALUATE)
    for name in ("first", "second"):
        eb.run([spec], results_dir=tmp_path / "res", run_name=name, isolate=False, progress=False)
    df = eb.load_results(tmp_path / "res")  # the results root: both runs
    mse = df[df["metric"] == "test.mse"]
    assert len(mse) == 1 and set(mse["run_id"]) == {"second"}
    assert any("measured again in run second" in n for n in df.attrs["merged"])
    index = eb.write_report([tmp_path / "res", tmp_path / "res" / "first"], tmp_path / "rep")
    md = (index.parent / "README.md").read_text()
    assert "Runs merged: merged 2 runs: first, second" in md and "counted once, from second" in md
    assert "p = 0" not in md and "p=0" not in md


# ---- 3. the configuration that ran --------------------------------------------------------------

def test_smoke_suite_runs_an_unlisted_task_at_its_smoke_scale():
    _, resolved = plan(read_suite("smoke"), tasks=["qm9"])
    assert {e["method"] for e in resolved} == {"baseline", "augmentation", "e3nn"}
    qm9 = resolved[0]["task_options"]
    assert qm9["train_size"] == {"value": 64, "source": "smoke scale"}
    assert qm9["target"] == {"value": "gap", "source": "default"}
    text = format_resolved(resolved)
    assert "task qm9: train_size=64, val_size=16, test_size=32 (smoke scale)" in text
    assert "task qm9 is not configured by suite smoke: it runs at its smoke scale (QM9Task.smoke_options)" in text
    assert "train: steps=10, batch_size=16" in text and "(suite file)" in text


def test_a_converge_budget_prints_its_step_cap_not_the_fixed_step_default():
    _, resolved = plan(read_suite("verdict-cpu"), tasks=["nbody"], methods=["baseline"])
    line = next(t for t in format_resolved(resolved).splitlines() if t.strip().startswith("train:"))
    assert "budget=converge" in line and "max_steps=4000" in line and "steps=500" not in line.replace("max_", "")



def test_report_shows_the_configuration_that_ran(tmp_path):
    """A smoke-scale run of a task its suite does not configure: the report's "Configuration that
    ran" table (from the run directory's resolved.json) gives each option not at its default with
    its source ("smoke scale" for the unconfigured task, "command line" for an override), the
    parameter count the run measured, and the note that the task is not configured by the suite;
    a run without resolved.json (older runs) gets no table and no error."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "purpose": "smoke", "scale": "smoke", "tasks": {"qm9": TASK},
                                    "train": TRAIN, "evaluate": EVALUATE,
                                    "methods": {"baseline": {"width": 8, "depth": 1}}}))
    df = eb.run(str(path), results_dir=tmp_path / "res", run_name="a", isolate=False, progress=False,
                tasks=["nbody"], task_options={"nbody": {"val_size": 8}})
    params = int(df[df["metric"] == "params"]["value"].iloc[0])
    md = (eb.write_report(tmp_path / "res" / "a", tmp_path / "rep").parent / "README.md").read_text()
    table = md.split("Configuration that ran:")[1].split("\n\n- ")[0]
    row = next(line for line in table.splitlines() if line.startswith("| baseline |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["baseline", f"{params:,}".replace(",", " "), "0"]
    assert "train_size=64, test_size=32 (smoke scale); val_size=8 (command line)" in cells
    assert "width=8, depth=1 (suite file)" in cells and "steps=4, batch_size=8" in row
    assert "n_particles" not in row  # at its default: omitted
    assert "task nbody is not configured by suite tiny: it runs at its smoke scale (NBody.smoke_options)" in md
    assert "methods are listed by the task's first metric" in md and "methods ranked by" not in md  # unranked
    html = (tmp_path / "rep" / "index.html").read_text()
    assert '<details class="configuration"><summary>Configuration that ran</summary>' in html
    assert "(smoke scale)" in html.split('<table class="configuration">')[1].split("</table>")[0]

    (tmp_path / "res" / "a" / RESOLVED_FILE).unlink()  # a run written before resolved.json existed
    md = (eb.write_report(tmp_path / "res" / "a", tmp_path / "rep2").parent / "README.md").read_text()
    assert "Configuration that ran" not in md and "not configured by suite" not in md


def test_configuration_entries_of_several_runs_merge(tmp_path):
    """Entries of the same configuration in two run directories are one row with the seeds of
    both and the parameter count either knows; a differing configuration is its own row; parts
    every method shares are shown once; an unreadable resolved.json contributes nothing."""
    def entry(method, seeds, params, width, source="suite file"):
        opts = {"train_size": {"value": 64, "source": "smoke scale"}, "cutoff": {"value": 5.0, "source": "default"}}
        return {"task": "qm9", "method": method, "seeds": seeds, "device": "cpu", "task_options": opts,
                "method_options": {"width": {"value": width, "source": source}}, "train": {}, "evaluate": {},
                "setting_source": "", "notes": ["task qm9 is not configured by suite s: it runs at its smoke scale"],
                "params": params}
    for name, entries in (("a", [entry("egnn", [0], None, 16)]),
                          ("b", [entry("egnn", [1], 4498, 16), entry("egnn", [1], None, 32, "command line")])):
        (tmp_path / name).mkdir()
        (tmp_path / name / RESOLVED_FILE).write_text(json.dumps({"entries": entries}))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / RESOLVED_FILE).write_text("{not json")
    merged = read_resolved([tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "missing"])
    assert sorted((e["seeds"], e["params"], e["runs"]) for e in merged) == [([0, 1], 4498, ["a", "b"]),
                                                                            ([1], None, ["b"])]
    table = configuration_table(merged)
    assert table is not None
    rows = {(r[0], r[2]): dict(zip(table.columns, r)) for r in table.rows}
    assert rows[("every method", "–")]["task options"] == "train_size=64 (smoke scale)"  # cutoff: default
    assert rows[("egnn", "0, 1")]["method options"] == "width=16 (suite file)"
    assert rows[("egnn", "0, 1")]["params"] == "4 498" and rows[("egnn", "0, 1")]["runs"] == "a, b"
    assert rows[("egnn", "1")]["method options"] == "width=32 (command line)"
    assert rows[("egnn", "1")]["task options"] == "as above" and rows[("egnn", "1")]["train"] == "as above"
    assert configuration_notes(merged) == ["task qm9 is not configured by suite s: it runs at its smoke scale"]

def test_command_line_options_win_and_are_validated_like_the_suite(tmp_path):
    suite = read_suite(write_suite(tmp_path / "s.yaml", {"baseline": {"width": 8, "depth": 1}, "egnn": {}}))
    benches, resolved = plan(suite, task_options={"nbody": {"train_size": 12}},
                             method_options={"baseline": {"width": 4}})
    specs = {s.method: s for s in benches[0].specs}
    assert specs["baseline"].task_options["train_size"] == 12 and specs["baseline"].method_options["width"] == 4
    assert specs["egnn"].method_options == {}  # the suite configured egnn with its defaults; no scale
    base = next(e for e in resolved if e["method"] == "baseline")
    assert base["method_options"]["width"]["source"] == "command line"
    assert base["method_options"]["depth"]["source"] == "suite file"
    with pytest.raises(UserError, match=r"--task-option nbody.trian_size.*did you mean 'train_size'"):
        plan(suite, task_options={"nbody": {"trian_size": 12}})
    with pytest.raises(UserError, match="not in this run"):
        plan(suite, method_options={"e3nn": {"mul": 2}})


@pytest.mark.parametrize("argv, message", [
    (["--task-option", "nbody.train_size=lots"], "option 'train_size' must be int, got 'lots'"),
    (["--method-option", "baseline.widht=3"], "did you mean 'width'"),
    (["--task-option", "nbody=3"], "expected NAME.OPTION=VALUE"),
    (["--seeds", "-1"], "seeds must be non-negative integers"),
    (["--seeds", "0,-2"], "seeds must be non-negative integers"),
])
def test_bad_command_line_options_are_one_line_exit_2(tmp_path, argv, message, capsys):
    suite = write_suite(tmp_path / "s.yaml", {"baseline": {}})
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "res"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "res").exists()


# ---- 6. bad input, finished ---------------------------------------------------------------------

def test_results_path_that_is_a_file_is_refused_before_anything_runs(tmp_path, capsys):
    suite = write_suite(tmp_path / "s.yaml", {"baseline": {}})
    (tmp_path / "file").write_text("")
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "file"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a directory" in err and "finished results" not in err
    assert main(["scale", "--results-dir", str(tmp_path / "file" / "below")]) == 3
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("taks: [nbody]\nmethods: [baseline]\n", "line 1: unknown top-level key 'taks'; did you mean 'tasks'?"),
    ("tasks: [nbody]\nmethods:\n  baseline:\n    widht: 8\n", "line 4: method 'baseline' has no option 'widht'; "
                                                               "did you mean 'width'?"),
    ("tasks:\n  nbody:\n    train_size: many\nmethods: [baseline]\n", "line 3: task 'nbody' option 'train_size'"),
    ("tasks: [nbody]\nmethods: [baseline]\ntrain:\n  steps: 2\n  lr: fast\n", "line 5: train option 'lr'"),
    ("tasks: [nbody]\nmethods: [baseline]\ntrain: {stpes: 2}\n", "did you mean 'steps'"),
    ("tasks: [nbody]\nmethods: [baseline]\nseeds: [0, -1]\n", "non-negative"),
    ("tasks: [nbdy]\nmethods: [baseline]\n", "line 1: unknown task 'nbdy'; did you mean 'nbody'"),
])
def test_suite_file_errors_name_the_file_the_line_and_the_closest_option(tmp_path, text, message, capsys):
    path = tmp_path / "mysuite.yaml"
    path.write_text(text)
    assert main(["run", str(path), "--results-dir", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert f"{path}, {message}" in err or (message in err and str(path) in err), err
    assert err.count("\n") == 1 and not (tmp_path / "res").exists()
