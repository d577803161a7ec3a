"""One short GPU check (scripts/gpu-check.sh): GPU-marked tests, then one table.

Rows, on the same models and batches:
  * timer      the suite's CUDA-event figure (``measure_throughput``) against
               ``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronises itself);
  * compile    eager against ``torch.compile`` (both through ``measure_throughput``);
  * cuet       cuEquivariance against e3nn tensor products (agreement and speed), when installed;
  * backend    the ``e3nn`` method's whole network with e3nn's products against cuEquivariance's.
Without CUDA it prints one line saying so and exits 0.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print(f"gpu-check: skipped, no CUDA device here (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False)")
        return 0
    root = Path(__file__).resolve().parents[1]
    t0 = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                            str(root / "tests")], cwd=root)
    rows: list[tuple[str, ...]] = []
    rows += timer_rows()
    rows += compile_rows()
    rows += cuet_rows()
    rows += backend_rows()
    name = torch.cuda.get_device_name(0)
    print(f"\ngpu-check on {name}, torch {torch.__version__}, fp32, "
          f"{time.perf_counter() - t0:.0f} s; GPU-marked tests exit code {tests.returncode}")
    widths = [max(len(r[i]) for r in rows + [HEADER]) for i in range(len(HEADER))]
    for r in [HEADER] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return tests.returncode


HEADER = ("check", "model", "A", "A [ms]", "B", "B [ms]", "B/A", "agreement")


def _batch(task_name: str, n: int):
    from torch_geometric.data import Batch

    import equibench as eb
    task = eb.get_task(task_name, train_size=16, val_size=8, test_size=n)
    return task, Batch.from_data_list(task.load("test")[:n])


def _model(method: str, task):
    import equibench as eb
    from equibench.benches.taskrun import build_model
    return build_model(eb.get_method(method, params=20000), task.spec, 0, torch.float32).cuda().eval()


def timer_rows() -> list[tuple[str, ...]]:
    from torch.utils import benchmark

    import equibench as eb
    out = []
    task, batch = _batch("nbody", 100)
    batch = batch.cuda()
    for method in ("baseline", "e3nn", "frame_averaging"):
        try:
            model = _model(method, task)
            ours = eb.measure_throughput(model, batch, "inference", "cuda", repeats=20, flops=False)["time_median_s"]
            with torch.no_grad():
                ref = benchmark.Timer("model(batch)", globals={"model": model, "batch": batch}).blocked_autorange(
                    min_run_time=1.0).median
            out.append(("timer", method, "cuda events", f"{ours * 1e3:.4f}", "utils.benchmark", f"{ref * 1e3:.4f}",
                        f"{ref / ours:.3f}", ""))
        except Exception as err:  # one failing row must not hide the others
            out.append(("timer", method, "error", "", "", "", "", f"{type(err).__name__}: {err}"[:80]))
    return out


def compile_rows() -> list[tuple[str, ...]]:
    import equibench as eb
    out = []
    task, batch = _batch("nbody", 100)
    for method in ("baseline", "e3nn"):
        try:
            model = _model(method, task)
            eager = eb.measure_throughput(model, batch, "inference", "cuda", repeats=20, flops=False)
            comp = eb.measure_throughput(model, batch, "inference", "cuda", repeats=20, flops=False, compile=True)
            with torch.no_grad():
                b = batch.cuda()
                diff = (torch.compile(model)(b) - model(b)).abs().max().item()
            out.append(("compile", method, "eager", f"{eager['time_median_s'] * 1e3:.4f}", "compiled",
                        f"{comp['time_median_s'] * 1e3:.4f}", f"{comp['time_median_s'] / eager['time_median_s']:.3f}",
                        f"max|diff| {diff:.1e}; compile {comp['compile_time_s']:.1f} s"))
        except Exception as err:
            out.append(("compile", method, "error", "", "", "", "", f"{type(err).__name__}: {err}"[:80]))
    return out


def cuet_rows() -> list[tuple[str, ...]]:
    from equibench.benches.tp_bench import TPBenchConfig, bench_one, cuet_available
    reason = cuet_available(torch.device("cuda"))
    if reason:
        return [("cuet", "-", "", "", "", "", "", f"skipped: {reason}")]
    cfg = TPBenchConfig(lmax=(1, 2, 3), channels=32, batch=4096, device="cuda", repeats=10)
    out = []
    for lmax in cfg.lmax:
        try:
            e3 = {r["metric"]: r["value"] for r in bench_one(cfg, "e3nn", "uvw", lmax, "forward")}
            cu = {r["metric"]: r["value"] for r in bench_one(cfg, "cuet", "uvw", lmax, "forward")}
            agree = cu.get("rel_err_vs_e3nn")
            out.append(("cuet", f"uvw lmax={lmax}", "e3nn", f"{e3['time_s'] * 1e3:.4f}", "cuet",
                        f"{cu['time_s'] * 1e3:.4f}", f"{cu['time_s'] / e3['time_s']:.3f}",
                        f"rel err {agree:.1e}" if agree is not None else "weights not comparable"))
        except Exception as err:
            out.append(("cuet", f"uvw lmax={lmax}", "error", "", "", "", "", f"{type(err).__name__}: {err}"[:80]))
    return out


def backend_rows() -> list[tuple[str, ...]]:
    """The whole ``e3nn`` network (20k parameters, nbody batch of 100) with e3nn's tensor products
    against the same weights through cuEquivariance's kernels (``backend: cuequivariance``)."""
    import equibench as eb
    from equibench.benches.taskrun import build_model
    from equibench.benches.tp_bench import cuet_available
    from equibench.methods.architectures.e3nn_tp import backend_agreement, with_backend
    reason = cuet_available(torch.device("cuda"))
    if reason:
        return [("backend", "e3nn", "", "", "", "", "", f"skipped: {reason}")]
    out = []
    task, batch = _batch("nbody", 100)
    batch = batch.cuda()
    for mode in ("inference", "train"):
        try:
            cue = build_model(eb.get_method("e3nn", params=20000, backend="cuequivariance"), task.spec, 0,
                              torch.float32).cuda()
            ref = with_backend(cue, "e3nn")
            a = eb.measure_throughput(ref, batch, mode, "cuda", repeats=20, flops=False)["time_median_s"]
            b = eb.measure_throughput(cue, batch, mode, "cuda", repeats=20, flops=False)["time_median_s"]
            agree = backend_agreement(cue.eval(), batch, cue.eval()(batch))
            out.append(("backend", f"e3nn net {mode}", "e3nn", f"{a * 1e3:.4f}", "cuequivariance", f"{b * 1e3:.4f}",
                        f"{b / a:.3f}", f"rel dev {agree:.1e}"))
        except Exception as err:
            out.append(("backend", f"e3nn net {mode}", "error", "", "", "", "", f"{type(err).__name__}: {err}"[:80]))
    return out


if __name__ == "__main__":
    sys.exit(main())
