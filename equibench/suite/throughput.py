"""Throughput, peak memory and FLOPs of one model at one fixed batch.

Modes: ``inference`` (eval, no grad), ``forward_backward`` (loss.backward, no optimiser) and
``train`` (zero_grad + forward + backward + Adam step, on a copy of the model).

* CPU: ``torch.utils.benchmark.Timer`` with the thread count fixed and recorded.
* CUDA: CUDA events around the calls of a sample, synchronised; optional L2 flush (write a
  buffer twice the L2 size) before each sample.

On both, a sample is ``inner`` back-to-back calls, ``inner`` grown until a sample lasts
>= ``min_sample_s`` (dwarfing timer and launch overhead), after warm-up calls.

Reported: median and IQR of the per-call time over samples, graphs/s and nodes/s from the
median, peak memory (``max_memory_allocated`` after ``reset_peak_memory_stats`` on CUDA; on CPU the
peak of the allocator's running total in the profiler's memory events, both over one call), FLOPs of one call from
``torch.utils.flop_counter.FlopCounterMode`` and achieved GFLOP/s.
"""
from __future__ import annotations

import copy
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode
from torch_geometric.data import Batch

from .precision import dtype_name

MODES = ("inference", "forward_backward", "train")


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


def _cpu_peak_allocated(fn: Callable[[], Any]) -> float | None:
    """Peak bytes of tensors allocated by the CPU allocator during one call of ``fn``, from the
    profiler's ``[memory]`` events ("Total Allocated" is the allocator's running total)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
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
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base), "cuda_max_memory_allocated"
    return _cpu_peak_allocated(fn), "cpu_profiler_peak_allocated"


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def make_step(model: nn.Module, batch: Batch, mode: str,
              loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None) -> Callable[[], Any]:
    """The callable timed for ``mode`` (``train`` works on a deep copy of ``model``)."""
    if mode not in MODES:
        from .errors import UserError
        raise UserError(f"unknown throughput mode {mode!r} (known: {', '.join(MODES)})")
    loss_fn = loss_fn or (lambda pred, b: pred.float().pow(2).mean())
    if mode == "inference":
        model.eval()

        def step() -> Any:
            with torch.no_grad():
                return model(batch)
        return step
    work = copy.deepcopy(model) if mode == "train" else model
    work.train()
    if mode == "forward_backward":
        def step() -> Any:
            loss = loss_fn(work(batch), batch)
            loss.backward()
            return loss
        return step
    opt = torch.optim.Adam(work.parameters(), lr=1e-6)

    def step() -> Any:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(work(batch), batch)
        loss.backward()
        opt.step()
        return loss
    return step


def _cuda_samples(step: Callable[[], Any], device: torch.device, repeats: int, warmup: int,
                  min_sample_s: float, flush_l2: bool) -> tuple[list[float], int]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    flush = None
    if flush_l2:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
        flush = torch.empty(2 * l2 // 4, dtype=torch.float32, device=device)
    inner = 1
    while True:  # grow inner until one sample lasts min_sample_s
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            step()
        end.record()
        torch.cuda.synchronize(device)
        if start.elapsed_time(end) / 1e3 >= min_sample_s or inner >= 1 << 14:
            break
        inner *= 2
    samples = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            step()
        end.record()
        torch.cuda.synchronize(device)
        samples.append(start.elapsed_time(end) / 1e3 / inner)
    return samples, inner


def _cpu_samples(step: Callable[[], Any], threads: int, repeats: int, warmup: int,
                 min_sample_s: float) -> tuple[list[float], int]:
    """``repeats`` samples of ``torch.utils.benchmark.Timer.timeit(inner)``, ``inner`` grown
    until one sample lasts >= ``min_sample_s``."""
    for _ in range(warmup):
        step()
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=threads)
    inner = 1
    while timer.timeit(inner).mean * inner < min_sample_s and inner < 1 << 14:
        inner *= 2
    return [timer.timeit(inner).mean for _ in range(repeats)], inner


def _iqr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[2] - q[0]


def measure_throughput(model: nn.Module, batch: Batch, mode: str = "inference",
                       device: str | torch.device = "cpu", *, warmup: int = 3, repeats: int = 10,
                       min_sample_s: float = 0.05, threads: int | None = None,
                       flush_l2: bool = False, compile: bool = False, flops: bool = True,
                       loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None) -> dict[str, Any]:
    """Time ``model`` on ``batch`` in ``mode`` (module docstring); returns a flat dict.

    ``repeats`` samples, each ``calls_per_sample`` back-to-back calls (grown until a sample lasts
    ``min_sample_s``) after ``warmup`` calls; the time reported is per call.
    """
    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    model = model.to(device)
    batch = batch.to(device)
    compile_time = None
    if compile:
        model = torch.compile(model, dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compile_time = time.perf_counter() - t0
    step = make_step(model, batch, mode, loss_fn)
    if device.type == "cuda":
        samples, inner = _cuda_samples(step, device, repeats, warmup, min_sample_s, flush_l2)
        timer = "cuda_events"
    else:
        prev = torch.get_num_threads()
        try:
            samples, inner = _cpu_samples(step, threads, repeats, warmup, min_sample_s)
        finally:
            torch.set_num_threads(prev)
        timer = "torch.utils.benchmark.Timer.timeit"
    med = statistics.median(samples)
    mem, mem_method = peak_memory(step, device)
    n_flops = count_flops(step) if flops and not compile else None
    params = [p for p in model.parameters()]
    return {
        "mode": mode, "device": str(device), "device_name": device_name(device),
        "dtype": dtype_name(params[0].dtype) if params else dtype_name(torch.get_default_dtype()),
        "batch_graphs": int(batch.num_graphs), "batch_nodes": int(batch.num_nodes),
        "batch_edges": int(batch.edge_index.shape[1]) if "edge_index" in batch else 0,
        "time_median_s": med, "time_iqr_s": _iqr(samples), "repeats": len(samples),
        "calls_per_sample": inner, "threads": threads if device.type == "cpu" else None,
        "graphs_per_s": batch.num_graphs / med, "nodes_per_s": batch.num_nodes / med,
        "peak_mem_bytes": mem, "mem_method": mem_method,
        "flops": n_flops, "gflops_per_s": (n_flops / med / 1e9) if n_flops else None,
        "timer": timer, "compiled": compile, "compile_time_s": compile_time, "flush_l2": flush_l2,
    }
