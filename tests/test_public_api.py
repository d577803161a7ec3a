"""The public plugin API (issue 19, item 7): every name a plugin or notebook needs comes from
``equibench`` itself, the README and the examples import nothing else, moved modules warn, and
the README's Python snippet runs as written."""
from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import equibench as eb
from equibench.core.deprecation import MOVED, EquibenchDeprecationWarning

ROOT = Path(__file__).resolve().parents[1]
#: what a plugin author needs (issue 19): the interfaces, registries, metric declaration, the
#: shared backbone and parameter matching, field types, specs, and running / reading results
PLUGIN_NAMES = ("Method", "Task", "register_method", "register_task", "register_metric", "MetricSpec",
                "BackboneModel", "Backbone", "mlp", "build_at_params", "count_parameters", "POINT", "irreps",
                "field_dim", "is_invariant", "TaskSpec", "RunSpec", "get_method", "get_task", "list_methods",
                "list_tasks", "run", "load_results", "write_report", "load_plugin", "default_dtype",
                "equivariance_error", "measure_throughput")
PRIVATE_IMPORT = re.compile(r"^\s*(from\s+equibench\.[\w.]+\s+import\b|import\s+equibench\.[\w.]+)", re.MULTILINE)


def test_every_public_name_resolves_and_is_listed():
    assert set(PLUGIN_NAMES) <= set(eb.__all__)
    assert set(eb.__all__) <= set(dir(eb))  # completion finds them before first use
    for name in eb.__all__:
        assert getattr(eb, name) is not None, name
    assert eb.Method.__module__ == "equibench.methods.base" and eb.TaskSpec.__module__ == "equibench.core.spec"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        eb.nope  # noqa: B018


def test_import_equibench_stays_cheap():
    code = "import sys, equibench; print(int('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"


def test_readme_and_examples_import_only_from_equibench():
    files = [ROOT / "README.md", *sorted((ROOT / "examples").glob("*.py"))]
    assert len(files) >= 4
    bad = {f.name: PRIVATE_IMPORT.findall(f.read_text()) for f in files}
    assert not {k: v for k, v in bad.items() if v}, f"private imports: {bad}"
    for f in files[1:]:  # and every name they take from equibench is public
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "equibench":
                assert {a.name for a in node.names} <= set(eb.__all__), f.name


def test_the_private_import_scan_catches_both_forms():
    assert PRIVATE_IMPORT.search("from equibench.methods.base import Method")
    assert PRIVATE_IMPORT.search("  import equibench.core.registry as r")
    assert not PRIVATE_IMPORT.search("from equibench import Method\nimport equibench as eb")


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_moved_modules_keep_a_warning_alias(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{re.escape(old)} moved to {re.escape(new)}") as record:
        alias = importlib.import_module(old)
    assert all(issubclass(w.category, EquibenchDeprecationWarning) for w in record)
    target = importlib.import_module(new)
    public = [n for n in vars(target) if not n.startswith("_") and not isinstance(vars(target)[n], type(sys))]
    assert public and all(getattr(alias, n) is getattr(target, n) for n in public)
    assert not (ROOT / (old.replace(".", "/") + ".py")).exists()  # a virtual alias: no file to discover


def test_the_old_paths_are_not_files_and_unknown_paths_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("equibench.suite.no_such_module")


def test_an_old_layout_plugin_still_loads_and_is_warned(tmp_path):
    plugin = tmp_path / "old_layout.py"
    plugin.write_text("from equibench.suite.registry import register_method\n"
                      "from equibench.methods.base import Method\n\n"
                      "@register_method('old_layout_example')\nclass Old(Method):\n"
                      "    '''A plugin written against the previous layout.'''\n")
    sys.modules.pop("equibench.suite.registry", None)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert eb.load_plugin(plugin) == ["old_layout_example"]
    finally:  # the registry is process-wide: leave no method without a build behind
        from equibench.core import registry
        registry._METHODS.pop("old_layout_example", None)
    hits = [w for w in record if issubclass(w.category, EquibenchDeprecationWarning)]
    assert hits and Path(hits[0].filename) == plugin  # pointed at the plugin's import line
    # shown by default (Python hides plain DeprecationWarnings outside __main__)
    code = (f"import equibench, sys; sys.path.insert(0, {str(tmp_path)!r}); equibench.load_plugin({str(plugin)!r})")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "equibench.suite.registry moved to equibench.core.registry" in err


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_readme_api_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    block = _readme_blocks()[0]
    assert "batch = " in block  # defines what it uses
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md:python-api", "exec"), {"__name__": "readme"})
    lines = capsys.readouterr().out.strip().splitlines()
    assert float(lines[-1]) < 1e-10  # the frame-averaged model's float64 equivariance error, as the comment says
    assert lines[-3] == "torch.Size([40, 3])"


@pytest.mark.slow
def test_readme_suite_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    block = _readme_blocks()[1]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md:python-suite", "exec"), {"__name__": "readme"})
    index = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert index.name == "index.html" and (tmp_path / index).exists()
