"""Throughput, peak memory and FLOPs of one model at one fixed batch.

Modes: ``inference`` (eval, no grad), ``forward_backward`` (loss.backward, no optimiser) and
``train`` (zero_grad + forward + backward + Adam step, on a copy of the model).

Timing (``sample_times``) is the same on every device, given ``run(n)`` = seconds for ``n``
back-to-back calls:

1. ``warmup`` single calls;
2. ``inner`` (calls per sample) grown until one sample lasts >= ``min_sample_s``, which dwarfs
   timer and kernel-launch overhead;
3. warm-up until stable: more samples until the last three per-call times agree within
   ``stable_tol`` (at most ``max_warmup_samples``; ``stable`` records whether they did);
4. ``repeats`` samples; reported: median and IQR of the per-call time over samples, and
   ``unstable`` when the samples disagree: relative spread IQR / median above
   ``UNSTABLE_REL_IQR`` (0.25). Such a figure says more about the machine (other processes,
   frequency scaling) than about the model; rows carry the flag and the report marks them.

* CPU: ``run(n)`` times the ``n`` calls in short blocks (as many calls as last ``BLOCK_S``,
  1 ms: one call for any model step of a millisecond or more) and returns ``n`` x the median
  per-call time over the blocks, with the thread count fixed (and recorded) and garbage
  collection off. The median of short blocks is ``torch.utils.benchmark``'s
  ``blocked_autorange`` estimator, so the two agree (``benchmarks/bench_timing.py``; issue 20):
  a mean over a long sample absorbs every moment the process was descheduled, the median of
  short blocks drops such blocks as outliers. ``clock="wall"`` (default) measures
  elapsed time, ``clock="cpu"`` the process's CPU time, which a busy shared machine disturbs far
  less (the 1-minute load average is recorded with every measurement).
* CUDA: ``run`` records CUDA events around the calls and synchronises; with ``flush_l2`` every
  call gets its own event pair and a write of twice the L2 size before it (outside the timed
  window), so each call starts from a cold L2.

Peak memory: ``max_memory_allocated`` after ``reset_peak_memory_stats`` on CUDA; on CPU the peak
of the allocator's running total in the profiler's memory events; both over one call of the mode's
step, so each mode has its own peak. FLOPs: ``FlopCounterMode`` over one eager call (it counts
matmul/conv-like ops only, so GFLOP/s and the fraction of the GPU's peak are lower bounds);
achieved GFLOP/s = flops / median; on a GPU in ``GPU_PEAKS`` also the fraction of its dense peak.

``compile=True`` wraps the step's module in ``torch.compile(dynamic=compile_dynamic)``; the first
call is timed separately (``compile_time_s``); the graphs compiled are counted with dynamo's
counters, and recompilations during the timed samples and on ``recompile_batches`` (other graph
sizes) are reported, because variable graph sizes silently recompile (and, past dynamo's
recompile limit, fall back to eager).

Probe ``throughput`` (``metrics/probe.py``): every mode of ``modes`` on ``batch`` graphs of the
test split, in the architecture phase (one seed's point per configuration, ``measure_once``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode
from torch_geometric.data import Batch

from ..core.errors import UserError
from ..core.quiet import coordinated, quiet
from ..core.registry import register_probe
from ..symmetry.precision import dtype_name
from .catalogue import THROUGHPUT_MODES, THROUGHPUT_STATS, throughput_metric, timing_spec
from .probe import Probe, ProbeContext, ProbeSettings, Reading, reading

MODES = ("inference", "forward_backward", "train")
#: relative spread (IQR / median of the per-call times over the repeats) above which a timing is
#: flagged ``unstable``: with 10 repeats on a quiet machine it stays under 0.05; 0.25 means a
#: quarter of the samples lie further apart than a quarter of the median
UNSTABLE_REL_IQR = 0.25


# ---------------------------------------------------------------------------------------------
# devices and their peaks

def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    return f"CPU {cpu}"


@dataclass(frozen=True)
class GpuPeak:
    """Dense (no sparsity) peak throughput of one GPU in TFLOP/s, from the vendor's data sheet.
    ``tf32``/``bf16``/``fp16`` are tensor-core peaks with fp32 accumulation; None = not supported."""
    name: str
    fp32: float
    tf32: float | None
    bf16: float | None
    fp16: float | None


# Ordered: the first pattern that matches ``torch.cuda.get_device_name`` wins (PCIe/NVL before
# the SXM default of the same chip).
GPU_PEAKS: tuple[tuple[str, GpuPeak], ...] = (
    (r"H100.*PCIe", GpuPeak("H100 PCIe", 51.2, 378.0, 756.0, 756.0)),
    (r"H100.*NVL", GpuPeak("H100 NVL", 60.0, 417.5, 835.5, 835.5)),
    (r"H100", GpuPeak("H100 SXM", 66.9, 494.7, 989.4, 989.4)),
    (r"H200.*NVL", GpuPeak("H200 NVL", 60.0, 417.5, 835.5, 835.5)),
    (r"H200", GpuPeak("H200 SXM", 66.9, 494.7, 989.4, 989.4)),
    (r"A100", GpuPeak("A100", 19.5, 156.0, 312.0, 312.0)),
    (r"V100.*PCIE|V100.*PCIe", GpuPeak("V100 PCIe", 14.0, None, None, 112.0)),
    (r"V100", GpuPeak("V100 SXM2", 15.7, None, None, 125.0)),
    (r"\bL4\b", GpuPeak("L4", 30.3, 60.0, 121.0, 121.0)),
    (r"RTX 4090", GpuPeak("RTX 4090", 82.6, 82.6, 165.2, 165.2)),
)


def gpu_peak(name: str) -> GpuPeak | None:
    """The ``GpuPeak`` of a device name such as "NVIDIA H100 80GB HBM3", or None if unknown."""
    for pattern, peak in GPU_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peak
    return None


def peak_flops(name: str, dtype: torch.dtype, allow_tf32: bool | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, which peak) for a device name and compute dtype; (None, "") when unknown.

    fp32 matmuls run on tensor cores as TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is
    set (``allow_tf32=None`` reads it); fp64 has no entry here.
    """
    peak = gpu_peak(name)
    if peak is None:
        return None, ""
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    if dtype == torch.float32:
        kind = "tf32" if allow_tf32 and peak.tf32 is not None else "fp32"
    else:
        kind = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "")
    value = getattr(peak, kind, None) if kind else None
    return (value * 1e12, f"{peak.name} dense {kind}") if value else (None, "")


# ---------------------------------------------------------------------------------------------
# memory and FLOPs

@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null (native libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_allocated(fn: Callable[[], Any]) -> float | None:
    """Peak bytes of tensors allocated by the CPU allocator during one call of ``fn``, from the
    profiler's ``[memory]`` events ("Total Allocated" is the allocator's running total)."""
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # kineto logs "USDT ... profiler_start/stop" on fd 2 each time
        prof.__enter__()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            prof.__exit__(None, None, None)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"
                      and e.get("args", {}).get("Device Type", 0) == 0]
    if not events:
        return 0.0
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return float(max(e["Total Allocated"] for e in events) - before)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[float | None, str]:
    """Peak memory of one call of ``fn`` in bytes (above what was allocated before the call)
    and how it was measured."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base), "cuda_max_memory_allocated"
    return _cpu_peak_allocated(fn), "cpu_profiler_peak_allocated"


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (``FlopCounterMode``: a matmul [m,k]x[k,n] counts 2mkn)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# the step of each mode

def make_step(model: nn.Module, batch: Batch, mode: str,
              loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None, *,
              compile: bool = False, compile_dynamic: bool | None = False) -> Callable[[], Any]:
    """The callable timed for ``mode`` (``train`` works on a deep copy of ``model``); with
    ``compile`` the module it calls is ``torch.compile(..., dynamic=compile_dynamic)``."""
    if mode not in MODES:
        raise UserError(f"unknown throughput mode {mode!r} (known: {', '.join(MODES)})")
    loss_fn = loss_fn or (lambda pred, b: pred.float().pow(2).mean())
    work = copy.deepcopy(model) if mode == "train" else model
    work.train(mode != "inference")
    fwd = torch.compile(work, dynamic=compile_dynamic) if compile else work
    if mode == "inference":
        def step() -> Any:
            with torch.no_grad():
                return fwd(batch)
    elif mode == "forward_backward":
        def step() -> Any:
            loss = loss_fn(fwd(batch), batch)
            loss.backward()
            return loss
    else:
        opt = torch.optim.Adam(work.parameters(), lr=1e-6)

        def step() -> Any:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(fwd(batch), batch)
            loss.backward()
            opt.step()
            return loss
    return step


# ---------------------------------------------------------------------------------------------
# the sample loop (device independent) and the per-device ``run(n)``

def sample_times(run: Callable[[int], float], *, repeats: int = 10, warmup: int = 3,
                 min_sample_s: float = 0.05, max_inner: int = 1 << 14, stable_tol: float = 0.05,
                 max_warmup_samples: int = 5) -> dict[str, Any]:
    """Per-call times from ``run(n)`` (seconds for ``n`` back-to-back calls); see the module
    docstring. Returns samples (per call), calls per sample, warm-up counts and ``stable``."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        run(1)
    inner, total = 1, run(1)
    recent: list[float] = []
    n_warm = 0

    def settled() -> bool:
        last = recent[-3:]
        return len(last) == 3 and (max(last) - min(last)) <= stable_tol * min(last)
    for _ in range(4):  # calibrate, warm up; calibrate again if warm-up made the calls much faster
        while total < min_sample_s and inner < max_inner:
            per_call = max(total / inner, 1e-9)
            # jump towards the target from the measured rate (at least x2, at most x64 per step)
            inner = min(max_inner, max(2 * inner, min(64 * inner, math.ceil(1.2 * min_sample_s / per_call))))
            total = run(inner)
        recent = [total / inner]
        while not settled() and n_warm < max_warmup_samples:
            recent.append(run(inner) / inner)
            n_warm += 1
        total = recent[-1] * inner
        if total >= 0.5 * min_sample_s or inner >= max_inner:
            break
    stable = settled()
    samples = [run(inner) / inner for _ in range(repeats)]
    return {"samples": samples, "inner": inner, "warmup_calls": warmup + 1, "warmup_samples": n_warm,
            "stable": stable}


CLOCKS = ("wall", "cpu")
#: the shortest timed block on CPU: a block is as many back-to-back calls as last this long (one
#: call for anything slower), long enough that the timer's own cost (~0.1 µs) is below 1e-4 of it
BLOCK_S = 1e-3
CPU_TIMER = "median of 1 ms blocks (torch.utils.benchmark.Timer.timeit)"


def _block_time(timer: benchmark.Timer, k: int) -> float:
    """Seconds for ``k`` back-to-back calls (``torch.utils.benchmark.Timer.timeit``, gc off)."""
    return timer.timeit(k).mean * k


def _block_size(timer: benchmark.Timer, block_s: float, max_block: int = 1 << 20) -> int:
    """Calls per block: grown from one (these calls also warm up) until a block lasts ``block_s``."""
    k = 1
    while True:
        dt = _block_time(timer, k)
        if dt >= block_s or k >= max_block:
            return k
        k = min(max_block, max(2 * k, math.ceil(1.2 * k * block_s / max(dt, 1e-9))))


def cpu_run(step: Callable[[], Any], threads: int, clock: str = "wall",
            block_s: float = BLOCK_S) -> Callable[[int], float]:
    """``run(n)`` on CPU at ``threads`` threads: ``n`` calls timed in blocks of ``b`` calls (``b``
    such that a block lasts ``block_s``: one call for a step of a millisecond or more), returning
    ``n`` x the *median* per-call time over the blocks, with garbage collection off
    (``torch.utils.benchmark.Timer.timeit``).

    The median of short blocks is ``torch.utils.benchmark.Timer.blocked_autorange``'s estimator:
    a block during which the process was descheduled (another process, an interrupt) is an outlier
    the median drops, where the mean of a long sample (the suite's estimator before issue 20)
    absorbs it. ``clock="wall"`` times
    elapsed time (``time.perf_counter``); ``clock="cpu"`` the CPU time of the process
    (``time.process_time``: all threads summed), insensitive to being descheduled, a reproducible
    cost measure with ``threads=1``."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=threads,
                            timer=time.process_time if clock == "cpu" else time.perf_counter)
    block: list[int] = []

    def run(n: int) -> float:
        if not block:
            block.append(_block_size(timer, block_s))
        k = min(block[0], max(n, 1))
        per_call = [_block_time(timer, k) / k for _ in range(max(1, round(n / k)))]
        return n * statistics.median(per_call)
    return run


def cuda_run(step: Callable[[], Any], device: torch.device, flush_l2: bool = False) -> Callable[[int], float]:
    """``run(n)`` on CUDA: events around ``n`` calls, then synchronise. With ``flush_l2`` each
    call is preceded (outside its event pair) by a write of twice the L2 size."""
    flush = None
    if flush_l2:
        l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20))
        flush = torch.empty(2 * l2, dtype=torch.int8, device=device)

    def run(n: int) -> float:
        if flush is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                step()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in pairs:
            flush.zero_()
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return sum(s.elapsed_time(e) for s, e in pairs) / 1e3
    return run


def _load_avg() -> float | None:
    """The 1-minute load average (how busy the machine was while timing), None if unknown."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def is_unstable(iqr: float | None, median: float | None, limit: float = UNSTABLE_REL_IQR) -> bool:
    """Whether a timing's repeats disagree: ``iqr / median > limit`` (False when either is
    missing or the median is not positive)."""
    if iqr is None or median is None or not (median > 0) or not math.isfinite(iqr):
        return False
    return iqr / median > limit


def _iqr(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[2] - q[0]


#: the timer's note when other workers ran at once (``--jobs``): they were stopped while this timed
QUIET_NOTE = "; alone (other workers stopped)"


def time_step(step: Callable[[], Any], device: str | torch.device = "cpu", *, threads: int | None = None,
              warmup: int = 3, repeats: int = 10, min_sample_s: float = 0.05, flush_l2: bool = False,
              stable_tol: float = 0.05, max_warmup_samples: int = 5, clock: str = "wall") -> dict[str, Any]:
    """Time any zero-argument ``step`` on ``device``: median/IQR per call and how it was measured
    (``clock`` applies to CPU only; CUDA events always measure GPU elapsed time). Under
    ``--jobs`` the samples are taken in a quiet section (``core.quiet``: the run's other workers
    stopped), and the timer says so."""
    device = torch.device(device)
    kw: dict[str, Any] = dict(repeats=repeats, warmup=warmup, min_sample_s=min_sample_s, stable_tol=stable_tol,
                              max_warmup_samples=max_warmup_samples)
    if device.type == "cuda":
        with quiet():
            res = sample_times(cuda_run(step, device, flush_l2), **kw)
        timer, threads = "cuda_events" + ("+l2_flush" if flush_l2 else ""), None
    else:
        threads = threads or torch.get_num_threads()
        prev = torch.get_num_threads()
        try:
            with quiet():
                res = sample_times(cpu_run(step, threads, clock), **kw)
        finally:
            torch.set_num_threads(prev)
        timer = CPU_TIMER + (" (process_time)" if clock == "cpu" else "")
    if coordinated():
        timer += QUIET_NOTE
    s = res["samples"]
    med = statistics.median(s)
    iqr = _iqr(s)
    return {"time_median_s": med, "time_iqr_s": iqr, "time_min_s": min(s), "time_samples_s": s,
            "repeats": len(s), "calls_per_sample": res["inner"], "warmup_calls": res["warmup_calls"],
            "warmup_samples": res["warmup_samples"], "stable": res["stable"],
            "unstable": is_unstable(iqr, med), "timer": timer, "threads": threads, "load_avg_1min": _load_avg()}


# ---------------------------------------------------------------------------------------------
# compile bookkeeping

def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# the public measurement

def _threads(n: int | None) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A context factory running its block at ``n`` torch threads (the caller's count restored after;
    ``None``: unchanged)."""
    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        prev = torch.get_num_threads()
        if n:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(prev)
    return ctx


def measure_throughput(model: nn.Module, batch: Batch, mode: str = "inference",
                       device: str | torch.device = "cpu", *, warmup: int = 3, repeats: int = 10,
                       min_sample_s: float = 0.05, threads: int | None = None,
                       flush_l2: bool = False, compile: bool = False, compile_dynamic: bool | None = False,
                       recompile_batches: Sequence[Batch] = (), flops: bool = True, memory: bool = True,
                       loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None,
                       stable_tol: float = 0.05, max_warmup_samples: int = 5, clock: str = "wall",
                       remeasure: int = 0) -> dict[str, Any]:
    """Time ``model`` on ``batch`` in ``mode`` (module docstring); returns a flat dict.

    ``repeats`` samples, each ``calls_per_sample`` back-to-back calls (grown until a sample lasts
    ``min_sample_s``) after warm-up; the times reported are per call. ``threads`` (CPU) defaults
    to torch's current count and is recorded; ``clock`` ("wall" or "cpu") picks the CPU clock.
    ``recompile_batches`` (with ``compile``): batches of other graph sizes run once each after
    timing, to count the recompilations they trigger. ``remeasure``: an unstable timing (IQR /
    median over ``UNSTABLE_REL_IQR``) is taken again up to this many times (``remeasured`` says how
    often; memory and FLOPs are measured once).
    """
    device = torch.device(device)
    model = model.to(device)
    batch = batch.to(device)
    compile_time = compiled_graphs = recompiles_timing = recompiles_sizes = None
    # dynamo guards on the thread count: compile (and count recompiles) at the count the timing runs at
    at_threads = _threads(threads if device.type == "cpu" else None)
    if compile:
        g0 = _graphs_compiled()
        step = make_step(model, batch, mode, loss_fn, compile=True, compile_dynamic=compile_dynamic)
        _sync(device)
        t0 = time.perf_counter()
        with at_threads():
            step()  # first call: trace + compile (forward, and backward for the training modes)
        _sync(device)
        compile_time = time.perf_counter() - t0
        compiled_graphs = _graphs_compiled() - g0
    else:
        step = make_step(model, batch, mode, loss_fn)
    g1 = _graphs_compiled() if compile else 0
    def timed() -> dict[str, Any]:
        return time_step(step, device, threads=threads, warmup=warmup, repeats=repeats, min_sample_s=min_sample_s,
                         flush_l2=flush_l2, stable_tol=stable_tol, max_warmup_samples=max_warmup_samples,
                         clock=clock)
    timing, remeasured = timed(), 0
    while timing["unstable"] and remeasured < remeasure:  # an unstable timing is taken again
        timing, remeasured = timed(), remeasured + 1
    timing["remeasured"] = remeasured
    if compile:
        recompiles_timing = _graphs_compiled() - g1
    med = timing["time_median_s"]
    mem, mem_method = peak_memory(step, device) if memory else (None, "")
    if compile and recompile_batches:
        fwd = torch.compile(model.eval(), dynamic=compile_dynamic)
        with torch.no_grad(), at_threads():
            fwd(batch)  # compiled (or found in dynamo's cache) for the timed size
            g2 = _graphs_compiled()
            for b in recompile_batches:
                fwd(b.to(device))
        recompiles_sizes = _graphs_compiled() - g2
    n_flops = count_flops(make_step(model, batch, mode, loss_fn)) if flops else None
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.get_default_dtype()
    name = device_name(device)
    gflops = (n_flops / med / 1e9) if n_flops else None
    peak, peak_kind = peak_flops(name, dtype) if device.type == "cuda" else (None, "")
    graphs = int(getattr(batch, "num_graphs", 1) or 1)  # a single ``Data`` (e.g. operand pairs) is one graph
    return {
        "mode": mode, "device": str(device), "device_name": name, "dtype": dtype_name(dtype),
        "batch_graphs": graphs, "batch_nodes": int(batch.num_nodes),
        "batch_edges": int(batch.edge_index.shape[1]) if "edge_index" in batch else 0,
        **timing,
        "graphs_per_s": graphs / med, "nodes_per_s": batch.num_nodes / med,
        "peak_mem_bytes": mem, "mem_method": mem_method,
        "flops": n_flops, "gflops_per_s": gflops,
        "peak_flops_per_s": peak, "peak_flops_kind": peak_kind,
        "fraction_of_peak": (gflops * 1e9 / peak) if gflops and peak else None,
        "compiled": compile, "compile_dynamic": compile_dynamic if compile else None,
        "compile_time_s": compile_time, "compiled_graphs": compiled_graphs,
        "recompiles_during_timing": recompiles_timing, "recompiles_variable_sizes": recompiles_sizes,
        "flush_l2": flush_l2,
    }


def repeatability(model: nn.Module, batch: Batch, mode: str = "inference", device: str | torch.device = "cpu",
                  *, runs: int = 5, **kwargs: Any) -> dict[str, Any]:
    """``runs`` independent ``measure_throughput`` calls of the same model and batch.

    Returns each run's median time, the median of those medians and the largest relative
    deviation of a run's median from it (the stability of the measurement itself).
    """
    kwargs.setdefault("flops", False)
    kwargs.setdefault("memory", False)
    results = [measure_throughput(model, batch, mode, device, **kwargs) for _ in range(runs)]
    medians = [r["time_median_s"] for r in results]
    ref = statistics.median(medians)
    return {"medians_s": medians, "median_of_medians_s": ref,
            "max_rel_dev": max(abs(m - ref) / ref for m in medians),
            "iqr_rel": [r["time_iqr_s"] / r["time_median_s"] for r in results],
            "stable": [r["stable"] for r in results], "calls_per_sample": [r["calls_per_sample"] for r in results],
            "repeats": results[0]["repeats"], "threads": results[0]["threads"],
            "device_name": results[0]["device_name"],
            "dtype": results[0]["dtype"], "batch_graphs": results[0]["batch_graphs"], "mode": mode}


#: the columns of a throughput row besides the metric (what the number was measured at)
THROUGHPUT_CONTEXT = ("mode", "dtype", "batch_nodes", "batch_edges", "repeats", "threads", "timer", "compiled",
                      "mem_method", "calls_per_sample", "unstable", "load_avg_1min", "remeasured")


@register_probe("throughput")
class ThroughputProbe(Probe):
    """Throughput, peak memory and FLOPs (``measure_throughput``) of the trained model on
    ``batch`` test graphs, per mode, once per configuration (the architecture phase)."""

    METRICS = tuple(timing_spec(throughput_metric(mode, stat), "throughput", stat, mode,
                                watch=stat in ("graphs_per_s", "peak_mem_bytes"))
                    for mode in THROUGHPUT_MODES for stat in THROUGHPUT_STATS)
    phases = ("architecture",)
    order = 50
    keys = {"flops": "flops", "compile": "compile"}

    class Settings(ProbeSettings):
        batch: int = 100
        modes: tuple[str, ...] = ("inference", "train")
        min_sample_s: float = 0.05
        repeats: int = 10
        threads: int = 0  # CPU threads while timing; 0 = torch's default
        #: an unstable timing (IQR / median > 0.25) is measured again up to this many times (rows: ``remeasured``)
        remeasure: int = 2
        flops: bool = True
        compile: bool = False

    def measure(self, ctx: ProbeContext, phase: str) -> list[Reading]:
        s, batch, out = self.settings, ctx.timing_batch(self.settings.batch), []
        for mode in s.modes:
            # measured once per configuration, so a disturbed timing is not averaged out by other
            # seeds: an unstable one is taken again (``remeasure``)
            res = measure_throughput(ctx.model, batch, mode=mode, device=ctx.device, repeats=s.repeats,
                                     min_sample_s=s.min_sample_s, flops=s.flops, compile=s.compile,
                                     loss_fn=ctx.task.loss, threads=s.threads or None, remeasure=s.remeasure)
            columns = {**{k: res[k] for k in THROUGHPUT_CONTEXT}, "batch_size": res["batch_graphs"]}
            out += [reading(throughput_metric(mode, stat), res[stat], **columns)
                    for stat in THROUGHPUT_STATS if res[stat] is not None]
        return out
