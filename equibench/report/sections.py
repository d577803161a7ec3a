"""Report sections for the scaling sweep (``task="scaling"``) and the tensor-product
microbenchmarks (``task="tp_bench"``).

Each function takes the results DataFrame (any rows; it picks its own task) and the report's
output folder, draws its PNGs there and returns a section dict as ``report.write_report`` renders
them: ``task`` (title), ``context`` (how it was measured), ``table`` (a DataFrame of formatted
strings), ``figures`` (list of (png name, caption)) and ``notes`` (extra sentences); or None when
the DataFrame holds no such rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import plots  # noqa: F401  (selects the Agg backend)
from ..benches.scaling import exponents, fit_exponent

AXIS_LABELS = {"nodes": "nodes per graph", "batch": "graphs per batch", "width": "width (channels)", "lmax": "lmax"}


def _ok(df: pd.DataFrame, task: str) -> pd.DataFrame:
    if "task" not in df or "status" not in df:
        return df.iloc[0:0]
    return df[(df["task"] == task) & (df["status"] == "ok")]


def _uniq(s: pd.DataFrame, col: str) -> str:
    if col not in s:
        return "?"
    def fmt(v: Any) -> str:
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
    vals = sorted({fmt(v) for v in s[col].dropna()})
    return ", ".join(vals) if vals else "?"


def _commits(s: pd.DataFrame) -> str:
    if "git_commit" not in s:
        return "?"
    return ", ".join(c[:10] + ("+dirty" if str(c).endswith("+dirty") else "") for c in sorted(set(s["git_commit"].dropna())))


def _time(v: float) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    if v >= 1:
        return f"{v:.3g} s"
    if v >= 1e-3:
        return f"{v * 1e3:.3g} ms"
    return f"{v * 1e6:.3g} µs"


def _fmt_slope(fit: dict[str, Any]) -> str:
    if not np.isfinite(fit["slope"]):
        return "–"
    return f"{fit['slope']:.2f} (R² {fit['r2']:.3f}, {int(fit['n'])} pts)"


# ---------------------------------------------------------------------------------------------
# scaling

def _scaling_figure(s: pd.DataFrame, axis: str, metric: str, path: Path, ylabel: str, tail: float) -> None:
    import matplotlib.pyplot as plt
    d = s[(s["x_label"] == axis) & (s["metric"] == metric)]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, (method, g) in enumerate(d.groupby("method")):
        pts = g.groupby("x")["value"].mean().sort_index()
        fit = fit_exponent(pts.index.to_numpy(), pts.to_numpy(), tail=tail)
        color = f"C{k % 10}"
        label = f"{method} (slope {fit['slope']:.2f})" if np.isfinite(fit["slope"]) else str(method)
        ax.plot(pts.index, pts.to_numpy(), "o-", ms=3, color=color, label=label)
        if np.isfinite(fit["slope"]):
            xs = np.array([fit["x_min"], fit["x_max"]])
            ax.plot(xs, 10 ** fit["log10_a"] * xs ** fit["slope"], "--", lw=0.8, color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(AXIS_LABELS.get(axis, axis))
    ax.set_ylabel(ylabel)
    ax.set_title(f"cost vs {AXIS_LABELS.get(axis, axis)} (log-log; dashed: fitted power law)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    plots._finish(fig, path)


def scaling_section(df: pd.DataFrame, out: Path, tail: float = 0.5) -> dict[str, Any] | None:
    """Cost-vs-size curves (log-log) per axis, one line per method, with the fitted exponent
    of time per call (and of peak memory) over the upper ``tail`` of each sweep."""
    s = _ok(df, "scaling")
    if not len(s):
        return None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_exp = exponents(s, "time_s", tail)
    m_exp = exponents(s, "peak_mem_bytes", tail)
    rows: dict[str, dict[str, str]] = {}
    for _, r in t_exp.iterrows():
        row = rows.setdefault(r["method"], {})
        ax = r["axis"]
        row[f"{ax}: time exponent"] = _fmt_slope(r)
        row[f"{ax}: time per call"] = (f"{_time(r['y_at_min'])} @ {int(r['x_first'])} → "
                                       f"{_time(r['y_at_max'])} @ {int(r['x_last'])}")
    for _, r in m_exp.iterrows():
        rows.setdefault(r["method"], {})[f"{r['axis']}: memory exponent"] = (
            f"{r['slope']:.2f}" if np.isfinite(r["slope"]) else "–")
    table = pd.DataFrame.from_dict(rows, orient="index").fillna("–")
    kinds = ["time exponent", "time per call", "memory exponent"]
    table = table[sorted(table.columns, key=lambda c: (list(AXIS_LABELS).index(c.split(":")[0])
                                                       if c.split(":")[0] in AXIS_LABELS else 9,
                                                       kinds.index(c.split(": ")[1]) if c.split(": ")[1] in kinds else 9))]
    context = (f"device: {_uniq(s, 'device_name')}; dtype {_uniq(s, 'dtype')}; mode {_uniq(s, 'mode')}; "
               f"synthetic graphs with the {_uniq(s, 'scaling_task')} task's fields and "
               f"k = {_uniq(s, 'k_neighbours')} nearest-neighbour edges; axes not swept at their base values; "
               f"{_uniq(s, 'repeats')} repeats per point (median; IQR recorded), {_uniq(s, 'threads')} CPU thread(s), "
               f"timer {_uniq(s, 'timer')}; exponent = least-squares slope of log(time per call) vs log(size) over the "
               f"largest {int(100 * tail)}% of each sweep (at least 3 points); commit {_commits(s)}")
    figures = []
    for axis in [a for a in AXIS_LABELS if a in set(s["x_label"])] + sorted(set(s["x_label"]) - set(AXIS_LABELS)):
        name = f"scaling_{axis}_time.png"
        _scaling_figure(s, axis, "time_s", out / name, "time per call [s]", tail)
        figures.append((name, f"Time per call against {AXIS_LABELS.get(axis, axis)}, log-log, one line per method; "
                              f"legend: fitted exponent. {context}"))
        if len(s[(s["x_label"] == axis) & (s["metric"] == "peak_mem_bytes")]):
            name = f"scaling_{axis}_memory.png"
            _scaling_figure(s, axis, "peak_mem_bytes", out / name, "peak memory [bytes]", tail)
            figures.append((name, f"Peak memory of one call against {AXIS_LABELS.get(axis, axis)} "
                                  f"({_uniq(s, 'mem_method')})."))
    skipped = df[(df.get("task") == "scaling") & (df["status"] != "ok")] if "task" in df else df.iloc[0:0]
    notes = []
    for (method, axis, status), g in skipped.groupby(["method", "x_label", "status"], sort=True):
        sizes = ", ".join(str(int(x)) for x in sorted(set(g["x"].dropna())))
        notes.append(f"{method} {axis} = {sizes}: {status} ({g['error'].iloc[0] if 'error' in g else ''})")
    return {"task": "Scaling: cost vs size", "context": context, "table": table, "figures": figures, "notes": notes}


# ---------------------------------------------------------------------------------------------
# tensor-product microbenchmarks

TP_NOTE = ("Gaunt products (functions multiplied on the sphere) couple only paths with l1 + l2 + l3 even and "
           "their weights factorise (one scale per input degree and channel, one per output degree and channel, "
           "uvw: one C×C mix per output degree) where a Clebsch–Gordan product has a free weight per path "
           "(and per channel pair for uvw); antisymmetric paths such as the cross product 1o × 1o → 1e do not "
           "exist for Gaunt. With the spherical-harmonic parities used here e3nn has the same paths, so outputs "
           "agree once the Gaunt weights are mapped per path ('rel. err vs e3nn').")


def tp_section(df: pd.DataFrame, out: Path) -> dict[str, Any] | None:
    """One table and one plot of time per call over lmax for every (implementation, channel
    mode), with the agreement against e3nn and compile times."""
    s = _ok(df, "tp_bench")
    if not len(s):
        return None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    passes = sorted(set(s["mode"].dropna())) if "mode" in s else ["forward"]
    rows: dict[str, dict[str, str]] = {}
    lmaxes = sorted({int(x) for x in s["x"].dropna()})
    for (impl, cmode, pass_), g in s.groupby(["method", "channel_mode", "mode"]):
        label = f"{impl} {cmode}" + (f" ({pass_})" if len(passes) > 1 else "")
        r: dict[str, str] = {}
        t = g[g["metric"] == "time_s"].groupby("x")["value"].mean()
        iqr = g[g["metric"] == "time_iqr_s"].groupby("x")["value"].mean()
        for l in lmaxes:
            if l in t.index:
                spread = f" ±{100 * iqr[l] / t[l] / 2:.0f}%" if l in iqr.index and t[l] > 0 else ""
                r[f"lmax {l}"] = _time(t[l]) + spread
            else:
                r[f"lmax {l}"] = "–"
        err = g[g["metric"] == "rel_err_vs_e3nn"]["value"]
        r["max rel. err vs e3nn"] = f"{err.max():.1e}" if len(err) else "–"
        comp = g[g["metric"] == "compile_time_s"].groupby("x")["value"].mean()
        r["compile time"] = (f"{_time(comp.min())} – {_time(comp.max())}") if len(comp) else "–"
        w = g[g["metric"] == "weights"].groupby("x")["value"].mean()
        r["weights (lmax min / max)"] = f"{int(w.iloc[0]):,} / {int(w.iloc[-1]):,}" if len(w) else "–"
        gf = g[g["metric"] == "gflops_per_s"].groupby("x")["value"].mean()
        r["GFLOP/s (lmax max)"] = f"{gf.iloc[-1]:.3g}" if len(gf) else "–"
        rows[label] = r
    table = pd.DataFrame.from_dict(rows, orient="index")
    skipped = df[(df["task"] == "tp_bench") & (df["status"] != "ok")] if "task" in df else df.iloc[0:0]
    notes = [TP_NOTE] + sorted({f"{r['method']}: {r['status']} ({r.get('error', '')})" for _, r in skipped.iterrows()})
    context = (f"device: {_uniq(s, 'device_name')}; dtype {_uniq(s, 'dtype')}; pass {', '.join(passes)}; batch "
               f"{_uniq(s, 'batch_size')} pairs; C = {_uniq(s, 'channels')} channels; x1 = C×(0e+1o+…+lmax), "
               f"x2 = 1×(0e+1o+…+lmax), output C×(0e+…+lmax); {_uniq(s, 'repeats')} repeats (median, ± half "
               f"the IQR), {_uniq(s, 'threads')} CPU thread(s), timer {_uniq(s, 'timer')}; commit {_commits(s)}")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    impls = sorted(set(s["method"]))
    for (impl, cmode, pass_), g in s[s["metric"] == "time_s"].groupby(["method", "channel_mode", "mode"]):
        pts = g.groupby("x")["value"].mean().sort_index()
        ax.plot(pts.index, pts.to_numpy(), "o-" if cmode == "uvu" else "s--", ms=4,
                color=f"C{impls.index(impl) % 10}", label=f"{impl} {cmode}" + (f" {pass_}" if len(passes) > 1 else ""))
    ax.set_yscale("log")
    ax.set_xlabel("lmax")
    ax.set_ylabel("time per call [s]")
    ax.set_title("tensor products: time per call vs lmax (solid uvu, dashed uvw)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    name = "tp_bench_time.png"
    plots._finish(fig, out / name)
    figures = [(name, f"Time per call of each tensor-product implementation over lmax. {context}")]
    return {"task": "Tensor-product microbenchmarks", "context": context, "table": table, "figures": figures,
            "notes": notes}


def write_sections_report(paths: Any, out_dir: str | Path, title: str) -> Path:
    """A stand-alone page (index.html + README.md) with the scaling and tensor-product sections
    of the given run directories, rendered like ``write_report``; returns the HTML path."""
    from .build import _html, _markdown
    from ..suite.store import load_results
    df = load_results(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for make in (scaling_section, tp_section):
        sec = make(df, out)
        if sec:
            sections.append({**sec, "heading": sec["task"]})
    versions = next((v for v in df["versions"] if isinstance(v, dict)), {}) if "versions" in df else {}
    status = pd.DataFrame()
    (out / "index.html").write_text(_html(title, sections, status, versions))
    (out / "README.md").write_text(_markdown(title, sections, status, versions))
    return out / "index.html"
