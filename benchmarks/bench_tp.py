"""Tensor-product microbenchmarks: e3nn (Clebsch-Gordan) against Gaunt on an S² grid (and
cuequivariance-torch on a GPU), over lmax and the uvu / uvw channel modes."""
from __future__ import annotations

import torch

from .common import CLOCK, DEVICE, LMAX, THREADS, TP_IMPLS, Benchmark, sync

CHANNELS, PAIRS = 16, 256


def _module(impl: str, mode: str, lmax: int) -> torch.nn.Module:
    from equibench.benches import tp_bench
    if impl == "cuet":
        reason = tp_bench.cuet_available(DEVICE)
        if reason:
            raise NotImplementedError(reason)  # asv: skip this parameter combination
        return tp_bench._cuet_module(mode, lmax, CHANNELS, DEVICE, torch.float32)
    if impl.startswith("gaunt"):
        m = tp_bench.GauntTensorProduct(lmax, lmax, lmax, CHANNELS, mode).to(DEVICE)
    else:
        m = tp_bench.e3nn_tp(lmax, lmax, lmax, CHANNELS, mode).to(DEVICE)
    return torch.compile(m, dynamic=False) if impl.endswith("_compiled") else m


class TensorProductSuite(Benchmark):
    param_names = ["impl", "channel_mode", "lmax"]
    params = (TP_IMPLS, ["uvu", "uvw"], LMAX)

    def setup(self, impl: str, mode: str, lmax: int) -> None:
        super().setup()
        from equibench.benches.tp_bench import sh_irreps
        self.tp = _module(impl, mode, lmax)
        self.x1 = torch.randn(PAIRS, sh_irreps(lmax, CHANNELS).dim, device=DEVICE)
        self.x2 = torch.randn(PAIRS, sh_irreps(lmax).dim, device=DEVICE)
        self.forward()  # compiles the compiled variants outside the timings
        sync()

    def forward(self) -> torch.Tensor:
        with torch.no_grad():
            return self.tp(self.x1, self.x2)

    def time_forward(self, impl: str, mode: str, lmax: int) -> None:
        self.forward()
        sync()

    def peakmem_forward(self, impl: str, mode: str, lmax: int) -> None:
        self.forward()

    def track_forward_pairs_per_s(self, impl: str, mode: str, lmax: int) -> float:
        from equibench.metrics.throughput import time_step
        t = time_step(self.forward, DEVICE, threads=THREADS, repeats=7, min_sample_s=0.05, clock=CLOCK)
        return PAIRS / t["time_median_s"]
    track_forward_pairs_per_s.unit = "pairs/s"


class GauntAgreementSuite(Benchmark):
    """Gaunt product against e3nn with the Gaunt weights mapped per path (should be round-off)."""
    param_names = ["channel_mode", "lmax"]
    params = (["uvu", "uvw"], LMAX)

    def track_gaunt_rel_err_vs_e3nn(self, mode: str, lmax: int) -> float:
        from equibench.benches.tp_bench import GauntTensorProduct, e3nn_equivalent, rel_err, sh_irreps
        torch.manual_seed(0)
        g = GauntTensorProduct(lmax, lmax, lmax, CHANNELS, mode)
        tp, w = e3nn_equivalent(g)
        x1, x2 = torch.randn(64, sh_irreps(lmax, CHANNELS).dim), torch.randn(64, sh_irreps(lmax).dim)
        with torch.no_grad():
            return rel_err(g(x1, x2), tp(x1, x2, w))
    track_gaunt_rel_err_vs_e3nn.unit = "relative error"
