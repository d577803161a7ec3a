"""Suite sections ``scaling`` and ``tp_bench``: validated with the suite, run after its specs into
the same run directory, resumed, skipped when the run is narrowed, rendered in the run's report."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import equibench as eb
from equibench.core.errors import UserError
from equibench.plan.suites import read_suite
from equibench.results.store import read_records

SUITE = {
    "name": "extras",
    "seeds": [0],
    "train": {"steps": 2, "batch_size": 8, "eval_batch_size": 16, "warmup_steps": 0},
    "evaluate": {"equivariance_samples": 1, "equivariance_graphs": 4, "throughput_batch": 4,
                 "throughput_repeats": 1, "throughput_min_sample_s": 0.001},
    "tasks": {"nbody": {"train_size": 16, "val_size": 8, "test_size": 8}},
    "methods": {"baseline": {"width": 8, "depth": 1}},
    "scaling": {"methods": ["baseline"], "nodes": [8, 16, 32], "repeats": 2, "warmup": 0, "min_sample_s": 0.001,
                "max_warmup_samples": 0, "method_options": {"baseline": {"width": 8, "depth": 1}}},
    "tp_bench": {"lmax": [1], "impls": ["e3nn", "gaunt"], "channel_modes": ["uvu"], "channels": 2, "batch": 4,
                 "repeats": 2, "warmup": 0, "min_sample_s": 0.001, "max_warmup_samples": 0},
}


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_extras_run_into_the_run_directory_and_the_report(tmp_path):
    suite = _write(tmp_path, SUITE)
    df = eb.run(suite, tmp_path / "results", run_name="r", isolate=False, progress=False)
    assert set(df["bench"]) == {"task", "scaling", "tp_bench"} and set(df["task"].dropna()) == {"nbody"}
    scaling = df[(df["bench"] == "scaling") & (df["metric"] == "scaling.time_s")]
    assert sorted(scaling["x"]) == [8, 16, 32] and (scaling["run_id"] == "r").all()
    assert set(df[(df["bench"] == "tp_bench") & (df["status"] == "ok")]["method"]) == {"e3nn", "gaunt"}
    n = len(read_records(tmp_path / "results" / "r"))
    eb.run(suite, tmp_path / "results", run_name="r", resume=True, isolate=False, progress=False)
    assert len(read_records(tmp_path / "results" / "r")) == n  # every spec and point already done
    html = eb.write_report(tmp_path / "results" / "r", tmp_path / "rep").read_text()
    assert "Task: nbody" in html and "Scaling: cost vs size" in html and "Tensor-product microbenchmarks" in html
    assert "Task: scaling" not in html and (tmp_path / "rep" / "scaling_nodes_time.png").exists()
    assert "l1 + l2 + l3 even" in html  # the section's notes are rendered
    assert "Runs that did not produce results" not in html


def test_a_narrowed_run_skips_the_extras_unless_asked(tmp_path):
    suite = _write(tmp_path, {**SUITE, "tp_bench": {**SUITE["tp_bench"], "impls": ["gaunt"]}})
    df = eb.run(suite, tmp_path / "res", run_name="a", methods=["baseline"], isolate=False, progress=False)
    assert set(df["bench"]) == {"task"}
    df = eb.run(suite, tmp_path / "res", run_name="b", methods=["baseline"], isolate=False, progress=False,
                extras=True)
    assert set(df["bench"]) == {"task", "scaling", "tp_bench"}


@pytest.mark.parametrize("section, options, message", [
    ("scaling", {"nodes": "16,64"}, "scaling option 'nodes': Input should be a list"),
    ("scaling", {"nodes": [16, "x"]}, "scaling option 'nodes.1': Input should be a valid integer"),
    ("scaling", {"repats": 3}, "unknown scaling option 'repats'"),
    ("scaling", {"axes": ["depth"]}, "unknown scaling axis"),
    ("scaling", {"device": "cuda"}, "runs on the suite's device"),
    ("tp_bench", {"impls": ["e3nn", "fast"]}, "unknown impl"),
    ("tp_bench", [1, 2], "option 'tp_bench': Input should be a mapping"),
])
def test_malformed_extras_are_one_clear_error(tmp_path, section, options, message):
    suite = _write(tmp_path, {**SUITE, section: options})
    with pytest.raises(UserError, match=message):
        read_suite(suite)
    proc = subprocess.run([sys.executable, "-m", "equibench.cli", "run", str(suite), "--results-dir",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and message.split()[0] in proc.stderr


def test_the_quick_suite_carries_both_sections():
    doc = read_suite("quick")
    assert doc.scaling and doc.scaling["methods"] and doc.tp_bench and doc.tp_bench["lmax"]
