"""The section of one task: the verdict table first (``verdicts``), the full method table (grouped
headers, collapsible) and the figures (learning curves against step, wall-clock seconds and
training FLOPs with the trivial predictor as reference, test metric against throughput with the
Pareto front, equivariance error per method, degeneracy curves (a training-size sweep has sections
of its own: ``efficiency``), the table of exactly symmetric inputs and, on image tasks, the Lie derivative
along continuous affine generators)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics.catalogue import CURVE_VAL, degeneracy_metric, equivariance_metric, symmetric_metric, throughput_metric
from ..metrics.conservation import conservation_metric
from ..metrics.image_lie import GENERATORS, UNITS, image_lie_metric
from ..results.runcards import RunCards, cards_for
from ..results.status import Status
from .common import fmt, plots
from .common.metricinfo import spec_for
from .common.render import Section, slug
from .common.tables import (
    EQUIVARIANCE_COLUMNS,
    UNSTABLE_NOTE,
    context_line,
    diagnostic_columns,
    profile_table,
    score_columns,
    seed_table,
    split_sweeps,
    split_tuning,
    task_table,
    tuning_table,
    unstable_timings,
)
from .verdicts import TaskFacts, assess, exact_vs_baseline, verdict_table

THROUGHPUT_AXIS = throughput_metric("inference", "graphs_per_s")
DEGENERACY_CURVE = degeneracy_metric("gap", "rel_max")
DEGENERACY_SYMMETRIC = degeneracy_metric("config", "rel_max")
QUALITY_GROUPS = ("model", "accuracy", "equivariance", "other")  # the full table's first part


def _verdict_context(df: pd.DataFrame) -> dict[str, str]:
    """How the verdict table's equivariance and speed columns were measured (for its caption)."""
    ok = df[df["status"] == Status.OK]
    out = {}
    eq = ok[ok["metric"] == equivariance_metric("trained", "fp64", "rel_max")]
    if len(eq) and "batch_size" in eq and eq["batch_size"].notna().any():
        groups = ", ".join(sorted(set(eq["group"].dropna()))) if "group" in eq else "?"
        out["equivariance"] = (f"{int(eq['batch_size'].dropna().iloc[0])} test graphs × "
                               f"{int(eq['repeats'].dropna().iloc[0]) if 'repeats' in eq else '?'} sampled elements of "
                               f"{groups} (translations and node permutations included)")
    tp = ok[ok["metric"] == THROUGHPUT_AXIS]
    if len(tp) and "batch_size" in tp:
        batch = ", ".join(str(int(b)) for b in sorted(set(tp["batch_size"].dropna())))
        reps = int(tp["repeats"].dropna().iloc[0]) if "repeats" in tp and tp["repeats"].notna().any() else "?"
        dtype = ", ".join(sorted(set(tp["dtype"].dropna()))) if "dtype" in tp else "?"
        per_config = tp.groupby("method")["seed"].nunique() if "seed" in tp else pd.Series(dtype=int)
        once = (f"measured once per configuration (seed {', '.join(str(int(s)) for s in sorted(set(tp['seed'])))}"
                "'s point: throughput does not depend on the weights)" if len(per_config) and per_config.max() == 1
                else "mean over the seeds that measured it")
        timer = ", ".join(sorted(set(tp["timer"].dropna()))) if "timer" in tp else ""
        out["throughput"] = (f"graphs/s, {dtype}, batch {batch} graphs, median of {reps} repeats after warm-up"
                             f"{f' (timer: {timer})' if timer else ''}; {once}")
    return out


def _pareto_figure(task: str, agg: pd.DataFrame, std: pd.DataFrame, y: str, n_seeds: int, out: Path,
                   ctx: str) -> tuple[str, str] | None:
    if THROUGHPUT_AXIS not in agg:
        return None
    ys, xs = spec_for(y), spec_for(THROUGHPUT_AXIS)
    table = agg.assign(_yerr=std[y] if y in std and n_seeds > 1 else np.nan)
    path = out / f"{slug(task)}_accuracy_vs_throughput.png"
    plots.accuracy_vs_throughput(table, xs, ys, path, f"{task}: {ys.display} vs {xs.display}",
                                 y_err="_yerr" if n_seeds > 1 else None)
    front = "; dashed: Pareto front" if ys.direction else ""
    return path.name, f"Test {ys.display} (mean over seeds) against {xs.display} [{xs.unit}]{front}. {ctx}"


def _equivariance_figure(task: str, agg: pd.DataFrame, out: Path, ctx: str) -> tuple[str, str] | None:
    series = []
    for name in EQUIVARIANCE_COLUMNS:
        if name in agg:
            s = spec_for(name)
            series.append((f"{s.dtype} {s.stage}", name, equivariance_metric(s.stage or "", s.dtype or "", "rel_max")))
    if not series:
        return None
    path = out / f"{slug(task)}_equivariance.png"
    plots.equivariance_bars(agg, series, path, f"{task}: relative equivariance error")
    return path.name, ("Relative equivariance error per method, log scale; marker = mean, bar = max over graphs "
                       "and samples; dotted 1e-10, dashed 1e-4. " + ctx)


def _degeneracy(task: str, df: pd.DataFrame, out: Path, ctx: str) -> tuple[tuple[str, str] | None, pd.DataFrame | None]:
    ok = df[df["status"] == Status.OK]
    deg = ok[ok["metric"] == DEGENERACY_CURVE]
    if deg.empty:
        return None, None
    data = deg.groupby(["method", "x"])["value"].mean().reset_index()
    data["value"] = data["value"].clip(lower=1e-17)
    path = out / f"{slug(task)}_degeneracy.png"
    plots.curves(data, "x", "value", "method", path, f"{task}: equivariance error near degeneracy",
                 "covariance eigenvalue gap (0 = exactly degenerate)", "max relative equivariance error (fp64)")
    figure = (path.name, "Max relative equivariance error (fp64, trained) as the two smallest covariance "
                         "eigenvalues of the positions approach a tie. " + ctx)
    sym = ok[ok["metric"] == DEGENERACY_SYMMETRIC]
    table = None
    if len(sym):
        spec = spec_for(DEGENERACY_SYMMETRIC)
        table = sym.pivot_table(index="method", columns="x_label", values="value", aggfunc=spec.aggregate)
        table = table.map(lambda v: fmt.number(v, spec.number_format))
    return figure, table


def _learning_curves(task: str, df: pd.DataFrame, facts: TaskFacts, out: Path, ctx: str) -> tuple[str, ...] | None:
    curve = df[(df["status"] == Status.OK) & (df["metric"] == CURVE_VAL)]
    if curve.empty or "x" not in curve:
        return None
    spec = facts.spec or spec_for(CURVE_VAL)
    cols = {"x": "step", "curve_wall_s": "wall_s", "curve_flops": "flops"}
    curve = curve.assign(**{c: curve[c] if c in curve else np.nan for c in cols})
    order = [r.method for r in facts.ranked] + sorted(set(curve["method"]) - {r.method for r in facts.ranked})
    lines = []
    for method in order:
        g = curve[curve["method"] == method]
        if g.empty:
            continue
        data = g.groupby("x", as_index=False).agg(value=("value", "mean"), wall_s=("curve_wall_s", "mean"),
                                                   flops=("curve_flops", "mean")).rename(columns={"x": "step"})
        unconverged = bool(facts.methods.get(method) and facts.methods[method].not_converged)
        lines.append((f"{method} (not converged)" if unconverged else str(method), data,
                      "o--" if unconverged else "o-"))
    seeds = ", ".join(str(s) for s in sorted(set(curve["seed"].dropna())))
    path = out / f"{slug(task)}_learning_curves.png"
    plots.learning_curves(lines, [("step", "optimiser step"), ("wall_s", "training wall-clock time [s]"),
                                  ("flops", "training FLOPs (forward + backward)")],
                          plots.axis_label(spec, f"validation {spec.display}"), path,
                          f"{task}: learning curves (validation {spec.display}, mean over seeds)",
                          reference=facts.trivial, reference_label="trivial predictor (test split)",
                          logy=spec.log_scale)
    trivial = (f" Dashed black: the trivial predictor's test {spec.display} ({fmt.number(facts.trivial)})."
               if facts.trivial is not None else "")
    return (path.name, f"Learning curves: validation {spec.display} (the task's first metric, on the validation "
                       f"split) against optimiser step, training wall-clock seconds (training only, validations "
                       f"excluded) and training FLOPs (forward + backward FLOPs of the first step × steps), one line "
                       f"per method, mean over seeds {seeds} at each validation; dashed lines: runs that did not "
                       f"converge.{trivial} {ctx}", "wide")


def _diagnostic_notes(agg: pd.DataFrame, roles: Mapping[str, str]) -> list[str]:
    return [f"{spec_for(c).display}{' [' + spec_for(c).unit + ']' if spec_for(c).unit else ''} (method "
            f"diagnostics): {spec_for(c).description}" for c in diagnostic_columns(agg.columns, roles)]


def _convergence_text(facts: TaskFacts) -> dict[str, str]:
    out = {}
    for name, m in facts.methods.items():
        verdicts = sorted(set(m.convergence.values()))
        out[name] = ", ".join(v.replace("_", " ") for v in verdicts) if verdicts else fmt.MISSING
    return out


SCOPE_WORDS = {"every_input": "every input", "generic_inputs": "inputs without a symmetry of their own"}
SYMMETRIC_LIMIT = 1e-10  # what every-input methods are held to (tests/test_symmetric_inputs.py)


def symmetric_inputs_table(df: pd.DataFrame) -> tuple[str, pd.DataFrame] | None:
    """Per method (rows) and exactly symmetric input (columns, with its point group): the max
    relative equivariance error of the trained fp64 model over the sampled elements, worst seed,
    beside the method's declared exactness scope (None without ``symmetric.*`` rows)."""
    ok = df[df["status"] == Status.OK] if len(df) else df
    rel = ok[ok["metric"] == symmetric_metric("trained", "rel_max")] if len(ok) else ok
    if rel.empty or "symmetric_input" not in rel:
        return None
    disp = ok[ok["metric"] == symmetric_metric("trained", "disp_rel_max")]
    groups = (rel.dropna(subset=["point_group"]).groupby("symmetric_input")["point_group"].first()
              if "point_group" in rel else pd.Series(dtype=object))
    inputs = list(dict.fromkeys(rel["symmetric_input"]))
    scopes = (ok.drop_duplicates("method").set_index("method")["exact_scope"]
              if "exact_scope" in ok else pd.Series(dtype=object))

    def worst(rows: pd.DataFrame) -> dict[tuple[str, str], float]:
        # NaN (a non-finite output) counts as the worst value, never as missing
        return {(str(m), str(name)): float("inf") if g["value"].isna().any() else float(g["value"].max())
                for (m, name), g in rows.groupby(["method", "symmetric_input"])}

    r_max, d_max = worst(rel), worst(disp) if len(disp) else {}
    failed = ({(str(m), str(name)) for m, name, e in zip(rel["method"], rel["symmetric_input"], rel["symmetric_error"])
               if isinstance(e, str) and e} if "symmetric_error" in rel else set())
    order = {"every_input": 0, "generic_inputs": 1}
    methods = sorted(set(rel["method"]), key=lambda m: (order.get(str(scopes.get(m)), 2), str(m)))
    data = {}
    for m in methods:
        scope = scopes.get(m)
        row = {"exact on": SCOPE_WORDS.get(str(scope), "not exact") if isinstance(scope, str) else "not exact"}
        for name in inputs:
            v = r_max.get((m, name))
            cell = (fmt.MISSING if v is None else Status.FAILED.value if (str(m), str(name)) in failed
                    else "non-finite" if not np.isfinite(v) else fmt.number(v, "sci"))
            if (m, name) in d_max and (str(m), str(name)) not in failed:
                d = d_max[(m, name)]
                cell += f" / {'non-finite' if not np.isfinite(d) else fmt.number(d, 'sci')}"
            if scope == "every_input" and v is not None and not v <= SYMMETRIC_LIMIT:
                cell += " ⚠"
            row[f"{name} ({str(groups[name]).replace('_inf_', '∞')})" if name in groups else name] = cell
        data[m] = row
    table = pd.DataFrame.from_dict(data, orient="index")
    table.index.name = "method"
    n = rel["repeats"].dropna() if "repeats" in rel else pd.Series(dtype=float)
    grp = ", ".join(sorted(set(rel["group"].dropna()))) if "group" in rel else "?"
    point = (" For point outputs, a / b: relative to ||f(X)|| / relative to the predicted displacement "
             "||f(X) − x||." if d_max else "")
    caption = ("Exactly symmetric inputs: max relative equivariance error ||f(g·X) − ρ(g) f(X)|| / ||f(X)|| of the "
               f"trained model rebuilt in float64 on each of the task's standard exactly symmetric inputs (point "
               f"group in the header), over {int(n.iloc[0]) if len(n) else '?'} sampled elements g of {grp} "
               "(translations and node permutations included), worst seed; 'failed': the model raised on the input, "
               "'non-finite': it returned NaN or inf." + point + " 'exact on': the scope the "
               "method declares: intrinsic architectures are exact on every input (held to 1e-10, ⚠ when over); "
               "frame, canonicalisation and local-frame methods only on inputs without a symmetry of their own "
               "(their frame is undecided on these inputs, so an error here is the declared scope, not an "
               "anomaly). The curves as an input approaches such a symmetry are the degeneracy figure "
               "(evaluate option degeneracy)")
    return caption, table


def image_lie_table(agg: pd.DataFrame, df: pd.DataFrame) -> tuple[str, pd.DataFrame] | None:
    """Image tasks: per method, the mean relative Lie derivative along each affine generator at
    init → trained (``image_lie.*``, mean over seeds), beside the discrete-group equivariance error
    of the trained fp64 model (None without ``image_lie.*`` rows)."""
    names = [image_lie_metric(stage, g, "rel_mean") for g in GENERATORS for stage in ("init", "trained")]
    if not any(n in agg for n in names):
        return None
    equiv = equivariance_metric("trained", "fp64", "rel_mean")
    data = {}
    for method in sorted(agg.index, key=str):
        m = agg.loc[method]
        row = {f"{g.replace('_', ' ')} [{UNITS[g]}]": " → ".join(
            fmt.number(m.get(image_lie_metric(stage, g, "rel_mean")), "sci") for stage in ("init", "trained"))
            for g in GENERATORS}
        row["equiv. err fp64 trained (discrete group)"] = fmt.number(m.get(equiv), "sci")
        data[method] = row
    table = pd.DataFrame.from_dict(data, orient="index")
    table.index.name = "method"
    rows = df[(df["status"] == Status.OK) & (df["metric"] == names[0])] if len(df) else df
    n = int(rows["batch_size"].dropna().iloc[0]) if len(rows) and "batch_size" in rows else "?"
    groups = ", ".join(sorted(set(df[df["metric"] == equiv]["group"].dropna()))) if "group" in df else "?"
    caption = ("Lie derivative on images (Gruver et al., ICLR 2023), init → trained: ||d/dt f(exp(tA)·x)|| at t = 0 "
               "for continuous rotation, translations, isotropic scaling and shear A, by a central difference "
               "(step: evaluate option image_lie_derivative_step, default 1e-4) of an explicit bilinear affine "
               "warp of the image (zero padding) through the float64 model, relative to the RMS spread of the "
               f"logits between images, mean over the first {n} upright test images and over seeds (image_lie.*; "
               "lower = closer to invariant along that generator; per radian, per pixel, per unit log-scale / "
               "shear). Exact C4/C8 methods are exact for their discrete rotations only: the last column is their "
               f"equivariance error under the task's group ({groups or '?'}), the continuous derivative shows "
               "what the grid and the architecture leave")
    return caption, table


def _forces_kind(options: object) -> str:
    return "−dE/dx" if isinstance(options, dict) and options.get("forces") == "conservative" else "direct"


def force_conservation_table(agg: pd.DataFrame, df: pd.DataFrame,
                             metric: str | None) -> tuple[str, pd.DataFrame] | None:
    """Force tasks: per method, whether its forces are -dE/dx or direct, its test error, the relative
    curl of its force Jacobian (init → trained, and the trained max) and the NVE energy drift of the
    trained model, with its training speed: the accuracy and speed cost of conservation side by side
    (``force_conservation.*``, mean over seeds; None without those rows)."""
    curl = [conservation_metric(stage, "curl_mean") for stage in ("init", "trained")]
    drift = [conservation_metric("trained", stat) for stat in ("drift_mean", "drift_max")]
    if not any(n in agg for n in (*curl, *drift)):
        return None
    kinds = ({str(k): v for k, v in df.groupby("method")["method_options"].first().map(_forces_kind).items()}
             if "method_options" in df else {})
    data = {}
    for method in sorted(agg.index, key=str):
        m = agg.loc[method]
        row = {"forces": kinds.get(method, "direct")}
        if metric:
            spec = spec_for(metric)
            row[f"test {spec.display}" + (f" [{spec.unit}]" if spec.unit else "")] = fmt.number(m.get(metric))
        row["curl init → trained (mean)"] = " → ".join(fmt.number(m.get(c), "sci") for c in curl)
        row["curl trained (max)"] = fmt.number(m.get(conservation_metric("trained", "curl_max")), "sci")
        row["NVE drift mean / max [meV/atom/ps]"] = " / ".join(fmt.number(m.get(d)) for d in drift)
        row["training steps/s"] = fmt.number(m.get("train.steps_per_s"))
        data[method] = row
    table = pd.DataFrame.from_dict(data, orient="index")
    table.index.name = "method"
    rows = df[(df["status"] == Status.OK) & (df["metric"] == drift[0])]

    def first(col: str) -> str:
        v = rows[col].dropna() if col in rows else pd.Series(dtype=object)
        return fmt.number(v.iloc[0]) if len(v) else "?"
    caption = ("Force conservation (float64 copy of each model): the relative curl ||(J − Jᵀ)/2||_F / ||J||_F of the "
               "force Jacobian J = dF/dx per test molecule (0 for −dE/dx forces up to rounding; a direct-force model "
               "has no reason to be symmetric), and the energy drift |slope of K + U| of a velocity-Verlet NVE run "
               f"driven by the trained model ({first('steps')} steps of {first('timestep_fs')} fs from "
               f"Maxwell-Boltzmann velocities at {first('temperature_K')} K, on {first('batch_size')} test molecules; "
               "U: the model's energy, or for direct forces the line integral of F from the start, so a field with "
               "curl drifts). Mean over seeds; the test error and the training speed show what conservation "
               "costs (force_conservation.*)")
    return caption, table


def task_section(task: str, df_all: pd.DataFrame, out: Path, ranked: bool = True,
                 cards: RunCards | None = None) -> Section:
    """The section of ``task`` from its rows (all (method, seed) runs, sweeps and tuning runs
    included) and the runs' ``cards`` (the task's metric roles, the methods wrapping the backbone;
    None: the cards the rows alone give). ``ranked=False`` (a run not meant for verdicts, e.g. a
    smoke run): the verdict table has no ranks."""
    cards = cards if cards is not None else cards_for((), df_all)
    roles = cards.roles(task)
    df_all, tuning = split_tuning(df_all)
    df, _ = split_sweeps(df_all)
    agg, std = seed_table(df)
    n_seeds = df["seed"].nunique()
    ctx = context_line(df)
    facts = assess(task, df, cards)
    unstable = unstable_timings(df)
    section: Section = {"task": task, "context": ctx, "figures": [], "index_label": "method", "css": "results",
                        "tables": [], "verdict": verdict_table(facts, _verdict_context(df), ranked=ranked,
                                                               unstable=unstable),
                        "collapse": "Full table: every measured number per method (mean over seeds, ± std when "
                                    "there are several): accuracy and equivariance, method diagnostics, then "
                                    "speed, memory and training",
                        "notes": _diagnostic_notes(agg, roles) if len(agg) else []}
    versus = exact_vs_baseline(facts) if ranked else ""
    if versus:
        section["notes"] = [versus, *section["notes"]]
    if unstable:
        section["notes"] = [*section["notes"], UNSTABLE_NOTE + " Flagged: " + ", ".join(
            f"{m} ({mode})" for m, mode in sorted(unstable, key=str)) + "."]
    full = task_table(agg, std, n_seeds, facts.metric, _convergence_text(facts), unstable, roles=roles,
                      wrappers=cards.wrappers())
    if len(full):  # two tables (accuracy and equivariance | speed, memory and training) so that each fits
        quality = [c for c in full.columns if c[0] in QUALITY_GROUPS]
        diagnostics = [c for c in full.columns if c[0] == "method diagnostics"]
        section["table"] = full.loc[:, quality]
        section["more"] = [("diagnostics", full.loc[:, diagnostics]),
                           ("costs", full.loc[:, [c for c in full.columns if c not in quality + diagnostics]])]
    else:
        section["table"] = full
    tests = score_columns(agg, facts.metric, roles) if len(agg) else []
    figures = [_learning_curves(task, df, facts, out, ctx),
               _pareto_figure(task, agg, std, tests[0], n_seeds, out, ctx) if tests else None,
               _equivariance_figure(task, agg, out, ctx) if len(agg) else None]
    deg_figure, symmetric = _degeneracy(task, df, out, ctx)
    section["figures"] = [f for f in (*figures, deg_figure) if f]
    tuned = tuning_table(tuning, df)
    if len(tuned):
        section["tables"].append(("Tuning on the validation split: best validation value of the task's first metric "
                                  "per grid setting (mean over the tuning seeds; ✓ = the setting the measured runs "
                                  "used)", tuned))
    profile = profile_table(df)
    if profile is not None:  # beside the speed columns: what a wrapper's time is made of
        section["tables"].insert(0, profile)
    conservation = force_conservation_table(agg, df, facts.metric) if len(agg) else None
    if conservation is not None:  # beside the accuracy and speed columns of the full table
        section["tables"].insert(0, conservation)
    image_lie = image_lie_table(agg, df) if len(agg) else None
    if image_lie is not None:  # beside the equivariance columns of the full table
        section["tables"].insert(0, image_lie)
    standard = symmetric_inputs_table(df)
    if standard is not None:
        section["tables"].insert(0, standard)
    if symmetric is not None:
        section["tables"].append((
            "Degeneracy stress test: max relative equivariance error (fp64, trained) with each test graph's positions "
            "replaced by an exactly symmetric configuration of its size, its other fields kept (degeneracy.config.*; "
            "the task's own symmetric inputs, with every field symmetric, are the first table)", symmetric))
    return section
