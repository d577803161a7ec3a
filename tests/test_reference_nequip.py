"""``nequip``: the nequip package's NequIPGNNModel behind the Method interface.

Held here: it builds and trains a step on qm9 (graph-level energy) and md (forces -dE/dx), float64
invariance of energies and equivariance of forces < 1e-10 on real test data (O(3) with
reflections, translations, node permutations), forces equal to minus the autograd gradient of the
same model's energy, the data statistics written into the library's modules equal a direct build
with those values, the analytic parameter count equals built models and matching lands within
10 %, declined tasks give their reasons, and the library's global set-up leaves the caller's
default dtype and random streams alone.
"""
from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import build_model
from equibench.methods.base import count_parameters
from equibench.methods.blocks.energy_forces import energy_spec, energy_to_forces
from equibench.metrics.equivariance import cast_batch
from equibench.symmetry.group3d import common_group
from equibench.symmetry.precision import default_dtype
from conftest import require

require("nequip")
from equibench.methods.reference import nequip as nq  # noqa: E402

F64 = torch.float64
SMOKE = nq.NequIP.smoke_options
MD = dict(equilibration=10, stride=2, train_size=2, val_size=2, test_size=4)  # as tests/test_exactness.py


@functools.cache
def task(name: str, **extra):
    opts = {"md": MD, "qm9": dict(train_size=8, val_size=2, test_size=8)}[name]
    return eb.get_task(name, **{**opts, **extra})


@functools.cache
def batch(name: str, split: str = "test", **extra) -> Batch:
    return Batch.from_data_list(task(name, **extra).load(split)[:4])


def small(**opts):
    return eb.get_method("nequip", **{**SMOKE, **opts})


def trained(method, t, train: Batch):
    """float32 model after two Adam steps on ``train`` (statistics taken from it)."""
    model = build_model(method, t.spec, 0, torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        loss = t.loss(model(train), train)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "a parameter did not train"
    return model.eval()


def rel_max(method, t, model, b: Batch, dtype=F64) -> float:
    group = common_group(t.spec.group, method.group)
    m = build_model(method, t.spec, 0, F64, model.state_dict()) if dtype == F64 else model
    return eb.equivariance_error(m, b, t.spec, n_samples=4, dtype=dtype, group=group)["rel_max"]


@pytest.mark.parametrize("name,extra,opts", [("qm9", {}, {}), ("md", {}, {}), ("md", {"target": "energy"}, {}),
                                             ("md", {}, {"parity": False, "l_max": 2})])
def test_trains_and_is_exact_in_float64_on_real_data(name, extra, opts):
    method, t = small(**opts), task(name, **extra)
    assert method.supports(t.spec) is None and method.exact_on(t.spec) and method.group == "O3"
    model = trained(method, t, batch(name, "train", **extra))
    b = batch(name, **extra)
    out = model(b)
    shape = (b.num_nodes, 3) if t.spec.level == "node" else (b.num_graphs, 1)
    assert out.shape == shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_max(method, t, model, b) < 1e-10  # rotations + reflections, translations, permutations
    assert rel_max(method, t, model, b, torch.float32) < 1e-4
    # the float64 rebuild carries the trained weights and statistics: same function as float32
    m64 = build_model(method, t.spec, 0, F64, model.state_dict()).eval()
    with torch.no_grad():
        ref = m64(cast_batch(b, F64))
    assert ref.dtype == F64
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_forces_equal_the_librarys_own_force_output_and_minus_the_energy_gradient():
    """Our -dE/dx equals nequip's ForceStressOutput (a model built with do_derivatives=True, same
    weights and statistics) and the autograd gradient of the same weights' energy model."""
    method, t = small(r_max=4.0, avg_num_neighbors=7.5), task("md")
    model = build_model(method, t.spec, 0, F64).eval()
    b = cast_batch(batch("md"), F64)
    with torch.no_grad():  # the forces need no outer gradient mode
        f = model(b)
    assert f.dtype == F64 and f.shape == (b.num_nodes, 3) and float(f.abs().max()) > 1e-6
    nf, w = method.options["num_features"], method.options["radial_mlp_width"]
    with default_dtype(F64):
        library = nq.build_nequip(t.spec, 0, method._config(nf, w), do_derivatives=True).eval()
    library.load_state_dict(model.nequip.state_dict())
    data = {"pos": b.pos.clone(), "edge_index": b.edge_index.flip(0), "atom_types": b.x.argmax(-1),
            "batch": b.batch, "num_atoms": torch.bincount(b.batch)}
    assert torch.allclose(f, library(data)["forces"], rtol=0, atol=1e-12)
    energy = build_model(method, energy_spec(t.spec), 0, F64).eval()
    energy.load_state_dict(model.state_dict())
    assert torch.allclose(f, energy_to_forces(energy, b, training=False)[1], rtol=0, atol=1e-12)


def test_throughput_and_flops_of_a_force_model():
    method, t = small(), task("md")
    model = build_model(method, t.spec, 0, torch.float32)
    b = batch("md")
    for mode in ("inference", "train"):
        res = eb.measure_throughput(model, b, mode, "cpu", warmup=1, repeats=2, min_sample_s=0.0)
        assert res["flops"] > 0 and res["time_median_s"] > 0


def test_statistics_written_into_the_library_equal_a_direct_build():
    method, t = small(), task("md")
    b = cast_batch(batch("md", "train"), F64)
    model = build_model(method, t.spec, 0, F64)
    model.train()(b)
    avg, r_max = float(model.stats.avg_num_neighbors), float(model.stats.r_max)
    assert avg == pytest.approx(b.num_edges / b.num_nodes) and r_max > 0
    direct = build_model(small(avg_num_neighbors=avg, r_max=r_max), t.spec, 0, F64)
    assert direct.nequip.model.func.edge_norm.r_max == r_max  # the library built with these values
    model.eval(), direct.eval()
    test = cast_batch(batch("md"), F64)
    with torch.no_grad():
        assert torch.allclose(model(test), direct(test), rtol=0, atol=1e-12)


@pytest.mark.parametrize("opts", [{}, SMOKE, dict(parity=False, l_max=2, num_features=5, num_layers=3,
                                                   radial_mlp_depth=2, bessel_trainable=True)])
def test_analytic_parameter_count_equals_the_built_model(opts):
    method, spec = eb.get_method("nequip", **opts), task("qm9").spec
    o = method.options
    assert method.count(spec, o["num_features"], o["radial_mlp_width"]) == count_parameters(method.build(spec))


@pytest.mark.parametrize("name,target", [("md", 12000), ("qm9", 50000)])
def test_parameter_matching_within_ten_percent(name, target):
    method = eb.get_method("nequip", **{**SMOKE, "params": target})
    n = count_parameters(build_model(method, task(name).spec, 0, torch.float32))
    assert abs(n - target) <= 0.1 * target


def test_declined_tasks_and_bad_inputs_give_reasons():
    method = small()
    nbody = eb.get_task("nbody").spec
    assert "non-invariant inputs" in method.supports(nbody) and "vel" in method.supports(nbody)
    assert "asks for a node-level '1o'" in method.supports(eb.get_task("normals").spec)
    assert "domains" in method.supports(eb.get_task("digits", source="sklearn").spec)
    with pytest.raises(ValueError, match="non-invariant"):
        method.build(nbody)
    model = method.build(task("md").spec)
    b = batch("md").clone()
    b.x = b.x * 0.5  # not a one-hot species code
    with pytest.raises(ValueError, match="one-hot"):
        model(b)


def test_library_set_up_leaves_dtype_and_random_streams_alone(monkeypatch):
    from nequip.utils import global_state
    monkeypatch.setattr(global_state, "_GLOBAL_STATE_INITIALIZED", False)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    nq._initialise_nequip()
    assert global_state.global_state_initialized() and torch.get_default_dtype() == torch.float32
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_a_build_leaves_e3nns_flags_and_later_e3nn_models_copyable():
    """nequip's build toggles e3nn's legacy ``jit_script_fx`` flag, whose restore used to leave
    ``jit_mode="script"``: every later e3nn model in the process (e.g. the ``e3nn`` method in an
    in-process run) then failed to deep-copy for its train-step timing."""
    import copy

    import e3nn

    before = e3nn.get_optimization_defaults()
    nq.build_nequip(task("md").spec, 0, {"r_max": 2.0, "avg_num_neighbors": 3.0, "energy_scale": 1.0,
                                         "energy_shift": 0.0, "num_layers": 1, "num_features": 4})
    assert e3nn.get_optimization_defaults() == before
    other = eb.get_method("e3nn", mul=2, depth=1).build(task("md").spec)
    copy.deepcopy(other)
