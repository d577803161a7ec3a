"""Matplotlib figures of the report; each function draws one PNG. Axis labels, log scales and
the better direction come from the metric catalogue (``MetricSpec``), never from names."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.lines
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ...metrics.catalogue import MetricSpec  # noqa: E402
from .metricinfo import better_word, header  # noqa: E402


def _finish(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def axis_label(spec: MetricSpec, label: str | None = None) -> str:
    """Header of ``spec`` plus "(higher is better)" / "(lower is better)" when it has a direction."""
    word = better_word(spec)
    return header(spec, label, arrow=False) + (f" ({word})" if word else "")


def pareto_front(x: np.ndarray, y: np.ndarray, x_higher: bool = True, y_higher: bool = False) -> np.ndarray:
    """Indices of the points no other point dominates (at least as good on both axes, better on
    one; "good" = higher where ``*_higher``, else lower), sorted by x."""
    sx, sy = (1.0 if x_higher else -1.0), (1.0 if y_higher else -1.0)
    gx, gy = sx * np.asarray(x, dtype=float), sy * np.asarray(y, dtype=float)
    idx = [i for i in range(len(gx)) if not any(gx[j] >= gx[i] and gy[j] >= gy[i] and (gx[j] > gx[i] or gy[j] > gy[i])
                                                for j in range(len(gx)))]
    return np.array(sorted(idx, key=lambda i: x[i]), dtype=int)


def accuracy_vs_throughput(table: pd.DataFrame, x: MetricSpec, y: MetricSpec, path: Path, title: str,
                           y_err: str | None = None) -> None:
    """Scatter of a test metric (column ``y.name``) against throughput (column ``x.name``) per
    method (the index), with the Pareto front in the catalogue's directions."""
    t = table.dropna(subset=[x.name, y.name])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.set_xscale("log" if x.log_scale else "linear")  # before plotting: autoscaling an empty log axis warns
    ax.set_yscale("log" if y.log_scale else "linear")
    for method, row in t.iterrows():
        ax.errorbar(row[x.name], row[y.name], yerr=row.get(y_err) if y_err else None, fmt="o", capsize=3,
                    label=method)
        ax.annotate(str(method), (row[x.name], row[y.name]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if len(t) > 1 and x.direction and y.direction:
        xs, ys = t[x.name].to_numpy(), t[y.name].to_numpy()
        front = pareto_front(xs, ys, x.direction == "higher", y.direction == "higher")
        ax.plot(xs[front], ys[front], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    _finish(fig, path)


def equivariance_bars(table: pd.DataFrame, series: Sequence[tuple[str, str, str]], path: Path, title: str) -> None:
    """Per-method relative equivariance error (log scale): for each (label, mean column, max
    column) a marker at the mean and a bar up to the max."""
    methods = list(table.index)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(methods) + 2), 4.4))
    width = 0.8 / max(1, len(series))
    floor = 1e-17
    for k, (label, mean_col, max_col) in enumerate(series):
        pos = np.arange(len(methods)) + (k - (len(series) - 1) / 2) * width
        mean = table[mean_col].clip(lower=floor).to_numpy(dtype=float)
        mx = table[max_col].clip(lower=floor).to_numpy(dtype=float) if max_col in table else mean
        color = f"C{k}"
        ax.bar(pos, mx, width=width * 0.9, alpha=0.35, color=color, label=f"{label} max")
        ax.plot(pos, mean, "o", ms=5, color=color, label=f"{label} mean")
    ax.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("relative equivariance error (lower is better)")
    ax.axhline(1e-10, color="k", lw=0.6, ls=":")
    ax.axhline(1e-4, color="k", lw=0.6, ls="--")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    _finish(fig, path)


def curves(data: pd.DataFrame, x: str, y: str, hue: str, path: Path, title: str, xlabel: str, ylabel: str,
           logx: bool = True, logy: bool = True, err: str | None = None) -> None:
    """One line per ``hue`` value of ``y`` against ``x`` (e.g. degeneracy, sample efficiency,
    trends), with error bars from column ``err`` when given."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, g in data.groupby(hue):
        g = g.sort_values(x)
        yerr = g[err].fillna(0).to_numpy() if err and err in g else None
        ax.errorbar(g[x], g[y], yerr=yerr, fmt="o-", ms=3, capsize=2, label=str(name))
    if logx:
        ax.set_xscale("symlog", linthresh=1e-9) if (data[x] <= 0).any() else ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    _finish(fig, path)


def power_law_curves(lines: Sequence[tuple[str, pd.Series, dict[str, Any]]], path: Path, xlabel: str,
                     ylabel: str, title: str) -> None:
    """Log-log curves (x base 2), one per (label, values indexed by size, fitted power law as
    ``fit_exponent`` returns it); the fit is drawn dashed over its range."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, (label, pts, fit) in enumerate(lines):
        color = f"C{k % 10}"
        ax.plot(pts.index, pts.to_numpy(), "o-", ms=3, color=color, label=label)
        if np.isfinite(fit["slope"]):
            xs = np.array([fit["x_min"], fit["x_max"]])
            ax.plot(xs, 10 ** fit["log10_a"] * xs ** fit["slope"], "--", lw=0.8, color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    _finish(fig, path)


def styled_lines(lines: Sequence[tuple[str, pd.Series, str, str]], path: Path, xlabel: str, ylabel: str,
                 title: str, logy: bool = True) -> None:
    """Curves given as (label, values indexed by x, matplotlib format, colour)."""
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    for label, pts, style, color in lines:
        ax.plot(pts.index, pts.to_numpy(), style, ms=4, color=color, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    _finish(fig, path)


def ratio_bars(labels: list[str], ratios: np.ndarray, better: Sequence[bool | None], path: Path, title: str,
               noise: Sequence[float] | None = None) -> None:
    """Horizontal bars of B/A ratios on a log axis: green where B is better beyond the measured
    noise, red where worse, grey where no change is called (within noise, or no better
    direction); ``noise`` (log-scale spread per bar) is drawn as a whisker around zero. The figure
    is as wide as its longest label needs (constrained layout, saved with a tight bounding box),
    so no label is clipped."""
    longest = max((len(x) for x in labels), default=10)
    fig, ax = plt.subplots(figsize=(4.5 + 0.055 * longest, max(2.5, 0.3 * len(labels) + 1.2)), layout="constrained")
    colors = ["tab:grey" if b is None else "tab:green" if b else "tab:red" for b in better]
    y = np.arange(len(labels))
    ax.barh(y, np.log10(np.clip(ratios, 1e-30, None)), color=colors)
    if noise is not None:
        band = np.asarray(noise, dtype=float) / np.log(10)  # natural-log spread -> log10 axis
        ok = np.isfinite(band) & (band > 0)
        ax.errorbar(np.zeros(int(ok.sum())), y[ok], xerr=band[ok], fmt="none", ecolor="k", elinewidth=0.8,
                    capsize=2, label="change needed to call it (k × measured noise)")
        if ok.any():
            ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(y, labels, fontsize=7)
    ax.axvline(0, color="k", lw=0.7)
    ax.set_xlabel("log10(B / A)")
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def learning_curves(lines: Sequence[tuple[str, pd.DataFrame, str]], panels: Sequence[tuple[str, str]], ylabel: str,
                    path: Path, title: str, reference: float | None = None, reference_label: str = "",
                    logy: bool = True) -> None:
    """Small panels side by side, one per (column, x label) of ``panels``, each with one line per
    (label, frame with those columns and ``value``, matplotlib line style) of ``lines`` and
    ``reference`` as a dashed horizontal line. An x axis is logarithmic when every x is positive
    and spans more than a decade (FLOPs, seconds across methods)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.6), sharey=True, squeeze=False)
    ys = np.concatenate([d["value"].to_numpy(dtype=float) for _, d, _ in lines] or [np.array([])])
    if reference is not None and np.isfinite(reference):
        ys = np.append(ys, reference)
    logy = logy and len(ys) > 0 and bool((ys[np.isfinite(ys)] > 0).all())
    for ax, (col, xlabel) in zip(axes[0], panels):
        xs_all = []
        for k, (label, data, style) in enumerate(lines):
            d = data.dropna(subset=[col, "value"]).sort_values(col)
            if len(d):
                ax.plot(d[col], d["value"], style, ms=3, lw=1.2, color=f"C{k % 10}", label=label)
                xs_all.append(d[col].to_numpy(dtype=float))
        xs = np.concatenate(xs_all) if xs_all else np.array([])
        if len(xs) and (xs > 0).all() and xs.max() > 10 * xs.min():
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels of a short span collide
        if reference is not None and np.isfinite(reference):
            ax.axhline(reference, color="k", lw=1.0, ls="--", label=reference_label)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 5), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _short_log_axis(axis: Any, values: Sequence[float]) -> None:
    """On a log axis spanning less than a decade, a few plain ticks instead of minor labels that collide."""
    v = [x for x in values if np.isfinite(x) and x > 0]
    if v and max(v) < 10 * min(v):
        axis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.4g"))
        axis.set_minor_locator(matplotlib.ticker.NullLocator())


@dataclass(frozen=True)
class SizeSeries:
    """One method's curve over training sizes: means with interval ends ``lo`` / ``hi``,
    ``hollow`` per size (a run there did not converge) and its power law ``(a, b, n_min, n_max)``."""
    label: str
    sizes: np.ndarray
    means: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    hollow: np.ndarray
    fit: tuple[float, float, float, float] | None = None


def size_curves(series: Sequence[SizeSeries], path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Log-log curves of error against training size: markers with interval bars, hollow where
    flagged; a segment is solid between two filled markers and dotted when it touches a hollow
    one; the fitted power law a·N^b dashed over the sizes it used."""
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    ax.set_xscale("log")
    ax.set_yscale("log")
    for k, s in enumerate(series):
        color = f"C{k % 10}"
        ax.vlines(s.sizes, s.lo, s.hi, color=color, lw=1.0)
        for i in range(len(s.sizes) - 1):
            style = ":" if s.hollow[i] or s.hollow[i + 1] else "-"
            ax.plot(s.sizes[i:i + 2], s.means[i:i + 2], style, color=color, lw=1.2)
        for hollow in (False, True):
            sel = s.hollow == hollow
            if sel.any():
                ax.plot(s.sizes[sel], s.means[sel], "o", ms=5, color=color,
                        markerfacecolor="none" if hollow else color)
        if s.fit is not None:
            a, b, n0, n1 = s.fit
            xs = np.geomspace(n0, n1, 20) if n1 > n0 else np.array([n0])
            ax.plot(xs, a * xs ** b, "--", lw=0.9, color=color)
        ax.plot([], [], "o-", color=color, label=s.label)  # one legend entry per method
    sizes = sorted({float(n) for s in series for n in s.sizes})
    ax.set_xticks(sizes, [f"{n:,.0f}" for n in sizes])  # the measured sizes
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    _finish(fig, path)


@dataclass(frozen=True)
class CostPanel:
    """One panel of error against a cost: ``points`` (method, cost, error, training size,
    converged), each method's frontier and the overall frontier as (cost, error) sorted by cost."""
    xlabel: str
    points: Sequence[tuple[str, float, float, float, bool]]
    fronts: dict[str, list[tuple[float, float]]]
    overall: list[tuple[float, float]]


def cost_curves(panels: Sequence[CostPanel], path: Path, ylabel: str, title: str) -> None:
    """Panels side by side (log-log): a marker per point (colour = method, larger for a larger
    training size, hollow where not converged), each method's frontier as a thin line, the
    overall frontier as black steps (the lowest error within each budget) to the largest cost."""
    methods = sorted({p[0] for panel in panels for p in panel.points})
    sizes = sorted({p[3] for panel in panels for p in panel.points})
    color = {m: f"C{k % 10}" for k, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.6), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ax.set_xscale("log")
        ax.set_yscale("log")
        if not panel.points:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center")
        for method, cost, err, size, converged in panel.points:
            ms = 4 + 2.5 * sizes.index(size)
            ax.plot([cost], [err], "o", ms=ms, color=color[method], markerfacecolor=color[method] if converged
                    else "none", alpha=0.85)
        for method, front in panel.fronts.items():
            if len(front) > 1:
                ax.plot(*zip(*front), "-", lw=0.8, color=color[method])
        if panel.overall:
            xs = [x for x, _ in panel.overall] + [max(p[1] for p in panel.points)]
            ys = [y for _, y in panel.overall] + [panel.overall[-1][1]]
            ax.plot(xs, ys, "k--", drawstyle="steps-post", lw=1.2)
        _short_log_axis(ax.xaxis, [p[1] for p in panel.points])
        ax.set_xlabel(panel.xlabel)
        ax.grid(True, which="both", alpha=0.3)
    _short_log_axis(axes[0][0].yaxis, [p[2] for panel in panels for p in panel.points])
    axes[0][0].set_ylabel(ylabel)
    handles = [matplotlib.lines.Line2D([], [], marker="o", color=color[m], label=m) for m in methods]
    handles.append(matplotlib.lines.Line2D([], [], color="k", ls="--", label="overall frontier"))
    handles += [matplotlib.lines.Line2D([], [], marker="o", ls="", color="grey", ms=4 + 2.5 * i,
                                        label=f"N = {s:,.0f}") for i, s in enumerate(sizes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    rows = (len(handles) - 1) // 6 + 1
    fig.tight_layout(rect=(0, 0.04 + 0.04 * rows, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
