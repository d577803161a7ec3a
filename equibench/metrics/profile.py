"""Where a model's inference time goes: a ``torch.profiler`` breakdown by region.

``profile_breakdown(model, batch)`` runs one eval-mode, no-grad forward unprofiled (warm-up; it
also sets how many are profiled: 3 to 9, about 0.05 s of unprofiled time), then ``calls`` more
under ``torch.profiler.profile`` (CPU activity; CUDA too on a GPU), each wrapped in a
``record_function(FORWARD)`` range. Every profiler event inside a forward has a *self time*
(its duration minus its children's; the self time of a ``record_function`` range is the Python
between the ops it encloses). The self times of all events under one forward sum to that
forward's time, so assigning each event to one region splits the forward:

    t_f(r) = sum of the self times of forward f's events assigned to region r
    share(r) = median_f t_f(r) / sum_r' median_f t_f(r')

(the median over forwards drops a forward that was descheduled on a busy machine: the wait lands
on whichever op was running). Events are read from kineto directly and nested by time on their
thread (``prof.events()`` builds a Python tree that costs seconds for e3nn's 10^4 ops).

Assignment, two schemes:

* ``labels`` (wrappers; used when any ``equibench.*`` region of ``REGIONS`` occurs): an event
  belongs to the innermost enclosing range named ``equibench.frames`` (frame / canonicalisation
  construction), ``equibench.backbone`` (the shared backbone), ``equibench.to_frame`` (mapping
  into / out of frames, averaging); else to ``other`` (glue outside every labelled range,
  including the Python of ``forward`` itself).
* ``ops`` (intrinsic architectures without labels: e3nn, egnn, nequip, escnn): forward hooks
  open a range around every module whose class is a tensor product (name contains
  ``TensorProduct``, or an escnn point convolution) -> ``tensor_product``; then an event belongs
  to the outermost enclosing op or range of a category: ``tensor_product``, ``linear`` (linear
  layers and matrix products: ``aten::linear``, ``mm``, ``addmm``, ``bmm``, ``matmul``,
  ``einsum``), ``scatter`` (message passing's gathers and scatters: ``index_select``,
  ``scatter*``, ``index_add``, ``gather``, ``torch_scatter``); else ``other`` (element-wise
  ops, activations, Python).

On CUDA the shares are of kernel time instead: each kernel is assigned to the region of the CPU
event that launched it (same correlation id), so the shares say where the GPU's time goes (not
checked on a GPU yet). The profiler adds a cost per op (e3nn's forward runs about 4x slower
profiled), so op-heavy regions read larger than their share of unprofiled time and ``time_s``
(profiled time per forward) is context, not a throughput; the first profiler start in a process
costs 1-3 s (kineto's initialisation), which the CPU memory measurement of
``measure_throughput`` has paid already in a task point.

Probe ``profile`` (``metrics/probe.py``): the inference breakdown of the trained model on the
throughput probe's batch, in the architecture phase, when ``throughput`` is on as well.
"""
from __future__ import annotations

import contextlib
import math
import re
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch_geometric.data import Batch

from ..core.quiet import quiet
from ..core.registry import register_probe
from .catalogue import PROFILE_MODES, PROFILE_REGIONS, MetricSpec, profile_metric
from .probe import Probe, ProbeContext, ProbeSettings, Reading, reading
from .throughput import _native_stderr_silenced

FORWARD = "equibench.profile.forward"
#: the record_function labels the wrapper methods put around their parts -> region name
REGIONS = {"equibench.frames": "frames", "equibench.backbone": "backbone", "equibench.to_frame": "to_frame"}
LABEL_REGIONS = ("frames", "backbone", "to_frame", "other")
OP_REGIONS = ("tensor_product", "linear", "scatter", "other")
assert set(LABEL_REGIONS + OP_REGIONS) <= set(PROFILE_REGIONS)  # the catalogue declares a metric per region
TP_RANGE = "equibench.op.tensor_product"
_LINEAR_OPS = re.compile(r"^aten::(linear|mm|addmm|bmm|matmul|einsum|baddbmm|addmv|mv)$")
_SCATTER_OPS = re.compile(r"^(aten::(index_select|scatter\w*|index_add\w*|gather|index_reduce\w*|segment_reduce)"
                          r"|torch_scatter::.*)$")


def region(name: str) -> contextlib.AbstractContextManager:
    """The label ``name`` (one of ``REGIONS``) around a wrapper's part: ``record_function(name)``
    while a profiler runs, else a no-op (a record costs ~8 us per call even unprofiled, 0.5 % of a
    50-graph n-body forward)."""
    if name not in REGIONS:
        raise ValueError(f"unknown profiler region {name!r}: one of {sorted(REGIONS)}")
    if torch.autograd.profiler._is_profiler_enabled:
        return record_function(name)
    return contextlib.nullcontext()


def _is_tensor_product(module: nn.Module) -> bool:
    """Whether ``module`` is (a subclass of) a tensor product (e3nn, cuEquivariance, ours) or an
    escnn point convolution."""
    return any("TensorProduct" in c.__name__ or (c.__module__.startswith("escnn") and "PointConv" in c.__name__)
               for c in type(module).__mro__)


@contextlib.contextmanager
def _tensor_product_ranges(model: nn.Module) -> Iterator[int]:
    """Forward hooks that wrap every tensor-product module's call in ``record_function(TP_RANGE)``;
    yields the number of modules hooked."""
    stack: list[Any] = []
    handles = []

    def enter(_m: nn.Module, _args: Any) -> None:
        rf = record_function(TP_RANGE)
        rf.__enter__()
        stack.append(rf)

    def leave(_m: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop().__exit__(None, None, None)
    for m in model.modules():
        if _is_tensor_product(m):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        yield len(handles) // 2
    finally:
        for h in handles:
            h.remove()


def _op_category(name: str) -> str | None:
    if name == TP_RANGE:
        return "tensor_product"
    if _LINEAR_OPS.match(name):
        return "linear"
    if _SCATTER_OPS.match(name):
        return "scatter"
    return None


def _child_region(name: str, parent: str | None, scheme: str) -> str:
    """Region of an event named ``name`` whose parent is in region ``parent`` (see ``assign``)."""
    if scheme == "labels":
        return REGIONS.get(name, parent or "other")
    if parent not in (None, "other"):
        return parent  # the outermost categorised op or range decides
    return _op_category(name) or "other"


def assign(path: list[str], scheme: str) -> str:
    """The region of an event with enclosing names ``path`` (outermost first, below the forward
    range): the innermost label for ``labels``, the outermost categorised op for ``ops``."""
    region = "other"
    for name in path:
        region = _child_region(name, region, scheme)
    return region


def _raw_events(prof: profile) -> list[tuple[str, int, int, int, bool, int, int]]:
    """(name, start ns, end ns, thread, is CPU, correlation id, linked correlation id) of every
    event the profiler kept (read from kineto directly: ``prof.events()`` builds a Python object
    tree that costs seconds for an e3nn forward's 10^4 ops)."""
    out = []
    assert prof.profiler is not None and prof.profiler.kineto_results is not None  # read after the profile ran
    for e in prof.profiler.kineto_results.events():
        out.append((e.name(), e.start_ns(), e.end_ns(), e.start_thread_id(), e.device_type() == DeviceType.CPU,
                    e.correlation_id(), e.linked_correlation_id()))
    return out


def breakdown_from_events(events: list[tuple[str, int, int, int, bool, int, int]],
                          device: bool = False) -> dict[str, Any]:
    """Self time per region from raw events (``_raw_events``) whose forwards are wrapped in
    ``FORWARD`` ranges. CPU events nest by time on their thread (a child lies within its parent);
    self time = duration - the children's durations. ``device``: the device (CUDA) time of the
    kernels instead, each kernel in the region of the CPU event that launched it (same
    correlation id).

    Per region the *median over forwards* of its time is taken (a forward preempted on a busy
    machine charges the wait to whichever op was running; the median ignores such a forward),
    and ``shares`` are those medians over their sum."""
    cpu = sorted((e for e in events if e[4]), key=lambda e: (e[3], e[1], -e[2]))
    scheme = "labels" if any(e[0] in REGIONS for e in cpu) else "ops"
    regions = LABEL_REGIONS if scheme == "labels" else OP_REGIONS
    per_fwd: list[dict[str, float]] = []
    by_corr: dict[int, tuple[int, str]] = {}
    # stack entries: [end, region or None (outside every forward), children's time, thread, start, forward index]
    stack: list[list[Any]] = []

    def close(entry: list[Any]) -> None:
        if entry[1] is not None and not device:
            per_fwd[entry[5]][entry[1]] += (entry[0] - entry[4] - entry[2]) / 1e3
    for name, start, end, tid, _, corr, _ in cpu:
        while stack and (stack[-1][3] != tid or stack[-1][0] <= start):
            close(stack.pop())
        parent = stack[-1] if stack else None
        if parent is not None:
            parent[2] += end - start
        fwd = parent[5] if parent is not None else -1
        region: str | None
        if name == FORWARD:
            region, fwd = "other", len(per_fwd)
            per_fwd.append(dict.fromkeys(regions, 0.0))
        else:
            region = None if parent is None or parent[1] is None else _child_region(name, parent[1], scheme)
        if region is not None:
            by_corr[corr] = (fwd, region)
        stack.append([end, region, 0, tid, start, fwd])
    while stack:
        close(stack.pop())
    if device:
        for _name, start, end, _, is_cpu, corr, linked in events:
            hit = None if is_cpu else by_corr.get(corr, by_corr.get(linked))
            if hit is not None:
                per_fwd[hit[0]][hit[1]] += (end - start) / 1e3
    medians = {r: statistics.median(f[r] for f in per_fwd) if per_fwd else 0.0 for r in regions}
    total = sum(medians.values())
    shares = {r: (v / total if total > 0 else float("nan")) for r, v in medians.items()}
    return {"scheme": scheme, "shares": shares, "total_us": total, "forwards": len(per_fwd),
            "forward_us": [sum(f.values()) for f in per_fwd]}


def _forward_seconds(model: nn.Module, batch: Batch, device: torch.device) -> float:
    """Seconds of one unprofiled forward (the warm-up; it sets how many forwards are profiled)."""
    t0 = time.perf_counter()
    model(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def profile_breakdown(model: nn.Module, batch: Batch, device: str | torch.device = "cpu", *,
                      calls: int | None = None, budget_s: float = 0.05, max_calls: int = 9,
                      threads: int | None = None) -> dict[str, Any]:
    """Profile inference forwards of ``model`` on ``batch`` (eval mode, no grad, after one
    unprofiled warm-up) and return ``{"scheme", "shares", "time_s", "calls", "threads",
    "method"}``: the share of self time per region (module docstring) and the profiled time per
    forward (sum of the regions' medians). ``calls`` (default: as many as fit in ``budget_s`` of
    unprofiled time, 3 to ``max_calls``, odd so the median is one forward's)."""
    device = torch.device(device)
    model, batch = model.to(device), batch.to(device)
    was_training = model.training
    model.eval()
    prev_threads = torch.get_num_threads()
    threads = threads or prev_threads
    torch.set_num_threads(threads)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with torch.no_grad(), _tensor_product_ranges(model), quiet():  # alone under --jobs (core.quiet)
            t_fwd = _forward_seconds(model, batch, device)
            if calls is None:
                calls = min(max_calls, max(3, math.ceil(budget_s / max(t_fwd, 1e-9)))) | 1
            prof = profile(activities=activities)
            with _native_stderr_silenced():  # kineto logs to fd 2 on start and stop
                prof.__enter__()
            try:
                for _ in range(calls):
                    with record_function(FORWARD):
                        model(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            finally:
                with _native_stderr_silenced():
                    prof.__exit__(None, None, None)
    finally:
        torch.set_num_threads(prev_threads)
        model.train(was_training)
    res = breakdown_from_events(_raw_events(prof), device=device.type == "cuda")
    clock = "CUDA kernel time by launching region" if device.type == "cuda" else "self time of CPU ops (wall clock)"
    return {"scheme": res["scheme"], "shares": res["shares"], "time_s": res["total_us"] / 1e6, "calls": calls,
            "threads": threads,
            "method": f"torch.profiler, {clock}, median over {calls} forwards (eval, no_grad, {threads} thread(s)) "
                      f"after one warm-up; regions by {res['scheme']}"}


_REGION_DOCS = {
    "frames": "frame / canonicalisation construction (record_function 'equibench.frames')",
    "backbone": "calls of the shared backbone (record_function 'equibench.backbone')",
    "to_frame": "mapping into / out of the frames and averaging (record_function 'equibench.to_frame')",
    "tensor_product": "tensor-product modules (e3nn, cuEquivariance) and escnn point convolutions, an "
                      "architecture without wrapper labels",
    "linear": "linear layers and matrix products outside tensor products, an architecture without wrapper labels",
    "scatter": "gathers and scatters of message passing (index_select, scatter_add, ...), an architecture "
               "without wrapper labels",
    "other": "everything else: glue outside the labelled regions (wrappers), element-wise ops and activations "
             "(architectures), and the Python of forward itself",
}


@register_probe("profile")
class ProfileProbe(Probe):
    """Where inference time goes (``profile_breakdown``): the trained model's profiled forward
    split into regions, on the throughput batch, once per configuration (needs ``throughput``)."""

    METRICS = tuple(MetricSpec(
        profile_metric(mode, region), f"{mode} time share: {region.replace('_', ' ')}", "profile",
        direction=None, aggregate="mean", stat=f"{region}_share", mode=mode, number_format="g", log_scale=False,
        description=f"share of one inference forward's profiled time (torch.profiler, self time of the ops, median "
                    f"over forwards) spent in {_REGION_DOCS[region]}; context, not a score")
        for mode in PROFILE_MODES for region in PROFILE_REGIONS)
    phases = ("architecture",)
    order = 60
    requires = ("throughput",)
    keys = {"throughput_batch": "batch", "throughput_threads": "threads"}

    class Settings(ProbeSettings):
        batch: int = 100
        threads: int = 0

    def measure(self, ctx: ProbeContext, phase: str) -> list[Reading]:
        batch = ctx.timing_batch(self.settings.batch)
        prof = profile_breakdown(ctx.model, batch, ctx.device, threads=self.settings.threads or None)
        columns = {"mode": "inference", "batch_size": int(batch.num_graphs), "threads": prof["threads"],
                   "repeats": prof["calls"], "profile_scheme": prof["scheme"], "profile_time_s": prof["time_s"],
                   "profile_method": prof["method"]}
        return [reading(profile_metric("inference", region), share, **columns)
                for region, share in prof["shares"].items()]
