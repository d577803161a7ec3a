"""Import every module of a package (so their ``@register_*`` decorators run)."""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def import_submodules(package: str, path: Iterable[str], skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Import ``package.<module>`` for every module on ``path`` except ``skip``.

    Returns ``{module: reason}`` for modules that could not be imported because a third-party
    dependency is missing; any other import error propagates (it is a bug).
    """
    missing: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in skip:
            continue
        try:
            importlib.import_module(f"{package}.{info.name}")
        except ModuleNotFoundError as err:
            if err.name and err.name.split(".")[0] == package.split(".")[0]:
                raise
            missing[info.name] = f"missing dependency {err.name!r}"
    return missing
