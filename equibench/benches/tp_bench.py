"""Tensor-product microbenchmarks: Clebsch-Gordan (e3nn) against Gaunt (S² grid), cuEquivariance and
OpenEquivariance.

Operands (for lmax L): ``x1`` = C channels of every degree l <= L with parity (-1)^l, i.e.
``C x (0e + 1o + 2e + ...)``; ``x2`` = one channel of the same degrees (an edge's spherical
harmonics); output ``C x (0e + ... + Le)``. Channel modes, with p = (l1, l2, l3) a path:

* ``uvu`` (channel-wise):  out_u^{l3} = sum_p w_{u,p} (x1_u^{l1} (x) x2^{l2})_{l3}
* ``uvw`` (fully connected): out_w^{l3} = sum_{p,u} w_{u,w,p} (x1_u^{l1} (x) x2^{l2})_{l3}

With these parities e3nn allows exactly the paths with l1 + l2 + l3 even, the ones a Gaunt
product has. Implementations:

* ``e3nn`` / ``e3nn_compiled``: ``o3.TensorProduct`` with every such path in ``uvu`` mode, and
  ``o3.FullyConnectedTensorProduct`` for ``uvw``; eager and ``torch.compile``d.
* ``gaunt``: ``GauntTensorProduct``, the product of functions on the sphere (Gaunt coefficients
  G = integral Y1 Y2 Y3): expand both operands on an S² grid (``e3nn.o3.ToS2Grid``), multiply
  pointwise, project back (``FromS2Grid``), "The Price of Freedom". Weights factorise: one scale
  per (channel, l1), per l2 and per (channel, l3) (``uvw``: a C x C mix per l3) instead of a free
  weight per path, and an antisymmetric path (e.g. the cross product 1o x 1o -> 1e) cannot
  occur at all: less expressive, cheaper for large L.
* ``cuet``: cuequivariance-torch ``ChannelWiseTensorProduct`` / ``FullyConnectedTensorProduct``
  (CUDA only, optional; skipped with a reason when absent).
* ``openequivariance``: OpenEquivariance's JIT-compiled CUDA kernels (PyPI ``openequivariance``,
  the ``cuda`` extra; Bharadwaj et al., arXiv 2501.13986) for the same e3nn product: an
  ``oeq.TPProblem`` with e3nn's irreps and instructions (``shared_weights=True``,
  ``internal_weights=False``: OpenEquivariance takes the weights as an argument) run by
  ``oeq.TensorProduct``, fed e3nn's weights (reordered by its ``reorder_weights_from_e3nn``:
  its uvw layout differs), so the agreement is checked against the e3nn module itself. A point
  without CUDA is ``not_applicable``; with CUDA but without the package, ``skipped``; fp32 and fp64
  only. FLOPs are not counted (the profiler does not see its kernels, as for ``cuet``).

Each Gaunt block equals a per-path constant times e3nn's path (both are the unique invariant
in l1 x l2 x l3); ``gaunt_path_constants`` finds the constants by probing both with basis
vectors, and ``e3nn_equivalent`` builds the e3nn product with the Gaunt weights, so agreement is
checked on the benchmark's own inputs. The product and these helpers live in ``methods.blocks.gaunt``
(shared with ``e3nn_nequip``'s ``tensor_product: gaunt``).
"""
from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from typing import Any

import torch
from pydantic import model_validator
from torch import nn
from torch_geometric.data import Data

from ..core.config import Config
from ..core.errors import NotApplicable, Skipped, UserError
from ..methods.blocks.gaunt import CHANNEL_MODES, GauntTensorProduct, e3nn_equivalent, e3nn_tp, gaunt_paths, sh_irreps
from ..methods.blocks.gaunt import from_channels as from_channels  # re-exported (the product's layouts)
from ..methods.blocks.gaunt import gaunt_path_constants as gaunt_path_constants
from ..methods.blocks.gaunt import to_channels as to_channels
from ..metrics.catalogue import tp_bench_metric
from ..metrics.throughput import count_flops, make_step, measure_throughput
from ..symmetry.precision import default_dtype, dtype_name, parse_dtype
from .base import Bench, Point, register_bench, stable_hash

IMPLS = ("e3nn", "e3nn_compiled", "gaunt", "gaunt_compiled", "cuet", "openequivariance")
#: implementations whose custom kernels the FLOP counter cannot see (no ``flops`` row)
UNCOUNTED = ("cuet", "openequivariance")
PASSES = ("forward", "forward_backward")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------
# the benchmark

PASS_MODES = {"forward": "inference", "forward_backward": "forward_backward"}  # -> measure_throughput modes


class TPBenchConfig(Config):
    """Tensor-product microbenchmarks: every (impl, channel mode, lmax, pass) is one point."""

    lmax: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    channel_modes: tuple[str, ...] = CHANNEL_MODES
    impls: tuple[str, ...] = ("e3nn", "e3nn_compiled", "gaunt", "cuet")
    channels: int = 16
    batch: int = 256
    passes: tuple[str, ...] = ("forward",)
    device: str = "cpu"
    dtype: str = "fp32"
    warmup: int = 2
    repeats: int = 7
    min_sample_s: float = 0.05
    max_warmup_samples: int = 3
    threads: int = 1
    clock: str = "wall"
    flush_l2: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _known_values(self) -> TPBenchConfig:
        for name, value, known in (("impl", self.impls, IMPLS), ("channel mode", self.channel_modes, CHANNEL_MODES),
                                   ("pass", self.passes, PASSES)):
            bad = [v for v in value if v not in known]
            if bad:
                raise UserError(f"unknown {name} {bad} (known: {', '.join(known)})")
        if any(l < 0 for l in self.lmax):
            raise UserError("lmax must be >= 0")
        parse_dtype(self.dtype)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {self.device!r} requested but CUDA is not available")
        return self


def cuet_available(device: torch.device) -> str | None:
    """None when cuequivariance-torch can run here, else the reason it cannot."""
    if device.type != "cuda":
        return "cuequivariance-torch needs a CUDA device"
    if importlib.util.find_spec("cuequivariance_torch") is None or importlib.util.find_spec("cuequivariance") is None:
        return "cuequivariance-torch is not installed (optional extra)"
    return None


def _cuet_module(mode: str, lmax: int, mul: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import cuequivariance as cue
    import cuequivariance_torch as cuet
    ir1, ir2, iro = (cue.Irreps("O3", str(x)) for x in (sh_irreps(lmax, mul), sh_irreps(lmax), sh_irreps(lmax, mul)))
    if mode == "uvw":
        return cuet.FullyConnectedTensorProduct(ir1, ir2, iro, layout=cue.mul_ir, shared_weights=True,
                                                internal_weights=True, device=device, dtype=dtype)
    return cuet.ChannelWiseTensorProduct(ir1, ir2, filter_irreps_out=iro, layout=cue.mul_ir, shared_weights=True,
                                         internal_weights=True, device=device, dtype=dtype)


def oeq_unavailable(device: torch.device) -> tuple[type[NotApplicable] | type[Skipped], str] | None:
    """None when OpenEquivariance can run here, else (the status it gets, the reason): no CUDA
    device: ``NotApplicable``; the package missing: ``Skipped`` (a backend this machine lacks)."""
    if device.type != "cuda":
        return NotApplicable, f"OpenEquivariance's kernels need a CUDA device; this point ran on {device.type}"
    if importlib.util.find_spec("openequivariance") is None:
        return Skipped, ("openequivariance is not installed (optional: the `cuda` extra, pip install "
                         "openequivariance; it needs a CUDA build of torch)")
    return None


class OEQProduct(nn.Module):
    """OpenEquivariance's ``TensorProduct`` with its shared weight vector as a parameter: the
    module takes ``(x1, x2)`` like the e3nn module it stands in for."""

    def __init__(self, tp: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(weight)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.tp(x1, x2, self.weight)


def oeq_weights(tp: Any, weight: torch.Tensor, mode: str) -> torch.Tensor | None:
    """e3nn's shared weight vector in OpenEquivariance's order: its ``reorder_weights_from_e3nn``
    (openequivariance >= 0.4; torch tensors in current releases, numpy arrays in older ones). A
    release without it: uvu products whose second operand has multiplicity 1 (these) take e3nn's
    order as it is; uvw orders differ, None."""
    w = weight.detach()
    reorder = getattr(tp, "reorder_weights_from_e3nn", None)
    if reorder is None:
        return w.clone() if mode == "uvu" else None
    try:
        out = reorder(w, has_batch_dim=False)
    except (TypeError, AttributeError, RuntimeError, ValueError):  # releases that reorder numpy arrays
        out = reorder(w.cpu().numpy(), has_batch_dim=False)
    return torch.as_tensor(out, dtype=w.dtype).to(w.device).reshape(-1)


def _oeq_module(mode: str, lmax: int, mul: int, device: torch.device, dtype: torch.dtype,
                reference: nn.Module) -> tuple[nn.Module, bool]:
    """(OpenEquivariance's product of e3nn's irreps and paths, in ``dtype``, whether it holds
    e3nn's weights)."""
    import numpy as np
    import openequivariance as oeq
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    instr = [(a, b, c, mode, True) for a, b, c in gaunt_paths(lmax, lmax, lmax)]
    problem = oeq.TPProblem(sh_irreps(lmax, mul), sh_irreps(lmax), sh_irreps(lmax, mul), instr, shared_weights=True,
                            internal_weights=False, irrep_dtype=np_dtype, weight_dtype=np_dtype)
    tp = oeq.TensorProduct(problem, torch_op=True)
    ref_weight = reference.weight
    assert isinstance(ref_weight, torch.Tensor)
    mapped = oeq_weights(tp, ref_weight.to(device=device, dtype=dtype), mode)
    if mapped is not None and mapped.numel() == int(problem.weight_numel):
        return OEQProduct(tp, mapped), True
    return OEQProduct(tp, torch.randn(int(problem.weight_numel), device=device, dtype=dtype)), False


def _build(impl: str, mode: str, lmax: int, mul: int, device: torch.device, dtype: torch.dtype,
           reference: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, str]:
    """(module, reference function of (x1, x2) it should agree with, note)."""
    if impl.startswith("e3nn"):
        return reference, reference, ""
    if impl.startswith("gaunt"):
        g = GauntTensorProduct(lmax, lmax, lmax, mul, mode).to(device=device, dtype=dtype)
        tp, w = e3nn_equivalent(g)
        def with_gaunt_weights(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return tp(a, b, w)
        return g, with_gaunt_weights, "vs e3nn with the Gaunt weights mapped per path"
    if impl == "openequivariance":
        oeq_module, copied = _oeq_module(mode, lmax, mul, device, dtype, reference)
        if copied:
            return oeq_module, reference, "vs e3nn, its weights in OpenEquivariance's order (reorder_weights_from_e3nn)"
        return oeq_module, None, "weights not comparable with e3nn's (no reorder_weights_from_e3nn in this release)"
    module = _cuet_module(mode, lmax, mul, device, dtype)
    params = list(module.parameters())
    ref_weight = reference.weight
    assert isinstance(ref_weight, torch.Tensor)
    if mode == "uvw" and len(params) == 1 and params[0].numel() == ref_weight.numel():
        with torch.no_grad():
            params[0].copy_(ref_weight.reshape(params[0].shape))
        return module, reference, "vs e3nn FullyConnectedTensorProduct, its weights copied in e3nn order"
    return module, None, "weights not comparable with e3nn's (channel-wise layout differs)"


class PairProduct(nn.Module):
    """A two-operand product as a model of one ``Data`` holding ``x1`` and ``x2``: the input
    ``measure_throughput`` times (``num_nodes`` = the batch of operand pairs)."""

    def __init__(self, product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.product = product

    def forward(self, data: Data) -> torch.Tensor:
        return self.product(data.x1, data.x2)


def bench_one(cfg: TPBenchConfig, impl: str, mode: str, lmax: int, pass_: str) -> list[dict[str, Any]]:
    """Measure one (impl, channel mode, lmax, pass) with ``measure_throughput``; returns tidy rows.

    A compiled product is compiled (and its first call timed as ``compile_time_s``) before the
    timing, which then sees the compiled module; FLOPs are counted on the eager module
    (``FlopCounterMode`` sees neither compiled graphs nor custom CUDA kernels: none for cuet and
    openequivariance). A backend that cannot run here raises ``Skipped`` / ``NotApplicable`` with
    the reason, which the engine records as the point's row."""
    device, dtype = torch.device(cfg.device), parse_dtype(cfg.dtype)
    if impl == "cuet":
        reason = cuet_available(device)
        if reason:
            raise Skipped(reason)
    if impl == "openequivariance":
        missing = oeq_unavailable(device)
        if missing is not None:
            raise missing[0](missing[1])
        if dtype not in (torch.float32, torch.float64):
            raise NotApplicable(f"OpenEquivariance's kernels take fp32 or fp64 operands, not {dtype_name(dtype)}")
    torch.manual_seed(cfg.seed)
    with default_dtype(dtype):
        reference = e3nn_tp(lmax, lmax, lmax, cfg.channels, mode).to(device)
        module, ref_fn, note = _build(impl, mode, lmax, cfg.channels, device, dtype, reference)
        x1 = torch.randn(cfg.batch, sh_irreps(lmax, cfg.channels).dim, device=device)
        x2 = torch.randn(cfg.batch, sh_irreps(lmax).dim, device=device)
    if pass_ == "forward_backward":
        x1.requires_grad_(True)
        x2.requires_grad_(True)
    data = Data(x1=x1, x2=x2, num_nodes=cfg.batch)
    compiled = impl.endswith("_compiled")
    timed = PairProduct(torch.compile(module, dynamic=False) if compiled else module)

    def loss(out: torch.Tensor, _: Data) -> torch.Tensor:
        return out.pow(2).sum()

    compile_time = None
    if compiled:
        t0 = time.perf_counter()
        with torch.no_grad() if pass_ == "forward" else torch.enable_grad():
            out = timed(data)
            if pass_ == "forward_backward":
                loss(out, data).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compile_time = time.perf_counter() - t0
    with torch.no_grad():
        agreement = rel_err(module(x1, x2), ref_fn(x1, x2)) if ref_fn is not None else None
    res = measure_throughput(timed, data, PASS_MODES[pass_], device, warmup=cfg.warmup, repeats=cfg.repeats,
                             min_sample_s=cfg.min_sample_s, threads=cfg.threads, flush_l2=cfg.flush_l2,
                             flops=False, loss_fn=loss, max_warmup_samples=cfg.max_warmup_samples, clock=cfg.clock)
    flops = None
    if impl not in UNCOUNTED:
        eager = PairProduct(module)
        flops = count_flops(make_step(eager, data, PASS_MODES[pass_], loss))
    med = res["time_median_s"]
    ctx = {"mode": pass_, "channel_mode": mode, "dtype": dtype_name(dtype), "device_name": res["device_name"],
           "batch_size": cfg.batch, "channels": cfg.channels, "repeats": res["repeats"], "threads": res["threads"],
           "timer": res["timer"], "calls_per_sample": res["calls_per_sample"], "stable": res["stable"],
           "load_avg_1min": res["load_avg_1min"], "mem_method": res["mem_method"], "compiled": compiled,
           "agreement_note": note, "n_paths": len(gaunt_paths(lmax, lmax, lmax)), "spread_iqr_s": res["time_iqr_s"]}
    values = {"time_s": med, "time_iqr_s": res["time_iqr_s"], "items_per_s": res["nodes_per_s"],
              "peak_mem_bytes": res["peak_mem_bytes"], "flops": flops,
              "gflops_per_s": flops / med / 1e9 if flops else None,
              "compile_time_s": compile_time, "rel_err_vs_e3nn": agreement,
              "weights": float(sum(p.numel() for p in module.parameters()))}
    return [{"metric": tp_bench_metric(m), "value": float(v), **ctx} for m, v in values.items() if v is not None]


@register_bench("tp_bench")
class TPBench(Bench):
    """Tensor-product microbenchmarks: one point per (pass, channel mode, impl, lmax); the points
    of one (impl, channel mode, pass) share a worker."""

    def __init__(self, cfg: TPBenchConfig) -> None:
        self.cfg = cfg

    def points(self) -> list[Point]:
        cfg = self.cfg.to_dict()
        ident = {k: v for k, v in cfg.items() if k not in ("lmax", "channel_modes", "impls", "passes")}
        out = []
        for pass_ in self.cfg.passes:
            for mode in self.cfg.channel_modes:
                for impl in self.cfg.impls:
                    for lmax in self.cfg.lmax:
                        key = {**ident, "impl": impl, "channel_mode": mode, "lmax": lmax, "pass": pass_}
                        h = stable_hash(key, 16)
                        identity = {"method": impl, "spec_hash": h, "x": lmax, "x_label": "lmax",
                                    "channel_mode": mode, "mode": pass_, "seed": self.cfg.seed,
                                    "device": self.cfg.device, "clock": self.cfg.clock}
                        out.append(Point(bench=self.kind, hash=h, label=f"tp_bench/{pass_}/{mode}/{impl}/lmax={lmax}",
                                         config={"cfg": cfg, "impl": impl, "channel_mode": mode, "lmax": lmax,
                                                 "pass": pass_},
                                         identity=identity, device=self.cfg.device,
                                         group=f"tp_bench/{pass_}/{mode}/{impl}"))
        return out

    @classmethod
    def run_point(cls, point: Point, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        c = point.config
        return bench_one(TPBenchConfig.model_validate(c["cfg"]), c["impl"], c["channel_mode"], c["lmax"], c["pass"])
