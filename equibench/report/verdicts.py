"""Verdicts a reviewer would accept: the ranked verdict table that opens each task's section and
the anomalies the banner above the page lists.

Per task (its base configuration, ``tables.split_sweeps``):

* **task metric**: the task's first metric (the ``val_metric`` its rows name, as ``test.<name>``),
  its better direction from the metric catalogue;
* **interval**: mean over seeds ± the half-width of the 95 % t-interval,
  ``t_{0.975, n-1} · s / sqrt(n)`` with ``s`` the standard deviation (ddof 1) of the ``n`` seeds'
  values; one seed gives no interval;
* **ties**: Welch's two-sided t-test (unequal variances) at the 5 % level between each method and
  the next-ranked one; a pair it cannot separate is tied and shares a rank ("=2"); a method with
  one seed is not tested;
* the task's **trivial predictor** (``trivial.<metric>`` rows, identical across the runs of a
  task) is a row of its own, and a method whose mean is not better is flagged;
* beside the score: the trained models' max relative equivariance error (fp64 and fp32, worst
  seed; methods claiming exactness are held to 1e-10 / 1e-4), inference throughput, the
  convergence flag and where each run's training settings came from (``setting_source``, lr).

``anomalies`` lists, for the banner: specs that failed (failed, out_of_memory, timeout), runs
that did not converge, exact methods over their limits and methods no better than their task's
trivial predictor, each with the anchor of the row that shows it.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ..core.registry import task_class
from ..metrics.catalogue import (
    MetricSpec,
    equivariance_metric,
    test_metric,
    throughput_metric,
    train_metric,
    trivial_metric,
)
from .common import fmt
from .common.metricinfo import ARROWS, header, spec_for, value
from .common.render import TableView, md_anchor, section_anchor, slug
from .common.tables import (
    diagnostic_columns,
    options_key,
    primary_metric,
    seed_table,
    split_sweeps,
    split_tuning,
    train_config,
)
from .sections import SCALING_TASK, TP_TASK

LEVEL = 0.95   # two-sided confidence level of the intervals
ALPHA = 0.05   # level of the Welch test that separates neighbours in the ranking
EXACT_LIMITS = {"fp64": 1e-10, "fp32": 1e-4}  # what the tests hold exact methods to
FAILED_STATUSES = ("failed", "out_of_memory", "timeout")
EQ_MAX = {dtype: equivariance_metric("trained", dtype, "rel_max") for dtype in ("fp64", "fp32")}
THROUGHPUT = throughput_metric("inference", "graphs_per_s")
GAIN = train_metric("val_improvement_last_fifth")
KINDS = ("failed", "not converged", "exact over limit", "not better than trivial")
SPECIAL_HEADINGS = {SCALING_TASK: "Scaling: cost vs size", TP_TASK: "Tensor-product microbenchmarks"}


# ---------------------------------------------------------------------------------------------
# statistics

def _finite(values: Sequence[float]) -> np.ndarray:
    v = np.asarray([float(x) for x in values if x is not None], dtype=float)
    return v[np.isfinite(v)]


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, int]:
    """(mean, half-width, n) of the finite ``values``: half-width ``t_{(1+level)/2, n-1} s / sqrt(n)``
    with ``s`` the sample standard deviation (ddof 1); NaN half-width with fewer than two values."""
    v = _finite(values)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    if len(v) == 1:
        return float(v[0]), float("nan"), 1
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return float(v.mean()), half, len(v)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) that ``a`` and ``b`` have equal
    means; NaN when either has fewer than two values. Two samples without any spread: 1 when
    their means are equal, else 0."""
    x, y = _finite(a), _finite(b)
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    if x.std(ddof=1) == 0 and y.std(ddof=1) == 0:
        return 1.0 if x.mean() == y.mean() else 0.0
    return float(stats.ttest_ind(x, y, equal_var=False).pvalue)


@dataclass
class Ranked:
    """One method's place: seed values, mean, interval half-width, rank (1-based; tied methods
    share the rank of the first of their run, 0 = not ranked), ``joint`` (tied with the method
    above), the Welch p-value against the next-ranked method and whether they are tied (None:
    not tested)."""
    method: str
    values: list[float]
    mean: float
    half: float
    n: int
    rank: int = 0
    joint: bool = False
    p_next: float = float("nan")
    tied_next: bool | None = None
    next_method: str | None = None


def rank_methods(values: Mapping[str, Sequence[float]], direction: str | None) -> list[Ranked]:
    """Methods best first by their mean over seeds in ``direction`` ("higher" / "lower"; None:
    alphabetical, not ranked); methods without a finite value last, unranked. Each method is
    tested against the next-ranked one (``welch_p`` at ``ALPHA``)."""
    items = [Ranked(str(m), list(_finite(v)), *t_interval(v)) for m, v in values.items()]
    sign = -1.0 if direction == "higher" else 1.0

    def key(r: Ranked) -> tuple[bool, float, str]:
        ok = bool(np.isfinite(r.mean))
        return (not ok, sign * r.mean if ok and direction else 0.0, r.method)
    items.sort(key=key)
    if direction is None:
        return items
    for i, r in enumerate(items):
        if not np.isfinite(r.mean):
            break
        nxt = items[i + 1] if i + 1 < len(items) else None
        if nxt is not None and np.isfinite(nxt.mean):
            r.next_method = nxt.method
            r.p_next = welch_p(r.values, nxt.values)
            r.tied_next = None if not np.isfinite(r.p_next) else bool(r.p_next >= ALPHA)
        prev = items[i - 1] if i else None
        r.joint = bool(prev is not None and prev.tied_next)
        r.rank = prev.rank if prev is not None and r.joint else i + 1
    return items


def better(a: float, b: float, direction: str | None) -> bool | None:
    """Whether ``a`` is strictly better than ``b`` (None without a direction or a value)."""
    if direction is None or fmt.missing(a) or fmt.missing(b):
        return None
    return bool(a > b) if direction == "higher" else bool(a < b)


# ---------------------------------------------------------------------------------------------
# facts of one task configuration

def task_metric(df: pd.DataFrame) -> str | None:
    """``test.<first metric>`` of the task: the ``val_metric`` its rows name; without one (rows
    written before learning curves) the test metric the most methods report."""
    present = set(df["metric"]) if "metric" in df else set()
    if "val_metric" in df:
        named = [test_metric(str(v)) for v in df["val_metric"].dropna()]
        named = [n for n in named if n in present]
        if named:
            return Counter(named).most_common(1)[0][0]
    agg, _ = seed_table(df)
    return primary_metric(agg) if len(agg) else None


def trivial_score(df: pd.DataFrame, metric: str | None) -> float | None:
    """Mean of the ``trivial.<stat>`` rows of the task metric (one per run, the same in each)."""
    stat = spec_for(metric).stat if metric else None
    if not stat or "metric" not in df:
        return None
    rows = df[(df["metric"] == trivial_metric(stat)) & (df["status"] == "ok")]["value"].dropna()
    return float(rows.mean()) if len(rows) else None


def trivial_doc(task: str) -> str:
    """The first sentence of the task's ``trivial_prediction`` docstring ("" when unknown)."""
    try:
        doc = task_class(task).trivial_prediction.__doc__ or ""
    except Exception:  # a plugin task not registered in this process
        return ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    return first.split(". ")[0].split(";")[0].rstrip(".:")


def degeneracy_diagnostics(names: Any) -> list[str]:
    """The method diagnostics among ``names`` that the verdict shows beside the equivariance
    error: those with a better direction (e.g. the share of nodes whose frame is degenerate, where
    exactness does not hold) and any whose catalogue entry is about degenerate inputs or frames."""
    out = []
    for m in diagnostic_columns(names):
        s = spec_for(m)
        if s.direction is not None or "degenera" in f"{s.name} {s.display}".lower():
            out.append(m)
    return out


@dataclass
class MethodFacts:
    """What the verdict and the banner say about one method of one task configuration."""
    method: str
    values: list[float] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    failed: list[tuple[Any, str]] = field(default_factory=list)   # (seed, status)
    convergence: dict[Any, str] = field(default_factory=dict)      # seed -> verdict
    gains: dict[Any, float] = field(default_factory=dict)          # seed -> val improvement, last fifth
    exact: bool = False
    equivariance: dict[str, float] = field(default_factory=dict)   # dtype -> max rel. error (worst seed)
    throughput: float = float("nan")
    diagnostics: dict[str, float] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    @property
    def not_converged(self) -> list[Any]:
        return sorted((s for s, c in self.convergence.items() if c == "not_converged"), key=str)

    @property
    def over_limit(self) -> list[str]:
        """"fp64 3e-08 > 1e-10"-style notes when the method claims exactness and is over a limit."""
        if not self.exact:
            return []
        return [f"{d} {fmt.number(v, 'sci')} > {EXACT_LIMITS[d]:.0e}" for d, v in self.equivariance.items()
                if not fmt.missing(v) and v > EXACT_LIMITS[d]]


@dataclass
class TaskFacts:
    """A task configuration's ranking and per-method facts."""
    task: str
    metric: str | None
    spec: MetricSpec | None
    trivial: float | None
    ranked: list[Ranked]
    methods: dict[str, MethodFacts]
    seeds: list[Any]

    def not_better_than_trivial(self, method: str) -> bool:
        r = next((r for r in self.ranked if r.method == method), None)
        if r is None or self.spec is None or self.trivial is None or not np.isfinite(r.mean):
            return False
        return better(r.mean, self.trivial, self.spec.direction) is False


def _first_per_run(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop_duplicates("spec_hash") if "spec_hash" in df and df["spec_hash"].notna().all() else \
        df.drop_duplicates(["method", "seed"])


def assess(task: str, df: pd.DataFrame) -> TaskFacts:
    """The facts of one task configuration's rows (every status; one options set)."""
    metric = task_metric(df[df["status"] == "ok"]) if len(df) else None
    spec = spec_for(metric) if metric else None
    ok = df[(df["status"] == "ok")]
    methods: dict[str, MethodFacts] = {}
    for _, run in _first_per_run(df).iterrows():
        if run["status"] not in (*FAILED_STATUSES, "ok"):
            continue  # not_applicable / skipped: listed with the runs without results, not judged
        m = methods.setdefault(str(run["method"]), MethodFacts(str(run["method"])))
        seed = run.get("seed")
        claim = run.get("exact_claim")
        m.exact = m.exact or (isinstance(claim, (bool, np.bool_)) and bool(claim))
        source = run.get("setting_source")
        if isinstance(source, str) and source and source not in m.sources:
            m.sources.append(source)
        cfg = train_config(run.get("train_config"))
        if cfg is not None and cfg.lr not in m.lrs:
            m.lrs.append(cfg.lr)
        if run["status"] in FAILED_STATUSES:
            m.failed.append((seed, str(run["status"])))
            continue
        m.seeds.append(seed)
        verdict = run.get("convergence")
        m.convergence[seed] = verdict if isinstance(verdict, str) and verdict else "unknown"
    diagnostics = degeneracy_diagnostics(ok["metric"].unique()) if len(ok) else []
    for method, g in ok.groupby("method"):
        m = methods.setdefault(str(method), MethodFacts(str(method)))
        if metric:
            m.values = list(g[g["metric"] == metric]["value"].dropna())
        for dtype, name in EQ_MAX.items():
            v = g[g["metric"] == name]["value"].dropna()
            if len(v):
                m.equivariance[dtype] = float(v.max())
        tp = g[g["metric"] == THROUGHPUT]["value"].dropna()
        m.throughput = float(tp.mean()) if len(tp) else float("nan")
        for name in diagnostics:
            v = g[g["metric"] == name]["value"].dropna()
            if len(v):
                how = spec_for(name).aggregate
                m.diagnostics[name] = float(v.iloc[0] if how == "first" else getattr(v, how)())
        gains = g[g["metric"] == GAIN]
        m.gains = {s: float(v) for s, v in zip(gains["seed"], gains["value"]) if not fmt.missing(v)}
    values = {name: f.values for name, f in methods.items() if f.values}
    ranked = rank_methods(values, spec.direction if spec else None)
    seeds = sorted(set(df["seed"].dropna()), key=str) if "seed" in df else []
    return TaskFacts(task, metric, spec, trivial_score(df, metric), ranked, methods, seeds)


# ---------------------------------------------------------------------------------------------
# the verdict table

def verdict_row_id(task: str, method: str) -> str:
    return f"verdict-{slug(task)}-{slug(method)}"


def status_row_id(spec_hash: Any, task: str = "", method: str = "", seed: Any = "") -> str:
    """Anchor of a run's row in the table of runs without results."""
    return f"run-{slug(str(spec_hash))}" if spec_hash else f"run-{slug(task)}-{slug(method)}-{seed}"


def _seeds_text(seeds: Sequence[Any]) -> str:
    return ", ".join(str(int(s)) if isinstance(s, (int, float)) and float(s).is_integer() else str(s)
                     for s in sorted(seeds, key=str))


def _score_cell(r: Ranked, spec: MetricSpec, n_total: int) -> str:
    cell = value(spec, r.mean)
    if r.n >= 2:
        cell += f" ± {r.half:.1e}" if spec.number_format == "sci" else f" ± {r.half:.2g}"
        if r.n < n_total:
            cell += f" ({r.n} of {n_total} seeds)"
    elif r.n == 1:
        cell += " (1 seed, no interval)"
    return cell


def _next_cell(r: Ranked) -> str:
    if not r.rank or r.next_method is None:
        return fmt.MISSING
    if r.tied_next is None:
        return "not tested (1 seed)"
    return f"{'tied' if r.tied_next else 'separated'} (p = {r.p_next:.2g})"


def _convergence_cell(m: MethodFacts) -> str:
    if not m.convergence:
        return fmt.MISSING
    parts = []
    bad = m.not_converged
    if bad:
        gains = [f"seed {_seeds_text([s])}: +{100 * m.gains[s]:.1f} %" if s in m.gains else f"seed {_seeds_text([s])}"
                 for s in bad]
        parts.append(f"⚠ not converged ({'; '.join(gains)})")
    good = [s for s, c in m.convergence.items() if c == "converged"]
    unknown = [s for s, c in m.convergence.items() if c not in ("converged", "not_converged")]
    if good:
        parts.append("converged" + (f" (seed {_seeds_text(good)})" if bad or unknown else ""))
    if unknown:
        parts.append("unknown" + (f" (seed {_seeds_text(unknown)})" if bad or good else ""))
    return "; ".join(parts)


def _settings_cell(m: MethodFacts) -> str:
    source = " / ".join(m.sources) or "?"
    lr = ", ".join(f"{v:g}" for v in m.lrs)
    return f"{source} · lr {lr}" if lr else source


def _eq_cell(m: MethodFacts, dtype: str) -> str:
    v = m.equivariance.get(dtype)
    cell = fmt.number(v, "sci")
    if m.exact and not fmt.missing(v) and v is not None and v > EXACT_LIMITS[dtype]:
        cell += f" ⚠ > {EXACT_LIMITS[dtype]:.0e}"
    return cell


def _diag_header(diag: Sequence[str]) -> str:
    if len(diag) == 1:
        return header(spec_for(diag[0]))
    return "diagnostics"


def _diag_cell(m: MethodFacts, diag: Sequence[str]) -> str:
    if len(diag) == 1:
        return value(spec_for(diag[0]), m.diagnostics.get(diag[0]))
    parts = [f"{spec_for(d).display} {value(spec_for(d), m.diagnostics[d])}" for d in diag if d in m.diagnostics]
    return "; ".join(parts) or fmt.MISSING


NOT_RANKED_NOTE = ("Not a verdict: this run is not meant for verdicts (too few seeds or too small a budget); rows "
                   "are sorted by score and no ranks or groups are given.")


def verdict_caption(facts: TaskFacts, ctx: Mapping[str, str], ranked: bool = True) -> str:
    spec = facts.spec
    if spec is None:
        return ""
    word = {"higher": "higher is better", "lower": "lower is better"}.get(spec.direction or "", "no better direction")
    seeds = _seeds_text(facts.seeds)
    trivial = trivial_doc(facts.task)
    diag = sorted({d for m in facts.methods.values() for d in m.diagnostics})
    parts = [
        f"Verdict for {facts.task}: methods ranked by test {spec.display}{' [' + spec.unit + ']' if spec.unit else ''} "
        f"({word}; the task's first metric, direction from the metric catalogue), mean over seeds {seeds} "
        f"± the half-width of the 95 % t-interval (t(0.975, n−1) · s / √n, s = standard deviation over the n "
        "seeds); one seed gives no interval.",
        "Ties: Welch's two-sided t-test (unequal variances) at the 5 % level between each method and the "
        "next-ranked one ('vs next-ranked'); a pair it cannot separate is tied and shares a rank ('=2'); a "
        "method with one seed is not tested.",
        "Trivial predictor (italic row" + (f": {trivial[0].lower() + trivial[1:]}" if trivial else "")
        + "), scored on the same test split; ⚠ marks a method whose mean is not better.",
        "Equivariance: max relative error ||f(g·X) − ρ(g) f(X)|| / ||f(X)|| of the trained model over "
        f"{ctx.get('equivariance', 'the test graphs and group samples')}, worst seed; fp64 = the model rebuilt "
        "in float64, fp32 = as deployed; '(exact)' = the method claims exact equivariance here and is held to "
        "1e-10 (fp64) / 1e-4 (fp32), ⚠ when over.",
        *(["Diagnostics (mean over seeds): " + "; ".join(f"{spec_for(d).display}: {spec_for(d).description}"
                                                         for d in diag) + "."] if diag else []),
        f"Speed: inference throughput ({ctx.get('throughput', 'fp32')}), mean over seeds.",
        "Convergence: ⚠ not converged = the best validation value still improved by more than the tolerance over "
        "the last fifth of the training budget (+x % = that improvement).",
        "Settings: where the run's training settings came from (suite file, tuning run or stored tuned settings) "
        "and its learning rate.",
    ]
    if not ranked:
        parts = [NOT_RANKED_NOTE] + [p for p in parts if not p.startswith("Ties:")]
    return " ".join(parts)


def verdict_table(facts: TaskFacts, ctx: Mapping[str, str] | None = None, *, ranked: bool = True) -> TableView | None:
    """The verdict table of one task configuration (None without a ranked task metric). With
    ``ranked=False`` (smoke runs) the rows are still sorted by score but the table has no rank or
    group column and the caption says the run is not meant for verdicts."""
    spec, metric = facts.spec, facts.metric
    if spec is None or metric is None or not facts.methods:
        return None
    n_total = len(facts.seeds)
    diag = sorted({d for m in facts.methods.values() for d in m.diagnostics})
    score_header = f"{header(spec, 'test ' + spec.display)} mean ± 95 % CI"
    columns: list[tuple[str, str]] = [("", "rank"), ("", "method"), ("accuracy", score_header),
                                      ("accuracy", "vs next-ranked"),
                                      ("equivariance", f"fp64 max rel. err {ARROWS['lower']}"),
                                      ("equivariance", f"fp32 max rel. err {ARROWS['lower']}"),
                                      *([("equivariance", _diag_header(diag))] if diag else []),
                                      ("speed", header(spec_for(THROUGHPUT), "inference")),
                                      ("training", "convergence"), ("training", "settings")]
    rows: list[list[str]] = []
    ids: list[str] = []
    css: list[str] = []

    def method_row(r: Ranked | None, m: MethodFacts) -> None:
        flags = []
        if r is not None and r.n:
            score = _score_cell(r, spec, n_total)
            if facts.not_better_than_trivial(m.method):
                score += " ⚠ not better than trivial"
                flags.append("trivial")
            rank = (f"={r.rank}" if r.joint else str(r.rank)) if r.rank else fmt.MISSING
            nxt = _next_cell(r) if r.rank else fmt.MISSING
        else:
            rank, nxt = fmt.MISSING, fmt.MISSING
            score = fmt.MISSING
        if m.failed:
            statuses = ", ".join(sorted({s for _, s in m.failed}))
            note = f"{statuses}: seed {_seeds_text([s for s, _ in m.failed])}"
            score = f"no result ({note})" if score == fmt.MISSING else f"{score}; {note}"
            flags.append("failed")
        if m.not_converged:
            flags.append("not converged")
        if m.over_limit:
            flags.append("exact over limit")
        cells = [rank, m.method + (" (exact)" if m.exact else ""), score, nxt, _eq_cell(m, "fp64"), _eq_cell(m, "fp32"),
                 *([_diag_cell(m, diag)] if diag else []),
                 value(spec_for(THROUGHPUT), m.throughput), _convergence_cell(m), _settings_cell(m)]
        rows.append(cells)
        ids.append(verdict_row_id(facts.task, m.method))
        css.append("failed" if (m.failed and not m.seeds) else "flagged" if flags else "")

    trivial_done = facts.trivial is None
    listed = set()
    for r in facts.ranked:
        if not trivial_done and np.isfinite(r.mean) and better(r.mean, facts.trivial or 0.0, spec.direction) is False:
            rows.append(_trivial_row(facts, spec, len(columns)))
            ids.append(f"verdict-{slug(facts.task)}-trivial")
            css.append("trivial")
            trivial_done = True
        method_row(r, facts.methods[r.method])
        listed.add(r.method)
    if not trivial_done:
        rows.append(_trivial_row(facts, spec, len(columns)))
        ids.append(f"verdict-{slug(facts.task)}-trivial")
        css.append("trivial")
    for name in sorted(set(facts.methods) - listed):
        method_row(None, facts.methods[name])
    if not ranked:
        drop = [i for i, c in enumerate(columns) if c in (("", "rank"), ("accuracy", "vs next-ranked"))]
        columns = [c for i, c in enumerate(columns) if i not in drop]
        rows = [[c for i, c in enumerate(row) if i not in drop] for row in rows]
    frame = pd.DataFrame(rows, columns=pd.MultiIndex.from_tuples(columns))
    return TableView.from_frame(frame, css="verdict", caption=verdict_caption(facts, ctx or {}, ranked), row_ids=ids,
                                row_css=css)


def _trivial_row(facts: TaskFacts, spec: MetricSpec, n_columns: int) -> list[str]:
    row = [fmt.MISSING] * n_columns
    row[1] = "trivial predictor"
    row[2] = f"{value(spec, facts.trivial)} (no training, same for every seed)"
    return row


# ---------------------------------------------------------------------------------------------
# anomalies for the banner

@dataclass(frozen=True)
class Anomaly:
    """One banner entry: ``kind`` (one of ``KINDS``), task, method, the sentence, the HTML
    anchor of the row (or section) that shows it and the Markdown heading anchor."""
    kind: str
    task: str
    method: str
    text: str
    anchor: str
    md_anchor: str = ""


def _configs(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame, bool]]:
    """(label, rows, is base) per task-options set of one task; the base configuration first."""
    base, _ = split_sweeps(df)
    out = [("", base, True)]
    if "task_options" not in df:
        return out
    base_opts = base["task_options"].dropna().iloc[0] if base["task_options"].notna().any() else {}
    base_key = options_key(base_opts)
    keys = df["task_options"].map(options_key)
    for key in sorted(set(keys) - {base_key}):
        opts = json.loads(key)
        diff = {k: v for k, v in opts.items() if (base_opts or {}).get(k) != v}
        label = ", ".join(f"{k} = {v}" for k, v in sorted(diff.items())) or key
        out.append((label, df[keys == key], False))
    return out


def _failed_anomalies(df: pd.DataFrame, special_tasks: Sequence[str]) -> list[Anomaly]:
    bad = df[df["status"].isin(FAILED_STATUSES)]
    out = []
    special = bad["task"].isin(list(special_tasks))
    for _, r in _first_per_run(bad[~special]).iterrows():
        error = str(r.get("error") or "").strip().splitlines()
        why = f": {error[-1][:160]}" if error else ""
        signal = r.get("exit_signal")
        sig = f" (signal {signal})" if isinstance(signal, str) and signal else ""
        setting = r.get("setting")
        tuning = (" (tuning run: " + ", ".join(f"{k} {v}" for k, v in sorted(setting.items())) + ")"
                  if isinstance(setting, dict) else "")
        out.append(Anomaly("failed", str(r["task"]), str(r["method"]),
                           f"{r['task']} / {r['method']} seed {_seeds_text([r['seed']])}{tuning}: {r['status']}{sig}"
                           f"{why}",
                           status_row_id(r.get("spec_hash"), str(r["task"]), str(r["method"]), r.get("seed")),
                           "runs-that-did-not-produce-results"))
    for (task, method, status), g in bad[special].groupby(["task", "method", "status"]):
        where = ""
        if "x" in g and g["x"].notna().any():
            label = g["x_label"].dropna().iloc[0] if "x_label" in g and g["x_label"].notna().any() else "x"
            where = f" at {label} = " + ", ".join(f"{x:g}" for x in sorted(set(g["x"].dropna())))
        heading = SPECIAL_HEADINGS.get(str(task), str(task))
        out.append(Anomaly("failed", str(task), str(method), f"{task} / {method}: {status}{where}",
                           section_anchor(heading), md_anchor(heading)))
    return out


def task_anomalies(task: str, df: pd.DataFrame) -> list[Anomaly]:
    """Unconverged runs, exact methods over their limits and methods no better than the trivial
    predictor in every configuration of ``task`` (its base configuration links to the verdict
    row; sweep variants to the section)."""
    out = []
    md = md_anchor(f"Task: {task}")
    for label, rows, is_base in _configs(df):
        facts = assess(task, rows)
        where = f" [{label}]" if label else ""
        for name, m in sorted(facts.methods.items()):
            anchor = verdict_row_id(task, name) if is_base else section_anchor(task)
            if m.not_converged:
                gains = [f"+{100 * m.gains[s]:.1f} %" for s in m.not_converged if s in m.gains]
                extra = f" (best validation value still improving: {', '.join(gains)} over the last fifth)" if gains \
                    else ""
                out.append(Anomaly("not converged", task, name, f"{task} / {name}{where}: not converged in seed "
                                   f"{_seeds_text(m.not_converged)}{extra}", anchor, md))
            if m.over_limit:
                out.append(Anomaly("exact over limit", task, name, f"{task} / {name}{where} claims exact equivariance "
                                   f"but measures {'; '.join(m.over_limit)} (trained, max rel. error)", anchor, md))
            if facts.not_better_than_trivial(name) and facts.spec is not None:
                r = next(r for r in facts.ranked if r.method == name)
                out.append(Anomaly("not better than trivial", task, name,
                                   f"{task} / {name}{where}: test {facts.spec.display} {value(facts.spec, r.mean)} "
                                   f"is not better than the trivial predictor's {value(facts.spec, facts.trivial)}",
                                   anchor, md))
    return out


def anomalies(df: pd.DataFrame, special_tasks: Sequence[str] = ()) -> list[Anomaly]:
    """Every anomaly of the rows ``df`` (any tasks), failed specs first, then per kind and task."""
    if df.empty or "status" not in df:
        return []
    out = _failed_anomalies(df, special_tasks)  # failed tuning runs included
    measured, _ = split_tuning(df)
    for task, g in measured[~measured["task"].isin(list(special_tasks))].groupby("task", sort=True):
        out += task_anomalies(str(task), g)
    return sorted(out, key=lambda a: (KINDS.index(a.kind) if a.kind in KINDS else len(KINDS), a.task, a.method))
