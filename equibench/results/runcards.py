"""The cards a report reads: ``cards_for(run_dirs, rows)``, the ONE place where the cards a run
did not store are synthesised from its rows.

Stored cards (``cards.read_cards``; several run directories merged) are used as they are. A
method key or task that the rows carry and no stored card describes (a run stored before cards,
a point whose card could not be built, a card file cut short) gets a card synthesised from what
its rows carry (``source = "synthesised"``):

* a method: origin and implementation (``implementation``), per task configuration its options,
  exactness claim and scope (``exact_claim``, ``exact_scope``), parameter count (``params``
  rows) and environment, its ``float32_caveat``; counterpart, whether it wraps the shared backbone
  and whether it predicts conservative forces from ``LEGACY_METHODS``, the declarations of the
  built-in methods when cards were introduced, frozen (a ``forces: conservative`` option counts
  as conservative, as the report read it then);
* a task: per options set its primary metric (the ``val_metric`` its rows name, else the test
  metric with a trivial twin that the most methods report: the catalogue of the reading process
  decides, as the report did before cards), the roles of the metrics its rows carry (``legacy_roles``:
  from the catalogue's families) and its provenance; floors, what a seed draws and the trivial
  reference from ``LEGACY_TASKS`` (frozen likewise).

What the report of an old run cannot know: why a method does not claim exactness, its
description, group, declared exactness per domain and requirements; a task's field types,
groups, declared metrics it did not report and description; for a plugin method or task, nothing
beyond its rows: no counterpart pairing, no time against the backbone, no floors' descriptions,
and its metrics' display name, direction and unit only where the reading process's catalogue
declares them.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.registry import method_of
from ..metrics.catalogue import PARAMS, STATUS, find_metric, list_metrics, test_metric, trivial_metric
from .cards import (
    CardSet,
    MethodCard,
    MethodRun,
    Role,
    TaskCard,
    TaskConfiguration,
    declared_role,
    metric_ref,
    read_cards,
)
from .status import Status

#: the built-in methods' declarations that rows do not carry, as they stood when cards were
#: introduced (commit e9ac824): origin, counterpart, whether they wrap the backbone, conservative forces
LEGACY_METHODS: dict[str, dict[str, Any]] = {
    "augmentation": {"wraps_backbone": True}, "baseline": {"wraps_backbone": True},
    "canonicalization": {"wraps_backbone": True}, "frame_averaging": {"wraps_backbone": True},
    "local_canonicalization": {"wraps_backbone": True}, "pca_canonicalization": {"wraps_backbone": True},
    "soft_equivariance": {"wraps_backbone": True}, "tensor_frames": {"wraps_backbone": True},
    "e3nn": {}, "e3nn_nequip": {}, "egnn": {}, "escnn": {}, "fa_gnn": {},
    "egnn_pytorch": {"origin": "egnn-pytorch", "counterpart": "egnn"},
    "equiadapt": {"origin": "equiadapt", "counterpart": "canonicalization", "wraps_backbone": True},
    "frame_averaging_pytorch": {"origin": "frame-averaging-pytorch", "counterpart": "frame_averaging",
                                "wraps_backbone": True},
    "mace": {"origin": "mace-torch", "conservative_forces": True},
    "nequip": {"origin": "nequip", "counterpart": "e3nn_nequip", "conservative_forces": True},
}
_GENERIC_TRIVIAL = "What a model that learned nothing but the simplest statistic of the training targets predicts"
_CONSTANT_VELOCITY = ("constant-velocity extrapolation x + Δt·v with Δt fitted by least squares on the training split "
                      "(the EGNN paper's 'Linear' row)")
#: the built-in tasks' floors, seed draws and trivial reference as the report read them before cards
LEGACY_TASKS: dict[str, dict[str, Any]] = {
    "nbody": {"floors": {"constant_velocity": _CONSTANT_VELOCITY},
              "seed_draws": "the simulated training and validation systems", "trivial": _GENERIC_TRIVIAL},
    "nbody_field": {"floors": {"constant_velocity": _CONSTANT_VELOCITY,
                               "constant_velocity_field": "x + a·v + b·q·field·e_z with a and b fitted by least "
                               "squares on the training split: inertia plus the field's constant push (½ t² at "
                               "unit mass)"},
                    "seed_draws": "the simulated training and validation systems", "trivial": _GENERIC_TRIVIAL},
    "md": {"seed_draws": "the training and validation Langevin trajectories simulated (xTB)",
           "trivial": _GENERIC_TRIVIAL},
    "digits": {"floors": {"nearest_centroid": "the class whose mean training image is nearest (Euclidean, pixels)"},
               "seed_draws": "the training and validation images drawn from their fixed pools (and, "
                             "rotated/rotated, each training image's rotation)", "trivial": _GENERIC_TRIVIAL},
    "normals": {"floors": {"pca": "classical PCA normal estimation: the direction of least variance of each "
                                  "point's k nearest neighbours and itself (unsigned, like the metric)"},
                "seed_draws": "the training and validation clouds sampled (meshes from the fixed training pool, "
                              "points, noise)",
                "trivial": "One fixed axis for every point: the top eigenvector of the training normals' second "
                           "moment E[n n^T], the constant that minimises the mean 1 - cos^2 (a zero vector, the "
                           "equivariant constant, has no direction to score)"},
    "qm9": {"floors": {"atom_counts": "least-squares linear regression of the target on the numbers of H, C, N, O "
                                      "and F atoms plus an intercept, fitted on the training split"},
            "seed_draws": "the molecules drawn from the fixed training and validation pools",
            "trivial": "The training mean: 0 in the standardised target the model predicts"},
}


def as_options(value: Any) -> dict[str, Any]:
    """An options cell as a dict (a dict, or its JSON text after a Parquet round trip; {} otherwise)."""
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return dict(value) if isinstance(value, dict) else {}


def _options_key(value: Any) -> str:
    return json.dumps(as_options(value), sort_keys=True)


@dataclass
class RunCards(CardSet):
    """The cards of the runs a report shows, with the lookups the report makes."""

    def method(self, key: str) -> MethodCard | None:
        return self.methods.get(str(key))

    def task(self, name: str) -> TaskCard | None:
        return self.tasks.get(str(name))

    def counterpart(self, key: str) -> str | None:
        card = self.method(key)
        return card.counterpart if card is not None else None

    def origin(self, key: str) -> str | None:
        card = self.method(key)
        return card.origin if card is not None else None

    def wraps_backbone(self, key: str) -> bool:
        card = self.method(key)
        return bool(card is not None and card.wraps_backbone)

    def wrappers(self) -> set[str]:
        """The method keys that wrap the shared backbone."""
        return {k for k in self.methods if self.wraps_backbone(k)}

    def conservative_forces(self, key: str, options: dict[str, Any] | None = None) -> bool | None:
        """Whether method ``key`` (with ``options``, when one of its runs had them) predicts forces as
        −dE/dx; None when no card says."""
        card = self.method(key)
        if card is None:
            return None
        run = next((r for r in card.runs if options is None or r.options == options), None)
        if run is not None and run.conservative_forces is not None:
            return run.conservative_forces
        return card.conservative_forces

    def roles(self, task: str) -> dict[str, Role]:
        card = self.task(task)
        return card.roles() if card is not None else {}

    def primary(self, task: str, options: Any = None) -> str | None:
        """The primary metric of ``task`` (of its configuration with ``options`` when given)."""
        card = self.task(task)
        conf = card.configuration(as_options(options) if options is not None else None) if card else None
        return conf.primary.name if conf is not None and conf.primary is not None else None


def _merge(into: CardSet, found: CardSet) -> None:
    for key, card in found.methods.items():
        if key not in into.methods:
            into.methods[key] = card
            continue
        mine = into.methods[key]
        mine.runs += [r for r in card.runs if not any(r.same_configuration(o) for o in mine.runs)]
    for name, tcard in found.tasks.items():
        if name not in into.tasks:
            into.tasks[name] = tcard
            continue
        have = into.tasks[name]
        have.configurations += [c for c in tcard.configurations
                                if not any(c.options == o.options for o in have.configurations)]
    for name, spec in found.metrics.items():
        into.metrics.setdefault(name, spec)


def cards_for(run_dirs: Iterable[str | Path] = (), rows: pd.DataFrame | None = None) -> RunCards:
    """The cards of ``run_dirs`` (stored ones merged, the newest run's card first where two runs
    hold one) completed from ``rows`` (their results): a card for every method key and task the
    rows name that no stored card describes, and a role for every metric a task's rows carry that
    its card does not list (see the module docstring)."""
    out = RunCards()
    for d in sorted((Path(p) for p in run_dirs), key=lambda p: p.name, reverse=True):
        _merge(out, read_cards(d))
    if rows is None or rows.empty or "method" not in rows or "task" not in rows:
        return out
    runs = rows[rows["task"].notna() & rows["method"].notna()]
    for key, g in runs.groupby("method", sort=True):
        if str(key) not in out.methods:
            out.methods[str(key)] = legacy_method_card(str(key), g)
    for task, g in runs.groupby("task", sort=True):
        card = out.tasks.get(str(task))
        if card is None:
            out.tasks[str(task)] = legacy_task_card(str(task), g)
            continue
        for conf in card.configurations:
            extra = legacy_roles(g["metric"].dropna().unique(), conf.primary.name if conf.primary else None)
            for name, role in extra.items():
                conf.roles.setdefault(name, role)
    return out


# ---------------------------------------------------------------------------------------------
# synthesis from the rows of a run stored before cards

def _cell(g: pd.DataFrame, column: str) -> Any:
    """The first value of ``column`` in ``g`` that is not missing (None when none is)."""
    if column not in g:
        return None
    for v in g[column]:
        if v is None or (isinstance(v, float) and v != v) or v == "":
            continue
        return v.item() if hasattr(v, "item") else v
    return None


def legacy_method_card(key: str, rows: pd.DataFrame) -> MethodCard:
    """A method card from the rows of method ``key`` and ``LEGACY_METHODS``."""
    base = method_of(key)
    known = LEGACY_METHODS.get(base, {})
    impl = _cell(rows, "implementation")
    runs = []
    keys = [rows[c].map(_options_key) if c in rows else pd.Series("{}", index=rows.index)
            for c in ("task_options", "method_options")]
    for _, g in rows.groupby([rows["task"].astype(str), *keys], sort=False):
        options = as_options(_cell(g, "method_options"))
        params = g[(g["metric"] == PARAMS) & g["value"].notna()]["value"] if "value" in g else pd.Series(dtype=float)
        claim = _cell(g, "exact_claim")
        runs.append(MethodRun(task=str(g["task"].iloc[0]), task_options=as_options(_cell(g, "task_options")),
                              options=options, exact_claim=bool(claim) if claim is not None else None,
                              exact_scope=_cell(g, "exact_scope"),
                              conservative_forces=bool(known.get("conservative_forces"))
                              or options.get("forces") == "conservative",
                              params=int(params.iloc[0]) if len(params) else None,
                              implementation=_cell(g, "implementation"), environment=_cell(g, "environment")))
    return MethodCard(source="synthesised", name=key, method=base, label=key.partition("@")[2] or None,
                      origin=str(impl).split(" ")[0] if impl else known.get("origin", "equibench"),
                      implementation=impl, counterpart=known.get("counterpart"),
                      wraps_backbone=known.get("wraps_backbone", False),
                      conservative_forces=known.get("conservative_forces", False),
                      float32_caveat=str(_cell(rows, "float32_caveat") or ""), runs=runs)


def legacy_task_card(task: str, rows: pd.DataFrame) -> TaskCard:
    """A task card from the rows of ``task`` and ``LEGACY_TASKS``: one configuration per options set."""
    known = LEGACY_TASKS.get(task, {})
    confs = []
    keys = rows["task_options"].map(_options_key) if "task_options" in rows else pd.Series("{}", index=rows.index)
    for key in dict.fromkeys(keys):
        g = rows[keys == key]
        primary = legacy_primary(g)
        confs.append(TaskConfiguration(options=json.loads(key), primary=metric_ref(primary) if primary else None,
                                       roles=legacy_roles(g["metric"].dropna().unique(), primary),
                                       provenance=_cell(g, "provenance")))
    return TaskCard(source="synthesised", name=task, trivial_reference=known.get("trivial", ""),
                    floors=dict(known.get("floors", {})), seed_draws=known.get("seed_draws", ""),
                    configurations=confs)


def is_legacy_task_metric(name: str) -> bool:
    """Before cards: a task's own test metric was a test metric declared with a trivial-predictor
    twin (``trivial.<stat>``: the runner scores the trivial predictor on every task metric)."""
    s = find_metric(name)
    return (s is not None and s.family == "test" and bool(s.stat)
            and find_metric(trivial_metric(s.stat or "")) is not None)


def legacy_roles(names: Iterable[str], primary: str | None = None) -> dict[str, Role]:
    """Roles of ``names`` as the report assigned them before cards (from the reading process's
    catalogue): ``primary``, task metrics (``is_legacy_task_metric``), the rest as the catalogue
    gives them (``cards.declared_role``: other test metrics ``diagnostic``, trivial and floor
    scores ``reference``, ...); names the catalogue does not declare get none (shown under their
    raw names)."""
    out: dict[str, Role] = {}
    for name in dict.fromkeys(str(n) for n in names):
        spec = find_metric(name)
        if name == STATUS or spec is None:
            continue
        out[name] = ("primary" if name == primary else "task" if is_legacy_task_metric(name)
                     else declared_role(spec))
    return out


def legacy_primary(rows: pd.DataFrame) -> str | None:
    """The primary metric of one task configuration's rows before cards: the ``val_metric`` its ok
    rows name most often (as ``test.<name>``, when reported), else the task metric the most
    methods report (ties: one with a direction, then catalogue order)."""
    ok = rows[rows["status"] == Status.OK] if "status" in rows else rows
    present = set(ok["metric"]) if len(ok) else set()
    if "val_metric" in ok:
        named = [n for n in (test_metric(str(v)) for v in ok["val_metric"].dropna()) if n in present]
        if named:
            return Counter(named).most_common(1)[0][0]
    measured = ok[ok["value"].notna()] if "value" in ok else ok
    order = {s.name: i for i, s in enumerate(list_metrics())}
    candidates = sorted((str(m) for m in set(measured["metric"]) if is_legacy_task_metric(str(m))),
                        key=lambda m: (order.get(m, len(order)), m))
    if not candidates:
        return None
    reported = {c: measured[measured["metric"] == c]["method"].nunique() for c in candidates}
    return max(candidates, key=lambda c: (reported[c], find_metric(c).direction is not None,  # type: ignore[union-attr]
                                          -candidates.index(c)))


def legacy_wrappers(methods: Collection[Any]) -> set[str]:
    """The built-in methods among ``methods`` that wrapped the backbone (``LEGACY_METHODS``)."""
    return {str(m) for m in methods if LEGACY_METHODS.get(method_of(str(m)), {}).get("wraps_backbone")}
