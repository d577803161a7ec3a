"""The record schema: what ``records.jsonl`` holds, as pydantic models (the contract readers rely on).

A run directory's ``records.jsonl`` is tidy: one JSON object (a ``Record``) per measured number.
The records of one measurement point are written together as one block: a ``PointRecord`` (the
point's identity, outcome, timings, environment, implementation and failure details, the same on
each of its rows) holding its ``Measurement``s (metric, value, status, unit and the facets that
say how the number was measured). ``PointRecord.rows()`` flattens it into the stored rows and
``PointRecord.from_rows`` groups them back.

Every record written carries ``schema_version`` (``SCHEMA_VERSION``). Records written before
versioning have none: they are version 1 and ``upgrade.py`` brings them to this version on read.
Columns not declared here (a bench's own identity columns such as ``scaling_task``, or a
measurement's extra context such as ``symmetric_input``) are kept as they are (``extra="allow"``).
``results/README.md``'s schema tables are generated from these models (``docs.py``) and a test
keeps them equal.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .status import Status, worst

#: the version of the record layout written by this code (1: no ``schema_version``, no ``bench``,
#: timeouts as ``failed`` rows, bench kinds in ``task``; 2: this module)
SCHEMA_VERSION = 2

Options = dict[str, Any]


class _Columns(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class PointColumns(_Columns):
    """The columns that are the same on every row of a point."""

    schema_version: int = Field(SCHEMA_VERSION, description="version of the record layout (absent before "
                                "versioning: version 1, upgraded on read)")
    run_id: str | None = Field(None, description="the run folder's name")
    spec_hash: str | None = Field(None, description="hash of the point's full configuration: the resume key")
    bench: str | None = Field(None, description="the kind of point: `task` (train and evaluate), `tune` (a tuning "
                              "grid point), `scaling` (a cost-vs-size sweep point), `tp_bench` (a tensor-product "
                              "microbenchmark), or a plugin's bench")
    task: str | None = Field(None, description="the task (empty for `tp_bench`; a `scaling` point names the task "
                             "whose fields its synthetic graphs carry in `scaling_task`)")
    method: str | None = Field(None, description="the method (or tensor-product implementation)")
    seed: int | None = Field(None, description="the seed of model initialisation, batching and the training draw")
    task_options: Options | None = Field(None, description="the task's options the point ran with")
    method_options: Options | None = Field(None, description="the method's options the point ran with")
    train_config: Options | None = Field(None, description="the training settings (`train:`)")
    eval_config: Options | None = Field(None, description="the measurement settings (`evaluate:`)")
    setting: Options | None = Field(None, description="`tune` points: the grid setting tried")
    device: str | None = Field(None, description="the device asked for")
    device_name: str | None = Field(None, description="the hardware it ran on")
    git_commit: str | None = Field(None, description="the commit of the code that measured the row")
    versions: dict[str, str] | None = Field(None, description="package versions of the interpreter that measured "
                                            "the row")
    environment: str | None = Field(None, description="`main`, or the hash of the isolated environment the point "
                                    "ran in")
    executor: str | None = Field(None, description="which executor ran the point: `local` (worker processes), "
                                 "`local:<N>` (N workers at once, `--jobs N`; timings ran alone), "
                                 "`inline` (in the runner, `--no-isolate`) or `submitit:<cluster>`")
    slurm_job_id: str | None = Field(None, description="`submitit:slurm` rows: the Slurm array job that ran the "
                                     "point (`scontrol show job <id>_<task>`)")
    slurm_array_task_id: int | None = Field(None, description="`submitit:slurm` rows: the array task (index) that ran "
                                            "the point (absent when the wave was one job: submitit then submits a "
                                            "plain job)")
    slurm_state: str | None = Field(None, description="failure rows of `submitit:slurm`: the array task's final Slurm "
                                    "state (`CANCELLED`, `TIMEOUT`, `OUT_OF_MEMORY`, `FAILED`, ...; `GONE`: it left "
                                    "the queue unseen); a point that ended `CANCELLED`, `NODE_FAIL`, `PREEMPTED`, "
                                    "`BOOT_FAIL` or `GONE` is run again by `--resume`")
    implementation: str | None = Field(None, description="which code produced the row: `equibench <version>` or "
                                       "the wrapped library and its version")
    wall_s: float | None = Field(None, description="how long the point took end to end (s)")
    paused_s: float | None = Field(None, description="`local:<N>` rows: seconds of `wall_s` the worker was stopped "
                                   "while another worker timed (`--jobs`; not in the point's training time)")
    started_at: str | None = Field(None, description="UTC time the point started (ISO 8601)")
    finished_at: str | None = Field(None, description="UTC time the point ended (ISO 8601)")
    exact_claim: bool | None = Field(None, description="whether the method claims exact equivariance on this task")
    exact_scope: str | None = Field(None, description="where the claim holds: `every_input`, or `generic_inputs` "
                                    "(inputs without a symmetry of their own)")
    float32_caveat: str | None = Field(None, description="the method's known float32 limit of its claim, measured, "
                                       "with where and why (empty if none)")
    convergence: str | None = Field(None, description="`converged` / `not_converged` / `unknown` for `budget = "
                                    "fixed` (best validation value still improving by more than its standard error "
                                    "while the learning rate was at least half its peak); `converged` / "
                                    "`cap_reached` for `budget = converge` (a validation plateau before the step / "
                                    "time / FLOP cap, or not)")
    budget: str | None = Field(None, description="`fixed` or `converge`")
    setting_source: str | None = Field(None, description="where the training settings came from (suite file, "
                                       "stored tuning, a tuning run)")
    tuning_edge: str | None = Field(None, description="empty, or which edge of its (extended) grid the tuned "
                                    "setting sits at")
    provenance: Options | str | None = Field(None, description="where the task's data came from")
    exit_code: int | None = Field(None, description="failure rows: the worker's exit status")
    exit_signal: str | None = Field(None, description="failure rows: the signal that ended the worker")
    peak_rss_bytes: int | None = Field(None, description="failure rows: the worker's peak resident memory (bytes)")
    max_memory_bytes: int | None = Field(None, description="`out_of_memory` rows: the memory limit (`--max-memory`, "
                                         "bytes)")
    peak_cuda_bytes: int | None = Field(None, description="`out_of_memory` rows of a CUDA point: the device's peak "
                                        "allocation (bytes)")
    block: str | None = Field(None, description="the append block the row belongs to (one per point): a block cut "
                              "short by a kill is dropped on read")
    block_size: int | None = Field(None, description="how many rows the block holds")


class MeasurementColumns(_Columns):
    """The columns of one measured number."""

    metric: str = Field(description="the metric's catalogue name (`equibench.metrics.catalogue`: display name, "
                        "unit, direction, aggregation over seeds); `status` on a status-only row")
    value: float | None = Field(None, description="the measured value (empty on a status-only row)")
    status: Status = Field(Status.OK, description="how the row ended: " + "; ".join(
        f"`{s.value}`: {s.meaning}" for s in Status))
    error: str = Field("", description="the reason when the status is not `ok`")
    unit: str | None = Field(None, description="the metric's unit where the catalogue declares one")
    stage: str | None = Field(None, description="`init` / `trained` (equivariance), `training` (learning curve)")
    dtype: str | None = Field(None, description="`fp32` / `fp64`")
    group: str | None = Field(None, description="the symmetry group measured")
    batch_size: int | None = Field(None, description="graphs per batch")
    n_graphs: int | None = Field(None, description="graphs evaluated")
    repeats: int | None = Field(None, description="samples (timings, group elements) the value summarises")
    threads: int | None = Field(None, description="CPU threads while timing")
    timer: str | None = Field(None, description="the timer used")
    mode: str | None = Field(None, description="`inference` / `train` (throughput), the pass (tensor products)")
    calls_per_sample: int | None = Field(None, description="calls per timed sample")
    mem_method: str | None = Field(None, description="how peak memory was read")
    compiled: bool | None = Field(None, description="whether the model ran under `torch.compile`")
    unstable: bool | None = Field(None, description="throughput rows: the timing's repeats disagree (IQR / median "
                                  "above `equibench.metrics.throughput.UNSTABLE_REL_IQR`)")
    remeasured: int | None = Field(None, description="throughput rows: how often an unstable timing was taken again")
    load_avg_1min: float | None = Field(None, description="the machine's 1-minute load average when the timing "
                                        "finished")
    x: int | float | None = Field(None, description="the swept size (or step of a learning curve)")
    x_label: str | None = Field(None, description="the swept axis (`step`, `nodes`, `lmax`, ...)")
    floor: str | None = Field(None, description="`floor.*` rows: which floor (e.g. `constant_velocity`, `pca`)")
    val_metric: str | None = Field(None, description="the task metric validation selects on")
    curve_wall_s: float | None = Field(None, description="learning-curve rows: training seconds so far")
    curve_flops: float | None = Field(None, description="learning-curve rows: training FLOPs so far")


class Record(PointColumns, MeasurementColumns):
    """One line of ``records.jsonl``: a point's columns and one of its measurements."""


class Measurement(MeasurementColumns):
    """One measured number of a point, with its facets (extra columns allowed)."""


POINT_FIELDS = tuple(PointColumns.model_fields)


class PointRecord(PointColumns):
    """What one measurement point wrote: its columns and its measurements (one stored row each)."""

    measurements: list[Measurement] = Field(default_factory=list)

    @property
    def status(self) -> Status:
        """The point's outcome: the worst of its rows' statuses (``status.worst``)."""
        return worst(m.status for m in self.measurements)

    def rows(self) -> list[dict[str, Any]]:
        """The stored rows: the point's columns set on it, then each measurement's (which wins
        where both hold a column)."""
        point = self.model_dump(exclude={"measurements"}, exclude_unset=True)
        point["schema_version"] = self.schema_version
        return [{**point, **m.model_dump(exclude_unset=True), "status": m.status.value, "error": m.error,
                 "value": m.value} for m in self.measurements]

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> PointRecord:
        """Group the rows of one point (one block) back into a record: the declared point columns
        that every row shares are the point's, the rest stay with each measurement."""
        shared = {k: rows[0][k] for k in POINT_FIELDS
                  if k in rows[0] and all(k in r and r[k] == rows[0][k] for r in rows[1:])}
        return cls(**shared, measurements=[Measurement(**{k: v for k, v in r.items() if k not in shared})
                                           for r in rows])
