"""``executor="submitit"``: the same ``run_one`` specs as a Slurm job array through submitit.

With Slurm present (``sbatch`` on PATH) the specs go out as one array job (partition, GPUs per
node, time limit and array parallelism from ``executor_options``); without it, submitit's local
executor runs them as subprocesses, ``parallelism`` at a time (default 1: the machine's cores are
the benchmark's). Rows land in the same store as the local executor's (one atomic block per spec),
so ``--resume`` works across executors. A job that raises, is killed or times out is recorded as
a ``failed`` row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..core.errors import UserError
from ..core.registry import load_plugin
from ..core.spec import RunSpec
from .store import append_block

OPTION_TYPES = {"partition": str, "gpus_per_node": int, "timeout_min": (int, float), "parallelism": int,
                "cpus_per_task": int, "mem_gb": (int, float), "cluster": str}


def submitit_job(spec_dict: dict[str, Any], plugins: Sequence[str]) -> list[dict[str, Any]]:
    """What one array task runs (module-level so submitit can pickle it)."""
    from .runner import run_one
    for p in plugins:
        load_plugin(p)
    return run_one(RunSpec.from_dict(spec_dict))


def make_executor(folder: Path, options: dict[str, Any], timeout: float | None):
    import submitit
    for k, v in options.items():
        if k not in OPTION_TYPES:
            raise UserError(f"unknown submitit option {k!r} (known: {', '.join(sorted(OPTION_TYPES))})")
        if not isinstance(v, OPTION_TYPES[k]) or isinstance(v, bool):
            raise UserError(f"submitit option {k!r} has the wrong type: {v!r}")
    executor = submitit.AutoExecutor(folder=folder, cluster=options.get("cluster"))
    timeout_min = options.get("timeout_min", (timeout / 60.0) if timeout else 60.0)
    params: dict[str, Any] = {"timeout_min": max(1, int(round(timeout_min))) if executor.cluster == "slurm"
                              else timeout_min}
    if "gpus_per_node" in options:
        params["gpus_per_node"] = options["gpus_per_node"]
    if executor.cluster == "slurm":
        params["slurm_array_parallelism"] = options.get("parallelism", 16)
        if "partition" in options:
            params["slurm_partition"] = options["partition"]
        if "cpus_per_task" in options:
            params["cpus_per_task"] = options["cpus_per_task"]
        if "mem_gb" in options:
            params["mem_gb"] = options["mem_gb"]
    executor.update_parameters(**params)
    return executor


def run_submitit(specs: Sequence[RunSpec], run_dir: Path, plugins: Sequence[str], options: dict[str, Any],
                 timeout: float | None) -> None:
    """Run ``specs`` through submitit and append each one's rows to ``run_dir`` as it finishes."""
    if not specs:
        return
    from .runner import status_rows
    executor = make_executor(run_dir / "submitit", options, timeout)
    wave = len(specs) if executor.cluster == "slurm" else max(1, int(options.get("parallelism", 1)))
    for start in range(0, len(specs), wave):
        chunk = list(specs[start:start + wave])
        jobs = executor.map_array(submitit_job, [s.to_dict() for s in chunk], [list(plugins)] * len(chunk))
        for spec, job in zip(chunk, jobs):
            try:
                rows = job.result()
            except Exception as err:  # raised in the job, killed, or timed out
                last = str(err).strip().splitlines()
                rows = status_rows(spec, "failed", f"submitit job {job.job_id}: {last[-1] if last else type(err).__name__}")
            for r in rows:
                r["run_id"] = run_dir.name
                r["executor"] = f"submitit:{executor.cluster}"
            append_block(run_dir, rows)
