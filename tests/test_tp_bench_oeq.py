"""OpenEquivariance in the tensor-product microbenchmark (issue 22, item 5): on a machine without
CUDA every openequivariance point is a not_applicable row with the reason, without the package a
skipped one, beside e3nn's measured rows; where both exist (GPU-marked test) it agrees with e3nn
on e3nn's own weights, uvu and uvw."""
from __future__ import annotations

import types

import pytest
import torch

import equibench as eb
from equibench.benches import tp_bench
from equibench.benches.tp_bench import TPBench, TPBenchConfig, bench_one, e3nn_tp, oeq_unavailable, oeq_weights
from equibench.core.errors import NotApplicable, Skipped
from equibench.engine.engine import run_benches
from equibench.report.sections import tp_section
from equibench.results.status import Status

SMALL = {"channels": 2, "batch": 4, "repeats": 2, "warmup": 0, "min_sample_s": 0.001, "max_warmup_samples": 0}
NO_CUDA = "OpenEquivariance's kernels need a CUDA device; this point ran on cpu"


def test_without_cuda_each_point_is_not_applicable_with_the_reason(tmp_path):
    cfg = TPBenchConfig(lmax=(1, 2), impls=("e3nn", "openequivariance"), channel_modes=("uvu", "uvw"), **SMALL)
    run_dir = run_benches([TPBench(cfg)], tmp_path / "tp", isolate=False, progress=False)
    df = eb.load_results(run_dir)
    oeq = df[df["method"] == "openequivariance"]
    assert len(oeq) == 4 and set(zip(oeq["channel_mode"], oeq["x"])) == {("uvu", 1), ("uvu", 2), ("uvw", 1),
                                                                          ("uvw", 2)}
    assert (oeq["status"] == Status.NOT_APPLICABLE).all() and (oeq["error"] == NO_CUDA).all()
    assert (df[df["method"] == "e3nn"]["status"] == Status.OK).all()
    sec = tp_section(df, tmp_path / "rep")
    assert set(sec["table"].index) == {"e3nn uvu", "e3nn uvw"}
    assert f"openequivariance: not_applicable ({NO_CUDA})" in sec["notes"]


def test_bench_one_says_why_it_cannot_run(monkeypatch):
    """No CUDA: NotApplicable; CUDA without the package: Skipped (a backend this machine lacks)."""
    with pytest.raises(NotApplicable, match="need a CUDA device"):
        bench_one(TPBenchConfig(lmax=(1,), **SMALL), "openequivariance", "uvw", 1, "forward")
    assert oeq_unavailable(torch.device("cpu")) == (NotApplicable, NO_CUDA)
    monkeypatch.setattr(tp_bench.importlib.util, "find_spec", lambda name: None)
    status, reason = oeq_unavailable(torch.device("cuda"))  # type: ignore[misc]
    assert status is Skipped and reason.startswith("openequivariance is not installed")
    cuda_cfg = TPBenchConfig(lmax=(1,), **SMALL).model_copy(update={"device": "cuda"})  # no validation: no CUDA here
    with pytest.raises(Skipped, match="not installed"):
        bench_one(cuda_cfg, "openequivariance", "uvu", 1, "forward")


@pytest.mark.parametrize("mode", ["uvu", "uvw"])
def test_e3nn_weights_go_through_the_releases_reordering(mode):
    """``reorder_weights_from_e3nn`` is what maps the weights (torch tensors, or numpy arrays in
    releases before torch support); without it only uvu keeps e3nn's order."""
    w = e3nn_tp(1, 1, 1, 3, mode).weight.detach()
    flipped = types.SimpleNamespace(reorder_weights_from_e3nn=lambda x, has_batch_dim: x.flip(0))
    assert torch.equal(oeq_weights(flipped, w, mode), w.flip(0))

    def numpy_only(x, has_batch_dim):
        if isinstance(x, torch.Tensor):
            raise TypeError("transpose() received an invalid combination of arguments")
        assert not has_batch_dim
        return x[::-1].copy()

    assert torch.equal(oeq_weights(types.SimpleNamespace(reorder_weights_from_e3nn=numpy_only), w, mode), w.flip(0))
    old = oeq_weights(types.SimpleNamespace(), w, mode)
    assert (old is not None and torch.equal(old, w)) if mode == "uvu" else old is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["uvu", "uvw"])
def test_openequivariance_agrees_with_e3nn_where_installed(mode):
    missing = oeq_unavailable(torch.device("cuda"))
    if missing is not None:
        pytest.skip(missing[1])
    cfg = TPBenchConfig(lmax=(2,), channels=8, batch=64, device="cuda", repeats=2)
    rows = {r["metric"]: r for r in bench_one(cfg, "openequivariance", mode, 2, "forward")}
    assert rows["tp_bench.rel_err_vs_e3nn"]["value"] < 1e-5 and rows["tp_bench.time_s"]["value"] > 0
    assert "tp_bench.flops" not in rows  # the FLOP counter does not see its kernels
    assert rows["tp_bench.weights"]["value"] == e3nn_tp(2, 2, 2, 8, mode).weight_numel
