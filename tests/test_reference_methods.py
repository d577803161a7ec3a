"""Reference implementations wrapped as methods agree with equibench's own where the definitions
coincide."""
from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import build_model
from conftest import require

require("frame_averaging_pytorch")
F64 = torch.float64


@pytest.fixture(scope="module")
def nbody():
    task = eb.get_task("nbody", train_size=8, val_size=4, test_size=16)
    batch = Batch.from_data_list(task.load("test"))
    for key in ("pos", "vel", "charge", "edge_attr", "y"):
        batch[key] = batch[key].double()
    return task, batch


def test_frame_averaging_pytorch_agrees_with_ours_to_1e10(nbody):
    """Same seed, same backbone weights; the library's frames with their columns reversed
    (increasing -> decreasing eigenvalue) are our frame set, so the averages agree to round-off."""
    task, batch = nbody
    ours = build_model(eb.get_method("frame_averaging", width=16, depth=2), task.spec, 0, F64)
    lib = build_model(eb.get_method("frame_averaging_pytorch", width=16, depth=2), task.spec, 0, F64)
    assert all(torch.equal(a, b) for a, b in zip(ours.backbone.state_dict().values(),
                                                 lib.backbone.state_dict().values()))
    with torch.no_grad():
        a, b = ours.eval()(batch), lib.eval()(batch)
    assert ((a - b).norm() / a.norm()).item() < 1e-10


def test_without_alignment_it_is_another_exact_function(nbody):
    task, batch = nbody
    ours = build_model(eb.get_method("frame_averaging", width=16, depth=2), task.spec, 0, F64)
    raw = build_model(eb.get_method("frame_averaging_pytorch", width=16, depth=2, align=False), task.spec, 0, F64)
    with torch.no_grad():
        a, b = ours.eval()(batch), raw.eval()(batch)
    assert ((a - b).norm() / a.norm()).item() > 1e-6  # the column order changes what the backbone reads
    # and the library's frames are what runs: reversing their columns (align) changes the output
    aligned = build_model(eb.get_method("frame_averaging_pytorch", width=16, depth=2), task.spec, 0, F64)
    with torch.no_grad():
        assert not torch.equal(aligned.eval()(batch), b)
    assert eb.equivariance_error(raw, batch, task.spec, n_samples=4, dtype=F64)["rel_max"] < 1e-10


def test_so3_and_images_are_declined_with_a_reason():
    method = eb.get_method("frame_averaging_pytorch")
    assert method.group == "O3" and "graph3d" in method.domains
    assert method.exact_on(eb.get_task("nbody").spec)  # claims exactness, so the audit holds it to 1e-10
    assert method.supports(eb.get_task("digits", source="sklearn").spec)
