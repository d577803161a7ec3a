"""``mace`` (mace-torch 0.3.16, pinned to e3nn 0.4.4) runs in its own layered environment.

In the main environment (e3nn 0.6, no ``mace``): the method is listed, says why it cannot run
here, and the runner routes its points to the environment of its ``requirements``; the
registry-parametrised tests (``test_methods.py``, ``test_exactness.py``) and this file's quick
``inside`` tests are run *inside* that environment by ``test_registry_tests_inside_the_mace_environment``
when it is already built (``python -m equibench.engine.envs build mace``), its slow ones by
``test_slow_tests_inside_the_mace_environment``; ``test_the_mace_environment_is_built_and_runs_a_point``
(slow) builds one from scratch and runs an md point through ``eb.run``.

Inside the environment (``mace`` importable): the model is the library's ``MACE``, the forces
agree with the library's own -dE/dx, energies (qm9, md) and forces (md) are O(3)-exact in float64
on real test data at init and after training, the parameter count is exact and
``avg_num_neighbors`` is the first training batch's mean in-degree.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import TaskBench, build_model
from equibench.benches.training import TrainConfig, train
from equibench.core.errors import UserError
from equibench.methods.base import count_parameters
from equibench.metrics.throughput import measure_throughput
from equibench.engine.engine import requirements_of
from equibench.engine.envs import MARKER, env_key, env_root
from equibench.engine.launch import worker_environ
from conftest import missing_reference

ROOT = Path(__file__).resolve().parents[1]
REQS = ("mace-torch==0.3.16",)
HERE = importlib.util.find_spec("mace") is not None
inside = pytest.mark.skipif(not HERE, reason="runs inside mace's environment "
                                             "(test_registry_tests_inside_the_mace_environment)")
outside = pytest.mark.skipif(HERE, reason="drives mace's environment from the main one")
SMALL = {"num_channels": 8, "max_ell": 2, "correlation": 2, "radial_hidden": 16}
TASKS = {"md": dict(equilibration=10, stride=2, train_size=40, val_size=2, test_size=8),
         "qm9": dict(train_size=64, val_size=2, test_size=8)}
F64 = torch.float64


def _task(name: str):
    return eb.get_task(name, **TASKS[name])


def _batch(task, split: str = "test", n: int = 8) -> Batch:
    return Batch.from_data_list(task.load(split)[:n])


# ---- the main environment -------------------------------------------------------------------
@outside
def test_main_environment_routes_mace_to_its_environment():
    assert importlib.metadata.version("e3nn") == "0.6.0"
    method = eb.get_method("mace", **SMALL)
    spec = _task("md").spec
    reason = method.supports(spec)
    assert reason and "mace-torch is not installed in this environment" in reason and "isolated" in reason
    with pytest.raises(ValueError, match="not installed"):
        method.build(spec)
    assert method.origin == "mace-torch" and method.counterpart is None and method.exact and method.group == "O3"
    assert method.implementation() == "mace-torch (not installed)"
    bench = TaskBench([eb.RunSpec(task="md", method="mace", task_options=TASKS["md"], method_options=SMALL)])
    assert [requirements_of(p) for p in bench.points()] == [REQS]
    with pytest.raises(UserError, match="max_L"):
        eb.get_method("mace", max_L=4, max_ell=3)


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def _pytest_inside(marks: str, min_passed: int) -> None:
    """Run this file's and the registry tests' ``mace`` cases selected by ``marks`` with the
    interpreter of mace's pre-built environment (skip when it is not built)."""
    path = env_root() / env_key(REQS)
    if not (path / MARKER).exists():
        missing_reference(f"mace's environment is not built in {env_root()} "
                          "(python -m equibench.engine.envs build mace)")
    env = {**worker_environ(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([str(path / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           "tests/test_reference_mace.py", "tests/test_methods.py", "tests/test_exactness.py",
                           "-k", "mace", "-m", marks], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, _tail(out)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", out.splitlines()[-1])}
    assert counts.get("passed", 0) >= min_passed and not counts.get("failed"), _tail(out)
    skipped = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]  # only this file's main-env tests
    assert all("drives mace's environment" in ln for ln in skipped), skipped


@outside
@pytest.mark.slow  # ~60 s: a pytest run inside mace's environment; .ci/run's slow step
def test_registry_tests_inside_the_mace_environment():
    """test_methods (shapes and a training step, exact at init and after training, parameter
    matching), test_exactness (md, qm9) and the quick inside tests below: ~30 s."""
    _pytest_inside("not slow", min_passed=9)


@pytest.mark.slow
@outside
def test_slow_tests_inside_the_mace_environment():
    _pytest_inside("slow", min_passed=4)


@pytest.mark.slow
@outside
def test_the_mace_environment_is_built_and_runs_a_point(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("EQUIBENCH_ENV_DIR", str(tmp_path / "envs"))
    spec = eb.RunSpec(task="md", method="mace", method_options=SMALL, task_options=TASKS["md"],
                      train={"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 8},
                      evaluate={"equivariance_samples": 2, "equivariance_graphs": 4, "throughput_batch": 8,
                                "throughput_repeats": 2, "lie_derivative": False, "flops": False})
    df = eb.run([spec], results_dir=tmp_path / "results", run_name="mace", progress=True)
    key = env_key(REQS)
    ok = df[df["metric"] == "test.force_mae"]
    assert len(ok) == 1 and (df["status"] == "ok").all(), df[["metric", "status", "error"]].head()
    row = ok.iloc[0]
    assert row["implementation"] == "mace-torch 0.3.16" and row["environment"] == key
    assert row["versions"]["e3nn"] == "0.4.4"
    fp64 = df[df["metric"] == "equivariance.trained.fp64.rel_max"]["value"].item()
    assert fp64 < 1e-10
    assert f"building environment {key}" in capfd.readouterr().err
    info = json.loads((tmp_path / "envs" / key / MARKER).read_text())
    assert info["versions"]["e3nn"] == "0.4.4" and info["versions"]["torch"] == importlib.metadata.version("torch")
    pth = next((tmp_path / "envs" / key).glob("lib/python*/site-packages/_equibench_parent.pth")).read_text()
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in pth  # e3nn 0.4.4 imports under torch's weights-only default
    assert importlib.metadata.version("e3nn") == "0.6.0"  # the main environment is untouched


# ---- inside mace's environment ----------------------------------------------------------------
@inside
def test_the_model_is_the_librarys_mace():
    from mace.modules import MACE

    assert importlib.metadata.version("e3nn") == "0.4.4"
    method = eb.get_method("mace", **SMALL)
    assert method.implementation() == "mace-torch 0.3.16"
    md, qm9 = _task("md"), _task("qm9")
    forces = build_model(method, md.spec, 0, torch.float32)
    energy = build_model(method, qm9.spec, 0, torch.float32)
    assert isinstance(forces.energy_model.mace, MACE) and isinstance(energy.mace, MACE)
    b_md, b_qm9 = _batch(md), _batch(qm9)
    assert forces(b_md).shape == (b_md.num_nodes, 3) and energy(b_qm9).shape == (b_qm9.num_graphs, 1)
    reason = method.supports(eb.get_task("nbody").spec)  # velocities and charge products: not a potential's inputs
    assert reason and reason.startswith("mace takes")


@inside
def test_forces_agree_with_the_librarys_own():
    """F = -dE/dx from ``ForcesFromEnergy`` equals the library's ``compute_force=True`` output."""
    task = _task("md")
    model = build_model(eb.get_method("mace", **SMALL), task.spec, 0, F64)
    batch = _batch(task)
    batch.pos, batch.x = batch.pos.double(), batch.x.double()
    ours = model(batch)
    energy = model.energy_model
    n_edges = batch.edge_index.shape[1]
    zeros = torch.zeros(n_edges, 3, dtype=F64)
    data = {"positions": batch.pos.clone(), "node_attrs": batch.x, "edge_index": batch.edge_index,
            "shifts": zeros, "unit_shifts": zeros, "cell": torch.zeros(3 * batch.num_graphs, 3, dtype=F64),
            "batch": batch.batch, "ptr": batch.ptr}
    theirs = energy.mace(data, training=False, compute_force=True)["forces"]
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12 * theirs.abs().max().item())
    assert theirs.abs().max() > 1e-6


@pytest.mark.slow
@inside
@pytest.mark.parametrize("task_name", ["md", "qm9"])
def test_exact_in_float64_on_real_data_before_and_after_training(task_name):
    task = _task(task_name)
    method = eb.get_method("mace", **SMALL)
    batch = _batch(task)
    model = build_model(method, task.spec, 0, torch.float32)

    def rel(m: torch.nn.Module, dtype: torch.dtype) -> float:
        m = m if dtype == torch.float32 else build_model(method, task.spec, 0, F64, m.state_dict())
        return eb.equivariance_error(m, batch, task.spec, n_samples=4, dtype=dtype, group="E3")["rel_max"]

    assert rel(model, F64) < 1e-10 and rel(model, torch.float32) < 1e-4
    before = [p.detach().clone() for p in model.parameters()]
    train(model, method, task, task.load("train"), TrainConfig(steps=3, batch_size=16, lr=1e-2, warmup_steps=1), 0)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert rel(model, F64) < 1e-10 and rel(model, torch.float32) < 1e-4


@pytest.mark.slow
@inside
def test_throughput_and_flops_of_energy_and_force_models():
    """FLOPs are counted through the force model's autograd.grad (a view of the differentiated
    positions enters the library; a leaf would break FlopCounterMode's module tracker)."""
    for name in ("md", "qm9"):
        task = _task(name)
        model = build_model(eb.get_method("mace", **SMALL), task.spec, 0, torch.float32)
        for mode in ("inference", "train"):
            res = measure_throughput(model, _batch(task, n=4), mode=mode, device="cpu", repeats=2,
                                     min_sample_s=0.005, flops=True, loss_fn=task.loss)
            assert res["flops"] > 0 and res["graphs_per_s"] > 0


@inside
def test_average_neighbour_count_comes_from_the_first_training_batch():
    task = _task("md")  # ethanol on the complete graph: 8 neighbours per atom
    method = eb.get_method("mace", **SMALL)
    model = build_model(method, task.spec, 0, torch.float32)
    energy = model.energy_model
    assert not energy.stats.ready
    model.train()
    model(_batch(task, "train", 16))
    assert energy.stats.ready and float(energy.stats.avg_num_neighbors) == 8.0
    assert all(layer.avg_num_neighbors == 8.0 for layer in energy.mace.interactions)
    copy = build_model(method, task.spec, 0, F64, model.state_dict())
    assert copy.energy_model.stats.ready and float(copy.energy_model.stats.avg_num_neighbors) == 8.0
    fixed = build_model(eb.get_method("mace", **SMALL, avg_num_neighbors=3.0), task.spec, 0, torch.float32)
    fixed.train()
    fixed(_batch(task, "train", 4))
    assert all(layer.avg_num_neighbors == 3.0 for layer in fixed.energy_model.mace.interactions)


@pytest.mark.slow
@inside
def test_parameter_count_is_exact_and_matched():
    spec = _task("qm9").spec
    method = eb.get_method("mace", **SMALL)
    for channels, hidden in ((5, 7), (12, 3)):
        built = build_model(eb.get_method("mace", **{**SMALL, "num_channels": channels, "radial_hidden": hidden}),
                            spec, 0, torch.float32)
        assert count_parameters(built) == method.count(spec, channels, hidden)
    matched = eb.get_method("mace", **SMALL, params=30000)
    n = count_parameters(build_model(matched, spec, 0, torch.float32))
    assert abs(n - 30000) <= 0.1 * 30000
    with pytest.raises(ValueError, match="within 10%"):
        build_model(eb.get_method("mace", params=300), spec, 0, torch.float32)  # the smallest model has 687
