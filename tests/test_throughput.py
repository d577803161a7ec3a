"""measure_throughput: FLOP counts, derived rates, the sample loop (with fake clocks), the CUDA
timing path (with mocked CUDA events; no GPU here), GPU peak table, modes and compile."""
from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch, Data

from equibench.metrics import throughput as tp
from equibench.core.errors import UserError
from equibench.metrics.throughput import (count_flops, make_step, measure_throughput, peak_flops, repeatability,
                                        sample_times, time_step)

B, IN, OUT = 64, 32, 16


class Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(IN, OUT)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.lin(batch.x)


@pytest.fixture(scope="module")
def lin_batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    graphs = [Data(x=torch.randn(8, IN, generator=g), edge_index=torch.tensor([[0, 1], [1, 0]])) for _ in range(B // 8)]
    return Batch.from_data_list(graphs)


def test_flops_of_linear_are_2_b_in_out(lin_batch):
    m = Lin()
    assert count_flops(make_step(m, lin_batch, "inference")) == 2 * B * IN * OUT
    # forward + grad of the weight (the input needs no grad): 2 matmuls of the same size
    assert count_flops(make_step(m, lin_batch, "forward_backward")) == 4 * B * IN * OUT


def test_measure_throughput_cpu_fields_are_consistent(lin_batch):
    res = measure_throughput(Lin(), lin_batch, "inference", "cpu", threads=1, repeats=4, warmup=1,
                             min_sample_s=0.002, max_warmup_samples=1)
    med = statistics.median(res["time_samples_s"])
    assert res["time_median_s"] == pytest.approx(med)
    assert res["graphs_per_s"] == pytest.approx(lin_batch.num_graphs / med)
    assert res["nodes_per_s"] == pytest.approx(B / med)
    assert res["repeats"] == 4 and len(res["time_samples_s"]) == 4 and res["threads"] == 1
    assert res["calls_per_sample"] * res["time_median_s"] >= 0.0005  # inner grown towards min_sample_s
    assert res["flops"] == 2 * B * IN * OUT
    assert res["gflops_per_s"] == pytest.approx(res["flops"] / med / 1e9)
    assert res["fraction_of_peak"] is None and res["peak_flops_per_s"] is None  # CPU: no peak table
    assert res["dtype"] == "fp32" and res["batch_nodes"] == B and res["batch_edges"] == 2 * (B // 8)
    assert res["timer"] == tp.CPU_TIMER and res["compiled"] is False  # median of short blocks (issue 20)
    assert res["peak_mem_bytes"] >= B * OUT * 4  # at least the output tensor
    assert torch.get_num_threads() >= 1


def test_modes_memory_and_copy_semantics(lin_batch):
    m = Lin()
    before = m.lin.weight.detach().clone()
    kw = dict(threads=1, repeats=2, warmup=0, min_sample_s=0.001, max_warmup_samples=0, flops=False)
    inf = measure_throughput(m, lin_batch, "inference", **kw)
    fb = measure_throughput(m, lin_batch, "forward_backward", **kw)
    tr = measure_throughput(m, lin_batch, "train", **kw)
    assert fb["peak_mem_bytes"] > inf["peak_mem_bytes"]  # gradients of output and weight on top
    assert torch.equal(m.lin.weight, before)  # train mode steps a copy, never the caller's model
    assert m.lin.weight.grad is not None  # forward_backward accumulated into the model itself
    assert {inf["mode"], fb["mode"], tr["mode"]} == {"inference", "forward_backward", "train"}
    with pytest.raises(UserError):
        make_step(m, lin_batch, "backward_only")


class FakeClock:
    """``run(n)``: n calls of a step that costs ``slow`` for the first ``n_slow`` calls, then ``fast``."""

    def __init__(self, fast: float, slow: float = 0.0, n_slow: int = 0, jitter: list[float] | None = None):
        self.fast, self.slow, self.n_slow, self.calls, self.jitter, self.runs = fast, slow, n_slow, 0, jitter, []

    def __call__(self, n: int) -> float:
        total = 0.0
        for _ in range(n):
            total += self.slow if self.calls < self.n_slow else self.fast
            self.calls += 1
        if self.jitter:
            total *= self.jitter[len(self.runs) % len(self.jitter)]
        self.runs.append(n)
        return total


def test_sample_loop_grows_inner_and_waits_for_stability():
    clock = FakeClock(fast=1e-4, slow=1e-3, n_slow=30)
    res = sample_times(clock, repeats=5, warmup=2, min_sample_s=0.01, stable_tol=0.05, max_warmup_samples=10)
    inner = res["inner"]
    assert inner * 1e-4 >= 0.01 * 0.99 and inner < 400  # one sample lasts >= min_sample_s, not wildly more
    assert res["stable"] and res["samples"] == [pytest.approx(1e-4)] * 5  # slow warm-up calls never sampled
    assert res["warmup_samples"] >= 1  # it kept warming up while the slow calls were still in the window
    assert clock.runs[:2] == [1, 1]  # the warm-up calls
    assert clock.runs[-5:] == [inner] * 5


def test_sample_loop_reports_unstable_noise():
    clock = FakeClock(fast=1e-3, jitter=[1.0, 1.3, 0.8, 1.2])
    res = sample_times(clock, repeats=3, warmup=0, min_sample_s=0.0, stable_tol=0.01, max_warmup_samples=4)
    assert not res["stable"] and res["warmup_samples"] == 4 and res["inner"] == 1
    with pytest.raises(ValueError):
        sample_times(clock, repeats=0)


class FakeEvent:
    """Stands in for torch.cuda.Event: ``record`` reads a shared fake GPU clock (ms)."""
    log: list[str] = []
    now_ms = 0.0
    created = 0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        FakeEvent.created += 1
        self.t = None

    def record(self) -> None:
        self.t = FakeEvent.now_ms
        FakeEvent.log.append("record")

    def elapsed_time(self, end: "FakeEvent") -> float:
        return end.t - self.t


class FakeFlush:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def zero_(self) -> None:
        FakeEvent.log.append("flush")
        FakeEvent.now_ms += 5.0  # a flush costs time on the GPU: must fall outside the timed windows


@pytest.fixture
def fake_cuda(monkeypatch):
    FakeEvent.log, FakeEvent.now_ms, FakeEvent.created = [], 0.0, 0
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: FakeEvent.log.append("sync"))

    class Props:
        L2_cache_size = 1 << 20
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda n, dtype=None, device=None: FakeFlush(n) if str(device).startswith("cuda")
                        else real_empty(n, dtype=dtype, device=device))

    def step() -> None:
        FakeEvent.log.append("step")
        FakeEvent.now_ms += 2.0
    return step


def test_cuda_run_times_with_events_and_synchronises(fake_cuda):
    run = tp.cuda_run(fake_cuda, torch.device("cuda:0"))
    assert run(3) == pytest.approx(3 * 2e-3)
    assert FakeEvent.log == ["record", "step", "step", "step", "record", "sync"]
    res = time_step(fake_cuda, "cuda:0", repeats=4, warmup=1, min_sample_s=0.01, max_warmup_samples=2)
    assert res["timer"] == "cuda_events" and res["threads"] is None
    assert res["time_median_s"] == pytest.approx(2e-3) and res["calls_per_sample"] * 2e-3 >= 0.01


def test_cuda_l2_flush_falls_outside_each_timed_call(fake_cuda):
    run = tp.cuda_run(fake_cuda, torch.device("cuda:0"), flush_l2=True)
    FakeEvent.log.clear()
    created = FakeEvent.created
    assert run(2) == pytest.approx(2 * 2e-3)  # the 5 ms flushes are not counted
    assert FakeEvent.log == ["flush", "record", "step", "record"] * 2 + ["sync"]
    assert FakeEvent.created - created == 4  # one event pair per call


@pytest.mark.parametrize("name, dtype, tf32, expected", [
    ("NVIDIA H100 80GB HBM3", torch.float32, False, 66.9e12),
    ("NVIDIA H100 80GB HBM3", torch.float32, True, 494.7e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, False, 756e12),
    ("NVIDIA H200", torch.bfloat16, False, 989.4e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, True, 156e12),
    ("Tesla V100-SXM2-16GB", torch.float16, False, 125e12),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, False, None),
    ("Tesla V100-SXM2-16GB", torch.float32, True, 15.7e12),  # no TF32 on Volta: the fp32 peak
    ("NVIDIA L4", torch.float32, False, 30.3e12),
    ("NVIDIA L40S", torch.float32, False, None),  # not an L4
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, False, 165.2e12),
    ("NVIDIA H100 80GB HBM3", torch.float64, False, None),
])
def test_gpu_peak_table(name, dtype, tf32, expected):
    value, kind = peak_flops(name, dtype, allow_tf32=tf32)
    assert value == (pytest.approx(expected) if expected else None)
    assert bool(kind) == bool(expected)


def test_repeatability_reports_deviation_from_median_of_medians(lin_batch):
    r = repeatability(Lin(), lin_batch, runs=3, threads=1, repeats=3, warmup=0, min_sample_s=0.002,
                      max_warmup_samples=0)
    ref = statistics.median(r["medians_s"])
    assert len(r["medians_s"]) == 3 and r["median_of_medians_s"] == pytest.approx(ref)
    assert r["max_rel_dev"] == pytest.approx(max(abs(m - ref) / ref for m in r["medians_s"]))


def test_cpu_clock_option_measures_process_time(lin_batch):
    res = measure_throughput(Lin(), lin_batch, threads=1, repeats=2, warmup=0, min_sample_s=0.001,
                             max_warmup_samples=0, flops=False, memory=False, clock="cpu")
    assert res["timer"].endswith("(process_time)") and res["time_median_s"] > 0
    with pytest.raises(ValueError):
        tp.cpu_run(lambda: None, 1, clock="sundial")


@pytest.mark.slow
def test_compile_reports_compile_time_and_recompiles(lin_batch):
    """torch.compile on CPU (inductor + a C++ compiler): can take minutes on a busy machine."""
    other = [Batch.from_data_list([Data(x=torch.randn(n, IN), edge_index=torch.tensor([[0], [1]]))]) for n in (5, 7)]
    res = measure_throughput(Lin(), lin_batch, "inference", threads=1, repeats=2, warmup=1, min_sample_s=0.001,
                             compile=True, compile_dynamic=False, recompile_batches=other, flops=True, memory=False)
    assert res["compiled"] and res["compile_time_s"] > 0 and res["compiled_graphs"] >= 1
    assert res["recompiles_during_timing"] == 0
    assert res["recompiles_variable_sizes"] == 2  # static shapes: one recompilation per new graph size
    assert res["flops"] == 2 * B * IN * OUT  # counted on the eager model


def test_asv_benchmarks_import_and_run_one_of_each_kind():
    """The asv suites (benchmarks/) stay in step with the package API."""
    import math
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_methods, bench_tp
    s = bench_methods.MethodSuite()
    s.setup("baseline", 16)
    s.time_inference("baseline", 16)
    assert s.track_inference_gflops("baseline", 16) > 0
    assert 0 < s.track_train_peak_mem_mib("baseline", 16) < 1024
    e = bench_methods.EquivarianceSuite()
    e.setup("frame_averaging")
    assert e.track_equivariance_fp64_rel_max("frame_averaging") < 1e-10
    assert bench_tp.GauntAgreementSuite().track_gaunt_rel_err_vs_e3nn("uvw", 1) < 1e-5
    t = bench_tp.TensorProductSuite()
    t.setup("gaunt", "uvu", 1)
    assert math.isfinite(float(t.forward().sum()))
    with pytest.raises(NotImplementedError):  # asv skips cuequivariance without CUDA
        t.setup("cuet", "uvu", 1)


@pytest.mark.parametrize("order", ["interleaved", "sequential"])
def test_stability_script_groups_runs_and_judges_against_the_tolerance(order, capsys):
    """benchmarks/stability.py: one line per group, PASS/FAIL against --tolerance, exit code."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from benchmarks import stability
    args = ["--methods", "baseline", "--groups", "2", "--runs", "2", "--repeats", "1", "--min-sample-s", "0.001",
            "--batch", "2", "--order", order]
    assert stability.main(args + ["--tolerance", "100"]) == 0  # any two positive medians are within 100x
    out = capsys.readouterr().out
    assert out.count("group ") == 2 and "PASS" in out and "host drift" in out and f"order={order}" in out
    assert stability.main(args + ["--tolerance", "-1"]) == 1  # a negative tolerance cannot pass
    assert "FAIL" in capsys.readouterr().out


def test_suite_cost_split_adds_up_from_the_rows():
    """benchmarks/bench_suite_cost.time_split: training from ``train.wall_s``, measurement = time in the
    worker minus training, overhead = the engine's end-to-end time minus time in the worker, per point."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_suite_cost import time_split

    def point(h: str, wall: float, inside: float, train: float) -> list[dict]:
        base = {"spec_hash": h, "status": "ok", "wall_s": wall, "started_at": "2026-12-07T00:00:00+00:00",
                "finished_at": f"2026-12-07T00:00:{inside:02.0f}+00:00"}
        return [{**base, "metric": "test.mse", "value": 1.0}, {**base, "metric": "train.wall_s", "value": train}]

    rows = point("a", 12.0, 10, 6.0) + point("b", 5.5, 5, 1.0) + [{"spec_hash": "c", "status": "failed",
                                                                   "metric": "status", "value": None}]
    split = time_split(rows)
    assert split == {"training_s": 7.0, "measurement_s": 8.0, "overhead_s": 2.5, "points_s": 17.5, "points": 2.0}
