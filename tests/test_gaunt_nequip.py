"""``e3nn_nequip`` with ``tensor_product: gaunt`` (``blocks.gaunt``): the Gaunt coefficients (two routes, known
values, no odd paths), the Gaunt layer equals the CG layer's even paths times the Gaunt constants, the kept and
dropped paths are the ones the docstring lists, the network is exactly O(3)-equivariant on nbody and md, and
the option leaves the default (and its spec hashes) alone."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from e3nn import o3
from torch_geometric.data import Batch

import equibench as eb
from equibench.benches.taskrun import build_model
from equibench.core.errors import UserError
from equibench.methods.architectures import nequip_style
from equibench.methods.architectures.nequip_style import Interaction, hidden_irreps, path_split, plan_layer
from equibench.methods.base import count_parameters
from equibench.methods.blocks.gaunt import (
    family_sign,
    gaunt_coefficients,
    gaunt_path_constants,
    grid_matrices,
)
from equibench.metrics.equivariance import cast_batch
from equibench.plan.suites import expand_suite, read_suite
from equibench.symmetry.precision import default_dtype

SMALL = {"mul": 4, "depth": 2, "radial_hidden": 8}


def test_the_routes_agree_and_give_known_gaunt_coefficients():
    s2, fourier = gaunt_coefficients(3, 3, 3, "s2"), gaunt_coefficients(3, 3, 3, "fourier")
    assert float((s2 - fourier).abs().max()) < 1e-13
    # integral Y_00 Y_i Y_j = delta_ij / sqrt(4 pi) for orthonormal harmonics
    assert torch.allclose(s2[0], torch.eye(16, dtype=torch.float64) / math.sqrt(4 * math.pi), atol=1e-13)
    # odd l1 + l2 + l3: zero, e.g. the cross product 1 x 1 -> 1
    assert float(s2[1:4, 1:4, 1:4].abs().max()) < 1e-14
    # integral (Y_10)^2 Y_20 (real z-harmonics): 2 / sqrt(20 pi); e3nn's basis puts the z-like component in the
    # middle of each degree, the sign of Y_20 is a convention: compare magnitudes
    assert abs(abs(float(s2[2, 2, 6])) - 2 / math.sqrt(20 * math.pi)) < 1e-13
    with pytest.raises(UserError, match="unknown Gaunt route"):
        grid_matrices("fft", 1, 1, 1)


@pytest.mark.parametrize("lmax", [1, 2, 3])
def test_the_dropped_paths_are_the_docstrings(lmax):
    kept, dropped = path_split(lmax)
    doc = " ".join((nequip_style.__doc__ or "").split())
    assert f"lmax={lmax}: drops {', '.join(dropped)}" in doc
    natural = [p for p in kept if family_sign(o3.Irrep(p.split("x")[0])) == 1]
    assert f"lmax={lmax} runs {', '.join(natural)}" in doc
    counts = {1: (8, 10), 2: (22, 30), 3: (46, 68)}[lmax]
    assert (len(kept), len(kept) + len(dropped)) == counts
    assert f"lmax {lmax}: {counts[0]} of {counts[1]}" in doc
    # the natural subset is what the layer plan runs from natural inputs, and no pseudo irrep appears
    with default_dtype(torch.float64):
        plan = plan_layer(o3.Irreps([(1, ir) for _, ir in hidden_irreps(1, lmax) if family_sign(ir) == 1]),
                          o3.Irreps.spherical_harmonics(lmax), hidden_irreps(1, lmax), gaunt=True)
    assert all(family_sign(ir) == 1 for _, ir in plan.conv_out)
    assert len(plan.instructions) == len(natural)


def _weights_for_cg(cg: Interaction, ga: Interaction, radial: torch.Tensor) -> torch.Tensor:
    """The CG layer's per-edge weights that make its product the Gaunt layer's: w = c_l3 k_p R_{u,l2} / path_weight
    on the even paths, 0 on the odd ones."""
    fams = {conv.family.sign: (conv, j) for conv, j in zip(ga.convs, _offsets(ga))}
    ws = []
    for ins in cg.tp.instructions:
        ir1, ir2, ir3 = cg.tp.irreps_in1[ins.i_in1].ir, cg.tp.irreps_in2[ins.i_in2].ir, cg.tp.irreps_out[ins.i_out].ir
        mul = cg.tp.irreps_in1[ins.i_in1].mul
        if (ir1.l + ir2.l + ir3.l) % 2:
            ws.append(torch.zeros(radial.shape[0], mul, dtype=radial.dtype))
            continue
        conv, j = fams[family_sign(ir1)]
        fam = conv.family
        k = gaunt_path_constants(fam.l1max, max(fam.l2s), max(fam.l3s))[0][(ir1.l, ir2.l, ir3.l)]
        r = radial[:, j:j + fam.mul * len(fam.l2s)].reshape(-1, fam.mul, len(fam.l2s))[:, :, fam.l2s.index(ir2.l)]
        ws.append(conv.out_scale[ir3.l] * k / ins.path_weight * r)
    return torch.cat(ws, dim=1)


def _offsets(ga: Interaction) -> list[int]:
    out, j = [], 0
    for conv in ga.convs:
        out.append(j)
        j += conv.family.mul * len(conv.family.l2s)
    return out


def _to_layout(x: torch.Tensor, src: o3.Irreps, dst: o3.Irreps) -> torch.Tensor:
    """Features in ``src`` layout rearranged into ``dst`` (the same irreps with the same multiplicities)."""
    slices = {ir: x[:, s] for (_, ir), s in zip(src, src.slices())}
    return torch.cat([slices[ir] for _, ir in dst], dim=1)


@pytest.mark.parametrize("lmax", [1, 2])
def test_the_gaunt_layer_is_the_cg_layers_even_paths_times_the_gaunt_constants(lmax):
    with default_dtype(torch.float64):
        mul, n, e = 3, 5, 12
        hidden = hidden_irreps(mul, lmax)  # both families: every CG path of a hidden layer
        sh_irreps = o3.Irreps.spherical_harmonics(lmax)
        args = (hidden, sh_irreps, o3.Irreps("1x0e"), hidden, 4, 8, 1, False)
        cg, ga = Interaction(*args, tensor_product="cg"), Interaction(*args, tensor_product="gaunt")
        assert [c.family.sign for c in ga.convs] == [1, -1]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, hidden.dim, generator=gen)
        edge_index = torch.randint(0, n, (2, e), generator=gen)
        sh = o3.spherical_harmonics(sh_irreps, torch.randn(e, 3, generator=gen), True, normalization="component")
        radial = torch.randn(e, sum(c.family.mul * len(c.family.l2s) for c in ga.convs), generator=gen)
        assert ga.plan.uniform is not None
        gaunt = ga.convolve(_to_layout(x, hidden, ga.plan.uniform), edge_index, sh, radial)
        mid = cg.convolve(x, edge_index, sh, _weights_for_cg(cg, ga, radial))
        # sum the CG paths into each output irrep (mid: one mul x ir_out per path, sorted)
        summed: dict[o3.Irrep, torch.Tensor] = {}
        for (_, ir), s in zip(cg.tp.irreps_out, cg.tp.irreps_out.slices()):
            summed[ir] = summed.get(ir, 0) + mid[:, s]
        cg_out = torch.cat([summed[ir] for _, ir in ga.plan.mid], dim=1)
        assert gaunt.shape == cg_out.shape
        assert float((gaunt - cg_out).abs().max()) < 1e-12 * float(cg_out.abs().max())
        # the CG layer's odd paths (dropped by Gaunt) are live: weights on them alone give a nonzero output
        odd = torch.cat([torch.full((cg.tp.irreps_in1[ins.i_in1].mul,), float(_odd(cg, ins)))
                         for ins in cg.tp.instructions])
        assert 0 < int(odd.sum()) < odd.numel()
        assert float(cg.convolve(x, edge_index, sh, odd.expand(e, -1)).abs().max()) > 1e-3


def _odd(cg: Interaction, ins: object) -> bool:
    irs = (cg.tp.irreps_in1[ins.i_in1].ir, cg.tp.irreps_in2[ins.i_in2].ir, cg.tp.irreps_out[ins.i_out].ir)
    return sum(ir.l for ir in irs) % 2 == 1


@pytest.fixture(scope="module")
def tasks():
    nbody = eb.get_task("nbody", train_size=16, val_size=4, test_size=16)
    md = eb.get_task("md", equilibration=10, stride=2, train_size=16, val_size=2, test_size=8)
    return {"nbody": nbody, "md": md}


@pytest.mark.parametrize(("task", "lmax", "route"), [("nbody", 2, "s2"), ("md", 1, "fourier"),
                                                     pytest.param("md", 3, "s2", marks=pytest.mark.slow)])
def test_the_gaunt_network_is_exactly_equivariant_and_trains(tasks, task, lmax, route):
    task = tasks[task]
    method = eb.get_method("e3nn_nequip", lmax=lmax, tensor_product="gaunt", gaunt_route=route, **SMALL)
    assert method.supports(task.spec) is None
    batch = Batch.from_data_list(task.load("test")[:8])
    model = build_model(method, task.spec, 0, torch.float32)
    assert count_parameters(model) == method.count(task.spec, SMALL["mul"], SMALL["radial_hidden"])
    hidden = {ir for layer in model.layers for _, ir in layer.irreps_out}
    assert all(family_sign(ir) == 1 for ir in hidden)  # natural inputs: no pseudo irrep
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        task.loss(model(batch), batch).backward()
        opt.step()
    model.eval()
    m64 = build_model(method, task.spec, 0, torch.float64, model.state_dict())
    err = eb.equivariance_error(m64, batch, task.spec, n_samples=2, dtype=torch.float64, group="O3")
    assert err["rel_max"] < 1e-10


def test_the_fourier_route_computes_the_same_network(tasks):
    task = tasks["nbody"]
    batch = cast_batch(Batch.from_data_list(task.load("test")[:4]), torch.float64)
    outs = []
    for route in ("s2", "fourier"):
        method = eb.get_method("e3nn_nequip", lmax=2, tensor_product="gaunt", gaunt_route=route, **SMALL)
        with torch.no_grad():
            outs.append(build_model(method, task.spec, 0, torch.float64)(batch))
    assert float((outs[0] - outs[1]).abs().max()) < 1e-11 * float(outs[0].abs().max())


def test_params_match_for_both_products_and_the_default_is_unchanged(tasks):
    spec = tasks["nbody"].spec
    muls = {}
    for tp in ("cg", "gaunt"):
        method = eb.get_method("e3nn_nequip", lmax=2, params=20000, tensor_product=tp)
        mul, rh = method.sizes_for(spec, 20000)
        assert abs(method.count(spec, mul, rh) - 20000) <= 2000
        muls[tp] = mul
    assert muls["gaunt"] > muls["cg"]  # fewer weights per channel
    assert "tensor_product" not in eb.get_method("e3nn_nequip").options  # default specs hash as before
    assert "gaunt_route" not in eb.get_method("e3nn_nequip", tensor_product="gaunt").options
    assert eb.get_method("e3nn_nequip", tensor_product="gaunt").options["tensor_product"] == "gaunt"
    with pytest.raises(UserError, match="tensor_product must be one of"):
        eb.get_method("e3nn_nequip", tensor_product="clebsch")
    with pytest.raises(UserError, match="gaunt_route applies to tensor_product: gaunt only"):
        eb.get_method("e3nn_nequip", gaunt_route="fourier")


def test_a_pseudo_output_is_not_supported_with_gaunt(tasks):
    spec = dataclasses.replace(tasks["nbody"].spec, output="1e", level="node")
    assert eb.get_method("e3nn_nequip").supports(spec) is None
    reason = eb.get_method("e3nn_nequip", tensor_product="gaunt").supports(spec)
    assert reason and "l1 + l2 + l3 odd" in reason and "1e" in reason


def test_the_gaunt_suite_pairs_cg_and_gaunt_at_each_lmax():
    specs = [s for s in expand_suite(read_suite("gaunt")) if s.seed == 0]
    pairs = {(s.method_options["lmax"], s.method_options.get("tensor_product", "cg")): s for s in specs}
    assert set(pairs) == {(lmax, tp) for lmax in (1, 2, 3) for tp in ("cg", "gaunt")}
    assert all(s.method_options["params"] == 20000 and s.task == "md" for s in specs)
    assert "tensor_product" not in pairs[(1, "cg")].method_options  # the default, as every other suite's rows
