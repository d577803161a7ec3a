"""Floors (``Task.floors``): the cheap non-learned references each task's verdict holds the methods
against, and the seeds that draw the training data while the test split stays fixed
(``benches.taskrun.load_split``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

import equibench as eb
from equibench.benches.taskrun import TEST_SEED, floor_metrics, load_split, load_splits, trivial_metrics
from equibench.datasets.nbody import fit_step
from equibench.datasets.normals import pca_normals
from equibench.datasets.qm9 import count_features, fit_count_regression


def _straight_line_systems(step: float, n: int = 20, field: float = 0.0, push: float = 0.0) -> list[Data]:
    """Systems moving without forces for ``step`` time units (plus ``push`` q E where a field acts)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        pos, vel = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
        q = torch.where(torch.rand(5, 1, generator=gen) < 0.5, -1.0, 1.0)
        e = torch.tensor([0.0, 0.0, field]).expand(5, 3)
        out.append(Data(pos=pos, vel=vel, charge=q, field=e, y=pos + step * vel + push * q * e))
    return out


def test_fitted_step_recovers_the_frame_interval_and_is_the_least_squares_value():
    task = eb.get_task("nbody", train_size=40, val_size=8, test_size=16)
    p = task._generator_params()
    interval = (task.options["target_frame"] - task.options["input_frame"]) * p["record_every"] * p["dt"]
    assert interval == pytest.approx(1.0)
    # without forces the positions move by exactly interval * v: the fit recovers the interval
    assert fit_step(_straight_line_systems(interval)) == pytest.approx(interval, rel=1e-6)
    # on the simulator's data: the analytic least-squares step, and the floor predicts x + step v
    train = task.load("train")
    v = np.concatenate([d.vel.numpy() for d in train]).reshape(-1, 1).astype(np.float64)
    dx = np.concatenate([(d.y - d.pos).numpy() for d in train]).reshape(-1, 1).astype(np.float64)
    step = float(np.linalg.lstsq(v, dx, rcond=None)[0][0, 0])
    assert fit_step(train) == pytest.approx(step, rel=1e-9) and 0.5 < step < 1.0  # the forces bend paths back
    batch = Batch.from_data_list(task.load("test"))
    torch.testing.assert_close(task.floors(train)["constant_velocity"](batch), batch.pos + step * batch.vel)
    # it beats no displacement (the trivial predictor) by a wide margin on the test split
    test = task.load("test")
    floor = floor_metrics(task, train, test, 8)["constant_velocity"]["mse"]
    assert floor < 0.5 * trivial_metrics(task, train, test, 8)["mse"]


def test_field_floor_recovers_inertia_and_the_field_push():
    task = eb.get_task("nbody_field", field=1.0, train_size=40, val_size=8, test_size=16)
    data = _straight_line_systems(0.9, field=1.0, push=0.5)
    floors = task.floors(data)
    batch = Batch.from_data_list(data)
    torch.testing.assert_close(floors["constant_velocity_field"](batch), batch.y, atol=1e-5, rtol=0)
    assert set(floors) == set(task.FLOORS) == {"constant_velocity", "constant_velocity_field"}


def test_qm9_count_regression_beats_the_mean_on_the_training_split():
    task = eb.get_task("qm9", target="u0_atomization", train_size=300, val_size=20, test_size=50)
    train = task.load("train")
    batch = Batch.from_data_list(train)
    counts = count_features(batch)
    assert counts[:, 0].eq(1).all() and torch.equal(counts[:, 1:].sum(1).long(), torch.bincount(batch.batch))
    w = fit_count_regression(train)
    y = batch.y.double().reshape(-1)
    # the least-squares normal equations hold: the residual is orthogonal to every count column
    residual = y - (counts @ w).reshape(-1)
    assert (counts.T @ residual).abs().max() < 1e-6 * y.abs().sum()
    floor = task.metric_values(task.floors(train)["atom_counts"](batch), batch)["mae"].mean()
    trivial = task.metric_values(task.trivial_prediction(train)(batch), batch)["mae"].mean()
    assert floor < 0.5 * trivial  # an extensive target: the counts explain most of it
    # the gap (intensive): still better than the mean on the split it is fitted on
    gap = eb.get_task("qm9", target="gap", train_size=300, val_size=20, test_size=50)
    train = gap.load("train")
    b = Batch.from_data_list(train)
    mse = {k: ((gap.metric_values(p(b), b)["mae"]) ** 2).mean() for k, p in
           (("floor", gap.floors(train)["atom_counts"]), ("trivial", gap.trivial_prediction(train)))}
    assert mse["floor"] < mse["trivial"]


def test_pca_normals_are_exact_on_planes():
    """Points of a plane with a kNN graph: every local PCA normal is the plane's normal (up to sign)."""
    gen = torch.Generator().manual_seed(1)
    n = torch.nn.functional.normalize(torch.tensor([[0.3, -0.5, 0.8]], dtype=torch.float64), dim=1)
    basis = torch.linalg.qr(torch.cat([n.T, torch.randn(3, 2, generator=gen, dtype=torch.float64)], 1))[0]
    pos = torch.randn(200, 2, generator=gen, dtype=torch.float64) @ basis[:, 1:].T
    nbr = torch.cdist(pos, pos).topk(9, largest=False).indices[:, 1:]  # 8 nearest, self excluded
    edge_index = torch.stack([nbr.reshape(-1), torch.arange(200).repeat_interleave(8)])  # j -> i
    data = Data(pos=pos, edge_index=edge_index, y=n.expand(200, 3))
    pred = pca_normals(Batch.from_data_list([data]))
    torch.testing.assert_close((pred @ n.T).abs().reshape(-1), torch.ones(200, dtype=torch.float64))


def test_floors_are_the_same_for_every_method_and_the_test_split_for_every_seed():
    """Floors depend on the task and the seed's training split only (never on the method); the test
    split is the same for every seed while the training draw is not."""
    runs = {}
    for method_instance in range(2):  # two runs of one seed build their task independently
        task = eb.get_task("qm9", train_size=60, val_size=10, test_size=30)
        train, test = load_splits(task, seed=1)
        runs[method_instance] = floor_metrics(task, train, test, 10)
    assert runs[0] == runs[1]
    task = eb.get_task("qm9", train_size=60, val_size=10, test_size=30)
    tests = [load_split(task, "test", seed) for seed in (0, 1, 2)]
    trains = [load_split(task, "train", seed) for seed in (0, 1, 2)]
    for t in tests[1:]:
        assert all(torch.equal(a.y, b.y) and torch.equal(a.pos, b.pos) for a, b in zip(tests[0], t))
    assert not torch.equal(torch.cat([d.y for d in trains[1]]), torch.cat([d.y for d in trains[2]]))
    assert TEST_SEED == 0
    # a new seed simulates new n-body systems, cached under its own key
    nb = eb.get_task("nbody", train_size=8, val_size=4, test_size=8)
    a, b = load_split(nb, "train", 1), load_split(nb, "train", 2)
    assert not torch.equal(a[0].pos, b[0].pos) and torch.equal(load_split(nb, "train", 1)[0].pos, a[0].pos)
    assert torch.equal(load_split(nb, "test", 1)[0].pos, load_split(nb, "test", 2)[0].pos)


def test_digits_pools_are_fixed_across_seeds_and_the_centroid_floor_classifies():
    task = eb.get_task("digits", source="sklearn", group="C4", setting="upright/upright", train_size=300,
                       val_size=50, test_size=100)
    pools = {s: set(task._indices(s, 0).tolist()) for s in ("train", "val", "test")}
    for seed in (1, 2):
        drawn = {s: task._indices(s, seed) for s in ("train", "val", "test")}
        assert all(set(drawn[s].tolist()) == pools[s] for s in drawn)  # same pools, another order
        assert not torch.equal(drawn["train"][:50], task._indices("train", 0)[:50])
    train, test = load_splits(task, seed=1)
    acc = floor_metrics(task, train, test, 50)["nearest_centroid"]["accuracy"]
    assert acc > 0.7 and acc > 3 * trivial_metrics(task, train, test, 50)["accuracy"]


def test_run_rows_carry_the_floors_and_the_report_shows_them(tmp_path):
    """Two methods, two seeds: every run of a seed carries the same ``floor.mse`` rows (``floor``
    column), the seeds differ (their training draws do), and the verdict shows the floor as a row
    and judges each method against it."""
    from equibench.benches.taskrun import run_one
    from equibench.core.spec import RunSpec
    from equibench.metrics import catalogue
    from equibench.results.store import append_block
    run_dir = tmp_path / "res" / "r"
    run_dir.mkdir(parents=True)
    floors: dict[tuple[str, int], float] = {}
    for method in ("baseline", "egnn"):
        for seed in (0, 1):
            spec = RunSpec(task="nbody", method=method, seed=seed, task_options=dict(train_size=8, val_size=4,
                                                                                      test_size=8),
                           method_options=dict(params=2000), train=dict(steps=2, batch_size=4, val_points=0),
                           evaluate=dict(throughput=False, lie_derivative=False, equivariance_graphs=2,
                                         equivariance_samples=1, symmetric_inputs=False))
            rows = run_one(spec)
            got = [r for r in rows if r["metric"] == catalogue.floor_metric("mse")]
            assert [r["floor"] for r in got] == ["constant_velocity"]
            assert catalogue.get_metric(got[0]["metric"]).family == "floor"
            floors[(method, seed)] = got[0]["value"]
            append_block(run_dir, rows)
    assert floors[("baseline", 0)] == floors[("egnn", 0)] and floors[("baseline", 1)] == floors[("egnn", 1)]
    assert floors[("baseline", 0)] != floors[("baseline", 1)]  # another training draw, another fitted step
    html = eb.write_report(run_dir, tmp_path / "rep").read_text()
    verdict = html.split('<table class="verdict">')[1].split("</table>")[0]
    assert 'id="verdict-nbody-floor-constant_velocity"' in verdict and "floor: constant_velocity" in verdict
    assert "vs strongest floor" in verdict and "constant-velocity extrapolation" in verdict
