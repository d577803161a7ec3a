"""``soft_equivariance``: the shared backbone trained with an equivariance penalty (soft, never exact).

Setting: approximate symmetries handled by a regulariser instead of the architecture (Kim, Lee,
Yang, Lee, "Regularizing Towards Soft Equivariance Under Mixed Symmetries", ICML 2023: one
equivariance regulariser per symmetry type, its strength tuned during training). Here there is
one symmetry type, the group ``G`` chosen by ``penalty_group``, and the model f is the plain
shared backbone (``baseline``'s ``blocks.backbone.BackboneModel``, same width / parameter count,
same initialisation under the same seed).

Penalty (``auxiliary_loss``, added to the task loss at every training step)::

    D(theta) = 1/K sum_k  mean_{nodes, components} ( f(g_k . X) - rho_out(g_k) f(X) )^2,

with K = ``n_samples`` elements g_k = (R_k, t_k) of G drawn per graph and step (Haar on the
rotation part: O(3) / SO(3), or the axial subgroups about e_z; t ~ N(0, I) when G has
translations; ``symmetry.group3d.sample_element``), acting on every typed input field and on the
output through its type (``act_on_batch`` / ``act_on_output``; fields describing a
symmetry-breaking environment stay fixed, as the task declares them). The training loss is
``L_task + lam * D``.

**Absolute, not relative.** ``D`` is the *absolute* squared defect, reduced exactly like the
task's MSE loss (mean over nodes and components), so ``lam`` is the weight of the equivariance
defect against the task error in the same units: ``lam = 1`` weighs a unit of defect like a unit
of prediction error. A relative defect ``||f(gX) - rho f(X)||^2 / ||f(X)||^2`` was rejected: its
denominator is the model's own output, which the model can inflate to shrink the penalty, and
for ``point`` outputs it depends on the choice of origin (a translation changes ||f(X)||).

Group (``penalty_group``): ``"full"`` (default) penalises the task's broken group when it
declares one (``TaskSpec.broken_group``: E(3) for ``nbody_field``, whose target obeys only the
axial group), else the task's group; ``"exact"`` penalises the task's own group ``spec.group``.

Strength (``lam_mode``):

* ``"fixed"``: ``lam`` throughout. ``lam = 0`` computes no penalty at all: the run is the
  ``baseline`` run step for step (same initialisation, batches and losses).
* ``"dual"``: ``lam`` is a Lagrange multiplier of the constraint "relative defect below a
  tolerance", updated by projected dual ascent after every step, with the resilient relaxation of
  Hounie, Chamon & Ribeiro ("Resilient Constrained Learning", NeurIPS 2023; dual ascent on an
  equivariance constraint as in Manolache, Chamon & Niepert, NeurIPS 2025)::

      r      = D / S,   S = mean_{nodes, components} (y - x)^2 (point outputs) or y^2 (others),
      lam   <- max(0, lam + dual_lr * (r - tolerance - lam / relax_cost)).

  ``S`` is the batch's mean squared target signal, a constant of the data (never of the model),
  so ``r`` is scale free. The term ``lam / relax_cost`` is the optimal relaxation u* of the
  constraint r <= tolerance + u under the relaxation cost ``relax_cost * u^2 / 2`` (at the
  optimum lam = relax_cost * u*). At a fixed point ``lam = relax_cost * (r - tolerance)`` and
  lam is the marginal task loss of tightening the constraint: it grows when the data resist the
  symmetry (the defect cannot be removed without hurting the task) and falls to 0 when the
  constraint is slack. ``lam`` (the initial value) starts the ascent.

The multiplier lives in a buffer of the model (``lam``), so the checkpoint selected on the
validation split carries the lam it was trained with, and a float64 rebuild loads it with the
weights. Reported through ``extra_metrics`` (``test.soft_lam``: the fitted / fixed lam of the
tested checkpoint; ``test.soft_defect``: the relative defect ``r`` of the tested model on each
test batch in eval mode, one sampled element of G per graph, averaged over batches).

``field_input`` (shared with the wrapping methods, ``blocks.breaking``): the backbone also takes
the task's symmetry-breaking fields as typed inputs; the penalty then moves them with g too (the
full group acts on the system and its environment together).

Not exact by construction on any task (``inexact_reason``): equivariance is only encouraged. The
penalty costs ``n_samples`` extra forward (and backward) passes per step.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch_geometric.data import Batch

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...metrics.catalogue import method_metric
from ...symmetry.fieldtypes import POINT
from ...symmetry.group3d import act_on_batch, act_on_output, sample_element
from .baseline import Baseline

#: seed offset of the penalty's own random generator (kept apart from batching and augmentation)
PENALTY_SEED_OFFSET = 7919


class _Generator:
    """A torch generator that survives ``copy.deepcopy`` and pickling (state copied)."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def __deepcopy__(self, memo: dict) -> _Generator:
        new = _Generator(0)
        new.gen.set_state(self.gen.get_state())
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {"state": self.gen.get_state()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.gen = torch.Generator()
        self.gen.set_state(state["state"])


class SoftEquivariantModel(nn.Module):
    """The shared backbone with the penalty's state: ``lam`` (buffer) and its own generator."""

    lam: torch.Tensor
    spec: TaskSpec
    _gen: _Generator

    def __init__(self, backbone: nn.Module, spec: TaskSpec, lam: float, seed: int) -> None:
        super().__init__()
        self.backbone, self.spec = backbone, spec
        self.register_buffer("lam", torch.tensor(float(lam)))
        self._gen = _Generator(seed + PENALTY_SEED_OFFSET)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.backbone(batch)


def penalty_group(spec: TaskSpec, which: str) -> str:
    """The group the penalty samples: the broken (full) group when declared and ``which`` is
    "full", else the task's own group."""
    if which == "full" and spec.broken_group:
        return str(spec.broken_group)
    return spec.group


def target_signal(batch: Batch, spec: TaskSpec) -> torch.Tensor:
    """S: mean squared target signal of the batch (displacement y - x for point outputs)."""
    y = batch.y
    if spec.output == POINT and spec.point_fields:
        y = y - batch[spec.point_fields[0]]
    return (y.detach() ** 2).mean().clamp_min(1e-12)


def equivariance_defect(model: nn.Module, batch: Batch, spec: TaskSpec, pred: torch.Tensor, group: str,
                        n_samples: int, generator: torch.Generator) -> torch.Tensor:
    """D = 1/K sum_k mean((f(g_k X) - rho_out(g_k) f(X))^2) with ``pred`` = f(X) (module docstring)."""
    dtype = pred.dtype
    total = pred.new_zeros(())
    for _ in range(n_samples):
        g = sample_element(batch, group, generator, permute=False).to(dtype, pred.device)
        moved = model(act_on_batch(batch, spec, g, target=False))
        total = total + ((moved - act_on_output(pred, spec, g, batch)) ** 2).mean()
    return total / n_samples


@register_method("soft_equivariance")
class SoftEquivariance(Baseline):
    """The shared backbone trained with an equivariance penalty: soft, never exact (Kim et al. 2023)."""
    domains: ClassVar[tuple[str, ...]] = ("graph3d",)
    exact_by_domain: ClassVar[dict[str, bool]] = {"graph3d": False}
    smoke_options = {"width": 16, "depth": 2, "lam": 1.0}
    #: the penalty's strength and the tested model's defect: context only (a larger lam is neither
    #: better nor worse in itself)
    METRICS = (method_metric("soft_lam", display="penalty strength lam",
                             description="lam of the tested checkpoint: fixed, or the multiplier fitted by dual "
                                         "ascent (lam_mode='dual')"),
               method_metric("soft_defect", display="relative equivariance defect",
                             description="mean((f(g·X) − ρ(g) f(X))²) / mean squared target signal on the test "
                                         "batches, one element of the penalised group per graph, eval mode"))

    def __init__(self, *, width: int = 64, depth: int = 4, params: int | None = None, lam: float = 1.0,
                 lam_mode: Literal["fixed", "dual"] = "fixed", penalty_group: Literal["full", "exact"] = "full",
                 n_samples: int = 1, tolerance: float = 0.01, relax_cost: float = 100.0,
                 dual_lr: float = 10.0, field_input: bool = False) -> None:
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if tolerance < 0 or relax_cost <= 0 or dual_lr <= 0:
            raise ValueError("need tolerance >= 0, relax_cost > 0 and dual_lr > 0")
        super().__init__(width=width, depth=depth, params=params, field_input=field_input)
        self.options.update(lam=lam, lam_mode=lam_mode, penalty_group=penalty_group, n_samples=n_samples,
                            tolerance=tolerance, relax_cost=relax_cost, dual_lr=dual_lr)
        self.lam, self.lam_mode, self.penalty_group, self.n_samples = lam, lam_mode, penalty_group, n_samples
        self.tolerance, self.relax_cost, self.dual_lr = tolerance, relax_cost, dual_lr

    def inexact_reason(self, spec: TaskSpec) -> str | None:
        return ("soft_equivariance only penalises the equivariance defect in training "
                "(lam * ||f(g.X) - rho(g) f(X)||^2); it is not equivariant by construction")

    def build_graph(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        return SoftEquivariantModel(self.build_backbone(spec), spec, self.lam, seed)

    def auxiliary_loss(self, model: nn.Module, batch: Batch, pred: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(model, SoftEquivariantModel):
            return None
        if self.lam_mode == "fixed" and self.lam == 0:
            return None  # exactly the baseline's step
        spec = model.spec
        group = penalty_group(spec, self.penalty_group)
        defect = equivariance_defect(model, batch, spec, pred, group, self.n_samples, model._gen.gen)
        lam = model.lam.detach().clone()
        if self.lam_mode == "dual":
            with torch.no_grad():
                r = defect.detach() / target_signal(batch, spec)
                step = self.dual_lr * (r - self.tolerance - model.lam / self.relax_cost)
                model.lam.copy_((model.lam + step).clamp_min(0.0))
        return lam * defect

    @torch.no_grad()
    def extra_metrics(self, model: nn.Module, batch: Batch, pred: torch.Tensor) -> dict[str, float]:
        if not isinstance(model, SoftEquivariantModel):
            return {}
        spec = model.spec
        gen = torch.Generator().manual_seed(PENALTY_SEED_OFFSET)  # the same elements for every evaluation
        defect = equivariance_defect(model, batch, spec, pred, penalty_group(spec, self.penalty_group), 1, gen)
        return {"soft_lam": float(model.lam), "soft_defect": float(defect / target_signal(batch, spec))}
