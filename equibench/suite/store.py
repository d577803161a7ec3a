"""Results on disk: ``results/<run_id>/records.jsonl`` (+ ``env.json``, ``specs.json``, Parquet).

One tidy row per (task, method, seed, metric, value) with its measurement context. The rows of
one finished spec are appended as ONE block by a single ``write`` on an ``O_APPEND`` descriptor,
then fsync'd; every row carries ``block`` (a unique id) and ``block_size``. A run killed mid-write
leaves at most one torn, incomplete block at the end of the file: ``read_records`` drops it (and
any unparseable line), so finished results are never lost or corrupted, and a resumed run
re-executes exactly the specs without a complete block.
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.errors import UserError

RECORDS = "records.jsonl"
ID_COLUMNS = ["run_id", "spec_hash", "task", "method", "seed", "metric", "value", "status"]


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def append_block(run_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append ``rows`` (one spec's results) atomically as one block to ``records.jsonl``."""
    if not rows:
        return
    block = uuid.uuid4().hex[:12]
    lines = [json.dumps({**r, "block": block, "block_size": len(rows)}, default=_json_default,
                        allow_nan=True) for r in rows]
    path = Path(run_dir) / RECORDS
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


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """All rows of complete blocks in ``run_dir/records.jsonl`` (torn blocks dropped)."""
    path = Path(run_dir) / RECORDS
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("block", "")] = counts.get(r.get("block", ""), 0) + 1
    return [r for r in rows if counts.get(r.get("block", "")) == r.get("block_size")]


def completed_specs(run_dir: Path) -> set[str]:
    """Spec hashes with a complete block (finished, failed or not applicable)."""
    return {r["spec_hash"] for r in read_records(run_dir)}


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _run_dirs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
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
    return out


def load_results(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """A DataFrame of all complete rows from run directories (or a results root holding them).

    Raises ``UserError`` when nothing is found.
    """
    dirs = _run_dirs(paths)
    rows = [r for d in dirs for r in read_records(d)]
    if not rows:
        raise UserError(f"no results found in {', '.join(map(str, dirs)) or paths}")
    df = pd.DataFrame(rows)
    for col in ID_COLUMNS:
        if col not in df:
            df[col] = None
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    return df


def write_parquet(run_dir: Path) -> Path | None:
    """Parquet copy of a run's rows (for history); nested values are stored as JSON strings."""
    rows = read_records(run_dir)
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
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path
