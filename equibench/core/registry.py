"""Registries of methods, tasks and probes: a passive store.

``@register_method("name")`` / ``@register_task("name")`` / ``@register_probe("name")`` add a
class; a registered class's ``on_register()`` classmethod, when it has one, runs then (tasks,
methods and probes declare the metrics they report there, so the metric catalogue is assembled
from what is registered). Which modules hold the built-in registrations is declared by whoever
composes the package (``core.autoimport.declare_builtin``, called by ``equibench/__init__.py``):
this module names no package above ``core``. Third-party packages add entries through the
entry-point groups ``equibench.methods`` / ``equibench.tasks`` / ``equibench.probes``, and
``load_plugin(path)`` imports a file that registers its own. ``get_method(name, **options)``
validates option names and types against the class's ``__init__`` signature.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from . import autoimport
from .autoimport import import_all  # noqa: F401  (re-exported: engine.warm preloads with it)
from .errors import UserError, closest, did_you_mean

T = TypeVar("T")

_METHODS: dict[str, type[Any]] = {}
_TASKS: dict[str, type[Any]] = {}
_PROBES: dict[str, type[Any]] = {}
_TABLES = {"method": _METHODS, "task": _TASKS, "probe": _PROBES}


def _register(table: dict[str, type[Any]], kind: str, name: str) -> Callable[[type[T]], type[T]]:
    def decorator(cls: type[T]) -> type[T]:
        if name in table and table[name] is not cls and table[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"{kind} {name!r} is already registered by {table[name].__module__}")
        cls.name = name  # type: ignore[attr-defined]
        hook = getattr(cls, "on_register", None)
        if callable(hook):
            hook()  # what the class declares (its metrics), before it can be looked up
        table[name] = cls
        return cls
    return decorator


def register_method(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a ``Method`` subclass available as ``get_method(name)``."""
    return _register(_METHODS, "method", name)


def register_task(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a ``Task`` subclass available as ``get_task(name)``."""
    return _register(_TASKS, "task", name)


def register_probe(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a ``Probe`` subclass (a per-run measurement, ``metrics/probe.py``)
    available as ``probe_class(name)`` and its toggle ``name:`` in a suite's ``evaluate:``."""
    return _register(_PROBES, "probe", name)


def _load_builtins(*kinds: str) -> None:
    """Import every declared built-in module of ``kinds`` (default: all) and the entry-point plugins."""
    autoimport.load(*kinds)


def _load_one(kind: str, name: str, table: dict[str, type[Any]]) -> None:
    """Make ``name`` registered: import just its built-in module when the source index knows it
    (a missing optional dependency then surfaces as a one-line error), else load everything."""
    module = autoimport.module_of(kind, name) if isinstance(name, str) else None
    if module is not None and name not in table:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and err.name.split(".")[0] == __name__.split(".")[0]:
                raise
            raise UserError(f"{kind} {name!r} needs {err.name!r}, which is not installed") from None
    if name not in table:
        _load_builtins(kind)


def unavailable_modules() -> dict[str, str]:
    """Built-in modules that registered nothing because a dependency is missing, with the reason."""
    _load_builtins()
    return autoimport.unavailable()


def _names() -> set[str]:
    return {f"{kind}:{name}" if kind != "method" else name for kind, table in _TABLES.items() for name in table}


def load_plugin(path: str | os.PathLike[str]) -> list[str]:
    """Import a Python file that registers methods or tasks; returns the names it added."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin file not found: {path}")
    _load_builtins()
    before = _names()
    mod_name = f"equibench_plugin_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    if mod_name in sys.modules:
        return list(getattr(sys.modules[mod_name], "__equibench_added__", []))
    spec = importlib.util.spec_from_file_location(mod_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[mod_name]
        raise UserError(f"plugin {path} failed to import: {type(err).__name__}: {err}") from None
    added = sorted(_names() - before)
    if not added:
        del sys.modules[mod_name]
        raise UserError(f"plugin {path} does not register any method, task or probe "
                        "(use @register_method / @register_task / @register_probe)")
    module.__equibench_added__ = added  # type: ignore[attr-defined]
    return added


def list_methods() -> list[str]:
    _load_builtins("method")
    return sorted(_METHODS)


def list_tasks() -> list[str]:
    _load_builtins("task")
    return sorted(_TASKS)


def list_probes() -> list[str]:
    """Names of the registered probes (built-in and plugins)."""
    _load_builtins("probe")
    return sorted(_PROBES)


def probe_classes() -> list[type[Any]]:
    """Every registered probe class (built-in and plugins loaded so far), in registration order."""
    _load_builtins("probe")
    return list(_PROBES.values())


#: separates a method from a variant label: ``frame_averaging@field`` is the registered
#: ``frame_averaging`` in a second configuration of one suite (its rows carry the whole name)
VARIANT_SEP = "@"


def method_of(name: str) -> str:
    """The registered method of a (possibly labelled) method name (``"frame_averaging@field"`` ->
    ``"frame_averaging"``; a plain name is itself)."""
    return name.split(VARIANT_SEP, 1)[0] if isinstance(name, str) else name


def method_class(name: str) -> type[Any]:
    """The class registered as ``name`` (a variant label ``<method>@<label>`` is ignored)."""
    base = method_of(name)
    _load_one("method", base, _METHODS)
    if not isinstance(base, str) or base not in _METHODS:
        raise did_you_mean("method", str(name), _METHODS)
    return _METHODS[base]


def task_class(name: str) -> type[Any]:
    _load_one("task", name, _TASKS)
    if not isinstance(name, str) or name not in _TASKS:
        raise did_you_mean("task", str(name), _TASKS)
    return _TASKS[name]


def probe_class(name: str) -> type[Any]:
    """The probe class registered as ``name``."""
    _load_one("probe", name, _PROBES)
    if not isinstance(name, str) or name not in _PROBES:
        raise did_you_mean("probe", str(name), _PROBES)
    return _PROBES[name]


def options_model(cls: type[Any]) -> type[BaseModel]:
    """A strict pydantic model of ``cls.__init__``'s keyword options (names, type hints and
    defaults; ``**kwargs`` allows extra keys), built once per class."""
    cached = cls.__dict__.get("_options_model")
    if cached is not None:
        return cached
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    fields: dict[str, Any] = {}
    for key, p in sig.parameters.items():
        if key == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = hints.get(key, Any)
        fields[key] = (ann, ... if p.default is p.empty else p.default)
    has_var_keyword = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    extra: Literal["allow", "forbid"] = "allow" if has_var_keyword else "forbid"
    model = create_model(f"{cls.__name__}Options", __config__=ConfigDict(extra=extra, strict=True,
                                                                          arbitrary_types_allowed=True), **fields)
    cls._options_model = model
    return model


def validate_options(cls: type[Any], kind: str, options: dict[str, Any]) -> None:
    """Check option names and types against ``cls.__init__``; raise ``UserError`` otherwise."""
    model = options_model(cls)
    # YAML/JSON give lists where a signature may say tuple
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    try:
        model.model_validate(given)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(x) for x in e.get("loc", ()))
        if e.get("type") == "extra_forbidden":
            known = ", ".join(sorted(model.model_fields)) or "none"
            raise UserError(f"{kind} {cls.name!r} has no option {key!r}{closest(key, model.model_fields)} "
                            f"(options: {known})") from None
        if e.get("type") == "missing":
            return  # a required option is the constructor's to report
        field = model.model_fields.get(key.split(".")[0])
        ann: object = field.annotation if field is not None else None
        tname = getattr(ann, "__name__", str(ann).replace("typing.", ""))
        raise UserError(f"{kind} {cls.name!r} option {key!r} must be {tname}, got {options.get(key.split('.')[0])!r}"
                        ) from None


def get_method(name: str, **options: Any):
    """An instance of the method registered as ``name`` with validated ``options``."""
    cls = method_class(name)
    validate_options(cls, "method", options)
    try:
        return cls(**options)
    except ValueError as err:
        raise UserError(f"method {name!r}: {err}") from None


def get_task(name: str, **options: Any):
    """An instance of the task registered as ``name`` with validated ``options``."""
    cls = task_class(name)
    validate_options(cls, "task", options)
    try:
        return cls(**options)
    except ValueError as err:
        raise UserError(f"task {name!r}: {err}") from None
