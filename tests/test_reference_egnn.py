"""``egnn_pytorch`` (egnn-pytorch's EGNN layers) against equibench's ``egnn``, and the library plugin
example (``examples/library_plugin.py``).

The two EGNNs implement the same equations with other MLP shapes, a coordinate sum instead of a
mean, a bias in the coordinate MLP, and the pair (i, i) in the library's message sum. Every one of
those differences can be expressed inside ``egnn``'s own architecture: zero-padded wider layers,
coordinate weights multiplied by the (uniform) in-degree, one constant hidden unit carrying the
bias, and self-loops added to the graph. With the library model's weights copied that way, the two
must compute the same function to float64 round-off - on n-body (velocities, q_i q_j edge
attributes, point output), normals (a directed k-NN graph with uneven out-degrees: edge direction
matters; "1o" output) and QM9 (irregular radius graphs, graph-level scalar output).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.utils import add_self_loops, degree

import equibench as eb
from equibench.benches.taskrun import build_model
from equibench.cli import main
from equibench.core.errors import UserError
from equibench.methods.architectures.egnn import EGNNModel
from conftest import require

require("egnn_pytorch")
F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
TASKS = {"nbody": dict(train_size=4, val_size=2, test_size=8),
         "normals": dict(n_points=64, k=8, train_size=2, val_size=2, test_size=3),
         "qm9": dict(train_size=4, val_size=2, test_size=6)}


def _put(dst: nn.Linear, src: nn.Linear, rows: slice | list[int], cols: list[tuple[int, int, int]],
         scale: float = 1.0) -> None:
    """Copy ``src`` into the zeroed ``dst``: ``rows`` of dst take src's rows in order; ``cols`` lists
    (dst start, src start, count) blocks of input columns."""
    with torch.no_grad():
        for d, s, n in cols:
            dst.weight[rows, d:d + n] = scale * src.weight[:, s:s + n]
        if src.bias is not None and dst.bias is not None:
            dst.bias[rows] = scale * src.bias


def egnn_like(lib: nn.Module, spec, width: int, degree_: float) -> EGNNModel:
    """equibench's ``EGNNModel`` of ``width`` computing ``lib``'s function (module docstring);
    ``degree_`` = the in-degree of every node in the graph with self-loops."""
    D, W = lib.width, width
    ours = EGNNModel(spec, W, lib.depth).to(F64)
    for p in ours.parameters():
        nn.init.zeros_(p)
    e = ours.layers[0].phi_e[0].in_features - 2 * W - 1
    _put(ours.embed, lib.embed, slice(0, D), [(0, 0, lib.embed.in_features)])
    for k, (mine, theirs) in enumerate(zip(ours.layers, lib.layers)):
        k2, M = theirs.edge_mlp[0].out_features, theirs.edge_mlp[3].out_features
        assert W >= max(k2, 4 * M + 1, 2 * D), "egnn's width must hold the library's hidden layers"
        _put(mine.phi_e[0], theirs.edge_mlp[0], slice(0, k2), [(0, 0, D), (W, D, D), (2 * W, 2 * D, 1 + e)])
        _put(mine.phi_e[2], theirs.edge_mlp[3], slice(0, M), [(0, 0, k2)])
        _put(mine.phi_h[0], theirs.node_mlp[0], slice(0, 2 * D), [(0, 0, D), (W, D, M)])
        _put(mine.phi_h[2], theirs.node_mlp[3], slice(0, D), [(0, 0, 2 * D)])
        if mine.update_coords:
            _put(mine.phi_x[0], theirs.coors_mlp[0], slice(0, 4 * M), [(0, 0, M)])
            last = theirs.coors_mlp[3]
            with torch.no_grad():
                mine.phi_x[0].bias[4 * M] = 1.0  # a constant hidden unit silu(1) carries the library's bias
                mine.phi_x[2].weight[0, :4 * M] = degree_ * last.weight[0]
                mine.phi_x[2].weight[0, 4 * M] = degree_ * last.bias[0] / (1.0 / (1.0 + math.exp(-1.0)))
            for phi_mine, phi_lib in zip(mine.phi_v, lib.phi_v[k]):
                _put(phi_mine[0], phi_lib[0], slice(0, D), [(0, 0, D)])
                _put(phi_mine[2], phi_lib[2], slice(0, 1), [(0, 0, D)])
    if not ours.vector_out:
        _put(ours.node_head[0], lib.node_head[0], slice(0, D), [(0, 0, D)])
        out = lib.node_head[2].out_features
        _put(ours.node_head[2], lib.node_head[2], slice(0, out), [(0, 0, D)])
        if ours.graph_head is not None:
            _put(ours.graph_head[0], lib.graph_head[0], slice(0, D), [(0, 0, D)])
            _put(ours.graph_head[2], lib.graph_head[2], slice(None), [(0, 0, D)])
    return ours


def f64_batch(task, n: int) -> Batch:
    batch = Batch.from_data_list(task.load("test")[:n])
    for key in batch.keys():
        if torch.is_floating_point(batch[key]):
            batch[key] = batch[key].to(F64)
    return batch


@pytest.mark.parametrize("task_name", list(TASKS))
def test_library_layers_equal_egnn_with_padded_weights(task_name):
    """The library model (weights redrawn at N(0, 0.1^2), so coordinates really move) and egnn built
    from its weights agree to 1e-10 in float64; without the self-loops they do not."""
    task = eb.get_task(task_name, **TASKS[task_name])
    batch = f64_batch(task, 3)
    lib = build_model(eb.get_method("egnn_pytorch", width=6, depth=3, m_dim=8), task.spec, 0, F64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lib.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=F64))
    edge_keys = list(task.spec.edge_inputs)
    loops = batch.clone()
    attr = torch.cat([batch[k] for k in edge_keys], -1) if edge_keys else None
    loops.edge_index, attr = add_self_loops(batch.edge_index, attr, fill_value=0.0, num_nodes=batch.num_nodes)
    for k in edge_keys:
        loops[k] = attr
    deg = degree(loops.edge_index[1], batch.num_nodes)
    assert task_name == "qm9" or bool((deg == deg[0]).all()), "the coordinate sum is a mean only at uniform degree"
    ours = egnn_like(lib, task.spec, 40, float(deg[0]))
    with torch.no_grad():
        a, b, c = lib.eval()(batch), ours.eval()(loops), ours(batch)
    base = batch.pos if task.spec.output == "point" else 0.0  # compare what moved, not the input positions
    a, b, c = a - base, b - base, c - base
    assert a.abs().max() > 1e-2  # a real output, not a vanishing update
    assert ((a - b).norm() / a.norm()).item() < 1e-10
    assert ((a - c).norm() / a.norm()).item() > 1e-6  # the self pair m_ii is part of the library's sum


def test_velocities_enter_as_egnn_vel_does():
    """The velocity moves the prediction along v (phi_v(h) v per layer): reversing v with |v| kept
    changes x^L - x^0 by exactly the reversed velocity terms, which a zeroed phi_v removes."""
    task = eb.get_task("nbody", **TASKS["nbody"])
    batch = f64_batch(task, 4)
    model = build_model(eb.get_method("egnn_pytorch", width=8, depth=2, m_dim=4), task.spec, 0, F64).eval()
    flipped = batch.clone()
    flipped.vel = -batch.vel
    with torch.no_grad():
        assert (model(batch) - model(flipped)).abs().max() > 1e-3
        for phis in model.phi_v:
            for phi in phis:
                nn.init.zeros_(phi[2].weight)
                nn.init.zeros_(phi[2].bias)
        assert (model(batch) - model(flipped)).abs().max() < 1e-12


def test_claims_and_declines():
    method = eb.get_method("egnn_pytorch")
    assert method.origin == "egnn-pytorch" and method.counterpart == "egnn"
    assert method.implementation().startswith("egnn-pytorch 0.2.")
    assert method.exact_on(eb.get_task("nbody").spec)
    assert "graph3d" in method.supports(eb.get_task("digits", source="sklearn").spec)
    pseudo = eb.get_task("nbody").spec.__class__(**{**vars(eb.get_task("nbody").spec), "output": "1e"})
    assert "egnn's inputs and outputs" in method.supports(pseudo)
    with pytest.raises(UserError, match="m_dim must be positive"):
        eb.get_method("egnn_pytorch", m_dim=0)


def test_parameter_matching_moves_the_width():
    spec = eb.get_task("nbody").spec
    for target in (10_000, 40_000):
        model = eb.get_method("egnn_pytorch", params=target).build(spec)
        assert abs(sum(p.numel() for p in model.parameters()) - target) <= 0.1 * target


def test_library_plugin_runs_through_the_cli_and_is_exact(tmp_path):
    """examples/library_plugin.py (at most 60 lines, nothing in equibench changed) runs through
    ``equibench run SUITE --plugin ... --methods egnn_network`` in worker processes; rows ok, exact."""
    plugin = ROOT / "examples" / "library_plugin.py"
    assert len(plugin.read_text().splitlines()) <= 60
    suite = tmp_path / "tiny.yaml"
    suite.write_text(json.dumps({
        "name": "tiny", "tasks": {"nbody": {"train_size": 32, "val_size": 8, "test_size": 16}},
        "methods": {"baseline": {"width": 8, "depth": 1}}, "seeds": [0],
        "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 16},
        "evaluate": {"equivariance_samples": 2, "equivariance_graphs": 4, "throughput_batch": 8,
                     "throughput_repeats": 2, "throughput_min_sample_s": 0.001, "lie_derivative": False}}))
    argv = ["run", str(suite), "--plugin", str(plugin), "--methods", "egnn_network", "--results-dir",
            str(tmp_path / "res"), "--name", "p", "--quiet", "--no-report", "--timeout", "300"]
    assert main(argv) == 0
    df = eb.load_results(tmp_path / "res" / "p")
    assert set(df["method"]) == {"egnn_network"} and (df["status"] == "ok").all()
    value = df.set_index("metric")["value"]
    assert value["equivariance.trained.fp64.rel_max"] < 1e-10 and value["equivariance.init.fp64.rel_max"] < 1e-10
    assert value["equivariance.trained.fp32.rel_max"] < 1e-4 and math.isfinite(value["test.mse"])
    assert df["implementation"].iloc[0].startswith("egnn-pytorch")
