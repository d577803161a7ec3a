"""The results contract (issue 21, item 1): typed, versioned records, one writer, one Status enum.

* ``tests/data/run-v1`` is a run directory written by the code before the contract (commit
  a5895bf: the smoke suite's n-body baseline, failed / timed-out / out-of-memory points, a scaling
  sweep, a tensor-product point with a skipped backend, tuning points); today's readers load it,
  upgrade every row to the current schema (``bench``, ``timeout`` rows, namespaced metric names)
  and the report renders it;
* the schema tables of ``results/README.md`` are the ones generated from the models;
* no status string is spelled outside ``equibench/results/``;
* the one writer: failure rows, run-level columns, units and the schema version are stamped in
  ``results.rows``, and rows a schema rejects cost their point, not the run.
"""
from __future__ import annotations

import ast
import io
import shutil
import tokenize
from pathlib import Path

import pytest

import equibench as eb
from equibench.benches.training import NonFiniteError
from equibench.core.errors import NotApplicable, Skipped, UserError
from equibench.core.registry import load_plugin
from equibench.engine.engine import run_benches
from equibench.results import docs
from equibench.results.rows import RunColumns, exception_rows, point_record
from equibench.results.schema import SCHEMA_VERSION, PointRecord, Record
from equibench.results.status import FAILURES, Status, worst
from equibench.results.store import RECORDS, point_statuses, read_points, read_records
from equibench.results.upgrade import upgrade

ROOT = Path(__file__).resolve().parents[1]
V1 = ROOT / "tests" / "data" / "run-v1"
TOY = str(ROOT / "tests" / "plugins" / "toy_bench.py")
STATUS_VALUES = {s.value for s in Status}


# ---- the stored run of the earlier layout ----------------------------------------------------

def test_a_run_of_the_earlier_layout_loads_upgraded():
    raw = [line for line in (V1 / RECORDS).read_text().splitlines() if line.strip()]
    assert '"schema_version"' not in raw[0] and '"bench"' not in raw[0]  # as written before the contract
    rows = read_records(V1)
    assert len(rows) == len(raw) == 139
    assert {r["schema_version"] for r in rows} == {SCHEMA_VERSION}
    for r in rows:
        Record.model_validate(r)  # every upgraded row fits today's schema
    benches = {r["bench"] for r in rows}
    assert benches == {"task", "tune", "scaling", "tp_bench"}
    assert not {r["task"] for r in rows} & {"scaling", "tp_bench"}  # no bench poses as a task
    scaling = [r for r in rows if r["bench"] == "scaling"]
    assert {r["task"] for r in scaling} == {None} and {r["scaling_task"] for r in scaling} == {"nbody"}
    assert all(r["metric"].startswith("scaling.") or r["metric"] == "status" for r in scaling)
    tune = [r for r in rows if r["bench"] == "tune"]
    assert {r["metric"] for r in tune} == {"tune.best_val", "tune.best_step", "tune.wall_s"}
    by_method = {r["method"]: r for r in rows if r["metric"] == "status"}
    assert by_method["faulty_sleeps"]["status"] == Status.TIMEOUT  # written as "failed" before
    assert by_method["faulty_raises"]["status"] == Status.FAILED
    assert by_method["memory_hog"]["status"] == Status.OUT_OF_MEMORY
    assert by_method["memory_hog"]["max_memory_bytes"] == 600 * 2**20


def test_the_earlier_run_s_point_outcomes_and_records():
    statuses = point_statuses(V1)
    counts = {s: list(statuses.values()).count(s) for s in Status}
    assert counts == {Status.OK: 6, Status.FAILED: 1, Status.TIMEOUT: 1, Status.OUT_OF_MEMORY: 2,
                      Status.NOT_APPLICABLE: 1, Status.SKIPPED: 1}
    points = read_points(V1)
    assert len(points) == len(statuses)
    rows = read_records(V1)
    for p in points:  # grouping a block into a record and back is lossless
        assert p.rows() == [r for r in rows if r["block"] == p.block]
    (task,) = [p for p in points if p.bench == "task" and p.method == "baseline"]
    assert task.status == Status.OK and task.task == "nbody" and task.git_commit and len(task.measurements) > 50


def test_a_torn_block_of_the_earlier_run_is_dropped(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(V1, run)
    with open(run / RECORDS, "a") as f:  # a runner killed mid-write: half a block, no newline
        f.write('{"run_id": "v1-smoke", "metric": "test.mse", "block": "torn", "block_size": 3}\n{"run_id": ')
    assert read_records(run) == read_records(V1)


def test_the_earlier_run_renders_with_today_s_code(tmp_path):
    index = eb.write_report(V1, tmp_path / "rep")
    html = index.read_text()
    assert "Task: nbody" in html and "Scaling: cost vs size" in html and "Tensor-product microbenchmarks" in html
    assert "Task: scaling" not in html and "Task: tp_bench" not in html
    assert "timeout" in html and "faulty_sleeps" in html  # the time-out is listed as one


def test_load_results_gives_the_bench_column():
    df = eb.load_results(V1)
    assert set(df["bench"]) == {"task", "tune", "scaling", "tp_bench"}
    assert (df["schema_version"] == SCHEMA_VERSION).all()


# ---- the schema document ---------------------------------------------------------------------

def test_results_readme_is_generated_from_the_models():
    text = docs.README.read_text()
    assert docs.generated_part(text) == docs.schema_markdown(), \
        "results/README.md is out of date: run `python -m equibench.results.docs`"
    for name in ("max_memory_bytes", "schema_version", "bench", "timeout"):
        assert f"`{name}`" in docs.generated_part(text)
    assert "memory_limit_bytes" not in text  # the name the rows never carried


def test_the_readme_check_sees_a_stale_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# results\n\n" + docs.schema_markdown().replace("`max_memory_bytes`", "`memory_limit_bytes`"))
    assert docs.generated_part(readme.read_text()) != docs.schema_markdown()
    assert docs.rewrite(readme) and docs.generated_part(readme.read_text()) == docs.schema_markdown()


# ---- no status string outside the enum ------------------------------------------------------

def status_literals(source: str) -> list[tuple[int, str]]:
    """(line, literal) of every string literal in ``source`` whose value is a status."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.STRING:
            continue
        try:
            value = ast.literal_eval(tok.string)
        except (ValueError, SyntaxError):  # f-strings
            continue
        if isinstance(value, str) and value in STATUS_VALUES:
            found.append((tok.start[0], value))
    return found


def test_no_status_string_outside_the_results_package():
    package = ROOT / "equibench"
    bad = [f"{path.relative_to(ROOT)}:{line}: {value!r}" for path in sorted(package.rglob("*.py"))
           if "results" not in path.relative_to(package).parts[:1]
           for line, value in status_literals(path.read_text())]
    assert not bad, "status strings outside equibench/results/ (use results.status.Status):\n" + "\n".join(bad)


def test_the_status_scan_catches_literals_but_not_prose():
    src = 'x = row["status"] == "ok"\ny = {"status": \'failed\'}\n"""ok: a docstring"""\nz = f"{s} failed"\n'
    assert status_literals(src) == [(1, "ok"), (2, "failed")]


def test_status_is_a_string_enum():
    assert Status.OK == "ok" and "timeout" in {Status.TIMEOUT} and f"{Status.OUT_OF_MEMORY}" == "out_of_memory"
    assert worst(["ok", "not_applicable", "timeout", "ok"]) == Status.TIMEOUT
    assert worst(["not_applicable", "ok"]) == Status.OK and worst([]) == Status.OK
    assert set(FAILURES) == {Status.FAILED, Status.TIMEOUT, Status.OUT_OF_MEMORY}


# ---- the one writer --------------------------------------------------------------------------

RUN = RunColumns(run_id="r", spec_hash="h", bench="task", git_commit="c", versions={"torch": "2"},
                 environment="main", executor="local", wall_s=1.5)


def _raised(err: BaseException) -> BaseException:
    try:
        raise err
    except BaseException as caught:  # noqa: BLE001 - the traceback is what is tested
        return caught


def test_exception_rows_say_how_the_point_ended():
    (oom,) = exception_rows(_raised(MemoryError("no room")), peak_rss=10, max_memory=5)
    assert oom["status"] == Status.OUT_OF_MEMORY and oom["max_memory_bytes"] == 5 and oom["peak_rss_bytes"] == 10
    (na,) = exception_rows(NotApplicable("images only", budget="fixed"))
    assert na["status"] == Status.NOT_APPLICABLE and na["error"] == "images only" and na["budget"] == "fixed"
    (sk,) = exception_rows(Skipped("too slow"))
    assert sk["status"] == Status.SKIPPED
    (failed,) = exception_rows(_raised(ValueError("bad")))
    assert failed["status"] == Status.FAILED and failed["error"].startswith("ValueError: bad | ")
    assert "_raised" in failed["error"]  # the last traceback lines
    for plain in (NonFiniteError("loss is nan"), UserError("unknown task")):
        (row,) = exception_rows(_raised(plain))
        assert row["status"] == Status.FAILED and " | " not in row["error"]


def test_point_record_stamps_run_columns_units_and_version():
    record = point_record({"task": "nbody", "method": "baseline", "seed": 0},
                          [{"metric": "throughput.inference.graphs_per_s", "value": 3.0, "threads": 1},
                           {"metric": "test.mse", "value": 0.5, "task": "overridden"}], RUN)
    assert isinstance(record, PointRecord) and record.status == Status.OK
    rows = record.rows()
    assert [r.get("unit") for r in rows] == ["graphs/s", None]  # test.mse declares no unit
    assert all(r["schema_version"] == SCHEMA_VERSION and r["bench"] == "task" and r["run_id"] == "r"
               and r["spec_hash"] == "h" and r["versions"] == {"torch": "2"} and r["status"] == "ok" for r in rows)
    assert rows[1]["task"] == "overridden" and rows[0]["task"] == "nbody"
    for r in rows:
        Record.model_validate(r)


def test_rows_the_schema_rejects_cost_the_point_not_the_run():
    (row,) = point_record({"task": "nbody"}, [{"metric": "test.mse", "value": "not a number"}], RUN).rows()
    assert row["status"] == Status.FAILED and "record schema" in row["error"] and "value" in row["error"]
    (row,) = point_record({"task": "nbody"}, [], RUN).rows()
    assert row["status"] == Status.FAILED and "produced no rows" in row["error"]


def test_upgrade_leaves_current_rows_alone():
    row = {"schema_version": SCHEMA_VERSION, "bench": "scaling", "task": None, "metric": "scaling.time_s"}
    assert upgrade(row) is row
    old = upgrade({"task": "tp_bench", "metric": "time_s", "status": "ok"})
    assert old["bench"] == "tp_bench" and old["task"] is None and old["metric"] == "tp_bench.time_s"


def test_the_engine_writes_the_current_schema(tmp_path):
    load_plugin(TOY)
    from equibench.benches.base import bench_class
    run_dir = run_benches([bench_class("toy")([("a", "rows", "", 0)])], tmp_path / "toy", isolate=False,
                          plugins=[TOY], progress=False)
    (row,) = read_records(run_dir)
    assert row["schema_version"] == SCHEMA_VERSION and row["bench"] == "toy" and row["executor"] == "inline"
    assert row["status"] == "ok" and row["error"] == "" and row["wall_s"] >= 0 and row["git_commit"]
    Record.model_validate(row)
    with pytest.raises(ValueError):
        Status("crashed")


# ---- one invocation reads its records and its suite once (issue 21, item 5) -----------------

def test_one_run_reads_its_records_and_parses_its_suite_once(tmp_path, monkeypatch, capsys):
    import yaml

    from equibench.cli import main
    from equibench.plan import suites
    from equibench.results import store

    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "tiny", "purpose": "smoke", "seeds": [0], "device": "cpu",
        "tasks": {"nbody": {"train_size": 16, "val_size": 8, "test_size": 8}},
        "train": {"steps": 2, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 8},
        "evaluate": {"equivariance_samples": 1, "equivariance_graphs": 2, "throughput": False, "profile": False,
                     "lie_derivative": False, "symmetric_inputs": False},
        "methods": {"baseline": {"width": 8, "depth": 1}, "augmentation": {"width": 8, "depth": 1}}}))
    argv = ["run", str(suite), "--results-dir", str(tmp_path / "res"), "--name", "r", "--no-isolate", "--quiet"]
    assert main([*argv, "--methods", "baseline", "--no-report"]) == 0
    before = (tmp_path / "res" / "r" / RECORDS).read_text().count("\n")
    parsed: list[int] = []
    parse, validate = store._parse, suites.validate_suite
    validated: list[str] = []
    monkeypatch.setattr(store, "_parse", lambda lines: parsed.append(len(lines)) or parse(lines))
    monkeypatch.setattr(suites, "validate_suite", lambda *a, **k: validated.append(a[1]) or validate(*a, **k))
    assert main([*argv, "--append"]) == 0  # resume the baseline, run augmentation, report, count outcomes
    assert sum(parsed) == before  # the earlier rows once; this run's own rows never read back
    assert len(validated) == 1  # the suite file parsed once
    out = capsys.readouterr().out
    assert "2/2 runs ok" in out and "report: " in out and "points: 2 ok (exit 0)" in out
    df = eb.load_results(tmp_path / "res" / "r")
    assert set(df["method"]) == {"baseline", "augmentation"} and (df["schema_version"] == SCHEMA_VERSION).all()


def test_run_suite_returns_the_handle_to_what_it_wrote(tmp_path):
    spec = eb.RunSpec(task="nbody", method="baseline", seed=0,
                      task_options={"train_size": 16, "val_size": 8, "test_size": 8},
                      method_options={"width": 8, "depth": 1},
                      train={"steps": 2, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 8},
                      evaluate={"equivariance_samples": 1, "equivariance_graphs": 2, "throughput": False,
                                "profile": False, "lie_derivative": False, "symmetric_inputs": False})
    records = eb.run_suite([spec], results_dir=tmp_path, run_name="h", isolate=False, progress=False)
    assert isinstance(records, eb.RunRecords) and records.path == tmp_path / "h"
    assert records.rows == read_records(tmp_path / "h")  # what it holds is what is on disk
    assert records.statuses() == {spec.hash: eb.Status.OK}
    (point,) = records.points()
    assert point.bench == "task" and point.method == "baseline" and point.status == Status.OK
    df = eb.run([spec], results_dir=tmp_path, run_name="h", resume=True, isolate=False, progress=False)
    assert df.attrs["run_dir"] == str(tmp_path / "h") and len(df) == len(records.rows)
