"""One short GPU check (scripts/gpu-check.sh): GPU-marked tests, then one table.

Rows, on the same models and batches:
  * timer      the suite's CUDA-event figure (``measure_throughput``) against
               ``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronises itself);
  * compile    eager against ``torch.compile`` (both through ``measure_throughput``);
  * cuet       cuEquivariance against e3nn tensor products (agreement and speed), when installed;
  * oeq        OpenEquivariance against cuEquivariance (or e3nn where cuEquivariance is absent):
               speed, and each one's agreement with e3nn, uvu and uvw, when installed;
  * backend    the ``e3nn`` method's whole network with e3nn's products against cuEquivariance's;
  * tf32       the float32 equivariance error with TF32 matmuls / convolutions off (A) and on (B)
               (``metrics.tf32.tf32_equivariance``, what the ``tf32_equivariance`` probe measures),
               freshly built exact models, with how far TF32 moves the outputs.
Cells carry their unit. No check starts after ``BUDGET_S`` (a row says which were left out), and
when gpu-check.sh's 480 s limit stops the script (SIGTERM) it still prints the rows it has, so a
slow machine loses rows, not the table. Without CUDA it prints one line saying so and exits 0.
"""
from __future__ import annotations

import signal
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
    check = "-"
    signal.signal(signal.SIGTERM, _out_of_time)
    try:
        for check, make in CHECKS:
            if time.perf_counter() - t0 > BUDGET_S:
                rows.append((check, "-", "", "", "", "", "", f"left out: past the {BUDGET_S} s budget of the checks"))
                continue
            rows += make()
    except OutOfTime:
        rows.append((check, "-", "", "", "", "", "", "stopped: gpu-check.sh's time limit (SIGTERM)"))
    name = torch.cuda.get_device_name(0)
    print(f"\ngpu-check on {name}, torch {torch.__version__}, fp32, "
          f"{time.perf_counter() - t0:.0f} s; GPU-marked tests exit code {tests.returncode}")
    widths = [max(len(r[i]) for r in rows + [HEADER]) for i in range(len(HEADER))]
    for r in [HEADER] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return tests.returncode


HEADER = ("check", "model", "A", "A value", "B", "B value", "B/A", "agreement / note")
#: seconds after which the remaining checks are left out (gpu-check.sh kills the script at 480 s)
BUDGET_S = 400


class OutOfTime(BaseException):
    """Raised by the SIGTERM handler (not an ``Exception``: the checks' per-row handlers must not catch it)."""


def _out_of_time(signum: int, frame: object) -> None:
    raise OutOfTime


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4f} ms"


def _batch(task_name: str, n: int, **options):
    from torch_geometric.data import Batch

    import equibench as eb
    task = eb.get_task(task_name, train_size=16, val_size=8, test_size=n, **options)
    return task, Batch.from_data_list(task.load("test")[:n])


def _model(method: str, task):
    import equibench as eb
    from equibench.benches.taskrun import build_model
    return build_model(eb.get_method(method, params=20000), task.spec, 0, torch.float32).cuda().eval()


def timer_rows() -> list[tuple[str, ...]]:
    from torch.utils import benchmark

    import equibench as eb
    out: list[tuple[str, ...]] = []
    task, batch = _batch("nbody", 100)
    batch = batch.cuda()
    for method in ("baseline", "e3nn", "frame_averaging"):
        try:
            model = _model(method, task)
            ours = eb.measure_throughput(model, batch, "inference", "cuda", repeats=20, flops=False)["time_median_s"]
            with torch.no_grad():
                ref = benchmark.Timer("model(batch)", globals={"model": model, "batch": batch}).blocked_autorange(
                    min_run_time=1.0).median
            out.append(("timer", method, "cuda events", _ms(ours), "utils.benchmark", _ms(ref),
                        f"{ref / ours:.3f}", ""))
        except Exception as err:  # one failing row must not hide the others
            out.append(("timer", method, "error", "", "", "", "", f"{type(err).__name__}: {err}"[:80]))
    return out


def compile_rows() -> list[tuple[str, ...]]:
    import equibench as eb
    out: list[tuple[str, ...]] = []
    task, batch = _batch("nbody", 100)
    for method in ("baseline", "e3nn"):
        try:
            model = _model(method, task)
            eager = eb.measure_throughput(model, batch, "inference", "cuda", repeats=20, flops=False)
            comp = eb.measure_throughput(model, batch, "inference", "cuda", repeats=20, flops=False, compile=True)
            with torch.no_grad():
                b = batch.cuda()
                diff = (torch.compile(model)(b) - model(b)).abs().max().item()
            out.append(("compile", method, "eager", _ms(eager["time_median_s"]), "compiled",
                        _ms(comp["time_median_s"]), f"{comp['time_median_s'] / eager['time_median_s']:.3f}",
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
    out: list[tuple[str, ...]] = []
    for lmax in cfg.lmax:
        try:
            e3 = {r["metric"]: r["value"] for r in bench_one(cfg, "e3nn", "uvw", lmax, "forward")}
            cu = {r["metric"]: r["value"] for r in bench_one(cfg, "cuet", "uvw", lmax, "forward")}
            agree = cu.get("rel_err_vs_e3nn")
            out.append(("cuet", f"uvw lmax={lmax}", "e3nn", _ms(e3["time_s"]), "cuet",
                        _ms(cu["time_s"]), f"{cu['time_s'] / e3['time_s']:.3f}",
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
    out: list[tuple[str, ...]] = []
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
            out.append(("backend", f"e3nn net {mode}", "e3nn", _ms(a), "cuequivariance", _ms(b),
                        f"{b / a:.3f}", f"rel dev {agree:.1e}"))
        except Exception as err:
            out.append(("backend", f"e3nn net {mode}", "error", "", "", "", "", f"{type(err).__name__}: {err}"[:80]))
    return out


def oeq_rows() -> list[tuple[str, ...]]:
    """OpenEquivariance (B) against cuEquivariance (A; e3nn where cuEquivariance is absent) on the
    tensor-product microbenchmark's operands (``benches.tp_bench``), forward, fp32, uvu and uvw,
    lmax 1 to 3, each with its relative difference to e3nn's output on the same weights."""
    from equibench.benches.tp_bench import TPBenchConfig, bench_one, cuet_available, oeq_unavailable
    missing = oeq_unavailable(torch.device("cuda"))
    if missing is not None:
        return [("oeq", "-", "", "", "", "", "", f"skipped: {missing[1]}")]
    base = "e3nn" if cuet_available(torch.device("cuda")) else "cuet"
    cfg = TPBenchConfig(lmax=(1, 2, 3), channels=32, batch=4096, device="cuda", repeats=10)
    out: list[tuple[str, ...]] = []
    for mode in ("uvu", "uvw"):
        for lmax in cfg.lmax:
            try:
                a = {r["metric"]: r["value"] for r in bench_one(cfg, base, mode, lmax, "forward")}
                b = {r["metric"]: r["value"] for r in bench_one(cfg, "openequivariance", mode, lmax, "forward")}
                agree = [f"{name} {d['tp_bench.rel_err_vs_e3nn']:.1e}" if "tp_bench.rel_err_vs_e3nn" in d
                         else f"{name} not comparable" for name, d in (("oeq", b), (base, a)) if name != "e3nn"]
                out.append(("oeq", f"{mode} lmax={lmax}", base, _ms(a["tp_bench.time_s"]), "openequivariance",
                            _ms(b["tp_bench.time_s"]), f"{b['tp_bench.time_s'] / a['tp_bench.time_s']:.3f}",
                            "rel err vs e3nn: " + ", ".join(agree)))
            except Exception as err:  # one failing row must not hide the others
                out.append(("oeq", f"{mode} lmax={lmax}", "error", "", "", "", "", f"{type(err).__name__}: {err}"[:80]))
    return out


def tf32_rows() -> list[tuple[str, ...]]:
    """The float32 equivariance error (mean relative, 8 group samples) of freshly built exact models
    with TF32 off (A) and on (B), and the relative change TF32 makes to their outputs (beside the
    change between two identical forwards with TF32 off). Models at initialisation: the probe
    ``tf32_equivariance`` measures trained ones in a suite."""
    from equibench.metrics.tf32 import tf32_equivariance, tf32_unavailable
    reason = tf32_unavailable(torch.device("cuda"))
    if reason:
        return [("tf32", "-", "", "", "", "", "", f"not applicable: {reason}")]
    out: list[tuple[str, ...]] = []
    for task_name, method, options in (("nbody", "egnn", {}), ("nbody", "e3nn", {}), ("nbody", "frame_averaging", {}),
                                       ("digits", "frame_averaging", {"source": "sklearn"})):
        try:
            task, batch = _batch(task_name, 100, **options)
            res = tf32_equivariance(_model(method, task), batch.cuda(), task.spec, n_samples=8, seed=0)
            out.append(("tf32", f"{method} {task_name}", "TF32 off", f"rel {res['off']['rel_mean']:.2e}", "TF32 on",
                        f"rel {res['on']['rel_mean']:.2e}", f"{res['on_over_off']:.2f}",
                        f"outputs moved {res['output_rel_dev']:.1e} (rerun {res['output_rerun_dev']:.1e})"))
        except Exception as err:
            out.append(("tf32", f"{method} {task_name}", "error", "", "", "", "", f"{type(err).__name__}: {err}"[:80]))
    return out


#: the checks after the tests, in order (the slowest, torch.compile, last: the first to be left out)
CHECKS = (("timer", timer_rows), ("tf32", tf32_rows), ("cuet", cuet_rows), ("oeq", oeq_rows),
          ("backend", backend_rows), ("compile", compile_rows))


if __name__ == "__main__":
    sys.exit(main())
