"""The variant-pair table: variants of one method that differ in one option, side by side.

A suite's ``compare: {method, option, baseline}`` (``plan.suites.Compare``, stored in the run's
``suite.json``) names them: the suite's keys ``<method>@<label>`` whose method options are equal
but for ``option`` are paired, every value of ``option`` against ``baseline`` (e.g. suite
``gaunt``: ``e3nn_nequip`` with ``tensor_product: gaunt`` against ``cg`` at each ``lmax``). A
variant's options are its rows' ``method_options``, the options it left at their defaults filled
in from the run's ``resolved.json``: the report reads records, cards and the suite document only.

Per task, one row per pair (per combination of the other options): parameter counts; the task's
primary test metric per variant (mean over seeds ± 95 % t-interval, as the task tables); the
paired difference d_s = other_s − baseline_s over the seeds both ran, mean ± t_{0.975, n−1}
s_d / sqrt(n) (``verdicts.t_interval``, scipy.stats) with the paired t-test's p, and whether the
seeds separate the two (the interval excludes 0); the trained models' relative equivariance error
in fp64 and fp32; the median time of one inference and one training step per batch with the ratio
other / baseline. One sentence above the table says how everything was measured.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ..benches.taskrun import TaskBench
from ..metrics.catalogue import PARAMS, equivariance_metric, throughput_metric
from ..results.cards import method_of  # the method of a variant key (<method>@<label>), a string rule
from ..results.runcards import RunCards
from ..results.status import Status
from .common import fmt
from .common.metricinfo import header, spec_for, value
from .common.render import Section
from .common.tables import options_of, split_sweeps, train_config
from .configuration import read_resolved, read_suite_document
from .verdicts import t_interval, task_metric

EQ = {d: equivariance_metric("trained", d, "rel_mean") for d in ("fp64", "fp32")}
TIME = {m: throughput_metric(m, "time_median_s") for m in ("inference", "train")}
TIME_LABELS = {"inference": "inference / batch", "train": "train step / batch"}
EQ_GROUP = "equivariance error, trained (rel.)"
COST_GROUPS = (EQ_GROUP, *TIME_LABELS.values())  # the columns of the section's second table


@dataclass(frozen=True)
class Pair:
    """Two suite keys of one method, equal but for the compared option: ``base`` runs at the
    baseline value, ``other`` at ``value``; ``label``: the other options that set this pair apart
    from the rest ("lmax 1")."""
    label: str
    value: Any
    base: str
    other: str


def compare_documents(dirs: list[Path]) -> list[tuple[dict[str, Any], list[str]]]:
    """(``compare`` mapping, run ids declaring it) of the run directories whose ``suite.json`` has one."""
    found: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for d in dirs:
        doc = read_suite_document(d)
        compare = doc.get("compare")
        if isinstance(compare, dict) and {"method", "option", "baseline"} <= set(compare):
            key = json.dumps(compare, sort_keys=True, default=str)
            found.setdefault(key, (compare, []))[1].append(Path(d).name)
    return list(found.values())


def variant_options(rows: pd.DataFrame, resolved: list[dict[str, Any]], task: str) -> dict[str, dict[str, Any]]:
    """Method key -> its options on ``task``: those its rows carry, the ones it left at their
    defaults from its ``resolved`` entry (``configuration.read_resolved``) when there is one."""
    out: dict[str, dict[str, Any]] = {}
    for method, g in rows.groupby("method", sort=True):
        given = next((options_of(v) for v in g["method_options"] if options_of(v)), {}) \
            if "method_options" in g else {}
        entry = next((e for e in resolved if e.get("task") == task and e.get("method") == method), None)
        filled = {k: v.get("value") for k, v in (entry or {}).get("method_options", {}).items() if isinstance(v, dict)}
        out[str(method)] = {**filled, **given}
    return out


def _key(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=str)


def _order(v: Any) -> tuple[int, float, str]:
    """Numbers by value, before anything else by its text."""
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    return (0, float(v), "") if number else (1, 0.0, _key({"v": v}))


def varying_options(options: dict[str, dict[str, Any]], keys: list[str], option: str) -> list[str]:
    """The options besides ``option`` whose values differ among ``keys`` (what tells pairs apart)."""
    names = sorted({o for k in keys for o in options[k] if o != option})
    return [o for o in names if len({_key({"v": options[k].get(o)}) for k in keys}) > 1]


def find_pairs(options: dict[str, dict[str, Any]], method: str, option: str, baseline: Any) -> list[Pair]:
    """Every (baseline, other) pair among the keys of ``method`` in ``options`` that differ in
    ``option`` alone, ordered by the options that vary between pairs, then the other value; a
    pair's ``label``: the values of those options in it ("all" when none varies)."""
    keys = [k for k in options if method_of(k) == method]
    rest = {k: _key({o: v for o, v in options[k].items() if o != option}) for k in keys}
    varying = varying_options(options, keys, option)
    found = []
    for base in (k for k in keys if options[k].get(option) == baseline):
        for other in (k for k in keys if options[k].get(option) != baseline and rest[k] == rest[base]):
            values = [options[base].get(o) for o in varying]
            label = ", ".join(str(options[base][o]) if o in options[base] else fmt.MISSING for o in varying) or "all"
            order = (tuple(_order(v) for v in values), _order(options[other].get(option)))
            found.append((order, Pair(label, options[other].get(option), base, other)))
    return [p for _, p in sorted(found, key=lambda t: t[0])]


def per_seed(rows: pd.DataFrame, method: str, metric: str) -> dict[int, float]:
    """Seed -> the mean of ``method``'s ok ``metric`` values of that seed."""
    g = rows[(rows["method"] == method) & (rows["metric"] == metric) & (rows["status"] == Status.OK)]
    g = g[g["value"].notna()]
    means = g.groupby("seed")["value"].mean()
    return {int(s): float(v) for s, v in zip(means.index.tolist(), means.tolist())}


@dataclass(frozen=True)
class Paired:
    """The paired difference other − baseline over ``n`` shared seeds: mean, 95 % t half-width,
    two-sided paired t-test p (NaN with fewer than two seeds or no spread)."""
    mean: float
    half: float
    n: int
    p: float

    @property
    def separates(self) -> bool | None:
        """The interval excludes 0 (None: fewer than two seeds); no spread: any non-zero mean."""
        if self.n < 2:
            return None
        return bool(abs(self.mean) > self.half) if np.isfinite(self.half) else None


def paired_difference(base: dict[int, float], other: dict[int, float]) -> Paired:
    """d_s = other_s − base_s over the seeds in both; mean ± t_{0.975, n−1} s_d / sqrt(n)."""
    seeds = sorted(set(base) & set(other))
    d = [other[s] - base[s] for s in seeds]
    mean, half, n = t_interval(d)
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if n > 1 and np.std(d) > 0 else float("nan")
    return Paired(mean, half, n, p)


def _mean(rows: pd.DataFrame, method: str, metric: str) -> float | None:
    vals = list(per_seed(rows, method, metric).values())
    return float(np.mean(vals)) if vals else None


def _score(values: dict[int, float], metric: str) -> str:
    mean, half, n = t_interval(list(values.values()))
    if n == 0:
        return fmt.MISSING
    return value(spec_for(metric), mean) + (f" ± {half:.2g}" if n > 1 else " (1 seed)")


def _difference(d: Paired, base_mean: float, metric: str) -> str:
    if d.n == 0:
        return fmt.MISSING
    rel = f" ({100 * d.mean / base_mean:+.0f} %)" if base_mean else ""
    sign = "+" if d.mean > 0 else ""
    return f"{sign}{value(spec_for(metric), d.mean)}" + (f" ± {d.half:.2g}" if d.n > 1 else "") + rel


def _separates(d: Paired, other: str, metric: str) -> str:
    verdict = d.separates
    if verdict is None:
        return f"– ({d.n} seed{'s' if d.n != 1 else ''})"
    p = f", p = {d.p:.2g}" if np.isfinite(d.p) else ""
    if not verdict:
        return f"no ({d.n} seeds{p})"
    direction = spec_for(metric).direction
    lower = d.mean < 0
    better = "" if direction is None else (" (better)" if lower == (direction == "lower") else " (worse)")
    return f"yes: {other} {'lower' if lower else 'higher'}{better} ({d.n} seeds{p})"


def _ratio(a: float | None, b: float | None) -> str:
    return fmt.number(b / a, "x") if a and b is not None else fmt.MISSING


def pair_row(rows: pd.DataFrame, pair: Pair, metric: str, names: tuple[str, str]) -> dict[tuple[str, str], str]:
    """One row of the table (module docstring); ``names``: the (baseline, other) column labels."""
    b, o = names
    base, other = per_seed(rows, pair.base, metric), per_seed(rows, pair.other, metric)
    d = paired_difference(base, other)
    score = header(spec_for(metric), f"test {spec_for(metric).display}")
    row = {("", "variants"): f"{pair.base.split('@', 1)[-1]} / {pair.other.split('@', 1)[-1]}",
           ("", f"params {b} / {o}"): " / ".join(fmt.number(_mean(rows, k, PARAMS), "int")
                                                for k in (pair.base, pair.other)),
           (score, b): _score(base, metric), (score, o): _score(other, metric),
           (score, f"{o} − {b} (paired)"): _difference(d, float(np.mean(list(base.values()))) if base else 0.0,
                                                        metric),
           (score, "seeds separate?"): _separates(d, str(pair.value), metric)}
    for dtype, m in EQ.items():
        for name, key in ((b, pair.base), (o, pair.other)):
            row[(EQ_GROUP, f"{dtype} {name}")] = value(spec_for(m), _mean(rows, key, m))
    for mode, m in TIME.items():
        tb, to = _mean(rows, pair.base, m), _mean(rows, pair.other, m)
        row[(TIME_LABELS[mode], b)], row[(TIME_LABELS[mode], o)] = fmt.time(tb), fmt.time(to)
        row[(TIME_LABELS[mode], f"{o} / {b}")] = _ratio(tb, to)
    return row


def _uniq(values: Any, kind: str = "") -> str:
    vals = sorted({v for v in values if not (isinstance(v, float) and np.isnan(v))}, key=str)
    return ", ".join(str(int(v)) if kind == "int" else str(v) for v in vals) or "?"


def measured_sentence(rows: pd.DataFrame, metric: str) -> str:
    """How every number of the table was measured, in one sentence read from ``rows``: device,
    training budget, seeds, the equivariance and the timing settings (the templates put
    "Measured with — " in front)."""
    ok = rows[rows["status"] == Status.OK]
    tp = ok[ok["metric"].isin(list(TIME.values()))]
    eq = ok[ok["metric"].isin(list(EQ.values()))]
    runs = ok.drop_duplicates("spec_hash") if "spec_hash" in ok else ok
    cfgs = [c for c in (train_config(v) for v in runs.get("train_config", [])) if c is not None]
    budget = _uniq(f"{c.epochs} epochs" if c.epochs else f"{c.steps} steps" for c in cfgs)
    col = lambda df, c: df[c] if c in df else pd.Series(dtype=object)  # noqa: E731
    return (f"{_uniq(col(ok, 'device_name'))}, {budget} of training at batch "
            f"{_uniq((c.batch_size for c in cfgs), 'int')} (lr {_uniq(f'{c.lr:g}' for c in cfgs)}), seeds "
            f"{_uniq(col(ok, 'seed'), 'int')}: test {spec_for(metric).display} as mean over seeds ± 95 % t-interval, "
            f"the difference paired seed by seed (mean ± t(0.975, n − 1) · s / √n, paired t-test p; the seeds "
            f"separate the two when the interval excludes 0); relative equivariance error of the trained models, mean "
            f"over {_uniq(col(eq, 'batch_size'), 'int')} test graphs × {_uniq(col(eq, 'repeats'), 'int')} group "
            f"samples and over seeds (fp64 = the structure, fp32 = as deployed); median time of one batch of "
            f"{_uniq(col(tp, 'batch_size'), 'int')} graphs in {_uniq(col(tp, 'dtype'))} over "
            f"{_uniq(col(tp, 'repeats'), 'int')} repeats at {_uniq(col(tp, 'threads'), 'int')} thread(s), measured on "
            f"seed {_uniq(col(tp, 'seed'), 'int')}.")


def variant_table(rows: pd.DataFrame, pairs: list[Pair], metric: str, baseline: Any) -> pd.DataFrame:
    """The pairs' rows under grouped headers, indexed by their labels."""
    alternatives = {str(p.value) for p in pairs}
    other = next(iter(alternatives)) if len(alternatives) == 1 else "other"
    names = (str(baseline), other)
    index = [p.label if len(alternatives) == 1 else f"{p.label}: {p.value}" for p in pairs]
    cells = [pair_row(rows, p, metric, names) for p in pairs]
    return pd.DataFrame([list(c.values()) for c in cells], index=index,
                        columns=pd.MultiIndex.from_tuples(list(cells[0])))


def _task_section(rows: pd.DataFrame, task: str, compare: dict[str, Any], resolved: list[dict[str, Any]],
                  cards: RunCards | None) -> Section | None:
    method, option, baseline = compare["method"], compare["option"], compare["baseline"]
    base, _ = split_sweeps(rows)
    ok = base[base["status"] == Status.OK]
    metric = task_metric(ok, cards)
    options = variant_options(ok, resolved, task)
    pairs = find_pairs(options, method, option, baseline)
    if metric is None or not pairs:
        return None
    used = {k for p in pairs for k in (p.base, p.other)}
    alone = sorted(k for k in options if method_of(k) == method and k not in used)
    rows_used = ok[ok["method"].isin(used)]
    others = ", ".join(dict.fromkeys(str(p.value) for p in pairs))
    table = variant_table(rows_used, pairs, metric, baseline)
    accuracy = [c for c in table.columns if c[0] not in COST_GROUPS]  # errors and times: a second table
    notes = [f"{k} ({option} {options[k].get(option)!r}) has no partner differing in {option} alone; not shown."
             for k in alone]
    return {"task": f"variants-{task}", "heading": f"Variant pairs on {task}: {method}, {option} {others} vs "
                                                   f"{baseline}",
            "context": measured_sentence(rows_used, metric), "table": table[accuracy],
            "more": [("variants", table[[c for c in table.columns if c not in accuracy]])],
            "index_label": ", ".join(varying_options(options, [k for k in options if method_of(k) == method],
                                                     option)) or "pair",
            "css": "variants", "figures": [], "tables": [], "notes": notes}


def variant_sections(df: pd.DataFrame, dirs: list[Path], cards: RunCards | None = None) -> list[Section]:
    """A section per task and per ``compare`` declaration of the runs' suite documents (none
    without one): the variant pairs of that task's base configuration (sweeps left out)."""
    if df.empty or "bench" not in df:
        return []
    resolved = read_resolved(dirs)
    out: list[Section] = []
    for compare, run_ids in compare_documents(dirs):
        runs = df[df["bench"] == TaskBench.kind]
        runs = runs[runs["run_id"].isin(run_ids)] if "run_id" in runs else runs
        for task, g in runs.groupby("task", sort=True):
            section = _task_section(g, str(task), compare, resolved, cards)
            if section:
                out.append(section)
    return out
