"""Force conservation (issue 22, item 4; ``metrics/conservation.py``): the velocity-Verlet
integrator conserves the energy of an analytic potential to second order in the time step; the
line-integral potential of a curl-free field is its potential (so K + U is conserved) and that of
a rotational field drifts; a -dE/dx model's force Jacobian is symmetric to rounding in float64
and a direct-force model's is not; the ``forces: conservative`` option of egnn, baseline and
augmentation builds -dE/dx models (exactly equivariant where the method is) and leaves the
default untouched; the probe runs through ``run_one`` on a tiny md point and is off by default."""
from __future__ import annotations

import math

import pytest
import torch
from torch_geometric.data import Batch, Data

import equibench as eb
from equibench.benches.taskrun import EvalConfig, run_one
from equibench.core.errors import UserError
from equibench.core.spec import RunSpec, TaskSpec
from equibench.methods.blocks.energy_forces import ForcesFromEnergy
from equibench.metrics.conservation import (
    ForceConservationProbe,
    ModelField,
    conservation_metric,
    drift_per_ps,
    force_jacobians,
    is_force_task,
    kinetic_energy,
    line_integral_potential,
    maxwell_boltzmann,
    relative_curl,
    velocity_verlet,
)
from equibench.metrics.equivariance import equivariance_error
from equibench.symmetry.precision import default_dtype

F64 = torch.float64
FORCES = TaskSpec(name="md", domain="graph3d", group="E3", inputs={"pos": "point", "x": "3x0e"}, output="1o",
                  level="node", loss="mse", metrics=("force_mae",))
SMALL = {"e3nn_nequip": {"mul": 4, "depth": 2, "radial_hidden": 16}, "egnn": {"width": 16, "depth": 2},
         "baseline": {"width": 16, "depth": 2}, "augmentation": {"width": 16, "depth": 2}}
ONE = torch.zeros(2, dtype=torch.long)  # two atoms, one graph

# ---- analytic fields ---------------------------------------------------------------------------

EPS, SIGMA = 0.01, 3.0  # a Lennard-Jones pair (eV, Å)


def lj_energy(x: torch.Tensor) -> torch.Tensor:
    r = (x[..., 1, :] - x[..., 0, :]).norm(dim=-1)
    return (4 * EPS * ((SIGMA / r) ** 12 - (SIGMA / r) ** 6)).reshape(-1)


def lj_forces(x: torch.Tensor) -> torch.Tensor:
    d = x[..., 1, :] - x[..., 0, :]
    r = d.norm(dim=-1, keepdim=True)
    du_dr = 4 * EPS * (-12 * SIGMA**12 / r**13 + 6 * SIGMA**6 / r**7)
    f1 = -du_dr * d / r
    return torch.stack([-f1, f1], dim=-2)


def rotational(x: torch.Tensor) -> torch.Tensor:
    """F = c (-y, x, 0): curl 2c e_z, no potential."""
    return 0.01 * torch.stack([-x[..., 1], x[..., 0], torch.zeros_like(x[..., 0])], dim=-1)


def harmonic(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * x


LJ_START = (torch.tensor([[0.0, 0.0, 0.0], [3.6, 0.2, 0.0]], dtype=F64),
            torch.tensor([[0.0, 0.01, 0.0], [0.0, -0.0075, 0.0]], dtype=F64), torch.tensor([12.0, 16.0], dtype=F64))


def lj_error(timestep_fs: float, duration_fs: float = 2000.0) -> float:
    """max_t |H(t) - H(0)| (eV) of the Lennard-Jones pair over ``duration_fs``."""
    pos, vel, masses = LJ_START
    run = velocity_verlet(lj_forces, lj_energy, pos, vel, masses, ONE, 1, timestep_fs, round(duration_fs / timestep_fs))
    assert run.finite
    return float((run.energy[:, 0] - run.energy[0, 0]).abs().max())


def test_velocity_verlet_conserves_energy_to_second_order_in_the_time_step():
    errors = [lj_error(dt) for dt in (2.0, 1.0, 0.5)]
    kinetic = float(kinetic_energy(LJ_START[1], LJ_START[2], ONE, 1))
    assert errors[0] < 1e-3 * kinetic  # conserved ...
    for coarse, fine in zip(errors, errors[1:]):  # ... to O(dt^2): halving dt divides the error by 4
        assert 3.6 < coarse / fine < 4.4, errors


def test_velocity_verlet_on_a_harmonic_oscillator_wobbles_and_does_not_drift():
    """A 1-D harmonic oscillator (k = 0.5 eV/Å², m = 1 amu, H0 = 0.25 eV): Verlet's energy error
    oscillates within (omega dt)^2 / 4 H0 (its modified energy) over 10 periods, and the fitted drift
    is far below that amplitude per duration."""
    pos, vel, m = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64), torch.zeros(1, 3, dtype=F64), torch.ones(1, dtype=F64)
    graph = torch.zeros(1, dtype=torch.long)
    def potential(x: torch.Tensor) -> torch.Tensor:
        return (0.25 * (x * x).sum((-1, -2))).reshape(-1)
    period_fs = 2 * math.pi * math.sqrt(1.0 / 0.5) * 10.180505710759416
    run = velocity_verlet(harmonic, potential, pos, vel, m, graph, 1, 1.0, round(10 * period_fs), 1)
    wobble = float((run.energy[:, 0] - run.energy[0, 0]).abs().max())
    omega_dt = math.sqrt(0.5) / 10.180505710759416
    assert 0.5 * omega_dt**2 / 4 * 0.25 < wobble < 1.5 * omega_dt**2 / 4 * 0.25
    assert abs(float(drift_per_ps(run.times, run.energy)[0])) * float(run.times[-1]) < 0.05 * wobble


def test_line_integral_potential_of_a_gradient_field_is_its_potential():
    pos0 = LJ_START[0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = pos0 + 0.3 * torch.randn(2, 3, generator=gen, dtype=F64)
        u = line_integral_potential(lj_forces, x, pos0, ONE, 1, nodes=16)
        assert torch.allclose(u, lj_energy(x) - lj_energy(pos0), atol=1e-9, rtol=1e-7)


def test_work_integrated_energy_is_conserved_for_a_curl_free_field_and_drifts_for_a_rotational_one():
    """K + U with U the line-integral potential from the start (the measure for direct forces):
    conserved for the Lennard-Jones pair (drift at Verlet's rounding of its O(dt^2) wobble), a
    steady drift for F = c(-y, x, 0)."""
    pos, vel, masses = LJ_START
    def lj_u(x: torch.Tensor) -> torch.Tensor:
        return line_integral_potential(lj_forces, x, pos, ONE, 1, nodes=16)
    curl_free = velocity_verlet(lj_forces, lj_u, pos, vel, masses, ONE, 1, 0.5, 400, 5)
    k0 = float(curl_free.kinetic[0, 0])
    assert float((curl_free.energy[:, 0] - curl_free.energy[0, 0]).abs().max()) < 1e-4 * k0
    p1, v1, m1 = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64), torch.tensor([[0.0, 0.01, 0.0]], dtype=F64), torch.ones(1)
    g1 = torch.zeros(1, dtype=torch.long)
    def rot_u(x: torch.Tensor) -> torch.Tensor:
        return line_integral_potential(rotational, x, p1, g1, 1)
    swirl = velocity_verlet(rotational, rot_u, p1, v1, m1.double(), g1, 1, 0.5, 400, 5)
    gained = float(swirl.energy[-1, 0] - swirl.energy[0, 0])
    assert gained > 10 * float(swirl.kinetic[0, 0])  # it pumps energy in
    assert float(drift_per_ps(swirl.times, swirl.energy)[0]) > 1e3 * abs(
        float(drift_per_ps(curl_free.times, curl_free.energy)[0]))


def test_maxwell_boltzmann_velocities_have_no_net_momentum_and_the_right_temperature():
    masses = torch.tensor([1.008, 12.011, 15.999] * 200, dtype=F64)
    graph = torch.arange(600) // 300
    vel = maxwell_boltzmann(masses, graph, 2, 300.0, torch.Generator().manual_seed(0))
    momentum = torch.zeros(2, 3, dtype=F64).index_add(0, graph, masses[:, None] * vel)
    assert float(momentum.abs().max()) < 1e-12
    temperature = 2 * kinetic_energy(vel, masses, graph, 2) / (3 * 300 * 8.617333262e-5)
    assert torch.allclose(temperature, torch.full((2,), 300.0, dtype=F64), rtol=0.15)


def test_relative_curl_of_symmetric_and_antisymmetric_matrices():
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert relative_curl(a + a.T) < 1e-15 and abs(relative_curl(a - a.T) - 1.0) < 1e-12
    assert relative_curl(torch.zeros(3, 3)) == 0.0
    jac = force_jacobians(rotational, torch.randn(2, 3, dtype=F64), ONE, 1)[0]
    assert abs(relative_curl(jac) - 1.0) < 1e-12  # (-y, x, 0) per atom: purely rotational


# ---- models ------------------------------------------------------------------------------------

def molecule(n: int, gen: torch.Generator) -> Data:
    pos = torch.randn(n, 3, generator=gen, dtype=F64) * 1.2
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    keep = i != j
    z = torch.randint(0, 3, (n,), generator=gen)
    return Data(pos=pos, x=torch.nn.functional.one_hot(z, 3).to(F64), edge_index=torch.stack([j[keep], i[keep]]))


@pytest.fixture(scope="module")
def batch() -> Batch:
    gen = torch.Generator().manual_seed(3)
    return Batch.from_data_list([molecule(n, gen) for n in (5, 4)])


def build(name: str, **opts):
    with default_dtype(F64):
        return eb.get_method(name, **{**SMALL[name], **opts}).build(FORCES, seed=0).eval()


def curls(model, batch: Batch) -> list[float]:
    return [relative_curl(j) for j in force_jacobians(ModelField(model, batch, "pos"), batch.pos, batch.batch, 2)]


@pytest.mark.parametrize("name", ["e3nn_nequip", "egnn", "baseline"])
def test_conservative_forces_are_curl_free_and_direct_forces_are_not(batch, name):
    conservative = build(name, forces="conservative")
    assert isinstance(conservative, ForcesFromEnergy)
    assert max(curls(conservative, batch)) < 1e-8
    direct = build(name)
    assert not isinstance(direct, ForcesFromEnergy)
    if name != "egnn":  # egnn's coordinate head starts at gain 1e-3: tiny, but still a curl
        assert min(curls(direct, batch)) > 1e-3
    else:
        assert min(curls(direct, batch)) > 1e-6


def test_the_model_field_is_the_model_and_its_energy_its_potential(batch):
    # fixed graph statistics: untrained, the model would take its cutoff from each batch it sees
    model = build("e3nn_nequip", forces="conservative", r_max=6.0, avg_num_neighbors=4.0)
    field = ModelField(model, batch, "pos")
    assert field.energy_model is model.energy_model and ModelField(build("egnn"), batch, "pos").energy_model is None
    pos0 = batch.pos
    x = pos0 + 0.05 * torch.randn(pos0.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    with torch.no_grad():
        stacked = field(torch.stack([pos0, x]))
        assert torch.allclose(stacked[0], model(batch)) and torch.allclose(stacked[1], field(x))
        u = line_integral_potential(field, x, pos0, batch.batch, 2, nodes=8)
    assert torch.allclose(u, field.energy(x) - field.energy(pos0), atol=1e-9)


@pytest.mark.parametrize("name", ["egnn", "baseline", "augmentation"])
def test_the_forces_option_of_egnn_and_the_backbone_wrappers(batch, name):
    method = eb.get_method(name, **SMALL[name])
    assert "forces" not in method.options and eb.get_method(name, forces="conservative").options["forces"] == (
        "conservative")
    with pytest.raises(UserError, match="forces must be one of"):
        eb.get_method(name, forces="both")
    with default_dtype(F64):
        assert type(method.build(FORCES)) is type(eb.get_method(name, **SMALL[name], forces="direct").build(FORCES))
        energy = eb.get_method(name, **SMALL[name], forces="conservative").build(FORCES).eval()
        net = energy.energy_model
        pos = batch.pos.clone().requires_grad_(True)
        work = batch.clone()
        work.pos = pos
        (grad,) = torch.autograd.grad(net(work).sum(), pos)
    assert torch.allclose(energy(batch), -grad, atol=1e-12)
    qm9 = TaskSpec(name="qm9", domain="graph3d", group="E3", inputs={"pos": "point", "x": "3x0e"}, output="0e",
                   level="graph", loss="mse", metrics=("mae",))
    assert not isinstance(eb.get_method(name, **SMALL[name], forces="conservative").build(qm9), ForcesFromEnergy)


def test_egnns_conservative_forces_stay_exactly_equivariant(batch):
    model = build("egnn", forces="conservative")
    err = equivariance_error(model, batch, FORCES, n_samples=2, dtype=F64)
    assert err["rel_max"] < 1e-10


def test_params_size_the_energy_network():
    for name in ("egnn", "baseline"):
        model = eb.get_method(name, params=5000, forces="conservative").build(FORCES)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - 5000) <= 500, (name, n)


# ---- the probe ---------------------------------------------------------------------------------

def test_the_probe_is_off_by_default_and_applies_to_force_tasks_only():
    assert not EvalConfig.from_dict({}).is_on(ForceConservationProbe)
    assert is_force_task(FORCES) and ForceConservationProbe.applies_to(FORCES)
    assert not ForceConservationProbe.applies_to(eb.get_task("nbody").spec)
    with pytest.raises(UserError, match="force_conservation_steps"):
        EvalConfig.from_dict({"force_conservation_steps": "20"})
    with pytest.raises(UserError, match="must be positive"):
        EvalConfig.from_dict({"force_conservation_timestep_fs": 0.0})


MD_TINY = dict(train_size=4, val_size=2, test_size=4, stride=2, equilibration=10)


@pytest.fixture(scope="module")
def md_cache(tmp_path_factory):
    pytest.importorskip("tblite")
    pytest.importorskip("ase")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EQUIBENCH_CACHE", str(tmp_path_factory.mktemp("md_cache")))
        yield


@pytest.mark.parametrize("forces", ["direct", "conservative"])
def test_the_probe_runs_on_a_tiny_md_point(md_cache, forces):
    evaluate = {"equivariance_samples": 1, "equivariance_graphs": 2, "throughput": False, "lie_derivative": False,
                "symmetric_inputs": False, "force_conservation": True, "force_conservation_graphs": 2,
                "force_conservation_trajectories": 2, "force_conservation_steps": 20, "force_conservation_every": 5}
    spec = RunSpec(task="md", method="e3nn_nequip", task_options=MD_TINY,
                   method_options={**SMALL["e3nn_nequip"], "forces": forces},
                   train={"steps": 2, "batch_size": 2, "eval_batch_size": 4, "warmup_steps": 0}, evaluate=evaluate)
    rows = {r["metric"]: r for r in run_one(spec)}
    declared = {s.name for s in ForceConservationProbe.METRICS}
    measured = {m for m in rows if m.startswith("force_conservation.")}
    assert measured == declared == {conservation_metric("init", "curl_mean"), conservation_metric("init", "curl_max"),
                                    *(conservation_metric("trained", s) for s in ("curl_mean", "curl_max",
                                                                                  "drift_mean", "drift_max"))}
    for name in measured:
        assert math.isfinite(rows[name]["value"]) and rows[name]["value"] >= 0, name
        assert rows[name]["stage"] == name.split(".")[1] and rows[name]["batch_size"] == 2
    curl = rows[conservation_metric("trained", "curl_max")]["value"]
    drift = rows[conservation_metric("trained", "drift_mean")]
    assert (curl < 1e-8) if forces == "conservative" else (curl > 1e-3)
    assert drift["potential"] == ("model energy" if forces == "conservative" else "line integral")
    assert (drift["steps"], drift["timestep_fs"]) == (20, 0.5)
    if forces == "direct":  # switched off: no rows
        off = run_one(RunSpec(**{**spec.to_dict(), "evaluate": {**evaluate, "force_conservation": False}}))
        assert not any(r["metric"].startswith("force_conservation.") for r in off)


@pytest.mark.parametrize("name", ["egnn", "baseline", "augmentation"])
def test_a_conservative_training_step_runs_under_the_flop_counter(batch, name):
    """The training loop counts its first step's FLOPs (``FlopCounterMode``); -dE/dx inside it must
    not hand a leaf to a module's backward hooks (egnn's layers take the coordinates)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = eb.get_method(name, **SMALL[name], forces="conservative").build(FORCES).double().train()
    with FlopCounterMode(display=False) as counter:
        loss = model(batch).pow(2).mean()
    loss.backward()
    assert counter.get_total_flops() > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]  # (an energy offset has none)
    assert len(grads) > len(list(model.parameters())) // 2 and all(torch.isfinite(g).all() for g in grads)


def test_the_report_table_puts_direct_and_conservative_forces_side_by_side():
    """The md section's force-conservation table: the -dE/dx variant is labelled as such, the curl
    and drift are the seed means of the rows, and the NVE settings come from the rows."""
    import pandas as pd

    from equibench.metrics.conservation import conservation_metric
    from equibench.report.task_section import force_conservation_table
    rows = []
    for method, opts, curl, drift in (("egnn", {"params": 1}, 0.1, 500.0),
                                      ("egnn@conservative", {"params": 1, "forces": "conservative"}, 1e-16, 0.5)):
        for seed, scale in ((0, 1.0), (1, 3.0)):
            common = {"task": "md", "method": method, "seed": seed, "status": "ok", "method_options": opts}
            rows += [{**common, "metric": conservation_metric("trained", "curl_mean"), "value": curl * scale},
                     {**common, "metric": conservation_metric("trained", "drift_mean"), "value": drift * scale,
                      "steps": 200, "timestep_fs": 0.5, "temperature_K": 300.0, "batch_size": 4},
                     {**common, "metric": "test.force_mae", "value": 0.2}]
    df = pd.DataFrame(rows)
    agg = df.groupby(["method", "metric"])["value"].mean().unstack("metric")
    caption, table = force_conservation_table(agg, df, "test.force_mae")
    assert list(table["forces"]) == ["direct", "−dE/dx"]
    assert table.loc["egnn", "curl init → trained (mean)"].endswith("2.0e-01")
    assert table.loc["egnn@conservative", "NVE drift mean / max [meV/atom/ps]"].startswith("1 ")
    assert "200 steps of 0.5 fs" in caption and "300 K, on 4 test molecules" in caption
    assert force_conservation_table(agg.drop(columns=[c for c in agg if "conservation" in c]), df, None) is None
