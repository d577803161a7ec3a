"""Verdicts a reviewer would accept: the ranked verdict table that opens each task's section and
the anomalies the banner above the page lists.

Per task (its base configuration, ``tables.split_sweeps``):

* **task metric**: the task's primary metric, its first (from the task's card:
  ``RunCards.primary``; for a run stored before cards, the ``val_metric`` its rows name, as
  ``test.<name>``: ``results.runcards``), its better direction from the metric catalogue (or the
  spec the run stored);
* **interval**: mean over seeds ± the half-width of the 95 % t-interval,
  ``t_{0.975, n-1} · s / sqrt(n)`` with ``s`` the standard deviation (ddof 1) of the ``n`` seeds'
  values; one seed gives no interval;
* **groups** (``rank_methods``): the best method against every other by a two-sided t-test with
  the within-method variance pooled over the table (one-way ANOVA's error, as Hsu's comparisons
  with the best), Holm-corrected over the table's methods at a family-wise 5 %; group 1 = not distinguishable
  from the best; the rest grouped the same way around their own best. No neighbour comparisons,
  so ties cannot chain. A method with one seed is not tested;
* the task's **trivial predictor** (``trivial.<metric>`` rows) and its **floors** (``floor.<metric>``
  rows, the ``floor`` column naming each: ``Task.floors``) are rows of their own, one value per
  seed (fitted on that seed's training split); per method, whether it beats the strongest of them
  separated by the seeds (one-sided Welch, Holm-corrected over the methods; ``judge_floors``);
* beside the score: the trained models' max relative equivariance error (fp64 and fp32, worst
  seed; methods claiming exactness are held to 1e-10 / 1e-4), inference throughput, the
  convergence flag with the kind of budget (``budget``: fixed or until a validation plateau;
  ``cap_reached`` counts as not converged) and where each run's training settings came from
  (``setting_source``, lr, and ``tuning_edge`` when the tuned choice sits at its grid's edge).

``anomalies`` lists, for the banner: specs that failed (failed, out_of_memory, timeout), runs
that did not converge (or reached their cap before a plateau), tuned settings left at a grid edge
after the extensions, exact methods over their limits and methods no better than their task's
trivial predictor or (by mean) its strongest floor, each with the anchor of the row that shows it.
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

from ..benches.taskrun import TaskBench
from ..metrics.catalogue import (
    MetricSpec,
    equivariance_metric,
    floor_metric,
    symmetric_metric,
    throughput_metric,
    train_metric,
    trivial_metric,
)
from ..results.cards import TaskCard
from ..results.runcards import RunCards, cards_for
from ..results.status import FAILURES, Status
from ..results.store import upgrade_frame
from .common import fmt
from .common.metricinfo import ARROWS, header, spec_for, value
from .common.render import TableView, md_anchor, section_anchor, slug
from .common.tables import (
    UNSTABLE_MARK,
    UNSTABLE_NOTE,
    diagnostic_columns,
    options_key,
    split_sweeps,
    train_config,
)
from .sections import SCALING, SPECIAL_BENCHES, TP_BENCH

LEVEL = 0.95   # two-sided confidence level of the intervals
ALPHA = 0.05   # family-wise level of the Holm-corrected tests against the best (groups) and floors
EXACT_LIMITS = {"fp64": 1e-10, "fp32": 1e-4}  # what the tests hold exact methods to
EQ_MAX = {dtype: equivariance_metric("trained", dtype, "rel_max") for dtype in ("fp64", "fp32")}
SYMMETRIC_MAX = symmetric_metric("trained", "rel_max")  # fp64, per exactly symmetric input (symmetric_input)
EVERY_INPUT, GENERIC_INPUTS = "every_input", "generic_inputs"  # row column exact_scope (methods.base)
THROUGHPUT = throughput_metric("inference", "graphs_per_s")
GAIN = train_metric("val_improvement")  # over the window the convergence verdict judges
OLD_GAIN = train_metric("val_improvement_last_fifth")  # runs before issue 18's convergence rule
NOT_CONVERGED = ("not_converged", "cap_reached")  # convergence verdicts the banner flags
FAILED = Status.FAILED.value  # the banner's kind for points that did not finish (any failure status)
KINDS = (FAILED, "not converged", "tuning at grid edge", "exact over limit", "not better than trivial",
         "not better than a floor")
GROUP_COLUMN = ("", "group")
VS_BEST_COLUMN = ("accuracy", "vs best (pooled t, Holm)")
SPECIAL_HEADINGS = {SCALING: "Scaling: cost vs size", TP_BENCH: "Tensor-product microbenchmarks"}


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


def _constant(v: np.ndarray) -> bool:
    """No spread beyond rounding (identical seeds, e.g. a floor that does not depend on the seed)."""
    return bool(v.std(ddof=1) <= 1e-12 * max(1.0, float(np.abs(v).max())))


def _welch(x: np.ndarray, y: np.ndarray, alternative: str) -> float:
    """Welch's t-test p-value of mean(x) vs mean(y) (``alternative`` as scipy's: "two-sided",
    "less" = mean(x) < mean(y), "greater"); a sample without spread is a constant, and Welch's
    statistic then is the one-sample t-test of the other against it; two constants: 0 when the
    alternative holds, else 1 (two-sided: 1 when equal)."""
    cx, cy = _constant(x), _constant(y)
    if cx and cy:
        d = float(x.mean() - y.mean())
        holds = {"two-sided": d != 0, "less": d < 0, "greater": d > 0}[alternative]
        return 0.0 if holds else 1.0
    if cy:
        return float(stats.ttest_1samp(x, float(y.mean()), alternative=alternative).pvalue)
    if cx:
        flipped = {"two-sided": "two-sided", "less": "greater", "greater": "less"}[alternative]
        return float(stats.ttest_1samp(y, float(x.mean()), alternative=flipped).pvalue)
    return float(stats.ttest_ind(x, y, equal_var=False, alternative=alternative).pvalue)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) that ``a`` and ``b`` have equal
    means; NaN when either has fewer than two values. Two samples without any spread: 1 when
    their means are equal, else 0."""
    x, y = _finite(a), _finite(b)
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    return _welch(x, y, "two-sided")


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values of a family of tests (NaN entries are not tests and stay
    NaN; the family size ``m`` counts the finite ones). With the finite p-values sorted,
    ``p_(1) <= ... <= p_(m)``: ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``. Rejecting
    where ``adj < alpha`` controls the family-wise error rate at ``alpha`` under any dependence."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    running = 0.0
    for j, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (m - j) * float(p[i])))
        out[i] = running
    return [float(v) for v in out]


def one_sided_p(a: Sequence[float], b: Sequence[float], direction: str) -> float:
    """One-sided Welch p-value that ``a`` has the better mean than ``b`` ("lower": mean(a) <
    mean(b); "higher": greater); NaN when either has fewer than two values; without any spread in
    either sample 0 when ``a`` is strictly better, else 1."""
    x, y = _finite(a), _finite(b)
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    return _welch(x, y, "less" if direction == "lower" else "greater")


@dataclass
class Ranked:
    """One method's place: seed values, mean, interval half-width, ``rank`` (its position, 1-based;
    0 = not ranked), ``group`` (1 = not distinguishable from the best; 0 = not grouped: fewer than
    two seeds or no finite value), ``leader`` (the best method of its group), ``p_raw`` / ``p_holm``
    (the pooled-variance t-test's two-sided p-value against the leader and its Holm-adjusted value; NaN for the leader
    and untested methods), ``p_best`` (the Holm-adjusted p-value against the best method)."""
    method: str
    values: list[float]
    mean: float
    half: float
    n: int
    rank: int = 0
    group: int = 0
    leader: str | None = None
    p_raw: float = float("nan")
    p_holm: float = float("nan")
    p_best: float = float("nan")

    @property
    def is_leader(self) -> bool:
        return self.group > 0 and self.leader == self.method


def pooled_variance(samples: Sequence[np.ndarray]) -> tuple[float, int]:
    """(s², df): the within-method variance pooled over ``samples`` (one-way ANOVA's mean square
    error), ``s² = Σ_i (n_i − 1) s_i² / Σ_i (n_i − 1)`` with ``df = Σ_i (n_i − 1)``; samples with
    fewer than two values add nothing."""
    used = [v for v in samples if len(v) >= 2]
    df = int(sum(len(v) - 1 for v in used))
    if df == 0:
        return float("nan"), 0
    return float(sum((len(v) - 1) * v.var(ddof=1) for v in used) / df), df


def pooled_p(a: Sequence[float], b: Sequence[float], s2: float, df: int) -> float:
    """Two-sided p-value that ``a`` and ``b`` have equal means, with the pooled variance ``s2`` on
    ``df`` degrees of freedom: ``t = (ā − b̄) / (s √(1/n_a + 1/n_b))``, ``p = 2 P(T_df > |t|)``.
    Without any spread (``s2 = 0``): 0 when the means differ, else 1; NaN when either sample has
    fewer than two values or ``df = 0``."""
    x, y = _finite(a), _finite(b)
    if len(x) < 2 or len(y) < 2 or not df or not np.isfinite(s2):
        return float("nan")
    d = float(x.mean() - y.mean())
    se = float(np.sqrt(s2 * (1 / len(x) + 1 / len(y))))
    if se <= 1e-12 * max(1.0, abs(float(x.mean())), abs(float(y.mean()))):
        return 0.0 if d != 0 else 1.0
    return float(2 * stats.t.sf(abs(d) / se, df))


def rank_methods(values: Mapping[str, Sequence[float]], direction: str | None,
                 alpha: float = ALPHA) -> list[Ranked]:
    """Methods best first by their mean over seeds in ``direction`` ("higher" / "lower"; None:
    alphabetical, not ranked); methods without a finite value last, unranked.

    Groups (comparisons with the best, a procedure that cannot chain; Hsu's multiple comparisons
    with the best use the same pooled error): among the methods with at least two seeds, the best
    one leads group 1; every other is compared with it by a two-sided t-test whose variance is the
    within-method variance pooled over all tested methods of the table (``pooled_variance``: one-way
    ANOVA's mean square error, ``Σ(n_i − 1)`` degrees of freedom, 6 with three methods of three
    seeds where one pair's Welch test has about 2), and the family of those tests is corrected by
    Holm's step-down method (``holm``) at ``alpha``; the methods not rejected join group 1 ("not
    distinguishable from the best"). The remaining methods form group 2 the same way around their
    best, and so on. Every member of a group is compared with its leader, never with a neighbour,
    so a chain of small steps cannot tie the first to the last. The pooled variance assumes the
    methods' seed spreads are alike; a method much noisier than the rest is compared with less
    spread than its own (the caption says so)."""
    items = [Ranked(str(m), list(_finite(v)), *t_interval(v)) for m, v in values.items()]
    sign = -1.0 if direction == "higher" else 1.0

    def key(r: Ranked) -> tuple[bool, float, str]:
        ok = bool(np.isfinite(r.mean))
        return (not ok, sign * r.mean if ok and direction else 0.0, r.method)
    items.sort(key=key)
    if direction is None:
        return items
    for i, r in enumerate(items):
        r.rank = i + 1 if np.isfinite(r.mean) else 0
    pending = [r for r in items if r.rank and r.n >= 2]
    s2, df = pooled_variance([np.asarray(r.values) for r in pending])
    group = 0
    while pending:
        group += 1
        lead, rest = pending[0], pending[1:]
        lead.group, lead.leader = group, lead.method
        raw = [pooled_p(lead.values, r.values, s2, df) for r in rest]
        adjusted = holm(raw)
        left = []
        for r, p, adj in zip(rest, raw, adjusted):
            r.p_raw, r.p_holm = p, adj
            if group == 1:
                r.p_best = adj
            if adj >= alpha:
                r.group, r.leader = group, lead.method
            else:
                left.append(r)
        pending = left
    return items


def resolvable_difference(ranked: Sequence[Ranked], alpha: float = ALPHA) -> tuple[float, float] | None:
    """The smallest difference from the best method's mean that the grouping can resolve, as a
    fraction of the best mean's magnitude: with the pooled seed standard deviation ``s`` on ``df``
    degrees of freedom (``pooled_variance``) and the median seed count ``n``, two methods are
    separated when ``|d| >= t_{1 - a/2, df} · s · sqrt(2 / n)``. Returned for Holm's strictest
    step (``a = alpha / m``, ``m`` the tests against the best) and its most lenient one
    (``a = alpha``); None with fewer than two tested methods or a zero best mean."""
    tested = [r for r in ranked if r.rank and r.n >= 2]
    if len(tested) < 2 or not tested[0].mean:
        return None
    s2, df = pooled_variance([np.asarray(r.values) for r in tested])
    if not df or not np.isfinite(s2):
        return None
    n = int(np.median([r.n for r in tested]))
    m = len(tested) - 1

    def d(a: float) -> float:
        return float(stats.t.ppf(1 - a / 2, df) * np.sqrt(s2) * np.sqrt(2 / n) / abs(tested[0].mean))
    return d(alpha / m), d(alpha)


def better(a: float, b: float, direction: str | None) -> bool | None:
    """Whether ``a`` is strictly better than ``b`` (None without a direction or a value)."""
    if direction is None or fmt.missing(a) or fmt.missing(b):
        return None
    return bool(a > b) if direction == "higher" else bool(a < b)


# ---------------------------------------------------------------------------------------------
# facts of one task configuration

def task_metric(df: pd.DataFrame, cards: RunCards | None = None) -> str | None:
    """The primary metric (``test.<first metric>``) of the task of ``df``'s rows, as its card says
    (``RunCards.primary``, for the task options most of the rows ran with), when the rows report
    it; ``cards`` None: the cards the rows alone give (``runcards.cards_for``)."""
    if df.empty or "task" not in df or "metric" not in df or df["task"].isna().all():
        return None
    cards = cards if cards is not None else cards_for((), df)
    task = Counter(df["task"].dropna()).most_common(1)[0][0]
    rows = df[df["task"] == task]
    options = (Counter(rows["task_options"].map(options_key)).most_common(1)[0][0]
               if "task_options" in rows else None)
    primary = cards.primary(str(task), options)
    return primary if primary in set(rows["metric"]) else None


def trivial_score(df: pd.DataFrame, metric: str | None) -> float | None:
    """Mean of the ``trivial.<stat>`` rows of the task metric (one per run, the same in each)."""
    stat = spec_for(metric).stat if metric else None
    if not stat or "metric" not in df:
        return None
    rows = df[(df["metric"] == trivial_metric(stat)) & (df["status"] == Status.OK)]["value"].dropna()
    return float(rows.mean()) if len(rows) else None


def _per_seed(rows: pd.DataFrame) -> list[float]:
    """One value per seed (the mean of that seed's rows: every run of a seed scores the same)."""
    if "seed" not in rows or rows["seed"].isna().all():
        return [float(v) for v in rows["value"].dropna()]
    return [float(v) for v in rows.groupby("seed")["value"].mean().dropna()]


def trivial_values(df: pd.DataFrame, metric: str | None) -> list[float]:
    """Per-seed values of the trivial predictor on the task metric (its training split is the seed's)."""
    stat = spec_for(metric).stat if metric else None
    if not stat or "metric" not in df:
        return []
    return _per_seed(df[(df["metric"] == trivial_metric(stat)) & (df["status"] == Status.OK)])


def floor_values(df: pd.DataFrame, metric: str | None) -> dict[str, list[float]]:
    """Per floor (the ``floor`` column of the ``floor.<stat>`` rows of the task metric), its
    per-seed values on the test split."""
    stat = spec_for(metric).stat if metric else None
    if not stat or "metric" not in df or "floor" not in df:
        return {}
    rows = df[(df["metric"] == floor_metric(stat)) & (df["status"] == Status.OK)]
    return {str(name): _per_seed(g) for name, g in rows.groupby("floor", sort=True)}


def degeneracy_diagnostics(names: Any, roles: Mapping[str, str] | None = None) -> list[str]:
    """The method diagnostics among ``names`` (role ``diagnostic`` in ``roles``, the task card's)
    that the verdict shows beside the equivariance error: those with a better direction (e.g. the
    share of nodes whose frame is degenerate, where exactness does not hold) and any whose
    catalogue entry is about degenerate inputs or frames."""
    out = []
    for m in diagnostic_columns(names, roles):
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
    budgets: list[str] = field(default_factory=list)               # "fixed" / "converge" (row column budget)
    edges: list[str] = field(default_factory=list)                 # tuning_edge notes (choice at a grid edge)
    scope: str | None = None        # where the exactness claim holds (row column exact_scope)
    symmetric: float | None = None  # max fp64 rel. error over the symmetric inputs and seeds (inf: non-finite)
    float32_caveat: str = ""        # the method's known float32 limit (row column float32_caveat)

    @property
    def not_converged(self) -> list[Any]:
        """Seeds whose run did not converge: ``not_converged`` (fixed budget still improving at half
        the peak learning rate) or ``cap_reached`` (convergence-driven budget capped before a plateau)."""
        return sorted((s for s, c in self.convergence.items() if c in NOT_CONVERGED), key=str)

    @property
    def cap_reached(self) -> list[Any]:
        return sorted((s for s, c in self.convergence.items() if c == "cap_reached"), key=str)

    @property
    def over_limit(self) -> list[str]:
        """"fp64 3e-08 > 1e-10"-style notes when the method claims exactness and is over a limit."""
        if not self.exact:
            return []
        notes = [f"{d} {fmt.number(v, 'sci')} > {EXACT_LIMITS[d]:.0e}"
                 + (f" (known float32 limit: {self.float32_caveat})" if d == "fp32" and self.float32_caveat else "")
                 for d, v in self.equivariance.items() if not fmt.missing(v) and v > EXACT_LIMITS[d]]
        if self.scope != GENERIC_INPUTS and self.symmetric is not None and not self.symmetric <= EXACT_LIMITS["fp64"]:
            # declared exact on every input: its symmetric inputs are held to the limit too
            notes.append(f"fp64 on symmetric inputs {_symmetric_text(self.symmetric)} > {EXACT_LIMITS['fp64']:.0e}")
        return notes

    @property
    def exact_everywhere_measured(self) -> bool:
        """Claims exactness and is under 1e-10 (fp64) on the test graphs and on every symmetric
        input measured (False when the symmetric inputs were not measured)."""
        v = self.equivariance.get("fp64")
        return (self.exact and self.symmetric is not None and self.symmetric <= EXACT_LIMITS["fp64"]
                and not (v is not None and not fmt.missing(v) and v > EXACT_LIMITS["fp64"]))


def _symmetric_text(v: float) -> str:
    return "non-finite" if not np.isfinite(v) else fmt.number(v, "sci")


@dataclass
class FloorVerdict:
    """Whether a method beats the strongest floor: the floor's name, the one-sided p-value
    (``beats_p``) and its Holm-adjusted value over the table's methods; ``beats`` is True when the
    adjusted value is under ``ALPHA``, False when the method's mean is not better, None when it
    is better but not separated by the seeds or could not be tested."""
    floor: str
    p: float
    p_holm: float
    beats: bool | None


@dataclass
class TaskFacts:
    """A task configuration's ranking and per-method facts; ``floors``: per floor its per-seed
    values (the trivial predictor among them as "trivial predictor"), ``strongest``: the floor with
    the best mean, ``vs_floor``: per ranked method its ``FloorVerdict``; ``card``: the task's card
    (what its trivial predictor and floors are, what a seed draws)."""
    task: str
    metric: str | None
    spec: MetricSpec | None
    trivial: float | None
    ranked: list[Ranked]
    methods: dict[str, MethodFacts]
    seeds: list[Any]
    floors: dict[str, list[float]] = field(default_factory=dict)
    strongest: str | None = None
    vs_floor: dict[str, FloorVerdict] = field(default_factory=dict)
    card: TaskCard | None = None

    def floor_mean(self, name: str) -> float:
        v = _finite(self.floors.get(name, []))
        return float(v.mean()) if len(v) else float("nan")

    def not_better_than_trivial(self, method: str) -> bool:
        r = next((r for r in self.ranked if r.method == method), None)
        if r is None or self.spec is None or self.trivial is None or not np.isfinite(r.mean):
            return False
        return better(r.mean, self.trivial, self.spec.direction) is False


def _first_per_run(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop_duplicates("spec_hash") if "spec_hash" in df and df["spec_hash"].notna().all() else \
        df.drop_duplicates(["method", "seed"])


def assess(task: str, df: pd.DataFrame, cards: RunCards | None = None) -> TaskFacts:
    """The facts of one task configuration's rows (every status; one options set), with the
    run's ``cards`` (None: the cards the rows alone give, ``runcards.cards_for``)."""
    cards = cards if cards is not None else cards_for((), df)
    metric = task_metric(df[df["status"] == Status.OK], cards) if len(df) else None
    spec = spec_for(metric) if metric else None
    ok = df[(df["status"] == Status.OK)]
    methods: dict[str, MethodFacts] = {}
    for _, run in _first_per_run(df).iterrows():
        if run["status"] not in (*FAILURES, Status.OK):
            continue  # not_applicable / skipped: listed with the runs without results, not judged
        m = methods.setdefault(str(run["method"]), MethodFacts(str(run["method"])))
        seed = run.get("seed")
        claim = run.get("exact_claim")
        m.exact = m.exact or (isinstance(claim, (bool, np.bool_)) and bool(claim))
        scope = run.get("exact_scope")
        if isinstance(scope, str) and scope:
            m.scope = scope
        caveat = run.get("float32_caveat")
        if isinstance(caveat, str) and caveat:
            m.float32_caveat = caveat
        source = run.get("setting_source")
        if isinstance(source, str) and source and source not in m.sources:
            m.sources.append(source)
        cfg = train_config(run.get("train_config"))
        if cfg is not None and cfg.lr not in m.lrs:
            m.lrs.append(cfg.lr)
        for column, seen in (("budget", m.budgets), ("tuning_edge", m.edges)):
            text = run.get(column)
            if isinstance(text, str) and text and text not in seen:
                seen.append(text)
        if run["status"] in FAILURES:
            m.failed.append((seed, str(run["status"])))
            continue
        m.seeds.append(seed)
        verdict = run.get("convergence")
        m.convergence[seed] = verdict if isinstance(verdict, str) and verdict else "unknown"
    diagnostics = degeneracy_diagnostics(ok["metric"].unique(), cards.roles(task)) if len(ok) else []
    for method, g in ok.groupby("method"):
        m = methods.setdefault(str(method), MethodFacts(str(method)))
        if metric:
            m.values = list(g[g["metric"] == metric]["value"].dropna())
        for dtype, name in EQ_MAX.items():
            v = g[g["metric"] == name]["value"].dropna()
            if len(v):
                m.equivariance[dtype] = float(v.max())
        sym = g[g["metric"] == SYMMETRIC_MAX]["value"]
        if len(sym):  # a missing (NaN) value is a non-finite output: never "exact"
            m.symmetric = float(sym.max()) if sym.notna().all() and np.isfinite(sym).all() else float("inf")
        tp = g[g["metric"] == THROUGHPUT]["value"].dropna()
        m.throughput = float(tp.mean()) if len(tp) else float("nan")
        for name in diagnostics:
            v = g[g["metric"] == name]["value"].dropna()
            if len(v):
                how = spec_for(name).aggregate
                m.diagnostics[name] = float(v.iloc[0] if how == "first" else getattr(v, how)())
        gains = g[g["metric"] == GAIN]
        if not len(gains):
            gains = g[g["metric"] == OLD_GAIN]
        m.gains = {s: float(v) for s, v in zip(gains["seed"], gains["value"]) if not fmt.missing(v)}
    values = {name: f.values for name, f in methods.items() if f.values}
    ranked = rank_methods(values, spec.direction if spec else None)
    seeds = sorted(set(df["seed"].dropna()), key=str) if "seed" in df else []
    facts = TaskFacts(task, metric, spec, trivial_score(df, metric), ranked, methods, seeds, card=cards.task(task))
    floors = floor_values(ok, metric)
    trivial = trivial_values(ok, metric)
    if trivial:
        floors[TRIVIAL_FLOOR] = trivial
    facts.floors = floors
    judge_floors(facts)
    return facts


TRIVIAL_FLOOR = "trivial predictor"


def beats_p(values: Sequence[float], floor: Sequence[float], direction: str) -> float:
    """One-sided p-value that a method's per-seed ``values`` are better than the floor's: Welch's
    test (``one_sided_p``) when the floor has two or more seeds, a one-sample t-test against its
    single value otherwise; NaN when the method has fewer than two seeds."""
    x, y = _finite(values), _finite(floor)
    if len(x) < 2 or len(y) == 0:
        return float("nan")
    if len(y) >= 2:
        return one_sided_p(values, floor, direction)
    return _welch(x, np.array([y[0], y[0]]), "less" if direction == "lower" else "greater")  # a constant


def judge_floors(facts: TaskFacts) -> None:
    """Set ``facts.strongest`` (the floor with the best mean) and, per ranked method, whether it
    beats that floor separated by the seeds: ``beats_p`` with Holm's correction over the table's
    methods at ``ALPHA``."""
    direction = facts.spec.direction if facts.spec else None
    means = {name: facts.floor_mean(name) for name in facts.floors}
    means = {k: v for k, v in means.items() if np.isfinite(v)}
    if direction is None or not means:
        return
    sign = -1.0 if direction == "higher" else 1.0
    facts.strongest = min(means, key=lambda k: (sign * means[k], k))
    floor = facts.floors[facts.strongest]
    tested = [r for r in facts.ranked if r.rank]
    raw = [beats_p(r.values, floor, direction) for r in tested]
    for r, p, adj in zip(tested, raw, holm(raw)):
        if better(r.mean, means[facts.strongest], direction) is False:
            beats: bool | None = False
        else:
            beats = True if np.isfinite(adj) and adj < ALPHA else None
        facts.vs_floor[r.method] = FloorVerdict(facts.strongest, p, adj, beats)


BASELINE = "baseline"  # the shared backbone without any symmetry mechanism


def exact_vs_baseline(facts: TaskFacts, baseline: str = BASELINE) -> str:
    """One sentence: which methods that claim exactness the seeds separate from ``baseline`` (the
    same backbone without symmetry), better or worse, and which they do not. Each exact method's
    seeds against the baseline's by the pooled-variance t-test of the groups (``pooled_p``, the
    seed variance pooled over the table), Holm-corrected over the exact methods at ``ALPHA``.
    Empty without a direction, a baseline with two seeds or an exact method with two seeds."""
    ranked = {r.method: r for r in facts.ranked if r.rank and r.n >= 2}
    base = ranked.get(baseline)
    direction = facts.spec.direction if facts.spec else None
    exact = [r for name, r in ranked.items() if name != baseline and facts.methods.get(name, MethodFacts(name)).exact]
    if base is None or not exact or direction is None:
        return ""
    s2, df = pooled_variance([np.asarray(r.values) for r in ranked.values()])
    adjusted = holm([pooled_p(r.values, base.values, s2, df) for r in exact])
    groups: dict[str, list[str]] = {"better": [], "worse": [], "not separated": []}
    for r, adj in zip(exact, adjusted):
        key = "not separated" if not (np.isfinite(adj) and adj < ALPHA) else \
            ("better" if better(r.mean, base.mean, direction) else "worse")
        groups[key].append(f"{r.method} (p_Holm = {_p(adj)})")
    parts = [f"{k} than the baseline: {', '.join(v)}" for k, v in groups.items() if v and k != "not separated"]
    if groups["not separated"]:
        parts.append(f"not separated from the baseline by the seeds: {', '.join(groups['not separated'])}")
    text = (f"Symmetry against no symmetry ({facts.task}, test {facts.spec.display if facts.spec else ''}, "
            f"{base.n} seeds; pooled-variance t-test, Holm over the exact methods): " + "; ".join(parts) + ".")
    if not groups["better"] and not groups["worse"]:
        text += (" At this size and number of seeds the run cannot tell any exact method from the backbone "
                 "without symmetry.")
    return text


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


def _p(v: float) -> str:
    return f"{v:.2g}" if np.isfinite(v) else "n/a"


def _group_cell(r: Ranked, best: Ranked | None) -> str:
    """How the method stands against the best of its group (pooled t-test, Holm-adjusted p-values)."""
    if not r.rank:
        return fmt.MISSING
    if not r.group:
        return "not tested (1 seed)" if r.n < 2 else fmt.MISSING
    if r.is_leader:
        if r.group == 1:
            return "best"
        return f"below the best (p_Holm = {_p(r.p_best)}); best of group {r.group}"
    if r.group == 1:
        return f"not distinguishable from the best (p_Holm = {_p(r.p_holm)})"
    return f"not distinguishable from {r.leader} (p_Holm = {_p(r.p_holm)}); below the best (p_Holm = {_p(r.p_best)})"


def _floor_cell(facts: TaskFacts, r: Ranked) -> str:
    v = facts.vs_floor.get(r.method)
    if v is None:
        return fmt.MISSING
    if v.beats:
        return f"beats {v.floor} (p_Holm = {_p(v.p_holm)})"
    if v.beats is False:
        return f"⚠ not better than {v.floor}"
    if not np.isfinite(v.p_holm):
        return f"better than {v.floor}, not tested (1 seed)"
    return f"⚠ better than {v.floor} but not separated by the seeds (p_Holm = {_p(v.p_holm)})"


def _convergence_cell(m: MethodFacts) -> str:
    """The verdicts per seed, prefixed by the kind of budget ("fixed budget" / "until plateau")."""
    if not m.convergence:
        return fmt.MISSING
    parts = []

    def seeds_with_gains(seeds: Sequence[Any]) -> str:
        return "; ".join(f"seed {_seeds_text([s])}: +{100 * m.gains[s]:.1f} %" if s in m.gains
                         else f"seed {_seeds_text([s])}" for s in seeds)

    bad = [s for s, c in m.convergence.items() if c == "not_converged"]
    capped = m.cap_reached
    if bad:
        parts.append(f"⚠ not converged ({seeds_with_gains(sorted(bad, key=str))})")
    if capped:
        parts.append(f"⚠ cap reached before a plateau ({seeds_with_gains(capped)})")
    good = [s for s, c in m.convergence.items() if c == "converged"]
    unknown = [s for s, c in m.convergence.items() if c not in ("converged", *NOT_CONVERGED)]
    flagged = bad or capped
    if good:
        parts.append("converged" + (f" (seed {_seeds_text(good)})" if flagged or unknown else ""))
    if unknown:
        parts.append("unknown" + (f" (seed {_seeds_text(unknown)})" if flagged or good else ""))
    kind = " / ".join(BUDGET_WORDS.get(b, b) for b in m.budgets)
    return (f"{kind}: " if kind else "") + "; ".join(parts)


BUDGET_WORDS = {"fixed": "fixed budget", "converge": "until plateau"}


def _settings_cell(m: MethodFacts) -> str:
    source = " / ".join(m.sources) or "?"
    lr = ", ".join(f"{v:g}" for v in m.lrs)
    cell = f"{source} · lr {lr}" if lr else source
    if m.edges:
        cell += " · ⚠ tuned at grid edge (" + "; ".join(m.edges) + ")"
    return cell


def _eq_cell(m: MethodFacts, dtype: str) -> str:
    """The error on the test graphs; in the fp64 column, for a method claiming exactness, what the
    claim is worth: "exact" only when it holds on every input measured (test graphs and symmetric
    inputs), else "exact except on symmetric inputs (max e)" for a method declared exact only on
    inputs without a symmetry of their own, ⚠ for one declared exact on every input."""
    v = m.equivariance.get(dtype)
    cell = fmt.number(v, "sci")
    over = m.exact and not fmt.missing(v) and v is not None and v > EXACT_LIMITS[dtype]
    if over:
        cell += f" ⚠ > {EXACT_LIMITS[dtype]:.0e}" + (" (known float32 limit, see the anomalies)"
                                                     if dtype == "fp32" and m.float32_caveat else "")
    if dtype != "fp64" or not m.exact:
        return cell
    if m.symmetric is None:
        return cell + ("" if over else " · exact on the test graphs (symmetric inputs not measured)")
    if m.symmetric <= EXACT_LIMITS["fp64"]:
        return cell + ("" if over else " · exact")
    if m.scope == GENERIC_INPUTS:
        return cell + f" · exact except on symmetric inputs (max {_symmetric_text(m.symmetric)})"
    return cell + f" · ⚠ symmetric inputs {_symmetric_text(m.symmetric)} > {EXACT_LIMITS['fp64']:.0e}"


def _exact_label(m: MethodFacts) -> str:
    """The mark beside the method's name: "(exact)" only where exact on every input measured."""
    if not m.exact:
        return ""
    if m.symmetric is not None and not m.symmetric <= EXACT_LIMITS["fp64"] and m.scope == GENERIC_INPUTS:
        return " (exact on inputs without a symmetry of their own)"
    return " (exact)"


def _diag_header(diag: Sequence[str]) -> str:
    if len(diag) == 1:
        return header(spec_for(diag[0]))
    return "diagnostics"


def _diag_cell(m: MethodFacts, diag: Sequence[str]) -> str:
    if len(diag) == 1:
        return value(spec_for(diag[0]), m.diagnostics.get(diag[0]))
    parts = [f"{spec_for(d).display} {value(spec_for(d), m.diagnostics[d])}" for d in diag if d in m.diagnostics]
    return "; ".join(parts) or fmt.MISSING


def _groups_text(facts: TaskFacts) -> str:
    """The caption's account of the grouping procedure and the difference it can resolve."""
    text = ("Groups: the best method (by mean) against every other with a two-sided t-test whose variance is the "
            "seed variance pooled over the table's methods (one-way ANOVA's error, as in Hsu's comparisons with "
            "the best: more degrees of freedom than one pair's Welch test at a handful of seeds; it assumes the "
            "methods' seed spreads are alike), the p-values corrected by Holm's step-down method over the "
            "table's methods at a family-wise 5 % level; the methods it cannot separate from the best form "
            "group 1 ('not distinguishable from the best'); the rest are grouped the same way around their own "
            "best (group 2, ...). Every method is compared with its group's best, never with a neighbour, so "
            "ties cannot chain. A method with one seed is not tested.")
    res = resolvable_difference(facts.ranked)
    if res is not None:
        tested = [r for r in facts.ranked if r.rank and r.n >= 2]
        n = int(np.median([r.n for r in tested]))
        text += (f" With {n} seeds and the table's pooled seed spread, a difference from the best smaller than "
                 f"about {100 * res[0]:.2g} % of the best score (Holm's strictest step) or {100 * res[1]:.2g} % "
                 "(its most lenient) cannot be resolved.")
    return text


NOT_RANKED_NOTE = ("Not a verdict: this run is not meant for verdicts (too few seeds or too small a budget); rows "
                   "are sorted by score and no ranks or groups are given.")


def verdict_caption(facts: TaskFacts, ctx: Mapping[str, str], ranked: bool = True) -> str:
    spec = facts.spec
    if spec is None:
        return ""
    word = {"higher": "higher is better", "lower": "lower is better"}.get(spec.direction or "", "no better direction")
    seeds = _seeds_text(facts.seeds)
    card = facts.card
    trivial = card.trivial_reference if card is not None else ""
    docs = card.floors if card is not None else {}
    floors = "; ".join(f"{name}: {docs.get(name, 'a floor declared by the task')}" for name in facts.floors
                       if name != TRIVIAL_FLOOR)
    covers = ctx.get("seed_covers", "") or (card.seed_draws if card is not None else "")
    diag = sorted({d for m in facts.methods.values() for d in m.diagnostics})
    parts = [
        f"{'Verdict' if ranked else 'Summary'} for {facts.task}: methods {'ranked' if ranked else 'sorted'} by test "
        f"{spec.display}{' [' + spec.unit + ']' if spec.unit else ''} "
        f"({word}; the task's first metric, direction from the metric catalogue), mean over seeds {seeds} "
        f"± the half-width of the 95 % t-interval (t(0.975, n−1) · s / √n, s = standard deviation over the n "
        "seeds); one seed gives no interval.",
        f"What the interval covers: each seed sets the initialisation, the batch order and the draw of the "
        f"training (and validation) data{' (' + covers + ')' if covers else ''}; the test split is the same for "
        "every seed, so its own sampling error is not in the interval.",
        _groups_text(facts),
        "Trivial predictor and floors (italic rows" + (f"; trivial: {trivial[0].lower() + trivial[1:]}" if trivial
                                                        else "")
        + (f"; {floors}" if floors else "") + "): non-learned references fitted on each seed's training split and "
        "scored on the same test split. 'vs strongest floor': whether the method beats the reference with the best "
        "mean, separated by the seeds: one-sided Welch t-test of its per-seed scores against the floor's (a "
        "one-sample t-test when the floor has one seed), Holm-corrected over the table's methods at the 5 % level; "
        "⚠ when it does not.",
        "Equivariance: max relative error ||f(g·X) − ρ(g) f(X)|| / ||f(X)|| of the trained model over "
        f"{ctx.get('equivariance', 'the test graphs and group samples')}, worst seed; fp64 = the model rebuilt "
        "in float64, fp32 = as deployed; '(exact)' = the method claims exact equivariance here and is held to "
        "1e-10 (fp64) / 1e-4 (fp32), ⚠ when over. Exactness (fp64 column): 'exact' only where the claim holds on "
        "every input measured, the test graphs and the task's exactly symmetric inputs (the table 'Exactly "
        "symmetric inputs' below); 'exact except on symmetric inputs (max e)' for a frame or canonicalisation "
        "method, declared exact only on inputs without a symmetry of their own (its frame is undecided on a "
        "symmetric input); a method declared exact on every input is held to 1e-10 there too, ⚠ when over.",
        *(["Diagnostics (mean over seeds): " + "; ".join(f"{spec_for(d).display}: {spec_for(d).description}"
                                                         for d in diag) + "."] if diag else []),
        f"Speed: inference throughput ({ctx.get('throughput', 'fp32, mean over seeds')}).",
        "Convergence: fixed budget: ⚠ not converged = while the learning rate was at least half its peak, the "
        "best validation value still improved by more than its noise (standard error over the validation graphs, "
        "or the relative tolerance if larger; +x % = that improvement); until plateau: trained at a constant rate "
        "until no such improvement for a patience window, then cooled down; ⚠ cap reached = stopped by the step, "
        "time or FLOP cap first.",
        "Settings: where the run's training settings came from (suite file, tuning run or stored tuned settings) "
        "and its learning rate; ⚠ tuned at grid edge = the chosen value is still the largest or smallest tried "
        "after the grid's extensions.",
    ]
    if not ranked:
        parts = [NOT_RANKED_NOTE] + [p for p in parts if not p.startswith("Groups:")]
    return " ".join(parts)


def verdict_table(facts: TaskFacts, ctx: Mapping[str, str] | None = None, *, ranked: bool = True,
                  unstable: set[tuple[Any, str]] | None = None) -> TableView | None:
    """The verdict table of one task configuration (None without a ranked task metric). With
    ``ranked=False`` (smoke runs) the rows are still sorted by score but the table has no rank or
    group column and the caption says the run is not meant for verdicts. ``unstable``: the
    (method, mode) pairs whose timing is unstable (``tables.unstable_timings``); their inference
    throughput carries ``UNSTABLE_MARK`` and the caption says what it means."""
    unstable = unstable or set()
    spec, metric = facts.spec, facts.metric
    if spec is None or metric is None or not facts.methods:
        return None
    n_total = len(facts.seeds)
    diag = sorted({d for m in facts.methods.values() for d in m.diagnostics})
    score_header = f"{header(spec, 'test ' + spec.display)} mean ± 95 % CI"
    columns: list[tuple[str, str]] = [GROUP_COLUMN, ("", "method"), ("accuracy", score_header),
                                      VS_BEST_COLUMN, ("accuracy", "vs strongest floor"),
                                      ("equivariance", f"fp64 max rel. err {ARROWS['lower']} · exactness"),
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
            v = facts.vs_floor.get(m.method)
            if v is not None and v.beats is not True and v.floor != TRIVIAL_FLOOR:
                flags.append("floor")
            rank = str(r.group) if r.group else fmt.MISSING
            nxt = _group_cell(r, best)
            vs_floor = _floor_cell(facts, r)
        else:
            rank, nxt, vs_floor = fmt.MISSING, fmt.MISSING, fmt.MISSING
            score = fmt.MISSING
        if m.failed:
            statuses = ", ".join(sorted({s for _, s in m.failed}))
            note = f"{statuses}: seed {_seeds_text([s for s, _ in m.failed])}"
            score = f"no result ({note})" if score == fmt.MISSING else f"{score}; {note}"
            flags.append(FAILED)
        if m.not_converged:
            flags.append("not converged")
        if m.edges:
            flags.append("tuning at grid edge")
        if m.over_limit:
            flags.append("exact over limit")
        cells = [rank, m.method + _exact_label(m), score, nxt, vs_floor, _eq_cell(m, "fp64"),
                 _eq_cell(m, "fp32"),
                 *([_diag_cell(m, diag)] if diag else []),
                 value(spec_for(THROUGHPUT), m.throughput)
                 + (f" {UNSTABLE_MARK}" if (m.method, "inference") in unstable and np.isfinite(m.throughput) else ""),
                 _convergence_cell(m), _settings_cell(m)]
        rows.append(cells)
        ids.append(verdict_row_id(facts.task, m.method))
        css.append(FAILED if (m.failed and not m.seeds) else "flagged" if flags else "")

    best = next((r for r in facts.ranked if r.group == 1 and r.is_leader), None)
    # the references (trivial predictor, floors), each placed where its score ranks
    refs: list[tuple[float, list[str], str, str]] = []
    if facts.trivial is not None:
        refs.append((facts.trivial, _trivial_row(facts, spec, len(columns)), f"verdict-{slug(facts.task)}-trivial",
                     "trivial"))
    for name in facts.floors:
        if name != TRIVIAL_FLOOR and np.isfinite(facts.floor_mean(name)):
            refs.append((facts.floor_mean(name), _floor_row(facts, spec, name, len(columns), n_total),
                         f"verdict-{slug(facts.task)}-floor-{slug(name)}", "trivial floor"))
    sign = -1.0 if spec.direction == "higher" else 1.0
    refs.sort(key=lambda ref: sign * ref[0])
    listed = set()

    def place(limit: float | None) -> None:
        while refs and (limit is None or better(limit, refs[0][0], spec.direction) is False):
            _, row, rid, cls = refs.pop(0)
            rows.append(row)
            ids.append(rid)
            css.append(cls)
    for r in facts.ranked:
        if np.isfinite(r.mean):
            place(r.mean)
        method_row(r, facts.methods[r.method])
        listed.add(r.method)
    place(None)
    for name in sorted(set(facts.methods) - listed):
        method_row(None, facts.methods[name])
    if not ranked:
        drop = [i for i, c in enumerate(columns) if c in (GROUP_COLUMN, VS_BEST_COLUMN)]
        columns = [c for i, c in enumerate(columns) if i not in drop]
        rows = [[c for i, c in enumerate(row) if i not in drop] for row in rows]
    frame = pd.DataFrame(rows, columns=pd.MultiIndex.from_tuples(columns))
    caption = verdict_caption(facts, ctx or {}, ranked)
    if any(UNSTABLE_MARK in row[columns.index(("speed", header(spec_for(THROUGHPUT), "inference")))] for row in rows):
        caption += " " + UNSTABLE_NOTE
    return TableView.from_frame(frame, css="verdict", caption=caption, row_ids=ids, row_css=css)


def _trivial_row(facts: TaskFacts, spec: MetricSpec, n_columns: int) -> list[str]:
    row = [fmt.MISSING] * n_columns
    row[1] = "trivial predictor"
    values = _finite(facts.floors.get(TRIVIAL_FLOOR, []))
    same = len(values) < 2 or float(values.std()) == 0.0
    row[2] = f"{value(spec, facts.trivial)} (no training{', same for every seed' if same else ', mean over seeds'})"
    if facts.strongest == TRIVIAL_FLOOR and len(facts.floors) > 1:
        row[4] = "strongest floor"
    return row


def _floor_row(facts: TaskFacts, spec: MetricSpec, name: str, n_columns: int, n_total: int) -> list[str]:
    """A floor's row: ``floor: <name>``, its mean over seeds ± 95 % interval (its fit uses the
    seed's training split)."""
    row = [fmt.MISSING] * n_columns
    row[1] = f"floor: {name}"
    r = Ranked(name, list(_finite(facts.floors[name])), *t_interval(facts.floors[name]))
    row[2] = _score_cell(r, spec, n_total) + " (no training; fitted on the training split)"
    if facts.strongest == name:
        row[4] = "strongest floor"
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


def _failed_anomalies(df: pd.DataFrame) -> list[Anomaly]:
    bad = df[df["status"].isin(FAILURES)]
    out = []
    special = bad["bench"].isin(SPECIAL_BENCHES)
    for _, r in _first_per_run(bad[~special]).iterrows():
        error = str(r.get("error") or "").strip().splitlines()
        why = f": {error[-1][:160]}" if error else ""
        signal = r.get("exit_signal")
        sig = f" (signal {signal})" if isinstance(signal, str) and signal else ""
        setting = r.get("setting")
        tuning = (" (tuning run: " + ", ".join(f"{k} {v}" for k, v in sorted(setting.items())) + ")"
                  if isinstance(setting, dict) else "")
        out.append(Anomaly(FAILED, str(r["task"]), str(r["method"]),
                           f"{r['task']} / {r['method']} seed {_seeds_text([r['seed']])}{tuning}: {r['status']}{sig}"
                           f"{why}",
                           status_row_id(r.get("spec_hash"), str(r["task"]), str(r["method"]), r.get("seed")),
                           "runs-that-did-not-produce-results"))
    for (bench, method, status), g in bad[special].groupby(["bench", "method", "status"]):
        where = ""
        if "x" in g and g["x"].notna().any():
            label = g["x_label"].dropna().iloc[0] if "x_label" in g and g["x_label"].notna().any() else "x"
            where = f" at {label} = " + ", ".join(f"{x:g}" for x in sorted(set(g["x"].dropna())))
        heading = SPECIAL_HEADINGS.get(str(bench), str(bench))
        out.append(Anomaly(FAILED, str(bench), str(method), f"{bench} / {method}: {status}{where}",
                           section_anchor(heading), md_anchor(heading)))
    return out


def task_anomalies(task: str, df: pd.DataFrame, cards: RunCards | None = None) -> list[Anomaly]:
    """Unconverged runs, exact methods over their limits and methods no better than the trivial
    predictor in every configuration of ``task`` (its base configuration links to the verdict
    row; sweep variants to the section)."""
    out = []
    md = md_anchor(f"Task: {task}")
    cards = cards if cards is not None else cards_for((), df)
    for label, rows, is_base in _configs(df):
        facts = assess(task, rows, cards)
        where = f" [{label}]" if label else ""
        for name, m in sorted(facts.methods.items()):
            anchor = verdict_row_id(task, name) if is_base else section_anchor(task)
            bad = [s for s in m.not_converged if s not in m.cap_reached]
            if bad:
                gains = [f"+{100 * m.gains[s]:.1f} %" for s in bad if s in m.gains]
                extra = (f" (best validation value still improving at half the peak learning rate or more: "
                         f"{', '.join(gains)})" if gains else "")
                out.append(Anomaly("not converged", task, name, f"{task} / {name}{where}: not converged in seed "
                                   f"{_seeds_text(bad)}{extra}", anchor, md))
            if m.cap_reached:
                out.append(Anomaly("not converged", task, name, f"{task} / {name}{where}: budget cap reached before "
                                   f"a validation plateau in seed {_seeds_text(m.cap_reached)}", anchor, md))
            if m.edges:
                out.append(Anomaly("tuning at grid edge", task, name, f"{task} / {name}{where}: tuned setting at the "
                                   f"edge of its grid ({'; '.join(m.edges)}): the optimum may lie outside it",
                                   anchor, md))
            if m.over_limit:
                out.append(Anomaly("exact over limit", task, name, f"{task} / {name}{where} claims exact equivariance "
                                   f"but measures {'; '.join(m.over_limit)} (trained, max rel. error)", anchor, md))
            if facts.not_better_than_trivial(name) and facts.spec is not None:
                r = next(r for r in facts.ranked if r.method == name)
                out.append(Anomaly("not better than trivial", task, name,
                                   f"{task} / {name}{where}: test {facts.spec.display} {value(facts.spec, r.mean)} "
                                   f"is not better than the trivial predictor's {value(facts.spec, facts.trivial)}",
                                   anchor, md))
            verdict = facts.vs_floor.get(name)
            if (verdict is not None and verdict.beats is False and verdict.floor != TRIVIAL_FLOOR
                    and facts.spec is not None):
                r = next(r for r in facts.ranked if r.method == name)
                out.append(Anomaly("not better than a floor", task, name,
                                   f"{task} / {name}{where}: test {facts.spec.display} {value(facts.spec, r.mean)} "
                                   f"is not better than the floor {verdict.floor}'s "
                                   f"{value(facts.spec, facts.floor_mean(verdict.floor))}", anchor, md))
    return out


def anomalies(df: pd.DataFrame, cards: RunCards | None = None) -> list[Anomaly]:
    """Every anomaly of the rows ``df`` (any benches), failed points first (the scaling and
    tensor-product benches' per method and status), then per kind and task of the task runs;
    ``cards``: the runs' cards (None: the cards the rows alone give)."""
    if df.empty or "status" not in df:
        return []
    df = upgrade_frame(df)
    out = _failed_anomalies(df)  # failed tuning runs included
    measured = df[df["bench"] == TaskBench.kind]
    cards = cards if cards is not None else cards_for((), measured)
    for task, g in measured.groupby("task", sort=True):
        out += task_anomalies(str(task), g, cards)
    return sorted(out, key=lambda a: (KINDS.index(a.kind) if a.kind in KINDS else len(KINDS), a.task, a.method))
