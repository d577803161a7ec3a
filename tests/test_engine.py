"""The engine (``equibench.engine.engine``): worker subprocesses, limits, locks, storage failures.

Every worker is a fresh interpreter that imports torch and equibench (a few seconds here), so
these tests keep to a handful of points each.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import equibench as eb
from equibench.cli import main
from equibench.core.errors import UserError
from equibench.core.registry import load_plugin
from equibench.core.spec import RunSpec
from equibench.engine import warm
from equibench.results import store
from equibench.engine.engine import run_benches
from equibench.engine.launch import log_tail, parse_size
from equibench.engine.lock import exclusive
from equibench.results.store import read_records

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "tests" / "plugins"
FAULTS = str(PLUGINS / "engine_faults.py")
TOY = str(PLUGINS / "toy_bench.py")
TINY = dict(task="nbody", task_options={"train_size": 32, "val_size": 8, "test_size": 16},
            train={"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 16},
            evaluate={"equivariance_samples": 2, "equivariance_graphs": 4, "throughput_batch": 8,
                      "throughput_repeats": 2, "throughput_min_sample_s": 0.001, "lie_derivative": False})
SMALL = {"width": 8, "depth": 1}


def tiny(method: str, seed: int = 0, **opts) -> RunSpec:
    return RunSpec(method=method, seed=seed, method_options=opts, **TINY)


def write_suite(path: Path, methods: dict, seeds=(0,), name: str = "tiny", steps: int | None = None) -> Path:
    train = TINY["train"] if steps is None else {**TINY["train"], "steps": steps}
    path.write_text(json.dumps({"name": name, "tasks": {"nbody": TINY["task_options"]}, "train": train,
                                "evaluate": TINY["evaluate"], "seeds": list(seeds), "methods": methods}))
    return path


def blocks_per_hash(run_dir: Path) -> dict[str, int]:
    seen: dict[str, set] = {}
    for r in read_records(run_dir):
        seen.setdefault(r["spec_hash"], set()).add(r["block"])
    return {h: len(b) for h, b in seen.items()}


def by_method(df):
    return df.drop_duplicates("spec_hash").set_index("method")


# ---- small pieces ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("4G", 4 * 2**30), ("512M", 512 * 2**20), ("1.5GiB", 3 * 2**29),
                                            ("2048", 2048), ("64kb", 64 * 1024)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["4X", "", "G", "-1G", "0", "four"])
def test_parse_size_rejects_nonsense_in_one_line(text):
    with pytest.raises(UserError) as err:
        parse_size(text)
    assert "\n" not in str(err.value)


def test_log_tail_drops_progress_bars(tmp_path):
    log = tmp_path / "w.log"
    log.write_text("loading\r 10%|#    | 1/10 [00:01<00:09]\r 50%|#####| 5/10 [00:02<00:02]\n"
                   "Traceback (most recent call last):\nValueError: the real error\n"
                   "\r 70%|███████   | 7/10 [00:03<00:01, 2.1it/s]\r")
    tail = log_tail(log, n=2)
    assert tail.endswith("ValueError: the real error") and "%|" not in tail


def test_lock_names_the_holder_and_wait_blocks_until_released(tmp_path):
    lock = tmp_path / ".lock"
    with exclusive(lock, "run directory X"):
        with pytest.raises(UserError, match=rf"run directory X is in use by pid {os.getpid()} on "):
            with exclusive(lock, "run directory X"):
                pass
        got = []
        waiter = threading.Thread(target=lambda: exclusive(lock, "run directory X", wait=True).__enter__()
                                  or got.append(time.monotonic()))
        waiter.start()
        time.sleep(0.5)
        assert not got, "the waiter must block while the lock is held"
        released = time.monotonic()
    waiter.join(10)
    assert got and got[0] >= released


# ---- workers ---------------------------------------------------------------------------------

@pytest.mark.slow  # engine fault test, ~20-80 s: run by .ci/run's slow step and scripts/test.sh --slow
def test_script_without_main_guard(tmp_path):
    """A plain script calling eb.run at top level (no `if __name__ == "__main__":`) runs every
    spec in worker subprocesses without re-executing itself."""
    suite = write_suite(tmp_path / "two.yaml", {"baseline": SMALL, "augmentation": SMALL})
    script = tmp_path / "bench_script.py"
    script.write_text(f"import equibench as eb\nprint('script body ran', flush=True)\n"
                      f"df = eb.run({str(suite)!r}, results_dir={str(tmp_path / 'res')!r}, progress=False)\n"
                      f"print(df.drop_duplicates('spec_hash')['status'].tolist())\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("script body ran") == 1
    assert "['ok', 'ok']" in proc.stdout
    runs = [d for d in (tmp_path / "res").iterdir() if d.is_dir()]
    assert len(runs) == 1 and runs[0].name.startswith("tiny-")
    df = eb.load_results(runs[0])
    assert set(df["executor"]) == {"local"} and set(df["environment"]) == {"main"}
    assert df["wall_s"].gt(0).all()
    assert len(list((runs[0] / "logs").glob("*.log"))) == 2


def test_out_of_memory_is_a_row_with_its_peak_and_the_suite_goes_on(tmp_path):
    limit = 1200 * 2**20
    specs = [tiny("memory_hog"), tiny("raises_memory_error"), tiny("baseline", **SMALL)]
    df = eb.run(specs, results_dir=tmp_path, run_name="oom", max_memory="1200M", progress=False, plugins=[FAULTS])
    by = by_method(df)
    hog = by.loc["memory_hog"]
    assert hog["status"] == "out_of_memory" and "out of memory" in hog["error"]
    assert hog["peak_rss_bytes"] > limit and hog["max_memory_bytes"] == limit
    assert hog["exit_signal"] == "SIGKILL"
    err = by.loc["raises_memory_error"]
    assert err["status"] == "out_of_memory" and "MemoryError" in err["error"] and err["peak_rss_bytes"] > 0
    assert by.loc["baseline", "status"] == "ok"


@pytest.mark.parametrize("jobs", [1, 2])
def test_grouped_points_share_a_worker_and_a_dead_worker_is_replaced(tmp_path, jobs):
    """Points of one group run in order in one worker with the growing history; the point a
    worker dies on gets the failure (exit status, stderr without progress bars) and the rest of
    the group runs in a fresh worker; a point over its timeout is killed and the group goes on.
    The same with two workers at once (``--jobs 2``): the solo point runs beside the group."""
    load_plugin(TOY)
    from equibench.benches.base import bench_class
    bench = bench_class("toy")([("a", "rows", "g", 0), ("b", "rows", "g", 0), ("c", "exit", "g", 0),
                                ("d", "rows", "g", 0), ("e", "sleep", "g", 120), ("f", "rows", "g", 0),
                                ("solo", "rows", "", 0)])
    run_dir = run_benches([bench], tmp_path / "toy", timeout=8, plugins=[TOY], progress=False, jobs=jobs)
    rows = {r["name"]: r for r in read_records(run_dir)}
    assert [rows[n]["status"] for n in "abcdef"] == ["ok", "ok", "failed", "ok", "timeout", "ok"]
    assert rows["c"]["exit_code"] == 3 and "fatal: the toy point broke" in rows["c"]["error"]
    assert "%|" not in rows["c"]["error"]
    assert "timeout: exceeded 8 s" in rows["e"]["error"]
    assert rows["a"]["pid"] == rows["b"]["pid"] != rows["d"]["pid"] != rows["f"]["pid"]
    assert rows["b"]["history_names"] == ["a"] and rows["d"]["history_names"] == ["a", "b", "c"]
    assert rows["f"]["history_names"] == ["a", "b", "c", "d", "e"] and rows["solo"]["history_names"] == []
    assert all(rows[n]["run_id"] == "toy" and rows[n]["git_commit"] and rows[n]["versions"] for n in rows)
    assert blocks_per_hash(run_dir) == {h: 1 for h in blocks_per_hash(run_dir)} and len(rows) == 7
    assert not (run_dir / "work").exists()


def test_warm_parent_forks_every_point_and_outlives_a_killed_child(tmp_path):
    """Main-environment points run in children forked by one preloaded parent: every point has
    the same parent and a pid of its own; a child killed with SIGKILL is a failed row naming the
    signal and the next point runs in the same parent; a child's matrix product on 2 threads
    completes (the parent never started OpenMP's pool, whose threads a forked child lacks) and the
    parent has no OS thread it did not have when it had just imported; a parent killed mid-point is a
    failed row for that point and the next point gets a fresh parent."""
    if not warm.enabled():
        pytest.skip("warm workers need Linux (fork, pidfd) and EQUIBENCH_WORKER != cold")
    load_plugin(TOY)
    from equibench.benches.base import bench_class
    bench = bench_class("toy")([("a", "rows", "", 0), ("b", "rows", "", 0), ("k", "sigkill", "", 0),
                                ("c", "rows", "", 0), ("p", "parallel", "", 0), ("x", "kill_parent", "", 0),
                                ("d", "rows", "", 0)])
    run_dir = run_benches([bench], tmp_path / "warm", timeout=120, plugins=[TOY], progress=False)
    rows = {r["name"]: r for r in read_records(run_dir)}
    first = rows["a"]["ppid"]
    assert first not in (os.getpid(), None)
    assert rows["b"]["ppid"] == rows["c"]["ppid"] == rows["p"]["ppid"] == first
    assert len({rows[n]["pid"] for n in "abcp"}) == 4 and first not in {rows[n]["pid"] for n in "abcp"}
    assert rows["k"]["status"] == "failed" and rows["k"]["exit_signal"] == "SIGKILL"
    assert "worker killed by SIGKILL" in rows["k"]["error"]
    assert rows["p"]["status"] == "ok" and rows["p"]["value"] == 2 * 2 * 512 and rows["p"]["threads"] == 2
    assert rows["x"]["status"] == "failed" and f"warm worker parent (pid {first}) died" in rows["x"]["error"]
    assert rows["d"]["status"] == "ok" and rows["d"]["ppid"] not in (first, os.getpid())
    parent = warm._PARENTS[(sys.executable, 0)]
    # no thread started in the parent since it was ready (threads its imports started may have ended)
    assert parent.pid == rows["d"]["ppid"] and parent.ask_thread_ids() <= parent.thread_ids
    assert all(rows[n]["executor"] == "local" and rows[n]["environment"] == "main" for n in rows)


def test_cold_workers_on_request(tmp_path, monkeypatch):
    """EQUIBENCH_WORKER=cold runs each job in a fresh interpreter started by the runner itself;
    any other value than warm/cold is a one-line UserError."""
    load_plugin(TOY)
    from equibench.benches.base import bench_class
    monkeypatch.setenv("EQUIBENCH_WORKER", "cold")
    run_dir = run_benches([bench_class("toy")([("solo", "rows", "", 0)])], tmp_path / "cold", plugins=[TOY],
                          progress=False)
    (row,) = read_records(run_dir)
    assert row["status"] == "ok" and row["ppid"] == os.getpid()
    monkeypatch.setenv("EQUIBENCH_WORKER", "tepid")
    with pytest.raises(UserError, match="EQUIBENCH_WORKER='tepid'"):
        run_benches([bench_class("toy")([("solo", "rows", "", 0)])], tmp_path / "bad", plugins=[TOY],
                    progress=False)


# ---- one runner per run directory; kill -9; full disk ---------------------------------------

@pytest.mark.slow  # engine fault test, ~20-80 s: run by .ci/run's slow step and scripts/test.sh --slow
@pytest.mark.parametrize("jobs", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_kill_minus_9_then_resume_runs_every_spec_once(tmp_path, jobs):
    """A real `equibench run` (workers as subprocesses) holds its run directory: a second runner
    exits 2 naming it. Killed with SIGKILL mid-run, it leaves no worker behind and nothing that
    blocks `--resume`, which then completes every spec exactly once. (The points train 1500 steps,
    seconds each: with warm workers the 4-step points would all end before the second runner has
    even imported equibench.) With `--jobs 2` (slow) the same holds with two workers killed at once."""
    suite = write_suite(tmp_path / "suite.yaml", {"baseline": SMALL, "augmentation": SMALL}, seeds=(0, 1, 2),
                        name="killtest", steps=1500)
    cmd = [sys.executable, "-m", "equibench.cli", "run", str(suite), "--results-dir", str(tmp_path / "res"),
           "--name", "k", "--quiet", "--no-report", "--jobs", str(jobs)]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "res" / "k"
    deadline = time.time() + 240
    while time.time() < deadline and not read_records(run_dir):
        time.sleep(0.2)
    second = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert second.stderr.count("\n") == 1 and f"is in use by pid {first.pid} on " in second.stderr
    workers = [p for p in psutil.Process(first.pid).children(recursive=True)]
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    psutil.wait_procs(workers, timeout=10)
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], \
        "a worker outlived its killed runner"
    done = blocks_per_hash(run_dir)
    assert 1 <= len(done) < 6, "the kill should land mid-run"
    resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert blocks_per_hash(run_dir) == {h: 1 for h in blocks_per_hash(run_dir)}
    assert len(blocks_per_hash(run_dir)) == 6  # every spec exactly once


class _FullDiskAfter:
    """Stands in for the ``os`` module inside the store: ``write`` fails with ENOSPC after
    ``n`` blocks (a disk that fills up during the run)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __getattr__(self, name: str):
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        if self.n <= 0:
            os.write(fd, data[:len(data) // 2])  # a torn block, as a real full disk may leave
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.n -= 1
        return os.write(fd, data)


def test_full_disk_in_the_runner_stops_with_one_line_and_resume_finishes(tmp_path, monkeypatch, capsys):
    suite = write_suite(tmp_path / "suite.yaml", {"baseline": SMALL}, seeds=(0, 1, 2))
    argv = ["run", str(suite), "--results-dir", str(tmp_path / "res"), "--name", "full", "--no-isolate",
            "--quiet", "--no-report"]
    monkeypatch.setattr(store, "os", _FullDiskAfter(1))
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "--resume" in err
    run_dir = tmp_path / "res" / "full"
    assert len(blocks_per_hash(run_dir)) == 1
    monkeypatch.setattr(store, "os", os)  # space freed
    assert main(argv + ["--resume"]) == 0
    assert blocks_per_hash(run_dir) == {h: 1 for h in blocks_per_hash(run_dir)} and len(blocks_per_hash(run_dir)) == 3


def test_worker_that_cannot_write_its_result_is_not_a_finished_point(tmp_path, monkeypatch, capsys):
    flag = tmp_path / "disk-is-full"
    flag.touch()
    monkeypatch.setenv("EQUIBENCH_TEST_DISK_FULL", str(flag))
    suite = write_suite(tmp_path / "suite.yaml", {"baseline": SMALL, "disk_full": {}})
    argv = ["run", str(suite), "--results-dir", str(tmp_path / "res"), "--name", "w", "--quiet", "--no-report",
            "--plugin", FAULTS]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk full" in err
    run_dir = tmp_path / "res" / "w"
    assert [r["method"] for r in read_records(run_dir) if r["metric"] == "params"] == ["baseline"]
    assert not [r for r in read_records(run_dir) if r["method"] == "disk_full"]
    flag.unlink()  # space freed
    assert main(argv + ["--resume"]) == 0
    df = eb.load_results(run_dir)
    assert (by_method(df)["status"] == "ok").all() and len(blocks_per_hash(run_dir)) == 2


def test_unwritable_results_dir_is_one_line_exit_3(tmp_path, capsys):
    suite = write_suite(tmp_path / "suite.yaml", {"baseline": SMALL})
    (tmp_path / "file").write_text("")  # root ignores permission bits: a results dir below a file
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "file" / "res"), "--quiet", "--no-report"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err


@pytest.mark.parametrize("argv, message", [
    (["run", "smoke", "--max-memory", "4X"], "invalid memory size '4X'"),
    (["run", "smoke", "--timeout", "-1"], "invalid timeout"),
    (["scale", "--max-memory", "lots"], "invalid memory size"),
])
def test_cli_limit_options_bad_input(argv, message, capsys, tmp_path):
    assert main(argv + ["--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_submitit_executor_runs_the_same_worker(tmp_path):
    df = eb.run([tiny("baseline", **SMALL)], results_dir=tmp_path, run_name="s", executor="submitit",
                progress=False, timeout=300, executor_options={"cluster": "local"})  # Slurm: tests/test_slurm.py
    assert (df["status"] == "ok").all() and set(df["executor"]) == {"submitit:local"}
    assert "test.mse" in set(df["metric"]) and set(df["environment"]) == {"main"}
