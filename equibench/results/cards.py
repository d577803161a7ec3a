"""Cards: what a run directory says about every method and task it ran, so that its report needs
nothing but the run directory (no registry, no class, no docstring of the code reading it).

Layout under the run directory:

* ``cards/methods/<method key>.json``: a ``MethodCard`` per method key (a suite variant
  ``<method>@<label>`` has its own): origin, version, counterpart, group, declared exactness per
  domain, float32 caveat, whether it wraps the shared backbone, requirements, the first paragraph
  of its docstring, and per task configuration it ran on (``MethodRun``) its options, exactness
  claim with the reason when it does not claim, scope, parameter count (the point's ``params``
  row), force kind, implementation and environment;
* ``cards/tasks/<task>.json``: a ``TaskCard`` per task: what its trivial reference predicts, its
  floors, what a seed draws, the first paragraph of its docstring, and per options set
  (``TaskConfiguration``) its field types, groups, declared metrics, primary metric with direction
  and unit, the role of every metric its points report (``metric_roles``) and provenance;
* ``cards/metrics.json``: the ``MetricSpec`` of every metric the run's rows carry, as the
  catalogue of the writing process declared it (a plugin's metrics included), so a process
  without the plugin still knows their direction, unit and display name.

``CardStore`` writes them: the engine calls ``CardStore.add`` as it records each point (of a bench
that names a task: ``task`` and ``tune`` points), before the point's block is appended. Every
file is replaced atomically (temporary file + ``os.replace``), so a reader sees a whole card or
the one before; a file that does not parse (cut short, edited by hand) is ignored on read, the
reader falls back to what the rows carry (``runcards.cards_for``), and the next point rewrites it.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..benches.taskrun import claims_exactness
from ..core.registry import VARIANT_SEP, method_of
from ..datasets.base import Task
from ..methods.base import Method
from ..metrics.catalogue import PARAMS, STATUS, MetricSpec, find_metric, test_metric
from ..symmetry.fieldtypes import POINT, irreps
from .store import write_json_atomic

#: the version of the card layout written by this code
CARD_VERSION = 1
CARDS_DIR = "cards"
METHODS_DIR, TASKS_DIR, METRICS_FILE = "methods", "tasks", "metrics.json"

Row = dict[str, Any]
Options = dict[str, Any]
#: what a metric is to its task: ``primary`` (the task's first metric: ranks the verdict),
#: ``task`` (its other declared metrics), ``diagnostic`` (a method's own numbers on the test split,
#: ``Method.extra_metrics``), ``reference`` (the trivial predictor's and the floors' scores),
#: ``measurement`` (equivariance, throughput, ...: measured the same way on every task),
#: ``context`` (what qualifies the others: parameters, training and tuning numbers)
Role = Literal["primary", "task", "diagnostic", "reference", "measurement", "context"]
ROLES: tuple[str, ...] = ("primary", "task", "diagnostic", "reference", "measurement", "context")
#: the role of a metric by its catalogue family where its spec declares none (any other family: measurement)
FAMILY_ROLES: dict[str, Role] = {"test": "diagnostic", "trivial": "reference", "floor": "reference",
                                 "params": "context", "train": "context", "tune": "context", "curve": "measurement"}


class _Card(BaseModel):
    model_config = ConfigDict(extra="allow")


class MetricRef(_Card):
    """A metric named by a card, with what the catalogue of the writing process said of it."""

    name: str = Field(description="the metric's catalogue name (`test.<name>`)")
    display: str = Field(default="", description="its display name")
    direction: Literal["higher", "lower"] | None = Field(default=None, description="`higher` / `lower` is better")
    unit: str = Field(default="", description="its unit (empty: none)")


class MethodRun(_Card):
    """The method on one task configuration (task, task options, method options)."""

    task: str = Field(description="the task")
    task_options: Options = Field(default_factory=dict, description="the task's options")
    options: Options = Field(default_factory=dict, description="the method's options")
    not_applicable: str | None = Field(default=None, description="why the method cannot run this task (empty: it can)")
    exact_claim: bool | None = Field(default=None, description="whether the method claims exact equivariance here "
                                     "(`Method.exact_on`)")
    inexact_reason: str | None = Field(default=None, description="why it does not claim (`Method.inexact_reason`)")
    exact_scope: str | None = Field(default=None, description="where the claim holds: `every_input` or "
                                    "`generic_inputs` (`Method.exactness_scope`)")
    conservative_forces: bool | None = Field(default=None, description="whether its force predictions are −dE/dx")
    params: int | None = Field(default=None, description="trainable parameters, as measured (the point's `params` row)")
    implementation: str | None = Field(default=None, description="the code that ran it (`equibench <version>` or the "
                                       "library and its version), as the rows say")
    environment: str | None = Field(default=None, description="`main`, or the hash of its isolated environment")

    def same_configuration(self, other: MethodRun) -> bool:
        return (self.task, self.task_options, self.options) == (other.task, other.task_options, other.options)


class MethodCard(_Card):
    """What a run says about one method key."""

    card_version: int = Field(default=CARD_VERSION, description="version of the card layout")
    source: Literal["recorded", "synthesised"] = Field(default="recorded", description="`recorded` by the run, or "
                                                       "`synthesised` by the reader from the rows of a run stored "
                                                       "before cards")
    name: str = Field(description="the method key the rows carry (`<method>@<label>` for a suite variant)")
    method: str = Field(description="the registered method")
    label: str | None = Field(default=None, description="the variant label (empty: none)")
    origin: str = Field(default="equibench", description="`equibench` (our own) or the library whose model it wraps")
    implementation: str | None = Field(default=None, description="origin and version (`Method.implementation()`)")
    counterpart: str | None = Field(default=None, description="a library model: equibench's own method of the same "
                                    "construction (the report pairs them)")
    group: str | None = Field(default=None, description="the group it is equivariant to when exact")
    domains: list[str] = Field(default_factory=list, description="task domains it supports")
    exact_by_domain: dict[str, bool] = Field(default_factory=dict, description="declared exactness per domain")
    exact_scope_by_domain: dict[str, str] = Field(default_factory=dict, description="where the declared claim "
                                                  "holds, per domain where it claims")
    float32_caveat: str = Field(default="", description="the known float32 limit of its claim (empty: none)")
    wraps_backbone: bool | None = Field(default=None, description="whether it wraps the shared backbone (the "
                                        "report shows its time against the backbone's)")
    conservative_forces: bool | None = Field(default=None, description="whether the class predicts forces as −dE/dx")
    requirements: list[str] = Field(default_factory=list, description="pip requirements of its isolated "
                                    "environment (empty: the runner's)")
    description: str = Field(default="", description="the first paragraph of its docstring")
    runs: list[MethodRun] = Field(default_factory=list, description="per task configuration it ran on")

    def run_for(self, task: str, task_options: Options | None = None,
                options: Options | None = None) -> MethodRun | None:
        """The run entry of ``task`` (with these options when given; else the first on the task)."""
        found = [r for r in self.runs if r.task == task and (task_options is None or r.task_options == task_options)
                 and (options is None or r.options == options)]
        return found[0] if found else None


class TaskConfiguration(_Card):
    """A task with one set of options (a sweep value is a configuration of its own)."""

    options: Options = Field(default_factory=dict, description="the task's options")
    domain: str | None = Field(default=None, description="`graph3d` / `image2d`")
    group: str | None = Field(default=None, description="the symmetry the target obeys")
    broken_group: str | None = Field(default=None, description="the larger group its environment breaks (empty: none)")
    inputs: dict[str, str] | None = Field(default=None, description="input field types (e3nn irreps or `point`)")
    edge_inputs: dict[str, str] | None = Field(default=None, description="edge input field types")
    breaking_inputs: dict[str, str] | None = Field(default=None, description="field types of the symmetry-breaking "
                                                   "environment")
    output: str | None = Field(default=None, description="the output's field type")
    level: str | None = Field(default=None, description="`node` / `graph`")
    loss: str | None = Field(default=None, description="the training loss")
    metrics: list[str] = Field(default_factory=list, description="the task's declared metrics (`TaskSpec.metrics`)")
    primary: MetricRef | None = Field(default=None, description="the primary metric: the first declared, as "
                                      "`test.<name>`, with direction and unit")
    roles: dict[str, Role] = Field(default_factory=dict, description="every metric its points report (and its "
                                   "declared ones): " + ", ".join(f"`{r}`" for r in ROLES))
    provenance: Options | str | None = Field(default=None, description="where the data came from (`Task.provenance()`)")


class TaskCard(_Card):
    """What a run says about one task."""

    card_version: int = Field(default=CARD_VERSION, description="version of the card layout")
    source: Literal["recorded", "synthesised"] = Field(default="recorded", description="as for methods")
    name: str = Field(description="the task")
    description: str = Field(default="", description="the first paragraph of its docstring")
    trivial_reference: str = Field(default="", description="what its trivial predictor predicts (`trivial.*` rows)")
    floors: dict[str, str] = Field(default_factory=dict, description="its floors (`floor.*` rows) and what each "
                                   "predicts")
    seed_draws: str = Field(default="", description="what a run's seed draws in its data")
    configurations: list[TaskConfiguration] = Field(default_factory=list, description="per options set it ran with")

    def configuration(self, options: Options | None) -> TaskConfiguration | None:
        """The configuration with ``options`` (the first one when there is no exact match)."""
        match = [c for c in self.configurations if c.options == (options or {})]
        return match[0] if match else (self.configurations[0] if self.configurations else None)

    def roles(self) -> dict[str, Role]:
        """The roles of every configuration, the first configuration's where they differ."""
        out: dict[str, Role] = {}
        for c in self.configurations:
            for name, role in c.roles.items():
                out.setdefault(name, role)
        return out


# ---------------------------------------------------------------------------------------------
# building cards from the live method and task (the writing process)

def declared_role(spec: MetricSpec | None) -> Role:
    """The role the catalogue gives ``spec`` outside any task: its own ``role`` where the spec
    declares one, else by family (``FAMILY_ROLES``: a test-split number that is not a task's
    declared metric is a method's diagnostic); ``measurement`` for an undeclared name."""
    role = getattr(spec, "role", None)
    if role in ROLES and role != "primary":
        return role  # type: ignore[return-value]
    return FAMILY_ROLES.get(spec.family, "measurement") if spec is not None else "measurement"


def metric_roles(task: Task, reported: Iterable[str] = ()) -> dict[str, Role]:
    """The role of every metric of ``task``: its own metrics as the task declares them
    (``Task.metric_roles``, from ``Task.METRICS``: the first of ``spec.metrics`` ``primary``, the
    others ``task``, their trivial and floor twins ``reference``); every other name ``reported``
    by its points has the role the catalogue gives it (``declared_role``: a method's extra metric
    is a ``diagnostic``; equivariance, throughput, ... ``measurement``; parameters, training and
    tuning numbers ``context``). The one place a task's roles are assigned."""
    roles: dict[str, Role] = dict(task.metric_roles())
    for name in reported:
        if name not in roles and name != STATUS:
            roles[name] = declared_role(find_metric(name))
    return roles


def metric_ref(name: str) -> MetricRef:
    """``name`` with the catalogue's display name, direction and unit (bare when undeclared)."""
    spec = find_metric(name)
    if spec is None:
        return MetricRef(name=name, display=name)
    return MetricRef(name=name, display=spec.display, direction=spec.direction, unit=spec.unit)


def first_paragraph(obj: object) -> str:
    """The first paragraph of ``obj``'s own docstring, on one line ("" without one)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def trivial_description(task: Task) -> str:
    """What ``task``'s trivial predictor predicts: the first sentence of its own
    ``trivial_prediction`` docstring where the task overrides it, else the base rule for its
    output (``Task.trivial_prediction``): the majority class, the input positions, the training
    mean of the invariant components and zero for the rest."""
    own = type(task).trivial_prediction
    if own is not Task.trivial_prediction:
        first = " ".join((own.__doc__ or "").strip().split("\n\n")[0].split())
        return first.split(". ")[0].split(";")[0].rstrip(".:")
    spec = task.spec
    if spec.loss == "cross_entropy":
        return "The majority class of the training split"
    if spec.output == POINT:
        return "The input positions, i.e. no displacement"
    ls = {ir.l for _, ir in irreps(spec.output)}
    if ls == {0}:
        return "The training mean of the target"
    if 0 not in ls:
        return "Zero (the only constant an O(3)-equivariant map can output for l ≥ 1 fields)"
    return "The training mean of every invariant (l = 0) component and zero for every l ≥ 1 component"


def method_card(key: str, method: Method) -> MethodCard:
    """The card of the method ``method`` run under ``key`` (its facts as its class declares them)."""
    cls = type(method)
    domains = list(getattr(cls, "domains", ()))
    exact = {d: bool(method.is_exact(d)) for d in domains}
    return MethodCard(
        name=key, method=method_of(key), label=key.partition(VARIANT_SEP)[2] or None, origin=cls.origin,
        implementation=method.implementation(), counterpart=cls.counterpart, group=method.group, domains=domains,
        exact_by_domain=exact, exact_scope_by_domain={d: cls.exact_scope_by_domain.get(d, cls.exact_scope)
                                                      for d in domains if exact[d]},
        float32_caveat=cls.float32_caveat or "", wraps_backbone=bool(cls.wraps_backbone),
        conservative_forces=bool(getattr(cls, "conservative_forces", False)),
        requirements=list(cls.requirements or ()), description=first_paragraph(cls))


def _first(rows: list[Row], column: str) -> Any:
    return next((r[column] for r in rows if r.get(column) not in (None, "")), None)


def measured_params(rows: list[Row]) -> int | None:
    """The parameter count a point measured (its ``params`` row)."""
    value = next((r.get("value") for r in rows if r.get("metric") == PARAMS and r.get("value") is not None), None)
    return int(value) if value is not None else None


def method_run(method: Method, task: Task, identity: Row, rows: list[Row]) -> MethodRun:
    """What ``method`` is on ``task`` in the configuration of ``identity`` (measured facts from ``rows``)."""
    spec = task.spec
    exact = claims_exactness(method, spec)
    reason = None if exact else (method.inexact_reason(spec) if isinstance(method, Method) else
                                 f"{method_of(str(identity.get('method')))} is not equivariant by construction on "
                                 f"{spec.domain} tasks")
    return MethodRun(task=str(identity["task"]), task_options=dict(identity.get("task_options") or {}),
                     options=dict(identity.get("method_options") or {}), not_applicable=method.supports(spec),
                     exact_claim=exact, inexact_reason=reason,
                     exact_scope=method.exactness_scope(spec) if exact and isinstance(method, Method) else None,
                     conservative_forces=(bool(getattr(type(method), "conservative_forces", False))
                                          or getattr(method, "forces", None) == "conservative"),
                     params=measured_params(rows),
                     implementation=_first(rows, "implementation") or method.implementation(),
                     environment=_first(rows, "environment"))


def task_card(name: str, task: Task) -> TaskCard:
    """The card of ``task`` (registered as ``name``), without configurations."""
    cls = type(task)
    return TaskCard(name=name, description=first_paragraph(cls), trivial_reference=trivial_description(task),
                    floors={str(k): str(v) for k, v in (getattr(cls, "FLOORS", {}) or {}).items()},
                    seed_draws=str(getattr(cls, "SEED_DRAWS", "") or ""))


def task_configuration(task: Task, identity: Row, rows: list[Row]) -> TaskConfiguration:
    """``task`` with the options of ``identity``: its spec, roles of the metrics ``rows`` report."""
    spec = task.spec
    primary = test_metric(spec.metrics[0]) if spec.metrics else None
    return TaskConfiguration(
        options=dict(identity.get("task_options") or {}), domain=spec.domain, group=spec.group,
        broken_group=spec.broken_group, inputs=dict(spec.inputs), edge_inputs=dict(spec.edge_inputs),
        breaking_inputs=dict(spec.breaking_inputs), output=spec.output, level=spec.level, loss=spec.loss,
        metrics=list(spec.metrics), primary=metric_ref(primary) if primary else None,
        roles=metric_roles(task, [str(r["metric"]) for r in rows if r.get("metric")]),
        provenance=_first(rows, "provenance"))


# ---------------------------------------------------------------------------------------------
# the cards of a run directory on disk

def _file_name(key: str) -> str:
    """A file name for card ``key`` (the key itself when it is a safe name)."""
    safe = re.sub(r"[^A-Za-z0-9_.@+=-]", "_", key)
    if safe != key or safe.startswith("."):
        safe = f"{safe.lstrip('.')}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    return f"{safe}.json"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # cut short, not JSON, unreadable: the reader falls back to the rows
        return None


def metric_spec(data: Any) -> MetricSpec | None:
    """A stored ``MetricSpec`` (fields this code does not know are dropped; None when invalid)."""
    if not isinstance(data, dict):
        return None
    known = {f.name for f in fields(MetricSpec)}
    try:
        return MetricSpec(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ValueError):
        return None


@dataclass
class CardSet:
    """The cards of a run directory (or of several merged): method cards by key, task cards by
    name, metric specs by name."""

    methods: dict[str, MethodCard] = field(default_factory=dict)
    tasks: dict[str, TaskCard] = field(default_factory=dict)
    metrics: dict[str, MetricSpec] = field(default_factory=dict)


def _load(paths: Iterable[Path], model: type[_Card]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(paths):
        data = _read_json(path)
        if data is None:
            continue
        with contextlib.suppress(ValidationError):
            card = model.model_validate(data)
            out[card.name] = card  # type: ignore[attr-defined]
    return out


def read_cards(run_dir: str | Path) -> CardSet:
    """The cards stored in ``run_dir`` (empty for a run stored before cards); a file that does not
    parse or validate is left out."""
    root = Path(run_dir) / CARDS_DIR
    metrics = _read_json(root / METRICS_FILE)
    specs = {str(k): s for k, v in (metrics.items() if isinstance(metrics, dict) else [])
             if (s := metric_spec(v)) is not None}
    return CardSet(_load((root / METHODS_DIR).glob("*.json"), MethodCard),
                   _load((root / TASKS_DIR).glob("*.json"), TaskCard), specs)


class CardStore:
    """The cards of one run directory as its runner keeps them: read once, updated per point
    (``add``), each changed file written back atomically."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir) / CARDS_DIR
        self.cards = read_cards(run_dir)

    def has(self, identity: Row) -> bool:
        """Whether the cards already describe the point of ``identity`` (method run and task configuration)."""
        key, name = str(identity.get("method")), str(identity.get("task"))
        card, task = self.cards.methods.get(key), self.cards.tasks.get(name)
        options = dict(identity.get("task_options") or {})
        return (card is not None and card.run_for(name, options, dict(identity.get("method_options") or {}))
                is not None and task is not None and any(c.options == options for c in task.configurations))

    def add(self, identity: Row, rows: list[Row], method: Method | None, task: Task | None) -> None:
        """Describe the point of ``identity`` (its method key, task and options) that reported
        ``rows``, with its live ``method`` and ``task`` (None: that card is left as it is); write
        the files that changed."""
        key, name = str(identity.get("method")), str(identity.get("task"))
        if method is not None:
            card = self.cards.methods.get(key) or method_card(key, method)
            before = card.model_dump()
            if task is not None:
                _merge_run(card, method_run(method, task, identity, rows))
            self._save(self.cards.methods, METHODS_DIR, card, before)
        if task is not None:
            tcard = self.cards.tasks.get(name) or task_card(name, task)
            before = tcard.model_dump()
            _merge_configuration(tcard, task_configuration(task, identity, rows))
            self._save(self.cards.tasks, TASKS_DIR, tcard, before)
        new = {m: s for m in dict.fromkeys(str(r.get("metric")) for r in rows)
               if m not in self.cards.metrics and (s := find_metric(m)) is not None}
        if new:
            self.cards.metrics.update(new)
            self.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.root / METRICS_FILE, {k: asdict(v) for k, v in self.cards.metrics.items()})

    def _save(self, table: dict[str, Any], folder: str, card: MethodCard | TaskCard, before: dict[str, Any]) -> None:
        if table.get(card.name) is card and card.model_dump() == before:
            return
        table[card.name] = card
        (self.root / folder).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / folder / _file_name(card.name), card.model_dump(mode="json"))


def _merge_run(card: MethodCard, run: MethodRun) -> None:
    """Add ``run`` to ``card``, or fill what an earlier point of its configuration left open."""
    old = next((r for r in card.runs if r.same_configuration(run)), None)
    if old is None:
        card.runs.append(run)
        return
    for name in ("params", "implementation", "environment"):
        if getattr(old, name) is None and getattr(run, name) is not None:
            setattr(old, name, getattr(run, name))


def _merge_configuration(card: TaskCard, conf: TaskConfiguration) -> None:
    """Add ``conf`` to ``card``, or add the roles and provenance an earlier point did not report."""
    old = next((c for c in card.configurations if c.options == conf.options), None)
    if old is None:
        card.configurations.append(conf)
        return
    for name, role in conf.roles.items():
        old.roles.setdefault(name, role)
    if old.provenance is None:
        old.provenance = conf.provenance
