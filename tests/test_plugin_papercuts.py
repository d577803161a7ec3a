"""Plugin papercuts and run purposes (issue 19, items 5 and 8): ``equibench list`` shows class
docstrings' first sentences, the tasks each method runs on and each suite's purpose; task
docstrings give field types and encodings; a plugin's ``origin`` without a ``counterpart`` reads
as a library method; a suite declares its purpose and a report of a smoke run says so first and
ranks nothing; the invariant graph-level example plugin is exactly E(3)-invariant."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch_geometric.data import Batch, Data

import equibench as eb
from equibench.cli import first_sentence, main, summary
from equibench.core import registry
from equibench.core.errors import UserError
from equibench.report.build import RANKED_PURPOSES, report_purpose, run_purposes
from equibench.report.references import NO_COUNTERPART, reference_sections
from equibench.results.store import append_block, load_results
from equibench.plan.suites import list_suites, read_suite

ROOT = Path(__file__).resolve().parents[1]
SCHNET = ROOT / "examples" / "schnet_plugin.py"


def test_first_sentence_is_a_whole_sentence():
    assert first_sentence("Frame averaging, e.g. over PCA frames. More text.") == \
        "Frame averaging, e.g. over PCA frames."
    assert first_sentence("A wrapped\n    docstring line. Second.\n\nParagraph.") == "A wrapped docstring line."
    assert first_sentence("No full stop here") == "No full stop here"
    assert first_sentence(None) == ""
    assert first_sentence("Version 2.5 of it, vs. 2.4. Then.") == "Version 2.5 of it, vs. 2.4."


def test_list_summary_is_the_class_docstring_else_the_module_sentence():
    assert summary(registry.method_class("baseline")).startswith("The shared message-passing backbone alone")
    # a class without its own docstring: its module's first sentence, whole, label stripped
    cls = type("NoDoc", (), {"__module__": __name__})
    expected = " ".join(__doc__.split("\n\n")[0].split())
    assert summary(cls) == expected and expected.endswith("exactly E(3)-invariant.")
    # every built-in method and task says what it is in a full sentence, not a list of options
    for name in eb.list_methods():
        text = summary(registry.method_class(name))
        assert text.endswith((".", ")")) and not text.lower().startswith("options"), (name, text)


def test_task_docstrings_state_field_types_and_encodings():
    qm9, md = registry.task_class("qm9").__doc__, registry.task_class("md").__doc__
    assert "H, C, N, O, F" in qm9 and '"5x0e"' in qm9 and '"point"' in qm9 and '"0e"' in qm9
    assert "ordered by atomic number" in md and '"1o"' in md
    for name in eb.list_tasks():
        doc = registry.task_class(name).__dict__.get("__doc__") or ""
        assert "``pos" in doc or "``image" in doc or "nbody's fields" in doc, name


def test_list_task_prints_types_and_encodings(capsys):
    assert main(["list", "--task", "md"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("task md: Forces (or energy) of one small molecule")
    assert "pos: 'point'" in out and "x: '3x0e'" in out and "ordered by atomic number" in out
    assert "options: molecule='ethanol'" in out


@pytest.mark.slow
def test_list_shows_sentences_tasks_and_purposes(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = next(k for k, line in enumerate(lines) if line.split()[:1] == ["baseline"])
    assert "tasks=" in lines[i] and "nbody" in lines[i].split("tasks=")[1]
    assert any(line.strip().startswith("The shared message-passing backbone alone") for line in lines[i + 1:i + 4])
    assert any(line.split()[:2] == ["smoke", "purpose=smoke"] for line in lines)
    assert any(line.strip().startswith("qm9") for line in lines)
    assert main(["list", "--task", "qm9"]) == 0
    assert "H, C, N, O, F" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# purposes

def test_every_builtin_suite_declares_its_purpose():
    purposes = {name: read_suite(name).purpose for name in list_suites()}
    assert purposes["smoke"] == "smoke" and purposes["quick"] == "quick" and purposes["paper"] == "paper"
    assert "smoke" not in RANKED_PURPOSES and {"quick", "verdict", "paper"} <= RANKED_PURPOSES


def test_an_unknown_purpose_is_a_one_line_error(tmp_path):
    suite = tmp_path / "mine.yaml"
    suite.write_text("name: mine\npurpose: verdicts\ntasks: [nbody]\nmethods: [baseline]\n")
    with pytest.raises(UserError, match="purpose") as err:
        read_suite(suite)
    assert "\n" not in str(err.value)
    suite.write_text("name: mine\ntasks: [nbody]\nmethods: [baseline]\n")
    assert read_suite(suite).purpose == "verdict"  # the documented default


def _run(tmp_path: Path, name: str, purpose: str | None) -> Path:
    d = tmp_path / "res" / name
    d.mkdir(parents=True)
    for method, scores in (("a", [0.50, 0.52, 0.51]), ("b", [0.30, 0.31, 0.29])):
        for seed, score in enumerate(scores):
            base = {"run_id": name, "spec_hash": f"{method}-{seed}", "task": "nbody", "method": method, "seed": seed,
                    "status": "ok"}
            append_block(d, [{**base, "metric": "test.mse", "value": score},
                             {**base, "metric": "trivial.mse", "value": 1.0}])
    if purpose:
        (d / "suite.json").write_text(json.dumps({"name": name, "purpose": purpose}))
    return d


def test_a_smoke_report_says_so_first_and_ranks_nothing(tmp_path):
    smoke, verdict, plain = _run(tmp_path, "s", "smoke"), _run(tmp_path, "v", "verdict"), _run(tmp_path, "p", None)
    assert run_purposes([smoke, verdict, plain]) == {"s": "smoke", "v": "verdict", "p": None}
    assert report_purpose(run_purposes([smoke, verdict])) == "smoke"  # the weakest purpose speaks
    text = eb.write_report(smoke, tmp_path / "rep-s").with_name("README.md").read_text()
    assert text.splitlines()[0].startswith("# Smoke run, not for verdicts")
    assert "| group |" not in text and "| rank |" not in text and "not meant for verdicts" in text
    text = eb.write_report(verdict, tmp_path / "rep-v").with_name("README.md").read_text()
    assert text.splitlines()[0].startswith("# equibench report") and "| group |" in text
    quick = _run(tmp_path, "q", "quick")
    text = eb.write_report(quick, tmp_path / "rep-q").with_name("README.md").read_text()
    assert text.splitlines()[0].startswith("# Screening run (quick)") and "| group |" in text


# ---------------------------------------------------------------------------------------------
# origin without counterpart

def test_a_library_plugin_without_counterpart_is_not_missing_anything(tmp_path):
    plugin = tmp_path / "libonly.py"
    plugin.write_text("from equibench import Method, register_method\n\n"
                      "@register_method('libonly_example')\nclass LibOnly(Method):\n"
                      "    '''A library model with no equibench counterpart.'''\n    origin = 'somelib'\n")
    try:
        eb.load_plugin(plugin)
        rows = []
        for method in ("baseline", "libonly_example"):
            for seed in (0, 1):
                base = {"run_id": "r", "spec_hash": f"{method}-{seed}", "task": "nbody", "method": method,
                        "seed": seed, "status": "ok", "convergence": "converged",
                        "implementation": "somelib 1.0" if method != "baseline"
                        else "equibench 0.1.0"}
                rows += [{**base, "metric": "test.mse", "value": 0.5 + seed / 10},
                         {**base, "metric": "throughput.inference.graphs_per_s", "value": 100.0}]
        sections = reference_sections(pd.DataFrame(rows))
        table = sections[0]["table"]
        row = table[table["reference"] == "libonly_example"].iloc[0]
        assert row["ours"] == NO_COUNTERPART and "none of ours" not in row["ours"]
        assert "baseline" not in set(table["reference"])
    finally:
        registry._METHODS.pop("libonly_example", None)


# ---------------------------------------------------------------------------------------------
# the invariant graph-level example plugin

QM9_LIKE = eb.TaskSpec(name="qm9_like", domain="graph3d", group="E3", inputs={"pos": "point", "x": "5x0e"},
                       output="0e", level="graph", loss="mse", metrics=("mae",))


def _molecules(n: int, gen: torch.Generator) -> Batch:
    out = []
    for _ in range(n):
        atoms = int(torch.randint(3, 9, (1,), generator=gen))
        pos = torch.randn(atoms, 3, generator=gen, dtype=torch.float64) * 1.5
        x = torch.nn.functional.one_hot(torch.randint(0, 5, (atoms,), generator=gen), 5).double()
        src, dst = torch.meshgrid(torch.arange(atoms), torch.arange(atoms), indexing="ij")
        keep = (src != dst) & ((pos[src] - pos[dst]).norm(dim=-1) < 5.0)
        out.append(Data(pos=pos, x=x, edge_index=torch.stack([src[keep], dst[keep]])))
    return Batch.from_data_list(out)


def test_schnet_example_is_exactly_invariant_in_float64():
    added = eb.load_plugin(SCHNET)
    assert "schnet_example" in eb.list_methods() and (not added or added == ["schnet_example"])
    method = eb.get_method("schnet_example", hidden=16, interactions=2, n_rbf=16)
    assert method.supports(QM9_LIKE) is None and method.exact_on(QM9_LIKE)
    assert method.supports(eb.get_task("nbody").spec) is not None  # vector inputs: not its kind of task
    with eb.default_dtype(torch.float64):
        model = method.build(QM9_LIKE, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    batch = _molecules(6, gen)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * -1 if torch.det(q) > 0 else q  # a reflection: O(3), not only SO(3)
    moved = batch.clone()
    moved.pos = batch.pos @ q.T + torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    with torch.no_grad():
        y, y_moved = model(batch), model(moved)
    assert y.shape == (6, 1)
    assert float((y - y_moved).abs().max() / y.abs().max()) < 1e-12
    err = eb.equivariance_error(model, batch, QM9_LIKE, n_samples=4, dtype=torch.float64)
    assert err["rel_max"] < 1e-10
    small = eb.get_method("schnet_example", params=3000).build(QM9_LIKE)
    assert math.isclose(eb.count_parameters(small), 3000, rel_tol=0.15)


@pytest.mark.slow
def test_schnet_example_runs_through_the_cli_on_qm9(tmp_path):
    code = main(["run", "smoke", "--tasks", "qm9", "--methods", "schnet_example", "--plugin", str(SCHNET),
                 "--results-dir", str(tmp_path / "res"), "--reports-dir", str(tmp_path / "rep"), "--name", "s",
                 "--quiet"])
    assert code == 0
    df = load_results(tmp_path / "res" / "s")
    ok = df[(df["status"] == "ok") & (df["method"] == "schnet_example")]
    fp64 = ok[ok["metric"] == "equivariance.trained.fp64.rel_max"]["value"]
    assert len(fp64) and float(fp64.max()) < 1e-10
    n_train = ok["task_options"].map(lambda o: o.get("train_size")).dropna()
    assert len(n_train) and int(n_train.iloc[0]) <= 256  # smoke-sized, not qm9's default 2 000
    env = json.loads((tmp_path / "res" / "s" / "env.json").read_text())
    assert env["load"] and len(env["load"][0]["before"]) == 3
    first = (tmp_path / "rep" / "s" / "README.md").read_text().splitlines()[0]
    assert first.startswith("# Smoke run, not for verdicts")
