"""The approximate-symmetry suite and report section: method variants in suite files, the
crossover statement on hand-made rows, and the section rendered from a tiny real run."""
from __future__ import annotations

import json

import pandas as pd
import pytest

import equibench as eb
from equibench.core.errors import UserError
from equibench.report.approximate import (
    crossover_sentence,
    exact_without_input,
    field_runs,
    find_crossover,
    values_by,
    variant_labels,
)
from equibench.plan.suites import expand_suite, read_suite, validate_suite

MSE = "test.mse"


def test_method_variants_expand_to_their_method_with_their_options():
    suite = validate_suite({"tasks": {"nbody": {}}, "methods": {
        "frame_averaging": {"width": 8}, "frame_averaging@field": {"width": 8, "field_input": True},
        "baseline": {}}})
    specs = expand_suite(suite)
    assert [(s.method, s.method_options) for s in specs] == [  # rows keep the variant's name
        ("frame_averaging", {"width": 8}), ("frame_averaging@field", {"width": 8, "field_input": True}),
        ("baseline", {})]
    picked = expand_suite(suite, methods=["frame_averaging"])  # a method's name selects its variants
    assert [s.method_options for s in picked] == [{"width": 8}, {"width": 8, "field_input": True}]
    assert [s.method for s in expand_suite(suite, methods=["frame_averaging@field"])] == ["frame_averaging@field"]
    variant = eb.get_method("frame_averaging@field", field_input=True)  # the registry resolves the label
    assert type(variant) is type(eb.get_method("frame_averaging")) and variant.options["field_input"]
    with pytest.raises(UserError, match="variant"):
        validate_suite({"tasks": {"nbody": {}}, "methods": {"frame_averaging@": {}}})


def test_the_approximate_suite_sweeps_the_field():
    suite = read_suite("approximate")
    digits = expand_suite(suite, tasks=["digits"])
    assert {s.method for s in digits} == {"baseline", "augmentation", "frame_averaging"}
    assert {s.task_options["setting"] for s in digits} == {"upright/upright"}
    specs = expand_suite(suite, tasks=["nbody_field"])
    fields = sorted({s.task_options["field"] for s in specs})
    assert fields == [0.0, 0.1, 0.3, 1.0, 3.0]
    variants = {(s.method, json.dumps(s.method_options, sort_keys=True)) for s in specs}
    assert len(variants) == 7 and len(specs) == 7 * 5 * len(suite.seeds) and len(suite.seeds) >= 3
    assert {m.split("@")[0] for m, _ in variants} >= {"baseline", "augmentation", "frame_averaging", "egnn",
                                                      "soft_equivariance"}
    fa = [json.loads(o) for m, o in variants if m.split("@")[0] == "frame_averaging"]
    assert sorted(bool(o.get("field_input")) for o in fa) == [False, True]
    for s in specs:  # every variant is a valid method configuration
        eb.get_method(s.method, **s.method_options)


def _rows(table: dict[tuple[str, bool], dict[float, list[float]]], inputs: tuple[str, ...] = ()) -> pd.DataFrame:
    """Result rows: {(method, exact claim): {field: [value per seed]}}; methods in ``inputs`` take
    the field as an input (a second variant of frame_averaging)."""
    rows = []
    for (method, exact), per in table.items():
        name, opts = (("frame_averaging", {"field_input": True}) if method in inputs else (method, {}))
        for field, vals in per.items():
            for seed, v in enumerate(vals):
                rows.append({"task": "nbody_field", "method": name, "seed": seed, "metric": MSE, "value": v,
                             "status": "ok", "exact_claim": exact, "task_options": {"field": field},
                             "method_options": opts, "spec_hash": f"{method}-{field}-{seed}"})
    return pd.DataFrame(rows)


def _crossover(df: pd.DataFrame):
    rows = field_runs(df)
    return find_crossover(values_by(rows, MSE), exact_without_input(rows), "lower")


def test_crossover_where_a_challenger_wins_with_separated_seeds():
    df = _rows({("frame_averaging", True): {0.0: [0.050, 0.051, 0.052], 1.0: [0.090, 0.091, 0.092],
                                            3.0: [0.30, 0.31, 0.32]},
                ("egnn", True): {0.0: [0.048, 0.049, 0.050], 1.0: [0.095, 0.096, 0.097], 3.0: [0.35, 0.36, 0.37]},
                ("baseline", False): {0.0: [0.080, 0.090, 0.085], 1.0: [0.070, 0.071, 0.072],
                                      3.0: [0.10, 0.11, 0.12]},
                ("fa_input", True): {0.0: [0.050, 0.051, 0.052], 1.0: [0.060, 0.061, 0.062],
                                     3.0: [0.07, 0.071, 0.072]}},
               inputs=("fa_input",))
    c = _crossover(df)
    assert c.field == 1.0 and c.reference == "frame_averaging"  # best exact one without input at field 1
    assert c.winner == "frame_averaging (field_input=True)" and c.p < 0.05 and not c.later_losses
    text = crossover_sentence(c, "mse")
    assert "stop winning at field = 1" in text and "frame_averaging (field_input=True)" in text


def test_no_crossover_when_exact_methods_win_throughout():
    df = _rows({("egnn", True): {0.0: [0.05, 0.051, 0.052], 1.0: [0.06, 0.061, 0.062]},
                ("baseline", False): {0.0: [0.08, 0.081, 0.082], 1.0: [0.09, 0.091, 0.092]}})
    c = _crossover(df)
    assert c.field is None and not c.unseparated
    assert crossover_sentence(c, "mse").startswith("No crossover within the sweep (field = 0, 1)")


def test_a_mean_advantage_the_seeds_do_not_separate_is_no_crossover():
    df = _rows({("egnn", True): {0.0: [0.05, 0.051, 0.052], 1.0: [0.06, 0.10, 0.14]},
                ("baseline", False): {0.0: [0.08, 0.081, 0.082], 1.0: [0.05, 0.09, 0.13]}})
    c = _crossover(df)
    assert c.field is None and [(f, lab) for f, lab, _, _ in c.unseparated] == [(1.0, "baseline")]
    assert "not separated by the seeds" in crossover_sentence(c, "mse")


def test_variant_labels_name_only_the_options_that_differ():
    runs = pd.DataFrame({"method": ["frame_averaging", "frame_averaging", "egnn"],
                         "method_options": [{"width": 8}, {"width": 8, "field_input": True}, {"width": 8}]})
    assert list(variant_labels(runs)) == ["frame_averaging", "frame_averaging (field_input=True)", "egnn"]


def test_section_renders_from_a_tiny_run(tmp_path):
    suite = tmp_path / "approx.yaml"
    suite.write_text(json.dumps({
        "name": "approx-tiny", "seeds": [0],
        "tasks": {"nbody_field": {"field": 0.0, "train_size": 32, "val_size": 8, "test_size": 16}},
        "sweeps": [{"task": "nbody_field", "option": "field", "values": [0.0, 1.0]}],
        "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 16, "val_points": 2},
        "evaluate": {"equivariance_samples": 2, "equivariance_graphs": 4, "lie_derivative": False,
                     "throughput": False, "flops": False},
        "methods": {"baseline": {"width": 8, "depth": 1}, "frame_averaging": {"width": 8, "depth": 1},
                    "frame_averaging@field": {"width": 8, "depth": 1, "field_input": True},
                    "soft_equivariance@dual": {"width": 8, "depth": 1, "lam_mode": "dual"}}}))
    df = eb.run(str(suite), results_dir=tmp_path / "res", run_name="a", isolate=False, progress=False)
    assert (df["status"] == "ok").all() and df["spec_hash"].nunique() == 4 * 2
    index = eb.write_report(tmp_path / "res" / "a", tmp_path / "rep")
    text = (tmp_path / "rep" / "README.md").read_text()
    assert "Approximate symmetry: nbody_field against field strength" in text
    assert "crossover" in text.lower() or "stop winning" in text
    for png in ("approximate_nbody_field_error.png", "approximate_nbody_field_equivariance.png"):
        assert (tmp_path / "rep" / png).exists() and png in index.read_text()
    assert "frame_averaging@field" in text and "soft_equivariance@dual" in text  # variants stay apart
    assert "fitted penalty strength lam" in text


@pytest.mark.parametrize("name", ["approximate", "reference"])
def test_every_task_configuration_of_the_suite_builds(name):
    """Task options of a built-in suite are valid together (e.g. sizes within a source's images)."""
    suite = read_suite(name)
    for spec in expand_suite(suite):
        eb.get_task(spec.task, **spec.task_options)
