"""Report sections for the scaling sweep (bench ``scaling``) and the tensor-product
microbenchmarks (bench ``tp_bench``), and a stand-alone page of the two.

Each section function takes the results DataFrame (any rows; it picks its own bench's by the
``bench`` column), draws its PNGs into the report's
output folder and returns a ``Section`` (``render.Section``): ``task`` (title), ``context``
(how it was measured), ``table`` (formatted strings), ``figures`` ((png name, caption) pairs)
and ``notes``; or None when the DataFrame holds no such rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..benches.scaling import ScalingBench, fit_exponent
from ..benches.tp_bench import TPBench
from ..metrics.catalogue import scaling_metric, tp_bench_metric
from ..results.status import Status
from ..results.store import load_results
from .common import fmt, plots
from .common.metricinfo import header, spec_for
from .common.render import Page, Section, section_view, versions_text, write_page

SCALING, TP_BENCH = ScalingBench.kind, TPBench.kind
#: the benches with a section of their own (the task runs' sections are ``task_section``)
SPECIAL_BENCHES = (SCALING, TP_BENCH)
AXIS_LABELS = {"nodes": "nodes per graph", "batch": "graphs per batch", "width": "width (channels)", "lmax": "lmax"}
SCALING_TIME, SCALING_MEMORY = scaling_metric("time_s"), scaling_metric("peak_mem_bytes")


def _rows(df: pd.DataFrame, bench: str, ok: bool) -> pd.DataFrame:
    if "bench" not in df or "status" not in df:
        return df.iloc[0:0]
    df = df[df["bench"] == bench]
    return df[df["status"] == Status.OK] if ok else df[df["status"] != Status.OK]


def _uniq(s: pd.DataFrame, col: str) -> str:
    if col not in s:
        return "?"

    def one(v: Any) -> str:
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
    vals = sorted({one(v) for v in s[col].dropna()})
    return ", ".join(vals) if vals else "?"


def _fmt_slope(fit: dict[str, Any]) -> str:
    if not np.isfinite(fit["slope"]):
        return fmt.MISSING
    return f"{fit['slope']:.2f} (R² {fit['r2']:.3f}, {int(fit['n'])} pts)"


# ---------------------------------------------------------------------------------------------
# scaling

def _axes(s: pd.DataFrame) -> list[str]:
    present = set(s["x_label"].dropna())
    return [a for a in AXIS_LABELS if a in present] + sorted(present - set(AXIS_LABELS))


def _fits(s: pd.DataFrame, metric: str, tail: float) -> dict[tuple[str, str], tuple[pd.Series, dict[str, Any]]]:
    """(method, axis) -> (mean value per size, fitted power law over the upper ``tail``)."""
    out: dict[tuple[str, str], tuple[pd.Series, dict[str, Any]]] = {}
    for (method, axis), g in s[s["metric"] == metric].groupby(["method", "x_label"]):
        pts = g.groupby("x")["value"].mean().sort_index()
        out[(str(method), str(axis))] = (pts, fit_exponent(pts.index.to_numpy(), pts.to_numpy(), tail=tail))
    return out


def _scaling_table(s: pd.DataFrame, tail: float) -> pd.DataFrame:
    time_fits, mem_fits = _fits(s, SCALING_TIME, tail), _fits(s, SCALING_MEMORY, tail)
    rows: dict[str, dict[str, str]] = {}
    for axis in _axes(s):
        for method in sorted(set(s["method"])):
            row = rows.setdefault(method, {})
            pts, fit = time_fits.get((method, axis), (None, None))
            row[f"{axis}: time exponent"] = _fmt_slope(fit) if fit else fmt.MISSING
            row[f"{axis}: time per call"] = (f"{fmt.time(pts.iloc[0])} @ {int(pts.index[0])} → "
                                             f"{fmt.time(pts.iloc[-1])} @ {int(pts.index[-1])}"
                                             if pts is not None else fmt.MISSING)
            mfit = mem_fits.get((method, axis), (None, None))[1]
            row[f"{axis}: memory exponent"] = (f"{mfit['slope']:.2f}" if mfit and np.isfinite(mfit["slope"])
                                               else fmt.MISSING)
    table = pd.DataFrame.from_dict(rows, orient="index")
    return table.loc[:, (table != fmt.MISSING).any(axis=0)] if len(table) else table


def _scaling_figure(s: pd.DataFrame, axis: str, metric: str, path: Path, tail: float) -> None:
    lines = []
    for (method, ax), (pts, fit) in sorted(_fits(s, metric, tail).items()):
        if ax == axis:
            label = f"{method} (slope {fit['slope']:.2f})" if np.isfinite(fit["slope"]) else str(method)
            lines.append((label, pts, fit))
    name = AXIS_LABELS.get(axis, axis)
    plots.power_law_curves(lines, path, name, plots.axis_label(spec_for(metric)),
                           f"cost vs {name} (log-log; dashed: fitted power law)")


def scaling_section(df: pd.DataFrame, out: Path, tail: float = 0.5) -> Section | None:
    """Cost-vs-size curves (log-log) per axis, one line per method, with the fitted exponent
    of time per call (and of peak memory) over the upper ``tail`` of each sweep."""
    s = _rows(df, SCALING, ok=True)
    if not len(s):
        return None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    context = (f"device: {_uniq(s, 'device_name')}; dtype {_uniq(s, 'dtype')}; mode {_uniq(s, 'mode')}; "
               f"synthetic graphs with the {_uniq(s, 'scaling_task')} task's fields and "
               f"k = {_uniq(s, 'k_neighbours')} nearest-neighbour edges; axes not swept at their base values; "
               f"{_uniq(s, 'repeats')} repeats per point (median; IQR recorded), {_uniq(s, 'threads')} CPU thread(s), "
               f"timer {_uniq(s, 'timer')}; exponent = least-squares slope of log(time per call) vs log(size) over "
               f"the largest {int(100 * tail)}% of each sweep (at least 3 points); commit "
               f"{fmt.commits(s.get('git_commit', pd.Series(dtype=str)).dropna())}")
    figures = []
    for axis in _axes(s):
        name, label = f"scaling_{axis}_time.png", AXIS_LABELS.get(axis, axis)
        _scaling_figure(s, axis, SCALING_TIME, out / name, tail)
        figures.append((name, f"Time per call against {label}, log-log, one line per method; legend: fitted "
                              f"exponent. {context}"))
        if len(s[(s["x_label"] == axis) & (s["metric"] == SCALING_MEMORY)]):
            name = f"scaling_{axis}_memory.png"
            _scaling_figure(s, axis, SCALING_MEMORY, out / name, tail)
            figures.append((name, f"Peak memory of one call against {label} ({_uniq(s, 'mem_method')})."))
    notes = []
    for (method, skipped_axis, status), g in _rows(df, SCALING, ok=False).groupby(["method", "x_label", "status"]):
        sizes = ", ".join(str(int(x)) for x in sorted(set(g["x"].dropna())))
        notes.append(f"{method} {skipped_axis} = {sizes}: {status} ({g['error'].iloc[0] if 'error' in g else ''})")
    return {"task": "Scaling: cost vs size", "heading": "Scaling: cost vs size", "context": context,
            "table": _scaling_table(s, tail), "index_label": "method", "figures": figures, "notes": notes}


# ---------------------------------------------------------------------------------------------
# tensor-product microbenchmarks

TP_NOTE = ("Gaunt products (functions multiplied on the sphere) couple only paths with l1 + l2 + l3 even and "
           "their weights factorise (one scale per input degree and channel, one per output degree and channel, "
           "uvw: one C×C mix per output degree) where a Clebsch–Gordan product has a free weight per path "
           "(and per channel pair for uvw); antisymmetric paths such as the cross product 1o × 1o → 1e do not "
           "exist for Gaunt. With the spherical-harmonic parities used here e3nn has the same paths, so outputs "
           "agree once the Gaunt weights are mapped per path ('rel. err vs e3nn').")
TP = {stat: tp_bench_metric(stat) for stat in ("time_s", "time_iqr_s", "rel_err_vs_e3nn", "compile_time_s",
                                               "weights", "gflops_per_s")}


def _per_lmax(g: pd.DataFrame, metric: str) -> pd.Series:
    return g[g["metric"] == metric].groupby("x")["value"].mean().sort_index()


def _tp_row(g: pd.DataFrame, lmaxes: list[int]) -> dict[str, str]:
    t, iqr = _per_lmax(g, TP["time_s"]), _per_lmax(g, TP["time_iqr_s"])
    r: dict[str, str] = {}
    for lmax in lmaxes:
        if lmax not in t.index:
            r[f"lmax {lmax}"] = fmt.MISSING
            continue
        spread = f" ±{100 * iqr[lmax] / t[lmax] / 2:.0f}%" if lmax in iqr.index and t[lmax] > 0 else ""
        r[f"lmax {lmax}"] = fmt.time(t[lmax]) + spread
    err, comp = g[g["metric"] == TP["rel_err_vs_e3nn"]]["value"], _per_lmax(g, TP["compile_time_s"])
    w, gf = _per_lmax(g, TP["weights"]), _per_lmax(g, TP["gflops_per_s"])
    err_spec, comp_spec = spec_for(TP["rel_err_vs_e3nn"]), spec_for(TP["compile_time_s"])
    w_spec = spec_for(TP["weights"])
    r[f"max {err_spec.display}"] = fmt.number(err.max(), err_spec.number_format) if len(err) else fmt.MISSING
    r[comp_spec.display] = f"{fmt.time(comp.min())} – {fmt.time(comp.max())}" if len(comp) else fmt.MISSING
    r[f"{w_spec.display} (lmax min / max)"] = f"{int(w.iloc[0]):,} / {int(w.iloc[-1]):,}" if len(w) else fmt.MISSING
    gf_header = header(spec_for(TP["gflops_per_s"]), arrow=False) + " (lmax max)"
    r[gf_header] = f"{gf.iloc[-1]:.3g}" if len(gf) else fmt.MISSING
    return r


def tp_section(df: pd.DataFrame, out: Path) -> Section | None:
    """One table and one plot of time per call over lmax for every (implementation, channel
    mode), with the agreement against e3nn and compile times."""
    s = _rows(df, TP_BENCH, ok=True)
    if not len(s):
        return None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    passes = sorted(set(s["mode"].dropna())) if "mode" in s else ["forward"]
    lmaxes = sorted({int(x) for x in s["x"].dropna()})
    impls = sorted(set(s["method"]))
    rows, lines = {}, []
    for (impl, cmode, pass_), g in s.groupby(["method", "channel_mode", "mode"]):
        label = f"{impl} {cmode}" + (f" ({pass_})" if len(passes) > 1 else "")
        rows[str(label)] = _tp_row(g, lmaxes)
        lines.append((label, _per_lmax(g, TP["time_s"]), "o-" if cmode == "uvu" else "s--",
                      f"C{impls.index(impl) % 10}"))
    skipped = _rows(df, TP_BENCH, ok=False)
    notes = [TP_NOTE] + sorted({f"{r['method']}: {r['status']} ({r.get('error', '')})" for _, r in skipped.iterrows()})
    context = (f"device: {_uniq(s, 'device_name')}; dtype {_uniq(s, 'dtype')}; pass {', '.join(passes)}; batch "
               f"{_uniq(s, 'batch_size')} pairs; C = {_uniq(s, 'channels')} channels; x1 = C×(0e+1o+…+lmax), "
               f"x2 = 1×(0e+1o+…+lmax), output C×(0e+…+lmax); {_uniq(s, 'repeats')} repeats (median, ± half "
               f"the IQR), {_uniq(s, 'threads')} CPU thread(s), timer {_uniq(s, 'timer')}; commit "
               f"{fmt.commits(s.get('git_commit', pd.Series(dtype=str)).dropna())}")
    name = "tp_bench_time.png"
    plots.styled_lines(lines, out / name, "lmax", plots.axis_label(spec_for(TP["time_s"])),
                       "tensor products: time per call vs lmax (solid uvu, dashed uvw)")
    return {"task": "Tensor-product microbenchmarks", "heading": "Tensor-product microbenchmarks",
            "context": context, "table": pd.DataFrame.from_dict(rows, orient="index"),
            "index_label": "implementation", "notes": notes,
            "figures": [(name, f"Time per call of each tensor-product implementation over lmax. {context}")]}


SECTIONS = {SCALING: scaling_section, TP_BENCH: tp_section}


def write_sections_report(paths: Any, out_dir: str | Path, title: str) -> Path:
    """A stand-alone page (index.html + README.md) with the scaling and tensor-product sections
    of the given run directories, rendered like ``write_report``; returns the HTML path."""
    df = load_results(paths)
    out = Path(out_dir)
    sections = [sec for make in SECTIONS.values() if (sec := make(df, out))]
    versions = next((v for v in df["versions"] if isinstance(v, dict)), {}) if "versions" in df else {}
    page = Page(title=title, sections=[section_view(s) for s in sections], versions=versions_text(versions))
    return write_page(page, out)
