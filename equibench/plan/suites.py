"""Suite files: YAML documents, validated by pydantic models, that expand into benches.

Schema (every key but ``tasks``/``methods`` optional)::

    name: quick
    description: one line
    purpose: verdict       # smoke | quick | verdict (default) | paper | sweep | reference (``Purpose``)
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
    compare: {method: e3nn_nequip, option: tensor_product, baseline: cg}   # the report's variant pairs
    # (variants of ``method`` that differ in ``option`` alone, side by side against ``baseline``)
    scale: smoke        # a task or method the suite does not configure runs at its ``smoke_options``

A run may add task and method options from the command line (``--task-option qm9.train_size=64``,
``--method-option egnn.params=5000``: ``expand_suite``'s ``task_options`` / ``method_options``);
they win over the suite file and are validated like it. ``resolved_configs`` tells, per (task,
method), every option's value and where it came from (default, the suite's scale, suite file,
sweep, tuning, command line); the runner prints it and stores it as ``resolved.json``.

``suite_benches`` turns a suite into the benches the runner drives: the task runs (tasks x
methods x seeds, sweeps added) and, after them, the ``scaling`` and ``tp_bench`` sections on the
suite's device. A run narrowed with ``tasks``/``methods`` skips those sections unless
``extras=True``. Any problem is one ``UserError`` line naming the file, the line where the
offending key is (YAML node marks) and the closest valid name.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import PrivateAttr, ValidationError, field_validator, model_validator

from ..benches.base import Bench
from ..benches.scaling import ScaleConfig, ScalingBench
from ..benches.taskrun import EvalConfig, TaskBench
from ..benches.tp_bench import TPBench, TPBenchConfig
from ..benches.training import TrainConfig
from ..benches.tuning import TuneBench, TuningConfig
from ..core.config import Config, config_from_dict, one_line
from ..core.errors import UserError, closest, did_you_mean
from ..core.registry import (
    VARIANT_SEP,
    list_methods,
    list_tasks,
    method_class,
    method_of,
    options_model,
    task_class,
    validate_options,
)
from ..core.spec import RunSpec
from .tuned import SUFFIX, Selection, apply_selection, read_tuned, stored_selection, tuned_path

Options = dict[str, Any]
#: a key's place in a suite document (("methods", "e3nn", "mul")) -> its 1-based line in the file
Lines = dict[tuple[str, ...], int]
#: what a suite's run is for (``purpose:``; the report's first line and its ranking follow it):
#: smoke = a pipeline check (never ranked), quick = a fixed-budget screening run (ranked, at that
#: budget only), verdict = a measurement to decide on (the default), paper = a published protocol,
#: sweep = curves over one parameter, reference = our implementations beside their libraries'
Purpose = Literal["smoke", "quick", "verdict", "paper", "sweep", "reference"]
#: a suite's bench sections besides its task runs, named by the bench kind they add
EXTRA_SECTIONS: dict[str, tuple[type[Config], type[Bench]]] = {ScalingBench.kind: (ScaleConfig, ScalingBench),
                                                               TPBench.kind: (TPBenchConfig, TPBench)}


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


class Compare(Config):
    """Variants of one method compared on one option (the report's variant-pair table,
    ``report.variants``): the suite's keys ``<method>@<label>`` of ``method`` that differ in
    ``option`` alone are paired, each value against ``baseline`` (a variant that does not set
    ``option`` runs at the option's default)."""

    method: str
    option: str
    baseline: Any


class SuiteFile(Config):
    """A validated suite document (the module docstring gives the schema)."""

    name: str
    description: str = ""
    purpose: Purpose = "verdict"
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
    compare: Compare | None = None
    scale: Literal["smoke"] | None = None
    _source: str = PrivateAttr(default="")
    _where: str = PrivateAttr(default="")
    _lines: Lines = PrivateAttr(default_factory=dict)

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
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"'seeds' must be a non-empty list of non-negative integers, got {list(self.seeds)}")
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

    def at(self, *path: str) -> str:
        """Where the key at ``path`` is, for messages: ``"suite file x.yaml, line 7"`` (the
        deepest ancestor of ``path`` whose line is known; the file alone when none is)."""
        return _at(self._where or f"suite {self.source!r}", self._lines, *path)


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
    packaged = resources.files("equibench.suites") / f"{name_or_path}.yaml"
    return packaged.read_text(), str(packaged), str(name_or_path)


def key_lines(text: str) -> Lines:
    """The 1-based line of every mapping key of the YAML document ``text``, by its path
    (sequence items by their index); empty when ``text`` does not compose."""
    lines: Lines = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                here = (*path, str(k.value))
                lines.setdefault(here, k.start_mark.line + 1)
                walk(v, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines.setdefault((*path, str(i)), v.start_mark.line + 1)
                walk(v, (*path, str(i)))
    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:
        return {}
    return lines


def read_suite(name_or_path: str | os.PathLike[str]) -> SuiteFile:
    """Parse and validate a suite by name (``equibench/suites/<name>.yaml``) or file path."""
    text, where, default_name = _load_text(name_or_path)
    source = str(name_or_path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        loc = f", line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"malformed suite file {where}{loc}: {getattr(err, 'problem', err)}") from None
    suite = validate_suite(doc, where, default_name, key_lines(text))
    suite._source = source
    return suite


def _at(where: str, lines: Lines, *path: Any) -> str:
    """``where`` with the line of the deepest ancestor of ``path`` that ``lines`` knows."""
    for n in range(len(path), 0, -1):
        line = lines.get(tuple(map(str, path[:n])))
        if line is not None:
            return f"{where}, line {line}"
    return where


def _first_bad_key(check: Any, options: Options) -> str | None:
    """The first key of ``options`` that ``check`` rejects on its own (None: only together)."""
    for k, v in options.items():
        try:
            check({k: v})
        except UserError:
            return str(k)
    return None


def validate_suite(doc: Any, where: str = "suite", default_name: str = "suite",
                   lines: Lines | None = None) -> SuiteFile:
    """``doc`` (a parsed YAML mapping) as a ``SuiteFile``, its train / evaluate settings and extra
    sections checked too; any problem is one ``UserError`` line naming ``where`` (the file), the
    line of the offending key when ``lines`` (``key_lines``) knows it, and the closest valid name."""
    lines = lines or {}

    def at(*path: Any) -> str:
        return _at(where, lines, *path)
    if not isinstance(doc, dict):
        raise UserError(f"malformed suite file {where}: expected a mapping at the top level")
    unknown = [k for k in doc if k not in SuiteFile.model_fields]
    if unknown:
        k = str(unknown[0])
        raise UserError(f"malformed suite file {at(k)}: unknown top-level key {k!r}{closest(k, SuiteFile.model_fields)}"
                        f" (known: {', '.join(SuiteFile.model_fields)})")
    for key in ("tasks", "methods"):
        if key not in doc:
            raise UserError(f"malformed suite file {where}: missing '{key}'")
    try:
        suite = SuiteFile.model_validate({"name": default_name, **doc})
    except ValidationError as err:
        loc = err.errors()[0].get("loc", ())
        raise UserError(f"malformed suite file {at(*loc)}: {one_line(err, 'suite', SuiteFile)}") from None
    except ValueError as err:
        raise UserError(f"malformed suite file {where}: {err}") from None
    for name, over in [("", None), *suite.task_overrides.items()]:
        prefix: tuple[str, ...] = ("task_overrides", name) if over else ()
        for section, cls, base, extra in (("train", TrainConfig, suite.train, over.train if over else {}),
                                          ("evaluate", EvalConfig, suite.evaluate, over.evaluate if over else {})):
            try:
                cls.from_dict({**base, **extra})
            except UserError as err:
                bad = _first_bad_key(cls.from_dict, extra) or _first_bad_key(cls.from_dict, base)
                path = (*prefix, section, bad) if bad is not None and bad in extra else (section, bad or "")
                raise UserError(f"malformed suite file {at(*path)}: {err}") from None
    try:
        for section in EXTRA_SECTIONS:
            extra_config(suite, section, "cpu")  # a CUDA suite validates on a machine without a GPU
        tuning_config(suite)
    except UserError as err:
        raise UserError(f"malformed suite file {where}: {err}") from None
    if suite.compare is not None:
        check_compare(suite.compare, suite.methods, at)
    suite._where, suite._lines = where, dict(lines)
    return suite


_NO_DEFAULT = object()


def _option_default(method: str, option: str) -> Any:
    """The default of ``method``'s ``option`` (``_NO_DEFAULT`` when it has none or is no option)."""
    field = options_model(method_class(method)).model_fields.get(option)
    return _NO_DEFAULT if field is None or field.is_required() else field.default


def check_compare(compare: Compare, methods: dict[str, Options], at: Callable[..., str]) -> None:
    """``compare`` fits the suite's ``methods``: two or more keys of ``compare.method``, some of
    which set ``compare.option``, one running at ``compare.baseline``, and at least one pair that
    differs in that option alone; otherwise one ``UserError`` line (``at(*path)``: where a key is)."""
    c = compare
    keys = [k for k in methods if method_of(k) == c.method]
    if len(keys) < 2:
        bases = sorted({method_of(k) for k in methods} - {c.method})
        raise UserError(f"malformed suite file {at('compare', 'method')}: compare.method {c.method!r} has "
                        f"{len(keys)} entr{'y' if len(keys) == 1 else 'ies'} in 'methods', a comparison needs two or "
                        f"more (<method>{VARIANT_SEP}<label>){closest(c.method, bases)}")
    if not any(c.option in methods[k] for k in keys):
        known = sorted({o for k in keys for o in methods[k]})
        raise UserError(f"malformed suite file {at('compare', 'option')}: compare.option {c.option!r} is set by no "
                        f"variant of {c.method} in 'methods'{closest(c.option, known)} (they set: "
                        f"{', '.join(known) or 'nothing'})")
    try:
        default = _option_default(c.method, c.option)
    except UserError as err:
        raise UserError(f"malformed suite file {at('compare', 'method')}: {err}") from None
    values = {k: methods[k].get(c.option, default) for k in keys}
    if c.baseline not in values.values():
        shown = ", ".join(dict.fromkeys(repr(v) for v in values.values() if v is not _NO_DEFAULT))
        raise UserError(f"malformed suite file {at('compare', 'baseline')}: compare.baseline {c.baseline!r}: no "
                        f"variant of {c.method} runs with {c.option} {c.baseline!r} (they run with: {shown})")
    rest = {k: json.dumps({o: v for o, v in methods[k].items() if o != c.option}, sort_keys=True, default=str)
            for k in keys}
    if not any(values[a] == c.baseline and rest[a] == rest[b] and values[b] != c.baseline for a in keys for b in keys):
        raise UserError(f"malformed suite file {at('compare')}: compare: no variant of {c.method} differs from one "
                        f"at {c.option} {c.baseline!r} in {c.option} alone")


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
    if len(set(cfg.seeds)) < 2:
        raise UserError(f"tuning option 'seeds' needs at least two seeds (the choice is made on their mean), "
                        f"got {list(cfg.seeds)}")
    if cfg.max_extensions < 0 or cfg.extend_factor <= 1.0:
        raise UserError("tuning options: max_extensions must be >= 0 and extend_factor > 1")
    if cfg.max_extensions and len(cfg.grid) != 1:
        raise UserError("tuning: grid extension works on a one-option grid (e.g. {lr: [...]}); "
                        "set max_extensions: 0 for a grid of several options")
    if cfg.max_extensions and any(v <= 0 for vals in cfg.grid.values() for v in vals):
        raise UserError("tuning: an extending grid is log-spaced and needs positive values")
    return cfg


def tuning_bench(suite: SuiteFile, tasks: list[str] | None = None, methods: list[str] | None = None,
                 device: str | None = None, task_options: dict[str, Options] | None = None,
                 method_options: dict[str, Options] | None = None) -> TuneBench | None:
    """The tuning runs of ``suite`` (None without a ``tuning:`` section)."""
    cfg = tuning_config(suite)
    if cfg is None:
        return None
    return TuneBench(expand_suite(suite, tasks, methods, None, device, task_options, method_options), cfg)


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


#: where an option's value came from, in the order the layers apply (later wins)
DEFAULT, SUITE, SWEEP, TUNING, COMMAND_LINE = "default", "suite file", "sweep", "tuning", "command line"
Sources = dict[str, dict[str, str]]


def _scale_source(suite: SuiteFile) -> str:
    return f"{suite.scale} scale"


Layer = tuple[str, Callable[[str], str], Options]


def _merge(kind: str, cls: type[Any], layers: list[Layer]) -> tuple[Options, dict[str, str]]:
    """Options of a ``kind`` (class ``cls``) merged from ``layers`` (source, where key ``k`` was
    set for messages, options; later wins), each key validated on its own against
    ``cls.__init__``; a bad key is one ``UserError`` line naming where it was set and the
    closest valid option."""
    merged: Options = {}
    sources: dict[str, str] = {}
    for source, where, options in layers:
        for k, v in options.items():
            try:
                validate_options(cls, kind, {k: v})
            except UserError as err:
                raise UserError(f"{where(k)}: {err}") from None
            merged[k], sources[k] = v, source
    return merged, sources


def _command_line(kind: str, given: dict[str, Options], run: list[str]) -> None:
    """Every ``--task-option``/``--method-option`` names a task/method this run runs."""
    for name in given:
        if name not in run and not (kind == "method" and any(method_of(k) == name for k in run)):
            raise UserError(f"--{kind}-option {name}.…: {kind} {name!r} is not in this run{closest(name, run)} "
                            f"({kind}s: {', '.join(run)})")


MEASURE_ONCE_SOURCE = "planner (measure_once: the first seed's point measures throughput, memory, FLOPs)"


def once_per_configuration(evaluate: Options, sources: dict[str, str],
                           seeds: list[int]) -> tuple[Options, dict[str, str]]:
    """``evaluate`` with ``architecture_seed`` set to the first of ``seeds`` when ``measure_once``
    (EvalConfig's default) holds and the settings do not name it: only that seed's point measures
    what does not depend on the seed (throughput, memory, FLOPs)."""
    if not evaluate.get("measure_once", True) or "architecture_seed" in evaluate or not seeds:
        return evaluate, sources
    return {**evaluate, "architecture_seed": seeds[0]}, {**sources, "architecture_seed": MEASURE_ONCE_SOURCE}


def _expand(suite: SuiteFile, tasks: list[str] | None = None, methods: list[str] | None = None,
            seeds: list[int] | None = None, device: str | None = None, task_options: dict[str, Options] | None = None,
            method_options: dict[str, Options] | None = None) -> list[tuple[RunSpec, Sources]]:
    """``expand_suite`` with, per spec, where each of its options came from."""
    task_names = _pick(tasks, suite.tasks, "task") if tasks else list(suite.default_tasks or suite.tasks)
    method_names = _pick(methods, suite.methods, "method")
    cli_tasks, cli_methods = task_options or {}, method_options or {}
    _command_line("task", cli_tasks, task_names)
    _command_line("method", cli_methods, method_names)

    def cli_at(kind: str, name: str) -> Callable[[str], str]:
        return lambda k: f"command line (--{kind}-option {name}.{k})"

    def suite_at(*path: str) -> Callable[[str], str]:
        return lambda k: f"suite file {suite.at(*path, k)}"

    def smoke_at(cls: type[Any]) -> Callable[[str], str]:
        return lambda k: f"{cls.__module__}.{cls.__name__}.smoke_options"
    variants: list[tuple[str, Options, dict[str, str]]] = []
    for t in task_names:
        try:
            cls = task_class(t)
        except UserError as err:
            raise UserError(f"suite file {suite.at('tasks', t)}: {err}") from None
        layers: list[Layer] = []
        if t not in suite.tasks and suite.scale:
            layers.append((_scale_source(suite), smoke_at(cls), dict(getattr(cls, "smoke_options", {}))))
        layers.append((SUITE, suite_at("tasks", t), suite.tasks.get(t, {})))
        sweeps = [(i, {w.option: v}) for i, w in enumerate(suite.sweeps) if w.task == t for v in w.values]
        cli: Layer = (COMMAND_LINE, cli_at("task", t), cli_tasks.get(t, {}))
        for i, extra in [(-1, {}), *sweeps]:
            opts, src = _merge("task", cls, [*layers, (SWEEP, suite_at("sweeps", str(i)), extra), cli])
            variants.append((t, opts, src))
    out: list[tuple[RunSpec, Sources]] = []
    for task, t_opts, t_src in variants:
        over = suite.task_overrides.get(task, TaskOverride())
        train = {**suite.train, **over.train}
        evaluate = {**suite.evaluate, **over.evaluate}
        over_src = f"{SUITE} (task_overrides.{task})"
        train_src = {**{k: SUITE for k in suite.train}, **{k: over_src for k in over.train}}
        eval_src = {**{k: SUITE for k in suite.evaluate}, **{k: over_src for k in over.evaluate}}
        run_seeds = list(seeds or suite.seeds)
        evaluate, eval_src = once_per_configuration(evaluate, eval_src, run_seeds)
        for key in method_names:
            if over.only is not None and key not in over.only:
                continue
            try:
                cls = method_class(key)
            except UserError as err:
                raise UserError(f"suite file {suite.at('methods', key)}: {err}") from None
            layers = []
            if key not in suite.methods and suite.scale:
                layers.append((_scale_source(suite), smoke_at(cls), dict(getattr(cls, "smoke_options", {}))))
            layers += [(SUITE, suite_at("methods", key), suite.methods.get(key, {})),
                       (over_src, suite_at("task_overrides", task, "methods", key), over.methods.get(key, {})),
                       (COMMAND_LINE, cli_at("method", method_of(key)),
                        cli_methods.get(method_of(key), {}) if key != method_of(key) else {}),
                       (COMMAND_LINE, cli_at("method", key), cli_methods.get(key, {}))]
            m_opts, m_src = _merge("method", cls, layers)
            for seed in run_seeds:
                spec = RunSpec(task=task, method=key, seed=seed, task_options=t_opts, method_options=m_opts,
                               train=train, evaluate=evaluate, device=device or suite.device)
                out.append((spec, {"task_options": t_src, "method_options": m_src, "train": train_src,
                                   "evaluate": eval_src}))
    first: dict[str, tuple[RunSpec, Sources]] = {}
    for spec, sources in out:
        first.setdefault(spec.hash, (spec, sources))  # a sweep value equal to the base option is the same spec
    return list(first.values())


def expand_suite(suite: SuiteFile, tasks: list[str] | None = None, methods: list[str] | None = None,
                 seeds: list[int] | None = None, device: str | None = None,
                 task_options: dict[str, Options] | None = None,
                 method_options: dict[str, Options] | None = None) -> list[RunSpec]:
    """The cartesian product tasks x methods x seeds as ``RunSpec`` (filters/overrides applied); a
    variant key ``<method>@<label>`` runs ``<method>`` with the variant's options, and its rows
    carry the whole key as their ``method`` (so reports keep the variants apart).

    Options apply in layers, later winning: the suite's ``scale`` (a task or method the suite
    does not configure gets its class's ``smoke_options`` when ``scale: smoke``), the suite file
    (``tasks``/``methods``, then ``task_overrides``), sweeps, then ``task_options`` /
    ``method_options`` (the command line: task -> options, method or variant key -> options; a
    method's name also sets its variants). Every key is validated where it is set."""
    return [s for s, _ in _expand(suite, tasks, methods, seeds, device, task_options, method_options)]


def suite_benches(suite: SuiteFile, tasks: list[str] | None = None, methods: list[str] | None = None,
                  seeds: list[int] | None = None, device: str | None = None,
                  extras: bool | None = None, selection: Selection | None = None,
                  selection_source: str = "", task_options: dict[str, Options] | None = None,
                  method_options: dict[str, Options] | None = None) -> list[Bench]:
    """The benches a run of ``suite`` drives (``plan`` without the resolved configuration)."""
    return plan(suite, tasks, methods, seeds, device, extras, selection, selection_source, task_options,
                method_options)[0]


def plan(suite: SuiteFile, tasks: list[str] | None = None, methods: list[str] | None = None,
         seeds: list[int] | None = None, device: str | None = None,
         extras: bool | None = None, selection: Selection | None = None,
         selection_source: str = "", task_options: dict[str, Options] | None = None,
         method_options: dict[str, Options] | None = None) -> tuple[list[Bench], list[dict[str, Any]]]:
    """The benches a run of ``suite`` drives, in order: task runs, then the extra sections (when
    ``extras`` is True, or None and neither ``tasks`` nor ``methods`` narrows the suite); and the
    resolved configuration of its task runs (``resolved_configs``).

    Tuned settings: ``selection`` (chosen in this run) when given, else with ``tuning.use:
    stored`` the suite's stored ``.tuned.yaml`` when it exists; each spec records where its
    settings came from."""
    pairs = _expand(suite, tasks, methods, seeds, device, task_options, method_options)
    specs = [spec for spec, _ in pairs]
    cfg = tuning_config(suite)
    if cfg is not None and selection is None and cfg.use == "stored":
        doc = read_tuned(tuned_path(suite.source))
        if doc is not None:
            selection, selection_source = stored_selection(doc, sorted(cfg.grid))
            selection_source += f" in {tuned_path(suite.source).name}"
    if cfg is not None and selection:
        specs = apply_selection(specs, selection, selection_source, dict(cfg.grid))  # one to one, in order
        for (spec, src), tuned in zip(pairs, specs):
            src["train"].update({k: TUNING for k, v in tuned.train.items() if spec.train.get(k, v) != v
                                 or (tuned.setting_source and k in cfg.grid)})
    resolved = resolved_configs(suite, [(spec, src) for spec, (_, src) in zip(specs, pairs)])
    benches: list[Bench] = [TaskBench(specs)]
    if extras or (extras is None and tasks is None and methods is None):
        for section, (_, bench_cls) in EXTRA_SECTIONS.items():
            extra = extra_config(suite, section, device or suite.device)
            if extra is not None:
                benches.append(bench_cls(extra))  # type: ignore[call-arg]
    return benches, resolved


def _defaults(model: type[Any]) -> Options:
    """The default of every option of a pydantic model that has one."""
    return {k: f.default for k, f in model.model_fields.items() if not f.is_required()}


def _with_sources(values: Options, sources: dict[str, str], defaults: Options) -> dict[str, dict[str, Any]]:
    out = {k: {"value": v, "source": DEFAULT} for k, v in defaults.items()}
    out.update({k: {"value": v, "source": sources.get(k, DEFAULT)} for k, v in values.items()})
    return json.loads(json.dumps(out, default=str))  # plain JSON values (tuples as lists)


def resolved_configs(suite: SuiteFile | None, pairs: list[tuple[RunSpec, Sources]]) -> list[dict[str, Any]]:
    """One entry per distinct configuration of a (task, method) (seeds together): every task
    option, method option, train and evaluate setting with its value and its ``source`` ("default",
    "smoke scale", "suite file", "suite file (task_overrides.T)", "sweep", "tuning", "command
    line"), the device, seeds, ``setting_source`` (the tuning's provenance) and ``notes`` (a task or
    method the suite does not configure: at the suite's scale or at its defaults). The runner
    adds ``params`` (``None``: counted when the model is built). Saved as ``resolved.json``."""
    entries: dict[str, dict[str, Any]] = {}
    for spec, src in pairs:
        key = json.dumps([spec.task, spec.method, spec.task_options, spec.method_options, spec.train, spec.evaluate,
                          spec.device, spec.setting_source], sort_keys=True, default=str)
        if key in entries:
            entries[key]["seeds"].append(spec.seed)
            continue
        t_cls, m_cls = task_class(spec.task), method_class(spec.method)
        notes = []
        for kind, name, configured, cls in (("task", spec.task, suite is None or spec.task in suite.tasks, t_cls),
                                            ("method", spec.method, suite is None or spec.method in suite.methods,
                                             m_cls)):
            if suite is not None and not configured:
                how = (f"at its {suite.scale} scale ({cls.__name__}.smoke_options)"
                       if suite.scale and getattr(cls, "smoke_options", None)
                       else f"with its default options ({cls.__name__} declares no smoke_options)" if suite.scale
                       else "with its default options (the suite declares no scale)")
                notes.append(f"{kind} {name} is not configured by suite {suite.name}: it runs {how}")
        entries[key] = {
            "task": spec.task, "method": spec.method, "seeds": [spec.seed], "device": spec.device,
            "task_options": _with_sources(spec.task_options, src["task_options"], _defaults(options_model(t_cls))),
            "method_options": _with_sources(spec.method_options, src["method_options"],
                                            _defaults(options_model(m_cls))),
            "train": _with_sources(spec.train, src["train"], _defaults(TrainConfig)),
            "evaluate": _with_sources(spec.evaluate, src["evaluate"], _defaults(EvalConfig)),
            "setting_source": spec.setting_source, "notes": notes, "params": None}
    return list(entries.values())
