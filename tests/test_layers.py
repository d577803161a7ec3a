"""The package's structure, checked: layers point one way, no import cycles, folders stay small.

Layers (docs/design.md): core -> symmetry -> metrics -> methods | datasets -> benches -> results ->
plan | engine -> report -> cli. A module may import modules of its own layer or lower ones; ``methods`` and
``datasets`` do not import each other; an ``equibench`` import inside a function is a hidden
dependency and is not allowed (function-local imports are for optional third-party packages).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "equibench"
LAYERS = {"core": 0, "symmetry": 1, "metrics": 2, "methods": 3, "datasets": 3, "benches": 4, "results": 5,
          "plan": 6, "engine": 6, "report": 7, "cli": 8}
MAX_MODULES = 12


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> list[str]:
    """Absolute ``equibench`` modules named by a ``from ... import ...``."""
    if node.level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    if not mod.startswith("equibench"):
        return []
    return [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]


def imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported equibench module, at module level?)]."""
    out: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for n in tree.body:  # imports under `if TYPE_CHECKING:` / try at module level count as top level
            if isinstance(n, (ast.If, ast.Try)):
                top |= {id(m) for m in ast.walk(n)}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                found += [(m, id(node) in top) for m in resolve(node, name, path.name == "__init__.py")]
            elif isinstance(node, ast.Import):
                found += [(a.name, id(node) in top) for a in node.names if a.name.startswith("equibench")]
        out[name] = found
    return out


def known(mod: str, modules: set[str]) -> str | None:
    """The module ``mod`` refers to (``pkg.name`` may be a function imported from ``pkg``)."""
    while mod and mod not in modules:
        mod = mod.rpartition(".")[0]
    return mod or None


def layer(mod: str) -> int | None:
    parts = mod.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


GRAPH = imports()
MODULES = set(GRAPH)


def test_layers_point_one_way():
    bad = []
    for mod, deps in GRAPH.items():
        lo = layer(mod)
        for dep, _ in deps:
            target = known(dep, MODULES)
            if lo is None or target is None or layer(target) is None:
                continue
            if layer(target) > lo or {mod.split(".")[1], target.split(".")[1]} == {"methods", "datasets"}:
                bad.append(f"{mod} imports {target}")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_function_local_equibench_imports():
    bad = [f"{mod} imports {dep} inside a function" for mod, deps in GRAPH.items() for dep, top in deps
           if not top and mod != "equibench"]
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules_or_subpackages():
    edges: dict[str, set[str]] = defaultdict(set)
    pkg_edges: dict[str, set[str]] = defaultdict(set)
    for mod, deps in GRAPH.items():
        for dep, _ in deps:
            target = known(dep, MODULES)
            if target and target != mod and not mod.startswith(target + ".") and target != "equibench":
                edges[mod].add(target)
                a, b = mod.split(".")[:2], target.split(".")[:2]
                if len(a) > 1 and len(b) > 1 and a != b:
                    pkg_edges[".".join(a)].add(".".join(b))

    def cycle(graph: dict[str, set[str]]) -> list[str] | None:
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(n: str) -> list[str] | None:
            state[n] = 1
            stack.append(n)
            for m in sorted(graph.get(n, ())):
                if state.get(m) == 1:
                    return stack[stack.index(m):] + [m]
                if m not in state:
                    found = visit(m)
                    if found:
                        return found
            stack.pop()
            state[n] = 2
            return None

        for n in sorted(graph):
            if n not in state:
                found = visit(n)
                if found:
                    return found
        return None

    assert cycle(edges) is None, "module import cycle: " + " -> ".join(cycle(edges) or [])
    assert cycle(pkg_edges) is None, "subpackage import cycle: " + " -> ".join(cycle(pkg_edges) or [])


@pytest.mark.parametrize("folder", sorted({p.parent for p in PACKAGE.rglob("*.py")}), ids=lambda p: p.name)
def test_folders_hold_about_a_dozen_modules(folder):
    modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= MAX_MODULES, f"{folder} holds {len(modules)} modules"


def test_the_checker_sees_a_violation(tmp_path):
    """The checker itself: a relative import two levels up resolves to the right module."""
    node = ast.parse("from ..report.build import write_report").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert resolve(node, "equibench.core.registry", False) == ["equibench.report.build"]
    assert layer("equibench.report.build") > layer("equibench.core.registry")


#: what the report never reads (issue 21, item 2): it reads records and cards, not the code that made them
REPORT_FORBIDDEN = ("equibench.core.registry", "equibench.methods", "equibench.datasets")


def report_reads_code(graph: dict[str, list[tuple[str, bool]]]) -> list[str]:
    """``<report module> imports <module>`` for every import of ``REPORT_FORBIDDEN`` from ``equibench.report``."""
    return [f"{mod} imports {dep}" for mod, deps in graph.items() if mod.startswith("equibench.report")
            for dep, _ in deps if any(dep == f or dep.startswith(f + ".") for f in REPORT_FORBIDDEN)]


def test_the_report_imports_no_registry_method_or_task():
    assert not report_reads_code(GRAPH), "\n".join(report_reads_code(GRAPH))


def test_the_report_import_check_sees_one():
    node = ast.parse("from ...core.registry import method_class").body[0]
    assert isinstance(node, ast.ImportFrom)
    graph = {"equibench.report.common.tables": [(m, True) for m in resolve(node, "equibench.report.common.tables",
                                                                           False)],
             "equibench.engine.engine": [("equibench.core.registry.method_class", True)]}
    assert report_reads_code(graph) == ["equibench.report.common.tables imports equibench.core.registry"]
