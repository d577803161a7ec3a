"""Each task's trivial predictor: the score a method must beat to have learned anything."""
from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import trivial_metrics


def test_nbody_trivial_is_no_displacement():
    task = eb.get_task("nbody", train_size=32, val_size=8, test_size=16)
    test = task.load("test")
    batch = Batch.from_data_list(test)
    expected = ((batch.pos - batch.y) ** 2).mean(-1)
    got = trivial_metrics(task, task.load("train"), test, 8)["mse"]
    per_graph = torch.zeros(batch.num_graphs, dtype=expected.dtype).index_add_(0, batch.batch, expected)
    per_graph /= torch.bincount(batch.batch).to(expected.dtype)
    assert got == pytest.approx(per_graph.mean().item(), rel=1e-6)


def test_md_trivial_is_zero_forces_and_qm9_the_training_mean():
    md = eb.get_task("md", train_size=20, val_size=5, test_size=10)
    test = md.load("test")
    mae = trivial_metrics(md, md.load("train"), test, 5)["force_mae"]
    assert mae == pytest.approx(torch.cat([d.y.abs().mean(-1) for d in test]).mean().item(), rel=1e-5)  # one molecule: graphs of equal size
    qm9 = eb.get_task("qm9", train_size=200, val_size=20, test_size=50)
    train = qm9.load("train")
    mean = float(torch.cat([d.y.reshape(-1) for d in train]).double().mean())
    test = qm9.load("test")
    expected = torch.cat([(d.y.reshape(-1).double() - mean).abs() for d in test]).mean().item()
    assert trivial_metrics(qm9, train, test, 25)["mae"] == pytest.approx(expected, rel=1e-5)


def test_digits_trivial_is_the_majority_class():
    task = eb.get_task("digits", train_size=100, val_size=10, test_size=50)
    train, test = task.load("train"), task.load("test")
    majority = int(torch.bincount(torch.cat([d.y.reshape(-1) for d in train]).long()).argmax())
    share = torch.cat([d.y.reshape(-1) for d in test]).eq(majority).double()
    primary = torch.cat([d.primary.reshape(-1) for d in test]).bool()
    assert trivial_metrics(task, train, test, 25)["accuracy"] == pytest.approx(share[primary].mean().item())
