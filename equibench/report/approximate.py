"""The approximate-symmetry section: test error against the strength of a symmetry-breaking field.

For a task whose runs sweep a task option ``field`` (``nbody_field``: a constant external field
along e_z; suite ``approximate``), one section with

* a log-log plot of the task's first test metric against the field strength, one line per method
  variant (mean over seeds, error bars from the lowest to the highest seed; the tables give the
  standard deviation). The x axis is symlog:
  linear between 0 and the smallest non-zero field, logarithmic above it, so the field-free
  runs (field = 0) sit on the same axis at its left end;
* the fp64 relative equivariance error of the trained models against the field, under the task's
  own group (``equivariance.*``, e.g. O(2)_z) and under the group the field breaks
  (``equivariance_broken.*``, e.g. E(3)), two panels, same x axis;
* a table of the test metric per method and field (mean ± std over seeds), and the fitted penalty
  strength of ``soft_equivariance`` runs (``test.soft_lam``) where present;
* a sentence stating where exact methods stop winning (``crossover``).

Variants: runs of one method with different options (``frame_averaging`` with and without
``field_input``) are told apart by the options that differ among that method's runs
(``variant_labels``).

Crossover: at each field, in increasing order, the *reference* is the best (lowest mean for a
"lower is better" metric) method that claims exactness (row ``exact_claim``) and takes no
symmetry-breaking input (option ``field_input`` unset). Every other method (not exact, or given
the field as an input) is a *challenger*. The crossover is the smallest field at which a
challenger's mean is better than the reference's *and* Welch's two-sided t-test over seeds
(``verdicts.welch_p``, 5 % level) separates the two. Fields where a challenger is better in the
mean but the seeds do not separate it are reported as such; without any separated win in the
sweep the sentence says that no crossover happened.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..metrics.catalogue import broken_equivariance_metric, equivariance_metric, test_metric  # noqa: E402
from ..results.runcards import RunCards  # noqa: E402
from ..results.status import Status  # noqa: E402
from .common import fmt  # noqa: E402
from .common.metricinfo import spec_for  # noqa: E402
from .common.render import Section, slug  # noqa: E402
from .common.tables import options_of, training_line  # noqa: E402
from .verdicts import ALPHA, better, task_metric, welch_p  # noqa: E402

FIELD = "field"  # the swept task option
INPUT_OPTION = "field_input"  # the method option giving a method the symmetry-breaking input
EQ_STAT = "rel_mean"
FLOOR = 1e-17  # plotted in place of a zero equivariance error (log axis)


def variant_labels(runs: pd.DataFrame) -> pd.Series:
    """A label per run (row of ``runs``: columns ``method``, ``method_options``): the method
    name, followed by the options that differ among that method's runs and are set in this run
    (``k=v``, sorted), so that two variants of one method get two labels and a method run one way
    keeps its name."""
    opts = list(runs["method_options"].map(options_of))
    methods = [str(m) for m in runs["method"]]
    varying: dict[str, list[str]] = {}
    for method in set(methods):
        mine = [o for m, o in zip(methods, opts) if m == method]
        keys = sorted({k for o in mine for k in o})
        varying[method] = [k for k in keys if len({json.dumps(o.get(k), sort_keys=True) for o in mine}) > 1]
    labels = []
    for m, o in zip(methods, opts):
        shown = [f"{k}={o[k]}" for k in varying[m] if o.get(k) is not None]  # unset: the method's default
        labels.append(f"{m} ({', '.join(shown)})" if shown else m)
    return pd.Series(labels, index=runs.index)


def field_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The ok rows of ``df`` with columns ``field`` (float) and ``label`` (the variant) added,
    only rows whose task options carry ``field``."""
    if df.empty or "task_options" not in df:
        return df.iloc[0:0]
    ok = df[(df["status"] == Status.OK) & df["value"].notna()].copy()
    fields = ok["task_options"].map(lambda o: options_of(o).get(FIELD))
    ok = ok[fields.notna()].copy()
    if ok.empty:
        return ok
    ok[FIELD] = fields[fields.notna()].astype(float)
    ok["label"] = variant_labels(ok) if "method_options" in ok else ok["method"].astype(str)
    return ok


def values_by(rows: pd.DataFrame, metric: str) -> dict[str, dict[float, list[float]]]:
    """``{label: {field: [value per seed]}}`` of ``metric``."""
    out: dict[str, dict[float, list[float]]] = {}
    sel = rows[rows["metric"] == metric]
    for label, field, v in zip(sel["label"], sel[FIELD], sel["value"]):
        out.setdefault(str(label), {}).setdefault(float(field), []).append(float(v))
    return out


def exact_without_input(rows: pd.DataFrame) -> set[str]:
    """Labels of the runs that claim exactness and take no symmetry-breaking input."""
    claims = rows.get("exact_claim", pd.Series(False, index=rows.index)).fillna(False).astype(bool)
    inputs = rows["method_options"].map(lambda o: bool(options_of(o).get(INPUT_OPTION))) \
        if "method_options" in rows else pd.Series(False, index=rows.index)
    exact = rows[claims & ~inputs]["label"]
    mixed = set(rows[~(claims & ~inputs)]["label"])
    return set(exact) - mixed


@dataclass
class Crossover:
    """Where exact methods without the breaking input stop winning (module docstring).

    ``field``: the crossover field (None: none in the sweep); ``winner`` / ``reference``: the
    challenger and the best exact method there, with their seed values and the Welch p-value;
    ``unseparated``: (field, challenger, reference, p) where a challenger was better in the mean
    but seeds did not separate them, before the crossover; ``later_losses``: larger fields at
    which no challenger beat the reference with seeds separating them."""
    field: float | None
    winner: str | None = None
    reference: str | None = None
    winner_values: Sequence[float] = ()
    reference_values: Sequence[float] = ()
    p: float = float("nan")
    unseparated: Sequence[tuple[float, str, str, float]] = ()
    later_losses: Sequence[float] = ()
    fields: Sequence[float] = ()


def _mean(v: Sequence[float]) -> float:
    return float(np.mean(v)) if len(v) else float("nan")


def find_crossover(values: Mapping[str, Mapping[float, Sequence[float]]], exact: set[str],
                   direction: str | None) -> Crossover:
    """The crossover of ``values`` (``{label: {field: seed values}}``) with ``exact`` the labels
    of the exact methods without breaking input (module docstring)."""
    fields = sorted({f for per in values.values() for f in per})
    unseparated: list[tuple[float, str, str, float]] = []
    wins: dict[float, tuple[str, str, float]] = {}
    for f in fields:
        refs = [(lab, per[f]) for lab, per in values.items() if lab in exact and per.get(f)]
        if not refs:
            continue
        ref, ref_vals = min(refs, key=lambda r: _mean(r[1]) * (-1.0 if direction == "higher" else 1.0))
        best: tuple[str, float] | None = None
        for lab, per in sorted(values.items()):
            vals = per.get(f)
            if lab in exact or not vals or not better(_mean(vals), _mean(ref_vals), direction):
                continue
            p = welch_p(vals, ref_vals)
            if np.isfinite(p) and p < ALPHA:
                if best is None or better(_mean(vals), _mean(values[best[0]][f]), direction):
                    best = (lab, p)
            else:
                unseparated.append((f, lab, ref, p))
        if best is not None:
            wins[f] = (best[0], ref, best[1])
    if not wins:
        return Crossover(None, unseparated=unseparated, fields=fields)
    first = min(wins)
    winner, ref, p = wins[first]
    later = [f for f in fields if f > first and f not in wins]
    return Crossover(first, winner, ref, list(values[winner][first]), list(values[ref][first]), p,
                     [u for u in unseparated if u[0] < first], later, fields)


def _stat(v: Sequence[float]) -> str:
    if len(v) < 2:
        return f"{fmt.number(_mean(v))} (1 seed)"
    return f"{fmt.number(_mean(v))} ± {fmt.number(float(np.std(v, ddof=1)))}"


def crossover_sentence(c: Crossover, metric: str, option: str = FIELD) -> str:
    """One sentence (or two) stating the crossover of ``c`` for ``metric``."""
    span = f"{option} = {', '.join(f'{f:g}' for f in c.fields)}"
    if c.field is None:
        text = (f"No crossover within the sweep ({span}): at no {option} strength did a method without "
                f"built-in exactness or with the {option} as an input beat the best exact method without "
                f"it on {metric} with seeds separating them (Welch's t-test, {ALPHA:.0%} level).")
        if c.unseparated:
            f, lab, ref, p = c.unseparated[0]
            text += (f" The first mean advantage, {lab} over {ref} at {option} = {f:g}, is not separated by the "
                     f"seeds (p = {p:.2g}).")
        return text
    n = min(len(c.winner_values), len(c.reference_values))
    text = (f"Exact methods without the {option} input stop winning at {option} = {c.field:g}: {c.winner} "
            f"({metric} {_stat(c.winner_values)}) beats the best exact method without it, {c.reference} "
            f"({_stat(c.reference_values)}), Welch's t-test p = {c.p:.2g} over {n} seeds (mean ± std).")
    if c.unseparated:
        fs = sorted({u[0] for u in c.unseparated})
        text += (f" Below it, at {option} = {', '.join(f'{f:g}' for f in fs)}, a mean advantage of a challenger "
                 "was not separated by the seeds.")
    if c.later_losses:
        text += (f" At the larger {option} = {', '.join(f'{f:g}' for f in c.later_losses)} no challenger beat it "
                 "with seeds separating them.")
    return text


def _symlog_x(ax: Any, fields: Sequence[float]) -> None:
    nonzero = [f for f in fields if f > 0]
    ax.set_xscale("symlog", linthresh=min(nonzero) if nonzero else 1.0, linscale=0.5)
    ax.set_xticks(list(fields))
    ax.set_xticklabels([f"{f:g}" for f in fields], fontsize=7)


def _lines(ax: Any, values: Mapping[str, Mapping[float, Sequence[float]]], exact: set[str], floor: float = 0.0
           ) -> None:
    """One line per label: mean over seeds, bars from the lowest to the highest seed (a range
    stays positive on a log axis, where mean ± std may not)."""
    for label in sorted(values):
        per = values[label]
        xs = sorted(per)
        mean = np.array([max(_mean(per[f]), floor) for f in xs])
        lo = np.array([max(min(per[f]), floor) for f in xs])
        hi = np.array([max(max(per[f]), floor) for f in xs])
        ax.errorbar(xs, mean, yerr=[mean - lo, hi - mean], marker="o", ms=3.5, capsize=2,
                    linestyle="-" if label in exact else "--", label=label)


def plot_error(values: Mapping[str, Mapping[float, Sequence[float]]], exact: set[str], path: Path, ylabel: str,
               title: str) -> None:
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    _lines(ax, values, exact)
    fields = sorted({f for per in values.values() for f in per})
    _symlog_x(ax, fields)
    ax.set_yscale("log")
    ax.set_xlabel(f"{FIELD} strength (symlog: linear below {min([f for f in fields if f > 0] or [1]):g})")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_equivariance(panels: Sequence[tuple[str, Mapping[str, Mapping[float, Sequence[float]]]]], exact: set[str],
                      path: Path) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.4), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        _lines(ax, values, exact, floor=FLOOR)
        _symlog_x(ax, sorted({f for per in values.values() for f in per}))
        ax.set_yscale("log")
        ax.set_xlabel(f"{FIELD} strength")
        ax.set_ylabel("fp64 rel. equivariance error (trained, mean)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(v: Sequence[float], kind: str) -> str:
    if not len(v):
        return fmt.MISSING
    if len(v) == 1:
        return f"{fmt.number(v[0], kind)} (1 seed)"
    return f"{fmt.number(_mean(v), kind)} ± {fmt.number(float(np.std(v, ddof=1)), kind)}"


def _table(values: Mapping[str, Mapping[float, Sequence[float]]], kind: str = "g") -> pd.DataFrame:
    fields = sorted({f for per in values.values() for f in per})
    rows = {}
    for label in sorted(values):
        per = values[label]
        rows[label] = {f"{FIELD}={f:g}": _cell(per.get(f, []), kind) for f in fields}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    return table


def _groups(rows: pd.DataFrame) -> str:
    names: list[str] = sorted({str(x) for x in rows["group"].dropna()}) if "group" in rows else []
    return "/".join(names) or "?"


def approximate_section(task: str, df: pd.DataFrame, out: Path, cards: RunCards | None = None) -> Section | None:
    """The section of one task whose runs sweep ``field`` (None when fewer than two fields); its
    metric is the task's primary one (its card; ``cards`` None: the rows alone)."""
    rows = field_runs(df)
    if rows.empty or rows[FIELD].nunique() < 2:
        return None
    metric = task_metric(rows, cards) or test_metric("mse")
    spec = spec_for(metric)
    values = values_by(rows, metric)
    exact = exact_without_input(rows)
    cross = find_crossover(values, exact, spec.direction)
    sentence = crossover_sentence(cross, spec.display)
    name = slug(f"approximate_{task}")
    plot_error(values, exact, out / f"{name}_error.png", f"test {spec.display} (mean, range over seeds)",
               f"{task}: test {spec.display} vs {FIELD} (solid: exact without {FIELD} input)")
    eq_task, eq_broken = equivariance_metric("trained", "fp64", EQ_STAT), \
        broken_equivariance_metric("trained", "fp64", EQ_STAT)
    panels = [(f"under the task's group ({_groups(rows[rows['metric'] == eq_task])})", values_by(rows, eq_task)),
              (f"under the broken group ({_groups(rows[rows['metric'] == eq_broken])})",
               values_by(rows, eq_broken))]
    panels = [p for p in panels if p[1]]
    figures = [(f"{name}_error.png", f"Test {spec.display} against {FIELD} strength, log-log (symlog x: {FIELD} = 0 "
                "at the left end, linear up to the smallest non-zero field); mean over seeds, bars = lowest to highest "
                "seed. Solid "
                f"lines: methods claiming exactness without the {FIELD} input; dashed: the rest.")]
    if panels:
        plot_equivariance(panels, exact, out / f"{name}_equivariance.png")
        figures.append((f"{name}_equivariance.png", "fp64 relative equivariance error of the trained models "
                        "(||f(g·X) − ρ(g) f(X)|| / ||f(X)||, mean over test graphs and sampled elements; "
                        "mean over seeds, bars = range) under the "
                        f"task's group and under the group the {FIELD} breaks; zeros drawn at {FLOOR:g}."))
    seeds = sorted({int(s) for s in rows["seed"].dropna()})
    eq_rows = rows[rows["metric"] == eq_task]
    n_graphs = fmt.number(eq_rows["batch_size"].max(), "int") if "batch_size" in eq_rows and len(eq_rows) else "?"
    n_samples = fmt.number(eq_rows["repeats"].max(), "int") if "repeats" in eq_rows and len(eq_rows) else "?"
    context = (f"Runs of {task} sweeping {FIELD} over {', '.join(f'{f:g}' for f in cross.fields)}; test "
               f"{spec.display} on the test split, mean ± std over seeds {', '.join(map(str, seeds))} (fp32 models); "
               f"equivariance error in fp64 on {n_graphs} test graphs × {n_samples} sampled elements; "
               f"{training_line(rows) or 'training settings not recorded'}. {sentence}")
    tables = [(f"Test {spec.display} per method and {FIELD} (mean ± std over seeds)", _table(values))]
    extra = ((f"fp64 equivariance error under the task's group per {FIELD}", eq_task),
             (f"fp64 equivariance error under the broken group per {FIELD}", eq_broken),
             (f"fitted penalty strength lam (soft_equivariance) per {FIELD}", test_metric("soft_lam")))
    for title, metric_name in extra:
        vals = values_by(rows, metric_name)
        if vals:
            tables.append((title, _table(vals, "sci" if "equivariance" in metric_name else "g")))
    return {"task": f"approximate-{task}", "heading": f"Approximate symmetry: {task} against {FIELD} strength",
            "context": context, "notes": [sentence], "figures": figures, "tables": tables}


def approximate_sections(df: pd.DataFrame, out: Path, cards: RunCards | None = None) -> list[Section]:
    """One section per task of ``df`` whose runs sweep ``field`` over at least two values."""
    if df.empty or "task" not in df:
        return []
    sections = []
    for task, g in df.groupby("task", sort=True):
        section = approximate_section(str(task), g, out, cards)
        if section:
            sections.append(section)
    return sections
