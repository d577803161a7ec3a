"""The variant-pair table (report/variants.py, a suite's ``compare:``) on a synthetic run written
through the results contract: which variants pair (the baseline filled in from resolved.json
where a variant leaves the option at its default), the paired interval against a hand
computation, the time ratio, no table without ``compare:``, and one clear line for a ``compare:``
that does not fit the suite's methods."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import equibench as eb
from equibench.core.errors import UserError
from equibench.engine.runner import record_resolved, write_suite_file
from equibench.metrics import catalogue as cat
from equibench.plan.suites import expand_suite, plan, read_suite, validate_suite
from equibench.report.variants import Pair, find_pairs, paired_difference
from equibench.results.store import append_block

MAE = cat.test_metric("force_mae")
COMPARE = {"method": "e3nn_nequip", "option": "tensor_product", "baseline": "cg"}
SUITE = {"name": "pairs", "purpose": "quick", "seeds": [0, 1, 2], "device": "cpu",
         "train": {"steps": 200, "batch_size": 16, "lr": 3.0e-2},
         "tasks": {"md": {"train_size": 300, "val_size": 50, "test_size": 100}},
         "methods": {"e3nn_nequip@cg_l1": {"params": 20000, "lmax": 1},
                     "e3nn_nequip@gaunt_l1": {"params": 20000, "lmax": 1, "tensor_product": "gaunt"},
                     "e3nn_nequip@cg_l2": {"params": 20000, "lmax": 2, "tensor_product": "cg"},
                     "e3nn_nequip@gaunt_l2": {"params": 20000, "lmax": 2, "tensor_product": "gaunt"},
                     "e3nn_nequip@gaunt_l3": {"params": 20000, "lmax": 3, "tensor_product": "gaunt"},
                     "baseline": {"width": 8}},
         "compare": COMPARE}
#: per method key: test force MAE per seed, parameters, (inference, train) seconds per batch
MEASURED = {"e3nn_nequip@cg_l1": ([0.20, 0.22, 0.25], 1000, (0.020, 0.050)),
            "e3nn_nequip@gaunt_l1": ([0.18, 0.19, 0.21], 1100, (0.015, 0.060)),
            "e3nn_nequip@cg_l2": ([0.15, 0.16, 0.17], 2000, (0.040, 0.100)),
            "e3nn_nequip@gaunt_l2": ([0.16, 0.15, 0.18], 2100, (0.044, 0.090)),
            "e3nn_nequip@gaunt_l3": ([0.30, 0.31, 0.32], 3000, (0.080, 0.200)),
            "baseline": ([0.50, 0.51, 0.52], 500, (0.001, 0.002))}


def spec_rows(spec, run_id: str) -> list[dict]:
    """The rows one spec's run writes that the table reads (timings on seed 0 only, as ``measure_once``)."""
    maes, params, (infer, step) = MEASURED[spec.method]
    base = {"run_id": run_id, "spec_hash": spec.hash, "bench": "task", "task": spec.task, "method": spec.method,
            "seed": spec.seed, "status": "ok", "task_options": spec.task_options,
            "method_options": spec.method_options, "train_config": spec.train, "device": "cpu",
            "device_name": "test CPU", "implementation": "equibench 0.1.0", "convergence": "converged",
            "git_commit": "0123456789abc"}
    rows = [{**base, "metric": MAE, "value": maes[spec.seed]}, {**base, "metric": "params", "value": params},
            {**base, "metric": cat.train_metric("steps"), "value": 200}]
    for dtype, err in (("fp64", 1e-15), ("fp32", 3e-7)):
        rows.append({**base, "metric": cat.equivariance_metric("trained", dtype, "rel_mean"), "value": err,
                     "dtype": dtype, "batch_size": 8, "repeats": 2, "group": "E3"})
    if spec.seed == 0:
        for mode, t in (("inference", infer), ("train", step)):
            rows.append({**base, "metric": cat.throughput_metric(mode, "time_median_s"), "value": t, "dtype": "fp32",
                         "batch_size": 16, "repeats": 5, "threads": 1})
    return rows


def write_run(root: Path, doc: dict) -> Path:
    """A run directory as the runner leaves it: suite.json, resolved.json and one block per spec."""
    run_dir = root / "r"
    run_dir.mkdir(parents=True)
    suite = validate_suite(doc)
    write_suite_file(run_dir, suite)
    record_resolved(run_dir, plan(suite)[1], announce=False)
    for spec in expand_suite(suite):
        append_block(run_dir, spec_rows(spec, run_dir.name))
    return run_dir


def hand_interval(base: list[float], other: list[float]) -> tuple[float, float]:
    d = np.subtract(other, base)
    return float(d.mean()), float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))


def test_pairs_the_variants_and_reports_the_paired_interval_and_ratio(tmp_path):
    run_dir = write_run(tmp_path, SUITE)
    index = eb.write_report(run_dir, tmp_path / "rep")
    md, html = (tmp_path / "rep" / "README.md").read_text(), index.read_text()
    heading = "Variant pairs on md: e3nn_nequip, tensor_product gaunt vs cg"
    assert heading in md and heading in html and md.index(heading) < md.index("## Task: md")
    section = md.split(heading)[1].split("## Task: md")[0]
    assert section.count("Measured with — test CPU, 200 steps of training at batch 16 (lr 0.03), seeds 0, 1, 2") == 1
    assert "8 test graphs × 2 group samples" in section and "16 graphs in fp32 over 5 repeats at 1 thread" in section
    mean, half = hand_interval(MEASURED["e3nn_nequip@cg_l1"][0], MEASURED["e3nn_nequip@gaunt_l1"][0])
    d = paired_difference(dict(enumerate(MEASURED["e3nn_nequip@cg_l1"][0])),
                          dict(enumerate(MEASURED["e3nn_nequip@gaunt_l1"][0])))
    assert (d.mean, d.half, d.n) == (pytest.approx(mean), pytest.approx(half), 3) and d.separates
    assert d.p == pytest.approx(stats.ttest_rel([0.18, 0.19, 0.21], [0.20, 0.22, 0.25]).pvalue)
    scored, cost = section.split("| lmax |")[1:]  # the scores; a second table: equivariance error and times
    lines = {line.split(" | ")[0]: line for line in scored.splitlines() if line.startswith("| ")}
    costs = {line.split(" | ")[0]: line for line in cost.splitlines() if line.startswith("| ")}
    # cg_l1 leaves tensor_product at its default (cg, from resolved.json), cg_l2 sets it; gaunt_l3 has no partner
    assert set(lines) == set(costs) == {"| 1", "| 2"}
    scores = [stats.t.interval(0.95, 2, np.mean(v), stats.sem(v)) for v in (MEASURED["e3nn_nequip@cg_l1"][0],
                                                                           MEASURED["e3nn_nequip@gaunt_l1"][0])]
    cells = " | ".join(f"{(lo + hi) / 2:.4g} ± {(hi - lo) / 2:.2g}" for lo, hi in scores)
    assert lines["| 1"].startswith(f"| 1 | cg_l1 / gaunt_l1 | 1,000 / 1,100 | {cells} | ")
    assert f"| {mean:.4g} ± {half:.2g} (-13 %) | yes: gaunt lower (better) (3 seeds, p = " in lines["| 1"]
    # fp64 cg, gaunt, fp32 cg, gaunt; inference cg, gaunt, gaunt / cg; train step cg, gaunt, gaunt / cg
    assert costs["| 1"] == ("| 1 | 1.0e-15 | 1.0e-15 | 3.0e-07 | 3.0e-07 | 20 ms | 15 ms | 0.75× | 50 ms | 60 ms "
                            "| 1.20× |")
    assert "| no (3 seeds, p = " in lines["| 2"] and "| 1.10× |" in costs["| 2"] and "| 0.90× |" in costs["| 2"]
    assert "e3nn_nequip@gaunt_l3 (tensor_product 'gaunt') has no partner" in section
    assert "baseline" not in scored + cost
    assert 'class="variants"' in html and "yes: gaunt lower (better)" in html


def test_a_suite_without_compare_renders_no_variant_table(tmp_path):
    doc = {k: v for k, v in SUITE.items() if k != "compare"}
    run_dir = write_run(tmp_path, doc)
    assert json.loads((run_dir / "suite.json").read_text()).get("compare") is None
    index = eb.write_report(run_dir, tmp_path / "rep")
    for page in (index, tmp_path / "rep" / "README.md"):
        assert "## Task: md" in page.read_text().replace('<h2 id="md">', "## ").replace("</h2>", "")
        assert "Variant pairs" not in page.read_text()


def test_pairs_order_by_the_other_options_and_take_every_alternative():
    options = {"m@a10": {"lmax": 10, "tp": "cg"}, "m@b10": {"lmax": 10, "tp": "gaunt"},
               "m@a2": {"lmax": 2, "tp": "cg"}, "m@b2": {"lmax": 2, "tp": "gaunt"}, "m@c2": {"lmax": 2, "tp": "x"},
               "m@d2": {"lmax": 2, "tp": "gaunt", "mul": 4}, "n@a2": {"lmax": 2, "tp": "gaunt"}}
    # lmax by value (2 before 10), then the alternative; m@d2 differs in mul too, n@a2 is another method
    assert find_pairs(options, "m", "tp", "cg") == [
        Pair("2, –", "gaunt", "m@a2", "m@b2"), Pair("2, –", "x", "m@a2", "m@c2"),
        Pair("10, –", "gaunt", "m@a10", "m@b10")]


@pytest.mark.parametrize("compare, message", [
    ({**COMPARE, "option": "tensor_prod"}, "compare.option 'tensor_prod' is set by no variant of e3nn_nequip in "
                                           "'methods'; did you mean 'tensor_product'?"),
    ({**COMPARE, "baseline": "cgx"}, "compare.baseline 'cgx': no variant of e3nn_nequip runs with tensor_product "
                                     "'cgx'"),
    ({**COMPARE, "method": "baseline"}, "compare.method 'baseline' has 1 entry in 'methods'"),
    ({"method": "e3nn_nequip", "option": "tensor_product"}, "compare.baseline"),
])
def test_a_compare_that_does_not_fit_the_suite_is_one_clear_line(tmp_path, compare, message):
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps({**SUITE, "compare": compare}, indent=1))  # JSON is YAML, one key a line
    with pytest.raises(UserError) as err:
        read_suite(path)
    text = str(err.value)
    assert "\n" not in text and message in text and text.startswith(f"malformed suite file {path}, line ")


def test_the_gaunt_suite_pairs_cg_and_gaunt_at_each_lmax():
    suite = read_suite("gaunt")
    assert suite.compare is not None and suite.compare.to_dict() == COMPARE
    options = {k: {"tensor_product": "cg", **v} for k, v in suite.methods.items()}
    assert [(p.label, p.base, p.other) for p in find_pairs(options, "e3nn_nequip", "tensor_product", "cg")] == [
        (str(lmax), f"e3nn_nequip@cg_l{lmax}", f"e3nn_nequip@gaunt_l{lmax}") for lmax in (1, 2, 3)]
