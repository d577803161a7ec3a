"""Matplotlib figures of the report. Each function draws one PNG and returns its caption."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _finish(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of points not dominated (higher x = faster is better, lower y = error is better),
    sorted by x."""
    idx = [i for i in range(len(x)) if not any((x[j] >= x[i] and y[j] <= y[i]) and (x[j] > x[i] or y[j] < y[i])
                                               for j in range(len(x)))]
    return np.array(sorted(idx, key=lambda i: x[i]), dtype=int)


def accuracy_vs_throughput(table: pd.DataFrame, x_col: str, y_col: str, path: Path, title: str,
                           x_err: str | None = None, y_err: str | None = None) -> None:
    """Scatter of a test metric against inference throughput per method, with the Pareto front."""
    t = table.dropna(subset=[x_col, y_col])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.set_xscale("log")  # before plotting: autoscaling an empty log axis warns
    ax.set_yscale("log")
    for method, row in t.iterrows():
        ax.errorbar(row[x_col], row[y_col], xerr=row.get(x_err) if x_err else None,
                    yerr=row.get(y_err) if y_err else None, fmt="o", capsize=3, label=method)
        ax.annotate(method, (row[x_col], row[y_col]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if len(t) > 1:
        front = pareto_front(t[x_col].to_numpy(), t[y_col].to_numpy())
        ax.plot(t[x_col].to_numpy()[front], t[y_col].to_numpy()[front], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel("inference throughput [graphs/s] (higher is better)")
    ax.set_ylabel(f"{y_col} (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    _finish(fig, path)


def equivariance_bars(table: pd.DataFrame, cols: dict[str, str], max_cols: dict[str, str], path: Path,
                      title: str) -> None:
    """Per-method relative equivariance error (log scale): a marker at the mean, a bar to the max,
    one series per (stage, dtype)."""
    methods = list(table.index)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(methods) + 2), 4.4))
    width = 0.8 / max(1, len(cols))
    floor = 1e-17
    for k, (label, col) in enumerate(cols.items()):
        pos = np.arange(len(methods)) + (k - (len(cols) - 1) / 2) * width
        mean = table[col].clip(lower=floor).to_numpy(dtype=float)
        mx = table[max_cols[label]].clip(lower=floor).to_numpy(dtype=float) if max_cols.get(label) in table else mean
        color = f"C{k}"
        ax.bar(pos, mx, width=width * 0.9, alpha=0.35, color=color, label=f"{label} max")
        ax.plot(pos, mean, "o", ms=5, color=color, label=f"{label} mean")
    ax.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("relative equivariance error")
    ax.axhline(1e-10, color="k", lw=0.6, ls=":")
    ax.axhline(1e-4, color="k", lw=0.6, ls="--")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    _finish(fig, path)


def curves(data: pd.DataFrame, x: str, y: str, hue: str, path: Path, title: str, xlabel: str, ylabel: str,
           logx: bool = True, logy: bool = True, err: str | None = None) -> None:
    """One line per ``hue`` value of ``y`` against ``x`` (e.g. degeneracy, scaling, trends), with
    error bars from column ``err`` when given."""
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


def ratio_bars(labels: list[str], ratios: np.ndarray, higher_better: list[bool], path: Path, title: str) -> None:
    """Horizontal bars of B/A ratios on a log axis, coloured by whether B is better."""
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.28 * len(labels) + 1)))
    better = [(r > 1) == hb for r, hb in zip(ratios, higher_better)]
    colors = ["tab:green" if b else "tab:red" for b in better]
    y = np.arange(len(labels))
    ax.barh(y, np.log10(np.clip(ratios, 1e-30, None)), color=colors)
    ax.set_yticks(y, labels, fontsize=7)
    ax.axvline(0, color="k", lw=0.7)
    ax.set_xlabel("log10(B / A)")
    ax.set_title(title, fontsize=10)
    _finish(fig, path)
