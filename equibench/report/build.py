"""``write_report``: one HTML page (plus a Markdown twin) comparing methods per task.

For every task: a table (mean over seeds, ± std when there are several) of parameters, test
metrics, relative equivariance error (fp32 as deployed, fp64 structural; at init and trained),
Lie derivative, inference/train throughput with spread, peak memory, GFLOP/s and overhead
against the shared backbone; plots of accuracy vs throughput (with the Pareto front),
equivariance error per method (log scale) and, when measured, degeneracy curves. Every table and
figure states how it was measured: device, dtype, batch, repeats, seeds, commit.
"""
from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from . import plots
from ..suite.store import load_results

EQ_COLUMNS = {
    "fp32 trained": "equivariance.trained.fp32.rel_mean",
    "fp64 trained": "equivariance.trained.fp64.rel_mean",
    "fp64 init": "equivariance.init.fp64.rel_mean",
}


def _fmt(v: Any, kind: str = "g") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if kind == "int":
        return f"{int(round(v)):,}"
    if kind == "sci":
        return f"{v:.1e}"
    if kind == "mb":
        return f"{v / 2**20:.2f}"
    if kind == "x":
        return f"{v:.2f}×"
    return f"{v:.4g}"


def _wraps_backbone(method: str) -> bool:
    try:
        from ..core.registry import method_class
        return bool(getattr(method_class(method), "wraps_backbone", False))
    except Exception:
        return False


def _first(series: pd.Series) -> Any:
    s = series.dropna()
    return s.iloc[0] if len(s) else None


def method_table(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean, std) over seeds of every metric, index = method, columns = metric."""
    ok = df[df["status"] == "ok"]
    mean = ok.pivot_table(index="method", columns="metric", values="value", aggfunc="mean")
    std = ok.pivot_table(index="method", columns="metric", values="value", aggfunc="std")
    return mean, std


def display_table(mean: pd.DataFrame, std: pd.DataFrame, n_seeds: int) -> pd.DataFrame:
    """Human-readable table: formatted strings, one row per method."""
    rows = {}
    base = mean.loc["baseline"] if "baseline" in mean.index else None
    test_cols = [c for c in mean.columns if c.startswith("test.")]
    for method, m in mean.iterrows():
        s = std.loc[method] if method in std.index else pd.Series(dtype=float)
        r: dict[str, str] = {"parameters": _fmt(m.get("params"), "int")}
        for c in test_cols:
            val = _fmt(m[c])
            if n_seeds > 1 and np.isfinite(s.get(c, np.nan)):
                val += f" ± {_fmt(s[c])}"
            r[c.removeprefix("test.")] = val
        for label, c in EQ_COLUMNS.items():
            r[f"equiv. err {label}"] = _fmt(m.get(c), "sci")
        r["Lie deriv. fp64"] = _fmt(m.get("lie_derivative.trained.fp64.rel_mean"), "sci")
        for mode in ("inference", "train"):
            gps = m.get(f"throughput.{mode}.graphs_per_s")
            med, iqr = m.get(f"throughput.{mode}.time_median_s"), m.get(f"throughput.{mode}.time_iqr_s")
            spread = f" (IQR {100 * iqr / med:.0f}%)" if med and iqr is not None and np.isfinite(iqr) else ""
            r[f"{mode} graphs/s"] = _fmt(gps, "int") + spread if gps is not None else "–"
            r[f"{mode} peak MB"] = _fmt(m.get(f"throughput.{mode}.peak_mem_bytes"), "mb")
        r["GFLOP/s (inference)"] = _fmt(m.get("throughput.inference.gflops_per_s"))
        for mode in ("inference", "train"):
            key = f"throughput.{mode}.time_median_s"
            ok = base is not None and method != "baseline" and _wraps_backbone(str(method)) and key in m
            r[f"{mode} time vs backbone"] = _fmt(m[key] / base[key], "x") if ok else "–"
        rows[method] = r
    return pd.DataFrame.from_dict(rows, orient="index")


def context_line(df: pd.DataFrame) -> str:
    """How the numbers of ``df`` were measured (device, dtypes, batches, repeats, seeds, commit)."""
    ok = df[df["status"] == "ok"]
    tp = ok[ok["metric"].str.startswith("throughput.")]
    eq = ok[ok["metric"].str.startswith("equivariance.")]
    parts = []
    devices = sorted(set(ok.get("device_name", pd.Series(dtype=str)).dropna()))
    parts.append("device: " + (", ".join(devices) or "?"))
    if len(tp):
        parts.append(f"throughput: dtype {', '.join(sorted(set(tp['dtype'].dropna())))}, batch "
                     f"{', '.join(str(int(b)) for b in sorted(set(tp['batch_size'].dropna())))} graphs, "
                     f"{int(_first(tp['repeats']) or 0)} repeats (median, IQR), "
                     f"{int(_first(tp['threads']) or 0) if 'threads' in tp else '?'} threads, "
                     f"timer {_first(tp['timer'])}")
    if len(eq):
        parts.append(f"equivariance: {int(_first(eq['batch_size']))} test graphs × {int(_first(eq['repeats']))} "
                     f"group samples ({', '.join(sorted(set(eq['group'].dropna())))}; translation and node "
                     f"permutation included), fp32 as deployed, fp64 rebuilt under a float64 default")
    steps = ok[ok["metric"] == "train.steps"]["value"]
    if len(steps):
        parts.append(f"training: {int(steps.max())} steps, batch {int(_first(ok[ok['metric'] == 'train.steps']['batch_size']))}")
    parts.append(f"seeds: {', '.join(str(s) for s in sorted(set(df['seed'])))}")
    commits = sorted(set(df.get("git_commit", pd.Series(dtype=str)).dropna()))
    parts.append("commit: " + ", ".join(c[:10] + ("+dirty" if c.endswith("+dirty") else "") for c in commits))
    return "; ".join(parts)


def _heading(section: dict[str, Any]) -> str:
    return section.get("heading") or f"Task: {section['task']}"


def _status_table(df: pd.DataFrame) -> pd.DataFrame:
    """(task, method, seed) runs that failed, timed out or do not apply; the scaling and
    tensor-product sections list their own skipped points as notes."""
    bad = df[(df["status"] != "ok") & ~df["task"].isin(list(_special_sections()))]
    bad = bad.drop_duplicates(["task", "method", "seed"])
    return bad[["task", "method", "seed", "status", "error"]].reset_index(drop=True)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def _options_key(opts: Any) -> str:
    return json.dumps(opts if isinstance(opts, dict) else {}, sort_keys=True)


def split_sweeps(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of the task's base configuration, all rows): the base configuration is the task
    options shared by the most (method, seed) runs; sweep variants are plotted, not tabulated."""
    if "task_options" not in df:
        return df, df
    keys = df["task_options"].map(_options_key)
    counts = df.assign(_k=keys).drop_duplicates("spec_hash").groupby("_k").size()
    base = counts.idxmax() if len(counts) else None
    return df[keys == base], df


def _sample_efficiency(task: str, df: pd.DataFrame, out: Path, metric: str) -> tuple[str, str] | None:
    ok = df[(df["status"] == "ok") & (df["metric"] == metric)].copy()
    if ok.empty:
        return None
    ok["train_size"] = ok["task_options"].map(lambda o: o.get("train_size") if isinstance(o, dict) else None)
    ok = ok.dropna(subset=["train_size"])
    if ok["train_size"].nunique() < 2:
        return None
    data = ok.groupby(["method", "train_size"], as_index=False)["value"].agg(["mean", "std"]).reset_index()
    path = out / f"{_slug(task)}_sample_efficiency.png"
    plots.curves(data.rename(columns={"mean": "value"}), "train_size", "value", "method", path,
                 f"{task}: sample efficiency", "training-set size", metric.removeprefix("test."), err="std")
    return path.name, (f"Test {metric.removeprefix('test.')} against training-set size (log-log), mean ± std over "
                       f"seeds {sorted(set(ok['seed']))}; the same training budget (steps) for every size. ")


def _task_section(task: str, df_all: pd.DataFrame, out: Path) -> dict[str, Any]:
    df, _ = split_sweeps(df_all)
    mean, std = method_table(df)
    n_seeds = df["seed"].nunique()
    section: dict[str, Any] = {"task": task, "context": context_line(df), "figures": []}
    section["table"] = display_table(mean, std, n_seeds) if len(mean) else pd.DataFrame()
    ctx = section["context"]
    test_cols = [c for c in mean.columns if c.startswith("test.")]
    if test_cols and "throughput.inference.graphs_per_s" in mean:
        # the metric every method reports (not e.g. canonicalisation's own identity_metric)
        y = max(test_cols, key=lambda c: (int(mean[c].notna().sum()), -test_cols.index(c)))
        path = out / f"{_slug(task)}_accuracy_vs_throughput.png"
        table = mean.copy()
        table["_yerr"] = std[y] if y in std and n_seeds > 1 else np.nan
        plots.accuracy_vs_throughput(table, "throughput.inference.graphs_per_s", y, path,
                                     f"{task}: {y.removeprefix('test.')} vs inference throughput",
                                     y_err="_yerr" if n_seeds > 1 else None)
        section["figures"].append((path.name, f"Test {y.removeprefix('test.')} (mean over seeds) against "
                                              f"inference graphs/s; dashed: Pareto front. {ctx}"))
    cols = {k: v for k, v in EQ_COLUMNS.items() if v in mean}
    if cols:
        path = out / f"{_slug(task)}_equivariance.png"
        max_cols = {k: v.replace("rel_mean", "rel_max") for k, v in cols.items()}
        plots.equivariance_bars(mean, cols, max_cols, path, f"{task}: relative equivariance error")
        section["figures"].append((path.name, "Relative equivariance error per method, log scale; marker = mean, "
                                              "bar = max over graphs and samples; dotted 1e-10, dashed 1e-4. " + ctx))
    if test_cols:
        fig = _sample_efficiency(task, df_all, out, test_cols[0])
        if fig:
            section["figures"].append((fig[0], fig[1] + ctx))
    deg = df[(df["status"] == "ok") & (df["metric"] == "degeneracy.gap.rel_max")]
    if len(deg):
        data = deg.groupby(["method", "x"], as_index=False)["value"].mean()
        data["value"] = data["value"].clip(lower=1e-17)
        path = out / f"{_slug(task)}_degeneracy.png"
        plots.curves(data, "x", "value", "method", path, f"{task}: equivariance error near degeneracy",
                     "covariance eigenvalue gap (0 = exactly degenerate)", "max relative equivariance error (fp64)")
        section["figures"].append((path.name, "Max relative equivariance error (fp64, trained) as the two smallest "
                                              "covariance eigenvalues of the positions approach a tie. " + ctx))
        sym = df[(df["status"] == "ok") & (df["metric"] == "degeneracy.config.rel_max")]
        if len(sym):
            section["symmetric"] = sym.pivot_table(index="method", columns="x_label", values="value",
                                                   aggfunc="max").map(lambda v: _fmt(v, "sci"))
    return section


TREND_METRICS = ("test.", "equivariance.trained.fp32.rel_mean", "throughput.inference.graphs_per_s")


def _trend_figures(history: pd.DataFrame, task: str, out: Path) -> list[tuple[str, str]]:
    from .history import trend_table
    figs = []
    h = history[history["task"] == task]
    metrics = sorted({m for m in h["metric"].unique() if m.startswith(TREND_METRICS)})
    for metric in metrics:
        t = trend_table(h, metric)
        if t["night"].nunique() < 2:
            continue
        path = out / f"{_slug(task)}_trend_{_slug(metric)}.png"
        plots.curves(t, "night", "value", "method", path, f"{task}: {metric} per night", "night (oldest = 0)",
                     metric, logx=False, logy=not metric.startswith("test.accuracy"))
        figs.append((path.name, f"{metric} across the nights in the history (mean over seeds per night)."))
    return figs


def _special_sections() -> dict[str, Any]:
    """Result sets that are not (task, method) comparisons: scaling sweeps and tensor-product
    microbenchmarks have their own tables and plots."""
    from . import sections as report_sections
    return {"scaling": report_sections.scaling_section, "tp_bench": report_sections.tp_section}


def write_report(paths: str | os.PathLike | Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                 title: str | None = None, regressions: list[str] | None = None,
                 history: pd.DataFrame | None = None) -> Path:
    """Write ``out_dir/index.html`` and ``out_dir/README.md`` (+ PNGs); returns the HTML path.

    ``regressions`` (one line each) are listed first; ``history`` adds trend plots per task."""
    df = load_results(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"equibench report: {', '.join(sorted(set(df['run_id'].dropna())))}"
    sections = []
    for task, g in df.groupby("task", sort=True):
        special = _special_sections().get(task)
        section = special(g, out) if special else _task_section(task, g, out)
        if section and special:
            section["heading"] = section["task"]  # "Scaling: cost vs size", not "Task: scaling"
        if section:
            sections.append(section)
    if history is not None:
        for s in sections:
            s["figures"] += _trend_figures(history, s["task"], out)
    status = _status_table(df)
    versions = _first(df["versions"]) if "versions" in df else {}
    (out / "index.html").write_text(_html(title, sections, status, versions, regressions))
    (out / "README.md").write_text(_markdown(title, sections, status, versions, regressions))
    return out / "index.html"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.ctx{color:#444;font-size:13px}
figure{display:inline-block;margin:0.5em;max-width:660px;vertical-align:top}figcaption{font-size:12px;color:#333}
img{max-width:640px}"""

HOW_TO_READ = ("Lower is better for test errors and equivariance errors; higher is better for throughput. "
               "Equivariance error is ||f(g·X) − ρ(g) f(X)|| / ||f(X)|| per graph (mean over graphs and sampled "
               "group elements). Exact methods sit near 1e-15 (fp64) / 1e-7 (fp32); learned or approximate "
               "equivariance shows up between. 'time vs backbone' is the wrapper's time per batch divided by the "
               "shared backbone's (baseline) at the same batch.")


def _html(title: str, sections: list[dict[str, Any]], status: pd.DataFrame, versions: Any,
          regressions: list[str] | None = None) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if regressions is not None:
        items = "".join(f"<li>{html.escape(r)}</li>" for r in regressions) or "<li>none</li>"
        parts.append(f"<h2 id='regressions'>Regressions ({len(regressions)})</h2><ul>{items}</ul>")
    parts.append(f"<p class='ctx'>{html.escape(HOW_TO_READ)}</p>")
    if len(status):
        parts.append("<h2>Runs that did not produce results</h2>" + status.to_html(index=False, escape=True))
    for s in sections:
        parts.append(f"<h2 id='{_slug(s['task'])}'>{html.escape(_heading(s))}</h2>")
        parts.append(f"<p class='ctx'>Measured with — {html.escape(s['context'])}</p>")
        if len(s["table"]):
            parts.append(s["table"].to_html(escape=True, classes="results"))
        if s.get("notes"):
            parts.append("<ul class='ctx'>" + "".join(f"<li>{html.escape(n)}</li>" for n in s["notes"]) + "</ul>")
        if "symmetric" in s:
            parts.append("<h3>Max relative equivariance error on exactly symmetric inputs (fp64)</h3>"
                         + s["symmetric"].to_html(escape=True))
        for name, caption in s["figures"]:
            parts.append(f"<figure><img src='{html.escape(name)}' alt='{html.escape(name)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append(f"<p class='ctx'>Package versions: {html.escape(json.dumps(versions, sort_keys=True))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _markdown(title: str, sections: list[dict[str, Any]], status: pd.DataFrame, versions: Any,
              regressions: list[str] | None = None) -> str:
    parts = [f"# {title}", ""]
    if regressions is not None:
        parts += [f"## Regressions ({len(regressions)})", ""] + [f"- {r}" for r in regressions or ["none"]] + [""]
    parts += [HOW_TO_READ, ""]
    if len(status):
        parts += ["## Runs that did not produce results", "", status.to_markdown(index=False, disable_numparse=True), ""]
    for s in sections:
        parts += [f"## {_heading(s)}", "", f"Measured with — {s['context']}", ""]
        if len(s["table"]):
            parts += [s["table"].to_markdown(disable_numparse=True), ""]
        parts += [f"- {n}" for n in s.get("notes") or []] + ([""] if s.get("notes") else [])
        if "symmetric" in s:
            parts += ["Max relative equivariance error on exactly symmetric inputs (fp64):", "",
                      s["symmetric"].to_markdown(disable_numparse=True), ""]
        for name, caption in s["figures"]:
            parts += [f"![{name}]({name})", "", f"*{caption}*", ""]
    parts += [f"Package versions: `{json.dumps(versions, sort_keys=True)}`", ""]
    return "\n".join(parts)


def write_comparison(run_a: str | os.PathLike, run_b: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Side-by-side table and plot (B/A per metric) of two runs; returns the HTML path."""
    from .history import compare_runs, higher_is_better
    a, b = load_results(run_a), load_results(run_b)
    table = compare_runs(a, b)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = (Path(run_a).name, Path(run_b).name)
    ctx = [f"A = {names[0]}: {context_line(a)}", f"B = {names[1]}: {context_line(b)}"]
    figs = []
    for task, t in table.groupby("task"):
        t = t.dropna(subset=["B/A"])
        if t.empty:
            continue
        t = t.assign(label=t["method"] + " · " + t["metric"])
        path = out / f"{_slug(task)}_compare.png"
        plots.ratio_bars(t["label"].tolist(), t["B/A"].to_numpy(), [higher_is_better(m) for m in t["metric"]],
                         path, f"{task}: B / A per method and metric")
        figs.append((path.name, f"B/A per (method, metric), log scale; green = B better, red = B worse."))
    fmt = table.assign(A=table["A"].map(_fmt), B=table["B"].map(_fmt), **{"B/A": table["B/A"].map(lambda v: _fmt(v, "x"))})
    body = [f"<!doctype html><html><head><meta charset='utf-8'><title>compare {html.escape(names[0])} vs "
            f"{html.escape(names[1])}</title><style>{CSS}</style></head><body>",
            f"<h1>Comparison: A = {html.escape(names[0])}, B = {html.escape(names[1])}</h1>",
            *[f"<p class='ctx'>{html.escape(c)}</p>" for c in ctx], fmt.to_html(index=False, escape=True)]
    body += [f"<figure><img src='{html.escape(n)}'><figcaption>{html.escape(c)}</figcaption></figure>" for n, c in figs]
    (out / "index.html").write_text("\n".join(body + ["</body></html>"]))
    (out / "README.md").write_text("\n".join([f"# Comparison: A = {names[0]}, B = {names[1]}", "", *ctx, "",
                                              fmt.to_markdown(index=False, disable_numparse=True), ""]
                                             + [f"![{n}]({n})" for n, _ in figs]))
    return out / "index.html"
