"""The e3nn method pinned to an older e3nn: its points run in an isolated environment."""
from __future__ import annotations

from equibench.core.registry import method_class, register_method

E3nn = method_class("e3nn")


@register_method("e3nn_051")
class E3nnOld(E3nn):
    """e3nn's tensor-product network, built with e3nn 0.5.1."""

    requirements = ("e3nn==0.5.1",)


@register_method("no_such_requirement")
class Unbuildable(E3nn):
    """Needs a package that does not exist: its environment cannot be built."""

    requirements = ("equibench-test-no-such-package==0.0.1",)
