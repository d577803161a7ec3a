"""Suite files: YAML documents, validated by pydantic models, that expand into benches.

Schema (every key but ``tasks``/``methods`` optional)::

    name: quick
    description: one line
    seeds: [0, 1]
    device: cpu
    train: {steps: 300, batch_size: 100, lr: 5.0e-4}      # TrainConfig
    evaluate: {equivariance_samples: 8, ...}               # EvalConfig
    tasks: {nbody: {train_size: 3000}, normals: {}}        # task -> options (or a list of names)
    default_tasks: [nbody]                                  # run when no --tasks is given
    methods: {baseline: {params: 30000}, e3nn: {...}}       # method -> options (or a list)
    # the same method twice: a variant key <method>@<label> (the runs are <method> with those options)
    #   methods: {frame_averaging: {}, frame_averaging@field: {field_input: true}}
    task_overrides: {normals: {train: {...}, evaluate: {...}, methods: {e3nn: {...}}, only: [e3nn]}}
    sweeps:                                                 # extra specs varying one task option
      - {task: nbody, option: train_size, values: [100, 300, 1000]}   # e.g. sample efficiency
    scaling: {methods: [baseline, e3nn], nodes: [16, 256, 4096]}     # ScaleConfig options
    tp_bench: {lmax: [1, 2, 3], impls: [e3nn, gaunt]}                # TPBenchConfig options
    tuning: {grid: {lr: [3.0e-3, 1.0e-3, 3.0e-4]}, seeds: [0], use: stored}   # TuningConfig options

``suite_benches`` turns a suite into the benches the runner drives: the task runs (tasks x
methods x seeds, sweeps added) and, after them, the ``scaling`` and ``tp_bench`` sections on the
suite's device. A run narrowed with ``tasks``/``methods`` skips those sections unless
``extras=True``. Any problem is one ``UserError`` line naming the file.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import PrivateAttr, ValidationError, field_validator, model_validator

from ..benches.base import Bench
from ..benches.scaling import ScaleConfig, ScalingBench
from ..benches.taskrun import EvalConfig, TaskBench
from ..benches.tp_bench import TPBench, TPBenchConfig
from ..benches.training import TrainConfig
from ..benches.tuning import TuneBench, TuningConfig
from ..core.config import Config, config_from_dict, one_line
from ..core.errors import UserError, did_you_mean
from ..core.registry import VARIANT_SEP, list_methods, list_tasks, method_of
from ..core.spec import RunSpec
from .tuned import SUFFIX, Selection, apply_selection, read_tuned, stored_selection, tuned_path

Options = dict[str, Any]
EXTRA_SECTIONS: dict[str, tuple[type[Config], type[Bench]]] = {"scaling": (ScaleConfig, ScalingBench),
                                                               "tp_bench": (TPBenchConfig, TPBench)}


def _named_options(value: Any) -> Any:
    """A list of names is shorthand for names with default options; ``name:`` (null) too."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return {v: {} for v in value}
    if isinstance(value, dict):
        return {k: ({} if v is None else v) for k, v in value.items()}
    return value


class Sweep(Config):
    """Extra specs varying one task option (e.g. ``train_size`` for sample efficiency)."""

    task: str
    option: str
    values: tuple[Any, ...]

    @field_validator("values")
    @classmethod
    def _non_empty(cls, v: tuple[Any, ...]) -> tuple[Any, ...]:
        if not v:
            raise ValueError("a sweep needs at least one value")
        return v


class TaskOverride(Config):
    """Per-task changes to the suite's train / evaluate settings and method options; ``only``:
    the suite's method keys that run on this task (default: all of them)."""

    train: Options = {}
    evaluate: Options = {}
    methods: dict[str, Options] = {}
    only: tuple[str, ...] | None = None


class PublishedValue(Config):
    """A published figure: its value, the name the paper uses and where it is printed."""

    value: float
    label: str = ""
    source: str


class Published(Config):
    """Published numbers to hold a suite's results against (the report tables them side by side)."""

    task: str
    metric: str
    protocol: str = ""
    values: dict[str, PublishedValue]


class SuiteFile(Config):
    """A validated suite document (the module docstring gives the schema)."""

    name: str
    description: str = ""
    seeds: tuple[int, ...] = (0,)
    device: str = "cpu"
    train: Options = {}
    evaluate: Options = {}
    tasks: dict[str, Options]
    default_tasks: tuple[str, ...] = ()
    methods: dict[str, Options]
    task_overrides: dict[str, TaskOverride] = {}
    sweeps: tuple[Sweep, ...] = ()
    scaling: Options | None = None
    tp_bench: Options | None = None
    tuning: Options | None = None
    published: Published | None = None
    _source: str = PrivateAttr(default="")

    @property
    def source(self) -> str:
        """The suite's name (built-in) or file path it was read from."""
        return self._source or self.name

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key in ("tasks", "methods"):
                if key in data:
                    data[key] = _named_options(data[key])
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SuiteFile:
        if not self.seeds:
            raise ValueError("'seeds' must be a non-empty list of integers")
        for key in self.methods:
            base, _, label = key.partition(VARIANT_SEP)
            if not base or (VARIANT_SEP in key and not label):
                raise ValueError(f"method key {key!r}: a variant is written <method>{VARIANT_SEP}<label>")
        for what, names in (("default_tasks", self.default_tasks), ("sweeps", [w.task for w in self.sweeps]),
                            ("task_overrides", list(self.task_overrides))):
            unknown = [n for n in names if n not in self.tasks]
            if unknown:
                raise ValueError(f"'{what}' names task(s) {unknown} that are not in 'tasks'")
        for task, over in self.task_overrides.items():
            unknown = [m for m in over.only or () if m not in self.methods]
            if unknown:
                raise ValueError(f"task_overrides.{task}.only names method(s) {unknown} that are not in 'methods'")
        return self

    def section(self, name: str) -> Options | None:
        """The options of extra section ``name`` (``scaling`` / ``tp_bench``), if present."""
        return getattr(self, name)


def list_suites() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("equibench.suites").iterdir()
                  if p.name.endswith(".yaml") and not p.name.endswith(SUFFIX))  # <suite>.tuned.yaml: settings


def _load_text(name_or_path: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(YAML text, where it came from for messages, default name)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"suite file not found: {path}")
        return path.read_text(), str(path), path.stem
    if str(name_or_path) not in list_suites():
        raise did_you_mean("suite", str(name_or_path), list_suites())
    return (resources.files("equibench.suites") / f"{name_or_path}.yaml").read_text(), f"suite {name_or_path!r}", \
        str(name_or_path)


def read_suite(name_or_path: str | os.PathLike[str]) -> SuiteFile:
    """Parse and validate a suite by name (``equibench/suites/<name>.yaml``) or file path."""
    text, where, default_name = _load_text(name_or_path)
    source = str(name_or_path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        loc = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"malformed suite file {where}{loc}: {getattr(err, 'problem', err)}") from None
    suite = validate_suite(doc, where, default_name)
    suite._source = source
    return suite


def validate_suite(doc: Any, where: str = "suite", default_name: str = "suite") -> SuiteFile:
    """``doc`` (a parsed YAML mapping) as a ``SuiteFile``, its train / evaluate settings and extra
    sections checked too; any problem is one ``UserError`` line."""
    if not isinstance(doc, dict):
        raise UserError(f"malformed suite file {where}: expected a mapping at the top level")
    for key in ("tasks", "methods"):
        if key not in doc:
            raise UserError(f"malformed suite file {where}: missing '{key}'")
    try:
        suite = SuiteFile.model_validate({"name": default_name, **doc})
    except ValidationError as err:
        raise UserError(f"malformed suite file {where}: {one_line(err, 'suite', SuiteFile)}") from None
    except ValueError as err:
        raise UserError(f"malformed suite file {where}: {err}") from None
    try:
        for over in [None, *suite.task_overrides.values()]:
            TrainConfig.from_dict({**suite.train, **(over.train if over else {})})
            EvalConfig.from_dict({**suite.evaluate, **(over.evaluate if over else {})})
        for section in EXTRA_SECTIONS:
            extra_config(suite, section, "cpu")  # a CUDA suite validates on a machine without a GPU
        tuning_config(suite)
    except UserError as err:
        raise UserError(f"malformed suite file {where}: {err}") from None
    return suite


def extra_config(suite: SuiteFile, section: str, device: str) -> Config | None:
    """The validated config of extra section ``section`` on ``device`` (None when absent)."""
    options = suite.section(section)
    if options is None:
        return None
    if "device" in options:
        raise UserError(f"'{section}' runs on the suite's device; remove its 'device' option")
    cls: type[Config] = EXTRA_SECTIONS[section][0]
    return config_from_dict(cls, {**options, "device": device}, section)


def tuning_config(suite: SuiteFile) -> TuningConfig | None:
    """The suite's validated ``tuning:`` section (None when absent)."""
    if suite.tuning is None:
        return None
    cfg = config_from_dict(TuningConfig, suite.tuning, "tuning")
    if cfg.use not in ("stored", "run", "off"):
        raise UserError(f"tuning option 'use' must be stored, run or off, got {cfg.use!r}")
    if not cfg.grid or any(not v for v in cfg.grid.values()):
        raise UserError("tuning option 'grid' needs at least one option with at least one value")
    for key in cfg.grid:
        TrainConfig.from_dict({key: cfg.grid[key][0]})  # a grid key is a train option of the right type
    return cfg


def tuning_bench(suite: SuiteFile, tasks: list[str] | None = None, methods: list[str] | None = None,
                 device: str | None = None) -> TuneBench | None:
    """The tuning runs of ``suite`` (None without a ``tuning:`` section)."""
    cfg = tuning_config(suite)
    if cfg is None:
        return None
    return TuneBench(expand_suite(suite, tasks, methods, None, device), cfg)


def _pick(names: list[str] | None, available: dict[str, Any], what: str) -> list[str]:
    if names is None:
        return list(available)
    known = list_tasks() if what == "task" else list_methods()
    picked: list[str] = []
    for n in names:
        variants = [k for k in available if what == "method" and method_of(k) == n and k != n]
        if n not in available and n not in known and not variants:
            raise did_you_mean(what, n, known)
        if n in available or not variants:
            picked.append(n)  # registered but not in the suite: run with default options
        picked += variants  # a method's name selects its variants (<method>@<label>) too
    return list(dict.fromkeys(picked))


def expand_suite(suite: SuiteFile, tasks: list[str] | None = None, methods: list[str] | None = None,
                 seeds: list[int] | None = None, device: str | None = None) -> list[RunSpec]:
    """The cartesian product tasks x methods x seeds as ``RunSpec`` (filters/overrides applied); a
    variant key ``<method>@<label>`` runs ``<method>`` with the variant's options, and its rows
    carry the whole key as their ``method`` (so reports keep the variants apart)."""
    task_names = _pick(tasks, suite.tasks, "task") if tasks else list(suite.default_tasks or suite.tasks)
    method_names = _pick(methods, suite.methods, "method")
    variants = [(t, suite.tasks.get(t, {})) for t in task_names]
    for sweep in suite.sweeps:
        if sweep.task in task_names:
            variants += [(sweep.task, {**suite.tasks[sweep.task], sweep.option: v}) for v in sweep.values]
    specs = []
    for task, task_options in variants:
        over = suite.task_overrides.get(task, TaskOverride())
        train = {**suite.train, **over.train}
        evaluate = {**suite.evaluate, **over.evaluate}
        for key in method_names:
            if over.only is not None and key not in over.only:
                continue
            m_opts = {**suite.methods.get(key, {}), **over.methods.get(key, {})}
            for seed in seeds or suite.seeds:
                specs.append(RunSpec(task=task, method=key, seed=seed, task_options=task_options,
                                     method_options=m_opts, train=train, evaluate=evaluate,
                                     device=device or suite.device))
    return list(dict.fromkeys(specs))  # a sweep value equal to the base option is the same spec


def suite_benches(suite: SuiteFile, tasks: list[str] | None = None, methods: list[str] | None = None,
                  seeds: list[int] | None = None, device: str | None = None,
                  extras: bool | None = None, selection: Selection | None = None,
                  selection_source: str = "") -> list[Bench]:
    """The benches a run of ``suite`` drives, in order: task runs, then the extra sections (when
    ``extras`` is True, or None and neither ``tasks`` nor ``methods`` narrows the suite).

    Tuned settings: ``selection`` (chosen in this run) when given, else with ``tuning.use:
    stored`` the suite's stored ``.tuned.yaml`` when it exists; each spec records where its
    settings came from."""
    specs = expand_suite(suite, tasks, methods, seeds, device)
    cfg = tuning_config(suite)
    if cfg is not None and selection is None and cfg.use == "stored":
        doc = read_tuned(tuned_path(suite.source))
        if doc is not None:
            selection, selection_source = stored_selection(doc, sorted(cfg.grid))
            selection_source += f" in {tuned_path(suite.source).name}"
    if cfg is not None and selection:
        specs = apply_selection(specs, selection, selection_source, dict(cfg.grid))
    benches: list[Bench] = [TaskBench(specs)]
    if extras or (extras is None and tasks is None and methods is None):
        for section, (_, bench_cls) in EXTRA_SECTIONS.items():
            extra = extra_config(suite, section, device or suite.device)
            if extra is not None:
                benches.append(bench_cls(extra))  # type: ignore[call-arg]
    return benches
