"""Efficiency sections: test error against training-set size (data efficiency) and against the
training compute spent (compute efficiency), for every task whose runs sweep ``train_size``.

**Runs.** The ok task runs of one task whose task options carry ``train_size``; of those, the runs
that differ only in ``train_size`` (the options without it equal; with several such groups, the
one with the most sizes). At least two sizes make a section. One point per run: the task's
primary metric on the test split (its card), the convergence verdict of the run (row column
``convergence``; ``not_converged`` and ``cap_reached`` count as not converged, as in the
verdicts), total training FLOPs and training wall seconds (``train.flops``, ``train.wall_s``).

**Error.** For a "lower is better" metric the value itself; for a "higher is better" one with
values in [0, 1] (an accuracy) the error 1 − value; any other metric has no error form and gets
no section.

**Data efficiency.** Per method and size: the mean over seeds with the 95 % t-interval
``t_{0.975, n-1} s / sqrt(n)`` (``verdicts.t_interval``). Per method a power law error ≈ a·N^b,
fitted by least squares to (ln N, ln error) over the per-seed points of its converged runs
(``scipy.stats.linregress``); the exponent's 95 % interval is ``b ± t_{0.975, n-2} · stderr(b)``
(needs three points on two sizes). Unconverged runs are drawn hollow, left out of the fit and
named in the table; line segments touching them are dotted.

**Crossovers** (``pair_verdict``, ``crossover_sentences``). Anchors: the best exact method
(claims exactness on every row; lowest mean error at the largest size any exact method ran) and
the augmentation method (``augmentation``; else the ``baseline``). Pairs: every method against
each anchor (each unordered pair once). For a pair (X, Y) at each size both ran: the difference
of means d = mean_X − mean_Y and Welch's two-sided t-test over seeds (``verdicts.welch_p``); a
size *separates* them when p < 5 % (the better one is the one with the lower mean). In order of
size, the first event found is stated:

* **overtakes**: a size separates them one way and a later size the other way; the crossing is
  placed between the last size at which the earlier winner still has the lower mean and the next
  size ("X overtakes Y between 300 and 1 000");
* **reaches**: the last separating size is followed by sizes at which none separates, to the end
  of the range ("Y reaches X's error at 3 000": the first size from which they are no longer
  separable, after being separable);
* **pulls ahead**: sizes that do not separate them, then sizes that all separate them the same
  way to the end ("X is better than Y from 1 000 on");

otherwise the pair does not cross in the range measured; those pairs are grouped per anchor into
one sentence (better throughout / worse throughout / not separable at any size / not tested), so
the number of sentences stays near the number of events.

**Compute efficiency.** Per (method, size) the mean over seeds of the error, the training FLOPs
and the training seconds; per method its Pareto frontier (``plots.pareto_front``, lower cost and
lower error), over all points the overall frontier, and from it "best at each budget": the
frontier sorted by cost, point i (method m_i) is the lowest error reached with a budget in
[cost_i, cost_{i+1}); consecutive points of one method are merged. A method whose runs have no
FLOP count (missing, NaN or 0) is left out of the FLOPs panel and named.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ..benches.taskrun import TaskBench
from ..metrics.catalogue import MetricSpec, train_metric
from ..results.runcards import RunCards
from ..results.status import Status
from ..results.store import upgrade_frame
from .common import fmt, plots
from .common.metricinfo import spec_for
from .common.render import Section, slug
from .common.tables import context_line, options_key, options_of
from .verdicts import ALPHA, LEVEL, NOT_CONVERGED, t_interval, task_metric, welch_p

SIZE = "train_size"  # the swept task option
FLOPS, WALL = train_metric("flops"), train_metric("wall_s")
AUGMENTATION, BASELINE = "augmentation", "baseline"


# ---------------------------------------------------------------------------------------------
# the points: one per run

@dataclass(frozen=True)
class Point:
    """One run: its method, training size, seed, error (``error_form``), whether it converged
    (False only for a ``not_converged`` / ``cap_reached`` verdict), training FLOPs and seconds
    (NaN when not recorded; FLOPs of 0 count as not counted)."""
    method: str
    size: float
    seed: Any
    error: float
    converged: bool
    flops: float = float("nan")
    wall_s: float = float("nan")
    exact: bool = False


@dataclass
class SizeSweep:
    """The points of one task's ``train_size`` sweep and what they measure."""
    task: str
    metric: str
    spec: MetricSpec
    error_label: str
    points: list[Point]
    rows: pd.DataFrame

    @property
    def sizes(self) -> list[float]:
        return sorted({p.size for p in self.points})

    @property
    def methods(self) -> list[str]:
        return sorted({p.method for p in self.points})

    def values(self) -> dict[str, dict[float, list[float]]]:
        """``{method: {size: [error per seed]}}``."""
        out: dict[str, dict[float, list[float]]] = {}
        for p in self.points:
            out.setdefault(p.method, {}).setdefault(p.size, []).append(p.error)
        return out

    def unconverged(self) -> dict[tuple[str, float], list[Any]]:
        """``{(method, size): [seed of each run that did not converge]}``."""
        out: dict[tuple[str, float], list[Any]] = {}
        for p in self.points:
            if not p.converged:
                out.setdefault((p.method, p.size), []).append(p.seed)
        return out

    def exact(self) -> set[str]:
        """Methods every run of which claims exactness."""
        by: dict[str, list[bool]] = {}
        for p in self.points:
            by.setdefault(p.method, []).append(p.exact)
        return {m for m, claims in by.items() if all(claims)}


def _size(v: Any) -> float | None:
    try:
        out = float(v)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) and out > 0 else None


def error_form(spec: MetricSpec, values: Sequence[float]) -> tuple[str, bool] | None:
    """(label, flipped) of the error the section plots for ``spec``: the value itself (lower is
    better, or no direction), ``1 − value`` for a higher-is-better metric within [0, 1]; None
    for a higher-is-better metric outside it (no error form)."""
    if spec.direction != "higher":
        return spec.display, False
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) and (v >= 0).all() and (v <= 1).all():
        return f"1 − {spec.display}", True
    return None


def _first(rows: pd.DataFrame, column: str) -> Any:
    if column not in rows:
        return None
    v = rows[column].dropna()
    return v.iloc[0] if len(v) else None


def _metric_value(rows: pd.DataFrame, metric: str) -> float:
    v = rows[rows["metric"] == metric]["value"].dropna()
    return float(v.mean()) if len(v) else float("nan")


def size_sweep(task: str, df: pd.DataFrame, cards: RunCards | None = None) -> SizeSweep | None:
    """The ``train_size`` sweep of ``task``'s rows ``df`` (module docstring: which runs, which
    metric); None with fewer than two sizes or no error form of the primary metric."""
    if df.empty or "task_options" not in df:
        return None
    df = upgrade_frame(df)
    ok = df[(df["bench"] == TaskBench.kind) & (df["status"] == Status.OK)]
    if ok.empty:
        return None
    opts = ok["task_options"].map(options_of)
    sizes = opts.map(lambda o: _size(o.get(SIZE)))
    rest = opts.map(lambda o: options_key({k: v for k, v in o.items() if k != SIZE}))
    ok = ok.assign(_size=sizes, _rest=rest)[sizes.notna()]
    if ok.empty:
        return None
    groups = ok.groupby("_rest").agg(n_sizes=("_size", "nunique"), n_rows=("_size", "size"))
    groups = groups.sort_values(["n_sizes", "n_rows"], ascending=False, kind="stable")
    if groups["n_sizes"].iloc[0] < 2:
        return None
    rows = ok[ok["_rest"] == groups.index[0]]
    metric = task_metric(rows, cards)
    if metric is None:
        return None
    spec = spec_for(metric)
    form = error_form(spec, rows[rows["metric"] == metric]["value"].tolist())
    if form is None:
        return None
    label, flipped = form
    points = []
    key = "spec_hash" if "spec_hash" in rows and rows["spec_hash"].notna().all() else None
    runs = rows.groupby(key, sort=False) if key else rows.groupby(["method", "seed", "_size"], sort=False)
    for _, run in runs:
        value = _metric_value(run, metric)
        if not np.isfinite(value):
            continue
        verdict = _first(run, "convergence")
        claim = _first(run, "exact_claim")
        flops = _metric_value(run, FLOPS)
        points.append(Point(str(run["method"].iloc[0]), float(run["_size"].iloc[0]), _first(run, "seed"),
                            1.0 - value if flipped else value, verdict not in NOT_CONVERGED,
                            flops if flops > 0 else float("nan"), _metric_value(run, WALL),
                            isinstance(claim, (bool, np.bool_)) and bool(claim)))
    sweep = SizeSweep(task, metric, spec, label, points, rows.drop(columns=["_size", "_rest"]))
    return sweep if len(sweep.sizes) >= 2 else None


# ---------------------------------------------------------------------------------------------
# data efficiency: power laws and crossovers

@dataclass(frozen=True)
class PowerLaw:
    """error ≈ a·N^b fitted to ``n`` per-seed points at ``sizes`` (module docstring); ``half``:
    the half-width of the 95 % interval of ``b`` (NaN with fewer than three points)."""
    b: float
    half: float
    a: float
    n: int
    sizes: tuple[float, ...]
    capped: int = 0  # unconverged runs in the fit (a method without converged runs at two sizes)

    @property
    def interval(self) -> tuple[float, float]:
        return self.b - self.half, self.b + self.half


def fit_power_law(sizes: Sequence[float], errors: Sequence[float], level: float = LEVEL) -> PowerLaw | None:
    """Least squares of ln(error) = ln(a) + b ln(N) over the points with positive error; the
    interval of ``b`` is ``t_{(1+level)/2, n-2} · stderr(b)``. None without two distinct sizes."""
    n_arr, e_arr = np.asarray(sizes, dtype=float), np.asarray(errors, dtype=float)
    keep = np.isfinite(n_arr) & np.isfinite(e_arr) & (n_arr > 0) & (e_arr > 0)
    x, y = np.log(n_arr[keep]), np.log(e_arr[keep])
    if len(np.unique(x)) < 2:
        return None
    fit = stats.linregress(x, y)
    n = len(x)
    half = float(stats.t.ppf(0.5 + level / 2, n - 2) * fit.stderr) if n > 2 else float("nan")
    return PowerLaw(float(fit.slope), half, float(np.exp(fit.intercept)), n, tuple(sorted(set(n_arr[keep]))))


def method_fits(sweep: SizeSweep) -> dict[str, tuple[PowerLaw | None, int]]:
    """Per method: its power law over its converged runs and the number of unconverged runs left out.
    A method whose converged runs cover fewer than two sizes (every run stopped by its cap) is fitted
    over all its runs instead, with ``capped`` = the unconverged runs in the fit: the exponent of
    the capped budget, which the table and legend mark."""
    out: dict[str, tuple[PowerLaw | None, int]] = {}
    for method in sweep.methods:
        mine = [p for p in sweep.points if p.method == method]
        used = [p for p in mine if p.converged]
        fit = fit_power_law([p.size for p in used], [p.error for p in used])
        if fit is None and len(used) < len(mine):
            fit = fit_power_law([p.size for p in mine], [p.error for p in mine])
            if fit is not None:
                out[method] = (replace(fit, capped=len(mine) - len(used)), 0)
                continue
        out[method] = (fit, len(mine) - len(used))
    return out


def _n(size: float) -> str:
    return fmt.number(size, "int")


def _range(sizes: Sequence[float]) -> str:
    return f"{_n(min(sizes))}–{_n(max(sizes))}"


def _p(p: float) -> str:
    return f"p = {p:.2g}" if np.isfinite(p) else "not tested"


@dataclass
class PairVerdict:
    """Where methods ``x`` and ``y`` stand over their common sizes (``pair_verdict``). ``kind``:
    "overtakes", "reaches", "pulls ahead" (an event, stated in ``text``), or "better" (``winner``
    separated better at every size), "not separable", "not tested", "mixed" (no event; grouped).
    ``cited``: the sizes the sentence names."""
    x: str
    y: str
    kind: str
    text: str = ""
    winner: str | None = None
    sizes: list[float] = field(default_factory=list)
    cited: list[float] = field(default_factory=list)


def _states(x: Mapping[float, Sequence[float]], y: Mapping[float, Sequence[float]], sizes: Sequence[float],
            alpha: float) -> tuple[list[int], list[int], list[float]]:
    """Per size: the separated state (+1: x lower and p < alpha, -1: y lower and p < alpha, 0: not
    separated or not tested), the sign of the mean difference (+1: x lower) and the p-value."""
    states, signs, ps = [], [], []
    for s in sizes:
        d = float(np.mean(x[s]) - np.mean(y[s]))
        p = welch_p(x[s], y[s])
        sign = 1 if d < 0 else -1 if d > 0 else 0
        signs.append(sign)
        ps.append(p)
        states.append(sign if np.isfinite(p) and p < alpha else 0)
    return states, signs, ps


def pair_verdict(x: str, y: str, values: Mapping[str, Mapping[float, Sequence[float]]],
                 alpha: float = ALPHA) -> PairVerdict:
    """The first event between ``x`` and ``y`` (errors per seed in ``values``, lower is better)
    over the sizes both ran, in order of size (module docstring)."""
    sizes = sorted(set(values.get(x, {})) & set(values.get(y, {})))
    if not sizes:
        return PairVerdict(x, y, "not tested")
    states, signs, ps = _states(values[x], values[y], sizes, alpha)
    name = {1: x, -1: y}
    sep = [i for i, s in enumerate(states) if s]
    if not sep:
        tested = any(np.isfinite(p) for p in ps)
        return PairVerdict(x, y, "not separable" if tested else "not tested", sizes=sizes)
    i = sep[0]
    j = next((k for k in sep if k > i and states[k] == -states[i]), None)
    if j is not None:  # crossing: separated one way, later the other way
        k = max(m for m in range(i, j) if signs[m] == states[i])
        first, then = name[states[i]], name[states[j]]
        text = (f"{then} overtakes {first} between {_n(sizes[k])} and {_n(sizes[k + 1])} ({first} better at "
                f"{_n(sizes[i])}, {_p(ps[i])}; {then} better at {_n(sizes[j])}, {_p(ps[j])})")
        later = [m for m in sep if m > j and states[m] == states[i]]
        if later:
            text += f"; they cross back by {_n(sizes[later[0]])}"
        return PairVerdict(x, y, "overtakes", text + ".", then, sizes, [sizes[i], sizes[k], sizes[k + 1], sizes[j]])
    last = sep[-1]
    if last < len(sizes) - 1:  # separated, then not separable to the end of the range
        better_one, worse = name[states[last]], name[-states[last]]
        tail = ps[last + 1:]
        where = (f"at {_n(sizes[-1])}" if last + 1 == len(sizes) - 1 else
                 f"from {_n(sizes[last + 1])} to {_n(sizes[-1])}")
        text = (f"{worse} reaches {better_one}'s error at {_n(sizes[last + 1])}: {better_one} is better up to "
                f"{_n(sizes[last])} ({_p(ps[last])}), not separable at 5 % {where} "
                f"(p {'=' if len(tail) == 1 else '≥'} {min(p for p in tail if np.isfinite(p)):.2g})"
                if any(np.isfinite(p) for p in tail) else
                f"{worse} reaches {better_one}'s error at {_n(sizes[last + 1])} (not tested there: one seed)")
        return PairVerdict(x, y, "reaches", text + ".", better_one, sizes, [sizes[last], sizes[last + 1]])
    run = len(sizes) - 1
    while run > 0 and states[run - 1] == states[-1]:
        run -= 1
    if all(states[m] == 0 for m in range(run)) and run > 0:  # not separable, then separated to the end
        w, other = name[states[-1]], name[-states[-1]]
        text = (f"{w} is better than {other} from {_n(sizes[run])} on ({_p(ps[run])}; not separable at "
                f"{', '.join(_n(s) for s in sizes[:run])})")
        return PairVerdict(x, y, "pulls ahead", text + ".", w, sizes, [sizes[run - 1], sizes[run]])
    kind = "better" if all(s == states[0] for s in states) else "mixed"  # separated one way only
    return PairVerdict(x, y, kind, winner=name[states[sep[0]]], sizes=sizes)


def best_exact(values: Mapping[str, Mapping[float, Sequence[float]]], exact: set[str]) -> str | None:
    """The exact method with the lowest mean error at the largest size any exact method ran."""
    ran = [m for m in sorted(exact) if values.get(m)]
    if not ran:
        return None
    top = max(s for m in ran for s in values[m])
    at_top = [m for m in ran if top in values[m]]
    return min(at_top, key=lambda m: float(np.mean(values[m][top])))


def anchors(values: Mapping[str, Mapping[float, Sequence[float]]], exact: set[str]) -> list[tuple[str, str]]:
    """(method, why) of the methods every other is compared with: the best exact method, then
    augmentation (else the baseline) when it ran."""
    out = []
    best = best_exact(values, exact)
    if best is not None:
        top = max(s for m in exact if values.get(m) for s in values[m])
        out.append((best, f"the best exact method at {_n(top)}"))
    plain = AUGMENTATION if AUGMENTATION in values else BASELINE if BASELINE in values else None
    if plain is not None and plain != best:
        out.append((plain, "data augmentation" if plain == AUGMENTATION else "the unconstrained baseline"))
    return out


_GROUPS = ("better at every size", "worse at every size", "better at some sizes, not separable at the others",
           "worse at some sizes, not separable at the others", "not separable at any size", "not tested (one seed)")
_ORDER = {g: i for i, g in enumerate(_GROUPS)}


def _group(v: PairVerdict, method: str) -> str:
    """The sentence group of a pair without an event, from ``method``'s side."""
    if v.kind == "not separable":
        return _GROUPS[4]
    if v.kind not in ("better", "mixed"):
        return _GROUPS[5]
    return _GROUPS[(0 if v.winner == method else 1) + (2 if v.kind == "mixed" else 0)]


def _names(methods: Sequence[str], flagged: set[str]) -> str:
    return ", ".join(f"{m} ⚠" if m in flagged else m for m in methods)


def crossover_sentences(values: Mapping[str, Mapping[float, Sequence[float]]], exact: set[str],
                        unconverged: Mapping[tuple[str, float], Sequence[Any]] | None = None,
                        alpha: float = ALPHA) -> list[str]:
    """The crossover sentences of a sweep (module docstring): one per event, then one per anchor
    grouping the pairs without an event. ``unconverged``: ``{(method, size): seeds}``; an event
    citing such a point says so, a grouped method with one in range is marked ⚠."""
    unconverged = unconverged or {}
    refs = anchors(values, exact)
    if not refs:
        return ["No crossovers stated: no exact method, augmentation or baseline ran every size."]
    events: list[str] = []
    quiet: dict[str, dict[str, list[str]]] = {}
    flagged: set[str] = set()
    done: set[frozenset[str]] = set()
    for ref, _ in refs:
        for method in sorted(values):
            if method == ref or frozenset((method, ref)) in done:
                continue
            done.add(frozenset((method, ref)))
            v = pair_verdict(method, ref, values, alpha)
            bad = sorted({(m, s) for m in (method, ref) for s in (v.cited or v.sizes) if (m, s) in unconverged})
            if v.text:
                if bad:
                    v.text = v.text[:-1] + ("; ⚠ not converged: " + ", ".join(
                        f"{m} at {_n(s)} (seed {', '.join(map(str, unconverged[(m, s)]))})" for m, s in bad) + ".")
                events.append(v.text)
                continue
            if any(m == method for m, _ in bad):
                flagged.add(method)
            quiet.setdefault(ref, {}).setdefault(_group(v, method), []).append(method)
    sizes = sorted({s for per in values.values() for s in per})
    out = list(events)
    for ref, why in refs:
        groups = quiet.get(ref)
        if not groups:
            continue
        parts = [f"{group}: {_names(ms, flagged)}" for group, ms in sorted(groups.items(), key=lambda g: _ORDER[g[0]])]
        own = sorted(s for m, s in unconverged if m == ref)
        note = f"; ⚠ {ref} did not converge at N = {', '.join(_n(s) for s in own)}" if own else ""
        out.append(f"In the range measured ({_range(sizes)}) these do not cross {ref} ({why}{note}): "
                   + "; ".join(parts) + ".")
    if flagged:
        out.append("⚠: some of that method's runs did not converge (tables).")
    return out


# ---------------------------------------------------------------------------------------------
# compute efficiency: frontiers and the best method at each budget

@dataclass(frozen=True)
class CostPoint:
    """One (method, size): means over seeds of cost and error; ``converged``: every seed did."""
    method: str
    size: float
    cost: float
    error: float
    converged: bool


def cost_points(sweep: SizeSweep, cost: str) -> tuple[list[CostPoint], list[str]]:
    """(points with a finite cost, methods with no finite cost at any point) for ``cost`` "flops"
    or "wall_s"."""
    out, missing = [], []
    for method in sweep.methods:
        mine = [p for p in sweep.points if p.method == method]
        found = False
        for size in sorted({p.size for p in mine}):
            at = [p for p in mine if p.size == size]
            costs = np.array([getattr(p, cost) for p in at], dtype=float)
            if not np.isfinite(costs).any():
                continue
            found = True
            out.append(CostPoint(method, size, float(np.nanmean(costs)), float(np.mean([p.error for p in at])),
                                 all(p.converged for p in at)))
        if not found:
            missing.append(method)
    return out, missing


def frontier(points: Sequence[CostPoint]) -> list[CostPoint]:
    """The points no other has at most the cost and at most the error (one strictly less),
    sorted by cost (``plots.pareto_front``, lower-left)."""
    if not points:
        return []
    idx = plots.pareto_front(np.array([p.cost for p in points]), np.array([p.error for p in points]),
                             x_higher=False, y_higher=False)
    return [points[i] for i in idx]


def _cost(v: float, unit: str) -> str:
    return f"{v:.3g} {unit}".strip()


def best_at_budget(points: Sequence[CostPoint], unit: str) -> str:
    """Which method is best in which budget range, walking the overall frontier of ``points``."""
    front = frontier(points)
    if not front:
        return ""
    costs = sorted({p.cost for p in front})  # points of equal cost on the frontier tie (equal error)
    spans: list[tuple[str, float, float | None, list[CostPoint]]] = []  # method(s), from, to, their points
    for i, c in enumerate(costs):
        at = [p for p in front if p.cost == c]
        who, end = " and ".join(sorted({p.method for p in at})), costs[i + 1] if i + 1 < len(costs) else None
        if spans and spans[-1][0] == who:
            spans[-1] = (who, spans[-1][1], end, [*spans[-1][3], *at])
        else:
            spans.append((who, c, end, at))
    parts = []
    for method, lo, hi, pts in spans:
        where = f"{lo:.3g}–{_cost(hi, unit)}" if hi is not None else f"from {_cost(lo, unit)}"
        flag = " ⚠ not converged" if any(not p.converged for p in pts) else ""
        parts.append(f"{where}: {method} (N = {', '.join(_n(p.size) for p in pts)}{flag})")
    return (f"below {_cost(front[0].cost, unit)} nothing was measured; " + "; ".join(parts))


# ---------------------------------------------------------------------------------------------
# the sections

def _series(sweep: SizeSweep, fits: Mapping[str, tuple[PowerLaw | None, int]]) -> list[plots.SizeSeries]:
    values, bad = sweep.values(), sweep.unconverged()
    floor = min((e for per in values.values() for v in per.values() for e in v if e > 0), default=1e-12) / 2
    out = []
    for method in sweep.methods:
        sizes = sorted(values[method])
        stats_ = [t_interval(values[method][s]) for s in sizes]
        means = np.array([m for m, _, _ in stats_])
        half = np.nan_to_num(np.array([h for _, h, _ in stats_]), nan=0.0)
        fit, _ = fits[method]
        label = method
        if fit is not None:
            label += f": b = {fit.b:.2f}" + (f" [{fit.interval[0]:.2f}, {fit.interval[1]:.2f}]"
                                             if np.isfinite(fit.half) else "") + (" ⚠ capped" if fit.capped else "")
        out.append(plots.SizeSeries(label, np.array(sizes), means, np.maximum(means - half, floor), means + half,
                                    np.array([(method, s) in bad for s in sizes]),
                                    (fit.a, fit.b, min(fit.sizes), max(fit.sizes)) if fit is not None else None))
    return out


def _fit_table(sweep: SizeSweep, fits: Mapping[str, tuple[PowerLaw | None, int]]) -> pd.DataFrame:
    rows = {}
    for method, (fit, left_out) in fits.items():
        lo, hi = fit.interval if fit is not None else (float("nan"), float("nan"))
        rows[method] = {"exponent b": f"{fit.b:.3f}" if fit is not None else fmt.MISSING,
                        "95 % interval": f"[{lo:.3f}, {hi:.3f}]" if fit is not None and np.isfinite(fit.half)
                        else fmt.MISSING,
                        "a": f"{fit.a:.3g}" if fit is not None else fmt.MISSING,
                        "sizes used": ", ".join(_n(s) for s in fit.sizes) if fit is not None else fmt.MISSING,
                        "n points": str(fit.n) if fit is not None else "0",
                        "unconverged left out": str(left_out) if fit is None or not fit.capped
                        else f"0 (⚠ {fit.capped} capped runs in the fit: no two sizes converged)"}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    return table


def _value_table(sweep: SizeSweep) -> pd.DataFrame:
    values, bad = sweep.values(), sweep.unconverged()
    rows: dict[str, dict[str, str]] = {}
    for method in sweep.methods:
        row = {}
        for s in sweep.sizes:
            v = values[method].get(s, [])
            mean, half, n = t_interval(v)
            cell = fmt.MISSING if n == 0 else fmt.number(mean) + (f" ± {half:.2g}" if n > 1 else " (1 seed)")
            if (method, s) in bad:
                cell += f" ⚠ seed {', '.join(map(str, bad[(method, s)]))} not converged"
            row[f"N = {_n(s)}"] = cell
        rows[method] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    return table


def data_section(sweep: SizeSweep, out: Path, ctx: str) -> Section:
    """Test error against training-set size: plot, power-law table, crossover sentences."""
    fits = method_fits(sweep)
    bad = sweep.unconverged()
    name = f"efficiency_{slug(sweep.task)}_data.png"
    plots.size_curves(_series(sweep, fits), out / name, "training-set size N",
                      f"test {sweep.error_label} (lower is better)",
                      f"{sweep.task}: test {sweep.error_label} vs training size (mean, 95 % t-interval)")
    sentences = crossover_sentences(sweep.values(), sweep.exact(), bad)
    hollow = (" Hollow markers: at least one seed did not converge there (" + "; ".join(
        f"{m} at N = {_n(s)}, seed {', '.join(map(str, seeds))}" for (m, s), seeds in sorted(bad.items()))
        + "); segments touching them are dotted, and the fits leave these runs out (a method converged at fewer "
        "than two sizes is fitted over all its runs, marked ⚠ capped: the exponent at the capped budget)."
        if bad else "")
    caption = (f"Test {sweep.error_label} against training-set size N (log-log), one line per method: mean over "
               f"seeds, bars = 95 % t-interval (a lower end at or below zero is cut at the axis); dashed: the fitted "
               f"power law error ≈ a·N^b over the sizes it used, exponent b and its 95 % interval in the legend."
               f"{hollow}")
    return {"task": f"data-efficiency-{sweep.task}", "heading": f"Data efficiency: {sweep.task}",
            "context": (f"Test {sweep.error_label} (the task's primary metric, {sweep.metric}) of runs differing only "
                        f"in {SIZE} ({', '.join(_n(s) for s in sweep.sizes)}). {ctx}"),
            "notes": sentences, "figures": [(name, caption)],
            "tables": [("Power law per method: error ≈ a·N^b, least squares on (ln N, ln error) over every per-seed "
                        "point of the converged runs (scipy.stats.linregress); interval: b ± t(0.975, n − 2) · "
                        "stderr(b)", _fit_table(sweep, fits)),
                       (f"Test {sweep.error_label} per method and training size (mean ± 95 % t-interval over seeds)",
                        _value_table(sweep))]}


COSTS = (("flops", "training FLOPs (forward + backward)", "FLOPs"), ("wall_s", "training wall-clock time", "s"))


def _cost_table(sweep: SizeSweep, by_cost: Mapping[str, list[CostPoint]]) -> pd.DataFrame:
    fronts = {cost: {(p.method, p.size) for p in frontier(points)} for cost, points in by_cost.items()}
    index = {(p.method, p.size): p for points in by_cost.values() for p in points}
    rows = []
    for method, size in sorted(index):
        row: dict[str, str] = {"method": method, "N": _n(size), f"test {sweep.error_label}":
                               fmt.number(index[(method, size)].error),
                               "converged": "yes" if index[(method, size)].converged else "⚠ no"}
        for cost, _, unit in COSTS:
            p = next((q for q in by_cost[cost] if (q.method, q.size) == (method, size)), None)
            row[f"training {unit}"] = _cost(p.cost, "") if p is not None else "not counted"
            row[f"overall frontier ({unit})"] = "✓" if (method, size) in fronts[cost] else ""
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def compute_section(sweep: SizeSweep, out: Path, ctx: str) -> Section:
    """Test error against training FLOPs and wall seconds: per-method and overall frontiers and
    the best method at each budget."""
    by_cost, missing, panels, notes = {}, {}, [], []
    for cost, label, unit in COSTS:
        by_cost[cost], missing[cost] = cost_points(sweep, cost)
        points = by_cost[cost]
        panels.append(plots.CostPanel(label + f" [{unit}]", [
            (p.method, p.cost, p.error, p.size, p.converged) for p in points],
            {m: [(p.cost, p.error) for p in frontier([q for q in points if q.method == m])]
             for m in sweep.methods},
            [(p.cost, p.error) for p in frontier(points)]))
        if points:
            notes.append(f"Best at each {'training-FLOP' if cost == 'flops' else 'training-time'} budget (lowest "
                         f"test {sweep.error_label} of any method and size measured within the budget): "
                         f"{best_at_budget(points, unit)}.")
    if missing["flops"]:
        notes.append(f"FLOPs not counted for: {', '.join(missing['flops'])} (left out of the FLOP panel and its "
                     "frontier).")
    name = f"efficiency_{slug(sweep.task)}_compute.png"
    plots.cost_curves(panels, out / name, f"test {sweep.error_label} (lower is better)",
                      f"{sweep.task}: test {sweep.error_label} vs training compute (mean over seeds per method and N)")
    not_counted = (f" FLOPs not counted for: {', '.join(missing['flops'])}." if missing["flops"] else "")
    caption = ("Test error against total training FLOPs (forward + backward FLOPs of the first step × steps, "
               "torch.utils.flop_counter) and against training wall-clock seconds (validations excluded), log-log; "
               "one marker per (method, training size N), mean over seeds, larger markers for larger N, hollow "
               "where a seed did not converge; thin lines: each method's Pareto frontier (no point of the method "
               "has both lower cost and lower error); black steps: the overall frontier, the lowest error reached "
               f"within each budget.{not_counted}")
    return {"task": f"compute-efficiency-{sweep.task}", "heading": f"Compute efficiency: {sweep.task}",
            "context": (f"The runs of the data-efficiency section ({SIZE} = {', '.join(_n(s) for s in sweep.sizes)}); "
                        f"cost = the run's train.flops and train.wall_s. {ctx}"),
            "notes": notes, "figures": [(name, caption, "wide")],
            "tables": [("Per method and training size: mean test error, training FLOPs and seconds (mean over seeds), "
                        "whether the point is on the overall frontier", _cost_table(sweep, by_cost))]}


def efficiency_sections(df: pd.DataFrame, out: Path, cards: RunCards | None = None) -> list[Section]:
    """Per task of ``df`` with a ``train_size`` sweep (two sizes or more): its data-efficiency and
    compute-efficiency sections (module docstring)."""
    if df.empty or "task" not in df or "task_options" not in df:
        return []
    out_sections: list[Section] = []
    for task, g in df.groupby("task", sort=True):
        sweep = size_sweep(str(task), g, cards)
        if sweep is None:
            continue
        ctx = context_line(sweep.rows)
        out_sections += [data_section(sweep, out, ctx), compute_section(sweep, out, ctx)]
    return out_sections
