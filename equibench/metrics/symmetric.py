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
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch_geometric.data import Batch, Data

from ..core.spec import TaskSpec
from .equivariance import equivariance_error


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


__all__ = ["symmetric_input_errors"]
