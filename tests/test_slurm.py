"""The submitit executor against a real Slurm cluster (issue 23): array jobs through ``sbatch``,
cancelled / timed-out / over-memory array tasks, ``--resume`` after a killed runner, an isolated
environment used from the node, and the nightly schedule from cron.

The cluster tests are marked ``slurm`` and deselected by default (``scripts/test.sh --slurm``
runs them): their fixture starts the single-node cluster of ``scripts/slurm-local.sh`` (Debian's
slurm-wlm; root) or uses one that already answers ``sinfo``. A few checks need no cluster and
run with the default tests: bad input, how a Slurm end reads on a row, what ``--resume`` reruns.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import equibench as eb
from equibench.benches.base import bench_class
from equibench.cli import main
from equibench.core.errors import UserError
from equibench.core.registry import load_plugin
from equibench.engine import slurm
from equibench.engine.engine import run_benches
from equibench.engine.envs import env_key, env_root
from equibench.engine.executors import check_executor
from equibench.results.status import Status
from equibench.results.store import point_statuses, read_records

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm-local.sh"
TOY = str(ROOT / "tests" / "plugins" / "slurm_toy.py")
OLD_E3NN = str(ROOT / "tests" / "plugins" / "old_e3nn.py")
PARTITION = os.environ.get("EQUIBENCH_SLURM_PARTITION", "debug")
#: metrics that depend on the clock or the machine's load, not on the seed
NOT_DETERMINISTIC = ("throughput.", "profile.", "train.wall_s", "train.steps_per_s")


# ---- no cluster needed (default tests) -------------------------------------------------------

def test_slurm_option_without_sbatch_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    code = main(["run", "smoke", "--executor", "submitit", "--executor-option", "partition=gpu",
                 "--results-dir", str(tmp_path / "res"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "need Slurm, but sbatch is not on PATH" in err
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").iterdir())  # nothing written
    with pytest.raises(UserError, match="sbatch is not on PATH"):
        check_executor("submitit", {"cluster": "slurm"})


@pytest.mark.parametrize("option, message", [
    ("mem_gb=lots", "submitit option 'mem_gb' has the wrong type: 'lots' (expected int or float)"),
    ("cpus_per_task=1.5", "submitit option 'cpus_per_task' has the wrong type: 1.5 (expected int)"),
    ("parallelism=0", "submitit option 'parallelism' must be positive"),
    ("partitoin=debug", "unknown submitit option 'partitoin'"),
    ("cluster=pbs", "'cluster' must be slurm, local or debug"),
    ("nonsense", "expected KEY=VALUE"),
])
def test_executor_option_bad_input_is_one_line(option, message, tmp_path, capsys):
    code = main(["run", "smoke", "--executor", "submitit", "--executor-option", option,
                 "--results-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not any(tmp_path.iterdir())


def test_how_a_slurm_end_reads_on_the_row():
    gib = 2**30
    assert slurm.ending("COMPLETED", "7_1", "", 5, None) is None
    status, text = slurm.ending("CANCELLED", "7_1", "", 5, None)
    assert status == Status.FAILED and "cancelled on Slurm (scancel)" in text and "7_1" in text
    status, text = slurm.ending("TIMEOUT", "7_2", "", 3, None)
    assert status == Status.TIMEOUT and "Slurm time limit of 3 min" in text
    # without cgroups slurmstepd's sampler kills the step: FAILED, its reason only in the log
    status, text = slurm.ending("FAILED", "7_3", "slurmstepd-vm: error: Exceeded job memory limit", 5, 2 * gib)
    assert status == Status.OUT_OF_MEMORY and "2 GiB (mem_gb)" in text
    assert slurm.ending("OUT_OF_MEMORY", "7_3", "", 5, gib)[0] == Status.OUT_OF_MEMORY
    status, text = slurm.ending("NODE_FAIL", "7_4", "boom", 5, None)
    assert status == Status.FAILED and "NODE_FAIL: boom" in text
    assert "left the Slurm queue" in slurm.ending(None, "7_5", "", 5, None)[1]


def test_resume_reruns_interrupted_points_only():
    def row(h: str, block: str, status: str, state: str | None = None) -> dict:
        return {"spec_hash": h, "block": block, "status": status, "metric": "status", "slurm_state": state,
                "finished_at": block}
    rows = [row("a", "1", "ok"), row("b", "2", "failed", "CANCELLED"), row("c", "3", "timeout", "TIMEOUT"),
            row("d", "4", "failed", "NODE_FAIL"), row("e", "5", "failed", "CANCELLED"), row("e", "6", "ok")]
    assert slurm.interrupted(rows) == {"b", "d"}
    # a point cancelled, then measured by --resume: counted by its finished block
    assert point_statuses(Path("."), rows) == {"a": Status.OK, "b": Status.FAILED, "c": Status.TIMEOUT,
                                               "d": Status.FAILED, "e": Status.OK}


# ---- the cluster ---------------------------------------------------------------------------

def _answers() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="session")
def cluster() -> Iterator[str]:
    """The partition of a Slurm cluster that answers: the local one (``scripts/slurm-local.sh``,
    started here and stopped again when it was not running before) or one already up."""
    started = False
    if not _answers():
        res = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            pytest.fail(f"the local Slurm cluster did not start: {res.stderr.strip().splitlines()[-1:]}")
        started = True
    yield PARTITION
    if started:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


def _our_tasks(name: str, states: str = "PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED") -> list[str]:
    """``<array>_<task>|STATE`` of the tasks of our job name still in the queue."""
    out = subprocess.run(["squeue", "-h", "-r", "-n", f"equibench-{name}", "-t", states, "-o", "%i|%T"],
                         capture_output=True, text=True, timeout=60, check=True)
    return [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]


def _wait_for(what: str, check, timeout: float = 180.0, every: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _by_name(run_dir: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in read_records(run_dir):
        out.setdefault(r["name"], []).append(r)
    return out


def _blocks(run_dir: Path) -> dict[str, int]:
    seen: dict[str, set] = {}
    for r in read_records(run_dir):
        seen.setdefault(r["spec_hash"], set()).add(r["block"])
    return {h: len(b) for h, b in seen.items()}


def _toy(actions: list[tuple[str, str, float, int]]):
    load_plugin(TOY)
    return bench_class("slurm_toy")(actions)


@pytest.mark.slurm
def test_smoke_suite_through_sbatch_equals_a_local_run(cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads both ways: bitwise equal sums
    res, reports = str(tmp_path / "results"), str(tmp_path / "reports")
    assert main(["run", "smoke", "--executor", "submitit", "--executor-option", f"partition={cluster}",
                 "--results-dir", res, "--reports-dir", reports, "--name", "slurm", "--quiet"]) == 0
    assert (Path(reports) / "slurm" / "index.html").exists()  # the report renders the Slurm run
    assert main(["run", "smoke", "--results-dir", res, "--name", "local", "--no-report", "--quiet"]) == 0
    capsys.readouterr()
    on_slurm, local = read_records(Path(res) / "slurm"), read_records(Path(res) / "local")
    assert {r["executor"] for r in on_slurm} == {"submitit:slurm"} and {r["executor"] for r in local} == {"local"}
    ids = {(r["spec_hash"], r["slurm_job_id"], r["slurm_array_task_id"]) for r in on_slurm}
    assert len(ids) == len({r["spec_hash"] for r in on_slurm}) == 3  # one array task per point
    assert len({job for _, job, _ in ids}) == 1 and sorted(t for _, _, t in ids) == [0, 1, 2]  # one array job
    job = next(iter(ids))[1]
    shown = subprocess.run(["scontrol", "show", "job", f"{job}_0"], capture_output=True, text=True).stdout
    assert "JobName=equibench-slurm" in shown or not shown  # (gone once MinJobAge has passed)

    def values(rows: list[dict]) -> dict[tuple, object]:
        keys = ("spec_hash", "metric", "stage", "dtype", "group", "batch_size", "step", "split", "mode")
        return {tuple(json.dumps(r.get(k)) for k in keys): r.get("value") for r in rows
                if r["status"] == "ok" and not r["metric"].startswith(NOT_DETERMINISTIC)}
    a, b = values(on_slurm), values(local)
    assert a.keys() == b.keys() and len(a) > 100
    assert {k: v for k, v in a.items() if b[k] != v} == {}  # bitwise, value by value
    assert any('"test.mse"' in k[1] for k in a) and any("equivariance.trained" in k[1] for k in a)


@pytest.mark.slurm
def test_scancel_one_array_task_then_resume_runs_only_it(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("EQUIBENCH_TEST_RELEASE", str(tmp_path / "release"))
    bench = _toy([("first", "rows", 0, 0), ("cancelled", "block", 120, 0), ("third", "sleep", 1, 0)])
    run_dir = tmp_path / "cancel"
    done = threading.Event()

    def cancel_task_1() -> None:
        task = _wait_for("array task 1 running", lambda: [t.split("|")[0] for t in _our_tasks("cancel")
                                                          if t.split("|")[0].endswith("_1") and "RUNNING" in t])[0]
        _wait_for("its worker on the point", lambda: list((run_dir / "work").glob("*/current")))
        subprocess.run(["scancel", task], check=True)
        done.set()

    t = threading.Thread(target=cancel_task_1, daemon=True)
    t.start()
    run_benches([bench], run_dir, executor="submitit", plugins=[TOY], progress=False,
                executor_options={"partition": cluster, "parallelism": 3})
    t.join(5)
    assert done.is_set()
    rows = _by_name(run_dir)
    (cancelled,) = rows["cancelled"]
    assert cancelled["status"] == "failed" and cancelled["slurm_state"] == "CANCELLED"
    assert "cancelled on Slurm (scancel)" in cancelled["error"] and cancelled["slurm_array_task_id"] == 1
    assert all(r["status"] == "ok" for n in ("first", "third") for r in rows[n])
    first_job = cancelled["slurm_job_id"]
    assert not _our_tasks("cancel")

    (tmp_path / "release").touch()
    run_benches([bench], run_dir, executor="submitit", plugins=[TOY], progress=False,
                executor_options={"partition": cluster})
    rows = _by_name(run_dir)
    again = [r for r in rows["cancelled"] if r["status"] == "ok"]
    assert len(again) == 1 and again[0]["slurm_job_id"] != first_job
    assert "slurm_array_task_id" not in again[0]  # one job alone: submitit submits a plain job, not an array
    blocks = _blocks(run_dir)
    assert blocks["slurmtoy-cancelled"] == 2 and blocks["slurmtoy-first"] == blocks["slurmtoy-third"] == 1
    assert {r["slurm_job_id"] for n in ("first", "third") for r in rows[n]} == {first_job}  # not run again
    assert set(point_statuses(run_dir).values()) == {Status.OK}
    assert not _our_tasks("cancel")


@pytest.mark.slurm
def test_slurm_time_limit_and_memory_limit_become_rows(cluster, tmp_path):
    bench = _toy([("fine", "rows", 0, 0), ("slow", "sleep", 600, 0), ("hog", "hog", 60, 2500)])
    run_dir = run_benches([bench], tmp_path / "limits", executor="submitit", plugins=[TOY], progress=False,
                          executor_options={"partition": cluster, "timeout_min": 1, "mem_gb": 1.5,
                                            "parallelism": 3})
    rows = _by_name(run_dir)
    assert [r["status"] for r in rows["fine"]] == ["ok"]
    (slow,) = rows["slow"]
    assert slow["status"] == "timeout" and "Slurm time limit of 1 min" in slow["error"]
    assert slow["slurm_state"] == "TIMEOUT"
    (hog,) = rows["hog"]
    assert hog["status"] == "out_of_memory", hog["error"]
    if "killed by Slurm" in hog["error"]:  # slurmstepd's sampler (every second) won the race against our watcher
        assert "memory limit of 1.5 GiB (mem_gb)" in hog["error"] and "Exceeded job memory limit" in hog["error"]
    else:  # the worker's own watcher, held to mem_gb, stopped it first
        assert "mem_gb (1.5 GiB)" in hog["error"], hog["error"]
        assert 0 < hog["max_memory_bytes"] < 1.5 * 2**30 and hog["peak_rss_bytes"] > hog["max_memory_bytes"]
    assert not _our_tasks("limits")


@pytest.mark.slurm
def test_isolated_environment_is_built_once_and_used_on_the_node(cluster, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("EQUIBENCH_ENV_DIR", str(tmp_path / "envs"))  # shared storage: the nodes see it
    tiny = dict(task="nbody", task_options={"train_size": 32, "val_size": 8, "test_size": 16},
                train={"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 16},
                evaluate={"equivariance_samples": 2, "equivariance_graphs": 4, "throughput": False,
                          "lie_derivative": False})
    specs = [eb.RunSpec(method="e3nn_051", seed=s, method_options={"mul": 4, "lmax": 1, "depth": 1}, **tiny)
             for s in (0, 1)]
    df = eb.run(specs, results_dir=tmp_path, run_name="env", plugins=[OLD_E3NN], progress=True,
                executor="submitit", executor_options={"partition": cluster})
    points = df.drop_duplicates("spec_hash")
    key = env_key(("e3nn==0.5.1",))
    assert (points["status"] == "ok").all(), points["error"].tolist()
    assert set(points["environment"]) == {key} and {v["e3nn"] for v in points["versions"]} == {"0.5.1"}
    assert sorted(points["slurm_array_task_id"]) == [0, 1] and points["slurm_job_id"].nunique() == 1
    assert capfd.readouterr().err.count(f"building environment {key}") == 1  # once, by the runner
    assert [p.name for p in env_root().iterdir() if p.is_dir()] == [key]


@pytest.mark.slurm
def test_kill_runner_then_resume_runs_every_point_once(cluster, tmp_path, monkeypatch, capfd):
    release = tmp_path / "release"
    monkeypatch.setenv("EQUIBENCH_TEST_RELEASE", str(release))  # the runners' environment reaches the tasks
    actions = [("p0", "rows", 0, 0), ("p1", "block", 120, 0), ("p2", "block", 120, 0), ("p3", "block", 120, 0)]
    run_dir = tmp_path / "killed"
    script = textwrap.dedent(f"""
        from equibench.core.registry import load_plugin
        from equibench.benches.base import bench_class
        from equibench.engine.engine import run_benches
        load_plugin({TOY!r})
        run_benches([bench_class("slurm_toy")({actions!r})], {str(run_dir)!r}, executor="submitit",
                    plugins=[{TOY!r}], progress=False, executor_options={{"partition": {cluster!r}, "parallelism": 2}})
    """)
    with open(tmp_path / "runner.log", "w") as log:
        runner = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for("two tasks running and two queued", lambda: (
            sum("RUNNING" in t for t in _our_tasks("killed")) >= 1
            and sum("PENDING" in t for t in _our_tasks("killed")) >= 1), timeout=120)
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait(30)
    finally:
        if runner.poll() is None:
            runner.kill()
    left = _our_tasks("killed")
    assert left, "the array tasks outlive the killed runner"
    release.touch()
    capfd.readouterr()
    run_benches([_toy(actions)], run_dir, executor="submitit", plugins=[TOY], progress=False,
                executor_options={"partition": cluster})
    assert f"cancelling {len(left)} Slurm task(s) left by an earlier runner" in capfd.readouterr().err
    blocks = _blocks(run_dir)
    assert blocks == {f"slurmtoy-p{i}": 1 for i in range(4)}  # every spec exactly once
    assert set(point_statuses(run_dir).values()) == {Status.OK}
    assert not _our_tasks("killed") and not (run_dir / "submitit" / slurm.JOBS_FILE).exists()
    first_array = left[0].split("_")[0]
    assert all(r["slurm_job_id"] != first_array for rows in _by_name(run_dir).values() for r in rows)


@pytest.mark.slurm
def test_unknown_partition_is_one_line(cluster, tmp_path, capsys):
    code = main(["run", "smoke", "--executor", "submitit", "--executor-option", "partition=no_such_partition",
                 "--results-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown Slurm partition 'no_such_partition'" in err
    assert f"this cluster has: {cluster}" in err or cluster in err


@pytest.mark.slurm
@pytest.mark.parametrize("tool", ["scrontab", "crontab"])
def test_nightly_from_a_schedule_appends_to_the_history(cluster, tool, tmp_path):
    """A ``scrontab`` entry (Slurm's cron: the runner itself runs as a Slurm job) or a crontab entry
    that fires within a minute runs ``equibench nightly smoke --executor submitit``; the history
    gains the run. Debian's slurm-client 22.05 has no scrontab binary: ``scripts/slurm-local.sh
    scrontab`` builds it from Debian's source; ``scripts/slurm-local.sh cron`` starts cron. The
    previous table of entries is restored (a running job is not cancelled by that)."""
    res, log, name = tmp_path / "results", tmp_path / "nightly.log", f"nightly-{tool}"
    command = (f"cd {ROOT} && OMP_NUM_THREADS=1 {ROOT / '.venv' / 'bin' / 'equibench'} nightly smoke "
               f"--executor submitit --executor-option partition={cluster} --results-dir {res} "
               f"--reports-dir {tmp_path / 'reports'} --name {name} --quiet >> {log} 2>&1")
    ready = subprocess.run([str(SCRIPT), "scrontab" if tool == "scrontab" else "cron"], capture_output=True,
                           text=True, timeout=900)
    assert ready.returncode == 0, ready.stderr
    before = subprocess.run([tool, "-l"], capture_output=True, text=True)
    old = before.stdout if before.returncode == 0 else ""
    entry = f"#SCRON --partition={cluster} --time=30 --job-name=equibench-{name}\n" if tool == "scrontab" else ""
    entry += f"* * * * * {command}\n"
    table = tmp_path / "table"
    table.write_text(old + ("" if not old or old.endswith("\n") else "\n") + entry)
    try:
        subprocess.run([tool, str(table)], check=True, capture_output=True, text=True)
        _wait_for("the scheduled nightly to start", lambda: (res / name).exists(), timeout=150)
    finally:
        if old:
            (tmp_path / "old").write_text(old)
            subprocess.run([tool, str(tmp_path / "old")], check=True, capture_output=True)
        else:
            subprocess.run([tool, "-r"], capture_output=True)

    def in_history() -> bool:
        path = res / "history.parquet"
        return path.exists() and name in set(pd.read_parquet(path)["run_id"])
    _wait_for("the nightly history entry", in_history, timeout=300, every=2)
    rows = read_records(res / name)
    assert {r["executor"] for r in rows} == {"submitit:slurm"} and all(r["slurm_job_id"] for r in rows)
    last = _wait_for("the nightly's last line", lambda: [ln for ln in log.read_text().splitlines()
                                                        if ln.startswith("points:")], timeout=120)
    assert last == ["points: 3 ok (exit 0)"]
