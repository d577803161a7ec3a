"""Gaunt tensor products (Luo, Chen, Krishnapriyan, "Enabling Efficient Equivariant Operations in the Fourier
Basis via Gaunt Tensor Products", ICLR 2024): products of spherical-harmonic coefficient vectors computed as
products of functions on the sphere.

A coefficient vector x = (x^l_m) with degrees l <= L is the band-limited function f(s) = sum_lm x^l_m Y^l_m(s)
on S². The Gaunt product of x1 and x2 is the projection of the pointwise product back onto the harmonics,

    (x1 (x)_G x2)^{l3}_{m3} = sum_{l1 m1 l2 m2} G^{l1 l2 l3}_{m1 m2 m3} x1^{l1}_{m1} x2^{l2}_{m2},
    G^{l1 l2 l3}_{m1 m2 m3} = integral over S² of Y^{l1}_{m1} Y^{l2}_{m2} Y^{l3}_{m3}  (the Gaunt coefficients).

Each block G^{l1 l2 l3} is an invariant of l1 x l2 x l3, hence a constant k_p times the Clebsch-Gordan
(Wigner 3j) coupling of that path p = (l1, l2, l3) (``gaunt_path_constants``). It vanishes when l1 + l2 + l3 is
odd (Y^l(-s) = (-1)^l Y^l(s), so the integrand is odd): a Gaunt product has no antisymmetric path such as the
cross product 1o x 1o -> 1e. Computed on a grid, the product costs O(L^3) (S² grid, 2-D FFT) instead of the
O(L^6) of a sum over all Clebsch-Gordan paths, and a weight per path becomes a weight per degree
(w_{l1} w_{l2} w_{l3}, the paper's reparametrisation).

Here:

* ``GauntTensorProduct``: x1 with ``mul`` channels times a one-channel x2, e3nn layouts in and out, per-degree
  weights; the tensor-product benchmark's ``gaunt`` implementation (``benches.tp_bench``), with ``e3nn_tp`` /
  ``e3nn_equivalent`` / ``gaunt_path_constants`` for its agreement check against e3nn.
* ``GauntConvolution``: the interaction product of a message-passing layer (``e3nn_nequip`` with
  ``tensor_product: gaunt``): node features times an edge filter on the sphere, summed over neighbours on the
  grid, then projected (its docstring).
* ``grid_matrices``: the two routes to the product as dense matrices (to the grid from each operand, from the
  grid to the output): ``"s2"``, e3nn's S² grid (Kostelec-Rockmore quadrature in beta, uniform in alpha);
  ``"fourier"``, the 2-D Fourier route (the sphere parametrised by (theta, phi) on the torus, see
  ``fourier_matrices``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from e3nn import o3
from torch import nn

from ...core.errors import UserError
from ...symmetry.precision import default_dtype

#: channel modes of ``GauntTensorProduct``: channel-wise, or a channel mix per output degree
CHANNEL_MODES = ("uvu", "uvw")
#: the ways to compute the product: e3nn's S² grid, or the 2-D Fourier basis on the torus
ROUTES = ("s2", "fourier")


def sh_irreps(lmax: int, mul: int = 1) -> o3.Irreps:
    """``mul x 0e + mul x 1o + mul x 2e + ...`` up to ``lmax`` (spherical-harmonic parities)."""
    return o3.Irreps([(mul, (l, (-1) ** l)) for l in range(lmax + 1)])


def gaunt_paths(l1max: int, l2max: int, lomax: int) -> list[tuple[int, int, int]]:
    """Paths (l1, l2, l3) with the triangle rule and l1 + l2 + l3 even."""
    return [(a, b, c) for a in range(l1max + 1) for b in range(l2max + 1) for c in range(lomax + 1)
            if abs(a - b) <= c <= a + b and (a + b + c) % 2 == 0]


def degree_index(lmax: int) -> torch.Tensor:
    """Degree l of each of the (lmax+1)^2 spherical-harmonic components."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(lmax + 1)])


def to_channels(x: torch.Tensor, mul: int, lmax: int) -> torch.Tensor:
    """e3nn layout ``[..., mul x (0..lmax)]`` -> ``[..., mul, (lmax+1)^2]``."""
    out, i = [], 0
    for l in range(lmax + 1):
        d = 2 * l + 1
        out.append(x[..., i:i + mul * d].reshape(*x.shape[:-1], mul, d))
        i += mul * d
    return torch.cat(out, dim=-1)


def from_channels(y: torch.Tensor, lmax: int) -> torch.Tensor:
    """``[..., mul, (lmax+1)^2]`` -> e3nn layout ``[..., mul x (0..lmax)]``."""
    return torch.cat([y[..., l * l:(l + 1) ** 2].reshape(*y.shape[:-2], -1) for l in range(lmax + 1)], dim=-1)


class GauntTensorProduct(nn.Module):
    """Gaunt tensor product on an S² grid, e3nn layouts in and out (module docstring; the weights as in
    ``benches.tp_bench``: one scale per (channel, l1), per l2 and per (channel, l3)).

    ``x1 [B, mul x (0..l1max)]``, ``x2 [B, 0..l2max]`` (one channel) -> ``[B, mul x (0..lomax)]``:

        out_u^{l3} = a_{u,l3} P_{l3}[ f_u g ],  f_u = sum_{l1} b_{u,l1} x1_u^{l1} . Y,  g = sum_{l2} c_{l2} x2^{l2} . Y

    (``uvw``: then out_w^{l3} = sum_u W^{l3}_{wu} (...)_u). The grid (``res_beta`` =
    2 (l1max + l2max + 1), ``res_alpha`` = 2 (l1max + l2max) + 1, Kostelec-Rockmore quadrature)
    integrates the band-limited product exactly. ``weights=False`` gives the bare Gaunt product.
    """

    def __init__(self, l1max: int, l2max: int, lomax: int, mul: int, mode: str = "uvu", weights: bool = True,
                 res: tuple[int, int] | None = None) -> None:
        super().__init__()
        if mode not in CHANNEL_MODES:
            raise UserError(f"unknown channel mode {mode!r} (known: {', '.join(CHANNEL_MODES)})")
        if lomax > l1max + l2max:
            raise UserError(f"lomax {lomax} exceeds l1max + l2max = {l1max + l2max}: the product has no such degrees")
        lp = l1max + l2max
        res = res or (2 * (lp + 1), 2 * lp + 1)
        self.l1max, self.l2max, self.lomax, self.mul, self.mode = l1max, l2max, lomax, mul, mode
        self.to1 = o3.ToS2Grid(l1max, res, normalization="integral")
        self.to2 = o3.ToS2Grid(l2max, res, normalization="integral")
        self.back = o3.FromS2Grid(res, lomax, normalization="integral")
        self.irreps_in1, self.irreps_in2 = sh_irreps(l1max, mul), sh_irreps(l2max)
        self.irreps_out = sh_irreps(lomax, mul)
        self.deg1: torch.Tensor
        self.deg2: torch.Tensor
        self.dego: torch.Tensor
        self.register_buffer("deg1", degree_index(l1max), persistent=False)
        self.register_buffer("deg2", degree_index(l2max), persistent=False)
        self.register_buffer("dego", degree_index(lomax), persistent=False)
        self.weighted = weights
        if weights:
            self.w1 = nn.Parameter(torch.randn(mul, l1max + 1))
            self.w2 = nn.Parameter(torch.randn(l2max + 1))
            if mode == "uvu":
                self.w3 = nn.Parameter(torch.randn(mul, lomax + 1))
            else:
                self.w3 = nn.Parameter(torch.randn(lomax + 1, mul, mul) / mul ** 0.5)

    @property
    def weight_numel(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        a = to_channels(x1, self.mul, self.l1max)  # [B, C, n1]
        b = x2
        if self.weighted:
            a = a * self.w1[:, self.deg1]
            b = b * self.w2[self.deg2]
        prod = self.to1(a) * self.to2(b).unsqueeze(-3)  # [B, C, beta, alpha]
        y = self.back(prod)  # [B, C, n_out]
        if self.weighted:
            if self.mode == "uvu":
                y = y * self.w3[:, self.dego]
            else:
                y = torch.einsum("bui,iwu->bwi", y, self.w3[self.dego])
        return from_channels(y, self.lomax)


def e3nn_tp(l1max: int, l2max: int, lomax: int, mul: int, mode: str, internal_weights: bool = True) -> o3.TensorProduct:
    """e3nn's product on the operands above: FullyConnectedTensorProduct (uvw) or a channel-wise
    TensorProduct with every parity-allowed path (uvu)."""
    ir1, ir2, iro = sh_irreps(l1max, mul), sh_irreps(l2max), sh_irreps(lomax, mul)
    if mode == "uvw" and internal_weights:
        return o3.FullyConnectedTensorProduct(ir1, ir2, iro)
    instr = [(a, b, c, mode, True) for a, b, c in gaunt_paths(l1max, l2max, lomax)]
    return o3.TensorProduct(ir1, ir2, iro, instr, internal_weights=internal_weights, shared_weights=True)


@functools.lru_cache(maxsize=32)
def gaunt_path_constants(l1max: int, l2max: int, lomax: int, dtype: torch.dtype = torch.float64
                         ) -> tuple[dict[tuple[int, int, int], float], float, float]:
    """Per-path constants k_p with Gaunt block G_p = k_p x (e3nn path p / its ``path_weight``).

    e3nn's path p of any product on these irreps is ``path_weight_p`` (its normalisation, which
    depends on the channel mode and multiplicities) times a fixed coupling; G_p and e3nn's path
    are probed with the basis vectors of the (l1, l2) blocks. Returns (k_p per path, max relative
    residual ||G_p - k_p T_p|| / ||G_p|| over paths, largest |G| on the blocks with l1 + l2 + l3
    odd relative to the largest |G|): the last two are zero up to round-off when Gaunt = CG x const.
    """
    with default_dtype(dtype):
        gaunt = GauntTensorProduct(l1max, l2max, lomax, 1, weights=False)
        n1, n2 = (l1max + 1) ** 2, (l2max + 1) ** 2
        with torch.no_grad():
            G = gaunt(torch.eye(n1).repeat_interleave(n2, dim=0), torch.eye(n2).repeat(n1, 1)).reshape(n1, n2, -1)
            consts, resid = {}, 0.0
            for a, b, c in gaunt_paths(l1max, l2max, lomax):
                d1, d2 = 2 * a + 1, 2 * b + 1
                # the path alone (its coupling / path_weight does not depend on the other paths)
                tp = o3.TensorProduct(o3.Irreps([(1, (a, (-1) ** a))]), o3.Irreps([(1, (b, (-1) ** b))]),
                                      o3.Irreps([(1, (c, (-1) ** c))]), [(0, 0, 0, "uvu", True)],
                                      internal_weights=False, shared_weights=True)
                x1 = torch.eye(d1).repeat_interleave(d2, dim=0)
                x2 = torch.eye(d2).repeat(d1, 1)
                t = tp(x1, x2, torch.ones(1)).reshape(d1, d2, -1) / tp.instructions[0].path_weight
                g = G[a * a:(a + 1) ** 2, b * b:(b + 1) ** 2, c * c:(c + 1) ** 2]
                k = float((t * g).sum() / (t * t).sum())
                consts[(a, b, c)] = k
                resid = max(resid, float((g - k * t).norm() / g.norm()))
        odd = max((float(G[a * a:(a + 1) ** 2, b * b:(b + 1) ** 2, c * c:(c + 1) ** 2].abs().max())
                   for a in range(l1max + 1) for b in range(l2max + 1) for c in range(lomax + 1)
                   if (a + b + c) % 2 == 1 and abs(a - b) <= c <= a + b), default=0.0)
        return consts, resid, odd / float(G.abs().max())


def e3nn_equivalent(g: GauntTensorProduct) -> tuple[o3.TensorProduct, torch.Tensor]:
    """An e3nn product and its weight vector that compute exactly what the weighted Gaunt
    product ``g`` computes (w_p = k_p / path_weight_p x the factorised Gaunt weights of path p)."""
    tp = e3nn_tp(g.l1max, g.l2max, g.lomax, g.mul, g.mode, internal_weights=False)
    consts, _, _ = gaunt_path_constants(g.l1max, g.l2max, g.lomax)
    ws = []
    with torch.no_grad():
        for (a, b, c), ins in zip(gaunt_paths(g.l1max, g.l2max, g.lomax), tp.instructions):
            k = consts[(a, b, c)] / ins.path_weight
            if g.mode == "uvu":  # weight shape [mul1, mul2] = [C, 1]
                w = k * g.w1[:, a] * g.w2[b] * g.w3[:, c]
            else:  # [mul1, mul2, mul_out] = [C, 1, C]; W^{l3}[w, u] -> [u, w]
                w = k * g.w1[:, a, None] * g.w2[b] * g.w3[c].T
            ws.append(w.reshape(-1))
    return tp.to(g.w1.device), torch.cat(ws).to(g.w1.dtype)




# ---------------------------------------------------------------------------------------------
# the two routes as matrices, and the interaction product of a message-passing layer

def family_sign(ir: o3.Irrep) -> int:
    """+1 for an irrep with the parity of the spherical harmonics of its degree, p = (-1)^l ("natural":
    0e, 1o, 2e, 3o), -1 for the others ("pseudo": 0o, 1e, 2o, 3e). A natural irrep is the coefficient
    vector of a function on S²; a pseudo one is such a function times a pseudoscalar."""
    return 1 if ir.p == (-1) ** ir.l else -1


def family_irrep(l: int, sign: int) -> o3.Irrep:
    """The irrep of degree ``l`` in family ``sign`` (``family_sign``)."""
    return o3.Irrep(l, sign * (-1) ** l)


def gaunt_allows(ir1: o3.Irrep, ir2: o3.Irrep, ir3: o3.Irrep) -> bool:
    """Whether a Gaunt product has the path ir1 x ir2 -> ir3: a Clebsch-Gordan path (triangle rule,
    p3 = p1 p2) with l1 + l2 + l3 even. Equivalently: a CG path whose output family (``family_sign``) is
    the product of the input families (natural x natural -> natural, pseudo x natural -> pseudo)."""
    return ir3 in ir1 * ir2 and (ir1.l + ir2.l + ir3.l) % 2 == 0


def _s2_matrices(l1max: int, l2max: int, lomax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e3nn's S² grid at ``GauntTensorProduct``'s resolution, as matrices (float64)."""
    lp = l1max + l2max
    res = (2 * (lp + 1), 2 * lp + 1)
    with default_dtype(torch.float64):
        to1 = o3.ToS2Grid(l1max, res, normalization="integral")
        to2 = o3.ToS2Grid(l2max, res, normalization="integral")
        back = o3.FromS2Grid(res, lomax, normalization="integral")
        n_grid = res[0] * res[1]
        with torch.no_grad():
            m1 = to1(torch.eye((l1max + 1) ** 2)).reshape(-1, n_grid)
            m2 = to2(torch.eye((l2max + 1) ** 2)).reshape(-1, n_grid)
            p = back(torch.eye(n_grid).reshape(n_grid, *res))
    return m1, m2, p


def _half_sine_integrals(k: torch.Tensor) -> torch.Tensor:
    """I(k) = integral_0^pi sin(t) e^{i k t} dt (complex128), from
    sin(t) e^{ikt} = (e^{i(k+1)t} - e^{i(k-1)t}) / 2i and integral_0^pi e^{ijt} dt = pi (j = 0), ((-1)^j - 1) / (ij)."""
    def j_int(j: torch.Tensor) -> torch.Tensor:
        jc = j.to(torch.complex128)
        safe = torch.where(j == 0, torch.ones_like(jc), jc)
        odd = ((-1.0) ** j.abs().to(torch.float64) - 1.0).to(torch.complex128)
        return torch.where(j == 0, torch.full_like(jc, math.pi), odd / (1j * safe))
    return (j_int(k + 1) - j_int(k - 1)) / 2j


def fourier_matrices(l1max: int, l2max: int, lomax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2-D Fourier route as matrices (float64). The sphere is parametrised on the torus,
    s(t, p) = (sin t cos p, sin t sin p, cos t) with t, p in [0, 2 pi): a harmonic of degree l is a homogeneous
    polynomial of degree l in s, so F(t, p) = f(s(t, p)) is a 2-D trigonometric polynomial with frequencies
    |u|, |v| <= l (its 2-D Fourier coefficients are the paper's sphere-to-Fourier change of basis), and the
    product of two such functions is the 2-D convolution of their coefficients. With n = 2 (l1max + l2max) + 1
    points per axis the product is sampled without aliasing (the inverse 2-D FFT of the coefficients; the
    convolution is the pointwise product there), its coefficients F^_uv come back by the 2-D FFT, and the
    projection onto Y^l_m (orthonormal) is exact:

        c_lm = integral_0^pi sin t dt integral_0^2pi dp F Y_lm = sum_uv F^_uv 2 pi sum_u' Y^_lm(u', -v) I(u + u'),

    I(k) = integral_0^pi sin t e^{ikt} dt in closed form (``_half_sine_integrals``). Returns (to the torus grid
    from x1, from x2, from the grid to the output coefficients): the sample values of Y and the
    FFT-then-project map, the FFTs folded into dense matrices once (at these degrees one dense product is
    cheaper than FFTs on a CPU)."""
    lp = l1max + l2max
    n = 2 * lp + 1
    with default_dtype(torch.float64):
        t = 2 * math.pi * torch.arange(n) / n
        tt, pp = torch.meshgrid(t, t, indexing="ij")
        s = torch.stack([tt.sin() * pp.cos(), tt.sin() * pp.sin(), tt.cos()], -1).reshape(-1, 3)
        ls = list(range(max(l1max, l2max, lomax) + 1))
        y = o3.spherical_harmonics(ls, s, normalize=False, normalization="integral")  # [n*n, (L+1)^2]
    m1, m2 = y[:, :(l1max + 1) ** 2].T.contiguous(), y[:, :(l2max + 1) ** 2].T.contiguous()
    no = (lomax + 1) ** 2
    freqs = torch.fft.fftfreq(n, 1.0 / n).round().long()  # u for each FFT index
    # Fourier coefficients of the output harmonics: Yhat[k, a, b] for frequencies (freqs[a], freqs[b])
    yhat = torch.fft.fft2(y[:, :no].T.reshape(no, n, n).to(torch.complex128)) / (n * n)
    # W[k, a, b] = 2 pi sum_{a'} Yhat[k, a', -b] I(u_a + u_a')
    neg_b = (-freqs) % n
    ii = _half_sine_integrals(freqs[:, None] + freqs[None, :])  # [a, a']
    w = 2 * math.pi * torch.einsum("kcb,ac->kab", yhat[:, :, neg_b], ii)
    # the projection of the samples: Fhat = fft2(F) / n^2, c_k = sum_ab Fhat_ab W[k, a, b]
    eye = torch.eye(n * n, dtype=torch.complex128).reshape(n * n, n, n)
    fhat = torch.fft.fft2(eye) / (n * n)  # [g, a, b]
    p = torch.einsum("gab,kab->gk", fhat, w).real.contiguous()
    return m1, m2, p


@functools.lru_cache(maxsize=64)
def grid_matrices(route: str, l1max: int, l2max: int, lomax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M1 [(l1max+1)^2, G], M2 [(l2max+1)^2, G], P [G, (lomax+1)^2]), float64: the Gaunt product of x1 and x2
    is ``((x1 @ M1) * (x2 @ M2)) @ P`` on a grid of G points that resolves degree l1max + l2max exactly.
    Cached: do not modify the returned tensors."""
    if route not in ROUTES:
        raise UserError(f"unknown Gaunt route {route!r} (known: {', '.join(ROUTES)})")
    if lomax > l1max + l2max:
        raise UserError(f"lomax {lomax} exceeds l1max + l2max = {l1max + l2max}: the product has no such degrees")
    return (_s2_matrices if route == "s2" else fourier_matrices)(l1max, l2max, lomax)


def gaunt_coefficients(l1max: int, l2max: int, lomax: int, route: str = "s2") -> torch.Tensor:
    """The real Gaunt coefficients G[i, j, k] = integral Y_i Y_j Y_k (orthonormal real harmonics, e3nn's
    basis), float64, from ``grid_matrices`` (the routes agree to round-off)."""
    m1, m2, p = grid_matrices(route, l1max, l2max, lomax)
    return torch.einsum("ig,jg,gk->ijk", m1, m2, p)


@dataclass(frozen=True)
class GauntFamily:
    """One family (``family_sign``) of node features in a Gaunt layer: ``mul`` channels of every degree
    0..``l1max`` (irreps ``family_irrep(l, sign)``), filter degrees ``l2s`` (natural: spherical harmonics),
    output degrees ``l3s`` (the same family)."""
    sign: int
    mul: int
    l1max: int
    l2s: tuple[int, ...]
    l3s: tuple[int, ...]

    @property
    def irreps_in(self) -> o3.Irreps:
        return o3.Irreps([(self.mul, family_irrep(l, self.sign)) for l in range(self.l1max + 1)])

    @property
    def irreps_out(self) -> o3.Irreps:
        return o3.Irreps([(self.mul, family_irrep(l, self.sign)) for l in self.l3s])

    @property
    def paths(self) -> list[tuple[int, int, int]]:
        """(l1, l2, l3) with the triangle rule and l1 + l2 + l3 even."""
        return [(a, b, c) for a in range(self.l1max + 1) for b in self.l2s for c in self.l3s
                if abs(a - b) <= c <= a + b and (a + b + c) % 2 == 0]


def from_degrees(y: torch.Tensor, ls: tuple[int, ...]) -> torch.Tensor:
    """``[..., mul, sum_l (2l+1)]`` (degrees ``ls`` in order) -> e3nn layout ``[..., mul x l for l in ls]``."""
    out, i = [], 0
    for l in ls:
        out.append(y[..., i:i + 2 * l + 1].reshape(*y.shape[:-2], -1))
        i += 2 * l + 1
    return torch.cat(out, dim=-1)


class GauntConvolution(nn.Module):
    """The interaction product of a message-passing layer as a Gaunt product (one ``GauntFamily``).

    Node features x_j (``mul`` channels u, degrees l1 <= l1max) are functions f_{j,u}(s) = sum x_{j,u}^{l1} . Y(s);
    an edge j -> i carries the filter g_{ij,u}(s) = sum_{l2 in l2s} R_{ij,u,l2} Y^{l2}(r_ij) . Y^{l2}(s), its
    degree-l2 weights R (per edge and channel) from the radial network. The message sum is projected once per
    node, after the sum (the projection is linear):

        out_{i,u}^{l3} = c_{l3} P_{l3}[ sum_j f_{j,u} g_{ij,u} ]
                       = c_{l3} sum_j sum_{l1, l2} R_{ij,u,l2} k_{l1 l2 l3} C^{l1 l2 l3}(x_{j,u}^{l1}, Y^{l2}(r_ij))

    with C the Clebsch-Gordan (Wigner 3j) coupling and k_p the Gaunt constant of path p
    (``gaunt_path_constants``): e3nn's channel-wise ('uvu') product with per-edge path weights
    w_{ij,u,p} = c_{l3} k_p R_{ij,u,l2}, restricted to the paths with l1 + l2 + l3 even. The per-(u, l1) and
    per-(u, l3) weights of the paper's factorisation are the channel mixes before and after (the layer's
    linear maps). c_{l3} = sqrt((2 l3 + 1) / sum_{l1, l2} k_{l1 l2 l3}^2) gives each output component about
    unit variance for unit-variance inputs and weights (as e3nn's 'component' normalisation does per path).
    Every step is exact for band-limited functions on the grid of ``grid_matrices``, so the product is
    exactly O(3)-equivariant (to round-off). The pseudo family (``sign`` -1) takes the same product: a pseudo
    feature is a natural one times a pseudoscalar, and so is the product."""

    def __init__(self, family: GauntFamily, route: str = "s2") -> None:
        super().__init__()
        self.family, self.route = family, route
        l2max, lomax = max(family.l2s), max(family.l3s)
        m1, m2, p = grid_matrices(route, family.l1max, l2max, lomax)
        g = gaunt_coefficients(family.l1max, l2max, lomax, route)
        deg1, deg2, dego = degree_index(family.l1max), degree_index(l2max), degree_index(lomax)
        scale = {}
        for c in family.l3s:  # sum_p k_p^2 = || G block ||^2 (the 3j coupling has unit norm)
            norm2 = sum(float(g[deg1 == a][:, deg2 == b][:, :, dego == c].pow(2).sum())
                        for a, b, cc in family.paths if cc == c)
            scale[c] = math.sqrt((2 * c + 1) / norm2)
        cols = torch.cat([torch.arange(c * c, (c + 1) ** 2) for c in family.l3s])
        col_scale = torch.cat([torch.full((2 * c + 1,), scale[c], dtype=torch.float64) for c in family.l3s])
        parts = torch.stack([m2 * (deg2 == b).to(m2.dtype)[:, None] for b in family.l2s])  # [k, n2, G]
        dtype = torch.get_default_dtype()
        self.to_grid: torch.Tensor
        self.filter_grid: torch.Tensor
        self.from_grid: torch.Tensor
        self.register_buffer("to_grid", m1.to(dtype), persistent=False)
        self.register_buffer("filter_grid", parts.to(dtype), persistent=False)
        self.register_buffer("from_grid", (p[:, cols] * col_scale).to(dtype), persistent=False)
        self.n_sh = (l2max + 1) ** 2
        self.out_scale = scale

    def forward(self, x: torch.Tensor, sh: torch.Tensor, radial: torch.Tensor, edge_index: torch.Tensor,
                num_nodes: int) -> torch.Tensor:
        """``x [N, mul, (l1max+1)^2]`` (channels layout, ``to_channels``), ``sh [E, >= (l2max+1)^2]`` (the
        edges' spherical harmonics, e3nn order; extra degrees ignored), ``radial [E, mul, len(l2s)]``,
        ``edge_index`` (src j, dst i) -> ``[N, mul, sum_{l3s} (2 l3 + 1)]``."""
        src, dst = edge_index
        f = x @ self.to_grid  # [N, C, G]
        parts = torch.einsum("en,kng->ekg", sh[:, :self.n_sh], self.filter_grid)  # [E, k, G]
        g = torch.einsum("euk,ekg->eug", radial, parts)
        prod = f[src] * g
        agg = prod.new_zeros(num_nodes, *prod.shape[1:]).index_add(0, dst, prod)
        return agg @ self.from_grid
