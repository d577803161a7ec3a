"""``equivariance_error`` against an independent check written from DESIGN.md's definition,
analytic values, and the Lie derivative."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch, Data

import equibench as eb
from equibench.symmetry.group3d import sample_element
from equibench.symmetry.precision import default_dtype


class ShiftModel(nn.Module):
    """f(X) = pos + vel * w + a: equivariant for a = 0; for a != 0 the error is analytic:
    f(gX) - rho(g) f(X) = a - R a."""

    def __init__(self, a=(0.0, 0.0, 0.0)):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))
        self.register_buffer("a", torch.tensor(a))

    def forward(self, batch):
        return batch.pos + batch.vel * self.w + self.a


class Norms(nn.Module):
    """A non-equivariant model: an MLP on raw coordinates."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, batch):
        return batch.pos + self.lin(torch.cat([batch.pos, batch.vel], -1))


def independent_error(model, data_list, elements):
    """Per-graph relative errors computed one graph at a time with explicit matrices; the
    denominator ||f(X)_b|| + eps + 0.01 median_b ||f(X)_b|| (DESIGN.md, docs/design.md)."""
    with torch.no_grad():
        norms = torch.stack([torch.linalg.norm(model(Batch.from_data_list([d]))) for d in data_list])
    floor = 1e-12 + 0.01 * norms.median()
    rels = []
    for g in elements:
        for b, d in enumerate(data_list):
            R, t = g.R[b], g.t[b]
            n = d.pos.shape[0]
            nodes = torch.nonzero(g.batch_of_perm == b).flatten()
            local_perm = g.perm[nodes] - nodes.min()  # new local k is old local local_perm[k]
            moved = d.clone()
            moved.pos = (d.pos @ R.T + t)[local_perm]
            moved.vel = (d.vel @ R.T)[local_perm]
            moved.charge = d.charge[local_perm]
            inv = torch.empty_like(local_perm)
            inv[local_perm] = torch.arange(n)
            moved.edge_index = inv[d.edge_index]
            f = model(Batch.from_data_list([d]))
            fg = model(Batch.from_data_list([moved]))
            expected = (f @ R.T + t)[local_perm]
            rels.append(torch.linalg.norm(fg - expected) / (torch.linalg.norm(f) + floor))
    return torch.stack(rels)


@pytest.mark.parametrize("model_cls", [ShiftModel, Norms])
def test_agrees_with_independent_check(nbody_task, model_cls):
    data = [d.clone() for d in nbody_task.load("test")[:6]]
    with default_dtype(torch.float64):
        torch.manual_seed(0)
        model = model_cls().double().eval()
        for d in data:
            for k in ("pos", "vel", "charge", "y", "edge_attr"):
                d[k] = d[k].double()
        batch = Batch.from_data_list(data)
        got = eb.equivariance_error(model, batch, nbody_task.spec, n_samples=3, seed=11)
        gen = torch.Generator().manual_seed(11)
        elements = []
        for _ in range(3):
            g = sample_element(batch, "E3", gen)
            g.batch_of_perm = batch.batch[g.perm]
            elements.append(g)
        with torch.no_grad():
            want = independent_error(model, data, elements)
    assert got["rel_mean"] == pytest.approx(want.mean().item(), rel=1e-9, abs=1e-15)
    assert got["rel_max"] == pytest.approx(want.max().item(), rel=1e-9, abs=1e-15)
    assert got["rel_median"] == pytest.approx(want.median().item(), rel=1e-9, abs=1e-15)


def test_exact_model_is_at_machine_precision(nbody_batch, nbody_task):
    with default_dtype(torch.float64):
        model = ShiftModel()
    res = eb.equivariance_error(model, nbody_batch, nbody_task.spec, n_samples=4)
    assert res["rel_max"] < 1e-13
    res32 = eb.equivariance_error(ShiftModel(), nbody_batch, nbody_task.spec, n_samples=4, dtype=torch.float32)
    assert 0 < res32["rel_max"] < 1e-5
    assert eb.lie_derivative(model, nbody_batch, nbody_task.spec)["rel_max"] < 1e-8


def test_analytic_value_for_a_fixed_offset(nbody_task):
    """With a fixed offset a and pos+vel*w fields, rel = ||a - R a|| sqrt(n) / ||f(X)||."""
    a = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    data = nbody_task.load("test")[:1]
    with default_dtype(torch.float64):
        model = ShiftModel(tuple(a.tolist()))
        batch = Batch.from_data_list(data)
        for k in ("pos", "vel"):
            batch[k] = batch[k].double()
        res = eb.equivariance_error(model, batch, nbody_task.spec, n_samples=1, seed=5, permute=False)
        g = sample_element(batch, "E3", torch.Generator().manual_seed(5), permute=False)
        with torch.no_grad():
            f = model(batch)
    R = g.R[0]
    n = batch.num_nodes
    expected = torch.linalg.norm(a - R @ a) * math.sqrt(n) / (1.01 * torch.linalg.norm(f))  # one graph: floor 1 %
    assert res["rel_mean"] == pytest.approx(expected.item(), rel=1e-12)
    assert res["abs_max"] == pytest.approx((a - R @ a).abs().max().item(), rel=1e-12)
    # point output: also relative to the predicted displacement f(X) - x = vel * w + a
    disp = torch.linalg.norm(f - batch.pos)
    want = torch.linalg.norm(a - R @ a) * math.sqrt(n) / (1.01 * disp)
    assert res["disp_rel_mean"] == pytest.approx(want.item(), rel=1e-12)
    assert res["disp_rel_max"] == res["disp_rel_median"] == res["disp_rel_mean"]  # one graph, one sample
    assert res["disp_rel_mean"] > res["rel_mean"]  # the displacement is shorter than the positions


def test_displacement_keys_only_for_point_outputs():
    from equibench.core.spec import TaskSpec

    spec = TaskSpec(name="t", domain="graph3d", group="O3", inputs={"pos": "point"}, output="1o",
                    level="node", loss="mse", metrics=("mse",))

    class Centred(nn.Module):
        def forward(self, batch):
            return batch.pos - batch.pos.mean(0)

    g = torch.Generator().manual_seed(0)
    b = Batch.from_data_list([Data(pos=torch.randn(5, 3, generator=g, dtype=torch.float64),
                                   edge_index=torch.zeros(2, 0, dtype=torch.long))])
    res = eb.equivariance_error(Centred(), b, spec, n_samples=2)
    assert res["rel_max"] < 1e-13 and "disp_rel_max" not in res


def test_lie_derivative_analytic(nbody_task):
    """For f = pos + a (fixed a), rho(exp(-sA)) f(exp(sA) X) = pos + exp(-sA) a, so the Lie
    derivative along generator A_k is -A_k a at every node."""
    from e3nn import o3
    a = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    data = nbody_task.load("test")[:1]
    with default_dtype(torch.float64):
        model = ShiftModel(tuple(a.tolist()))
        model.w.data.zero_()
        batch = Batch.from_data_list(data)
        for k in ("pos", "vel"):
            batch[k] = batch[k].double()
        res = eb.lie_derivative(model, batch, nbody_task.spec)
        f_norm = torch.linalg.norm(batch.pos + a)
        G = o3.so3_generators(1)
    n = batch.num_nodes
    rels = torch.stack([torch.linalg.norm(G[k] @ a) * math.sqrt(n) / (1.01 * f_norm) for k in range(3)])  # one graph: floor 1 %
    assert res["rel_max"] == pytest.approx(rels.max().item(), rel=1e-6)
    assert res["rel_mean"] == pytest.approx(rels.mean().item(), rel=1e-6)


def test_non_equivariant_model_is_detected(nbody_batch, nbody_task):
    torch.manual_seed(0)
    res = eb.equivariance_error(Norms(), nbody_batch, nbody_task.spec, n_samples=4, dtype=torch.float32)
    assert res["rel_mean"] > 1e-2
    assert eb.lie_derivative(Norms(), nbody_batch, nbody_task.spec)["rel_mean"] > 1e-3


def test_float64_measurement_warns_when_model_was_built_in_float32(nbody_batch, nbody_task):
    with pytest.warns(UserWarning, match="default_dtype"):
        eb.equivariance_error(ShiftModel(), nbody_batch, nbody_task.spec, n_samples=1)


def test_a_graph_with_a_near_zero_output_is_measured_against_the_typical_output(nbody_task):
    """An exactly invariant graph scalar in float32 whose value on one graph is ~1e-6: its float32
    rounding (~1e-7 of the summed terms) is not a "relative" error of 1e-1 there; the denominator
    floor (1 % of the median output norm) keeps the fp32 error at rounding level."""
    from equibench.core.spec import TaskSpec

    spec = TaskSpec(name="t", domain="graph3d", group="O3", inputs={"pos": "point"}, output="0e",
                    level="graph", loss="mse", metrics=("mse",))
    gen = torch.Generator().manual_seed(0)
    data = [Data(pos=torch.randn(6, 3, generator=gen), edge_index=torch.zeros(2, 0, dtype=torch.long))
            for _ in range(8)]
    batch = Batch.from_data_list(data)
    centred = batch.pos - torch.stack([d.pos.mean(0) for d in data]).repeat_interleave(6, 0)
    spread = torch.zeros(8).index_add_(0, batch.batch, (centred ** 2).sum(-1))
    offset = float(spread[0]) - 1e-6  # graph 0's output is 1e-6, the others ~10

    class Spread(nn.Module):
        def forward(self, b):
            c = b.pos - torch.zeros(8, 3).index_add_(0, b.batch, b.pos)[b.batch] / 6
            return (torch.zeros(8).index_add_(0, b.batch, (c ** 2).sum(-1)) - offset).unsqueeze(-1)

    res = eb.equivariance_error(Spread(), batch, spec, n_samples=4, dtype=torch.float32)
    assert res["abs_max"] > 0 and res["rel_max"] < 1e-4


@pytest.mark.parametrize("method", ["baseline", "frame_averaging"])
def test_stacked_samples_equal_one_forward_per_sample(nbody_task, method, monkeypatch):
    """The group samples run as one forward over stacked copies of the batch; the numbers are those
    of one forward per sample (``MAX_BATCHED_NODES`` too small to stack: the loop), to float64
    rounding, for an inexact model (errors of order 1) and an exact one."""
    from torch_geometric.data import Batch

    from equibench.metrics import equivariance as eq
    from equibench.symmetry.precision import default_dtype

    batch = Batch.from_data_list(nbody_task.load("test", seed=0)[:6])
    with default_dtype(torch.float64):
        model = eb.get_method(method).build(nbody_task.spec, seed=0).double()
    stacked = eb.equivariance_error(model, batch, nbody_task.spec, n_samples=3, seed=4)
    monkeypatch.setattr(eq, "MAX_BATCHED_NODES", 1)
    looped = eb.equivariance_error(model, batch, nbody_task.spec, n_samples=3, seed=4)
    for key in ("rel_mean", "rel_max", "disp_rel_max", "abs_max"):
        assert stacked[key] == pytest.approx(looped[key], rel=1e-9, abs=1e-14), key
    assert (stacked["rel_max"] > 1e-3) == (method == "baseline")
