"""Forces as the negative gradient of a learned energy (a helper, not a registered method).

Given any model that maps a batch to one invariant energy per graph (``[B]`` or ``[B, 1]``,
type ``"0e"`` at graph level), ``F_i = -dE/dx_i`` is a node-level ``"1o"`` field: if E is
invariant under g = (R, t, P), E(R x + t) = E(x), then F(R x + t) = R F(x) (chain rule), so
the forces are exactly as equivariant as the energy is invariant, and conservative by
construction. ``create_graph`` keeps the graph of the gradient so a force loss can be
back-propagated to the parameters (a second-order derivative).

Wiring (for methods that can output a graph-level energy)::

    model = ForcesFromEnergy(method.build(energy_spec(task.spec), seed))   # model(batch) -> [N, 3]

or, for a method with a ``forces`` option (``"direct"`` default, ``"conservative"``), the mixin
``ForcesOption``: ``set_forces`` in ``__init__`` (recorded in the options only when not the
default, so existing specs hash as before), ``network_spec(spec)`` for the network and
``with_forces(net, spec)`` around it. Its ``is_force_task`` (``metrics.conservation``): a
node-level "1o" target with a point input; on any other task the option changes nothing.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch_geometric.data import Batch

from ...core.errors import UserError
from ...core.spec import TaskSpec
from ...metrics.conservation import is_force_task

#: the ``forces`` option: read forces off a "1o" head, or take -dE/dx of a graph-level energy
FORCE_MODES = ("direct", "conservative")


def energy_spec(spec: TaskSpec) -> TaskSpec:
    """The spec an energy model behind a force task is built for: graph-level ``"0e"`` output."""
    return dataclasses.replace(spec, output="0e", level="graph")


def energy_to_forces(model_energy: Callable[[Batch], torch.Tensor], batch: Batch,
                     training: bool | None = None, pos_field: str = "pos") -> tuple[torch.Tensor, torch.Tensor]:
    """``(E [B], F [N, 3])`` with ``E = model_energy(batch)`` and ``F = -dE/d batch[pos_field]``.

    ``training`` (default: whether autograd is recording) sets ``create_graph``: True keeps the
    graph so a loss on F reaches the parameters. Works under ``torch.no_grad()`` (the gradient is
    taken in an ``enable_grad`` block). If ``batch[pos_field]`` already requires grad it is used
    as is (so outer derivatives through the positions still flow); otherwise a detached leaf
    copy is used and ``batch`` is left untouched. The model sees a view of the positions, never
    the leaf itself: a module given the leaf as an input (egnn's layers take the coordinates)
    would have a leaf in its backward hooks, which ``autograd.grad`` refuses under
    ``FlopCounterMode`` (the training loop's FLOP count of its first step).
    """
    pos = batch[pos_field]
    keep = (torch.is_grad_enabled() if training is None else training) or pos.requires_grad
    with torch.enable_grad():
        if not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        work = copy.copy(batch)  # shallow: shares every other tensor
        work[pos_field] = pos.view_as(pos)
        energy = model_energy(work).reshape(-1)
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=keep)
    if not keep:
        energy, grad = energy.detach(), grad.detach()
    return energy, -grad


class ForcesFromEnergy(nn.Module):
    """Wrap an energy model (``batch -> [B]`` or ``[B, 1]``) into a force model (``batch -> [N, 3]``).

    ``create_graph`` follows ``self.training``, so eval-mode measurements stay cheap. For an
    energy term in the loss call ``energy_to_forces(module.energy_model, batch)`` directly.
    """

    def __init__(self, energy_model: nn.Module, pos_field: str = "pos") -> None:
        super().__init__()
        self.energy_model = energy_model
        self.pos_field = pos_field

    def forward(self, batch: Batch) -> torch.Tensor:
        training = self.training and torch.is_grad_enabled()
        return energy_to_forces(self.energy_model, batch, training=training, pos_field=self.pos_field)[1]


class ForcesOption:
    """Mixin of the ``forces`` option (module docstring): ``"conservative"`` builds the method's
    network for ``energy_spec`` on a force task and wraps it in ``ForcesFromEnergy``, so F = -dE/dx
    is conservative by construction (and exactly as equivariant as E is invariant)."""

    forces: str = "direct"

    def set_forces(self, forces: str) -> None:
        if forces not in FORCE_MODES:
            raise UserError(f"{getattr(self, 'name', '?')}: forces must be one of {FORCE_MODES}, got {forces!r}")
        self.forces = forces
        options = getattr(self, "options", None)
        if forces != "direct" and isinstance(options, dict):  # recorded only when set: existing rows unchanged
            options["forces"] = forces

    def conservative_on(self, spec: TaskSpec) -> bool:
        """Whether the model on ``spec`` is an energy model with forces -dE/dx."""
        return self.forces == "conservative" and is_force_task(spec)

    def network_spec(self, spec: TaskSpec) -> TaskSpec:
        """The spec the network is built for: ``energy_spec(spec)`` where ``conservative_on``."""
        return energy_spec(spec) if self.conservative_on(spec) else spec

    def with_forces(self, net: nn.Module, spec: TaskSpec) -> nn.Module:
        """``ForcesFromEnergy(net)`` where ``conservative_on(spec)``, else ``net``."""
        return ForcesFromEnergy(net, pos_field=spec.point_fields[0]) if self.conservative_on(spec) else net
