"""The type vocabulary and E(3) group actions: representations, sampling, batch round trips."""
from __future__ import annotations

import pytest
import torch

from equibench.symmetry.fieldtypes import field_dim, is_invariant, representation, transform_field
from equibench.symmetry.group3d import (act_on_batch, act_on_output, common_group, sample_element,
                                   sample_rotations)
from equibench.core.errors import UserError

TYPES = ["point", "0e", "0o", "1o", "1e", "2e", "3x0e+2x1o+1x2o"]


@pytest.mark.parametrize("t", TYPES)
def test_representation_is_a_homomorphism(t):
    gen = torch.Generator().manual_seed(0)
    R1, R2 = sample_rotations(2, True, gen)
    D = lambda R: representation(t, R)  # noqa: E731
    assert torch.allclose(D(R1 @ R2), D(R1) @ D(R2), atol=1e-12)
    assert torch.allclose(D(R1) @ D(R1).T, torch.eye(field_dim(t), dtype=torch.float64), atol=1e-12)


def test_l1_basis_is_cartesian_and_parity():
    R = sample_rotations(1, False, torch.Generator().manual_seed(1))[0]
    assert torch.allclose(representation("1o", R), R, atol=1e-13)
    assert torch.allclose(representation("1o", -R), -R, atol=1e-13)  # vectors flip under inversion
    assert torch.allclose(representation("1e", -R), R, atol=1e-13)   # pseudovectors do not
    assert torch.allclose(representation("0o", -R), -torch.eye(1, dtype=R.dtype), atol=1e-13)
    assert is_invariant("4x0e") and not is_invariant("0o") and not is_invariant("point")


def test_bad_type_is_a_user_error():
    with pytest.raises(UserError, match="invalid field type"):
        field_dim("1q")


@pytest.mark.parametrize("reflections", [False, True])
def test_sampled_rotations(reflections):
    R = sample_rotations(2000, reflections, torch.Generator().manual_seed(0))
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    assert torch.allclose(R @ R.transpose(1, 2), eye, atol=1e-12)
    det = torch.linalg.det(R)
    if reflections:
        assert 0.4 < (det < 0).double().mean() < 0.6
    else:
        assert torch.all(det > 0)
    # Haar: E[R] = 0 for SO(3); each entry has variance 1/3
    assert R.mean(0).abs().max() < 0.05
    assert torch.allclose(R.pow(2).mean(0), torch.full((3, 3), 1 / 3, dtype=R.dtype), atol=0.03)


def test_transform_point_translates_vectors_do_not():
    R = torch.eye(3, dtype=torch.float64)
    t = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    x = torch.zeros(2, 3, dtype=torch.float64)
    assert torch.allclose(transform_field(x, "point", R, t), t.expand(2, 3))
    assert torch.allclose(transform_field(x, "1o", R, t), x)


def test_common_group():
    assert common_group("E3", "O3") == "E3"
    assert common_group("E3", "SO3") == "SE3"
    assert common_group("O3", None) == "O3"


def test_batch_action_round_trip_and_edges(nbody_task, nbody_batch):
    spec = nbody_task.spec
    b = nbody_batch.clone()
    for k in ("pos", "vel", "y", "edge_attr", "charge"):
        b[k] = b[k].double()
    g = sample_element(b, "E3", torch.Generator().manual_seed(3))
    gb = act_on_batch(b, spec, g)
    # edges keep their order and are relabelled: each edge vector is the rotated original
    src, dst = b.edge_index
    rot = torch.einsum("eij,ej->ei", g.R[b.batch[dst]], b.pos[src] - b.pos[dst])
    gsrc, gdst = gb.edge_index
    assert torch.allclose(gb.pos[gsrc] - gb.pos[gdst], rot, atol=1e-12)
    assert not torch.equal(gb.edge_index, b.edge_index)  # the permutation did relabel nodes
    # inverse element maps back (up to the permutation, which we undo)
    inv = type(g)(g.R.transpose(1, 2), -torch.einsum("bij,bj->bi", g.R.transpose(1, 2), g.t), None)
    back = act_on_batch(gb, spec, inv)
    order = torch.argsort(g.perm)
    assert torch.allclose(back.pos[order], b.pos, atol=1e-12)
    assert torch.allclose(back.vel[order], b.vel, atol=1e-12)
    assert torch.allclose(back.y[order], b.y, atol=1e-12)
    assert torch.equal(back.batch, b.batch)
    # the target of a node-level task is acted on like the output
    assert torch.allclose(gb.y, act_on_output(b.y, spec, g, b), atol=1e-12)


def test_so3_generators_without_e3nns_table_match_it(monkeypatch):
    """e3nn 0.4.4 (mace-torch's isolated environment) has no ``o3.so3_generators``: the fallback
    differentiates ``D_from_matrix`` and must give the same Lie-algebra representation."""
    from e3nn import o3

    from equibench.symmetry.group3d import _so3_generator
    from equibench.symmetry.precision import default_dtype

    with default_dtype(torch.float64):
        table = {(l, k): o3.so3_generators(l)[k] for l in range(4) for k in range(3)}
        monkeypatch.delattr(o3, "so3_generators")
        for (l, k), ref in table.items():
            assert torch.allclose(_so3_generator(l, k), ref, atol=1e-12), (l, k)
