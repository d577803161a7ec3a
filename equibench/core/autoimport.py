"""Find and import the built-in method and task modules (so their ``@register_*`` decorators run).

``builtin_index`` reads the source files of a package (without importing them) for
``@register_method("name")`` / ``@register_task("name")`` and maps each name to its module, so a
worker that measures one method imports that method's module only (escnn, trimesh and the rest
load only when used). ``import_all`` imports every module of a package tree, e.g. for
``equibench list``.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from pathlib import Path

REGISTRATION = re.compile(r"@register_(method|task)\(\s*[\"']([^\"']+)[\"']")
SKIP = ("base", "blocks")  # interfaces and shared building blocks register nothing


@functools.cache
def builtin_index(package: str) -> dict[tuple[str, str], str]:
    """``{(kind, name): module}`` for every registration written in ``package``'s source files."""
    root = Path(importlib.import_module(package).__path__[0])
    index: dict[tuple[str, str], str] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("").parts
        if any(part in SKIP or part.startswith("_") for part in rel):
            continue
        for kind, name in REGISTRATION.findall(path.read_text(encoding="utf-8")):
            index[(kind, name)] = ".".join((package, *rel))
    return index


def import_all(package: str) -> dict[str, str]:
    """Import every module of ``package`` and its subpackages (except ``SKIP``).

    Returns ``{module: reason}`` for modules that could not be imported because a third-party
    dependency is missing; any other import error propagates (it is a bug).
    """
    missing: dict[str, str] = {}
    pkg = importlib.import_module(package)
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
