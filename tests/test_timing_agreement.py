"""The suite's CPU timing agrees with ``torch.utils.benchmark.Timer.blocked_autorange`` (issue 20, item 4).

Both are driven by one fake clock that a forward hook advances by a fixed cost per model forward,
with an "interruption" (a descheduled moment) every few calls, so the tests check the mechanism,
never the machine: the suite times exactly the forward the independent timer times (one eval-mode,
no-grad forward per step), counts its calls right, and uses the same estimator (median of short
blocks), which drops interruptions that a long sample's mean (the suite's estimator before
issue 20) absorbed. ``benchmarks/bench_timing.py`` measures the agreement on real clocks.
"""
from __future__ import annotations

import types

import pytest
import torch
from torch.utils import benchmark
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import build_model
from equibench.metrics import throughput
from equibench.metrics.throughput import BLOCK_S, cpu_run, measure_throughput, time_step

COST = 2e-3  # seconds per forward on the fake clock (>= BLOCK_S: one call per block)
STALL = 0.05  # an interruption: the process descheduled for 50 ms
EVERY = 7  # one call in EVERY is interrupted: a sample's mean reads COST + STALL / EVERY = 9 ms


class FakeClock:
    """``now()`` advances only when ``tick()`` is called: by ``cost``, plus ``stall`` every ``every``-th tick."""

    def __init__(self, cost: float = COST, stall: float = STALL, every: int = EVERY) -> None:
        self.t, self.ticks, self.cost, self.stall, self.every = 0.0, 0, cost, stall, every

    def now(self) -> float:
        return self.t

    def tick(self) -> None:
        self.ticks += 1
        self.t += self.cost + (self.stall if self.ticks % self.every == 0 else 0.0)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """The suite's CPU timer reads the fake clock (both of its clocks)."""
    fake = FakeClock()
    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=fake.now, process_time=fake.now,
                                                                  time=fake.now))
    return fake


def blocked(stmt_fn, fake: FakeClock) -> float:
    """The independent timing: ``blocked_autorange`` on the same callable and the same clock."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": stmt_fn}, timer=fake.now, num_threads=1)
    return timer.blocked_autorange(min_run_time=0.5).median


def test_block_median_drops_interruptions_like_blocked_autorange(clock):
    res = time_step(clock.tick, "cpu", threads=1, repeats=5, min_sample_s=0.02, max_warmup_samples=2)
    assert res["time_median_s"] == pytest.approx(COST, rel=1e-9)  # the stalls never reach the median
    assert blocked(clock.tick, clock) == pytest.approx(COST, rel=1e-9)
    assert res["calls_per_sample"] * COST >= 0.02  # a sample still lasts min_sample_s
    # a sample's mean (what the suite reported before) would read the stalls
    mean_per_call = COST + STALL / EVERY
    assert mean_per_call > 1.5 * res["time_median_s"]


def test_blocks_of_fast_calls_last_block_s(clock):
    clock.cost, clock.stall = 1e-5, 0.0
    run = cpu_run(clock.tick, threads=1)
    run(1)  # the first call calibrates the block: grown until a block lasts BLOCK_S
    block = round(1.2 * BLOCK_S / 1e-5)
    before = clock.ticks
    assert run(1000) == pytest.approx(1000 * 1e-5, rel=1e-9)
    assert abs((clock.ticks - before) - 1000) <= block / 2  # n calls, in whole blocks of ~1.2 ms


@pytest.mark.parametrize("method", ["baseline", "egnn", "pca_canonicalization"])
def test_suite_and_blocked_autorange_time_the_same_forward(method, clock, nbody_task):
    """On cheap methods: every timed call is one eval-mode, no-grad forward of the model, and both
    timings read the same per-forward cost from the shared clock."""
    model = build_model(eb.get_method(method, params=2000), nbody_task.spec, 0, torch.float32)
    batch = Batch.from_data_list(nbody_task.load("test")[:8])
    seen: list[tuple[bool, bool]] = []

    def hook(module, args, out) -> None:
        seen.append((module.training, torch.is_grad_enabled()))
        clock.tick()
    model.register_forward_hook(hook)
    res = measure_throughput(model, batch, "inference", "cpu", threads=1, repeats=5, min_sample_s=0.02,
                             max_warmup_samples=2, flops=False, memory=False)
    assert set(seen) == {(False, False)}  # eval mode, no grad, in every timed forward
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(batch)
    indep = blocked(forward, clock)
    assert res["time_median_s"] == pytest.approx(COST, rel=1e-9)
    assert indep == pytest.approx(COST, rel=1e-9)
    assert res["graphs_per_s"] == pytest.approx(8 / COST)
