"""``e3nn_nequip`` with ``forces="conservative"``: on a force task the network is an energy model
and the prediction is F = -dE/dx (like the ``nequip`` reference), so the reference pair on md
compares the same kind of forces. Held here in float64: the forces equal minus the autograd
gradient of the model's own energy (1e-12) and a central finite difference of it (1e-6), they are
exactly E(3)-equivariant (1e-10, reflections, translations, permutations), a training step on a
force loss moves the parameters (second derivative), the option leaves energy tasks and the
default untouched, the reference suite sets it, and the report's pair row says which force kinds
it compares."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torch_geometric.data import Batch, Data

import equibench as eb
from equibench.core.errors import UserError
from equibench.core.spec import TaskSpec
from equibench.methods.architectures.nequip_style import NequIPModel
from equibench.methods.base import count_parameters
from equibench.methods.blocks.energy_forces import ForcesFromEnergy
from equibench.metrics.equivariance import equivariance_error
from equibench.plan.suites import read_suite
from equibench.report.references import pair_row
from equibench.results.runcards import cards_for
from equibench.symmetry.precision import default_dtype

F64 = torch.float64
FORCES = TaskSpec(name="md", domain="graph3d", group="E3", inputs={"pos": "point", "x": "3x0e"}, output="1o",
                  level="node", loss="mse", metrics=("force_mae",))
ENERGY = TaskSpec(name="qm9", domain="graph3d", group="E3", inputs={"pos": "point", "x": "3x0e"}, output="0e",
                  level="graph", loss="mse", metrics=("mae",))
SMALL = {"mul": 4, "depth": 2, "radial_hidden": 16}


def molecule(n: int, gen: torch.Generator) -> Data:
    pos = torch.randn(n, 3, generator=gen, dtype=F64) * 1.2
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    keep = i != j
    z = torch.randint(0, 3, (n,), generator=gen)
    return Data(pos=pos, x=torch.nn.functional.one_hot(z, 3).to(F64), edge_index=torch.stack([j[keep], i[keep]]))


@pytest.fixture(scope="module")
def batch() -> Batch:
    gen = torch.Generator().manual_seed(3)
    return Batch.from_data_list([molecule(n, gen) for n in (5, 7, 6)])


def build(spec: TaskSpec, **opts):
    with default_dtype(F64):
        return eb.get_method("e3nn_nequip", **{**SMALL, **opts}).build(spec, seed=0)


def test_forces_are_minus_the_gradient_of_the_energy(batch):
    model = build(FORCES, forces="conservative").eval()
    assert isinstance(model, ForcesFromEnergy) and isinstance(model.energy_model, NequIPModel)
    assert model.energy_model.spec.output == "0e" and model.energy_model.spec.level == "graph"
    forces = model(batch)
    pos = batch.pos.detach().clone().requires_grad_(True)
    work = batch.clone()
    work.pos = pos
    (grad,) = torch.autograd.grad(model.energy_model(work).sum(), pos)
    assert forces.shape == (batch.num_nodes, 3)
    assert (forces + grad).abs().max() < 1e-12
    # independent of autograd: central differences of the energy along a few coordinates
    h = 1e-5
    for node, axis in ((0, 0), (4, 2), (9, 1)):
        plus, minus = batch.clone(), batch.clone()
        plus.pos = batch.pos.clone()
        minus.pos = batch.pos.clone()
        plus.pos[node, axis] += h
        minus.pos[node, axis] -= h
        with torch.no_grad():
            fd = -(model.energy_model(plus).sum() - model.energy_model(minus).sum()) / (2 * h)
        assert abs(fd - forces[node, axis]) < 1e-6 * max(1.0, abs(float(fd)))


def test_conservative_forces_are_exactly_equivariant(batch):
    model = build(FORCES, forces="conservative")
    err = equivariance_error(model, batch, FORCES, n_samples=4, seed=0, group="E3")
    assert err["rel_max"] < 1e-10, err


def test_a_training_step_on_a_force_loss(batch):
    model = build(FORCES, forces="conservative").train()
    target = torch.randn(batch.num_nodes, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    with FlopCounterMode(display=False) as counter:  # the runner counts a step's FLOPs this way
        loss = ((model(batch) - target) ** 2).mean()
        loss.backward()
    assert counter.get_total_flops() > 0
    assert torch.isfinite(loss)
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert sum(moved) >= len(moved) - 1, "the force loss did not reach the energy network's parameters"


def test_default_and_energy_tasks_are_unchanged(batch):
    direct = build(FORCES)
    assert isinstance(direct, NequIPModel) and direct.spec.output == "1o"
    assert "forces" not in eb.get_method("e3nn_nequip").options
    a, b = build(ENERGY), build(ENERGY, forces="conservative")
    assert isinstance(b, NequIPModel)
    a.eval(), b.eval()
    assert torch.equal(a(batch), b(batch))


def test_params_size_the_energy_network():
    method = eb.get_method("e3nn_nequip", params=20000, forces="conservative")
    model = method.build(FORCES)
    assert abs(count_parameters(model) - 20000) <= 2000
    assert count_parameters(model) == method.count(FORCES, *method.sizes_for(FORCES, 20000))


def test_bad_option_is_a_user_error():
    with pytest.raises(UserError, match="forces must be one of"):
        eb.get_method("e3nn_nequip", forces="both")


def test_reference_suite_compares_the_same_kind_of_forces():
    suite = read_suite("reference")
    assert suite.methods["e3nn_nequip"].get("forces") == "conservative"


def _rows(forces: str | None) -> pd.DataFrame:
    rows = []
    for method, opts in (("e3nn_nequip", {"params": 20000, **({"forces": forces} if forces else {})}),
                         ("nequip", {"params": 20000})):
        for seed in (0, 1):
            rows.append({"task": "md", "method": method, "unit": method, "impl": "x", "seed": seed,
                         "status": "ok", "metric": "test.force_mae", "value": 0.1 + seed,
                         "method_options": opts, "task_options": {}, "spec_hash": f"{method}{seed}",
                         "convergence": "converged"})
    return pd.DataFrame(rows)


def _pair_differences(forces: str | None) -> str:
    rows = _rows(forces)
    return pair_row(rows, "md", "e3nn_nequip", "nequip", "test.force_mae", cards_for([], rows))["differences"]


def test_pair_row_states_the_force_kinds_and_the_remaining_differences():
    """The force kinds come from the method cards (here the cards a run without stored cards gets
    from its rows and the built-in declarations): both −dE/dx, or one predicted directly."""
    same = _pair_differences("conservative")
    assert "both −dE/dx" in same and "readout" in same
    other = _pair_differences(None)
    assert "predicted directly" in other and "not the same kind" in other
