"""Metrics owned where they are measured (issue 21, item 3): per-run measurements are probes
registered like methods and tasks, a task declares its metrics next to its loss, the catalogue is
assembled from what is registered; a new probe or a new task metric is one file
(``tests/plugins/heldout_loss_probe.py``, ``tests/plugins/worst_error_task.py``); the old
``evaluate:`` keys, the suite files and the quick suite's spec hashes are unchanged."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from torch_geometric.data import Batch

from equibench.benches.taskrun import EvalConfig, run_one
from equibench.core import registry
from equibench.core.errors import UserError
from equibench.core.spec import RunSpec
from equibench.metrics import catalogue
from equibench.metrics.catalogue import ROLES, MetricSpec
from equibench.metrics.equivariance import EquivarianceProbe, LieDerivativeProbe
from equibench.metrics.probe import Probe, ProbeSettings, evaluate_model
from equibench.metrics.throughput import ThroughputProbe
from equibench.plan.suites import expand_suite, list_suites, read_suite
from equibench.results.store import read_records

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "tests" / "plugins"
TINY = {"task": "nbody", "task_options": {"train_size": 16, "val_size": 8, "test_size": 8},
        "method_options": {"width": 8, "depth": 1},
        "train": {"steps": 2, "batch_size": 8, "eval_batch_size": 8, "warmup_steps": 0},
        "evaluate": {"equivariance_samples": 1, "equivariance_graphs": 4, "throughput": False,
                     "lie_derivative": False, "symmetric_inputs": False}}
#: EvalConfig's fields and defaults before the probes (a577b5f), plus the switches of the two
#: probes that had none (equivariance, curve): resolved.json and the report's configuration list them
EVALUATE_DEFAULTS = {
    "equivariance_samples": 8, "equivariance_graphs": 32, "lie_derivative": True, "degeneracy": False,
    "symmetric_inputs": True, "throughput": True, "throughput_batch": 100, "throughput_modes": ("inference", "train"),
    "throughput_min_sample_s": 0.05, "throughput_repeats": 10, "throughput_threads": 0, "throughput_remeasure": 2,
    "profile": True, "flops": True, "compile": False, "measure_once": True, "architecture_seed": None,
    "equivariance": True, "curve": True,
    # probes added since (their own keys; existing keys and hashes unchanged): issue 22's image Lie derivative
    "image_lie_derivative": True, "image_lie_derivative_step": 1e-4,
    # and item 4's force conservation on md (off by default)
    "force_conservation": False, "force_conservation_graphs": 4, "force_conservation_trajectories": 4,
    "force_conservation_steps": 200, "force_conservation_timestep_fs": 0.5, "force_conservation_temperature": 300.0,
    "force_conservation_every": 10, "force_conservation_nodes": 8,
    # and item 5's fp32 equivariance error with TF32 on and off (off by default; the equivariance keys)
    "tf32_equivariance": False}


@pytest.fixture
def isolated(monkeypatch):
    """Copies of the registries and the catalogue (every built-in loaded first), so what a test
    registers does not outlive it."""
    registry._load_builtins()
    for table in ("_METHODS", "_TASKS", "_PROBES"):
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    monkeypatch.setattr(catalogue, "_CATALOGUE", dict(catalogue._CATALOGUE))
    return monkeypatch


def exec_plugin(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Import ``tests/plugins/<name>.py`` afresh (its decorators register into the test's copies)."""
    spec = importlib.util.spec_from_file_location(f"equibench_test_plugin_{name}", PLUGINS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)


def nbody_spec():
    return registry.get_task("nbody", **TINY["task_options"]).spec


# ---- one file each -------------------------------------------------------------------------------

def test_a_new_probe_is_one_file(isolated):
    """A probe declared in one plugin file runs when its switch is on in ``evaluate:``, with its
    own setting, and its rows carry the metric with the direction and unit it declares."""
    exec_plugin(isolated, "heldout_loss_probe")
    assert "heldout_loss" in registry.list_probes()
    on = {**TINY["evaluate"], "heldout_loss": True, "heldout_loss_graphs": 4}
    rows = run_one(RunSpec(method="baseline", **{**TINY, "evaluate": on}))
    [row] = [r for r in rows if r["metric"] == "heldout_loss"]
    assert row["batch_size"] == 4 and math.isfinite(row["value"]) and row["value"] > 0
    spec = catalogue.get_metric("heldout_loss")
    assert (spec.direction, spec.unit, spec.role) == ("lower", "loss", "measurement")
    assert not any(r["metric"] == "heldout_loss" for r in run_one(RunSpec(method="baseline", **TINY)))  # off by default
    with pytest.raises(UserError, match="evaluate option 'heldout_loss_graphs'"):
        EvalConfig.from_dict({"heldout_loss_graphs": "4"})


def test_a_task_declares_a_new_metric_next_to_its_loss(isolated):
    """A plugin task declaring one more metric beside its loss runs without an entry anywhere
    else: its test, trivial and floor rows are declared with its direction and unit."""
    assert catalogue.find_metric("test.max_abs_err") is None
    exec_plugin(isolated, "worst_error_task")
    for name, family, role in (("test.max_abs_err", "test", "task"), ("trivial.max_abs_err", "trivial", "reference"),
                               ("floor.max_abs_err", "floor", "reference")):
        spec = catalogue.get_metric(name)
        assert (spec.family, spec.direction, spec.unit, spec.role) == (family, "lower", "distance", role)
    assert "max_abs_err" not in Path(catalogue.__file__).read_text()
    task = registry.get_task("nbody_worst", **TINY["task_options"])
    assert task.metric_roles() == {"test.mse": "primary", "trivial.mse": "reference", "floor.mse": "reference",
                                   "test.max_abs_err": "task", "trivial.max_abs_err": "reference",
                                   "floor.max_abs_err": "reference"}
    rows = run_one(RunSpec(method="baseline", **{**TINY, "task": "nbody_worst"}))
    values = {(r["metric"], r.get("floor")): r["value"] for r in rows}
    for key in (("test.max_abs_err", None), ("trivial.max_abs_err", None), ("floor.max_abs_err", "constant_velocity")):
        assert values[key] > 0, key
    batch = Batch.from_data_list(task.load("test", seed=0))  # per graph: worst error² >= mean squared error
    per_graph = task.metric_values(task.trivial_prediction(task.load("train", seed=0))(batch), batch)
    assert bool((per_graph["max_abs_err"] ** 2 >= per_graph["mse"]).all())


def test_a_task_metric_without_a_declaration_is_a_clear_error(isolated):
    nbody = type(registry.get_task("nbody"))

    @registry.register_task("nbody_undeclared")
    class Undeclared(nbody):  # type: ignore[misc, valid-type]
        METRICS = ()

        @property
        def spec(self):
            return dataclasses.replace(super().spec, metrics=("mse", "never_declared"))

    task = Undeclared(**TINY["task_options"])
    with pytest.raises(UserError, match=r"reports metric\(s\) \['never_declared'\].*task_metric\('never_declared'"):
        task.metric_specs()
    # a metric the catalogue declares (a plugin registering test.<name> itself) is found there
    catalogue.register_metric(catalogue.task_metric("never_declared", direction="higher"))
    assert [(s.name, s.role) for s in task.metric_specs()] == [("test.mse", "primary"),
                                                               ("test.never_declared", "task")]


def test_a_probe_may_emit_only_what_it_declares(isolated):
    @registry.register_probe("sloppy")
    class Sloppy(Probe):
        METRICS = (MetricSpec("sloppy.a", "a", "sloppy"),)
        enabled = False

        def measure(self, ctx, phase):
            return [{"metric": "sloppy.b", "value": 1.0}]

    with pytest.raises(RuntimeError, match="emitted 'sloppy.b', which it does not declare"):
        run_one(RunSpec(method="baseline", **{**TINY, "evaluate": {**TINY["evaluate"], "sloppy": True}}))


def test_a_probe_declaration_is_checked(isolated):
    with pytest.raises(ValueError, match="unknown phase"):
        @registry.register_probe("late")
        class Late(Probe):
            phases = ("after_everything",)
    with pytest.raises(UserError, match="'equivariance_graphs' of probe 'clash'"):
        @registry.register_probe("clash")
        class Clash(Probe):
            keys = {"equivariance_graphs": "graphs"}
            enabled = False

            class Settings(ProbeSettings):
                graphs: int = 7  # the equivariance probes' shared key has default 32

        evaluate_model()


# ---- the evaluate: mapping -------------------------------------------------------------------------

def test_the_evaluate_keys_and_defaults_are_the_old_ones():
    assert {k: f.default for k, f in EvalConfig.model_fields.items()} == EVALUATE_DEFAULTS


def test_old_evaluate_keys_map_onto_the_probes_settings():
    cfg = EvalConfig.from_dict({"equivariance_samples": 4, "equivariance_graphs": 16, "lie_derivative": False,
                                "degeneracy": True, "throughput_batch": 50, "throughput_threads": 2, "flops": False,
                                "throughput_modes": ["inference"], "architecture_seed": 3})
    probes = {p.name: p.settings for p in cfg.probes(nbody_spec())}
    assert list(probes) == ["curve", "equivariance", "symmetric_inputs", "degeneracy", "throughput", "profile"]
    assert probes["equivariance"] == EquivarianceProbe.Settings(samples=4, graphs=16)
    assert probes["symmetric_inputs"].samples == 4 and probes["degeneracy"].graphs == 16
    assert (probes["throughput"].batch, probes["throughput"].threads, probes["throughput"].flops,
            probes["throughput"].modes) == (50, 2, False, ("inference",))
    assert (probes["profile"].batch, probes["profile"].threads) == (50, 2)
    assert cfg.measures_architecture(3) and not cfg.measures_architecture(0)
    assert cfg.settings(LieDerivativeProbe).graphs == 16 and cfg.settings(ThroughputProbe).repeats == 10
    off = EvalConfig.from_dict({"throughput": False})  # the profile is taken in the throughput point only
    assert [p.name for p in off.probes(nbody_spec())] == ["curve", "equivariance", "symmetric_inputs",
                                                         "lie_derivative"]
    image = registry.get_task("digits", source="sklearn", train_size=8, val_size=4, test_size=4).spec
    assert [p.name for p in EvalConfig.from_dict({}).probes(image)] == ["curve", "equivariance", "image_lie_derivative",
                                                                       "throughput", "profile"]


def test_a_bad_evaluate_key_is_one_line():
    with pytest.raises(UserError, match="unknown evaluate option 'lie_derivatives'.*did you mean 'lie_derivative'"):
        EvalConfig.from_dict({"lie_derivatives": True})
    with pytest.raises(UserError, match="evaluate option 'throughput_batch'.*got '50'"):
        EvalConfig.from_dict({"throughput_batch": "50"})


def test_every_suite_and_stored_run_keeps_its_evaluate_mapping():
    for name in list_suites():
        suite = read_suite(name)  # validates evaluate: and every task override's
        for over in suite.task_overrides.values():
            EvalConfig.from_dict({**suite.evaluate, **over.evaluate})
    stored = {json.dumps(r["eval_config"], sort_keys=True) for r in read_records(ROOT / "tests" / "data" / "run-v1")
              if r.get("eval_config")}
    assert stored
    for d in stored:
        EvalConfig.from_dict(json.loads(d))


def test_the_quick_suite_spec_hashes_are_unchanged():
    """The planner passes the ``evaluate:`` mapping through as written (the probes read it, they do
    not rewrite it), so resume keys and tuning files of the quick suite stay valid: the specs
    stored at a577b5f (before the probes) hash as they did, and today's expansion of quick gives
    the same evaluate mapping, and the same hash wherever the whole spec is the same."""
    stored = json.loads((ROOT / "tests" / "data" / "quick-specs-a577b5f.json").read_text())["specs"]
    live = {(s.label, json.dumps(s.method_options, sort_keys=True)): s for s in expand_suite(read_suite("quick"))}
    same_evaluate = same_spec = 0
    for entry in stored:
        old = RunSpec.from_dict({k: v for k, v in entry.items() if k != "hash"})
        assert old.hash == entry["hash"]
        EvalConfig.from_dict(old.evaluate)
        now = live.get((old.label, json.dumps(old.method_options, sort_keys=True)))
        if now is None:
            continue
        assert now.evaluate == old.evaluate, old.label
        same_evaluate += 1
        if now.to_dict() == old.to_dict():
            assert now.hash == entry["hash"], old.label
            same_spec += 1
    assert same_evaluate >= len(stored) // 2 and same_spec > 0


# ---- the catalogue, assembled from what is registered ---------------------------------------------

def test_every_metric_has_a_role_and_the_families_theirs():
    specs = catalogue.list_metrics()
    assert specs and all(s.role in ROLES for s in specs)
    role = {s.name: s.role for s in specs}
    assert (role["test.mse"], role["trivial.mse"], role["floor.angle_deg"], role["test.identity_metric"],
            role["equivariance.trained.fp64.rel_mean"], role["throughput.inference.graphs_per_s"],
            role["curve.val"], role["params"], role["train.wall_s"]) == (
        "task", "reference", "reference", "diagnostic", "measurement", "measurement", "measurement", "context",
        "context")
    with pytest.raises(ValueError, match="role must be one of"):
        MetricSpec("x", "x", "x", role="headline")  # type: ignore[arg-type]


def test_a_tasks_first_metric_is_its_primary():
    digits = registry.get_task("digits", source="sklearn", train_size=8, val_size=4, test_size=4)
    specs = digits.metric_specs()
    assert [s.name for s in specs][:2] == ["test.accuracy", "test.group_accuracy"]
    assert [s.role for s in specs] == ["primary"] + ["task"] * (len(specs) - 1)
    assert digits.primary_metric.higher_is_better
    for name in registry.list_tasks():
        task = registry.get_task(name) if name != "md" else None
        if task is not None:
            assert task.primary_metric.name == catalogue.test_metric(task.spec.metrics[0])


def test_the_probes_declare_what_the_catalogue_holds():
    names = {s.name for p in registry.probe_classes() for s in p.METRICS}
    for family in ("equivariance", "equivariance_broken", "lie_derivative", "symmetric", "degeneracy", "throughput",
                   "profile", "curve"):
        assert {s.name for s in catalogue.list_metrics(family=family)} <= names, family


def _code_strings(path: Path) -> set[str]:
    """The string constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs}


def test_the_registry_names_no_package_above_core():
    """core/ (layer 0) stays a passive store: it does not import the methods, datasets or
    metrics packages by name; the top-level package declares where the built-ins live."""
    from equibench.core import autoimport
    groups = set(autoimport.ENTRY_POINT_GROUPS.values())  # entry-point group names, not packages
    for module in ("registry.py", "autoimport.py"):
        strings = _code_strings(ROOT / "equibench" / "core" / module) - groups
        assert not {s for s in strings if s.startswith("equibench.") and s.split(".")[1] in (
            "methods", "datasets", "metrics", "benches")}, module
    assert "equibench.methods" in autoimport.builtin_sources("method")
    assert autoimport.module_of("probe", "throughput") == "equibench.metrics.throughput"
    assert autoimport.module_of("probe", "curve") == "equibench.benches.training"
