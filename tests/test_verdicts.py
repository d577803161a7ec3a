"""Verdict tables and the anomaly banner, on synthetic run directories with known numbers:
ranking in the catalogue's direction, 95 % t-intervals, groups against the best, the trivial predictor's
row, and the banner's failed / unconverged / exact-over-limit / no-better-than-trivial entries."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats

import equibench as eb
from equibench.report.common.tables import UNSTABLE_NOTE, unstable_timings
from equibench.report.verdicts import (
    anomalies,
    assess,
    exact_vs_baseline,
    holm,
    pooled_p,
    pooled_variance,
    rank_methods,
    t_interval,
    verdict_table,
    welch_p,
)
from equibench.results.store import append_block, load_results

T_975 = {2: 4.302652729749462, 3: 3.1824463052837078}  # t quantiles (0.975; 2 and 3 degrees of freedom)


def run_rows(task: str, method: str, seed: int, score: float | None, *, metric: str = "mse", trivial: float = 10.0,
             status: str = "ok", convergence: str = "converged", exact: bool = False, fp64: float = 1e-3,
             fp32: float = 1e-3, gain: float = 0.0, lr: float = 1e-3, source: str = "suite file",
             error: str = "") -> list[dict]:
    """The rows of one (task, method, seed) run as the task bench writes them (the subset the
    report reads)."""
    base = {"run_id": "r", "spec_hash": f"{task}-{method}-{seed}", "task": task, "method": method, "seed": seed,
            "status": status, "error": error, "convergence": convergence, "exact_claim": exact,
            "setting_source": source, "train_config": {"steps": 100, "batch_size": 10, "lr": lr},
            "task_options": {"train_size": 100}, "device_name": "test CPU", "git_commit": "0123456789abc"}
    if status != "ok":
        return [{**base, "metric": "status", "value": None, "exit_signal": "SIGKILL" if status == "failed" else None}]
    rows = [{**base, "metric": f"test.{metric}", "value": score},
            {**base, "metric": f"trivial.{metric}", "value": trivial},
            {**base, "metric": "params", "value": 1000},
            {**base, "metric": "equivariance.trained.fp64.rel_max", "value": fp64, "dtype": "fp64", "stage": "trained"},
            {**base, "metric": "equivariance.trained.fp32.rel_max", "value": fp32, "dtype": "fp32", "stage": "trained"},
            {**base, "metric": "throughput.inference.graphs_per_s", "value": 100.0 + seed, "dtype": "fp32",
             "batch_size": 10, "repeats": 5},
            {**base, "metric": "train.steps", "value": 100, "val_metric": metric},
            {**base, "metric": "train.val_improvement_last_fifth", "value": gain, "val_metric": metric}]
    for step in (20, 40, 60, 80, 100):
        rows.append({**base, "metric": "curve.val", "value": (score or 1.0) * (1 + 1 / step), "x": step,
                     "x_label": "step", "curve_wall_s": step / 10, "curve_flops": step * 1e6, "val_metric": metric,
                     "stage": "training"})
    return rows


def write_run(tmp_path, runs: list[list[dict]]):
    run_dir = tmp_path / "res" / "r"
    run_dir.mkdir(parents=True)
    for rows in runs:
        append_block(run_dir, rows)
    return run_dir


def seeds(task, method, values, **kw):
    return [run_rows(task, method, s, v, **kw) for s, v in enumerate(values)]


def test_t_interval_is_the_textbook_formula():
    mean, half, n = t_interval([1.0, 1.2, 1.4])
    assert (mean, n) == (pytest.approx(1.2), 3)
    assert half == pytest.approx(T_975[2] * 0.2 / math.sqrt(3), rel=1e-9)
    mean, half, n = t_interval([2.0, 4.0, 6.0, 8.0])
    assert half == pytest.approx(T_975[3] * math.sqrt(20 / 3) / 2, rel=1e-9)
    mean, half, n = t_interval([3.0])
    assert mean == 3.0 and n == 1 and math.isnan(half)


def test_welch_ties_overlapping_seeds_and_separates_distant_ones():
    assert welch_p([1.0, 1.2, 1.4], [1.1, 1.3, 1.5]) > 0.05
    assert welch_p([1.0, 1.2, 1.4], [10.0, 10.1, 9.9]) < 0.05
    assert math.isnan(welch_p([1.0], [2.0, 2.1]))
    ranked = rank_methods({"a": [1.0, 1.2, 1.4], "b": [1.1, 1.3, 1.5], "c": [10.0, 10.1, 9.9]}, "lower")
    assert [(r.method, r.rank, r.group, r.leader) for r in ranked] == [
        ("a", 1, 1, "a"), ("b", 2, 1, "a"), ("c", 3, 2, "c")]


def test_holm_matches_a_hand_computed_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 * 0.005, 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04): step-down is monotone
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    adj = holm([float("nan"), 0.01, 0.02, 0.9])  # NaN is not a test: m = 3
    assert math.isnan(adj[0]) and adj[1:] == pytest.approx([0.03, 0.04, 0.9], rel=1e-12)
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1


def test_groups_cannot_chain():
    """The issue's example: the old neighbour test tied A-B and B-C, so all three were "=1" while
    A against C has p = 1.6e-5 (Welch). Every method is now compared with the best, with the seed
    variance pooled over the table (s² = (2·0.01 + 2·0.49 + 2·0.01) / 6 = 0.17 on 6 degrees of
    freedom) and Holm's correction: A alone is in the top group, B (t = 0.9 / √(0.17·2/3) = 2.673)
    and C are not, and C does not join B's group through a chain either."""
    a, b, c = [1.0, 1.1, 0.9], [1.2, 1.9, 2.6], [2.9, 3.0, 3.1]
    assert welch_p(a, c) == pytest.approx(1.6483e-5, rel=1e-3)
    s2, df = pooled_variance([np.asarray(v) for v in (a, b, c)])
    assert (s2, df) == (pytest.approx(0.17), 6)
    p_ab = 2 * stats.t.sf(0.9 / np.sqrt(0.17 * 2 / 3), 6)
    p_ac = 2 * stats.t.sf(2.0 / np.sqrt(0.17 * 2 / 3), 6)
    assert pooled_p(a, b, s2, df) == pytest.approx(p_ab, rel=1e-9) and 0.03 < p_ab < 0.04
    ranked = {r.method: r for r in rank_methods({"A": a, "B": b, "C": c}, "lower")}
    assert [m for m, r in ranked.items() if r.group == 1] == ["A"] and ranked["A"].is_leader
    # Holm over the two tests against A: the smaller p doubled, the larger one as it is (step 2)
    assert ranked["C"].p_best == pytest.approx(2 * p_ac, rel=1e-9)
    assert ranked["B"].p_best == pytest.approx(max(p_ab, 2 * p_ac), rel=1e-9) and ranked["B"].p_best < 0.05
    # group 2 is led by B; C is compared with B, not with A, and is separated from it too
    assert (ranked["B"].group, ranked["B"].leader) == (2, "B")
    assert ranked["C"].group == 3
    # a noisier B that the pooled test cannot separate stays with A, and C still does not chain in
    wide = {r.method: r for r in rank_methods({"A": a, "B": [0.6, 1.9, 3.2], "C": c}, "lower")}
    assert wide["B"].group == 1 and wide["C"].group != 1


def test_floor_verdict_marks_a_method_that_does_not_beat_the_floor(tmp_path):
    """Floors are per-seed rows (``floor.<metric>``, ``floor`` column); the verdict tests each
    method's seeds against the strongest one, one-sided, Holm over the methods."""
    runs = []
    for method, values in (("good", [0.50, 0.52, 0.51]), ("meh", [0.95, 1.05, 1.0]), ("bad", [1.4, 1.5, 1.6])):
        for seed, v in enumerate(values):
            rows = run_rows("t", method, seed, v)
            base = {k: rows[0][k] for k in rows[0] if k not in ("metric", "value")}
            rows += [{**base, "metric": "floor.mse", "value": 1.0 + 0.01 * seed, "floor": "linear"},
                     {**base, "metric": "floor.mse", "value": 3.0, "floor": "weak"}]
            runs.append(rows)
    df = load_results(write_run(tmp_path, runs))
    facts = assess("t", df)
    assert facts.strongest == "linear" and facts.floors["linear"] == pytest.approx([1.0, 1.01, 1.02])
    assert facts.vs_floor["good"].beats is True and facts.vs_floor["bad"].beats is False
    assert facts.vs_floor["meh"].beats is None  # better mean (1.0 < 1.01) but not separated by three seeds
    table = verdict_table(facts)
    assert table is not None
    cells = {rid.removeprefix("verdict-t-"): row for rid, row in zip(table.row_ids, table.rows)}
    assert list(cells) == ["good", "meh", "floor-linear", "bad", "floor-weak", "trivial"]
    floor_col = table.columns.index("vs strongest floor")
    assert cells["good"][floor_col].startswith("beats linear")
    assert "⚠ not better than linear" in cells["bad"][floor_col] and "not separated" in cells["meh"][floor_col]
    assert cells["floor-linear"][1] == "floor: linear" and cells["floor-linear"][floor_col] == "strongest floor"
    kinds = {(a.kind, a.method) for a in anomalies(df)}
    assert ("not better than a floor", "bad") in kinds and ("not better than a floor", "meh") not in kinds


def test_ranking_follows_the_catalogue_direction(tmp_path):
    lower = [*seeds("t", "good", [1.0, 1.1, 0.9]), *seeds("t", "bad", [5.0, 5.2, 4.8])]
    higher = [*seeds("c", "good", [0.9, 0.91, 0.92], metric="accuracy", trivial=0.1),
              *seeds("c", "bad", [0.5, 0.52, 0.51], metric="accuracy", trivial=0.1)]
    df = load_results(write_run(tmp_path, lower + higher))
    for task in ("t", "c"):
        facts = assess(task, df[df["task"] == task])
        assert [r.method for r in facts.ranked] == ["good", "bad"], task
        assert facts.ranked[1].group == 2  # separated from the best
    html = eb.write_report(tmp_path / "res" / "r", tmp_path / "rep").read_text()
    for task in ("t", "c"):
        section = html.split(f'id="{task}"')[1]
        assert section.index(f'id="verdict-{task}-good"') < section.index(f'id="verdict-{task}-bad"')


def test_verdict_table_interval_ties_and_trivial_row(tmp_path):
    runs = [*seeds("t", "a", [1.0, 1.2, 1.4]), *seeds("t", "b", [1.1, 1.3, 1.5]),
            *seeds("t", "c", [3.0, 3.1, 2.9]), *seeds("t", "d", [12.0, 12.5, 11.5])]
    run_dir = write_run(tmp_path, runs)
    html = eb.write_report(run_dir, tmp_path / "rep").read_text()
    verdict = html.split('<table class="verdict">')[1].split("</table>")[0]
    rows = re.findall(r'<tr id="([^"]+)"(?: class="([^"]*)")?>(.*?)</tr>', verdict)
    order = [r[0].removeprefix("verdict-t-") for r in rows]
    assert order == ["a", "b", "c", "trivial", "d"]  # the trivial predictor (10.0) ranks between c and d
    cells = {r[0].removeprefix("verdict-t-"): re.findall(r"<td>(.*?)</td>", r[2]) for r in rows}
    half = T_975[2] * 0.2 / math.sqrt(3)
    assert cells["a"][0] == "1" and cells["a"][2] == f"1.2 ± {half:.2g}" and cells["a"][3] == "best"
    assert cells["b"][3].startswith("not distinguishable from the best (p_Holm = ") and cells["b"][0] == "1"
    assert cells["c"][3].startswith("below the best (p_Holm = ") and cells["c"][0] == "2"  # b and c are not
    assert cells["trivial"][1] == "trivial predictor" and cells["trivial"][2].startswith("10 ")
    assert dict((r[0], r[1]) for r in rows)["verdict-t-trivial"] == "trivial"
    assert "not better than trivial" in cells["d"][2] and "not better" not in cells["c"][2]
    assert "suite file · lr 0.001" in cells["a"] and "converged" in cells["a"]
    caption = verdict.split("<caption>")[1].split("</caption>")[0]
    assert "95 % t-interval" in caption and "Welch" in caption and "Holm" in caption and "5 %" in caption
    assert "cannot be resolved" in caption and "test split is the same for every seed" in caption
    banner = html.split('id="anomalies"')[1].split("</div>")[0]
    assert "t / d" in banner and "t / a" not in banner


def test_one_seed_says_so(tmp_path):
    run_dir = write_run(tmp_path, [run_rows("t", "a", 0, 1.0), run_rows("t", "b", 0, 2.0)])
    html = eb.write_report(run_dir, tmp_path / "rep").read_text()
    verdict = html.split('<table class="verdict">')[1].split("</table>")[0]
    assert "1 (1 seed, no interval)" in verdict and "not tested (1 seed)" in verdict


def test_banner_lists_every_kind_of_anomaly_with_a_working_link(tmp_path):
    runs = [*seeds("t", "clean", [1.0, 1.1]),
            run_rows("t", "broken", 0, None, status="failed", error="Traceback ...\nRuntimeError: boom"),
            run_rows("t", "broken", 1, None, status="out_of_memory", error="over the memory limit"),
            run_rows("t", "slow", 0, 1.5, convergence="not_converged", gain=0.031), run_rows("t", "slow", 1, 1.6),
            *seeds("t", "leaky", [1.2, 1.3], exact=True, fp64=3e-8, fp32=2e-6),
            *seeds("t", "useless", [11.0, 12.0])]
    run_dir = write_run(tmp_path, runs)
    found = anomalies(load_results(run_dir))
    kinds = {(a.kind, a.method) for a in found}
    assert kinds == {("failed", "broken"), ("not converged", "slow"), ("exact over limit", "leaky"),
                     ("not better than trivial", "useless")}
    assert sum(a.kind == "failed" for a in found) == 2  # both seeds, each with its status
    html = eb.write_report(run_dir, tmp_path / "rep").read_text()
    banner = html.split('<div id="anomalies"')[1].split("</div>")[0]
    assert html.index('id="anomalies"') < html.index("<h2")  # above everything
    assert "Anomalies (5)" in banner
    for text in ("boom", "out_of_memory", "not converged in seed 0", "+3.1 %", "fp64 3.0e-08 &gt; 1e-10",
                 "not better than the trivial predictor"):
        assert text in banner, text
    for anchor in re.findall(r'href="#([^"]+)"', banner):
        assert f'id="{anchor}"' in html, anchor  # every entry links to a row of the page
    verdict = html.split('<table class="verdict">')[1].split("</table>")[0]
    slow = verdict.split('id="verdict-t-slow"')[1].split("</tr>")[0]
    assert "⚠ not converged" in slow  # an unconverged run is never ranked without its flag
    assert "⚠ &gt; 1e-10" in verdict.split('id="verdict-t-leaky"')[1].split("</tr>")[0]
    assert "no result" in verdict.split('id="verdict-t-broken"')[1].split("</tr>")[0]
    md = (tmp_path / "rep" / "README.md").read_text()
    assert md.index("**Anomalies (5)**") < md.index("## Task: t") and "](#task-t)" in md


def test_a_known_float32_limit_is_named_where_the_error_is_flagged(tmp_path):
    """A method's ``float32_caveat`` (row column) explains its float32 error over 1e-4 in the banner
    and marks the verdict cell; the flag itself stays."""
    runs = [[{**r, "float32_caveat": "frames flip near float32 rounding"} for r in rows]
            for rows in seeds("t", "framed", [1.0, 1.1], exact=True, fp64=1e-13, fp32=5e-2)]
    run_dir = write_run(tmp_path, runs)
    found = [a for a in anomalies(load_results(run_dir)) if a.kind == "exact over limit"]
    assert len(found) == 1 and "known float32 limit: frames flip near float32 rounding" in found[0].text
    html = eb.write_report(run_dir, tmp_path / "rep").read_text()
    cell = html.split('<table class="verdict">')[1].split('id="verdict-t-framed"')[1].split("</tr>")[0]
    assert "⚠ &gt; 1e-04 (known float32 limit" in cell


def test_a_clean_run_has_an_empty_banner(tmp_path):
    run_dir = write_run(tmp_path, [*seeds("t", "a", [1.0, 1.1]), *seeds("t", "e", [2.0, 2.2], exact=True,
                                                                          fp64=1e-15, fp32=1e-7)])
    assert anomalies(load_results(run_dir)) == []
    html = eb.write_report(run_dir, tmp_path / "rep").read_text()
    banner = html.split('<div id="anomalies"')[1].split("</div>")[0]
    assert "Anomalies (0)" in banner and "<li" not in banner


def test_learning_curves_are_plotted_with_the_trivial_reference(tmp_path):
    run_dir = write_run(tmp_path, [*seeds("t", "a", [1.0, 1.1]), *seeds("t", "b", [2.0, 2.2])])
    html = eb.write_report(run_dir, tmp_path / "rep").read_text()
    assert (tmp_path / "rep" / "t_learning_curves.png").stat().st_size > 5000
    caption = html.split('src="t_learning_curves.png"')[1].split("</figcaption>")[0]
    assert "against optimiser step, training wall-clock seconds" in caption and "trivial predictor" in caption
    assert "training budget: 100 steps" in html  # the budget says how every number was measured


def test_tuning_runs_choose_settings_and_are_not_ranked(tmp_path):
    """Rows of tuning runs (``tune.*`` with the grid ``setting``) in the same run directory: not in
    the verdict or the banner (an unconverged tuning run is not an anomaly), but tabulated with
    the setting the measured runs used; a failed tuning run is listed as failed."""
    runs = [*seeds("t", "a", [1.0, 1.1], lr=3e-3, source="tuning run (this run)")]
    for lr, val, conv in ((3e-3, 0.9, "converged"), (1e-3, 1.4, "not_converged")):
        base = {"run_id": "r", "spec_hash": f"tune-{lr}", "task": "t", "method": "a", "seed": 0, "status": "ok",
                "error": "", "convergence": conv, "setting": {"lr": lr}, "val_metric": "mse",
                "train_config": {"steps": 100, "lr": lr}, "task_options": {"train_size": 100}}
        runs.append([{**base, "metric": "tune.best_val", "value": val}, {**base, "metric": "tune.wall_s", "value": 2}])
    runs.append([{"run_id": "r", "spec_hash": "tune-bad", "task": "t", "method": "a", "seed": 0, "status": "failed",
                  "error": "RuntimeError: NaN", "setting": {"lr": 0.01}, "metric": "status", "value": None,
                  "train_config": {"steps": 100, "lr": 0.01}, "task_options": {"train_size": 100}}])
    run_dir = write_run(tmp_path, runs)
    found = anomalies(load_results(run_dir))
    assert [(a.kind, "tuning run: lr 0.01" in a.text) for a in found] == [("failed", True)]
    html = eb.write_report(run_dir, tmp_path / "rep").read_text()
    verdict = html.split('<table class="verdict">')[1].split("</table>")[0]
    assert "tuning run (this run) · lr 0.003" in verdict and verdict.count('id="verdict-t-a"') == 1
    tuning = html.split("Tuning on the validation split")[1].split("</table>")[0]
    assert "0.9 ✓" in tuning and "1.4" in tuning and "1.4 ✓" not in tuning


def test_published_numbers_sit_beside_the_measured_ones(tmp_path):
    import json
    run_dir = write_run(tmp_path, seeds("nbody", "egnn", [0.010, 0.012, 0.011], lr=3e-3) +
                        seeds("nbody", "baseline", [0.020, 0.022, 0.021], convergence="not_converged", lr=1e-2))
    published = {"task": "nbody", "metric": "test.mse", "protocol": "EGNN protocol",
                  "values": {"egnn": {"value": 0.0071, "label": "EGNN", "source": "EGNN paper, Table 2"},
                             "baseline": {"value": 0.0107, "label": "GNN", "source": "EGNN paper, Table 2"},
                             "fa_gnn": {"value": 0.0057, "label": "FA-GNN", "source": "FA paper"}}}
    (run_dir / "suite.json").write_text(json.dumps({"name": "paper-cpu", "published": published,
                                                     "train": {"steps": 100}, "seeds": [0, 1, 2]}))
    html = eb.write_report(run_dir, tmp_path / "rep").read_text()
    assert "Published numbers: suite paper-cpu" in html and "EGNN paper, Table 2" in html
    half = T_975[2] * 0.001 / math.sqrt(3)  # seeds 0.010, 0.012, 0.011: s = 0.001
    assert f"0.011 ± {half:.2g} (3 seeds)" in html and "1.55" in html  # 0.011 / 0.0071
    assert "not run" in html and "⚠ 3 of 3 runs not converged" in html
    # the suite's train section is not what ran when rates were tuned: the rates as run are stated
    assert "learning rate as run, per method: baseline 0.01, egnn 0.003" in html


def test_unranked_table_has_no_rank_column_and_says_so(tmp_path):
    runs = [*seeds("t", "a", [3.0, 3.1, 2.9]), *seeds("t", "b", [1.0, 1.2, 1.4])]
    df = load_results(write_run(tmp_path, runs))
    facts = assess("t", df)
    ranked, plain = verdict_table(facts), verdict_table(facts, ranked=False)
    assert ranked is not None and plain is not None
    assert "group" in ranked.columns and "group" not in plain.columns
    assert len(plain.columns) == len(ranked.columns) - 2 and all(len(r) == len(plain.columns) for r in plain.rows)
    assert plain.row_ids.index("verdict-t-b") < plain.row_ids.index("verdict-t-a")  # still sorted by score
    assert "not meant for verdicts" in plain.caption and "not meant for verdicts" not in ranked.caption



def test_unstable_throughput_is_marked_in_the_verdict_table(tmp_path):
    """A throughput whose timing repeats disagree (the row flag ``unstable``, issue 19 item 4)
    carries the mark in the verdict table's speed column, for that method only, and the caption
    says what it means; the report's verdict table shows it too."""
    runs = [*seeds("t", "a", [3.0, 3.1, 2.9]), *seeds("t", "b", [1.0, 1.2, 1.4])]
    for rows in runs:
        for r in rows:
            if r["metric"] == "throughput.inference.graphs_per_s":
                r["unstable"] = r["method"] == "a" and r["seed"] == 1  # one seed of a is enough
    df = load_results(write_run(tmp_path, runs))
    unstable = unstable_timings(df)
    assert unstable == {("a", "inference")}
    for ranked in (True, False):
        table = verdict_table(assess("t", df), ranked=ranked, unstable=unstable)
        assert table is not None
        speed = next(i for i, c in enumerate(table.columns) if "inference" in c)
        cells = {row[table.columns.index("method")]: row[speed] for row in table.rows}
        assert cells["a"] == "101 ⚠ unstable" and cells["b"] == "101"  # mean of 100, 101, 102
        assert UNSTABLE_NOTE in table.caption
    plain = verdict_table(assess("t", df))
    assert plain is not None and not any("unstable" in c for row in plain.rows for c in row)
    assert UNSTABLE_NOTE not in plain.caption
    html = eb.write_report(tmp_path / "res" / "r", tmp_path / "rep").read_text()
    verdict = html.split('class="verdict"')[1].split("</table>")[0]
    assert "101 ⚠ unstable" in verdict

def test_exact_vs_baseline_sentence(tmp_path):
    """The task section's sentence on symmetry against no symmetry: an exact method far below the
    baseline is 'better', one inside the baseline's spread is 'not separated', and when none is
    separated the sentence says the run cannot tell them apart."""
    def facts_of(values: dict[str, list[float]]):
        runs = []
        for method, vals in values.items():
            runs += seeds("t", method, vals, exact=method != "baseline")
        return assess("t", load_results(write_run(tmp_path / str(len(list(tmp_path.iterdir()))), runs)))
    text = exact_vs_baseline(facts_of({"baseline": [1.0, 1.1, 0.9], "e3nn": [0.3, 0.32, 0.31],
                                       "egnn": [1.05, 0.95, 1.0]}))
    assert "better than the baseline: e3nn" in text and "not separated from the baseline by the seeds: egnn" in text
    assert "cannot tell" not in text
    none = exact_vs_baseline(facts_of({"baseline": [1.0, 1.1, 0.9], "egnn": [1.05, 0.95, 1.0]}))
    assert "cannot tell any exact method" in none
