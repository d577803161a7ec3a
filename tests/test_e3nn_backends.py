"""The ``e3nn`` method's cuEquivariance backend: the same network with its tensor products computed
by cuequivariance-torch agrees with e3nn's (same weights) to float64 round-off, stays exactly
O(3)-equivariant, trains, reports its agreement, and is declined without a CUDA device.

No GPU here: cuequivariance-torch runs its pure-PyTorch ``naive`` method on the CPU, which
computes the same segmented polynomial as its CUDA kernels (the kernels' agreement and speed are
measured by ``scripts/gpu-check.sh`` on a GPU machine)."""
from __future__ import annotations


import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.methods.architectures.e3nn_tp import (
    BACKEND_AGREEMENT,
    E3NNModel,
    backend_agreement,
    with_backend,
)
from equibench.methods.base import count_parameters
from equibench.metrics.equivariance import cast_batch
from equibench.symmetry.precision import default_dtype
from conftest import require

require("cuequivariance_torch")  # installed by scripts/setup.sh (extra 'reference')
OPTIONS = {"mul": 4, "depth": 2, "lmax": 2}


def build(spec, dtype: torch.dtype, backend: str):
    method = eb.get_method("e3nn", backend=backend, **OPTIONS)
    with default_dtype(dtype):
        return E3NNModel(spec, method.mul, method.lmax, method.depth, method.r_max, method.num_basis,
                         method.radial_hidden, method.avg_degree, method.cutoff, backend).to(dtype)


@pytest.fixture(scope="module")
def nbody():
    task = eb.get_task("nbody", train_size=16, test_size=16)
    return task.spec, Batch.from_data_list(task.load("test", size=16))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cuequivariance_products_agree_with_e3nn_with_the_same_weights(nbody, dtype, tol):
    spec, batch = nbody
    ours = build(spec, dtype, "e3nn")
    cueq = build(spec, dtype, "cuequivariance")
    missing = cueq.load_state_dict(ours.state_dict(), strict=False)
    assert not missing.missing_keys or all(".tps." in k for k in missing.missing_keys)
    assert count_parameters(ours) == count_parameters(cueq)
    b = cast_batch(batch, dtype)
    a, c = ours(b), cueq(b)
    rel = ((a - c).abs().max() / a.abs().max()).item()
    assert rel < tol, rel
    assert backend_agreement(cueq, b, c) == pytest.approx(rel, rel=1e-6, abs=1e-15)


def test_with_backend_copies_weights_and_a_wrong_weight_is_seen(nbody):
    spec, batch = nbody
    cueq = build(spec, torch.float32, "cuequivariance")
    pred = cueq(batch)
    before = next(cueq.parameters()).detach().clone()
    twin = with_backend(cueq, "e3nn")
    with torch.no_grad():
        next(twin.parameters()).add_(0.1)  # the twin is a copy: the original is untouched
    assert torch.equal(next(cueq.parameters()), before)
    assert backend_agreement(cueq, batch, pred * 1.01) > 1e-3


def test_cuequivariance_backend_is_exactly_o3_equivariant_in_float64(nbody):
    spec, batch = nbody
    model = build(spec, torch.float64, "cuequivariance")
    b = cast_batch(batch, torch.float64)
    err = eb.equivariance_error(model, b, spec, n_samples=4, dtype=torch.float64, group="O3")
    assert err["rel_max"] < 1e-10, err


def test_a_training_step_moves_the_radial_weights(nbody):
    spec, batch = nbody
    model = build(spec, torch.float32, "cuequivariance")
    before = [p.detach().clone() for p in model.parameters()]
    loss = ((model(batch) - batch.y) ** 2).mean()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_declined_without_cuda_with_its_reason_and_rows_name_the_library(nbody):
    spec, _ = nbody
    method = eb.get_method("e3nn", backend="cuequivariance")
    assert "cuequivariance-torch" in method.implementation()
    assert eb.get_method("e3nn").implementation().startswith("equibench")
    reason = method.supports(spec)
    if torch.cuda.is_available():
        assert reason is None
    else:
        assert reason is not None and "CUDA" in reason
    assert BACKEND_AGREEMENT == "test.backend_agreement"
    with pytest.raises(Exception, match="backend"):
        eb.get_method("e3nn", backend="cuda_kernels")
