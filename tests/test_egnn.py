"""``egnn``'s float32 precision for "1o" outputs: the displacement is carried, not x^L - x^0.

A node-level "1o" prediction (normals, md forces) is the coordinate displacement. Formed as x^L - x^0,
it cancels against the input positions: float32 rounds x^L to ~6e-8 |x^L|, so a translated input
(|x| ~ 10) and a small trained output (|y| ~ 1e-3) give a relative error ~1e-3 - a method that is exact
by construction would read as broken. Carried as dx, the only rounding left is the input's own.
"""
from __future__ import annotations

import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import build_model
from equibench.symmetry.group3d import GroupElement, act_on_batch, act_on_output


def test_small_vector_output_keeps_float32_precision_under_translation() -> None:
    task = eb.get_task("normals", n_points=64, k=8, train_size=2, val_size=2, test_size=3)
    batch = Batch.from_data_list(task.load("test")[:2])
    model = build_model(eb.get_method("egnn", width=16, depth=3), task.spec, 0, torch.float32).eval()
    B = int(batch.num_graphs)
    g = GroupElement(torch.eye(3, dtype=torch.float64).expand(B, 3, 3).clone(),
                     torch.full((B, 3), 10.0, dtype=torch.float64), None).to(torch.float32, batch.batch.device)
    with torch.no_grad():
        y = model(batch)
        y_moved = model(act_on_batch(batch, task.spec, g))
    # at initialisation phi_x's last layer has gain 1e-3 (as the reference's): outputs ~1e-3 of the cloud's
    # radius, the regime of trained normals models whose error read 3e-4
    assert 1e-5 < y.norm(dim=-1).median() < 1e-2
    rel = (y_moved - act_on_output(y, task.spec, g, batch)).norm() / y.norm()
    assert rel < 1e-4, f"relative error {rel:.1e} under a translation by 10 (x^L - x^0 cancellation)"
