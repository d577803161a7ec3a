"""The two value types the engine passes around: what a task is (`TaskSpec`) and what one run
is (`RunSpec`). Both are frozen and hashable; a run's identity is the hash of its spec."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    """How every field of a task transforms and what is predicted.

    Field types are e3nn irreps strings ("0e", "1o", "8x0e+2x1o", ...) or ``"point"`` (a
    position: rotates and translates). ``group`` is the symmetry the target obeys.
    ``edge_inputs`` (an addition to DESIGN.md, see docs/design.md) types per-edge fields
    such as the n-body charge product q_i q_j.

    Symmetry breaking (additions, both empty by default): ``broken_group`` names the larger group
    the task would have without its symmetry-breaking environment (``nbody_field``: "E3"; the
    target obeys only ``group``, e.g. "O2z"). ``breaking_inputs`` types the fields that describe
    that environment (``{"field": "1o"}``: the external field vector). They are present in every
    ``Data`` of the task but are *not* in ``inputs``: group actions (equivariance metric,
    augmentation) leave them fixed, as environment parameters, and methods ignore them unless
    asked to take them as typed inputs (``with_breaking_inputs``).
    """

    name: str
    domain: str  # "graph3d" | "image2d"
    group: str  # "E3", "O3", "SO3", "C4", ...
    inputs: dict[str, str]
    output: str
    level: str  # "node" | "graph"
    loss: str
    metrics: tuple[str, ...]
    edge_inputs: dict[str, str] = field(default_factory=dict)
    broken_group: str | None = None
    breaking_inputs: dict[str, str] = field(default_factory=dict)

    def __hash__(self) -> int:  # dicts are not hashable; hash the canonical JSON
        return hash(json.dumps(asdict(self), sort_keys=True))

    @property
    def point_fields(self) -> list[str]:
        return [k for k, t in self.inputs.items() if t == "point"]

    def with_breaking_inputs(self) -> TaskSpec:
        """The spec a model sees when it takes the symmetry-breaking fields as typed inputs:
        ``breaking_inputs`` moved into ``inputs`` (so frames, canonicalisers and group actions
        transform them like any other field of their type). ``self`` when there are none."""
        if not self.breaking_inputs:
            return self
        return replace(self, inputs={**self.inputs, **self.breaking_inputs}, breaking_inputs={})


def _freeze(options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(options or {})
    try:
        json.dumps(options, sort_keys=True)
    except TypeError as err:
        raise UserError(f"options must be plain YAML/JSON values: {err}") from None
    return options


PROVENANCE = ("setting_source", "tuning_edge")  # RunSpec fields that record history, not identity


@dataclass(frozen=True)
class RunSpec:
    """One (task, method, seed) with all options: the unit the runner executes.

    ``train`` holds the shared optimisation budget (steps, batch_size, lr, ...) and ``evaluate``
    the measurement settings (equivariance samples, throughput batch and repeats). Provenance, not
    identity (outside ``hash``): ``setting_source`` (where the train settings came from) and
    ``tuning_edge`` (empty when the tuned setting is interior to its grid, else which edge, e.g.
    "upper edge lr=0.03 after 3 extensions"); every row of the run carries both.
    """

    task: str
    method: str
    seed: int = 0
    task_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    setting_source: str = ""  # where the train settings came from (provenance, not part of the hash)
    tuning_edge: str = ""  # a tuned choice left at an edge of its grid, e.g. "upper edge lr=0.03 after 3 extensions"

    def __post_init__(self) -> None:
        for name in ("task", "method", "device", "setting_source", "tuning_edge"):
            if not isinstance(getattr(self, name), str):
                raise UserError(f"RunSpec.{name} must be a string, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"RunSpec.seed must be a non-negative integer, got {self.seed!r}")
        for name in ("task_options", "method_options", "train", "evaluate"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        return cls(**d)

    @property
    def hash(self) -> str:
        """Stable 12-hex identity of the spec (canonical JSON, sha256); ``setting_source`` and
        ``tuning_edge`` are provenance and not part of it."""
        ident = {k: v for k, v in self.to_dict().items() if k not in PROVENANCE}
        blob = json.dumps(ident, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        return f"{self.task}/{self.method}/seed{self.seed}"

    def __hash__(self) -> int:
        return hash(self.hash)
