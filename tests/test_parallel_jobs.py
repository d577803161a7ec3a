"""``--jobs N``: several workers at once, every timing alone (``core.quiet`` + ``engine.quiet``).

What must hold: a quiet section really stops the other workers (a busy worker makes no progress
while another worker times, and its training clock does not count the pause); two workers give
the same numbers as one (the points are independent, seeded processes); every spec is recorded
exactly once; timing rows say they ran alone; bad combinations are one line and exit 2.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import equibench as eb
from equibench.cli import main
from equibench.core import quiet
from equibench.engine.quiet import Coordinator, paused_of
from equibench.metrics.throughput import QUIET_NOTE, time_step

ROOT = Path(__file__).resolve().parents[1]

# a worker that ticks (appends wall-clock times) for ``seconds``; its quiet section, when asked, is
# ``hold`` seconds long and starts after ``wait`` seconds
_WORKER = r"""
import json, sys, time
from equibench.core import quiet
folder, seconds, wait, hold = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
quiet.configure(folder)
ticks, section = [], None
t_end = time.time() + seconds
while time.time() < t_end:
    ticks.append(time.time())
    if hold > 0 and section is None and time.time() > t_end - seconds + wait:
        asked = time.time()
        with quiet.quiet():
            got = time.time()
            time.sleep(hold)
        section = (asked, got, time.time())
    time.sleep(0.001)
json.dump({"ticks": ticks, "section": section, "paused_s": quiet.paused_s()}, open(folder + "/out.json", "w"))
"""


def _spawn(folder: Path, seconds: float, wait: float = 0.0, hold: float = 0.0) -> subprocess.Popen:
    folder.mkdir()
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(folder), str(seconds), str(wait), str(hold)],
                            cwd=ROOT)


@contextlib.contextmanager
def _coordinated(tmp_path: Path, a: dict, b: dict) -> Iterator[tuple[subprocess.Popen, subprocess.Popen, Coordinator]]:
    """Workers a and b (``_spawn`` options) under one coordinator; both killed and the coordinator
    closed on the way out."""
    workers = _spawn(tmp_path / "a", **a), _spawn(tmp_path / "b", **b)
    coordinator = Coordinator()
    try:
        for name, w in zip("ab", workers):
            coordinator.add(tmp_path / name, psutil.Process(w.pid))
        yield workers[0], workers[1], coordinator
    finally:
        coordinator.close()
        for w in workers:
            w.kill()


def test_quiet_alone_is_a_no_op():
    quiet.configure(None)
    t0 = time.monotonic()
    with quiet.quiet(), quiet.quiet():
        pass
    assert time.monotonic() - t0 < 0.1 and quiet.paused_s() == 0.0 and not quiet.coordinated()
    res = time_step(lambda: None, repeats=2, min_sample_s=0.001)
    assert QUIET_NOTE not in res["timer"]


def test_a_quiet_section_stops_the_other_workers_and_their_clocks_skip_the_pause(tmp_path):
    """Worker A asks for 1 s of quiet after 1 s; worker B ticks every millisecond for 3 s. B must
    not tick inside A's section, must have been stopped about as long (``quiet.paused``), and its
    own ``paused_s()`` must say so."""
    with _coordinated(tmp_path, dict(seconds=3.0, wait=1.0, hold=1.0), dict(seconds=3.0)) as (a, b, coordinator):
        assert a.wait(30) == 0
        coordinator.remove(tmp_path / "a")
        assert b.wait(30) == 0
        coordinator.remove(tmp_path / "b")
    out_a = json.loads((tmp_path / "a" / "out.json").read_text())
    out_b = json.loads((tmp_path / "b" / "out.json").read_text())
    asked, got, left = out_a["section"]
    assert got - asked < 0.5, "the grant took too long"
    inside = [t for t in out_b["ticks"] if got + 0.02 < t < left - 0.02]
    assert not inside, f"worker B ticked {len(inside)} times while A held its quiet section"
    assert len(out_b["ticks"]) > 200, "worker B should tick before and after the section"
    paused = paused_of(tmp_path / "b")
    assert 0.9 < paused < 1.6 and out_b["paused_s"] == pytest.approx(paused)
    assert len(coordinator.sections) == 1 and coordinator.sections[0][0] == tmp_path / "a"


def test_a_worker_that_ends_inside_its_section_releases_the_others(tmp_path):
    """A holder that dies mid-section (crash, timeout kill) must not leave the others stopped."""
    with _coordinated(tmp_path, dict(seconds=30.0, wait=0.0, hold=30.0), dict(seconds=2.0)) as (a, b, coordinator):
        deadline = time.time() + 30
        while not coordinator.sections and time.time() < deadline and \
                psutil.Process(b.pid).status() != psutil.STATUS_STOPPED:
            time.sleep(0.01)
        assert psutil.Process(b.pid).status() == psutil.STATUS_STOPPED
        a.kill()
        a.wait()
        coordinator.remove(tmp_path / "a")
        assert b.wait(30) == 0  # continued, and finished its own work


TINY_SUITE = {"name": "jobs", "seeds": [0, 1], "tasks": {"nbody": {"train_size": 32, "val_size": 8, "test_size": 16}},
              "train": {"steps": 6, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 16},
              "evaluate": {"equivariance_samples": 2, "equivariance_graphs": 4, "throughput_batch": 8,
                           "throughput_repeats": 2, "throughput_min_sample_s": 0.001, "lie_derivative": False},
              "methods": {"baseline": {"width": 8, "depth": 1}, "frame_averaging": {"width": 8, "depth": 1}}}


def test_two_jobs_give_the_numbers_of_one_each_point_once_timed_alone(tmp_path):
    suite = tmp_path / "jobs.yaml"
    suite.write_text(json.dumps(TINY_SUITE))
    one = eb.run(str(suite), results_dir=tmp_path, run_name="one", progress=False)
    two = eb.run(str(suite), results_dir=tmp_path, run_name="two", progress=False, jobs=2)
    for df in (one, two):
        assert (df["status"] == "ok").all()
        assert df.groupby("spec_hash")["block"].nunique().eq(1).all() and df["spec_hash"].nunique() == 4
    key = ["method", "seed", "metric"]
    exact = [m for m in one["metric"].unique() if m.startswith(("test.", "equivariance."))]
    a = one[one["metric"].isin(exact)].set_index(key)["value"].sort_index()
    b = two[two["metric"].isin(exact)].set_index(key)["value"].sort_index()
    assert len(a) > 8 and a.index.equals(b.index)
    assert (a == b).all(), "two workers at once changed a measured number"
    timers_two = set(two.loc[two["metric"].str.startswith("throughput."), "timer"].dropna())
    timers_one = set(one.loc[one["metric"].str.startswith("throughput."), "timer"].dropna())
    assert timers_two and all(t.endswith(QUIET_NOTE) for t in timers_two)
    assert timers_one and not any(t.endswith(QUIET_NOTE) for t in timers_one)
    assert set(two["executor"]) == {"local:2"} and set(one["executor"]) == {"local"}
    assert "paused_s" not in one or one["paused_s"].isna().all()
    paused = two.drop_duplicates("spec_hash")["paused_s"]
    assert paused.notna().all() and (paused >= 0).all() and (paused < two.drop_duplicates("spec_hash")["wall_s"]).all()


@pytest.mark.parametrize("argv, message", [
    (["--jobs", "0"], "expected a positive integer"),
    (["--jobs", "two"], "expected a positive integer"),
    (["--jobs", "2", "--no-isolate"], "needs isolated workers"),
    (["--jobs", "2", "--executor", "submitit"], "--jobs is for the local executor"),
])
def test_bad_jobs_is_one_line_exit_2(argv, message, capsys, tmp_path):
    code = main(["run", "smoke", "--results-dir", str(tmp_path), "--quiet", "--no-report", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
