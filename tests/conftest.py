"""Shared fixtures: a small n-body batch (data cached under $EQUIBENCH_CACHE or ~/.cache), and
``require``: the one way a test module asks for a reference library.

Reference checks cannot disappear: ``scripts/setup.sh`` installs every reference library the tests
cross-check against (``REFERENCE_LIBRARIES``) and builds mace's isolated environment, so a library
that is missing or fails to import is a broken set-up and FAILS the tests that need it (a collection
error for a module-level ``require``). Skipping them instead takes an explicit switch: the
environment variable ``EQUIBENCH_ALLOW_MISSING_REFERENCES=1`` or ``pytest --allow-missing-references``
(for a partial install on purpose, e.g. a machine without the ``reference`` extra).
"""
from __future__ import annotations

import importlib
import os
import types

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb

#: the variable / option that turns a missing reference library from a failure into a skip
ALLOW_MISSING_ENV = "EQUIBENCH_ALLOW_MISSING_REFERENCES"
ALLOW_MISSING_OPTION = "--allow-missing-references"
#: what ``scripts/setup.sh`` installs for the reference cross-checks (import names)
REFERENCE_LIBRARIES = ("equiadapt", "torch_scatter", "nequip", "egnn_pytorch", "frame_averaging_pytorch",
                       "cuequivariance_torch", "escnn", "equiformer_pytorch")
_allow_option = False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(ALLOW_MISSING_OPTION, action="store_true", default=False,
                     help="skip (instead of fail) the tests whose reference library or environment is "
                          f"missing or broken (same as {ALLOW_MISSING_ENV}=1)")


def pytest_configure(config: pytest.Config) -> None:
    global _allow_option
    _allow_option = bool(config.getoption(ALLOW_MISSING_OPTION, default=False))


def missing_allowed() -> bool:
    """True when the switch to skip missing references is on (option or environment variable)."""
    return _allow_option or os.environ.get(ALLOW_MISSING_ENV, "").strip().lower() in ("1", "true", "yes")


def missing_reference(reason: str) -> None:
    """A reference the tests need is absent: fail (default) or, with the switch, skip. Raises
    ``pytest.fail.Exception`` / ``pytest.skip.Exception`` (valid at module level too)."""
    if missing_allowed():
        pytest.skip(f"{reason} (skipped: {ALLOW_MISSING_ENV} / {ALLOW_MISSING_OPTION})", allow_module_level=True)
    pytest.fail(f"{reason}; scripts/setup.sh installs it. Set {ALLOW_MISSING_ENV}=1 or pass "
                f"{ALLOW_MISSING_OPTION} to skip these tests instead", pytrace=False)


def require(module: str) -> types.ModuleType:
    """Import ``module`` (a reference library); a missing or broken one (any exception on import)
    fails the calling test or module unless ``missing_allowed()``, then it skips it."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything at import time
        missing_reference(f"reference library {module!r} cannot be imported ({type(exc).__name__}: {exc})")
        raise  # unreachable: missing_reference always raises


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
