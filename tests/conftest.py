"""Shared fixtures: a small n-body batch (data cached under $EQUIBENCH_CACHE or ~/.cache)."""
from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb


@pytest.fixture(scope="session")
def nbody_task():
    return eb.get_task("nbody", train_size=64, val_size=16, test_size=64)


@pytest.fixture(scope="session")
def nbody_batch(nbody_task) -> Batch:
    return Batch.from_data_list(nbody_task.load("test")[:16])


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    dtype = torch.get_default_dtype()
    yield
    assert torch.get_default_dtype() == dtype, "a test (or the code under test) leaked a default dtype change"
    torch.set_default_dtype(dtype)
