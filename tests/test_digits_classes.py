"""Symmetry breaking on images: the ``upright/upright`` digits setting, per-class accuracy of the
6 / 9 pair, and why an exactly C4-invariant classifier must confuse them (a half-turn is in C4)."""
from __future__ import annotations

import torch
from torch.nn.functional import one_hot
from torch_geometric.data import Batch, Data

import equibench as eb
from equibench.benches.taskrun import build_model
from equibench.metrics import catalogue
from equibench.metrics.equivariance import cast_batch


def _item(label: int, primary: bool, rot_id: int) -> Data:
    return Data(image=torch.zeros(1, 1, 12, 12), y=torch.tensor([label]), rot_id=torch.tensor([rot_id]),
                angle=torch.zeros(1, dtype=torch.float64), primary=torch.tensor([primary]), num_nodes=1)


def test_per_class_accuracy_on_a_hand_made_prediction():
    task = eb.get_task("digits", source="sklearn", train_size=10, test_size=5)
    #        label, primary, rot_id, predicted
    items = [(6, True, 0, 6), (6, True, 2, 9), (6, False, 1, 6), (6, True, 3, 6),
             (9, True, 0, 9), (9, False, 2, 6), (9, True, 1, 6), (1, True, 0, 1), (1, True, 0, 7)]
    batch = Batch.from_data_list([_item(y, p, r) for y, p, r, _ in items])
    pred = one_hot(torch.tensor([p for *_, p in items]), 10).float()
    m = task.metric_values(pred, batch)
    # primary 6s: correct, wrong, correct -> 2/3; primary 9s: correct, wrong -> 1/2; all 7 primaries: 4/7
    assert m["accuracy_6"].mean().item() == 2 / 3 and m["accuracy_6"].numel() == 3
    assert m["accuracy_9"].mean().item() == 1 / 2 and m["accuracy_9"].numel() == 2
    assert m["accuracy"].mean().item() == 4 / 7
    for name in ("accuracy_6", "accuracy_9"):
        assert name in task.spec.metrics
        assert catalogue.get_metric(catalogue.test_metric(name)).direction == "higher"
        catalogue.get_metric(catalogue.trivial_metric(name))


def test_upright_upright_setting_has_one_upright_copy():
    task = eb.get_task("digits", source="sklearn", setting="upright/upright", train_size=20, test_size=15)
    test = task.load("test")
    assert len(test) == 15
    assert all(int(d.rot_id) == 0 and bool(d.primary) for d in test)
    rotated_test = eb.get_task("digits", source="sklearn", train_size=20, test_size=15).load("test")
    assert all(torch.equal(a.image, b.image) for a, b in zip(test, rotated_test[::4]))  # the identity copies
    assert all(int(d.rot_id) == 0 for d in task.load("train"))


def test_c4_invariant_classifier_cannot_tell_a_six_from_its_half_turn():
    task = eb.get_task("digits", source="sklearn", setting="upright/upright", train_size=20, test_size=200)
    six = next(d for d in task.load("test") if int(d.y) == 6)
    turned = six.clone()
    turned.image = torch.rot90(six.image, 2, dims=(-2, -1))  # what a 9 written as a turned 6 looks like
    batch = cast_batch(Batch.from_data_list([six, turned]), torch.float64)
    invariant = build_model(eb.get_method("frame_averaging"), task.spec, 0, torch.float64).eval()
    plain = build_model(eb.get_method("baseline"), task.spec, 0, torch.float64).eval()
    with torch.no_grad():
        out, ref = invariant(batch), plain(batch)
    assert torch.allclose(out[0], out[1], rtol=0, atol=1e-12)
    assert out[0].argmax() == out[1].argmax()  # one of the two labels 6 / 9 is necessarily wrong
    assert (ref[0] - ref[1]).abs().max() > 1e-6  # a plain CNN can separate them
