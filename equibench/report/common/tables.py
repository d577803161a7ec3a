"""Tables of the per-task report sections: aggregation over seeds (as the catalogue says), the
full method table with grouped headers (model | accuracy | equivariance | speed | memory |
training; which metrics are the task's own and which a method's diagnostics, as the task's card
assigns their roles), units and sort order from the catalogue, the list of runs without results,
the "how it was measured" line (training budget included) and the split of sweep variants from
the base runs."""
from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...benches.training import TrainConfig
from ...benches.tuning import TuneBench
from ...core.envinfo import loaded
from ...metrics.catalogue import (
    PARAMS,
    PROFILE_REGIONS,
    THROUGHPUT_MODES,
    equivariance_metric,
    lie_metric,
    profile_metric,
    throughput_metric,
    train_metric,
    tune_metric,
)
from ...metrics.image_lie import image_lie_metric
from ...metrics.throughput import UNSTABLE_REL_IQR, is_unstable
from ...results.runcards import legacy_roles, legacy_wrappers
from ...results.status import Status, worst
from ...results.store import upgrade_frame
from . import fmt
from .metricinfo import header, metric_names, select, spec_for, value
from .render import slug

_AGGREGATES = ["mean", "median", "max", "min", "first"]

EQUIVARIANCE_COLUMNS = (equivariance_metric("trained", "fp32", "rel_mean"),
                        equivariance_metric("trained", "fp64", "rel_mean"),
                        equivariance_metric("init", "fp64", "rel_mean"))
LIE_COLUMN = lie_metric("trained", "rel_mean")
#: image tasks: the trained model's rotation Lie derivative (every generator: ``task_section.image_lie_table``)
IMAGE_LIE_COLUMN = image_lie_metric("trained", "rotation", "rel_mean")


def options_of(v: Any) -> dict[str, Any]:
    """A row's ``task_options`` / ``method_options`` as a dict (rows read back from Parquet may hold
    them as JSON text; anything else is no options)."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return {}
    return v if isinstance(v, dict) else {}


def seed_table(df: pd.DataFrame, index: str = "method") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(aggregate over seeds, std over seeds) of every metric of the ok rows; index = ``index``,
    columns = metric. Each metric aggregates as its catalogue spec says (mean, max, ...)."""
    ok = df[(df["status"] == Status.OK) & df["value"].notna()] if len(df) else df
    if ok.empty:
        return pd.DataFrame(), pd.DataFrame()
    stats = ok.groupby([index, "metric"])["value"].agg([*_AGGREGATES, "std"])
    pick = [_AGGREGATES.index(spec_for(m).aggregate) for m in stats.index.get_level_values("metric")]
    agg = pd.Series(stats[_AGGREGATES].to_numpy()[np.arange(len(stats)), pick], index=stats.index)
    return agg.unstack("metric"), stats["std"].unstack("metric")


Roles = Mapping[str, str]  # metric -> its role on the task (``RunCards.roles``; ``results.cards.ROLES``)


def _in_role_order(names: Iterable[str], roles: Roles) -> list[str]:
    """``names`` in the order of ``roles`` (the card's: declared metrics first), then by name."""
    order = {m: i for i, m in enumerate(roles)}
    return sorted(dict.fromkeys(names), key=lambda m: (order.get(m, len(order)), m))


def task_metric_names(names: Iterable[str], roles: Roles | None = None) -> list[str]:
    """The task's own metrics among ``names`` (role ``primary`` or ``task``), in the card's order;
    without ``roles`` (rows not from a report of run directories) the roles the report gave
    before cards (``runcards.legacy_roles``)."""
    names = list(dict.fromkeys(names))
    roles = legacy_roles(names) if roles is None else roles
    return _in_role_order((m for m in names if roles.get(m) in ("primary", "task")), roles)


def score_columns(agg: pd.DataFrame, primary: str | None = None, roles: Roles | None = None) -> list[str]:
    """The task's test metrics in ``agg``: the primary one (``primary`` when given and present,
    else the one whose role is ``primary``, else the first) first, then in the card's order."""
    roles = legacy_roles(agg.columns, primary) if roles is None else roles
    cols = task_metric_names(agg.columns, roles)
    if primary not in cols:
        primary = next((c for c in cols if roles.get(c) == "primary"), cols[0] if cols else None)
    return ([primary] if primary else []) + [c for c in cols if c != primary]


def diagnostic_columns(names: Iterable[str], roles: Roles | None = None) -> list[str]:
    """Method-specific diagnostics on the test split (role ``diagnostic``: a method's extra
    metrics, e.g. a canonicaliser's identity share or a share of nodes with a degenerate frame):
    shown next to the equivariance error, with their catalogue descriptions."""
    names = list(dict.fromkeys(names))
    roles = legacy_roles(names) if roles is None else roles
    return _in_role_order((m for m in names if roles.get(m) == "diagnostic"), roles)


def undeclared_columns(agg: pd.DataFrame) -> list[str]:
    """Metrics neither the catalogue nor the run declares: shown under their raw names, never ranked."""
    return sorted(metric_names(agg.columns, family="unknown"))


def sort_best_first(agg: pd.DataFrame, metric: str | None) -> list[Any]:
    """Methods ordered best first by ``metric`` (its catalogue direction; missing last);
    alphabetical when there is no metric or it has no direction."""
    methods = sorted(agg.index, key=str)
    spec = spec_for(metric) if metric else None
    if spec is None or spec.direction is None or metric not in agg:
        return methods
    sign = -1.0 if spec.direction == "higher" else 1.0
    vals = agg[metric]

    def key(method: Any) -> tuple[bool, float, str]:
        v = float(vals.get(method, np.nan))
        return (not np.isfinite(v), sign * v if np.isfinite(v) else 0.0, str(method))
    return sorted(methods, key=key)


_EQ_LABELS = {"rel_mean": "mean rel.", "rel_max": "max rel."}
TRAINING_COLUMNS = {train_metric("steps"): "steps", train_metric("wall_s"): "wall time",
                    train_metric("flops"): "FLOPs", train_metric("best_step"): "best val. step",
                    train_metric("final_loss"): "final loss"}


def _short(name: str) -> str:
    """Column header inside its group: the catalogue's unit and arrow, a shorter label."""
    s = spec_for(name)
    if s.family in ("equivariance", "lie_derivative", "image_lie"):
        lie = {"lie_derivative": "Lie ", "image_lie": f"Lie {str(s.axis).replace('_', ' ')} "}.get(s.family, "")
        label = f"{lie}{s.dtype} {s.stage} {_EQ_LABELS.get(s.stat or '', s.stat)}"
        return header(s, label)
    if s.family == "throughput" and s.stat == "peak_mem_bytes":
        return header(s, f"{s.mode} peak")
    if name in TRAINING_COLUMNS:
        return header(s, TRAINING_COLUMNS[name])
    return header(s)


UNSTABLE_MARK = "⚠ unstable"
UNSTABLE_NOTE = (f"{UNSTABLE_MARK}: the timing's repeats disagree (IQR / median above {UNSTABLE_REL_IQR:g} in at "
                 "least one seed), so the throughput says more about the machine than about the model; rerun on a "
                 "quiet machine before reading it.")


def unstable_timings(df: pd.DataFrame) -> set[tuple[Any, str]]:
    """(method, mode) pairs whose throughput timing is unstable in any run: the row flag
    ``unstable`` (``measure_throughput``), or, for rows written before it, IQR / median over
    ``UNSTABLE_REL_IQR`` from the row's own timing numbers."""
    ok = df[df["status"] == Status.OK]
    out: set[tuple[Any, str]] = set()
    for mode in THROUGHPUT_MODES:
        if "unstable" in ok:
            rows = ok[ok["metric"] == throughput_metric(mode, "graphs_per_s")]
            out |= {(m, mode) for m, u in zip(rows["method"], rows["unstable"]) if u is True or u == 1.0}
        med = ok[ok["metric"] == throughput_metric(mode, "time_median_s")][["method", "spec_hash", "value"]]
        iqr = ok[ok["metric"] == throughput_metric(mode, "time_iqr_s")][["method", "spec_hash", "value"]]
        both = med.merge(iqr, on=["method", "spec_hash"], suffixes=("_med", "_iqr"))
        out |= {(m, mode) for m, q, v in zip(both["method"], both["value_iqr"], both["value_med"]) if is_unstable(q, v)}
    return out


def task_table(agg: pd.DataFrame, std: pd.DataFrame, n_seeds: int, primary: str | None = None,
               convergence: dict[Any, str] | None = None,
               unstable: set[tuple[Any, str]] | None = None, roles: Roles | None = None,
               wrappers: Collection[str] | None = None) -> pd.DataFrame:
    """One row per method (best first by ``primary``, else the primary test metric), formatted
    strings under grouped headers (two-level columns): model (parameters), accuracy (the task's
    metrics ± std over seeds: roles ``primary`` and ``task`` in ``roles``, the task card's),
    equivariance (relative errors, Lie derivative), method diagnostics (role ``diagnostic``: the
    method's own numbers on the test split), speed (throughput ± IQR, FLOP rate, and for the
    methods in ``wrappers``, which wrap the shared backbone by their cards, time against it),
    memory (peak), training (steps, wall time, FLOPs, best step, final loss, convergence).
    Columns no method has are left out. A throughput whose (method, mode) is in ``unstable``
    (``unstable_timings``) carries ``UNSTABLE_MARK``. Without ``roles`` / ``wrappers`` (rows not
    from a report of run directories): as the report read them before cards (``runcards``)."""
    if agg.empty:
        return pd.DataFrame()
    roles = legacy_roles(agg.columns, primary) if roles is None else roles
    wrappers = legacy_wrappers(agg.index) if wrappers is None else wrappers
    tests = score_columns(agg, primary, roles)
    diagnostics, undeclared = diagnostic_columns(agg.columns, roles), undeclared_columns(agg)
    base = agg.loc["baseline"] if "baseline" in agg.index else None
    rows: dict[Any, dict[tuple[str, str], str]] = {}
    for method in sort_best_first(agg, primary if primary in agg else tests[0] if tests else None):
        m, s = agg.loc[method], std.loc[method] if method in std.index else pd.Series(dtype=float)
        r: dict[tuple[str, str], str] = {("model", _short(PARAMS)): value(spec_for(PARAMS), m.get(PARAMS))}
        for c in (*tests, *undeclared):
            cell = value(spec_for(c), m.get(c))
            if n_seeds > 1 and np.isfinite(s.get(c, np.nan)) and cell != fmt.MISSING:
                cell += f" ± {value(spec_for(c), s[c])}"
            r[("accuracy" if c in tests else "other", _short(c))] = cell
        for c in (*EQUIVARIANCE_COLUMNS, LIE_COLUMN, IMAGE_LIE_COLUMN):
            r[("equivariance", _short(c))] = value(spec_for(c), m.get(c))
        for c in diagnostics:
            r[("method diagnostics", _short(c))] = value(spec_for(c), m.get(c))
        for mode in THROUGHPUT_MODES:
            gps = throughput_metric(mode, "graphs_per_s")
            med, iqr = m.get(throughput_metric(mode, "time_median_s")), m.get(throughput_metric(mode, "time_iqr_s"))
            cell = value(spec_for(gps), m.get(gps))
            if cell != fmt.MISSING and not fmt.missing(iqr) and not fmt.missing(med) and med > 0:
                cell += f" (IQR {100 * iqr / med:.0f}%)"
            if cell != fmt.MISSING and (method, mode) in (unstable or set()):
                cell += f" {UNSTABLE_MARK}"
            r[("speed", _short(gps))] = cell
        flops = throughput_metric("inference", "gflops_per_s")
        r[("speed", _short(flops))] = value(spec_for(flops), m.get(flops))
        for mode in THROUGHPUT_MODES:
            key = throughput_metric(mode, "time_median_s")
            ok = (base is not None and method != "baseline" and str(method) in wrappers
                  and np.isfinite(m.get(key, np.nan)) and np.isfinite(base.get(key, np.nan)))
            ratio = m[key] / base[key] if ok and base is not None else None
            r[("speed", f"{mode} time vs backbone")] = fmt.number(ratio, "x")
        for mode in THROUGHPUT_MODES:
            mem = throughput_metric(mode, "peak_mem_bytes")
            r[("memory", _short(mem))] = value(spec_for(mem), m.get(mem))
        for c in TRAINING_COLUMNS:
            r[("training", _short(c))] = value(spec_for(c), m.get(c))
        if convergence is not None:
            r[("training", "convergence")] = convergence.get(method, fmt.MISSING)
        rows[method] = r
    keys = list(next(iter(rows.values())))
    table = pd.DataFrame([[r.get(k, fmt.MISSING) for k in keys] for r in rows.values()], index=list(rows),
                         columns=pd.MultiIndex.from_tuples(keys))
    return table.loc[:, (table != fmt.MISSING).any(axis=0)]


def profile_table(df: pd.DataFrame, mode: str = "inference") -> tuple[str, pd.DataFrame] | None:
    """Where each method's ``mode`` time goes (``profile.<mode>.<region>_share`` rows, mean over
    the points that measured it): one row per method, one column per region any method reports
    (percent of the profiled forward), the grouping scheme and the profiled time per forward;
    with the caption saying how it was measured. None when no row carries a profile."""
    ok = df[(df["status"] == Status.OK) & df["value"].notna()] if len(df) else df
    names = {profile_metric(mode, r): r for r in PROFILE_REGIONS}
    rows = ok[ok["metric"].isin(list(names))] if len(ok) else ok
    if rows.empty:
        return None
    shares = rows.groupby(["method", "metric"])["value"].mean().unstack("metric")
    regions = [n for n in names if n in shares.columns and shares[n].notna().any()]
    table = pd.DataFrame(index=shares.index)
    for n in regions:
        table[names[n].replace("_", " ")] = [fmt.MISSING if fmt.missing(v) else f"{100 * v:.0f}%" for v in shares[n]]
    if "profile_scheme" in rows:
        scheme = rows.groupby("method")["profile_scheme"].first()
        table["regions by"] = [{"labels": "wrapper labels", "ops": "op categories"}.get(str(scheme.get(m)), "?")
                               for m in table.index]
    if "profile_time_s" in rows:
        t = rows.groupby("method")["profile_time_s"].mean()
        table["profiled time / forward"] = [fmt.number(t.get(m), "time") for m in table.index]
    table.index.name = "method"
    how = _first(_col(rows, "profile_method")) or "torch.profiler"
    caption = (f"Where {mode} time goes: share of one forward's profiled time per region, at the throughput batch "
               f"({_ints(_col(rows, 'batch_size'))} graphs) in the point that measured throughput ({how}). Wrappers "
               "label their parts with record_function: frames = frame / canonicalisation construction, backbone = "
               "the shared backbone's calls, to frame = mapping into and out of the frames and averaging, other = "
               "the glue outside them. Architectures without labels are split by op: tensor product (tensor-product "
               "modules, escnn point convolutions), linear (linear layers, matrix products), scatter (message "
               "passing's gathers and scatters), other (element-wise ops, activations, Python). The profiler adds a "
               "cost per op, so op-heavy regions read somewhat larger than their share of unprofiled time, and the "
               "profiled time is not a throughput; the time against the backbone is in the full table's speed "
               "columns")
    return caption, table


def status_table(df: pd.DataFrame, exclude_benches: Iterable[str] = ()) -> pd.DataFrame:
    """(task, method, seed) runs that failed, ran out of memory, timed out or do not apply, with
    their error, exit signal and peak memory against the limit (one row per spec; sweep variants
    name their task options); the benches in ``exclude_benches`` (scaling, tensor products) list
    their skipped points themselves. ``attrs["row_ids"]``: each row's anchor (``run-<spec
    hash>``)."""
    df = upgrade_frame(df)
    bad = df[(df["status"] != Status.OK) & ~df["bench"].isin(list(exclude_benches))]
    bad = bad[~bad.index.isin(_rows_of_ok_points(df, bad).index)]  # those are unmeasured_table's
    has_hash = "spec_hash" in bad and bad["spec_hash"].notna().all()
    bad = bad.drop_duplicates("spec_hash" if has_hash else ["task", "method", "seed"])
    cols = [c for c in ("task", "method", "seed", "status", "error") if c in bad]
    out = bad[cols].reset_index(drop=True)
    if "exit_signal" in bad and bad["exit_signal"].notna().any():
        out["exit signal"] = list(bad["exit_signal"].map(lambda v: v if isinstance(v, str) and v else fmt.MISSING))
    if "peak_rss_bytes" in bad and bad["peak_rss_bytes"].notna().any():
        limit = bad["max_memory_bytes"] if "max_memory_bytes" in bad else pd.Series([None] * len(bad), index=bad.index)
        out["peak / limit memory [MB]"] = [f"{fmt.number(p, 'bytes')} / {fmt.number(q, 'bytes')}"
                                           for p, q in zip(bad["peak_rss_bytes"], limit)]
    out.attrs["row_ids"] = [f"run-{slug(str(h))}" if has_hash else f"run-{slug(str(t))}-{slug(str(m))}-{sd}"
                            for h, t, m, sd in zip(bad["spec_hash"] if has_hash else [None] * len(bad),
                                                   bad["task"], bad["method"], bad["seed"])]
    return out


def _rows_of_ok_points(df: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``rows`` whose point ended ``ok`` (``worst`` over all the point's rows in ``df``):
    a measurement its bench did not take by design (a probe that does not apply on this device)."""
    if "spec_hash" not in df or rows.empty:
        return rows.iloc[:0]
    point = df.groupby("spec_hash")["status"].agg(lambda s: str(worst(s)))
    return rows[rows["spec_hash"].map(point).eq(str(Status.OK))]


def unmeasured_table(df: pd.DataFrame) -> pd.DataFrame:
    """Measurements that points which finished ``ok`` did not take, with the reason: one row per
    (task, metric family, status, reason), listing the methods and seeds (e.g. the TF32 probe's
    rows on a CPU run: ``not_applicable``, "TF32 is a CUDA matmul mode ...")."""
    df = upgrade_frame(df)
    rows = _rows_of_ok_points(df, df[df["status"] != Status.OK])
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(measurement=[str(m).split(".")[0] for m in rows["metric"]],
                       reason=rows["error"].fillna("") if "error" in rows else "",
                       status=rows["status"].astype(str))
    out = (rows.groupby(["task", "measurement", "status", "reason"], sort=True)
           .agg(methods=("method", lambda m: ", ".join(sorted(set(map(str, m))))),
                seeds=("seed", lambda v: _ints(v.dropna())))
           .reset_index())
    return out[["task", "measurement", "methods", "seeds", "status", "reason"]]


def _first(series: pd.Series) -> Any:
    s = series.dropna()
    return s.iloc[0] if len(s) else None


def _ints(values: Iterable[Any]) -> str:
    return ", ".join(str(int(v)) for v in sorted(set(values))) or "?"


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` without missing values (empty when the rows do not carry it)."""
    return df[name].dropna() if name in df else pd.Series(dtype=object)


def _one(df: pd.DataFrame, name: str, integer: bool = True) -> str:
    v = _first(_col(df, name))
    if v is None:
        return "?"
    return str(int(v)) if integer else str(v)


def _names(df: pd.DataFrame, name: str) -> str:
    return ", ".join(sorted({str(v) for v in _col(df, name)})) or "?"


def context_line(df: pd.DataFrame) -> str:
    """How the numbers of ``df`` were measured: device, throughput dtype / batch / repeats /
    threads / timer, equivariance graphs × group samples, training budget and settings (what it
    spent: steps, seconds, FLOPs), seeds, commit. A field the rows do not carry reads "?"."""
    ok = df[df["status"] == Status.OK]
    tp, eq = select(ok, family="throughput"), select(ok, family="equivariance")
    steps = ok[ok["metric"] == train_metric("steps")]
    parts = ["device: " + (", ".join(sorted(set(_col(ok, "device_name")))) or "?")]
    if len(tp):
        parts.append(f"throughput: dtype {_names(tp, 'dtype')}, batch {_ints(_col(tp, 'batch_size'))} graphs, "
                     f"{_one(tp, 'repeats')} repeats (median, IQR), {_one(tp, 'threads')} threads, timer "
                     f"{_one(tp, 'timer', integer=False)}")
    if len(eq):
        parts.append(f"equivariance: {_one(eq, 'batch_size')} test graphs × {_one(eq, 'repeats')} group samples "
                     f"({_names(eq, 'group')}; translation and node permutation included), fp32 as deployed, fp64 "
                     "rebuilt under a float64 default")
    training = training_line(df)
    if training:
        parts.append(training)
    elif len(steps):
        parts.append(f"training: {int(steps['value'].max())} steps, batch {_one(steps, 'batch_size')}")
    parts.append(f"seeds: {', '.join(str(s) for s in sorted(set(df['seed'].dropna())))}")
    parts.append("commit: " + fmt.commits(_col(df, "git_commit")))
    return "; ".join(parts)


def loaded_machine_lines(dirs: Iterable[Path]) -> list[str]:
    """One line per run directory whose ``env.json`` shows a loaded machine: a 1-minute load
    average above the CPUs before or after a run invocation (``core.envinfo.loaded``)."""
    lines = []
    for d in dirs:
        try:
            env = json.loads((Path(d) / "env.json").read_text())
        except (OSError, ValueError):
            continue
        bad = [r for r in env.get("load", []) if isinstance(r, dict) and loaded(r)] if isinstance(env, dict) else []
        if bad:
            r = bad[-1]
            lines.append(f"{Path(d).name} ran on a loaded machine (1/5/15-min load average {r.get('before')} before, "
                         f"{r.get('after')} after, on {r.get('cpus')} CPUs): its timings competed with other work")
    return lines


def options_key(opts: Any) -> str:
    """A task-options mapping as canonical JSON (the key of a task configuration)."""
    return json.dumps(opts if isinstance(opts, dict) else {}, sort_keys=True)


def split_sweeps(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of the task's base configuration, all rows): the base configuration is the task
    options shared by the most (method, seed) runs; sweep variants are plotted, not tabulated."""
    if "task_options" not in df:
        return df, df
    keys = df["task_options"].map(options_key)
    counts = df.assign(_k=keys).drop_duplicates("spec_hash").groupby("_k").size()
    base = counts.idxmax() if len(counts) else None
    return df[keys == base], df


def train_config(cfg: Any) -> TrainConfig | None:
    """The effective training settings of a row's ``train_config`` (the suite's keys, defaults
    filled in); None when missing or not a valid ``TrainConfig`` (a row of another version)."""
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except ValueError:
            return None
    if not isinstance(cfg, dict):
        return None
    try:
        return TrainConfig.from_dict(cfg)
    except Exception:
        return None


def _span(values: Iterable[Any], kind: str) -> str:
    v = sorted({float(x) for x in values if not fmt.missing(x)})
    if not v:
        return fmt.MISSING
    lo, hi = fmt.number(v[0], kind), fmt.number(v[-1], kind)
    return lo if lo == hi else f"{lo}–{hi}"


def training_line(df: pd.DataFrame) -> str:
    """The training budget and optimiser settings of ``df``'s runs (from ``train_config``) and what
    they spent (steps, wall-clock seconds, FLOPs from the ``train.*`` rows); "" without settings."""
    ok = df[df["status"] == Status.OK]
    if "train_config" not in ok or ok.empty:
        return ""
    runs = ok.drop_duplicates("spec_hash") if "spec_hash" in ok else ok
    cfgs = [c for c in (train_config(v) for v in runs["train_config"]) if c is not None]
    if not cfgs:
        return ""

    def uniq(f: Any) -> str:
        return ", ".join(dict.fromkeys(str(f(c)) for c in cfgs))
    lrs = sorted({c.lr for c in cfgs})
    lr = f"lr {lrs[0]:g}" if len(lrs) == 1 else "lr per run (verdict table)"
    spent = []
    for name, label, kind in ((train_metric("steps"), "steps", "int"), (train_metric("wall_s"), "s", "g"),
                              (train_metric("flops"), "FLOPs", "g")):
        vals = ok[ok["metric"] == name]["value"]
        if len(vals):
            spent.append(f"{_span(vals, kind)} {label}")
    fixed = [c for c in cfgs if c.budget == "fixed"]
    converge = [c for c in cfgs if c.budget == "converge"]
    common = (f"batch {uniq(lambda c: c.batch_size)}; Adam, {lr}, "
              f"weight decay {uniq(lambda c: f'{c.weight_decay:g}')}, {uniq(lambda c: c.warmup_steps)} warm-up steps, "
              f"gradient clip {uniq(lambda c: f'{c.grad_clip:g}')}; "
              f"checkpoint: {uniq(lambda c: 'best validation value' if c.select == 'best_val' else 'last step')}")
    noise = (f"its noise (max of {uniq(lambda c: f'{c.noise_factor:g}')} × the standard error over the validation "
             f"graphs and {uniq(lambda c: f'{100 * c.converge_tol:g}')} % of the value)")
    parts = []
    if fixed:
        cfgs = fixed  # uniq() reads the runs of this kind of budget
        budget = uniq(lambda c: f"{c.epochs} epochs" if c.epochs else f"{c.steps} steps")
        caps = [uniq(lambda c: f"at most {c.max_seconds:g} s" if c.max_seconds else ""),
                uniq(lambda c: f"at most {c.max_flops:.3g} FLOPs" if c.max_flops else "")]
        budget += "".join(f" ({cap})" for cap in caps if cap.strip(", "))
        parts.append(f"fixed training budget: {budget}, stopping at whichever is spent first, cosine decay over the "
                     f"budget, {uniq(lambda c: c.val_points)} validations; not converged = best validation value "
                     f"still improving by more than {noise} while the learning rate was at least half its peak "
                     f"(budget fractions 0.3 to 0.5)")
    if converge:
        cfgs = converge
        caps_c = [uniq(lambda c: f"{c.max_steps} steps"),
                  uniq(lambda c: f"{c.max_seconds:g} s" if c.max_seconds else ""),
                  uniq(lambda c: f"{c.max_flops:.3g} FLOPs" if c.max_flops else "")]
        parts.append(f"budget until plateau: constant learning rate, validation every {uniq(lambda c: c.val_every)} "
                     f"steps, plateau = no improvement by more than {noise} for {uniq(lambda c: c.patience)} "
                     f"validations, then linear cool-down to 0 over {uniq(lambda c: f'{100 * c.cooldown_fraction:g}')} "
                     f"% of the steps taken; caps (cool-down included): "
                     f"{', '.join(cap for cap in caps_c if cap.strip(', '))}; cap reached = no plateau before the cap")
    text = "; ".join(parts) + f"; {common}"
    if spent:
        text += "; spent per run: " + ", ".join(spent)
    return text


def split_tuning(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(measured runs, tuning runs) of ``df``: the rows of ``tune`` points (bench column) choose
    settings and are not ranked."""
    if df.empty or "metric" not in df:
        return df, df.iloc[0:0]
    df = upgrade_frame(df)
    tuning = df["bench"] == TuneBench.kind
    return df[~tuning], df[tuning]


def _setting_label(setting: Any) -> str:
    if isinstance(setting, str):
        try:
            setting = json.loads(setting)
        except ValueError:
            return setting
    if not isinstance(setting, dict):
        return "?"
    return ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in sorted(setting.items()))


def tuning_table(tuning: pd.DataFrame, measured: pd.DataFrame) -> pd.DataFrame:
    """Per method (rows) and grid setting (columns): the tuning runs' best validation value, mean
    over their seeds; ✓ marks the setting the measured runs trained with (their lr and the other
    grid keys, from ``train_config``). Empty without tuning rows."""
    best = tuning[(tuning["status"] == Status.OK) & (tuning["metric"] == tune_metric("best_val"))] \
        if len(tuning) else tuning
    if best.empty or "setting" not in best:
        return pd.DataFrame()
    best = best.assign(_setting=best["setting"].map(_setting_label))
    table = best.pivot_table(index="method", columns="_setting", values="value", aggfunc="mean")
    used: dict[Any, set[str]] = {}
    keys = sorted({k for v in best["setting"] if isinstance(v, dict) for k in v})
    runs = measured.drop_duplicates("spec_hash") if "spec_hash" in measured else measured
    for method, cfg in zip(runs.get("method", []), runs.get("train_config", [])):
        if isinstance(cfg, dict) and keys and all(k in cfg for k in keys):
            used.setdefault(method, set()).add(_setting_label({k: cfg[k] for k in keys}))
    out = table.map(fmt.number).astype(object)
    for method in out.index:
        for col in out.columns:
            if col in used.get(method, set()) and out.loc[method, col] != fmt.MISSING:
                out.loc[method, col] = f"{out.loc[method, col]} ✓"
    out.index.name = "method"
    out.columns.name = None
    return out
