"""Find and import the modules that register plugins (so their ``@register_*`` decorators run).

The registry (``core/registry.py``) is a passive store: it never names the packages that fill it.
Whoever composes the package declares them here, by kind: ``equibench/__init__.py`` declares the
built-in methods (``equibench.methods``), tasks (``equibench.datasets``) and probes
(``equibench.metrics``, ``equibench.benches.training``) with ``declare_builtin``; third-party
packages declare entry points in the groups of ``ENTRY_POINT_GROUPS``.

``builtin_index`` reads the source files of the declared packages (without importing them) for
``@register_method("name")`` / ``@register_task("name")`` / ``@register_probe("name")`` and maps
each name to its module, so a worker that measures one method imports that method's module only
(escnn, trimesh and the rest load only when used). ``load`` imports every declared module of a
kind and its entry points, e.g. for ``equibench list``; ``import_all`` imports a package tree.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil
import re
from importlib.metadata import entry_points
from pathlib import Path

KINDS = ("method", "task", "probe")
REGISTRATION = re.compile(r"@register_(method|task|probe)\(\s*[\"']([^\"']+)[\"']")
SKIP = ("base", "blocks")  # interfaces and shared building blocks register nothing
#: entry-point group of each kind (a third-party package's plugins)
ENTRY_POINT_GROUPS = {"method": "equibench.methods", "task": "equibench.tasks", "probe": "equibench.probes"}

#: kind -> the modules / packages that hold its built-in registrations (``declare_builtin``)
_BUILTINS: dict[str, list[str]] = {kind: [] for kind in KINDS}
_LOADED: set[str] = set()
_UNAVAILABLE: dict[str, str] = {}


def declare_builtin(kind: str, module: str) -> None:
    """Declare ``module`` (a module or a package, imported only when needed) as a home of
    built-in registrations of ``kind`` ("method", "task" or "probe")."""
    if kind not in _BUILTINS:
        raise ValueError(f"unknown plugin kind {kind!r} (known: {', '.join(KINDS)})")
    if module not in _BUILTINS[kind]:
        _BUILTINS[kind].append(module)
        _LOADED.discard(kind)


def builtin_sources(kind: str) -> tuple[str, ...]:
    """The modules / packages declared for ``kind``."""
    return tuple(_BUILTINS[kind])


def _source_files(module: str) -> list[tuple[Path, tuple[str, ...]]]:
    """(file, module path parts below ``module``) of a module, or of every file of a package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return []
    if spec.submodule_search_locations is None:
        return [(Path(spec.origin), ())]
    root = Path(next(iter(spec.submodule_search_locations)))
    return [(path, path.relative_to(root).with_suffix("").parts) for path in sorted(root.rglob("*.py"))]


@functools.cache
def builtin_index(package: str) -> dict[tuple[str, str], str]:
    """``{(kind, name): module}`` for every registration written in ``package``'s source files
    (``package`` may be a single module)."""
    index: dict[tuple[str, str], str] = {}
    for path, rel in _source_files(package):
        if any(part in SKIP or part.startswith("_") for part in rel):
            continue
        for kind, name in REGISTRATION.findall(path.read_text(encoding="utf-8")):
            index[(kind, name)] = ".".join((package, *rel))
    return index


def module_of(kind: str, name: str) -> str | None:
    """The built-in module that registers ``name`` as a ``kind`` (None when no source does)."""
    for source in _BUILTINS[kind]:
        module = builtin_index(source).get((kind, name))
        if module is not None:
            return module
    return None


def import_all(package: str) -> dict[str, str]:
    """Import every module of ``package`` and its subpackages (except ``SKIP``); a plain module
    is imported itself.

    Returns ``{module: reason}`` for modules that could not be imported because a third-party
    dependency is missing; any other import error propagates (it is a bug).
    """
    missing: dict[str, str] = {}
    pkg = importlib.import_module(package)
    if not hasattr(pkg, "__path__"):
        return missing
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in SKIP:
            continue
        name = f"{package}.{info.name}"
        if info.ispkg:
            missing.update(import_all(name))
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and err.name.split(".")[0] == package.split(".")[0]:
                raise
            missing[info.name] = f"missing dependency {err.name!r}"
    return missing


def load(*kinds: str) -> None:
    """Import the declared built-in modules of ``kinds`` (default: every kind) and their
    entry-point plugins, once per kind (a module declared later is imported at the next call)."""
    for kind in kinds or KINDS:
        if kind in _LOADED:
            continue
        _LOADED.add(kind)  # first: an import that asks for the same kind does not recurse
        for source in _BUILTINS[kind]:
            _UNAVAILABLE.update(import_all(source))
        for ep in entry_points(group=ENTRY_POINT_GROUPS[kind]):
            ep.load()  # importing the module runs its @register_* decorators


def unavailable() -> dict[str, str]:
    """Built-in modules imported by ``load`` that registered nothing because a dependency is
    missing, with the reason."""
    return dict(_UNAVAILABLE)
