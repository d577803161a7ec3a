"""Cards (issue 21, item 2): a run directory describes every method and task it ran, and its report
reads only its records and cards.

* the cards the engine writes hold the facts the report needs (counterpart, exactness and why not,
  wrapping the backbone, force kind, measured parameters, primary metric with direction and unit,
  metric roles, trivial reference, floors) for real methods and tasks, suite variants included;
* a card file cut short is ignored on read (the report falls back to the rows) and rewritten whole;
* a run of a plugin task and method renders the same report in a fresh process that never loaded
  the plugin, and without its cards it would not;
* a run stored before cards (``tests/data/run-v1``) gets its cards synthesised from its rows.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import equibench as eb
from equibench.core.registry import get_method, get_task
from equibench.results.cards import CARDS_DIR, METHODS_DIR, CardStore, metric_roles, read_cards
from equibench.results.runcards import cards_for

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "tests" / "plugins" / "carded.py"
V1 = ROOT / "tests" / "data" / "run-v1"


def _rows(params: float, *metrics: str) -> list[dict]:
    return [{"metric": "params", "value": params, "implementation": "equibench 0.1.0", "environment": "main",
             "provenance": {"task": "x"}}, *({"metric": m, "value": 1.0} for m in metrics)]


def _describe(store: CardStore, key: str, task: str, method_options: dict, task_options: dict,
              rows: list[dict]) -> None:
    ident = {"method": key, "task": task, "method_options": method_options, "task_options": task_options}
    store.add(ident, rows, get_method(key.split("@")[0], **method_options), get_task(task, **task_options))


def test_cards_hold_the_facts_the_report_reads(tmp_path):
    store = CardStore(tmp_path)
    _describe(store, "frame_averaging_pytorch", "nbody", {}, {"train_size": 8}, _rows(1000, "test.mse"))
    _describe(store, "baseline", "nbody", {"width": 8}, {"train_size": 8}, _rows(500, "test.mse", "trivial.mse"))
    _describe(store, "e3nn_nequip@cons", "md", {"forces": "conservative"}, {}, _rows(700, "test.force_mae"))
    _describe(store, "canonicalization", "nbody", {}, {"train_size": 8},
              _rows(900, "test.mse", "test.prior_mse", "throughput.inference.graphs_per_s"))
    cards = read_cards(tmp_path)  # what is on disk, not what the store holds
    fa = cards.methods["frame_averaging_pytorch"]
    assert fa.counterpart == "frame_averaging" and fa.origin == "frame-averaging-pytorch" and fa.wraps_backbone
    assert fa.runs[0].exact_claim and fa.runs[0].exact_scope == "generic_inputs" and fa.runs[0].params == 1000
    assert fa.description.startswith("The shared backbone averaged over frame-averaging-pytorch's PCA frames")
    base = cards.methods["baseline"].runs[0]
    assert base.exact_claim is False and "not equivariant by construction" in (base.inexact_reason or "")
    assert base.options == {"width": 8} and base.task_options == {"train_size": 8}
    variant = cards.methods["e3nn_nequip@cons"]
    assert variant.method == "e3nn_nequip" and variant.label == "cons" and not variant.wraps_backbone
    assert variant.runs[0].conservative_forces is True and variant.conservative_forces is False
    nbody = cards.tasks["nbody"]
    (conf,) = nbody.configurations
    assert conf.primary is not None and (conf.primary.name, conf.primary.direction) == ("test.mse", "lower")
    assert conf.output == "point" and conf.group == "E3" and conf.inputs == {"pos": "point", "vel": "1o",
                                                                             "charge": "0e"}
    assert conf.roles["test.mse"] == "primary" and conf.roles["trivial.mse"] == "reference"
    assert conf.roles["test.prior_mse"] == "diagnostic"  # a method's extra metric, reported by canonicalization
    assert conf.roles["throughput.inference.graphs_per_s"] == "measurement"
    assert "constant_velocity" in nbody.floors and nbody.trivial_reference.startswith("The input positions")
    md = cards.tasks["md"].configurations[0]
    assert md.primary is not None and (md.primary.name, md.primary.direction, md.primary.unit) == \
        ("test.force_mae", "lower", "eV/Å")
    assert {"test.mse", "params"} <= set(cards.metrics)  # the specs of what the rows carried
    assert metric_roles(get_task("md", target="energy"))["test.energy_mae"] == "primary"


def test_a_card_cut_short_is_ignored_and_rewritten(tmp_path):
    store = CardStore(tmp_path)
    _describe(store, "frame_averaging_pytorch", "nbody", {}, {}, _rows(1000, "test.mse"))
    path = tmp_path / CARDS_DIR / METHODS_DIR / "frame_averaging_pytorch.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # a writer killed mid-file (or a disk that filled up)
    (path.parent / "baseline.json.tmp123").write_text("{")  # a temporary file a crash left behind
    assert "frame_averaging_pytorch" not in read_cards(tmp_path).methods  # not half a card
    rows = pd.DataFrame([{"task": "nbody", "method": "frame_averaging_pytorch", "seed": 0, "status": "ok",
                          "implementation": "frame-averaging-pytorch 0.1", **r} for r in _rows(1000, "test.mse")])
    card = cards_for([tmp_path], rows).methods["frame_averaging_pytorch"]
    assert card.source == "synthesised" and card.counterpart == "frame_averaging"  # from the rows (and LEGACY_METHODS)
    _describe(CardStore(tmp_path), "frame_averaging_pytorch", "nbody", {}, {}, _rows(1000, "test.mse"))
    assert json.loads(path.read_text())["counterpart"] == "frame_averaging"  # whole again


def test_the_earlier_run_gets_cards_from_its_rows():
    cards = cards_for([V1], eb.load_results(V1))
    base = cards.methods["baseline"]
    assert base.source == "synthesised" and base.wraps_backbone and base.runs[0].params == 4083
    assert base.runs[0].exact_claim is False and base.origin == "equibench"
    nbody = cards.tasks["nbody"]
    assert nbody.source == "synthesised" and cards.primary("nbody") == "test.mse"
    assert nbody.configurations[0].roles["test.mse"] == "primary"
    assert "constant_velocity" in nbody.floors
    assert not cards.metrics  # nothing stored: the report reads the catalogue of today's process


# ---- a plugin's run, reported without the plugin --------------------------------------------------

PRODUCE = """
import sys
import equibench as eb
from equibench.core.spec import RunSpec
specs = [RunSpec(task="carded_nbody", method=m, seed=s, task_options={"train_size": 32, "val_size": 8, "test_size": 16},
                 method_options={"width": 8, "depth": 1},
                 train={"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 16},
                 evaluate={"equivariance_samples": 2, "equivariance_graphs": 4, "throughput_batch": 8,
                           "throughput_repeats": 2, "throughput_min_sample_s": 0.001})
         for m in ("baseline", "carded_method") for s in (0, 1)]
eb.run(specs, results_dir=sys.argv[1], run_name="carded", isolate=False, progress=False, plugins=[sys.argv[2]])
"""
RENDER = """
import sys
import equibench as eb
from equibench.core import registry
if len(sys.argv) > 3:
    eb.load_plugin(sys.argv[3])
assert ("carded_method" in registry._METHODS) == (len(sys.argv) > 3)
eb.write_report(sys.argv[1], sys.argv[2])
"""


def _python(code: str, *args: str) -> None:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cards")
    _python(PRODUCE, str(root), str(PLUGIN))  # in a process of its own: this one never loads the plugin
    return root / "carded"


def _pages(out: Path) -> tuple[str, str]:
    return (out / "index.html").read_text(), (out / "README.md").read_text()


def test_the_engine_wrote_the_plugin_s_cards(plugin_run):
    cards = read_cards(plugin_run)
    method = cards.methods["carded_method"]
    assert (method.origin, method.counterpart, method.wraps_backbone) == ("carded-lib", "baseline", True)
    assert {r.params for r in method.runs} and all(isinstance(r.params, int) for r in method.runs)
    conf = cards.tasks["carded_nbody"].configurations[0]
    assert conf.primary is not None and (conf.primary.name, conf.primary.direction, conf.primary.unit) == \
        ("test.carded_score", "higher", "pts")
    assert conf.roles["test.mse"] == "task" and conf.roles["test.carded_diag"] == "diagnostic"
    assert cards.metrics["test.carded_diag"].display == "carded diagnostic"


def test_a_plugin_run_reports_the_same_without_the_plugin(plugin_run, tmp_path):
    _python(RENDER, str(plugin_run), str(tmp_path / "with"), str(PLUGIN))
    _python(RENDER, str(plugin_run), str(tmp_path / "without"))
    (html, md), (html_without, md_without) = _pages(tmp_path / "with"), _pages(tmp_path / "without")
    assert md_without == md and html_without == html
    # what only the plugin declares, read from the cards
    assert "test carded score [pts] ↑" in md  # the verdict ranks by the plugin's primary metric, higher is better
    assert "carded diagnostic [widgets]" in md  # its method's diagnostic, under its display name
    pairs = md[md.index("Our implementations beside their references"):]
    assert "| carded_nbody | baseline | carded_method |" in pairs  # paired with the counterpart its card names
    assert "inference time vs backbone" in md
    assert "trivial: the input positions, i.e. no displacement" in md


def test_without_its_cards_the_plugin_run_reports_less(plugin_run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(plugin_run, bare)
    shutil.rmtree(bare / CARDS_DIR)
    _python(RENDER, str(bare), str(tmp_path / "bare-report"))
    _, md = _pages(tmp_path / "bare-report")
    assert "test carded score [pts] ↑" not in md and "carded diagnostic" not in md
    assert "| carded_nbody | baseline | carded_method |" not in md
