"""The adapter interface every method implements.

A ``Method`` is a configured recipe; ``build(spec, seed)`` returns a ``torch.nn.Module`` with
``model(batch) -> Tensor`` of shape ``[N, field_dim(spec.output)]`` (node level) or
``[B, field_dim(spec.output)]`` (graph level). Training-time behaviour belongs to the method,
through hooks that default to doing nothing, so the runner never branches on a method's name.
"""
from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import nn
from torch_geometric.data import Batch

from ..core.spec import TaskSpec
from ..metrics.catalogue import MetricSpec, declare

M = TypeVar("M", bound=nn.Module)

#: where an exactness claim holds (``Method.exactness_scope``): on every input, or only on inputs
#: without an exact symmetry of their own (frames and canonicalisations are undefined there)
EVERY_INPUT = "every_input"
GENERIC_INPUTS = "generic_inputs"
EXACT_SCOPES = (EVERY_INPUT, GENERIC_INPUTS)
SCOPE_TEXT = {EVERY_INPUT: "every input", GENERIC_INPUTS: "inputs without a symmetry of their own"}


class Method:
    """Base class of all adapters. Subclasses take their options as keyword-only ``__init__``
    arguments with type hints (validated by ``get_method``), and set the class attributes:

    * ``domains``: task domains supported ("graph3d", "image2d");
    * ``exact``: equivariance holds by construction (held to 1e-10 fp64 / 1e-4 fp32 in tests);
    * ``group``: the group it is equivariant to when exact ("O3" includes reflections; "SO3"
      does not); translations are always handled when the task has point inputs;
    * ``exact_by_domain``: exactness per domain where a method builds different models per domain
      (on image2d, exact means invariant over the grid symmetries of the task's planar group: C4
      exactly); ``is_exact(domain)`` falls back to ``exact`` for a domain not listed;
    * per task, ``exact_on(spec)`` is the claim the runner, the tests and the report use:
      ``inexact_reason(spec)`` is None exactly when the models built for ``spec`` are equivariant
      by construction (for ``common_group(spec.group, group)``) on every input of that task that
      has no exact symmetry of its own; otherwise it says why not. Frame-based methods, where an
      exactly symmetric input (eigenvalue ties, points on a rotation axis) leaves the frame
      undefined, report how often that happens through ``extra_metrics`` instead;
    * ``exact_scope`` (per domain ``exact_scope_by_domain``): where the claim holds,
      ``EVERY_INPUT`` (intrinsic architectures, averaging over a whole finite group) or
      ``GENERIC_INPUTS`` (frames, canonicalisation, local frames: exact on inputs without an
      exact symmetry of their own; on a symmetric input, e.g. benzene or a ring of equal charges,
      the frame is undecided and the error is measured, ``Task.symmetric_inputs``).
      ``exactness_scope(spec)`` is the scope on a task (None where the method is not exact);
      ``tests/test_symmetric_inputs.py`` holds EVERY_INPUT methods to 1e-10 on every symmetric
      input and checks that a GENERIC_INPUTS declaration is needed;
    * ``requirements``: pip requirement strings the method needs beyond equibench's own (e.g.
      ``("e3nn==0.5.1",)``); its points then run in a cached virtual environment that has them
      installed on top of the runner's packages (``equibench.suite.envs``). Default ``()``.
    """

    name: ClassVar[str] = "?"
    domains: ClassVar[tuple[str, ...]] = ("graph3d",)
    exact: bool = False
    group: str | None = None
    exact_by_domain: ClassVar[dict[str, bool]] = {}
    exact_scope: str = EVERY_INPUT
    exact_scope_by_domain: ClassVar[dict[str, str]] = {}
    #: a known limit of the exactness claim in float32 (measured, with where and why), carried by every
    #: row (column ``float32_caveat``) and printed where the report flags a float32 error over 1e-4
    float32_caveat: ClassVar[str] = ""
    #: wrapping methods (same backbone) report their overhead against it
    wraps_backbone: ClassVar[bool] = False
    #: options of a small, fast instance, used by the registry-parametrised tests
    smoke_options: ClassVar[dict[str, Any]] = {}
    #: pip requirements of an isolated environment for this method's points (empty: the runner's)
    requirements: ClassVar[tuple[str, ...]] = ()
    #: which implementation this is: "equibench" (our own) or the distribution name of the library
    #: whose model it wraps (its installed version goes into every row, ``implementation()``)
    origin: ClassVar[str] = "equibench"
    #: for a wrapped library model: the name of equibench's own method implementing the same
    #: construction (the report pairs the two: accuracy, equivariance error and throughput side by
    #: side); None when there is none
    counterpart: ClassVar[str | None] = None
    #: the extra metrics ``extra_metrics`` reports (``test.<name>`` specs, role "diagnostic"),
    #: declared in the metric catalogue when the class is registered
    METRICS: ClassVar[tuple[MetricSpec, ...]] = ()

    @classmethod
    def on_register(cls) -> None:
        """Declare ``METRICS`` (``core.registry`` calls this when the class is registered)."""
        declare(cls.METRICS)

    def implementation(self) -> str:
        """``"equibench <version>"`` or ``"<library> <version>"`` (``"not installed"`` when absent)."""
        try:
            return f"{self.origin} {importlib.metadata.version(self.origin)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{self.origin} (not installed)"

    def __init__(self, **options: Any) -> None:
        self.options = dict(options)

    def supports(self, spec: TaskSpec) -> str | None:
        """``None`` when the method can run ``spec``; else the reason it is not applicable."""
        if spec.domain not in self.domains:
            return f"{self.name} supports domains {list(self.domains)}, task is {spec.domain!r}"
        return None

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        raise NotImplementedError

    def is_exact(self, domain: str) -> bool:
        """Whether the models built for tasks of ``domain`` are equivariant by construction."""
        return bool(self.exact_by_domain.get(domain, self.exact))

    def inexact_reason(self, spec: TaskSpec) -> str | None:
        """None when the method claims exact equivariance on tasks like ``spec`` (see the class
        docstring); else the reason it does not. Default: the claim for the task's domain."""
        if not self.is_exact(spec.domain):
            return f"{self.name} is not equivariant by construction on {spec.domain} tasks"
        return None

    def exact_on(self, spec: TaskSpec) -> bool:
        """Whether the method claims exact equivariance on ``spec`` (``inexact_reason(spec) is None``)."""
        return self.inexact_reason(spec) is None

    def exactness_scope(self, spec: TaskSpec) -> str | None:
        """Where the exactness claim on ``spec`` holds: ``EVERY_INPUT`` or ``GENERIC_INPUTS``
        (inputs without an exact symmetry of their own); None when the method claims no
        exactness there (``exact_on``)."""
        if not self.exact_on(spec):
            return None
        return self.exact_scope_by_domain.get(spec.domain, self.exact_scope)

    # ---- hooks (default: nothing) -------------------------------------------------------
    def train_transform(self, batch: Batch, spec: TaskSpec, generator: torch.Generator) -> Batch:
        """Transform a training batch before the forward pass (e.g. data augmentation)."""
        return batch

    def auxiliary_loss(self, model: nn.Module, batch: Batch, pred: torch.Tensor) -> torch.Tensor | None:
        """Extra loss term added to the task loss (e.g. a canonicaliser's prior)."""
        return None

    def extra_metrics(self, model: nn.Module, batch: Batch, pred: torch.Tensor) -> dict[str, float]:
        """Method-specific evaluation numbers (e.g. the identity metric), averaged over test batches;
        each name is declared in ``METRICS``."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "exact": self.exact, "group": self.group, "exact_scope": self.exact_scope,
                **self.options}


def declared_scopes(cls: type[Method]) -> dict[str, str]:
    """``{domain: scope}`` for each domain where the class claims exactness (its class attributes;
    an option may narrow the claim per task, ``Method.exactness_scope``)."""
    return {d: cls.exact_scope_by_domain.get(d, cls.exact_scope) for d in cls.domains
            if cls.exact_by_domain.get(d, cls.exact)}


def scope_summary(cls: type[Method]) -> str:
    """Where the class's exactness claim holds, in words: "every input", "inputs without a
    symmetry of their own", per domain when they differ, "none" when it claims none."""
    scopes = declared_scopes(cls)
    if not scopes:
        return "none"
    if len(set(scopes.values())) == 1 and set(scopes) == set(cls.domains):
        return SCOPE_TEXT[next(iter(scopes.values()))]
    return "; ".join(f"{d}: {SCOPE_TEXT[v]}" for d, v in scopes.items())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_at_params(factory: Callable[[int], M], target: int | None, default: int,
                    lo: int = 2, hi: int = 4096, tolerance: float = 0.10) -> M:
    """Build ``factory(size)`` with the integer ``size`` whose parameter count is closest to
    ``target``. Parameter counts grow monotonically with size: bracket the target by doubling or
    halving from ``default`` (so no huge model is ever built), then bisect. ``target=None`` builds
    ``factory(default)``. Raises ``ValueError`` if no size lands within ``tolerance``."""
    if target is None:
        return factory(default)
    rng_state = torch.random.get_rng_state()
    counts: dict[int, int] = {}

    def count(size: int) -> int:
        if size not in counts:
            torch.random.set_rng_state(rng_state)
            counts[size] = count_parameters(factory(size))
        return counts[size]

    a = b = min(max(default, lo), hi)
    if count(a) < target:
        while b < hi and count(b) < target:
            a, b = b, min(2 * b, hi)
    else:
        while a > lo and count(a) >= target:
            a, b = max(a // 2, lo), a
    while b - a > 1:
        mid = (a + b) // 2
        if count(mid) < target:
            a = mid
        else:
            b = mid
    best = min((a, b), key=lambda s: abs(count(s) - target))
    torch.random.set_rng_state(rng_state)
    model = factory(best)
    n = count_parameters(model)
    if abs(n - target) > tolerance * target:
        raise ValueError(f"cannot build within {tolerance:.0%} of {target} parameters "
                         f"(closest: {n} at size {best})")
    return model


def bisect_increasing(f: Callable[[int], int], target: int, hi_limit: int = 4096) -> tuple[int, int]:
    """(lo, hi) with f(lo) < target <= f(hi) for an increasing integer function ``f`` (doubling
    from 1, then bisecting); lo = hi = 1 when f(1) >= target; hi stops at ``hi_limit``."""
    lo = hi = 1
    while f(hi) < target and hi < hi_limit:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return lo, hi


class IrrepsSized(Protocol):
    """A method sized by (channel multiplicity, radial hidden width), like the e3nn networks."""

    @property
    def params(self) -> int | None: ...

    @property
    def mul(self) -> int: ...

    @property
    def radial_hidden(self) -> int: ...

    def supports(self, spec: TaskSpec) -> str | None: ...

    def sizes_for(self, spec: TaskSpec, target: int) -> tuple[int, int]: ...

    def count(self, spec: TaskSpec, mul: int, radial_hidden: int) -> int: ...


def build_irreps_sized(method: IrrepsSized, spec: TaskSpec, seed: int,
                       make: Callable[[int, int], nn.Module]) -> nn.Module:
    """``make(mul, radial_hidden)`` at the method's sizes (matched to ``method.params`` within 10 %
    when given, from its analytic ``count``), built under ``seed`` without touching the global RNG
    state; ``ValueError`` when the task is not supported or no size matches."""
    reason = method.supports(spec)
    if reason:
        raise ValueError(reason)
    mul, rh = method.mul, method.radial_hidden
    if method.params is not None:
        mul, rh = method.sizes_for(spec, method.params)
        n = method.count(spec, mul, rh)
        if abs(n - method.params) > 0.10 * method.params:
            raise ValueError(f"cannot build within 10% of {method.params} parameters "
                             f"(closest: {n} at mul={mul}, radial_hidden={rh})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make(mul, rh)
