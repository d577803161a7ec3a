"""The efficiency sections (report/efficiency.py) on synthetic rows with known answers: the power
law recovers a known exponent, the crossover sentences name the size where constructed curves
cross, meet or separate (and say "do not cross" where they do not), the Pareto frontier and the
best method per budget on a hand-made example, unconverged runs flagged and left out of the fit,
no section without a training-size sweep, and a full report of a synthetic run directory."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import equibench as eb
from equibench.report.efficiency import (
    CostPoint,
    best_at_budget,
    crossover_sentences,
    efficiency_sections,
    fit_power_law,
    frontier,
    method_fits,
    pair_verdict,
    size_sweep,
)
from equibench.results.store import append_block

SIZES = (100, 300, 1000, 3000)


def run_rows(method: str, size: int, seed: int, value: float, *, exact: bool = False, convergence: str = "converged",
             flops: float | None = None, wall_s: float | None = None, metric: str = "mse",
             extra_options: dict | None = None) -> list[dict]:
    """The rows of one (method, train_size, seed) run of task ``t`` the report reads."""
    base = {"run_id": "r", "spec_hash": f"{method}-{size}-{seed}-{extra_options}", "task": "t", "method": method,
            "seed": seed, "status": "ok", "convergence": convergence, "exact_claim": exact, "bench": "task",
            "task_options": {"train_size": size, **(extra_options or {})}, "val_metric": metric,
            "train_config": {"steps": 100, "batch_size": 10, "lr": 1e-3}, "device_name": "test CPU",
            "git_commit": "0123456789abc"}
    rows = [{**base, "metric": f"test.{metric}", "value": value},
            {**base, "metric": "train.steps", "value": 100},
            {**base, "metric": "train.wall_s", "value": wall_s if wall_s is not None else size / 100}]
    if flops is not None:
        rows.append({**base, "metric": "train.flops", "value": flops})
    return rows


def sweep_rows(curves: dict[str, tuple[float, float, bool]], seeds: int = 3, noise: float = 0.03,
               **kw) -> list[list[dict]]:
    """Runs of methods whose error is a·N^b × exp(noise · (seed − 1)) (``{method: (a, b, exact)}``): at
    every size the seeds' log errors average to the power law's, so the least-squares exponent is b."""
    runs = []
    for method, (a, b, exact) in curves.items():
        for n in SIZES:
            for s in range(seeds):
                runs.append(run_rows(method, n, s, a * n ** b * float(np.exp(noise * (s - 1))), exact=exact,
                                     flops=n * 1e9, **kw))
    return runs


def frame(runs: list[list[dict]]) -> pd.DataFrame:
    return pd.DataFrame([r for rows in runs for r in rows])


def test_the_power_law_fit_recovers_a_known_exponent():
    rng = np.random.default_rng(1)
    sizes = np.repeat([100.0, 300.0, 1000.0, 3000.0, 10000.0], 3)
    fit = fit_power_law(sizes, 2.0 * sizes ** -0.5)
    assert fit is not None and fit.b == pytest.approx(-0.5, abs=1e-12) and fit.a == pytest.approx(2.0, rel=1e-12)
    noisy = 2.0 * sizes ** -0.5 * np.exp(rng.normal(0, 0.1, len(sizes)))
    fit = fit_power_law(sizes, noisy)
    assert fit is not None and fit.n == 15 and fit.sizes == (100.0, 300.0, 1000.0, 3000.0, 10000.0)
    lo, hi = fit.interval
    assert lo < -0.5 < hi and 0 < hi - lo < 0.2  # the interval holds the true exponent and is informative
    assert fit.b != pytest.approx(-0.5, abs=1e-6)  # fitted to the noisy points, not to their means' law
    assert fit_power_law([100.0, 100.0], [0.1, 0.2]) is None  # one size: no exponent
    two = fit_power_law([100.0, 1000.0], [0.1, 0.01])
    assert two is not None and two.b == pytest.approx(-1.0) and np.isnan(two.half)  # two points: no interval


def test_the_exponent_table_and_legend_per_method(tmp_path):
    curves = {"baseline": (2.0, -0.3, False), "egnn": (0.5, -0.6, True)}
    df = frame(sweep_rows(curves))
    sweep = size_sweep("t", df)
    assert sweep is not None and sweep.sizes == list(map(float, SIZES)) and sweep.exact() == {"egnn"}
    fits = method_fits(sweep)
    for method, b in (("baseline", -0.3), ("egnn", -0.6)):
        fit, left_out = fits[method]
        assert fit is not None and fit.b == pytest.approx(b, abs=1e-9) and fit.n == 12 and left_out == 0
        assert 0 < fit.half < 0.05 and fit.a == pytest.approx(curves[method][0], rel=1e-9)
    data, _ = efficiency_sections(df, tmp_path)
    title, table = data["tables"][0]
    assert "linregress" in title and list(table.columns[:2]) == ["exponent b", "95 % interval"]
    assert table.loc["egnn", "sizes used"] == "100, 300, 1,000, 3,000" and table.loc["egnn", "n points"] == "12"
    assert "b ± t(0.975, n − 2) · stderr(b)" in title


def _values(table: dict[str, dict[int, list[float]]]) -> dict[str, dict[float, list[float]]]:
    return {m: {float(n): v for n, v in per.items()} for m, per in table.items()}


def test_a_constructed_crossing_is_placed_between_the_right_sizes():
    values = _values({"augmentation": {100: [0.30, 0.31, 0.32], 300: [0.20, 0.21, 0.22], 1000: [0.105, 0.11, 0.115],
                                       3000: [0.050, 0.051, 0.052]},
                      "frame_averaging": {100: [0.10, 0.11, 0.12], 300: [0.09, 0.10, 0.11], 1000: [0.09, 0.10, 0.11],
                                          3000: [0.080, 0.081, 0.082]}})
    v = pair_verdict("augmentation", "frame_averaging", values)
    # frame_averaging better (separated) at 100 and 300; the means swap between 1 000 and 3 000
    assert v.kind == "overtakes" and v.winner == "augmentation"
    assert v.text.startswith("augmentation overtakes frame_averaging between 1,000 and 3,000")
    text = crossover_sentences(values, exact={"frame_averaging"})
    assert text[0] == v.text and len(text) == 1


def test_reaching_the_error_of_another_method_names_the_first_inseparable_size():
    values = _values({"augmentation": {100: [0.30, 0.31, 0.32], 300: [0.20, 0.21, 0.22], 1000: [0.10, 0.12, 0.14],
                                       3000: [0.05, 0.07, 0.09]},
                      "frame_averaging": {100: [0.10, 0.11, 0.12], 300: [0.09, 0.10, 0.11], 1000: [0.09, 0.11, 0.13],
                                          3000: [0.06, 0.07, 0.08]}})
    v = pair_verdict("augmentation", "frame_averaging", values)
    assert v.kind == "reaches" and v.winner == "frame_averaging"
    assert v.text.startswith("augmentation reaches frame_averaging's error at 1,000: frame_averaging is better up "
                             "to 300")


def test_pulling_ahead_and_no_crossing():
    values = _values({"egnn": {100: [0.30, 0.20, 0.40], 300: [0.10, 0.11, 0.12], 1000: [0.05, 0.051, 0.052]},
                      "baseline": {100: [0.31, 0.21, 0.41], 300: [0.20, 0.21, 0.22], 1000: [0.15, 0.151, 0.152]},
                      "augmentation": {100: [0.9, 0.91, 0.92], 300: [0.4, 0.41, 0.42], 1000: [0.3, 0.31, 0.32]}})
    v = pair_verdict("egnn", "baseline", values)
    assert v.kind == "pulls ahead" and v.text.startswith("egnn is better than baseline from 300 on")
    assert "not separable at 100" in v.text
    text = crossover_sentences(values, exact={"egnn"})
    # egnn is the best exact method, augmentation the second anchor; each pair once
    assert text == [v.text,
                    "In the range measured (100–1,000) these do not cross egnn (the best exact method at 1,000): "
                    "worse at every size: augmentation.",
                    "In the range measured (100–1,000) these do not cross augmentation (data augmentation): "
                    "better at every size: baseline."]


def test_curves_that_never_separate_or_have_one_seed_say_so():
    tied = _values({"egnn": {100: [0.1, 0.2, 0.3], 300: [0.1, 0.2, 0.3]},
                    "baseline": {100: [0.15, 0.2, 0.25], 300: [0.12, 0.2, 0.28]}})
    text = crossover_sentences(tied, exact={"egnn"})
    assert text == ["In the range measured (100–300) these do not cross egnn (the best exact method at 300): "
                    "not separable at any size: baseline."]
    one = _values({"egnn": {100: [0.1], 300: [0.05]}, "baseline": {100: [0.2], 300: [0.1]}})
    assert "not tested (one seed): baseline" in crossover_sentences(one, exact={"egnn"})[0]


def test_the_frontier_and_the_best_method_at_each_budget_on_a_hand_made_example():
    pts = [CostPoint("a", 100, 1.0, 5.0, True), CostPoint("b", 100, 2.0, 3.0, True),
           CostPoint("a", 300, 3.0, 4.0, True),  # dominated by b at 2
           CostPoint("b", 300, 4.0, 1.0, True), CostPoint("a", 1000, 5.0, 1.0, True),  # same error, more cost
           CostPoint("a", 3000, 8.0, 0.5, False)]
    front = frontier(pts)
    assert [(p.method, p.size) for p in front] == [("a", 100), ("b", 100), ("b", 300), ("a", 3000)]
    text = best_at_budget(pts, "FLOPs")
    assert text == ("below 1 FLOPs nothing was measured; 1–2 FLOPs: a (N = 100); 2–8 FLOPs: b (N = 100, 300); "
                    "from 8 FLOPs: a (N = 3,000 ⚠ not converged)")
    tie = [CostPoint("a", 100, 1.0, 2.0, True), CostPoint("b", 100, 1.0, 2.0, True),
           CostPoint("b", 300, 3.0, 1.0, True)]
    assert best_at_budget(tie, "s") == ("below 1 s nothing was measured; 1–3 s: a and b (N = 100, 100); "
                                        "from 3 s: b (N = 300)")


def test_unconverged_runs_are_flagged_and_left_out_of_the_fit(tmp_path):
    runs = sweep_rows({"baseline": (2.0, -0.3, False), "egnn": (0.5, -0.6, True)})
    runs.append(run_rows("egnn", 3000, 3, 0.9, exact=True, convergence="not_converged", flops=3e12))
    runs.append(run_rows("egnn", 1000, 3, 0.9, exact=True, convergence="cap_reached", flops=1e12))
    df = frame(runs)
    sweep = size_sweep("t", df)
    assert sweep is not None and sweep.unconverged() == {("egnn", 3000.0): [3], ("egnn", 1000.0): [3]}
    fit, left_out = method_fits(sweep)["egnn"]
    assert left_out == 2 and fit is not None and fit.n == 12 and fit.interval[0] < -0.6 < fit.interval[1]
    data, compute = efficiency_sections(df, tmp_path)
    caption = data["figures"][0][1]
    assert "Hollow markers" in caption and "egnn at N = 3,000, seed 3" in caption and "dotted" in caption
    table = data["tables"][1][1]
    assert "⚠ seed 3 not converged" in table.loc["egnn", "N = 3,000"]
    assert "⚠" not in table.loc["baseline", "N = 3,000"]
    costs = compute["tables"][0][1]
    assert (costs.loc["egnn", "converged"] == "⚠ no").sum() == 2 and (costs.loc["baseline", "converged"] == "yes").all()


def test_flops_not_counted_are_named(tmp_path):
    runs = sweep_rows({"baseline": (2.0, -0.3, False)})
    runs += [run_rows("escnn", n, s, 0.5 * n ** -0.4, exact=True) for n in SIZES for s in range(3)]  # no FLOPs
    _, compute = efficiency_sections(frame(runs), tmp_path)
    assert "FLOPs not counted for: escnn (left out of the FLOP panel and its frontier)." in compute["notes"]
    assert "FLOPs not counted for: escnn." in compute["figures"][0][1]
    assert compute["tables"][0][1].loc["escnn", "training FLOPs"].eq("not counted").all()


def test_an_accuracy_is_turned_into_an_error():
    runs = [run_rows("baseline", n, s, 1 - 0.5 * n ** -0.5, metric="accuracy") for n in SIZES for s in range(2)]
    sweep = size_sweep("t", frame(runs))
    assert sweep is not None and sweep.error_label == "1 − accuracy"
    fit, _ = method_fits(sweep)["baseline"]
    assert fit is not None and fit.b == pytest.approx(-0.5, abs=1e-9)


def test_no_section_without_a_training_size_sweep(tmp_path):
    one_size = frame([run_rows("baseline", 100, s, 0.1) for s in range(3)])
    assert efficiency_sections(one_size, tmp_path) == []
    other = frame([run_rows("baseline", 100, s, 0.1 * (1 + f), extra_options={"field": f})
                   for s in range(3) for f in (0.0, 1.0)])  # a sweep of another option
    assert efficiency_sections(other, tmp_path) == []
    no_size = one_size.assign(task_options=[{} for _ in range(len(one_size))])
    assert efficiency_sections(no_size, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_runs_differing_in_another_option_are_not_mixed_in(tmp_path):
    runs = sweep_rows({"baseline": (2.0, -0.3, False)})
    runs += [run_rows("baseline", 3000, s, 5.0, extra_options={"field": 1.0}) for s in range(3)]
    sweep = size_sweep("t", frame(runs))
    assert sweep is not None and max(p.error for p in sweep.points) < 1.0 and len(sweep.points) == 12


def test_the_full_report_shows_both_sections(tmp_path):
    run_dir = tmp_path / "res" / "r"
    run_dir.mkdir(parents=True)
    for rows in sweep_rows({"baseline": (2.0, -0.3, False), "augmentation": (2.0, -0.5, False),
                            "egnn": (0.5, -0.3, True)}):
        append_block(run_dir, rows)
    index = eb.write_report(run_dir, tmp_path / "rep")
    html, md = index.read_text(), (tmp_path / "rep" / "README.md").read_text()
    for heading in ("Data efficiency: t", "Compute efficiency: t"):
        assert heading in md and heading in html
    for png in ("efficiency_t_data.png", "efficiency_t_compute.png"):
        assert (tmp_path / "rep" / png).exists() and png in html
    data = md.split("Data efficiency: t")[1].split("Compute efficiency: t")[0]
    assert "device: test CPU" in data and "seeds: 0, 1, 2" in data  # how it was measured, once
    # 0.5·N^-0.3 and 2·N^-0.5 cross at N = 4^5 = 1 024: separated at 300 and 3 000, the means swap after 1 000
    assert "augmentation overtakes egnn between 1,000 and 3,000 (egnn better at 100, p = " in data
    assert "b = -0.500" not in data and "| -0.500 |" in data  # the exponents table
    compute = md.split("Compute efficiency: t")[1]
    assert "Best at each training-FLOP budget" in compute and "Best at each training-time budget" in compute


def test_a_method_that_never_converged_at_two_sizes_is_fitted_over_all_its_runs_and_marked(tmp_path):
    """Every run of egnn stopped by its cap: no converged fit exists, so the fit uses all its runs,
    counts them as capped, and the fit table and legend say so."""
    runs = sweep_rows({"baseline": (2.0, -0.3, False)})
    runs += [run_rows("egnn", n, seed, 0.5 * n ** -0.4, exact=True, convergence="cap_reached", flops=1e9 * n)
             for n in SIZES for seed in (0, 1, 2)]
    df = frame(runs)
    sweep = size_sweep("t", df)
    assert sweep is not None
    fit, left_out = method_fits(sweep)["egnn"]
    assert fit is not None and fit.capped == 3 * len(SIZES) and left_out == 0 and abs(fit.b + 0.4) < 1e-9
    base, base_left = method_fits(sweep)["baseline"]
    assert base is not None and base.capped == 0 and base_left == 0
    data, _ = efficiency_sections(df, tmp_path)
    table = data["tables"][0][1]
    assert f"{3 * len(SIZES)} capped runs in the fit" in table.loc["egnn", "unconverged left out"]
    assert "marked ⚠ capped" in data["figures"][0][1]
    assert table.loc["baseline", "unconverged left out"] == "0"
