"""Equivariance error on exactly symmetric inputs (the task's ``symmetric_inputs``).

For each named input X (one graph whose own stabiliser H in O(3) is larger than the identity:
benzene, a ring of equal charges, a symmetric cloud, ...) this is ``equivariance_error`` on X
alone, with the same sampling of g = (R, t, P) and the same statistics as on the test graphs:

    rel(g) = || f(g.X) - rho_out(g) f(X) || / (|| f(X) || + eps)

over ``n_samples`` elements g of the measured group. An intrinsically equivariant architecture is
exact here as anywhere (rounding only, ~1e-15 in float64); a frame or canonicalisation method is
not: its frame is undecided on X (every frame h F(X), h in H, is as valid), so f(X) depends on
which one the implementation happens to pick. The inputs should be built in float64
(``default_dtype(torch.float64)`` around ``Task.symmetric_inputs()``): in float32 they are
symmetric only to float32 rounding.

Probe ``symmetric_inputs`` (``metrics/probe.py``): the fp64 model on each of the task's inputs, at
init and trained (``symmetric.*`` rows, graph3d).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch_geometric.data import Batch, Data

from ..core.registry import register_probe
from ..core.spec import TaskSpec
from ..symmetry.precision import default_dtype
from .catalogue import FLOORS, STAGES, STAT_WORDS, SYMMETRIC_STATS, MetricSpec, symmetric_metric
from .equivariance import equivariance_error
from .probe import Probe, ProbeContext, ProbeSettings, Reading, reading


def symmetric_input_errors(model: nn.Module, inputs: Sequence[tuple[str, Data]], spec: TaskSpec,
                           n_samples: int = 8, dtype: torch.dtype = torch.float64, group: str | None = None,
                           seed: int = 0) -> list[dict[str, Any]]:
    """One row per input: ``input`` (its name) and ``equivariance_error``'s statistics
    (``rel_mean``, ``rel_max``, ``abs_max``, ``disp_rel_*`` for point outputs, ``n_samples``,
    ``group``, ...) on that input alone, with the same ``seed`` for every input. A model that
    raises on an input gets NaN statistics and the message in ``error`` (the run goes on)."""
    rows = []
    for name, data in inputs:
        try:
            res = equivariance_error(model, Batch.from_data_list([data]), spec, n_samples=n_samples, dtype=dtype,
                                     group=group, seed=seed)
        except Exception as err:  # noqa: BLE001 - a model that cannot run on a symmetric input is a result
            nan = float("nan")
            res = {"rel_mean": nan, "rel_median": nan, "rel_max": nan, "abs_max": nan, "n_samples": n_samples,
                   "n_graphs": 1, "group": group or spec.group, "error": f"{type(err).__name__}: {err}"[:300]}
        rows.append({"input": name, **res})
    return rows


@register_probe("symmetric_inputs")
class SymmetricInputsProbe(Probe):
    """The fp64 equivariance error on each of the task's exactly symmetric inputs
    (``Task.symmetric_inputs``, built in float64), at init and trained (graph3d)."""

    METRICS = tuple(MetricSpec(
        symmetric_metric(stage, stat), f"symmetric-input equiv. err fp64 {stage}, {STAT_WORDS[stat]}",
        "symmetric", direction="lower", aggregate="mean" if stat == "rel_mean" else "max", stage=stage,
        dtype="fp64", stat=stat, number_format="sci", floor=FLOORS["fp64"] if "rel_" in stat else None,
        description="||f(g·X) − ρ(g) f(X)|| (equivariance_error, fp64 model, g = (R, t, P) sampled from the "
                    "measured group) on one exactly symmetric input X of the task (benzene, methane, a "
                    "ring of equal charges, a symmetric cloud, ...; row column symmetric_input); frame and "
                    "canonicalisation methods are exact only on inputs without a symmetry of their own "
                    "(row column exact_scope)")
        for stage in STAGES for stat in SYMMETRIC_STATS)
    phases = ("init", "trained")
    order = 20
    domains = ("graph3d",)
    keys = {"equivariance_samples": "samples"}

    class Settings(ProbeSettings):
        samples: int = 8

    inputs: list[tuple[str, Data]]
    point_groups: dict[str, str]

    def prepare(self, task: Any, spec: TaskSpec) -> None:
        with default_dtype(torch.float64):  # exactly symmetric in float64, not only to float32 rounding
            self.inputs = task.symmetric_inputs()
        self.point_groups = {g.name: g.point_group for g in task.symmetric_geometries()} if self.inputs else {}

    def measure(self, ctx: ProbeContext, phase: str) -> list[Reading]:
        out = []
        for r in symmetric_input_errors(ctx.float64().to(ctx.device), self.inputs, ctx.spec,
                                        n_samples=self.settings.samples, group=ctx.group, seed=ctx.seed):
            out += [reading(symmetric_metric(phase, stat), r[stat], stage=phase, dtype="fp64", group=ctx.group,
                            symmetric_input=r["input"], point_group=self.point_groups.get(r["input"]), batch_size=1,
                            repeats=r["n_samples"], **({"symmetric_error": r["error"]} if "error" in r else {}))
                    for stat in SYMMETRIC_STATS if stat in r]  # disp_rel_max: point outputs only
        return out


__all__ = ["SymmetricInputsProbe", "symmetric_input_errors"]
