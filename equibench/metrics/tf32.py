"""TF32 and the float32 equivariance error (issue 22, item 5): probe ``tf32_equivariance``.

On NVIDIA GPUs from Ampere on (compute capability >= 8.0), a float32 matmul or convolution may run
on tensor cores as TF32: operands rounded to a 10-bit mantissa (unit roundoff 2^-11 ~ 4.9e-4,
against float32's 2^-24 ~ 6e-8), products accumulated in float32. PyTorch switches it per backend:
``torch.backends.cuda.matmul.allow_tf32`` (cuBLAS matmuls; off by default since 1.12) and
``torch.backends.cudnn.allow_tf32`` (cuDNN convolutions; **on** by default). An exactly equivariant
model is equivariant only to the rounding of its arithmetic, so TF32 can raise its float32
equivariance error by up to the ratio of the two roundoffs (~8 000) wherever matmuls dominate.

The probe measures, on the trained float32 model as deployed, the relative equivariance error of
``equivariance.equivariance_error`` (same test graphs, same group samples: the same ``seed``)
twice, with both switches on and with both off, each time restoring the previous settings
afterwards (``tf32_mode``, try/finally), and the change TF32 makes to the predictions themselves:

    output_rel_dev    = ||f_on(X) - f_off(X)|| / ||f_off(X)||
    output_rerun_dev  = ||f_off(X) - f_off'(X)|| / ||f_off(X)||    (two forwards with TF32 off)

(Frobenius norms over the batch). The second is the floor of the first: CUDA scatter-adds
(message passing) are atomic and not run-to-run deterministic, so two identical forwards may differ
by float32 rounding already. ``on_over_off`` is the ratio of the two ``rel_mean``.

Rows: ``tf32_equivariance.trained.fp32.<tf32_on|tf32_off>.<stat>`` (stat as for ``equivariance``,
with a ``tf32`` column "on" / "off"), ``...on_over_off``, ``...output_rel_dev`` and
``...output_rerun_dev``. Where TF32 does not exist (a point on the CPU, a GPU older than Ampere)
the probe writes the two ``rel_mean`` rows without a value, the reason in ``error`` and
``not_measured: NotApplicable``, which the results' one writer (``results.rows``) records as status
``not_applicable``. Off by default (``tf32_equivariance: true`` in a suite's ``evaluate:``; the
batch and samples are the equivariance probe's ``equivariance_graphs`` / ``equivariance_samples``).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch_geometric.data import Batch

from ..core.errors import NotApplicable
from ..core.registry import register_probe
from ..core.spec import TaskSpec
from .catalogue import EQUIVARIANCE_STATS, FLOORS, STAT_WORDS, MetricSpec
from .equivariance import EPS, cast_batch, equivariance_error
from .probe import Probe, ProbeContext, ProbeSettings, Reading, reading

FAMILY = "tf32_equivariance"
#: the two settings measured, "on" first
MODES = ("on", "off")
#: how a row says it was not measured by design (``results.rows.NOT_MEASURED``, a layer above: the
#: name of the ``core.errors`` class whose status it gets, ``not_applicable``)
NOT_MEASURED = {"not_measured": NotApplicable.__name__}
RATIO, OUTPUT_DEV, RERUN_DEV = "on_over_off", "output_rel_dev", "output_rerun_dev"


def tf32_metric(mode: str, stat: str) -> str:
    """``tf32_equivariance.trained.fp32.tf32_<mode>.<stat>`` (mode "on" / "off", stat in ``EQUIVARIANCE_STATS``)."""
    if mode not in MODES or stat not in EQUIVARIANCE_STATS:
        raise ValueError(f"unknown TF32 mode {mode!r} or equivariance stat {stat!r}")
    return f"{FAMILY}.trained.fp32.tf32_{mode}.{stat}"


def tf32_summary_metric(name: str) -> str:
    """``tf32_equivariance.trained.fp32.<name>`` for ``on_over_off``, ``output_rel_dev``, ``output_rerun_dev``."""
    if name not in (RATIO, OUTPUT_DEV, RERUN_DEV):
        raise ValueError(f"unknown TF32 summary {name!r}")
    return f"{FAMILY}.trained.fp32.{name}"


# ---------------------------------------------------------------------------------------------
# the switches

def tf32_unavailable(device: torch.device) -> str | None:
    """None where TF32 exists (a CUDA device of compute capability >= 8.0), else why not."""
    if device.type != "cuda":
        return f"TF32 is a CUDA matmul mode; this point ran on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"TF32 needs compute capability 8.0 (Ampere) or newer; {torch.cuda.get_device_name(device)} "
                f"has {major}.{minor}")
    return None


def _fp32_precision_owners() -> dict[str, Any]:
    """The per-backend ``fp32_precision`` settings of torch >= 2.9 (none before)."""
    owners = {"cuda.matmul": torch.backends.cuda.matmul, "cudnn.conv": getattr(torch.backends.cudnn, "conv", None),
              "cudnn.rnn": getattr(torch.backends.cudnn, "rnn", None)}
    return {k: v for k, v in owners.items() if v is not None}


def tf32_state() -> dict[str, Any]:
    """The TF32 settings now: the two switches, the float32 matmul precision ("highest" / "high" /
    "medium") and, where torch has them, the per-backend ``fp32_precision`` strings (each left out
    where torch refuses to read it: settings mixed between its old and new interface)."""
    state: dict[str, Any] = {}
    reads: dict[str, Callable[[], Any]] = {
        "matmul.allow_tf32": lambda: bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn.allow_tf32": lambda: bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision,
        **{f"{k}.fp32_precision": functools.partial(getattr, o, "fp32_precision")
           for k, o in _fp32_precision_owners().items()}}
    for key, read in reads.items():
        try:
            state[key] = read()
        except (AttributeError, RuntimeError):
            pass
    return state


def set_tf32_state(state: dict[str, Any]) -> None:
    """Put back what ``tf32_state`` read: the matmul precision (which sets the matmul switch) or
    else the switch, the cuDNN switch, then the per-backend strings exactly."""
    if "float32_matmul_precision" in state:
        torch.set_float32_matmul_precision(state["float32_matmul_precision"])
    elif "matmul.allow_tf32" in state:
        torch.backends.cuda.matmul.allow_tf32 = state["matmul.allow_tf32"]
    if "cudnn.allow_tf32" in state:
        torch.backends.cudnn.allow_tf32 = state["cudnn.allow_tf32"]
    for key, owner in _fp32_precision_owners().items():
        if f"{key}.fp32_precision" in state:
            owner.fp32_precision = state[f"{key}.fp32_precision"]


@contextlib.contextmanager
def tf32_mode(enabled: bool) -> Iterator[None]:
    """Within: ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
    both ``enabled``; after, however the block ends, the settings as they were (``tf32_state``)."""
    before = tf32_state()
    try:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
        yield
    finally:
        set_tf32_state(before)


# ---------------------------------------------------------------------------------------------
# the measurement

@torch.no_grad()
def _outputs(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(cast_batch(batch, torch.float32).to(device)).float()
    finally:
        model.train(was_training)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / (b.double().norm() + EPS))


def tf32_equivariance(model: nn.Module, batch: Batch, spec: TaskSpec, n_samples: int = 8,
                      group: str | None = None, seed: int = 0) -> dict[str, Any]:
    """The float32 equivariance error of ``model`` on ``batch`` with TF32 on and off (module
    docstring): ``{"on": equivariance_error(...), "off": ..., "on_over_off": ...,
    "output_rel_dev": ..., "output_rerun_dev": ...}``. The TF32 settings are restored after each
    half, also when a measurement raises. On a device without TF32 both halves compute the same."""
    device = next((p.device for p in model.parameters()), batch.batch.device)
    res: dict[str, Any] = {}
    outs: dict[str, torch.Tensor] = {}
    for mode in MODES:
        with tf32_mode(mode == "on"):
            res[mode] = equivariance_error(model, batch, spec, n_samples=n_samples, dtype=torch.float32, group=group,
                                           seed=seed)
            outs[mode] = _outputs(model, batch, device)
            if mode == "off":
                outs["rerun"] = _outputs(model, batch, device)
    res[RATIO] = res["on"]["rel_mean"] / max(res["off"]["rel_mean"], EPS)
    res[OUTPUT_DEV] = _rel(outs["on"], outs["off"])
    res[RERUN_DEV] = _rel(outs["rerun"], outs["off"])
    return res


# ---------------------------------------------------------------------------------------------
# the probe

def _specs() -> tuple[MetricSpec, ...]:
    specs = [MetricSpec(
        tf32_metric(mode, stat), f"equiv. err fp32 trained, TF32 {mode}, {STAT_WORDS[stat]}", FAMILY,
        direction="lower", aggregate="max" if stat.endswith("_max") else "mean", stage="trained", dtype="fp32",
        stat=stat, axis=f"tf32_{mode}", number_format="sci", floor=FLOORS["fp32"] if "rel_" in stat else None,
        description=f"the 'equivariance' error of the trained fp32 model on CUDA with TF32 {mode} "
                    "(torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 both "
                    f"{mode == 'on'}), the same graphs and group samples for both settings; not_applicable "
                    "where TF32 does not exist (CPU, GPUs before Ampere)")
        for mode in MODES for stat in EQUIVARIANCE_STATS]
    specs += [
        MetricSpec(tf32_summary_metric(RATIO), "equiv. err fp32 trained, TF32 on / off", FAMILY, stage="trained",
                   dtype="fp32", stat=RATIO, description="mean relative equivariance error with TF32 on over the "
                   "same with TF32 off: how much TF32 matmuls / convolutions raise the float32 error"),
        MetricSpec(tf32_summary_metric(OUTPUT_DEV), "output change from TF32", FAMILY, stage="trained", dtype="fp32",
                   stat=OUTPUT_DEV, number_format="sci", description="||f_on(X) - f_off(X)|| / ||f_off(X)|| over "
                   "the measured batch: how far TF32 moves the predictions"),
        MetricSpec(tf32_summary_metric(RERUN_DEV), "output change between reruns (TF32 off)", FAMILY,
                   stage="trained", dtype="fp32", stat=RERUN_DEV, number_format="sci",
                   description="||f_off(X) - f_off'(X)|| / ||f_off(X)|| of two identical forwards with TF32 off: "
                   "the run-to-run floor of output_rel_dev (atomic scatter-adds on CUDA)")]
    return tuple(specs)


@register_probe("tf32_equivariance")
class TF32EquivarianceProbe(Probe):
    """The float32 equivariance error of the trained model with TF32 matmuls and convolutions on
    and off (``tf32_equivariance``; not_applicable rows with the reason where TF32 does not exist).
    Off by default (switch: ``tf32_equivariance: true``)."""

    METRICS = _specs()
    phases = ("trained",)
    order = 11
    enabled = False
    keys = {"equivariance_samples": "samples", "equivariance_graphs": "graphs"}

    class Settings(ProbeSettings):
        samples: int = 8  # the equivariance probe's keys, types and defaults
        graphs: int = 32

    def measure(self, ctx: ProbeContext, phase: str) -> list[Reading]:
        batch = ctx.test_batch(self.settings.graphs)
        common = {"stage": phase, "dtype": "fp32", "group": ctx.group, "batch_size": int(batch.num_graphs)}
        reason = tf32_unavailable(ctx.device)
        if reason is not None:
            return [reading(tf32_metric(mode, "rel_mean"), None, tf32=mode, error=reason, **NOT_MEASURED, **common)
                    for mode in MODES]
        res = tf32_equivariance(ctx.model.to(ctx.device), batch, ctx.spec, n_samples=self.settings.samples,
                                group=ctx.group, seed=ctx.seed)
        out = [reading(tf32_metric(mode, stat), res[mode][stat], tf32=mode, repeats=res[mode]["n_samples"], **common)
               for mode in MODES for stat in EQUIVARIANCE_STATS if stat in res[mode]]  # disp_*: point outputs only
        return out + [reading(tf32_summary_metric(k), res[k], **common) for k in (RATIO, OUTPUT_DEV, RERUN_DEV)]


__all__ = ["TF32EquivarianceProbe", "set_tf32_state", "tf32_equivariance", "tf32_metric", "tf32_mode",
           "tf32_state", "tf32_summary_metric", "tf32_unavailable"]
