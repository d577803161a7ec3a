"""The reference pairs section: each of equibench's own implementations beside the library
implementation of the same construction, where a run measured both on the same task.

A pair is (ours, reference) on one task configuration (its base task options, sweeps left out):

* a method whose card names a ``counterpart`` (``Method.counterpart`` as the run recorded it,
  ``results.cards``: e.g. ``frame_averaging_pytorch`` → ``frame_averaging``, ``egnn_pytorch`` →
  ``egnn``), both present;
* one method measured with two implementations (rows' ``implementation`` differs, e.g. ``e3nn``
  with e3nn's tensor products and a suite variant ``e3nn@cuequivariance`` with cuEquivariance's,
  ``backend: cuequivariance``): the plain ``equibench`` one is "ours", the other the reference.

A library method (its card's ``origin`` is not equibench) with no counterpart of ours among the
rows (``mace``) gets a row of its own, so every library model measured appears here: its "ours"
side names the counterpart its card declares when that one did not run, and says "library
method; no counterpart declared" when it declares none (e.g. a plugin that sets ``origin``
only), rather than suggesting that something of ours is missing. Everything about a method
comes from the run's cards (``results.runcards.cards_for``), never from the code reading them.

Side by side per pair: the task's first test metric (mean over seeds ± 95 % t-interval, Welch's
p for the difference), the trained models' relative equivariance error (mean over test graphs
and group samples; fp64 = the structure, fp32 = as deployed), inference throughput (median
graphs/s) and its ratio, parameters, the reference's agreement metric when its rows carry one,
and whether every run converged. The cross-checks that need no training run (outputs agreeing
to 1e-10 in float64 with the same weights) are held by the tests and named in the notes.
"""
from __future__ import annotations

import ast
from typing import Any

import pandas as pd

from ..metrics.catalogue import PARAMS, equivariance_metric, test_metric, throughput_metric
from ..results.runcards import RunCards, as_options, cards_for
from ..results.status import Status
from .common import fmt
from .common.metricinfo import spec_for, value
from .common.render import Section
from .common.tables import context_line, split_sweeps
from .verdicts import t_interval, task_metric, welch_p

EQ64, EQ32 = equivariance_metric("trained", "fp64", "rel_mean"), equivariance_metric("trained", "fp32", "rel_mean")
THROUGHPUT = throughput_metric("inference", "graphs_per_s")
AGREEMENT = test_metric("backend_agreement")
OWN = "equibench"
NO_COUNTERPART = "– (library method; no counterpart declared)"  # its class sets no ``counterpart``


def unpaired_label(df: pd.DataFrame, unit: str, cards: RunCards) -> str:
    """The "ours" cell of a library method's row without a pair: the counterpart its card
    names, absent from these runs, or that it declares none (a plugin wrapping a library model,
    ``origin`` set, ``counterpart`` None: nothing of ours is missing)."""
    rows = df[df["unit"] == unit]["method"]
    other = cards.counterpart(str(rows.iloc[0])) if len(rows) else None
    return f"– ({other}: not in this run)" if other else NO_COUNTERPART


CROSS_CHECKS = ("frame_averaging_pytorch vs frame_averaging: same outputs to 1e-10 in float64 with the library's "
                "frames aligned to ours (tests/test_reference_methods.py); e3nn with backend cuequivariance vs "
                "e3nn: same outputs to 1e-10 in float64 with the same weights through cuequivariance-torch's "
                "pure-PyTorch method (tests/test_e3nn_backends.py).")


def _base(cards: RunCards, key: str) -> str:
    """The registered method of method key ``key`` (a suite variant ``<method>@<label>``'s method)."""
    card = cards.method(key)
    return card.method if card is not None else str(key)


def labelled(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a column ``unit``: the method, or ``method [implementation]`` for a method
    whose rows on this task came from more than one implementation."""
    impl = df["implementation"].fillna("?") if "implementation" in df else pd.Series("?", index=df.index)
    several = (impl.groupby(df["method"]).transform("nunique") > 1).tolist()
    unit = [f"{m} [{i}]" if s else str(m) for m, i, s in zip(df["method"], impl, several)]
    return df.assign(unit=unit, impl=impl)


def pairs(df: pd.DataFrame, cards: RunCards | None = None) -> list[tuple[str, str]]:
    """(ours, reference) units of one task's rows (``labelled``), ours first: a method (or suite
    variant ``<method>@<label>``) whose card names a present counterpart; a variant whose
    implementation differs from its method's own rows; one method name measured with two
    implementations. ``cards`` None: the cards the rows alone give."""
    cards = cards if cards is not None else cards_for((), df)
    units = df.drop_duplicates("unit")[["unit", "method", "impl"]]
    plain = {m: u for u, m, i in units.itertuples(index=False) if str(i).startswith(OWN) and "+" not in str(i)}
    impl_of = dict(zip(units["unit"], units["impl"]))
    found: list[tuple[str, str]] = []
    for unit, method, impl in units.itertuples(index=False):
        base = _base(cards, str(method))
        other = cards.counterpart(str(method))
        if other and other in plain and unit == method:
            found.append((plain[other], unit))
        elif base != method and base in plain and impl != impl_of[plain[base]]:
            found.append((plain[base], unit))
        elif unit != method and plain.get(method) not in (None, unit):
            found.append((plain[method], unit))
    return sorted(found)


def unpaired_libraries(df: pd.DataFrame, paired: set[str], cards: RunCards) -> list[str]:
    """Units of library methods (their card's ``origin`` not equibench) with no counterpart of
    ours among the rows, e.g. ``mace``: shown with an empty "ours" side."""
    out = []
    for unit, method in df.drop_duplicates("unit")[["unit", "method"]].itertuples(index=False):
        origin = cards.origin(str(method))
        if unit not in paired and origin is not None and origin != OWN:
            out.append(str(unit))
    return sorted(out)


def _values(df: pd.DataFrame, unit: str, metric: str) -> list[float]:
    rows = df[(df["unit"] == unit) & (df["metric"] == metric) & (df["status"] == Status.OK)]
    return [float(v) for v in rows["value"].dropna()]


def _mean(df: pd.DataFrame, unit: str, metric: str) -> float | None:
    vals = _values(df, unit, metric)
    return sum(vals) / len(vals) if vals else None


def _score(df: pd.DataFrame, unit: str, metric: str) -> str:
    mean, half, n = t_interval(_values(df, unit, metric))
    if n == 0:
        return "–"
    return value(spec_for(metric), mean) + (f" ± {fmt.number(half)}" if n > 1 else " (1 seed)")


def _converged(df: pd.DataFrame, unit: str) -> str:
    runs = df[(df["unit"] == unit) & df["convergence"].notna()] if "convergence" in df else df.iloc[0:0]
    conv = runs.drop_duplicates("spec_hash")["convergence"].tolist()
    bad = sum(c in ("not_converged", "cap_reached") for c in conv)  # cap_reached: capped before a plateau
    return "–" if not conv else ("yes" if not bad else f"⚠ {bad} of {len(conv)} not")


#: what still differs inside each pair beside the force kind (from the reference classes' and our
#: methods' docstrings), keyed by the reference's method (or, for one method measured with two
#: implementations, by that method)
REMAINING_DIFFERENCES = {
    "nequip": ("readout: ours one o3.Linear to the output, nequip two (to 0e features, then the energy); "
               "radial MLP: ours 2 hidden layers, nequip 1 (its width ratio kept when sized); "
               "parameter matching scales mul + radial width vs num_features + radial_mlp_width; "
               "nequip computes edge lengths and the Bessel basis in float64"),
    "frame_averaging_pytorch": ("none in the function (same 8 frames, columns aligned; outputs agree to 1e-10 "
                                "in float64), only the library's dense padded batching and the order of the sum"),
    "egnn_pytorch": ("MLP hidden widths (2k, 4 m_dim, 2 width vs width), message width (m_dim vs width), "
                     "coordinate sum vs mean, the self pair in the message sum, the bias of coors_mlp, "
                     "initialisation (library weights N(0, 1e-3))"),
    "equiadapt": ("the canonicaliser: equiadapt's vector-neuron deep set (biases, Gram-Schmidt over coordinate "
                  "rows, dropout 0.5: not equivariant as published) vs ours (exact); same backbone and prior "
                  "setting"),
    "equiformer_pytorch": ("no equibench counterpart; SO(3) only (the library's irreps carry no parity; "
                           "its error is measured under rotations); the paper's MLP "
                           "attention; forces predicted directly (the library's edge rotations are "
                           "computed without gradients)"),
    "e3nn": "the tensor products only (cuEquivariance's instead of e3nn's; same network and weights)",
}
NEG_GRAD = "−dE/dx"


def _options(df: pd.DataFrame, unit: str) -> dict[str, Any]:
    """The method options of ``unit``'s rows (a dict, or its JSON / repr text after a round trip)."""
    col = df[df["unit"] == unit]["method_options"] if "method_options" in df else pd.Series(dtype=object)
    for v in col:
        if isinstance(v, dict):
            return v
        if isinstance(v, str) and v.strip():
            try:
                parsed = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                parsed = as_options(v) or None
            if isinstance(parsed, dict):
                return parsed
    return {}


def force_kind(cards: RunCards, method: str, options: dict[str, Any]) -> str:
    """How ``method`` with ``options`` makes force predictions, as its card says: ``NEG_GRAD``
    when they are minus the gradient of its energy, else "predicted directly"; "?" without a card."""
    conservative = cards.conservative_forces(method, options)
    if conservative is None:
        return "?"
    return NEG_GRAD if conservative else "predicted directly"


def pair_differences(df: pd.DataFrame, ours: str, ref: str, metric: str | None, cards: RunCards) -> str:
    """What still differs between the two sides of a pair: on a force task (``metric`` names
    forces) the kind of forces each predicts, then ``REMAINING_DIFFERENCES`` for the pair, and for
    ``frame_averaging`` whether ours averages tied eigenspaces (``degenerate``)."""
    parts = []
    ours_method = next(iter(df[df["unit"] == ours]["method"]), ours)
    ref_method = next(iter(df[df["unit"] == ref]["method"]), ref)
    if metric and "force" in metric and not ours.startswith("–"):
        a = force_kind(cards, str(ours_method), _options(df, ours))
        b = force_kind(cards, str(ref_method), _options(df, ref))
        parts.append(f"forces: both {a} (same kind)" if a == b else
                     f"forces: ours {a}, reference {b} (not the same kind)")
    if _options(df, ours).get("degenerate") == "average":
        parts.append("tied covariance eigenvalues: ours averages frames built from the input "
                     "(degenerate: average), the reference uses eigh's arbitrary basis")
    text = REMAINING_DIFFERENCES.get(_base(cards, str(ref_method)))
    if text:
        parts.append(text)
    return "; ".join(parts) if parts else "–"


def pair_row(df: pd.DataFrame, task: str, ours: str, ref: str, metric: str | None,
             cards: RunCards) -> dict[str, Any]:
    """One table row: the two units' numbers side by side (see module docstring)."""
    row: dict[str, Any] = {"task": task, "ours": ours, "reference": ref,
                           "reference implementation": next(iter(df[df["unit"] == ref]["impl"]), "?")}
    spec = spec_for(metric) if metric else None
    row["test metric"] = f"{spec.display} ({'lower' if spec.direction == 'lower' else 'higher'} is better)" \
        if spec and spec.direction else (metric or "–")
    a, b = (_values(df, ours, metric), _values(df, ref, metric)) if metric else ([], [])
    row["score (ours)"] = _score(df, ours, metric) if metric else "–"
    row["score (ref.)"] = _score(df, ref, metric) if metric else "–"
    p = welch_p(a, b) if len(a) > 1 and len(b) > 1 else float("nan")
    row["Welch p"] = "–" if p != p else fmt.number(p)
    row["differences"] = pair_differences(df, ours, ref, metric, cards)
    for label, m in (("eq. err fp64", EQ64), ("eq. err fp32", EQ32)):
        row[f"{label} (ours)"] = value(spec_for(m), _mean(df, ours, m))
        row[f"{label} (ref.)"] = value(spec_for(m), _mean(df, ref, m))
    t_ours, t_ref = _mean(df, ours, THROUGHPUT), _mean(df, ref, THROUGHPUT)
    row["graphs/s (ours)"] = value(spec_for(THROUGHPUT), t_ours)
    row["graphs/s (ref.)"] = value(spec_for(THROUGHPUT), t_ref)
    row["ref./ours speed"] = f"{t_ref / t_ours:.2f}×" if t_ours and t_ref else "–"
    ours_params = fmt.number(_mean(df, ours, PARAMS), "int") if not ours.startswith("–") else "–"
    row["params (ours / ref.)"] = f"{ours_params} / {fmt.number(_mean(df, ref, PARAMS), 'int')}"
    agree = _mean(df, ref, AGREEMENT)
    row["agreement"] = "–" if agree is None else value(spec_for(AGREEMENT), agree)
    row["converged (ours / ref.)"] = f"{_converged(df, ours)} / {_converged(df, ref)}"
    row["seeds"] = str(len(set(df[df["unit"].isin([ours, ref])]["seed"].dropna())))
    return row


def reference_sections(df: pd.DataFrame, cards: RunCards | None = None) -> list[Section]:
    """The section (at most one) pairing our implementations with their references, by the runs'
    ``cards`` (None: the cards the rows alone give)."""
    if df.empty or "task" not in df or "method" not in df:
        return []
    cards = cards if cards is not None else cards_for((), df)
    rows, used, notes = [], [], []
    for task, g in df.groupby("task", sort=True):
        base, _ = split_sweeps(g)
        ok = labelled(base[base["status"] == Status.OK])
        metric = task_metric(ok, cards)
        found = pairs(ok, cards)
        for ours, ref in found:
            rows.append(pair_row(ok, str(task), ours, ref, metric, cards))
            used.append(ok[ok["unit"].isin([ours, ref])])
        for ref in unpaired_libraries(ok, {u for pair in found for u in pair}, cards):
            rows.append(pair_row(ok, str(task), unpaired_label(ok, ref, cards), ref, metric, cards))
            used.append(ok[ok["unit"] == ref])
        notes += unmeasured(str(task), base, {m for pair in found for m in pair} | set(ok["method"]), cards)
    if not rows:
        return []
    full = pd.DataFrame(rows).set_index("task")
    ids = ["ours", "reference"]
    cost = [c for c in full.columns if c.startswith(("graphs/s", "ref./ours", "params", "agreement", "converged"))
            or c == "seeds"]
    table = full[[c for c in full.columns if c not in cost]]
    return [{"task": "references", "heading": "Our implementations beside their references",
             "context": ("Each row pairs an equibench implementation with the library implementation of the same "
                         "construction, measured in the same run(s) on the same task: test metric mean over seeds ± "
                         "95 % t-interval with Welch's p for the difference; relative equivariance error of the "
                         "trained models (mean over test graphs and group samples); inference throughput (median "
                         "graphs/s) and the reference's speed relative to ours; 'agreement' is the reference's "
                         "measured output deviation from ours with the same weights where its rows carry one; "
                         "'differences' states what still differs inside the pair (on force tasks first the kind "
                         "of forces each side predicts). "
                         + context_line(pd.concat(used))),
             "table": table, "more": [("references", full[ids + cost])],
             "index_label": "task", "css": "references", "figures": [], "tables": [],
             "notes": [CROSS_CHECKS, *notes]}]


def unmeasured(task: str, df: pd.DataFrame, present: set[str], cards: RunCards) -> list[str]:
    """One line per method configuration of ``task`` that has no ok row although it is a library
    method with a counterpart or a variant of a method that did run (e.g. a CUDA-only backend on a
    CPU run)."""
    lines: list[str] = []
    bases = {_base(cards, m) for m in present}
    bad = df[df["status"] != Status.OK].drop_duplicates("spec_hash")
    if bad.empty:
        return lines
    opts = bad["method_options"].map(repr) if "method_options" in bad else pd.Series("", index=bad.index)
    errors = bad["error"] if "error" in bad else pd.Series(None, index=bad.index, dtype=object)
    for (method, options), g in bad.assign(error=errors).groupby([bad["method"], opts], sort=True):
        if cards.counterpart(str(method)) is None and _base(cards, str(method)) not in bases:
            continue
        reason = next((str(e) for e in g["error"].dropna()), "")
        lines.append(f"Not measured: {method} {options} on {task} ({g['status'].iloc[0]}"
                     + (f": {reason}" if reason else "") + ").")
    return lines
