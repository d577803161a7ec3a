"""The report's reference pairs (equibench/report/references.py) on hand-made rows: which pairs
are found (a counterpart, one method with two implementations), what a row says, and no section
when nothing pairs."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

import equibench as eb
from equibench.core.errors import UserError
from equibench.core.registry import method_class
from equibench.methods.base import EVERY_INPUT, declared_scopes
from equibench.metrics import catalogue as cat
from equibench.report.references import labelled, pairs, reference_sections
from equibench.plan.suites import expand_suite, read_suite

MSE, EQ64 = cat.test_metric("mse"), cat.equivariance_metric("trained", "fp64", "rel_mean")
TP = cat.throughput_metric("inference", "graphs_per_s")


def rows(method: str, impl: str, mses: list[float], eq: float, speed: float, task: str = "nbody") -> list[dict]:
    out = []
    for seed, mse in enumerate(mses):
        base = {"task": task, "method": method, "seed": seed, "status": "ok", "implementation": impl,
                "spec_hash": f"{method}-{impl}-{seed}", "convergence": "converged", "task_options": {}}
        out += [{**base, "metric": MSE, "value": mse}, {**base, "metric": EQ64, "value": eq},
                {**base, "metric": TP, "value": speed}, {**base, "metric": "params", "value": 1000.0}]
    return out


def frame(*groups: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([r for g in groups for r in g])


def test_a_counterpart_and_a_second_implementation_pair_with_ours():
    df = frame(rows("frame_averaging", "equibench 0.2", [0.10, 0.11, 0.12], 1e-16, 600.0),
               rows("frame_averaging_pytorch", "frame-averaging-pytorch 0.1.2", [0.20, 0.21, 0.22], 2e-16, 900.0),
               rows("e3nn", "equibench 0.2", [0.3, 0.3, 0.3], 1e-16, 100.0),
               rows("e3nn", "equibench 0.2 + cuequivariance-torch 0.13.0", [0.3, 0.3, 0.3], 1e-16, 400.0),
               [{"task": "nbody", "method": "e3nn_nequip@gpu", "seed": 0, "status": "not_applicable",
                 "spec_hash": "na", "metric": "status", "value": None, "method_options": {"backend": "x"},
                 "error": "no CUDA device here"}],
               rows("baseline", "equibench 0.2", [0.5, 0.5, 0.5], 0.3, 2000.0),
               rows("e3nn_nequip", "equibench 0.2", [0.3], 1e-16, 100.0),
               rows("e3nn_nequip@cueq", "equibench 0.2 + cuequivariance-torch 0.13.0", [0.3], 1e-16, 300.0),
               rows("frame_averaging@field", "equibench 0.2", [0.1], 1e-16, 600.0),
               rows("mace", "mace-torch 0.3.16", [0.4, 0.5], 1e-15, 50.0))
    found = pairs(labelled(df[df["status"] == "ok"]))
    assert found == [("e3nn [equibench 0.2]", "e3nn [equibench 0.2 + cuequivariance-torch 0.13.0]"),
                     ("e3nn_nequip", "e3nn_nequip@cueq"),
                     ("frame_averaging", "frame_averaging_pytorch")]  # the field variant is no reference
    (section,) = reference_sections(df)
    (css, cost), = section["more"]  # speed, size, convergence: a second table under the first
    table = pd.concat([section["table"], cost.drop(columns=["ours", "reference"])], axis=1)
    assert "graphs/s (ours)" not in section["table"] and "seeds" in cost
    fa = table[table["ours"] == "frame_averaging"].iloc[0]
    assert fa["reference implementation"] == "frame-averaging-pytorch 0.1.2"
    assert fa["score (ours)"].startswith("0.11 ±") and fa["score (ref.)"].startswith("0.21 ±")
    assert fa["test metric"].startswith("mse (lower")
    assert float(fa["Welch p"]) < 0.01  # 0.10-0.12 vs 0.20-0.22 separate
    assert fa["ref./ours speed"] == "1.50×" and fa["seeds"] == "3"
    cue = table[table["ours"].str.startswith("e3nn")].iloc[0]
    assert cue["ref./ours speed"] == "4.00×"
    assert any("e3nn_nequip@gpu" in n and "no CUDA device here" in n for n in section["notes"])
    mace = table[table["reference"] == "mace"].iloc[0]  # a library model without a counterpart of ours
    assert mace["ours"].startswith("–") and mace["score (ref.)"].startswith("0.45 ±") and mace["seeds"] == "2"


def test_only_our_methods_give_no_section_and_a_lone_library_method_a_row_of_its_own():
    ours_only = frame(rows("frame_averaging", "equibench 0.2", [0.1], 1e-16, 600.0),
                      rows("baseline", "equibench 0.2", [0.5], 0.3, 2000.0))
    assert reference_sections(ours_only) == []
    df = frame(rows("frame_averaging", "equibench 0.2", [0.1], 1e-16, 600.0),
               rows("frame_averaging_pytorch", "frame-averaging-pytorch 0.1.2", [0.2], 1e-16, 900.0, task="md"))
    (section,) = reference_sections(df)
    (row,) = section["table"].to_dict("records")
    assert row["reference"] == "frame_averaging_pytorch" and row["ours"].startswith("–")


def test_the_reference_suite_runs_each_pair_on_its_tasks_only(tmp_path):
    suite = read_suite("reference")
    specs = expand_suite(suite)
    per_task = {t: {s.method for s in specs if s.task == t} for t in suite.tasks}
    assert per_task["md"] == per_task["qm9"] == {"e3nn_nequip", "nequip", "mace"}
    assert per_task["digits"] == {"canonicalization", "equiadapt"}
    assert {"frame_averaging", "frame_averaging_pytorch", "egnn", "egnn_pytorch"} <= per_task["nbody"]
    backends = Counter(s.method_options.get("backend", "e3nn") for s in specs if s.method.startswith("e3nn@")
                       or s.method == "e3nn")
    assert backends == {"e3nn": 3, "cuequivariance": 3}
    for method in {s.method.split("@")[0] for s in specs}:  # every pair member is a registered method
        assert method in eb.list_methods()
    bad = {"name": "x", "tasks": {"nbody": {}}, "methods": {"baseline": {}},
           "task_overrides": {"nbody": {"only": ["e3nn"]}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match="only names method"):
        read_suite(path)


def test_the_readme_table_lists_every_method_with_its_origin_and_claim():
    """README's supported-methods table against the registry: every method once, the library it
    wraps (or equibench), its group, and 'no' in the exact column exactly for inexact methods."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("### Supported methods", 1)[1].split("\n#", 1)[0]  # that section only
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    builtin = {m for m in eb.list_methods() if method_class(m).__module__.startswith("equibench.")}  # no plugins
    assert set(rows) == builtin
    for name, (_, origin, _family, group, exact, _tasks) in rows.items():
        cls = method_class(name)
        assert origin.startswith(cls.origin), (name, origin)
        assert group == (cls.group or "–"), (name, group)
        assert exact.startswith("no") == (not any(cls.exact_by_domain.values()) and not cls.exact), (name, exact)
        scopes = set(declared_scopes(cls).values())  # where the claim holds (tests/test_symmetric_inputs.py)
        if scopes == {EVERY_INPUT}:
            assert exact.startswith(("yes (every input)", "digits only (every input")), (name, exact)
        elif scopes:
            assert "on inputs without a symmetry of their own" in exact, (name, exact)
            assert ("every input" in exact) == (EVERY_INPUT in scopes), (name, exact)
