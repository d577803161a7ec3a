"""Suite sections that are not (task, method, seed) runs: ``scaling`` and ``tp_bench``.

A suite file may carry::

    scaling:  {methods: [baseline, e3nn], nodes: [16, 64, 256], repeats: 5}   # ScaleConfig options
    tp_bench: {lmax: [1, 2, 3], impls: [e3nn, gaunt]}                        # TPBenchConfig options

They run after the suite's specs, on the run's device, into the same run directory (rows with
``task="scaling"`` / ``task="tp_bench"``), so the run's report carries the scaling plot and the
tensor-product table next to the task sections. Every point is one atomic block keyed by its own
hash, so a killed run resumes them like the specs. A run restricted with ``--tasks`` or
``--methods`` skips them unless asked (``extras=True``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..core.errors import UserError

SECTIONS = ("scaling", "tp_bench")


def _config(section: str, options: dict[str, Any], device: str | None, where: str) -> Any:
    from ..benches.scaling import ScaleConfig
    from ..core.spec import config_from_dict
    from ..benches.tp_bench import TPBenchConfig
    cls = ScaleConfig if section == "scaling" else TPBenchConfig
    if not isinstance(options, dict):
        raise UserError(f"malformed suite file {where}: '{section}' must be a mapping of options")
    if "device" in options:
        raise UserError(f"malformed suite file {where}: '{section}' runs on the suite's device; "
                        f"remove its 'device' option")
    opts = dict(options)
    if device is not None:
        opts["device"] = device
    return config_from_dict(cls, opts, f"{where} {section}")


def validate_extras(doc: dict[str, Any], where: str) -> None:
    """Check the option names and types of the suite's extra sections (on the CPU device, so a
    CUDA suite validates on a machine without a GPU)."""
    for section in SECTIONS:
        if section in doc:
            _config(section, doc[section], "cpu", where)


def run_extras(doc: dict[str, Any], results_dir: str | Path, run_name: str, device: str,
               progress: Callable[[str], None] | None = None) -> list[str]:
    """Run the suite's ``scaling`` and ``tp_bench`` sections into ``results_dir/run_name``;
    returns the sections run."""
    from ..benches.scaling import run_scaling
    from ..benches.tp_bench import run_tp_bench
    where = f"suite {doc.get('name', '?')!r}"
    done = []
    for section, runner in (("scaling", run_scaling), ("tp_bench", run_tp_bench)):
        if section in doc:
            cfg = _config(section, doc[section], device, where)
            runner(cfg, results_dir, run_name, progress=progress)
            done.append(section)
    return done
