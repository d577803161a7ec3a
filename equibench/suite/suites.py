"""Suite files: YAML documents that expand into a list of ``RunSpec``.

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
    task_overrides: {normals: {train: {...}, methods: {e3nn: {...}}}}   # per-task changes
    sweeps:                                                 # extra specs varying one task option
      - {task: nbody, option: train_size, values: [100, 300, 1000]}   # e.g. sample efficiency
    scaling: {methods: [baseline, e3nn], nodes: [16, 256, 4096]}     # cost-vs-size sweep (extras.py)
    tp_bench: {lmax: [1, 2, 3], impls: [e3nn, gaunt]}                # tensor-product microbenchmarks
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import UserError
from ..core.spec import RunSpec

TOP_KEYS = {"name", "description", "seeds", "device", "train", "evaluate", "tasks", "default_tasks",
            "methods", "task_overrides", "sweeps", "scaling", "tp_bench"}


def list_suites() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("equibench.suites").iterdir()
                  if p.name.endswith(".yaml"))


def read_suite(name_or_path: str | Path) -> dict[str, Any]:
    """Parse and validate a suite by name (``equibench/suites/<name>.yaml``) or file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"suite file not found: {path}")
        text, where = path.read_text(), str(path)
    else:
        if str(name_or_path) not in list_suites():
            from ..core.errors import did_you_mean
            raise did_you_mean("suite", str(name_or_path), list_suites())
        text = (resources.files("equibench.suites") / f"{name_or_path}.yaml").read_text()
        where = f"suite {name_or_path!r}"
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        loc = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"malformed suite file {where}{loc}: {getattr(err, 'problem', err)}") from None
    return validate_suite(doc, where)


def _as_options(value: Any, what: str, where: str) -> dict[str, dict[str, Any]]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return {v: {} for v in value}
    if isinstance(value, dict) and all(isinstance(k, str) and (v is None or isinstance(v, dict))
                                       for k, v in value.items()):
        return {k: dict(v or {}) for k, v in value.items()}
    raise UserError(f"malformed suite file {where}: '{what}' must be a list of names or a mapping "
                    f"name -> options, got {value!r}")


def validate_suite(doc: Any, where: str = "suite") -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise UserError(f"malformed suite file {where}: expected a mapping at the top level")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise UserError(f"malformed suite file {where}: unknown key(s) {sorted(unknown)} "
                        f"(known: {sorted(TOP_KEYS)})")
    for key in ("tasks", "methods"):
        if key not in doc:
            raise UserError(f"malformed suite file {where}: missing '{key}'")
        doc[key] = _as_options(doc[key], key, where)
    seeds = doc.setdefault("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            for s in seeds):
        raise UserError(f"malformed suite file {where}: 'seeds' must be a non-empty list of integers")
    for key in ("train", "evaluate", "task_overrides"):
        if not isinstance(doc.setdefault(key, {}), dict):
            raise UserError(f"malformed suite file {where}: '{key}' must be a mapping")
    if not isinstance(doc.setdefault("device", "cpu"), str):
        raise UserError(f"malformed suite file {where}: 'device' must be a string")
    sweeps = doc.setdefault("sweeps", [])
    if not isinstance(sweeps, list) or not all(
            isinstance(w, dict) and set(w) == {"task", "option", "values"} and w["task"] in doc["tasks"]
            and isinstance(w["option"], str) and isinstance(w["values"], list) and w["values"] for w in sweeps):
        raise UserError(f"malformed suite file {where}: each of 'sweeps' must be "
                        "{task: <a task of 'tasks'>, option: <name>, values: [..]}")
    default_tasks = doc.setdefault("default_tasks", list(doc["tasks"]))
    if not isinstance(default_tasks, list) or set(default_tasks) - set(doc["tasks"]):
        raise UserError(f"malformed suite file {where}: 'default_tasks' must list tasks of 'tasks'")
    from .extras import validate_extras
    validate_extras(doc, where)
    doc.setdefault("name", Path(where).stem if where.endswith((".yaml", ".yml")) else where.split("'")[1])
    return doc


def _pick(names: list[str] | None, available: dict[str, Any] | list[str], what: str) -> list[str]:
    if names is None:
        return list(available)
    missing = [n for n in names if n not in available]
    if missing:
        from ..core.registry import list_methods, list_tasks
        known = list_tasks() if what == "task" else list_methods()
        if missing[0] in known:
            return [n for n in names]  # registered but not in the suite: run with default options
        from ..core.errors import did_you_mean
        raise did_you_mean(what, missing[0], known)
    return list(names)


def expand_suite(doc: dict[str, Any], tasks: list[str] | None = None, methods: list[str] | None = None,
                 seeds: list[int] | None = None, device: str | None = None) -> list[RunSpec]:
    """The cartesian product tasks x methods x seeds as ``RunSpec`` (filters/overrides applied)."""
    task_names = _pick(tasks, doc["tasks"], "task") if tasks else list(doc["default_tasks"])
    method_names = _pick(methods, doc["methods"], "method")
    variants = [(t, doc["tasks"].get(t, {})) for t in task_names]
    for sweep in doc["sweeps"]:
        if sweep["task"] in task_names:
            variants += [(sweep["task"], {**doc["tasks"][sweep["task"]], sweep["option"]: v}) for v in sweep["values"]]
    specs = []
    for task, task_options in variants:
        over = doc["task_overrides"].get(task, {})
        train = {**doc["train"], **over.get("train", {})}
        evaluate = {**doc["evaluate"], **over.get("evaluate", {})}
        for method in method_names:
            m_opts = {**doc["methods"].get(method, {}), **over.get("methods", {}).get(method, {})}
            for seed in seeds or doc["seeds"]:
                specs.append(RunSpec(task=task, method=method, seed=seed, task_options=task_options,
                                     method_options=m_opts, train=train, evaluate=evaluate,
                                     device=device or doc["device"]))
    return list(dict.fromkeys(specs))  # a sweep value equal to the base option is the same spec
