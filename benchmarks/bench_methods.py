"""Per-method benchmarks on the n-body task: timings, throughput, memory, equivariance, accuracy."""
from __future__ import annotations

import torch

from .common import CLOCK, DEVICE, GRAPHS, THREADS, Benchmark, build, methods, nbody_batch, sync, task


class MethodSuite(Benchmark):
    """Inference and training step of each method at a fixed n-body batch."""
    param_names = ["method", "graphs"]
    params = (methods(), GRAPHS)

    def setup(self, method: str, graphs: int) -> None:
        super().setup()
        from equibench.metrics.throughput import make_step
        self.model = build(method).to(DEVICE)
        self.batch = nbody_batch(graphs).to(DEVICE)
        self.loss = task().loss
        self.infer = make_step(self.model, self.batch, "inference", self.loss)
        self.train = make_step(self.model, self.batch, "train", self.loss)
        self.infer()
        self.train()
        sync()

    def time_inference(self, method: str, graphs: int) -> None:
        self.infer()
        sync()

    def time_train_step(self, method: str, graphs: int) -> None:
        self.train()
        sync()

    def peakmem_train_step(self, method: str, graphs: int) -> None:
        self.train()

    def _throughput(self, mode: str) -> dict:
        from equibench.metrics.throughput import measure_throughput
        return measure_throughput(self.model, self.batch, mode, DEVICE, threads=THREADS, repeats=7,
                                  min_sample_s=0.05, flops=False, memory=False, loss_fn=self.loss, clock=CLOCK)

    def track_inference_graphs_per_s(self, method: str, graphs: int) -> float:
        return self._throughput("inference")["graphs_per_s"]
    track_inference_graphs_per_s.unit = "graphs/s"

    def track_train_graphs_per_s(self, method: str, graphs: int) -> float:
        return self._throughput("train")["graphs_per_s"]
    track_train_graphs_per_s.unit = "graphs/s"

    def track_train_peak_mem_mib(self, method: str, graphs: int) -> float:
        from equibench.metrics.throughput import peak_memory
        return peak_memory(self.train, DEVICE)[0] / 2**20
    track_train_peak_mem_mib.unit = "MiB"

    def track_inference_gflops(self, method: str, graphs: int) -> float:
        from equibench.metrics.throughput import count_flops
        return count_flops(self.infer) / 1e9
    track_inference_gflops.unit = "GFLOP"


class EquivarianceSuite(Benchmark):
    """Relative equivariance error (max over graphs and group samples) at initialisation."""
    param_names = ["method"]
    params = (methods(),)

    def setup(self, method: str) -> None:
        super().setup()
        import equibench as eb
        from equibench.symmetry.group3d import common_group
        m = eb.get_method(method)
        spec = task().spec
        self.group = common_group(spec.group, m.group) if m.exact else spec.group
        self.models = {dt: build(method, dt).to(DEVICE) for dt in (torch.float32, torch.float64)}
        self.batches = {dt: nbody_batch(16, dt).to(DEVICE) for dt in (torch.float32, torch.float64)}

    def _err(self, dtype: torch.dtype) -> float:
        import equibench as eb
        res = eb.equivariance_error(self.models[dtype], self.batches[dtype], task().spec, n_samples=4, dtype=dtype,
                                    group=self.group, seed=0)
        return float(res["rel_max"])

    def track_equivariance_fp64_rel_max(self, method: str) -> float:
        return self._err(torch.float64)
    track_equivariance_fp64_rel_max.unit = "relative error"

    def track_equivariance_fp32_rel_max(self, method: str) -> float:
        return self._err(torch.float32)
    track_equivariance_fp32_rel_max.unit = "relative error"


class AccuracySuite(Benchmark):
    """Test MSE after a short, fixed training budget (a smoke signal for accuracy regressions)."""
    param_names = ["method"]
    params = (methods(),)
    timeout = 1200

    def track_test_mse_after_100_steps(self, method: str) -> float:
        import equibench as eb
        from equibench.benches.training import TrainConfig, evaluate, train
        torch.set_num_threads(THREADS)
        t, m = task(), eb.get_method(method)
        model = build(method)
        cfg = TrainConfig(steps=100, batch_size=32, lr=1e-3, warmup_steps=5, eval_batch_size=100)
        train(model, m, t, t.load("train"), cfg, seed=0, device=DEVICE)
        return float(evaluate(model, m, t, t.load("test"), cfg.eval_batch_size, DEVICE)["mse"])
    track_test_mse_after_100_steps.unit = "MSE"


class RepeatabilitySuite(Benchmark):
    """How far 5 independent throughput measurements of one model stray from their median (%)."""
    param_names = ["method"]
    params = (["baseline"],)

    def setup(self, method: str) -> None:
        super().setup()
        self.model = build(method).to(DEVICE)
        self.batch = nbody_batch(64).to(DEVICE)

    def track_repeatability_max_dev_percent(self, method: str) -> float:
        from equibench.metrics.throughput import repeatability
        r = repeatability(self.model, self.batch, "inference", DEVICE, runs=5, repeats=10, min_sample_s=0.1,
                          threads=THREADS, clock=CLOCK)
        return 100.0 * r["max_rel_dev"]
    track_repeatability_max_dev_percent.unit = "%"
