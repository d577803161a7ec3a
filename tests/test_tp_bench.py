"""Tensor-product microbenchmarks: the Gaunt product is the pointwise product on S², it equals
e3nn's Clebsch-Gordan paths up to per-path constants, it cannot produce odd paths, and the
benchmark writes tidy rows with an agreement check."""
from __future__ import annotations

import pytest
import torch
from e3nn import o3

import equibench as eb
from equibench.benches.tp_bench import (
    GauntTensorProduct,
    TPBench,
    TPBenchConfig,
    bench_one,
    e3nn_equivalent,
    e3nn_tp,
    from_channels,
    gaunt_path_constants,
    gaunt_paths,
    rel_err,
    sh_irreps,
    to_channels,
)
from equibench.core.errors import Skipped
from equibench.engine.engine import run_benches
from equibench.report.sections import tp_section
from equibench.symmetry.precision import default_dtype


def _sh(lmax: int, points: torch.Tensor) -> torch.Tensor:
    return o3.spherical_harmonics(list(range(lmax + 1)), points, normalize=True, normalization="integral")


def test_gaunt_product_is_the_pointwise_product_on_the_sphere():
    """f1 f2 evaluated at random points (not grid points) equals the Gaunt output expanded
    there, when the output keeps every degree of the product (band limit l1 + l2)."""
    g = torch.Generator().manual_seed(0)
    with default_dtype(torch.float64):
        gaunt = GauntTensorProduct(3, 2, 5, mul=1, weights=False)
        x1, x2 = torch.randn(4, 16, generator=g), torch.randn(4, 9, generator=g)
        p = torch.nn.functional.normalize(torch.randn(200, 3, generator=g), dim=1)
        out = gaunt(x1, x2)
        f1, f2, f3 = x1 @ _sh(3, p).T, x2 @ _sh(2, p).T, out @ _sh(5, p).T
    assert out.shape == (4, 36)
    assert rel_err(f3, f1 * f2) < 1e-12


def test_gaunt_blocks_are_e3nn_paths_times_constants_and_odd_paths_vanish():
    consts, resid, odd = gaunt_path_constants(2, 2, 2)
    assert set(consts) == set(gaunt_paths(2, 2, 2)) and len(consts) == 11
    assert resid < 1e-12 and odd < 1e-12
    # the cross product 1o x 1o -> 1e is a CG path Gaunt cannot express: the product of two
    # l = 1 functions has no l = 1 part
    with default_dtype(torch.float64):
        gaunt = GauntTensorProduct(1, 1, 2, mul=1, weights=False)
        v = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # pure l = 1
        w = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
        assert gaunt(v, w)[0, 1:4].abs().max() < 1e-14 and gaunt(v, w).abs().max() > 0.1
        cross = o3.FullyConnectedTensorProduct("1o", "1o", "1e")
        assert cross(v[:, 1:], w[:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["uvu", "uvw"])
def test_weighted_gaunt_equals_e3nn_with_mapped_weights(mode):
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        g = GauntTensorProduct(2, 2, 2, mul=3, mode=mode)
        tp, w = e3nn_equivalent(g)
        x1, x2 = torch.randn(7, sh_irreps(2, 3).dim), torch.randn(7, sh_irreps(2).dim)
        with torch.no_grad():
            assert rel_err(g(x1, x2), tp(x1, x2, w)) < 1e-12
    # far fewer weights than the free per-path weights of e3nn
    e3 = e3nn_tp(2, 2, 2, 3, mode)
    assert g.weight_numel < e3.weight_numel
    assert e3.weight_numel == (3 if mode == "uvu" else 9) * len(gaunt_paths(2, 2, 2))


def test_layout_round_trip():
    x = torch.randn(5, sh_irreps(3, 4).dim)
    ch = to_channels(x, 4, 3)
    assert ch.shape == (5, 4, 16) and torch.equal(from_channels(ch, 3), x)
    # channel u of degree l sits at e3nn offset sum_{l'<l} C(2l'+1) + u(2l+1)
    assert torch.equal(ch[:, 2, 1:4], x[:, 4 + 2 * 3:4 + 3 * 3])


def test_bench_one_rows_and_skips(tmp_path):
    cfg = TPBenchConfig(lmax=(1,), channels=4, batch=8, repeats=2, warmup=0, min_sample_s=0.001, max_warmup_samples=0)
    rows = {r["metric"].removeprefix("tp_bench."): r for r in bench_one(cfg, "gaunt", "uvw", 1, "forward")}
    assert rows["rel_err_vs_e3nn"]["value"] < 1e-5 and rows["time_s"]["value"] > 0
    assert rows["items_per_s"]["value"] == pytest.approx(8 / rows["time_s"]["value"])
    assert rows["flops"]["value"] > 0 and rows["time_s"]["channel_mode"] == "uvw"
    e3 = {r["metric"].removeprefix("tp_bench."): r for r in bench_one(cfg, "e3nn", "uvu", 1, "forward_backward")}
    assert e3["rel_err_vs_e3nn"]["value"] == 0.0 and e3["weights"]["value"] == 4 * len(gaunt_paths(1, 1, 1))
    with pytest.raises(Skipped, match="CUDA"):  # the engine records it as a skipped row (test_run_tp_bench_...)
        bench_one(cfg, "cuet", "uvu", 1, "forward")


def test_run_tp_bench_and_section(tmp_path):
    cfg = TPBenchConfig(lmax=(1, 2), impls=("e3nn", "gaunt", "cuet"), channels=2, batch=4, repeats=2, warmup=0,
                        min_sample_s=0.001, max_warmup_samples=0)
    run_dir = run_benches([TPBench(cfg)], tmp_path / "tp", isolate=False, progress=False)
    df = eb.load_results(run_dir)
    assert (run_dir / "env.json").exists() and set(df["bench"]) == {"tp_bench"}
    ok = df[df["status"] == "ok"]
    assert set(ok["method"]) == {"e3nn", "gaunt"} and set(ok["x"]) == {1, 2}
    assert (df[df["method"] == "cuet"]["status"] == "skipped").all()
    sec = tp_section(df, tmp_path / "rep")
    assert set(sec["table"].index) == {"e3nn uvu", "e3nn uvw", "gaunt uvu", "gaunt uvw"}
    assert {"lmax 1", "lmax 2", "max rel. err vs e3nn"} <= set(sec["table"].columns)
    assert all((tmp_path / "rep" / n).exists() for n, _ in sec["figures"]) and "l1 + l2 + l3 even" in sec["notes"][0]
    assert any("cuet: skipped" in n for n in sec["notes"])


@pytest.mark.slow
def test_compiled_e3nn_reports_compile_time():
    cfg = TPBenchConfig(lmax=(1,), channels=2, batch=4, repeats=2, warmup=0, min_sample_s=0.001, max_warmup_samples=0)
    rows = {r["metric"].removeprefix("tp_bench."): r["value"]
            for r in bench_one(cfg, "e3nn_compiled", "uvw", 1, "forward")}
    assert rows["compile_time_s"] > 0 and rows["rel_err_vs_e3nn"] < 1e-5
