"""Isolated method environments (``equibench.engine.envs``): a method pinned to e3nn 0.5.1 runs
in its own layered virtual environment and reports that version, while the main environment
keeps e3nn 0.6.0. Needs PyPI (or pip's cache) the first time; the environment is built into a
fresh folder per test session so the build itself is exercised."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import equibench as eb
from equibench.engine.envs import env_key, env_root, environment_for
from equibench.engine.lock import exclusive

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = str(ROOT / "tests" / "plugins" / "old_e3nn.py")
TINY = dict(task="nbody", task_options={"train_size": 32, "val_size": 8, "test_size": 16},
            train={"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 16},
            evaluate={"equivariance_samples": 2, "equivariance_graphs": 4, "throughput": False,
                      "lie_derivative": False})
E3NN = {"mul": 4, "lmax": 1, "depth": 1}


def _pip_list_e3nn() -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "list", "--disable-pip-version-check"], capture_output=True,
                         text=True, check=True).stdout
    return next(line.split()[1] for line in out.splitlines() if line.split() and line.split()[0] == "e3nn")


@pytest.fixture(scope="module")
def env_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("envs")
    mp = pytest.MonkeyPatch()
    mp.setenv("EQUIBENCH_ENV_DIR", str(path))
    yield path
    mp.undo()


@pytest.mark.slow  # builds an environment (~40 s); .ci/run's slow step
def test_pinned_method_runs_in_its_own_environment(env_dir, tmp_path, capfd):
    assert importlib.metadata.version("e3nn") == "0.6.0"
    specs = [eb.RunSpec(method=m, method_options=E3NN, **TINY) for m in ("e3nn_051", "e3nn", "no_such_requirement")]
    df = eb.run(specs, results_dir=tmp_path, run_name="envs", plugins=[PLUGIN], progress=True)
    by = df.drop_duplicates("spec_hash").set_index("method")
    key = env_key(("e3nn==0.5.1",))
    assert by.loc["e3nn_051", "status"] == "ok", by.loc["e3nn_051", "error"]
    assert by.loc["e3nn_051", "versions"]["e3nn"] == "0.5.1" and by.loc["e3nn_051", "environment"] == key
    assert by.loc["e3nn", "versions"]["e3nn"] == "0.6.0" and by.loc["e3nn", "environment"] == "main"
    old = df[(df["method"] == "e3nn_051") & (df["metric"] == "equivariance.trained.fp64.rel_max")]["value"].item()
    assert old < 1e-10  # the old e3nn is exact too
    bad = by.loc["no_such_requirement"]
    assert bad["status"] == "failed" and "could not be built" in bad["error"] and "ERROR" in bad["error"]
    err = capfd.readouterr().err
    assert f"building environment {key}" in err and "e3nn==0.5.1" in err and "Installing" in err
    assert (env_root() / key / "equibench-env.json").exists() and (env_root() / f"{key}.log").exists()
    # the runner's environment is untouched
    assert importlib.metadata.version("e3nn") == "0.6.0" and _pip_list_e3nn() == "0.6.0"


@pytest.mark.slow  # builds an environment (~40 s); .ci/run's slow step
def test_a_built_environment_is_reused(env_dir, tmp_path, capfd):
    specs = [eb.RunSpec(method="e3nn_051", seed=1, method_options=E3NN, **TINY)]
    df = eb.run(specs, results_dir=tmp_path, run_name="again", plugins=[PLUGIN], progress=False)
    assert (df["status"] == "ok").all() and df["versions"].iloc[0]["e3nn"] == "0.5.1"
    assert "building environment" not in capfd.readouterr().err


@pytest.mark.slow  # builds an environment (~40 s); .ci/run's slow step
def test_one_builder_per_environment(env_dir, capfd):
    """While another runner holds an environment's build lock, a second one waits (and says so)."""
    reqs = ("pyyaml>=5",)  # already in the runner's environment: pip installs nothing, the build is quick
    key = env_key(reqs)
    env_root().mkdir(parents=True, exist_ok=True)
    holding = threading.Event()

    def hold() -> None:
        with exclusive(env_root() / f"{key}.lock", "environment (test holder)"):
            holding.set()
            time.sleep(1.5)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(10)
    t0 = time.monotonic()
    env = environment_for(reqs)
    holder.join()
    assert time.monotonic() - t0 >= 1.0
    assert f"waiting for environment {key}" in capfd.readouterr().err
    assert Path(env.python).exists() and env.versions["torch"] == importlib.metadata.version("torch")
