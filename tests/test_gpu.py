"""GPU-marked tests: they run where CUDA is (``scripts/gpu-check.sh`` runs exactly these) and are
skipped, with the reason, everywhere else. Timings are never asserted; properties are."""
from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import build_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def nbody_batch():
    task = eb.get_task("nbody", train_size=16, val_size=8, test_size=16)
    return task, Batch.from_data_list(task.load("test"))


@pytest.mark.parametrize("method", [m for m in ("frame_averaging", "e3nn", "tensor_frames", "escnn")])
def test_exact_methods_stay_exact_on_cuda_in_float64(method, nbody_batch):
    task, batch = nbody_batch
    model = build_model(eb.get_method(method), task.spec, 0, torch.float64).cuda()
    res = eb.equivariance_error(model, batch.cuda(), task.spec, n_samples=4, dtype=torch.float64)
    assert res["rel_max"] < 1e-10


def test_cuda_events_time_a_model_and_count_its_memory(nbody_batch):
    task, batch = nbody_batch
    model = build_model(eb.get_method("baseline"), task.spec, 0, torch.float32)
    res = eb.measure_throughput(model, batch, "train", "cuda", repeats=3)
    assert res["timer"] == "cuda_events" and res["time_median_s"] > 0 and res["peak_mem_bytes"] > 0


def test_cuequivariance_agrees_with_e3nn_where_installed():
    from equibench.benches.tp_bench import TPBenchConfig, bench_one, cuet_available
    reason = cuet_available(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    cfg = TPBenchConfig(lmax=(2,), channels=8, batch=64, device="cuda", repeats=2)
    rows = {r["metric"]: r["value"] for r in bench_one(cfg, "cuet", "uvw", 2, "forward")}
    assert rows["rel_err_vs_e3nn"] < 1e-5


def test_e3nn_method_with_cuequivariance_kernels_agrees_and_stays_exact(nbody_batch):
    """The ``e3nn`` method's cuEquivariance backend on CUDA (its kernels, not the CPU fallback):
    the same weights give e3nn's outputs in float32 to 1e-5, and float64 stays exact."""
    from equibench.benches.tp_bench import cuet_available
    from equibench.methods.architectures.e3nn_tp import backend_agreement
    reason = cuet_available(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    task, batch = nbody_batch
    method = eb.get_method("e3nn", backend="cuequivariance", params=20000)
    assert method.supports(task.spec) is None
    model = build_model(method, task.spec, 0, torch.float32).cuda().eval()
    b = batch.cuda()
    assert backend_agreement(model, b, model(b)) < 1e-5
    m64 = build_model(method, task.spec, 0, torch.float64).cuda()
    assert eb.equivariance_error(m64, b, task.spec, n_samples=4, dtype=torch.float64)["rel_max"] < 1e-10
