"""Isolated environments for methods that declare ``requirements`` (e.g. ``("e3nn==0.5.1",)``).

A method's points run in a virtual environment built once per requirement set and kept under
``$EQUIBENCH_ENV_DIR`` (default ``~/.cache/equibench/envs``) as ``<key>/``, where ``key`` hashes
the sorted requirements and the runner's interpreter and environment (``sys.prefix``, version).

The environment is *layered*: ``python -m venv --without-pip`` from the runner's interpreter, a
``.pth`` file in its site-packages that calls ``site.addsitedir`` on the runner environment's
site-packages (so torch and everything else is inherited, *behind* the environment's own
packages), then ``python -m pip install <requirements>`` run by the new interpreter (pip itself
is inherited). pip sees the inherited packages as installed, downloads only what differs and
installs it into the new environment, shadowing the runner's copy; it never removes the runner's
copy ("Not uninstalling ... outside environment"). ``uv pip install`` is not used even when uv is
on PATH: uv only looks at the target environment's own site-packages, not at folders a ``.pth``
adds, so it would reinstall torch and the rest into every environment.

Guarantees: two runners never build the same environment at once (a lock per key; the second
waits, then reuses it); an environment is built in a temporary folder and renamed into place
only once it imports equibench (its symmetry layer, hence e3nn, included), so a folder under its
key is complete (``startup_lines`` adds what an old pinned package needs at start); the build
shows which environment, the requirements and pip's Collecting/Downloading/Installing lines on
stderr and logs everything to ``<key>.log``; a failed build raises ``EnvBuildError`` with the
installer's last error line (the runner records a ``failed`` row for each point of the method).

Pre-building (set-up): ``python -m equibench.engine.envs build METHOD...`` (``main``).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.envinfo import package_versions
from ..core.errors import StorageError, UserError
from ..core.registry import method_class
from ..results.store import storage_errors
from .launch import site_dirs, worker_environ
from .lock import exclusive

MARKER = "equibench-env.json"
_SHOW = re.compile(r"^\s*(Collecting|Downloading|Installing|Successfully)")
#: pip's notice that the runner's own packages pin other versions: expected in a layered env
_NOTICE = "dependency resolver does not currently take into account"
_FULL = ("[Errno 28]", "No space left on device", "[Errno 122]", "Disk quota exceeded")


class EnvBuildError(Exception):
    """An isolated environment could not be built; ``str(err)`` is the installer's last error."""


@dataclass(frozen=True)
class Environment:
    """Where a point runs: ``id`` "main" (the runner's interpreter) or an environment key."""

    id: str
    python: str
    requirements: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict, compare=False)


def env_root() -> Path:
    return Path(os.environ.get("EQUIBENCH_ENV_DIR") or Path.home() / ".cache" / "equibench" / "envs")


def env_key(requirements: tuple[str, ...] | list[str]) -> str:
    """16 hex digits identifying (sorted requirements, runner interpreter and environment)."""
    blob = json.dumps({"requirements": sorted(requirements), "python": os.path.realpath(sys.executable),
                       "prefix": os.path.realpath(sys.prefix), "version": sys.version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def main_environment() -> Environment:
    return Environment(id="main", python=sys.executable, versions=package_versions())


def environment_for(requirements: tuple[str, ...] | list[str], progress: bool = True) -> Environment:
    """The environment for ``requirements`` (the main one when empty), built if missing."""
    reqs = tuple(sorted(requirements))
    if not reqs:
        return main_environment()
    root = env_root()
    key = env_key(reqs)
    path = root / key
    if not (path / MARKER).exists():
        with storage_errors(root):
            root.mkdir(parents=True, exist_ok=True)
        with exclusive(root / f"{key}.lock", f"environment {key} (being built)", wait=True):
            if not (path / MARKER).exists():
                with storage_errors(root):
                    _build(path, key, reqs, root / f"{key}.log", progress)
    info = json.loads((path / MARKER).read_text())
    return Environment(id=key, python=str(path / "bin" / "python"), requirements=reqs, versions=info["versions"])


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def _run(cmd: list[str], log, key: str, progress: bool, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` with its output in ``log`` (and pip's main lines on stderr); its last error
    line raises ``EnvBuildError`` when it fails; returns its output."""
    log.write(f"$ {' '.join(cmd)}\n".encode())
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    lines = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        log.write(raw)
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        if _SHOW.match(line):
            _say(progress, f"  [env {key[:8]}] {line.strip()}")
    log.flush()
    if proc.wait() != 0:
        if any(m in ln for ln in lines for m in _FULL):  # not the requirements' fault: resume later
            raise StorageError(f"cannot build environment {key} in {env_root()}: no space left (or over quota); "
                               "make room and rerun with --resume")
        errors = [ln.strip() for ln in lines if ln.strip().startswith("ERROR") and _NOTICE not in ln]
        last = errors[-1] if errors else next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
        raise EnvBuildError(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} failed (exit {proc.returncode}): {last}")
    return "\n".join(lines)


def _build(path: Path, key: str, reqs: tuple[str, ...], log_path: Path, progress: bool) -> None:
    tmp = path.with_name(f".{key}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _say(progress, f"equibench: building environment {key} for {' '.join(reqs)} (log: {log_path})")
    t0 = time.monotonic()
    try:
        with open(log_path, "ab") as log:
            _run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], log, key, progress)
            py = str(tmp / "bin" / "python")
            purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           log, key, progress).strip().splitlines()[-1]
            Path(purelib, "_equibench_parent.pth").write_text(
                "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in site_dirs()) + "\n")
            if importlib.util.find_spec("pip") is None:  # the runner's environment has no pip to inherit
                _run([py, "-m", "ensurepip", "--default-pip"], log, key, progress)
            _run([py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *reqs], log, key, progress)
            out = _run([py, "-c", "import json; from equibench.core.envinfo import package_versions; "
                                  "print(json.dumps(package_versions()))"], log, key, progress, env=worker_environ())
            versions = json.loads(out.strip().splitlines()[-1])
            startup = startup_lines(versions)
            if startup:
                with open(Path(purelib, "_equibench_parent.pth"), "a") as pth:
                    pth.write("".join(f"{line}\n" for line in startup))
            _run([py, "-c", "import equibench.symmetry.fieldtypes"], log, key, progress, env=worker_environ())
        info: dict[str, Any] = {"key": key, "requirements": list(reqs), "parent_python": sys.executable,
                                "parent_prefix": sys.prefix, "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "versions": versions}
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
        shutil.rmtree(path, ignore_errors=True)  # an incomplete folder (no marker) from a crashed build
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(progress, f"equibench: environment {key} ready in {time.monotonic() - t0:.0f} s "
                   f"({', '.join(f'{k} {v}' for k, v in sorted(versions.items()) if k in _names(reqs))})")


def startup_lines(versions: dict[str, str]) -> list[str]:
    """``.pth`` lines an environment runs at interpreter start, for what it has installed.

    e3nn < 0.5 (mace-torch 0.3.16 pins 0.4.4) loads its Wigner constants with ``torch.load``'s
    default, weights-only since torch 2.6, and its file holds ``slice`` objects: ``import e3nn.o3``
    fails unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set. mace sets it itself, but only when
    ``mace`` is imported, and a worker imports ``e3nn.o3`` (through equibench) first; so such an
    environment sets it (if unset) at start, for every process it runs."""
    e3nn = re.match(r"(\d+)\.(\d+)", versions.get("e3nn", ""))
    if e3nn and (int(e3nn[1]), int(e3nn[2])) < (0, 5):
        return ["import os; os.environ.setdefault('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')"]
    return []


def _names(reqs: tuple[str, ...]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in reqs}


def main(argv: list[str] | None = None) -> int:
    """``python -m equibench.engine.envs build METHOD...``: build (or find) the isolated environment
    of each named method that declares ``requirements`` (e.g. at set-up, so the first run does not
    pay for it); prints one line per method: its name, environment key and interpreter."""
    parser = argparse.ArgumentParser(prog="python -m equibench.engine.envs")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("methods", nargs="+", metavar="METHOD")
    args = parser.parse_args(argv)
    try:
        wanted = {name: tuple(getattr(method_class(name), "requirements", ()) or ()) for name in args.methods}
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, reqs in wanted.items():
        try:
            env = environment_for(reqs)
        except EnvBuildError as err:
            print(f"error: {name}: environment for {' '.join(reqs)} could not be built: {err}", file=sys.stderr)
            return 1
        print(f"{name}\t{env.id}\t{env.python}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
