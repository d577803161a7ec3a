"""The profiler breakdown (``equibench.metrics.profile``): regions by wrapper labels or op categories,
shares that sum to one, the rows of the architecture point and the report's table."""
from __future__ import annotations

import time

import pandas as pd
import pytest
import torch
from torch import nn
from torch.profiler import record_function
from torch_geometric.data import Batch

from equibench.benches.taskrun import run_one
from equibench.core.spec import RunSpec
from equibench.metrics import catalogue
from equibench.metrics.profile import FORWARD, TP_RANGE, assign, breakdown_from_events, profile_breakdown
from equibench.report.common.tables import profile_table
from equibench.results.store import upgrade_frame


class Labelled(nn.Module):
    """A wrapper with known costs: 30 ms building frames, 10 ms in the backbone, a few ops mapping back."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, batch: Batch) -> torch.Tensor:
        with record_function("equibench.frames"):
            time.sleep(0.03)
            frames = torch.eye(3).expand(batch.num_graphs, 3, 3)
        with record_function("equibench.backbone"):
            time.sleep(0.01)
            out = self.lin(batch.pos)
        with record_function("equibench.to_frame"):
            return out @ frames[0]


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 64)

    def forward(self, batch: Batch) -> torch.Tensor:
        h = torch.relu(self.lin(batch.pos))
        return torch.zeros(batch.num_graphs, 64).index_add_(0, batch.batch, h)


@pytest.fixture
def batch(nbody_batch) -> Batch:
    return nbody_batch


def test_labelled_regions_get_their_sleeps(batch):
    res = profile_breakdown(Labelled(), batch, calls=3)
    s = res["shares"]
    assert res["scheme"] == "labels" and set(s) == {"frames", "backbone", "to_frame", "other"}
    assert sum(s.values()) == pytest.approx(1.0)
    assert 0.45 < s["frames"] < 0.95 and 0.1 < s["backbone"] < s["frames"] and s["to_frame"] < s["backbone"]
    assert res["time_s"] >= 0.04 and res["calls"] == 3


def test_architectures_without_labels_split_by_op(batch):
    res = profile_breakdown(Plain(), batch)
    s = res["shares"]
    assert res["scheme"] == "ops" and set(s) == {"tensor_product", "linear", "scatter", "other"}
    assert sum(s.values()) == pytest.approx(1.0)
    assert s["tensor_product"] == 0 and s["linear"] > 0 and s["scatter"] > 0 and s["other"] > 0
    assert res["calls"] % 2 == 1 and 3 <= res["calls"] <= 9  # odd: the median is one forward's


def test_tensor_products_are_ranged_by_hooks(batch):
    o3 = pytest.importorskip("e3nn.o3")

    class TP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tp = o3.FullyConnectedTensorProduct("4x0e+4x1o", "1x0e+1x1o", "4x0e+4x1o")
            self.lin = nn.Linear(16, 16)

        def forward(self, b: Batch) -> torch.Tensor:
            x = self.lin(torch.cat([b.pos] * 5 + [b.pos[:, :1]], dim=1))
            return self.tp(x, torch.cat([torch.ones_like(b.pos[:, :1]), b.pos], dim=1))
    model = TP()
    res = profile_breakdown(model, batch)
    assert res["scheme"] == "ops" and res["shares"]["tensor_product"] > 0.3
    assert not model.tp._forward_hooks and not model.tp._forward_pre_hooks  # hooks removed again


def test_assignment_rules():
    assert assign(["equibench.to_frame", "equibench.backbone", "aten::mm"], "labels") == "backbone"  # innermost
    assert assign(["equibench.frames", "aten::linalg_eigh"], "labels") == "frames"
    assert assign(["aten::mm"], "labels") == "other"
    assert assign([TP_RANGE, "aten::linear", "aten::mm"], "ops") == "tensor_product"  # outermost category
    assert assign(["aten::linear", "aten::addmm"], "ops") == "linear"
    assert assign(["aten::index_select"], "ops") == assign(["torch_scatter::scatter_sum"], "ops") == "scatter"
    assert assign(["aten::silu"], "ops") == "other"


def test_breakdown_nests_by_time_and_takes_the_median_forward():
    def ev(name, start, end, tid=1):
        return (name, start, end, tid, True, 0, 0)
    fwd = [  # forward 2 was preempted inside its backbone: the median over forwards ignores it
        ev(FORWARD, 0, 100), ev("equibench.frames", 10, 40), ev("aten::mm", 20, 30), ev("equibench.backbone", 50, 90),
        ev(FORWARD, 200, 300), ev("equibench.frames", 210, 240), ev("equibench.backbone", 250, 290),
        ev(FORWARD, 400, 1400), ev("equibench.frames", 410, 440), ev("equibench.backbone", 450, 1390),
        ev("aten::outside", 2000, 2100),
    ]
    res = breakdown_from_events(fwd)
    assert res["scheme"] == "labels" and res["forwards"] == 3
    # per forward: frames 30 (the mm inside counts as frames), backbone 40 / 40 / 940, other 30
    assert res["shares"] == pytest.approx({"frames": 0.3, "backbone": 0.4, "to_frame": 0.0, "other": 0.3})


TINY = dict(task="nbody", task_options={"train_size": 32, "val_size": 8, "test_size": 16},
            train={"steps": 2, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 16},
            evaluate={"equivariance_samples": 2, "equivariance_graphs": 4, "throughput_batch": 8,
                      "throughput_repeats": 2, "throughput_min_sample_s": 0.001, "lie_derivative": False,
                      "symmetric_inputs": False, "throughput_modes": ["inference"], "flops": False,
                      "architecture_seed": 0})


def test_architecture_point_records_the_profile_and_the_report_shows_it():
    rows = run_one(RunSpec(method="baseline", seed=0, method_options={"params": 2000}, **TINY))
    other = run_one(RunSpec(method="baseline", seed=1, method_options={"params": 2000}, **TINY))
    prof = [r for r in rows if r["metric"].startswith("profile.")]
    assert {r["metric"] for r in prof} == {catalogue.profile_metric("inference", g)
                                           for g in ("tensor_product", "linear", "scatter", "other")}
    assert sum(r["value"] for r in prof) == pytest.approx(1.0)
    assert {r["profile_scheme"] for r in prof} == {"ops"} and all(r["batch_size"] == 8 for r in prof)
    assert not any(r["metric"].startswith("profile.") for r in other)  # only in the architecture point
    caption, table = profile_table(upgrade_frame(pd.DataFrame(rows + other)))  # as load_results gives them
    assert list(table.index) == ["baseline"] and table.loc["baseline", "regions by"] == "op categories"
    assert table.loc["baseline", "linear"].endswith("%") and "torch.profiler" in caption
    assert profile_table(upgrade_frame(pd.DataFrame(other))) is None
