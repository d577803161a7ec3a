"""``equiformer_pytorch`` (equiformer-pytorch's Equiformer, lucidrains): what the wrapper claims about it.

* the group: with every weight random (the library zero-initialises each block's output, so at
  initialisation its blocks are identities), SO(3) equivariance holds to float64 round-off on n-body,
  QM9 and normals, while an inversion changes the outputs (no parity: group "SO3");
* the library's default L2-distance attention is only approximately equivariant (eps in
  ``F.pairwise_distance``) and leaves degree-0 attention unmasked, so it reads padding: measured here,
  and the wrapper refuses the batches where that would change a prediction; the default MLP attention
  gives a graph the same prediction alone and inside a padded batch;
* neighbours are the task's graph, in its direction (edge j -> i: j is a neighbour of i);
* the exactness scope: a symmetric input where a node's degree-1 features vanish (CO2's carbon) is a
  point of discontinuity of the library's RMS norms (why the scope is "generic inputs");
* the library's basis cache goes into equibench's cache, and the library's prints stay off stdout.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import deque

import pytest
import torch
from conftest import require
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import build_model
from equibench.core.errors import UserError
from equibench.methods.base import GENERIC_INPUTS
from equibench.symmetry.precision import default_dtype

require("equiformer_pytorch")
F64 = torch.float64
SMALL = {"width": 8, "depth": 1, "heads": 2, "radial_hidden_dim": 8}
TASKS = {"nbody": dict(train_size=4, val_size=2, test_size=8),
         "normals": dict(n_points=64, k=8, train_size=2, val_size=2, test_size=3),
         "qm9": dict(train_size=4, val_size=2, test_size=8)}


def randomised(method, spec, seed: int = 1) -> torch.nn.Module:
    """A float64 model with every parameter redrawn from N(0, 0.3^2) (zero-initialised outputs included)."""
    model = build_model(method, spec, 0, F64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=F64))
    return model


def f64_batch(data: list) -> Batch:
    batch = Batch.from_data_list(data)
    for key in batch.keys():
        if torch.is_floating_point(batch[key]):
            batch[key] = batch[key].to(F64)
    return batch


@pytest.mark.parametrize("task_name", list(TASKS))
def test_exact_for_rotations_not_for_reflections(task_name):
    task = eb.get_task(task_name, **TASKS[task_name])
    # one block keeps QM9's invariant output parity-even (measured 2e-16): its chirality needs two
    method = eb.get_method("equiformer_pytorch", **{**SMALL, "depth": 2 if task_name == "qm9" else 1})
    model = randomised(method, task.spec)
    batch = Batch.from_data_list(task.load("test")[:2])
    rot = eb.equivariance_error(model, batch, task.spec, n_samples=2, dtype=F64, group="SO3")
    assert rot["rel_max"] < 1e-10
    inv = eb.equivariance_error(model, batch, task.spec, n_samples=2, dtype=F64, group="O3")
    assert inv["rel_max"] > 1e-6  # measured (depth 2): 1e-2 (n-body), 6e-5 (QM9's invariant target), 0.4 (normals)
    model32 = build_model(method, task.spec, 0, torch.float32, model.state_dict())
    assert eb.equivariance_error(model32, batch, task.spec, n_samples=2, dtype=torch.float32,
                                 group="SO3")["rel_max"] < 1e-4


def test_l2_attention_is_approximately_equivariant():
    """The library's default attention: its pairwise_distance eps breaks rotation invariance at ~1e-7."""
    task = eb.get_task("nbody", **TASKS["nbody"])
    method = eb.get_method("equiformer_pytorch", **SMALL, attention="l2")
    assert not method.exact_on(task.spec) and "pairwise_distance" in method.inexact_reason(task.spec)
    model = randomised(method, task.spec)
    err = eb.equivariance_error(model, Batch.from_data_list(task.load("test")[:4]), task.spec, n_samples=4,
                                dtype=F64, group="SO3")["rel_max"]
    assert 1e-9 < err < 1e-4  # measured: 9e-8


def _library_outputs(l2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's degree-0 outputs of a 5-node graph alone and inside a batch beside an 8-node graph."""
    from equiformer_pytorch import Equiformer
    torch.manual_seed(0)
    net = Equiformer(dim=8, dim_in=(3,), num_degrees=2, depth=1, heads=2, dim_head=4, radial_hidden_dim=8,
                     attend_sparse_neighbors=True, num_neighbors=0, l2_dist_attention=l2,
                     init_out_zero=False).to(F64)
    gen = torch.Generator().manual_seed(2)
    feats, coors = torch.randn(2, 8, 3, generator=gen, dtype=F64), torch.randn(2, 8, 3, generator=gen, dtype=F64)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    adj = mask[:, :, None] & mask[:, None, :]
    with torch.no_grad():
        batched = net(feats.clone(), coors, mask=mask, adj_mat=adj).type0[0, :5]
        alone = net(feats[:1, :5].clone(), coors[:1, :5], mask=mask[:1, :5], adj_mat=adj[:1, :5, :5]).type0[0]
    return batched, alone


def test_library_l2_attention_reads_padding_and_the_wrapper_refuses_it():
    batched, alone = _library_outputs(l2=True)
    assert (batched - alone).abs().max() > 1e-3  # degree-0 attention is not masked in the library
    batched, alone = _library_outputs(l2=False)
    assert (batched - alone).abs().max() < 1e-12
    task = eb.get_task("qm9", **TASKS["qm9"])
    model = build_model(eb.get_method("equiformer_pytorch", **SMALL, attention="l2"), task.spec, 0, torch.float32)
    with pytest.raises(ValueError, match="same in-degree"):
        model(Batch.from_data_list(task.load("test")[:4]))


def test_a_molecule_alone_and_in_a_padded_batch_agree():
    task = eb.get_task("qm9", **TASKS["qm9"])
    data = task.load("test")[:6]
    assert len({d.num_nodes for d in data}) > 1, "needs molecules of different sizes (padding)"
    model = randomised(eb.get_method("equiformer_pytorch", **SMALL), task.spec).eval()
    with torch.no_grad():
        together = model(f64_batch(data))
        alone = torch.cat([model(f64_batch([d])) for d in data])
    assert (together - alone).abs().max() < 1e-12 * together.abs().max()


def _hops_into(edge_index: torch.Tensor, n: int, target: int) -> list[float]:
    """Shortest number of edges j -> ... -> target (edge_index[0] -> edge_index[1]) from every node."""
    into: list[list[int]] = [[] for _ in range(n)]
    for s, d in edge_index.t().tolist():
        into[d].append(s)
    dist = [float("inf")] * n
    dist[target], queue = 0, deque([target])
    while queue:
        node = queue.popleft()
        for s in into[node]:
            if dist[s] == float("inf"):
                dist[s] = dist[node] + 1
                queue.append(s)
    return dist


def test_neighbours_are_the_task_graph_in_its_direction():
    """With one block, node i sees exactly the nodes within 2 edges *into* i (tp_in, then one attention
    block) on normals' directed k-NN graph: moving a node outside that set (though i reaches it along
    the edges' direction) leaves i's output unchanged; moving an in-neighbour changes it."""
    task = eb.get_task("normals", n_points=64, k=4, train_size=2, val_size=2, test_size=1)
    data = task.load("test")[0]
    model = randomised(eb.get_method("equiformer_pytorch", **SMALL), task.spec).eval()
    batch = f64_batch([data])
    n, i = data.num_nodes, 0
    into = _hops_into(data.edge_index, n, i)
    out_of = _hops_into(data.edge_index.flip(0), n, i)
    far = [j for j in range(n) if into[j] > 2 and out_of[j] <= 2]
    near = [j for j in range(n) if into[j] == 1]
    assert far and near, "the graph must be directed enough for this test"
    with torch.no_grad():
        base = model(batch)[i]
        for j, changes in ((far[0], False), (near[0], True)):
            moved = batch.clone()
            moved.pos = batch.pos.clone()
            moved.pos[j] += 0.1
            delta = (model(moved)[i] - base).abs().max()
            assert (delta > 1e-6) if changes else (delta < 1e-14)


def test_the_velocity_enters_as_a_degree_one_feature():
    task = eb.get_task("nbody", **TASKS["nbody"])
    model = randomised(eb.get_method("equiformer_pytorch", **SMALL), task.spec).eval()
    batch = f64_batch(task.load("test")[:4])
    flipped = batch.clone()
    flipped.vel = -batch.vel
    with torch.no_grad():
        assert (model(batch) - model(flipped)).abs().max() > 1e-3


def test_a_vanishing_degree_one_feature_is_a_discontinuity():
    """CO2's carbon: its degree-1 features are zero by symmetry, so the RMS norm (clamped at 1e-12) turns
    rounding into an output; a 1e-9 perturbation already gives an O(1) output there."""
    task = eb.get_task("md")
    with default_dtype(F64):
        co2 = dict(task.symmetric_inputs())["co2"]
    model = build_model(eb.get_method("equiformer_pytorch", **SMALL), task.spec, 0, F64).eval()
    batch = Batch.from_data_list([co2])
    moved = batch.clone()
    moved.pos = batch.pos + 1e-9 * torch.randn(batch.pos.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        at, near = model(batch)[1].norm(), model(moved)[1].norm()
    assert at < 1e-3 and near > 1e-2
    assert eb.get_method("equiformer_pytorch").exactness_scope(task.spec) == GENERIC_INPUTS


def test_a_training_step_through_padding_is_finite():
    task = eb.get_task("qm9", **TASKS["qm9"])
    model = build_model(eb.get_method("equiformer_pytorch", **SMALL), task.spec, 0, torch.float32)
    batch = Batch.from_data_list(task.load("test")[:6])
    task.loss(model(batch), batch).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_basis_cache_in_equibench_cache_and_stdout_clean(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CACHE_PATH", "CLEAR_CACHE")}
    env["EQUIBENCH_CACHE"] = str(tmp_path)
    code = ("import equibench as eb; from equibench.methods.reference.equiformer_pytorch import "
            "LibraryEquiformerModel as M; M(eb.get_task('nbody').spec, 4, 1, 3, 2)")
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    assert res.stdout == ""
    assert (tmp_path / "equiformer-pytorch-0.5.4" / "index.pkl").exists()


def test_claims_and_declines():
    method = eb.get_method("equiformer_pytorch")
    assert method.origin == "equiformer-pytorch" and method.counterpart is None
    assert method.implementation() == "equiformer-pytorch 0.5.4"
    assert method.group == "SO3" and method.exact_on(eb.get_task("nbody").spec)
    spec = eb.get_task("nbody").spec
    assert "graph3d" in method.supports(eb.get_task("digits", source="sklearn").spec)
    pseudo = spec.__class__(**{**vars(spec), "output": "1e"})
    assert "points, node-level '1o' vectors or invariant scalars" in method.supports(pseudo)
    tensor_input = spec.__class__(**{**vars(spec), "inputs": {**spec.inputs, "q": "2e"}})
    assert "invariant and '1o' node inputs" in method.supports(tensor_input)
    with pytest.raises(UserError, match="num_degrees must be at least 2"):
        eb.get_method("equiformer_pytorch", num_degrees=1)
    with pytest.raises(UserError, match="width must be positive"):
        eb.get_method("equiformer_pytorch", width=0)
