"""``require`` (tests/conftest.py): a reference library that is missing or broken FAILS the tests
that need it unless the explicit switch (``EQUIBENCH_ALLOW_MISSING_REFERENCES=1`` or
``--allow-missing-references``) turns that into a skip; so the reference cross-checks cannot
vanish from a green run on an environment where an install failed."""
from __future__ import annotations

import sys
import types

import pytest

import conftest
from conftest import ALLOW_MISSING_ENV, REFERENCE_LIBRARIES, missing_allowed, require

MISSING = "equibench_no_such_reference_library_xyz"


@pytest.fixture
def no_switch(monkeypatch):
    monkeypatch.delenv(ALLOW_MISSING_ENV, raising=False)
    monkeypatch.setattr(conftest, "_allow_option", False)


def test_missing_library_fails_without_the_switch(no_switch):
    assert not missing_allowed()
    with pytest.raises(pytest.fail.Exception, match=f"{MISSING}.*{ALLOW_MISSING_ENV}=1"):
        require(MISSING)


def test_broken_library_fails_too(no_switch, monkeypatch, tmp_path):
    """An installed library that raises on import (not only ImportError) is a failure as well."""
    (tmp_path / "equibench_broken_reference.py").write_text("raise RuntimeError('half-installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="equibench_broken_reference.*RuntimeError: half-installed"):
        require("equibench_broken_reference")


@pytest.mark.parametrize("how", ["env", "option"])
def test_missing_library_skips_with_the_switch(no_switch, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv(ALLOW_MISSING_ENV, "1")
    else:
        monkeypatch.setattr(conftest, "_allow_option", True)
    assert missing_allowed()
    with pytest.raises(pytest.skip.Exception, match=MISSING):
        require(MISSING)


def test_present_library_is_returned(no_switch):
    assert require("math") is sys.modules["math"]


@pytest.mark.parametrize("name", REFERENCE_LIBRARIES)
def test_the_reference_libraries_are_installed(name):
    """scripts/setup.sh installs each of them: it imports here (fails, not skips, when absent)."""
    assert isinstance(require(name), types.ModuleType)
