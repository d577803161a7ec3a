"""Results on disk: ``results/<run_id>/records.jsonl`` (+ ``env.json``, ``points.json``, Parquet).

One tidy row per (task, method, seed, metric, value) with its measurement context, in the layout
of ``schema.py`` (rows of earlier layouts are upgraded on read, ``upgrade.py``). The rows of
one finished spec are appended as ONE block by a single ``write`` on an ``O_APPEND`` descriptor,
then fsync'd; every row carries ``block`` (a unique id) and ``block_size``. A run killed mid-write
leaves at most one torn, incomplete block at the end of the file: ``read_records`` drops it (and
any unparseable line), so finished results are never lost or corrupted, and a resumed run
re-executes exactly the specs without a complete block.

A write that fails because the disk is full, over quota, read-only or not permitted raises
``StorageError`` (one line naming the path and the cause): the run stops, what was finished stays
intact (a torn block is dropped on read) and ``--resume`` finishes the run once there is room.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.errors import StorageError, UserError
from .schema import PointRecord
from .status import Status, worst
from .upgrade import upgrade

RECORDS = "records.jsonl"
ID_COLUMNS = ["run_id", "spec_hash", "bench", "task", "method", "seed", "metric", "value", "status"]
#: errno values that mean "this location cannot take results" (full, over quota, read-only,
#: forbidden, or below a file): not a bug in the run
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOTDIR})


def is_storage_error(err: BaseException) -> bool:
    """Whether ``err`` is a full disk, exhausted quota, read-only or forbidden location."""
    return isinstance(err, OSError) and err.errno in STORAGE_ERRNOS


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a storage ``OSError`` inside the block into a one-line ``StorageError`` about ``path``."""
    try:
        yield
    except OSError as err:
        if not is_storage_error(err):
            raise
        raise StorageError(f"cannot write {path}: {err.strerror or err}; finished results are kept, "
                           "make room (or fix the permissions) and rerun with --resume") from None


def check_writable(path: str | os.PathLike) -> None:
    """Raise ``StorageError`` (one line) unless results can be written under ``path``: checked
    before anything runs, so it names the cause (a file in the way, no permission) instead of
    the mid-run "finished results are kept" message."""
    target = Path(path)
    probe = target
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise StorageError(f"cannot write results in {target}: {probe} is a file, not a directory; choose "
                           "another --results-dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write results in {target}: {probe} is not writable (permissions or a "
                           "read-only file system); choose another --results-dir")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def append_block(run_dir: Path, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append ``rows`` (one spec's results) atomically as one block to ``records.jsonl``;
    returns them as written (with ``block`` and ``block_size``)."""
    if not rows:
        return []
    block = uuid.uuid4().hex[:12]
    written = [{**r, "block": block, "block_size": len(rows)} for r in rows]
    lines = [json.dumps(r, default=_json_default, allow_nan=True) for r in written]
    path = Path(run_dir) / RECORDS
    with storage_errors(path):
        _append(path, lines)
    return written


def _append(path: Path, lines: list[str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # a torn previous block may have left the file without a final newline
        size = os.fstat(fd).st_size
        prefix = ""
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                prefix = "" if f.read(1) == b"\n" else "\n"
        data = (prefix + "\n".join(lines) + "\n").encode()
        written = os.write(fd, data)
        if written != len(data):  # extremely unlikely for regular files; never leave half a block silently
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse(lines: Iterable[bytes]) -> list[dict[str, Any]]:
    rows = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def complete_blocks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of complete blocks (a block cut short by a kill is dropped), each upgraded to
    today's layout (``upgrade.upgrade``)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("block", "")] = counts.get(r.get("block", ""), 0) + 1
    return [upgrade(r) for r in rows if counts.get(r.get("block", "")) == r.get("block_size")]


class RunRecords:
    """The records of one run directory, read once: ``refresh`` reads only what was appended
    since the last read (complete lines), ``append`` writes a block and keeps it, so one
    invocation of ``equibench run`` (resume, tuning waves, the run's DataFrame, its outcome, its
    report, its Parquet copy) never reads ``records.jsonl`` twice. The handle ``eb.run_suite``
    returns."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir)
        self._raw: list[dict[str, Any]] = []
        self._offset = 0
        self._rows: list[dict[str, Any]] | None = None

    def refresh(self) -> RunRecords:
        """Read what was appended to ``records.jsonl`` since the last read."""
        path = self.path / RECORDS
        if not path.exists():
            return self
        with open(path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line without its newline is still being written (or torn)
        if end:
            self._raw.extend(_parse(data[:end].splitlines()))
            self._offset += end
            self._rows = None
        return self

    def append(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append ``rows`` as one block (``append_block``) and keep them; the caller holds the
        run directory's lock, so nothing else was appended since the last read."""
        written = append_block(self.path, rows)
        if written:
            self._raw.extend(written)
            self._offset = (self.path / RECORDS).stat().st_size
            self._rows = None
        return written

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Every row of a complete block, in today's layout."""
        if self._rows is None:
            self._rows = complete_blocks(self._raw)
        return self._rows

    def frame(self) -> pd.DataFrame:
        """The rows as ``load_results`` returns them for this directory."""
        rows, notes = merge_runs([(self.path, self.rows)])
        return results_frame(rows, notes, [self.path])

    def statuses(self) -> dict[str, Status]:
        """Each recorded point's outcome (``point_statuses``)."""
        return point_statuses(self.path, self.rows)

    def points(self) -> list[PointRecord]:
        """The point records (``read_points``)."""
        return read_points(self.path, self.rows)


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """All rows of complete blocks in ``run_dir/records.jsonl`` (torn blocks dropped), each in
    today's layout (rows of earlier schema versions are upgraded: ``upgrade.upgrade``)."""
    return RunRecords(run_dir).refresh().rows


def read_points(run_dir: Path, rows: list[dict[str, Any]] | None = None) -> list[PointRecord]:
    """The point records of ``run_dir`` (one per complete block, in order), from ``rows`` when
    the caller has read them already."""
    blocks: dict[str, list[dict[str, Any]]] = {}
    for r in read_records(run_dir) if rows is None else rows:
        blocks.setdefault(str(r.get("block", "")), []).append(r)
    return [PointRecord.from_rows(b) for b in blocks.values()]


def point_statuses(run_dir: Path, rows: list[dict[str, Any]] | None = None) -> dict[str, Status]:
    """Each recorded point's outcome (by ``spec_hash``): the worst status among the rows of its
    block (``status.worst``: a failure over ``ok`` over ``not_applicable`` / ``skipped``); a point
    recorded twice (a cancelled Slurm task run again by ``--resume``) counts by the block the
    tables keep (``merge_runs``: a finished one over a failed one, then the newest); from ``rows``
    when the caller has read them already."""
    by_point: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in read_records(run_dir) if rows is None else rows:
        by_point.setdefault(str(r.get("spec_hash")), {}).setdefault(str(r.get("block")), []).append(r)
    return {h: worst([r.get("status") for r in max(blocks.values(), key=_finished)])
            for h, blocks in by_point.items()}


def completed_specs(run_dir: Path) -> set[str]:
    """Spec hashes with a complete block (finished, failed or not applicable)."""
    return {r["spec_hash"] for r in read_records(run_dir)}


def write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace`` (readers see the
    old or the new file, never half of one); storage failures raise ``StorageError``."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with storage_errors(path):
        try:
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=indent, default=_json_default)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def run_dirs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The run directories named by ``paths`` (a run directory, or a results root holding them),
    each once."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / RECORDS).exists():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(d for d in p.iterdir() if (d / RECORDS).exists()))
        else:
            raise UserError(f"no results at {p} (expected a run directory with {RECORDS} or a results root)")
    seen: set[Path] = set()
    unique = []
    for d in out:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            unique.append(d)
    return unique


def _finished(rows: list[dict[str, Any]]) -> tuple[bool, str]:
    """Sort key of one point's block: finished (``ok``) first, then the newest ``finished_at``."""
    return (any(r.get("status") == Status.OK for r in rows), max(str(r.get("finished_at") or "") for r in rows))


def merge_runs(per_dir: list[tuple[Path, list[dict[str, Any]]]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of several run directories with every point (``spec_hash``: task, method, options,
    seed, settings) counted once, and notes saying what was merged. A point recorded in several
    runs (a rerun) keeps the block of the newest finished one (an ``ok`` block over a failed one,
    then the latest ``finished_at``); a (task, method, seed) measured under different settings in
    different runs is kept but named (the tables aggregate its configurations together)."""
    blocks: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {}
    for d, rows in per_dir:
        mine: dict[str, list[dict[str, Any]]] = {}
        for i, r in enumerate(rows):  # a row without a point hash is its own point
            h = r.get("spec_hash")
            mine.setdefault(str(h) if h is not None else f"{d}#{i}", []).append(r)
        for h, block in mine.items():
            blocks.setdefault(h, []).append((d.name, block))
    kept: list[dict[str, Any]] = []
    replaced: dict[tuple[str, str], int] = {}
    for candidates in blocks.values():
        run, block = max(candidates, key=lambda c: _finished(c[1]))
        kept.extend(block)
        for other, _ in candidates:
            if other != run:
                replaced[(other, run)] = replaced.get((other, run), 0) + 1
    notes = []
    if len(per_dir) > 1:
        notes.append(f"merged {len(per_dir)} runs: {', '.join(d.name for d, _ in per_dir)}")
    for (old, new), n in sorted(replaced.items()):
        notes.append(f"{n} point(s) of run {old} were measured again in run {new} (same task, method, options and "
                     f"seed): counted once, from {new} (newest finished)")
    configs: dict[tuple[str, str, str], set[tuple[str, str]]] = {}
    for r in kept:
        if r.get("task") is not None and r.get("seed") is not None:
            configs.setdefault((str(r["task"]), str(r.get("method")), str(r["seed"])), set()).add(
                (str(r.get("spec_hash")), str(r.get("run_id"))))
    for (task, method, seed), found in sorted(configs.items()):
        runs = sorted({run for _, run in found})
        if len({h for h, _ in found}) > 1 and len(runs) > 1:
            notes.append(f"{task}/{method} seed {seed} was measured under different settings in runs "
                         f"{', '.join(runs)}: the tables aggregate them together")
    return kept, notes


def load_results(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """A DataFrame of all complete rows from run directories (or a results root holding them),
    each point counted once (``merge_runs``; its notes in ``df.attrs["merged"]``).

    Raises ``UserError`` when nothing is found.
    """
    dirs = run_dirs(paths)
    rows, notes = merge_runs([(d, read_records(d)) for d in dirs])
    if not rows:
        raise UserError(f"no results found in {', '.join(map(str, dirs)) or paths}")
    return results_frame(rows, notes, dirs)


def results_frame(rows: list[dict[str, Any]], notes: list[str], dirs: Sequence[Path]) -> pd.DataFrame:
    """``rows`` as the DataFrame ``load_results`` returns (``notes`` in ``attrs["merged"]``);
    ``UserError`` when there are none."""
    if not rows:
        raise UserError(f"no results found in {', '.join(map(str, dirs))}")
    df = pd.DataFrame(rows)
    df.attrs["merged"] = notes
    for col in ID_COLUMNS:
        if col not in df:
            df[col] = None
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    return df


def write_parquet(run_dir: Path, rows: list[dict[str, Any]] | None = None) -> Path | None:
    """Parquet copy of a run's rows (for history; ``rows`` when the caller has them, else read);
    nested values are stored as JSON strings."""
    rows = read_records(run_dir) if rows is None else rows
    if not rows:
        return None
    df = pd.DataFrame(rows)
    for col in df.columns:
        if df[col].map(lambda v: isinstance(v, (dict, list))).any():
            df[col] = df[col].map(lambda v: json.dumps(v, sort_keys=True, default=_json_default)
                                  if isinstance(v, (dict, list)) else v)
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    obj_cols = [c for c in df.columns if df[c].dtype == object]
    df[obj_cols] = df[obj_cols].astype("string")
    path = Path(run_dir) / "records.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    with storage_errors(path):
        try:
            df.to_parquet(tmp, index=False)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    return path


def upgrade_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (rows as a DataFrame, e.g. built by hand or read from an older Parquet copy) in
    today's layout: the frame itself when every row names its ``bench``, else its rows upgraded
    (``upgrade.upgrade``; a row without ``schema_version`` is version 1)."""
    if df.empty or ("bench" in df and df["bench"].notna().all()):
        return df
    rows = [{str(k): v for k, v in r.items() if not (isinstance(v, float) and v != v and k != "value")}
            for r in df.to_dict("records")]
    out = pd.DataFrame([upgrade(r) for r in rows], index=df.index)
    out.attrs.update(df.attrs)
    return out
