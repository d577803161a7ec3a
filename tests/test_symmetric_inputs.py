"""Exactly symmetric inputs (``Task.symmetric_inputs``, ``datasets/symmetric.py``) and the
exactness scope methods declare (``Method.exactness_scope``).

* every standard geometry and every task's symmetric input is mapped onto itself by each known
  generator of its stabiliser, up to a permutation of identical nodes (positions, velocities,
  invariant features, edges and edge features, to 1e-12);
* registry audit at initialisation, in float64, with the runner's group (``common_group``):
  methods declaring exactness on EVERY_INPUT stay under 1e-10 on every symmetric input of every
  task they run; a GENERIC_INPUTS declaration must be needed (some input measures above 1e-10);
* a smoke-sized ``run_one`` emits the ``symmetric.*`` rows with their input names and scope.
"""
from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

import equibench as eb
from equibench.benches.taskrun import build_model, run_one
from equibench.core.spec import RunSpec
from equibench.datasets import symmetric
from equibench.methods.base import EVERY_INPUT, EXACT_SCOPES, GENERIC_INPUTS
from equibench.metrics import catalogue
from equibench.metrics.symmetric import symmetric_input_errors
from equibench.symmetry.fieldtypes import POINT, is_invariant
from equibench.symmetry.group3d import common_group
from equibench.symmetry.precision import default_dtype

LIMIT = 1e-10
TOL = 1e-12
F64 = torch.float64
TASKS = {"qm9": {}, "md": {}, "nbody": {}, "nbody_field": {}, "normals": dict(n_points=128, k=8)}


@functools.cache
def task_of(name: str):
    return eb.get_task(name, **TASKS[name])


@functools.cache
def inputs_of(name: str) -> tuple[tuple[str, Data], ...]:
    with default_dtype(F64):
        return tuple(task_of(name).symmetric_inputs())


def small(name: str, **opts):
    return eb.get_method(name, **{**type(eb.get_method(name)).smoke_options, **opts})


def variants(name: str) -> list[dict]:
    """Option sets audited beside the defaults: ``degenerate="average"`` where a method takes it
    (frame methods made exact on symmetric inputs: it declares every input)."""
    params = inspect.signature(type(eb.get_method(name)).__init__).parameters
    return [{"degenerate": "average"}] if "degenerate" in params else []


# ---- the inputs are symmetric --------------------------------------------------------------------
def test_every_geometry_is_mapped_onto_itself_by_its_generators():
    geometries = [*symmetric.molecules(), *symmetric.point_clouds()]
    for n in (3, 4, 5, 6):
        geometries += symmetric.particle_systems(n)
    for g in geometries:
        assert g.generators, g.name
        symmetric.check_symmetric(g, TOL)
    # a geometry that is not symmetric under a claimed element is caught
    water = symmetric.molecules()[4]
    broken = symmetric.Geometry("bent", "C2v", water.pos + np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1e-6], [0, 0, 0]]),
                                water.labels, generators=water.generators)
    with pytest.raises(AssertionError):
        symmetric.check_symmetric(broken, TOL)


def test_the_molecules_have_their_textbook_shapes():
    mols = {g.name: g for g in symmetric.molecules()}
    assert set(mols) == {"benzene", "methane", "co2", "acetylene", "water", "ethylene"}
    d = lambda g, i, j: float(np.linalg.norm(g.pos[i] - g.pos[j]))  # noqa: E731
    assert d(mols["benzene"], 0, 1) == pytest.approx(1.397) and d(mols["benzene"], 0, 6) == pytest.approx(1.087)
    ch = [d(mols["methane"], 0, i) for i in range(1, 5)]
    assert np.allclose(ch, 1.087)
    hch = np.degrees(np.arccos(np.dot(mols["methane"].pos[1], mols["methane"].pos[2]) / 1.087**2))
    assert hch == pytest.approx(109.4712, abs=1e-3)  # arccos(-1/3)
    w = mols["water"].pos
    angle = np.degrees(np.arccos(np.dot(w[1] - w[0], w[2] - w[0]) / np.linalg.norm(w[1] - w[0]) ** 2))
    assert angle == pytest.approx(104.52) and d(mols["water"], 0, 1) == pytest.approx(0.9572)
    e = mols["ethylene"].pos
    assert np.degrees(np.arccos(np.dot(e[2] - e[0], e[3] - e[0]) / 1.087**2)) == pytest.approx(117.4)
    for name in ("co2", "acetylene"):  # linear: rank-1 spread
        assert np.linalg.matrix_rank(mols[name].pos, tol=1e-12) == 1


def _match(moved: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    d = (moved[:, None, :] - pos[None, :, :]).norm(dim=-1)  # not cdist: its matmul path loses ~1e-8
    perm = d.argmin(dim=1)
    assert float(d[torch.arange(len(pos)), perm].max()) <= TOL, "positions are not mapped onto themselves"
    assert len(set(perm.tolist())) == len(pos)
    return perm


@pytest.mark.parametrize("task_name", list(TASKS))
def test_each_task_input_is_mapped_onto_itself_by_its_stabiliser(task_name):
    """Apply each generator R of the geometry's stabiliser to every typed field of the task's
    Data: positions move onto themselves (node i -> P(i)); vectors follow (R v_i = v_P(i));
    invariant features are equal (x_i = x_P(i)); edges map onto edges with equal features."""
    task = task_of(task_name)
    spec = task.spec
    geometries = {g.name: g for g in task.symmetric_geometries()}
    inputs = inputs_of(task_name)
    assert inputs and [n for n, _ in inputs] == list(geometries)
    for name, data in inputs:
        for field in {**spec.inputs, **spec.edge_inputs}:
            assert field in data and data[field].dtype == F64, (name, field)
        assert "y" not in data
        edges = {(int(a), int(b)) for a, b in data.edge_index.T}
        assert len(edges) == data.edge_index.shape[1] and all(a != b for a, b in edges)
        for R in geometries[name].generators:
            Rt = torch.as_tensor(R, dtype=F64)
            perm = _match(data.pos @ Rt.T, data.pos)
            for field, t in spec.inputs.items():
                value = data[field]
                if t == POINT:
                    continue
                if is_invariant(t):
                    assert torch.equal(value, value[perm]), (name, field)
                else:
                    assert t == "1o", t
                    assert float((value @ Rt.T - value[perm]).abs().max()) <= TOL, (name, field)
            mapped = {(int(perm[a]), int(perm[b])) for a, b in edges}
            assert mapped == edges, f"{task_name}/{name}: the graph is not invariant"
            for field in spec.edge_inputs:
                feat = {(int(a), int(b)): data[field][k] for k, (a, b) in enumerate(data.edge_index.T)}
                assert all(torch.equal(feat[(a, b)], feat[(int(perm[a]), int(perm[b]))]) for a, b in edges)
    if task_name == "nbody_field":  # the field is on every node, along e_z: the rings' axis
        for _, data in inputs:
            assert torch.equal(data.field, torch.tensor([[0.0, 0.0, task.options["field"]]], dtype=F64)
                               .expand(data.num_nodes, 3))


def test_inputs_follow_the_task_options():
    five = {n for n, _ in eb.get_task("nbody").symmetric_inputs()}
    assert five == {"pentagon_at_rest", "pentagon_spinning", "collinear", "square_and_centre"}
    four = {n for n, _ in eb.get_task("nbody", n_particles=4).symmetric_inputs()}
    assert four == {"square_at_rest", "square_spinning", "collinear", "triangle_and_centre"}
    water_md = eb.get_task("md", molecule="water")  # elements H, O: only water fits
    assert [n for n, _ in water_md.symmetric_inputs()] == ["water"]
    (_, d), = water_md.symmetric_inputs()
    assert d.x.shape == (3, 2) and d.z.tolist() == [8, 1, 1]
    qm9 = dict(eb.get_task("qm9", cutoff=1.2).symmetric_inputs())
    assert qm9["benzene"].edge_index.shape[1] == 2 * 6  # ring C-C (1.397) is beyond 1.2 Å; the 6 C-H bonds
    assert qm9["benzene"].x[:, 1].sum() == 6 and qm9["benzene"].x[:, 0].sum() == 6  # (H, C, N, O, F) one-hot
    normals = dict(eb.get_task("normals", k=4).symmetric_inputs())
    degree = torch.bincount(normals["icosahedral_sphere"].edge_index[1])
    assert int(degree.min()) >= 4  # ties at the 4th distance are kept, never cut
    assert eb.get_task("digits", source="sklearn").symmetric_inputs() == []


# ---- the declared scope holds (registry audit at initialisation) -----------------------------------
def cases(with_variants: bool = False) -> list:
    out = []
    for name in eb.list_methods():
        for opts in [{}, *(variants(name) if with_variants else [])]:
            method = small(name, **opts)
            tag = ",".join(f"{k}={v}" for k, v in opts.items())
            for task in TASKS:
                if method.supports(task_of(task).spec) is None:
                    # the averaged frame sets of the symmetric clouds are large (Ih: 120 elements): ~30 s
                    slow = [pytest.mark.slow] if opts and task == "normals" else []
                    out.append(pytest.param(name, task, tuple(opts.items()), marks=slow,
                                            id=f"{name}[{tag}]-{task}" if tag else f"{name}-{task}"))
    return out


@functools.cache
def measured(name: str, task_name: str, opts: tuple = ()) -> dict[str, float]:
    """Max relative error (fp64, untrained, 4 elements with translations and permutations) on each
    symmetric input of the task, under the group the runner measures with."""
    method, task = small(name, **dict(opts)), task_of(task_name)
    spec = task.spec
    group = common_group(spec.group, method.group) if method.exact_on(spec) else spec.group
    model = build_model(method, spec, 0, F64)
    rows = symmetric_input_errors(model, inputs_of(task_name), spec, n_samples=4, group=group, seed=0)
    return {r["input"]: r["rel_max"] for r in rows}


@pytest.mark.parametrize("name,task_name,opts", cases(with_variants=True))
def test_every_input_methods_are_exact_on_symmetric_inputs(name, task_name, opts):
    method = small(name, **dict(opts))
    spec = task_of(task_name).spec
    scope = method.exactness_scope(spec)
    assert scope in (*EXACT_SCOPES, None) and (scope is None) == (not method.exact_on(spec))
    if scope != EVERY_INPUT:
        return
    errors = measured(name, task_name, opts)
    over = {k: f"{v:.1e}" for k, v in errors.items() if not v < LIMIT}
    assert not over, f"{name} declares exactness on every input but measures {over} on {task_name}"


def generic_methods() -> list[str]:
    """Methods declared exact only on inputs without a symmetry of their own on some task here."""
    return sorted({str(p.values[0]) for p in cases()
                   if small(p.values[0]).exactness_scope(task_of(p.values[1]).spec) == GENERIC_INPUTS})


@pytest.mark.parametrize("name", generic_methods())
def test_generic_only_declarations_are_needed(name):
    """A method declared exact only on inputs without a symmetry of their own must measure above
    1e-10 on some symmetric input of some task (else the declaration undersells it)."""
    method = small(name)
    tasks = [t for t in TASKS if method.exactness_scope(task_of(t).spec) == GENERIC_INPUTS]
    worst = max(max(measured(name, t).values()) for t in tasks)
    assert worst > LIMIT, f"{name} is declared exact only on generic inputs but measures {worst:.1e} at most"


# ---- the runner emits the rows -------------------------------------------------------------------
def test_run_one_emits_symmetric_input_rows():
    spec = RunSpec(task="nbody", method="frame_averaging", seed=0,
                   task_options=dict(train_size=8, val_size=4, test_size=8),
                   method_options=dict(width=8, depth=1), train=dict(steps=2, batch_size=4, val_points=0),
                   evaluate=dict(throughput=False, lie_derivative=False, equivariance_graphs=4, equivariance_samples=2))
    rows = run_one(spec)
    assert {r["exact_scope"] for r in rows} == {GENERIC_INPUTS}
    sym = [r for r in rows if catalogue.get_metric(r["metric"]).family == "symmetric"]
    names = {n for n, _ in eb.get_task("nbody").symmetric_inputs()}
    for stage in catalogue.STAGES:
        for stat in ("rel_max", "disp_rel_max", "rel_mean", "abs_max"):
            got = {r["symmetric_input"]: r for r in sym if r["metric"] == catalogue.symmetric_metric(stage, stat)}
            assert set(got) == names, (stage, stat)
            assert all(r["dtype"] == "fp64" and r["group"] == "E3" and r["repeats"] == 2 for r in got.values())
    ring = next(r for r in sym if r["symmetric_input"] == "pentagon_at_rest")
    assert ring["point_group"] == "D5h"
    trained = [r["value"] for r in sym if r["metric"] == catalogue.symmetric_metric("trained", "rel_max")]
    assert max(trained) > LIMIT  # frame averaging is undecided on these inputs
    off = run_one(RunSpec(**{**spec.to_dict(), "evaluate": {**spec.evaluate, "symmetric_inputs": False}}))
    assert not [r for r in off if r["metric"].startswith("symmetric.")]


# ---- the report shows it -------------------------------------------------------------------------
def _rows(method: str, seed: int, *, exact: bool, scope: str | None, symmetric_errors: dict[str, float],
          fp64: float, error: str = "") -> list[dict]:
    """One synthetic (task "t", method, seed) run as the task bench writes it (what the report reads)."""
    base = {"run_id": "r", "spec_hash": f"t-{method}-{seed}", "task": "t", "method": method, "seed": seed,
            "status": "ok", "error": "", "convergence": "converged", "exact_claim": exact, "exact_scope": scope,
            "setting_source": "suite file", "train_config": {"steps": 100, "batch_size": 10, "lr": 1e-3},
            "task_options": {"train_size": 100}, "device_name": "test CPU", "git_commit": "0123456789abc"}
    rows = [{**base, "metric": "test.mse", "value": 1.0 + 0.1 * seed + 0.01 * len(method)},
            {**base, "metric": "trivial.mse", "value": 10.0},
            {**base, "metric": "equivariance.trained.fp64.rel_max", "value": fp64, "dtype": "fp64", "stage": "trained"},
            {**base, "metric": "equivariance.trained.fp32.rel_max", "value": 1e-7, "dtype": "fp32", "stage": "trained"},
            {**base, "metric": "train.steps", "value": 100, "val_metric": "mse"}]
    groups = {"benzene": "D6h", "methane": "Td"}
    for name, v in symmetric_errors.items():
        rows.append({**base, "metric": catalogue.symmetric_metric("trained", "rel_max"), "value": v * (1 + seed),
                     "stage": "trained", "dtype": "fp64", "group": "E3", "symmetric_input": name,
                     "point_group": groups[name], "batch_size": 1, "repeats": 4,
                     **({"symmetric_error": error} if error and v != v else {})})
    return rows


def test_report_shows_symmetric_inputs_and_scoped_exactness(tmp_path):
    from equibench.report.verdicts import anomalies
    from equibench.results.store import append_block, load_results

    runs = []
    for seed in (0, 1):
        runs += [_rows("intrinsic", seed, exact=True, scope=EVERY_INPUT, fp64=2e-16,
                       symmetric_errors={"benzene": 1e-15, "methane": 2e-16}),
                 _rows("framey", seed, exact=True, scope=GENERIC_INPUTS, fp64=3e-16,
                       symmetric_errors={"benzene": 5e-3, "methane": 1e-6}),
                 _rows("liar", seed, exact=True, scope=EVERY_INPUT, fp64=1e-16,
                       symmetric_errors={"benzene": 3e-5, "methane": 1e-16}),
                 _rows("plain", seed, exact=False, scope=None, fp64=0.3,
                       symmetric_errors={"benzene": 0.5, "methane": 0.4}),
                 _rows("crashy", seed, exact=True, scope=EVERY_INPUT, fp64=1e-16,
                       symmetric_errors={"benzene": 1e-16, "methane": float("nan")}, error="LinAlgError: boom")]
    run_dir = tmp_path / "res" / "r"
    run_dir.mkdir(parents=True)
    for rows in runs:
        append_block(run_dir, rows)
    found = anomalies(load_results(run_dir))
    over = {a.method: a.text for a in found if a.kind == "exact over limit"}
    assert set(over) == {"liar", "crashy"}  # the declared scope of "framey" is not an anomaly
    assert "non-finite" in over["crashy"]
    assert "symmetric inputs 6.0e-05 > 1e-10" in over["liar"]  # worst seed (seed 1: 2 x 3e-5)
    html = eb.write_report(run_dir, tmp_path / "rep").read_text()
    verdict = html.split('<table class="verdict">')[1].split("</table>")[0]

    def row(method: str) -> str:
        return verdict.split(f'id="verdict-t-{method}"')[1].split("</tr>")[0]

    assert "exact except on symmetric inputs (max 1.0e-02)" in row("framey")
    assert "(exact on inputs without a symmetry of their own)" in row("framey")
    assert "2.0e-16 · exact</td>" in row("intrinsic") and "intrinsic (exact)" in row("intrinsic")
    assert "⚠ symmetric inputs 6.0e-05 &gt; 1e-10" in row("liar")
    assert "exact" not in row("plain")
    table = html.split("<h3>Exactly symmetric inputs</h3>")[1].split("</table>")[0]
    assert "benzene (D6h)" in table and "methane (Td)" in table
    assert table.index("intrinsic") < table.index("framey")  # every-input methods first
    framey = table.split("framey")[1].split("</tr>")[0]
    assert "inputs without a symmetry of their own" in framey and "1.0e-02" in framey and "⚠" not in framey
    assert "⚠" in table.split("liar")[1].split("</tr>")[0]
    assert "not exact" in table.split("plain")[1].split("</tr>")[0]
    assert "failed" in table.split("crashy")[1].split("</tr>")[0]


def test_a_model_that_raises_on_a_symmetric_input_gives_a_row_not_a_crash():
    class Picky(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1, dtype=F64))

        def forward(self, batch):
            if batch.num_nodes == 3:
                raise RuntimeError("three atoms")
            return batch.pos.sum(0, keepdim=True).norm(dim=-1, keepdim=True) * 0 + self.w

    spec = task_of("qm9").spec
    rows = {r["input"]: r for r in symmetric_input_errors(Picky(), inputs_of("qm9"), spec, n_samples=2)}
    assert rows["water"]["error"].startswith("RuntimeError: three atoms") and np.isnan(rows["water"]["rel_max"])
    assert rows["benzene"]["rel_max"] == 0.0 and "error" not in rows["benzene"]  # constant: invariant


def test_the_quick_suite_measures_symmetric_inputs():
    from equibench.benches.taskrun import EvalConfig
    from equibench.plan.suites import expand_suite, read_suite

    specs = expand_suite(read_suite("quick"))
    assert specs and all(EvalConfig.from_dict(s.evaluate).symmetric_inputs for s in specs)
    assert {s.task for s in specs} >= {"nbody", "normals"}
    assert all(task_of(t).symmetric_inputs() for t in ("nbody", "normals", "qm9", "md"))
