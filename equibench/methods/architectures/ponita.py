"""``ponita``: PONITA, separable group convolutions on position-orientation space R^3 x S^2.

Bekkers, Vadgama, Hesselink, van der Linden, Romero, "Fast, Expressive SE(n) Equivariant Networks
through Weight-Sharing in Position-Orientation Space" (ICLR 2024); reference ``ebekkers/ponita``
(``PonitaFiberBundle``, ``FiberBundleConv``, ``ConvNext``, ``main_nbody.py``); n-body test MSE
0.0043 (its README).

Representation. Every node i carries a signal on a fixed grid G = {o_1, ..., o_O} of unit vectors
(orientations): features f_i(o_k) in R^C, a tensor ``[N, O, C]``. Kernels depend only on the
invariants of pairs of position-orientation elements. For (x_i, o) receiving from (x_j, o') with
d = x_j - x_i::

    a1 = o . d,     a2 = |d - (o . d) o|,     a3 = o . o'

Layers (``depth``, a ConvNeXt block around a depth-wise separable convolution; C channels)::

    B(a1, a2)  = GELU(W2 GELU(W1 P3(a1, a2)))             spatial basis [basis_dim], shared by all layers
    Bf(a3)     = GELU(V2 GELU(V1 P3(a3)))                 spherical basis [basis_dim], shared
    u_i(o)     = sum_{j in N(i) + i} (K B(a1, a2)) * f_j(o)      (K: basis -> C, per channel)
    v_i(o)     = (1/O) sum_{o' in G} (Kf Bf(o . o')) * u_i(o') + b
    f_i(o)    <- f_i(o) + gamma * Lin2(GELU(Lin1(LayerNorm(v_i(o)))))    (Lin1: C -> 4C)

P3 is the reference's polynomial embedding (x, x (x) x, x (x) x (x) x flattened: 14 features for
(a1, a2), 3 for a3); the self-interaction j = i is the spatial kernel at (a1, a2) = (0, 0) (the
reference's self-loops); channel mixing happens in the ConvNeXt MLP (the convolution is depth-wise,
the reference's ``groups=hidden_dim``). gamma is a per-channel layer scale, initialised to
``layer_scale`` (1e-6). The spatial kernel K and the spherical kernel Kf are rescaled once, on the
first training batch, so that std(u) = std(f) and std(v) = std(u) on that batch (the reference's
"callibrate", here in a gradient-free pass before that batch's forward, layer by layer).

Lifting and read-out. Invariant node inputs are copied to every orientation; a "1o" node input v
becomes the scalar field o . v (n-body: the velocity); the lifted inputs are embedded by a linear map
without bias (a constant 1 where a task has no node input). A linear read-out after every layer,
averaged over layers (``multiple_readouts``), gives scalar fields s(o) and vector coefficients
w(o); invariant outputs are (1/O) sum_o s(o) (graph level: summed over nodes), vector ("1o")
outputs (1/O) sum_o w(o) o, a "point" output the position plus that vector.

Exactness (``exact = False``). If an orthogonal R maps the grid onto itself, R o_k = o_pi(k), then
lifted inputs, all three invariants and the read-outs commute with the permutation pi, so
f(R X) = R f(X) to round-off, reflections included; translations and node permutations are exact
for every grid. For any other element of O(3) the output carries the grid's discretisation error:
lifting and read-out are quadratures on the grid ((1/O) sum_k (o_k . v) o_k = v / 3 only on a
spherical 2-design) and the angular kernels are sampled on it. Grids (``grid``):

* ``"repulsion"`` (default, the reference's kind): a local minimum of the Riesz energy;
* ``"antipodal"``: O / 2 repelled points and their antipodes; -1 permutes it, so the inversion is
  exact and a field even in o (a constant one, say) reads out as exactly 0 (on the others the
  grid's small mean vector sum_k o_k / O, 1e-5 at O = 42, is a fixed direction in the output);
* ``"fibonacci"``: the golden-spiral lattice, no symmetry;
* ``"icosahedron"``: 20 face centres, or 10 f^2 + 2 points (12, 42, 92, 162, ...: the vertices of
  the geodesic subdivision of frequency f), mapped onto itself by all 120 elements of I_h (the 60
  rotations and their products with -1): exact for them (float64: <= 8e-15 relative to the
  predicted n-body displacement, width 32, depth 5, ``tests/test_ponita.py``).

Measured error for random O(3) elements (float64, untrained, seed 0, width 32, depth 5,
basis_dim 64; mean over 8 Haar-random elements with translations and permutations; n-body: the
error relative to the predicted displacement |f(X) - x| on 8 test graphs; normals: relative to
|f(X)| on 2 clouds of 128 points, k = 8)::

    num_ori                         12      16      20      42      92      162
    n-body, layer_scale 1e-6 (default; the untrained network is nearly its linear lift/read-out)
      repulsion                   1.2e-7  1.6e-2  2.2e-3  4.1e-3  7.5e-4  1.4e-3
      antipodal                   1.2e-7  4.8e-2  2.6e-3  2.0e-8  6.8e-4  1.2e-3
      fibonacci                   3.9e-2  5.1e-2  1.3e-2  1.1e-2  3.3e-3  1.1e-3
      icosahedron                 1.4e-7    -     8.5e-8  2.2e-8  1.1e-8  1.1e-8
    n-body, layer_scale 1 (the layers at full strength)
      repulsion                   8.6e-2  7.0e-2  5.0e-2  1.4e-2  6.8e-3  3.3e-3
      antipodal                   8.9e-2  1.1e-1  6.2e-2  1.4e-2  5.6e-3  3.7e-3
      fibonacci                   1.3e-1  9.1e-2  6.7e-2  2.1e-2  8.6e-3  3.1e-3
      icosahedron                 9.8e-2    -     6.7e-2  1.8e-2  7.9e-3  7.2e-3
    normals, layer_scale 1e-6
      repulsion                   4.9e-2  1.1e-1  5.5e-2  1.3     1.2     1.2
      antipodal                   4.7e-2  1.4e-1  3.8e-2  6.2e-3  2.6e-3  2.7e-3
      fibonacci                   1.5     1.3     1.5     1.3     1.4     1.2
      icosahedron                 5.2e-2    -     3.0e-2  6.7e-3  3.6e-3  3.1e-3
    normals, layer_scale 1
      repulsion                   4.0e-3  5.1e-2  2.6e-2  1.2e-2  2.5e-3  4.3e-3
      antipodal                   3.7e-3  1.2e-1  8.9e-3  3.4e-4  1.5e-3  2.4e-3
      fibonacci                   1.5     1.3e-1  1.4     2.7e-1  3.7e-2  1.1e-1
      icosahedron                 3.9e-3    -     1.8e-3  3.4e-4  2.3e-4  2.0e-4

(repulsion and antipodal at 12, and antipodal at 42, relax to the icosahedral configurations.) With
layers at full strength the error falls roughly as 1/O from 12 to 92 orientations and levels off
beyond. After training (n-body, ``params=20000``, 200 steps, batch 100, lr 1e-2, ``augment``) the
error relative to the displacement is 2e-2 to 7e-2 (rel. to |f(X)| ~1e-2) for every grid tried:
repulsion 16: 3.3e-2, antipodal 16: 6.9e-2, icosahedron 12: 3.5e-2, icosahedron 42: 1.8e-2,
repulsion 42: 2.1e-2 (float32 the same to two digits).

Defaults = the reference's n-body run (``main_nbody.py``): ``num_ori=16``, ``width=128``
(``hidden_dim``), ``basis_dim=256``, ``degree=3``, ``depth=5`` (``layers``), ``widening=4``,
``layer_scale=1e-6``, multiple read-outs, complete graph with self-loops, the charge as the node
scalar, the velocity as o . v; training with a random rotation per graph and step (``augment``).
Its optimiser (Adam, lr 1e-3, cosine schedule with warm-up, gradient clipping 0.5) belongs to the
suite. ``params`` scales ``width`` with ``basis_dim`` in proportion.

Differences, on purpose: the grid is computed deterministically (Riesz-energy repulsion started
from a Fibonacci lattice; the reference repels a random start with noise); edges are the task's
(n-body: the complete graph, as the reference) and invariant edge inputs (n-body: q_i q_j) are not
used, as in the reference, whose n-body model sees the charges only as node scalars; no radius
window (the reference's n-body run has none); the training-time rotation (``augment``) is drawn
from the task's group (O(3) and translations on n-body; the reference: SO(3)).

Forces (``forces``, as ``egnn``'s): ``"direct"`` reads md forces off the vector read-out;
``"conservative"`` builds an energy network and predicts F = -dE/dx (the reference's MD17 model).

Tasks: one point input; invariant and "1o" node inputs; outputs mixing "0e" and "1o" at node or
graph level, or a node-level "point". Not supported: pseudo-scalars/pseudo-vectors and l >= 2
(input or output; the grid signals are O(3)-scalar fields), non-invariant edge inputs.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, ClassVar

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import global_add_pool

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import POINT, field_dim, irreps, is_invariant
from ...symmetry.group3d import act_on_batch, sample_element
from ..base import Method, build_at_params
from ..blocks.backbone import is_vector_type, point_cloud_reason
from ..blocks.energy_forces import ForcesOption

GRIDS = ("repulsion", "antipodal", "fibonacci", "icosahedron")
GOLDEN = (1.0 + math.sqrt(5.0)) / 2.0

# ---- orientation grids ------------------------------------------------------------------------
def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def fibonacci_grid(n: int) -> torch.Tensor:
    """``n`` points of the Fibonacci (golden-spiral) lattice on S^2: z_k = 1 - (2k + 1)/n,
    azimuth k * pi (3 - sqrt 5), float64 ``[n, 3]``."""
    k = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * k / n
    r = (1.0 - z * z).clamp_min(0.0).sqrt()
    phi = (k - 0.5) * math.pi * (3.0 - math.sqrt(5.0))
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1)


def riesz_energy(x: torch.Tensor) -> torch.Tensor:
    """sum_{i < j} 1 / |x_i - x_j| (the Coulomb energy of unit charges)."""
    i, j = torch.triu_indices(len(x), len(x), 1)
    return (1.0 / (x[i] - x[j]).norm(dim=-1)).sum()


def repulsion_grid(n: int, steps: int = 1000, antipodal: bool = False) -> torch.Tensor:
    """``n`` near-uniform points on S^2: the Fibonacci lattice relaxed to a local minimum of the
    Riesz energy by projected gradient descent (deterministic). Step: 0.2 s^3 times the tangential
    force, s = sqrt(4 pi / n) the typical spacing (stable: the nearest-neighbour curvature is
    ~12 / s^3), no point moving more than s / 10 in one step. With ``antipodal`` (n even) the grid
    is n / 2 points and their antipodes, relaxed together (centrally symmetric: -1 permutes it).
    float64 ``[n, 3]``."""
    if antipodal and n % 2:
        raise ValueError(f"an antipodal grid needs an even num_ori, got {n}")
    x = fibonacci_grid(n)[: n // 2] if antipodal else fibonacci_grid(n)
    if n < 3:
        return torch.cat([x, -x]) if antipodal else x
    spacing = math.sqrt(4.0 * math.pi / n)
    m = len(x)
    for _ in range(steps):
        points = torch.cat([x, -x]) if antipodal else x
        d = x[:, None, :] - points[None, :, :]
        r = d.norm(dim=-1)
        r[torch.arange(m), torch.arange(m)] = 1.0
        inv3 = r.pow(-3)
        inv3[torch.arange(m), torch.arange(m)] = 0.0
        force = (d * inv3[..., None]).sum(1)
        force = force - (force * x).sum(-1, keepdim=True) * x  # tangential part
        step = min(0.2 * spacing**3, 0.1 * spacing / max(force.norm(dim=-1).max().item(), 1e-300))
        x = _normalize(x + step * force)
    return torch.cat([x, -x]) if antipodal else x


def icosahedron() -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """The 12 unit vertices (cyclic permutations of (0, +-1, +-phi), normalised) and the 20 faces
    (index triples of mutually adjacent vertices)."""
    base = [(0.0, s1, s2 * GOLDEN) for s1 in (-1.0, 1.0) for s2 in (-1.0, 1.0)]
    v = torch.tensor([p[k:] + p[:k] for k in range(3) for p in base], dtype=torch.float64)
    edge = 2.0  # edge length before normalisation
    adjacent = (torch.cdist(v, v) - edge).abs() < 1e-9
    faces = [(a, b, c) for a, b, c in itertools.combinations(range(12), 3)
             if adjacent[a, b] and adjacent[b, c] and adjacent[a, c]]
    return _normalize(v), faces


def icosahedral_grid(n: int) -> torch.Tensor:
    """A grid invariant under the icosahedral group I_h: the 20 face centres (``n = 20``), or the
    vertices of the geodesic subdivision of frequency f (``n = 10 f^2 + 2``: 12, 42, 92, 162, ...):
    the points (a A + b B + c C) / f, a + b + c = f, of every face (A, B, C), projected to S^2."""
    v, faces = icosahedron()
    if n == 20:
        return _normalize(torch.stack([v[list(f)].sum(0) for f in faces]))
    f = round(math.sqrt(max(n - 2, 0) / 10))
    if f < 1 or 10 * f * f + 2 != n:
        raise ValueError(f"grid='icosahedron' takes num_ori = 20 or 10 f^2 + 2 (12, 42, 92, 162, ...), got {n}")
    points = []
    for a, b, c in faces:
        for i in range(f + 1):
            for j in range(f + 1 - i):
                points.append((i * v[a] + j * v[b] + (f - i - j) * v[c]) / f)
    pts = _normalize(torch.stack(points))
    keep: list[int] = []
    for k in range(len(pts)):  # points on shared edges and vertices appear more than once
        if not keep or (pts[keep] - pts[k]).norm(dim=-1).min() > 1e-9:
            keep.append(k)
    return pts[keep]


def icosahedral_rotations() -> torch.Tensor:
    """The 60 rotations of the icosahedral group I (float64 ``[60, 3, 3]``): the closure of the
    rotation by 2 pi / 5 about a vertex and by 2 pi / 3 about a face centre."""
    v, faces = icosahedron()

    def rot(axis: torch.Tensor, angle: float) -> torch.Tensor:
        k = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]],
                         dtype=torch.float64)
        return torch.eye(3, dtype=torch.float64) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k

    gens = [rot(v[0], 2 * math.pi / 5), rot(_normalize(v[list(faces[0])].sum(0)), 2 * math.pi / 3)]
    found = [torch.eye(3, dtype=torch.float64)]
    frontier = list(found)
    while frontier:
        new = []
        for g in frontier:
            for h in gens:
                m = h @ g
                if min((m - e).abs().max().item() for e in found) > 1e-9:
                    found.append(m)
                    new.append(m)
        frontier = new
    return torch.stack(found)


def orientation_grid(kind: str, n: int) -> torch.Tensor:
    """The float64 grid ``[n, 3]`` of unit vectors named by ``kind`` (``GRIDS``); a fresh copy of
    a cached one (the repulsion takes ~0.1 s and ``params`` matching builds several models)."""
    return _orientation_grid(kind, n).clone()


@functools.lru_cache(maxsize=32)
def _orientation_grid(kind: str, n: int) -> torch.Tensor:
    if kind in ("repulsion", "antipodal"):
        return repulsion_grid(n, antipodal=kind == "antipodal")
    if kind == "fibonacci":
        return fibonacci_grid(n)
    if kind == "icosahedron":
        return icosahedral_grid(n)
    raise ValueError(f"grid must be one of {GRIDS}, got {kind!r}")


# ---- layers -------------------------------------------------------------------------------------
def polynomial_features(x: torch.Tensor, degree: int) -> torch.Tensor:
    """The reference's ``PolynomialFeatures``: [x, x (x) x, ..., x^(x) degree] flattened
    (d + d^2 + ... + d^degree features for d inputs)."""
    terms = [x]
    for _ in range(degree - 1):
        terms.append((terms[-1][..., :, None] * x[..., None, :]).flatten(-2))
    return torch.cat(terms, dim=-1)


def n_poly(d: int, degree: int) -> int:
    return sum(d**k for k in range(1, degree + 1))


class InvariantBasis(nn.Module):
    """``GELU(W2 GELU(W1 P(a)))``: the kernel basis shared by all layers (module docstring)."""

    def __init__(self, n_inv: int, degree: int, hidden: int, basis_dim: int) -> None:
        super().__init__()
        self.degree = degree
        self.lin1 = nn.Linear(n_poly(n_inv, degree), hidden)
        self.lin2 = nn.Linear(hidden, basis_dim)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.lin1(polynomial_features(a, self.degree)))
        return nn.functional.gelu(self.lin2(h))


class SeparableConv(nn.Module):
    """Depth-wise separable convolution on R^3 x S^2: spatial kernel (per orientation and channel)
    over the neighbours and the node itself, then the spherical kernel over the grid, plus a bias."""

    calibrated: torch.Tensor

    def __init__(self, channels: int, basis_dim: int) -> None:
        super().__init__()
        self.kernel = nn.Linear(basis_dim, channels, bias=False)
        self.fiber_kernel = nn.Linear(basis_dim, channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("calibrated", torch.tensor(False))

    def spatial(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, basis: torch.Tensor,
                self_basis: torch.Tensor) -> torch.Tensor:
        """u_i(o) = sum_j K B(a1, a2)_{ij}(o) * f_j(o) + K B(0, 0) * f_i(o); ``x [N, O, C]``."""
        msg = self.kernel(basis) * x[src]
        return (self.kernel(self_basis) * x).index_add(0, dst, msg)

    def spherical(self, u: torch.Tensor, fiber_basis: torch.Tensor) -> torch.Tensor:
        """v_i(p) = (1/O) sum_o Kf Bf(o . p) * u_i(o) (no bias)."""
        kf = self.fiber_kernel(fiber_basis)  # [O, O, C]
        return torch.einsum("noc,opc->npc", u, kf) / kf.shape[0]

    def forward(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, basis: torch.Tensor,
                self_basis: torch.Tensor, fiber_basis: torch.Tensor) -> torch.Tensor:
        return self.spherical(self.spatial(x, src, dst, basis, self_basis), fiber_basis) + self.bias

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, basis: torch.Tensor,
                  self_basis: torch.Tensor, fiber_basis: torch.Tensor) -> None:
        """Rescale K by std(f) / std(u) and Kf by std(u) / std(v) (the reference's calibration)."""
        u = self.spatial(x, src, dst, basis, self_basis)
        v = self.spherical(u, fiber_basis)
        self.kernel.weight.mul_(x.std() / u.std().clamp_min(1e-30))
        self.fiber_kernel.weight.mul_(u.std() / v.std().clamp_min(1e-30))
        self.calibrated.fill_(True)


class ConvNeXtBlock(nn.Module):
    """f <- f + gamma * Lin2(GELU(Lin1(LayerNorm(conv(f)))))."""

    def __init__(self, channels: int, basis_dim: int, widening: int, layer_scale: float | None) -> None:
        super().__init__()
        self.conv = SeparableConv(channels, basis_dim)
        self.norm = nn.LayerNorm(channels)
        self.lin1 = nn.Linear(channels, widening * channels)
        self.lin2 = nn.Linear(widening * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), float(layer_scale))) if layer_scale is not None else None

    def forward(self, x: torch.Tensor, *geometry: torch.Tensor) -> torch.Tensor:
        h = self.lin2(nn.functional.gelu(self.lin1(self.norm(self.conv(x, *geometry)))))
        return x + (h if self.gamma is None else self.gamma * h)


# ---- the network ----------------------------------------------------------------------------------
def _output_parts(t: str) -> list[tuple[int, str]] | None:
    """[(multiplicity, "0e" | "1o")] in the output's e3nn order; None when another irrep occurs."""
    parts = []
    for mul, ir in irreps(t):
        if (ir.l, ir.p) == (0, 1):
            parts.append((mul, "0e"))
        elif (ir.l, ir.p) == (1, -1):
            parts.append((mul, "1o"))
        else:
            return None
    return parts


class PonitaModel(nn.Module):
    """PONITA on a batch: ``model(batch) -> prediction`` (module docstring)."""

    grid: torch.Tensor

    def __init__(self, spec: TaskSpec, grid: torch.Tensor, width: int = 128, depth: int = 5,
                 basis_dim: int = 256, degree: int = 3, widening: int = 4, layer_scale: float | None = 1e-6,
                 multiple_readouts: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.point = spec.point_fields[0]
        self.register_buffer("grid", grid.to(torch.get_default_dtype()), persistent=False)
        self.scalar_fields = [k for k, t in spec.inputs.items() if is_invariant(t)]
        self.vector_fields = [k for k, t in spec.inputs.items() if is_vector_type(t)]
        n_in = sum(field_dim(spec.inputs[k]) for k in self.scalar_fields)
        n_in += sum(field_dim(spec.inputs[k]) // 3 for k in self.vector_fields)
        self.constant_input = n_in == 0
        self.basis = InvariantBasis(2, degree, width, basis_dim)
        self.fiber_basis = InvariantBasis(1, degree, width, basis_dim)
        self.embed = nn.Linear(max(n_in, 1), width, bias=False)
        self.layers = nn.ModuleList(ConvNeXtBlock(width, basis_dim, widening, layer_scale) for _ in range(depth))
        if spec.output == POINT:
            self.parts = [(1, "1o")]
        else:
            parts = _output_parts(spec.output)
            assert parts is not None
            self.parts = parts
        n_out = sum(m for m, _ in self.parts)
        # one slot per layer, None where that layer has no readout (add_module takes None; the
        # ModuleList constructor's annotation does not)
        self.readouts = nn.ModuleList()
        for i in range(depth):
            self.readouts.add_module(str(i), nn.Linear(width, n_out) if multiple_readouts or i == depth - 1 else None)

    def lift(self, batch: Batch) -> torch.Tensor:
        """Input signals ``[N, O, n_in]``: invariant inputs copied to every o, o . v per "1o" vector v."""
        n, g = batch[self.point].shape[0], self.grid
        feats = [batch[k].reshape(n, 1, -1).expand(n, len(g), -1) for k in self.scalar_fields]
        feats += [torch.einsum("nvd,od->nov", batch[k].reshape(n, -1, 3), g) for k in self.vector_fields]
        if self.constant_input:
            feats = [g.new_ones(n, len(g), 1)]
        return torch.cat(feats, dim=-1)

    def geometry(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """(src, dst, B(a1, a2) [E, O, basis], B(0, 0) [basis], Bf(o . o') [O, O, basis]); self-loops
        of the task's graph are dropped (every node's own term is the separate self-interaction)."""
        pos, g = batch[self.point], self.grid
        src, dst = batch.edge_index
        keep = src != dst
        src, dst = src[keep], dst[keep]
        d = pos[src] - pos[dst]  # x_j - x_i for the edge j -> i
        a1 = d @ g.T  # [E, O]
        a2 = (d[:, None, :] - a1[..., None] * g).norm(dim=-1)
        basis = self.basis(torch.stack([a1, a2], dim=-1))
        self_basis = self.basis(pos.new_zeros(1, 1, 2))[0]
        fiber = self.fiber_basis((g @ g.T)[..., None])
        return src, dst, basis, self_basis, fiber

    def blocks(self) -> list[ConvNeXtBlock]:
        """``self.layers``, each checked to be a ``ConvNeXtBlock``."""
        blocks: list[ConvNeXtBlock] = []
        for b in self.layers:
            assert isinstance(b, ConvNeXtBlock)
            blocks.append(b)
        return blocks

    def calibrate(self, x: torch.Tensor, geometry: tuple[torch.Tensor, ...]) -> None:
        """The first training batch: each layer's kernels rescaled in turn (``SeparableConv.calibrate``)."""
        with torch.no_grad():
            for layer in self.blocks():
                layer.conv.calibrate(x, *geometry)
                x = layer(x, *geometry)

    def forward(self, batch: Batch) -> torch.Tensor:
        geometry = self.geometry(batch)
        x = self.embed(self.lift(batch))
        if self.training and not all(bool(layer.conv.calibrated) for layer in self.blocks()):
            self.calibrate(x, geometry)
        readouts = []
        for layer, readout in zip(self.layers, self.readouts):
            x = layer(x, *geometry)
            if readout is not None:
                readouts.append(readout(x))
        return self.read_out(torch.stack(readouts).mean(0), batch)

    def read_out(self, r: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Scalars: the mean over the grid; vectors: (1/O) sum_o w(o) o; graph level: sums over nodes."""
        out, k = [], 0
        for mul, kind in self.parts:
            field = r[..., k:k + mul]
            k += mul
            if kind == "0e":
                out.append(field.mean(1))
            else:
                out.append(torch.einsum("nom,od->nmd", field, self.grid).flatten(1) / len(self.grid))
        y = torch.cat(out, dim=-1)
        if self.spec.output == POINT:
            return batch[self.point] + y
        if self.spec.level == "graph":
            y = global_add_pool(y, batch.batch, size=int(batch.num_graphs))
        return y


INEXACT_NOTE = ("exactly equivariant only to the orthogonal maps that permute its orientation grid (grid="
                "'icosahedron': all 120 elements of I_h, float64 round-off), to translations and to node "
                "permutations; for other rotations the error is the grid's discretisation error (float64, "
                "untrained, layers at full strength: ~1e-1 relative to the predicted n-body displacement at "
                "12 orientations, ~1e-2 at 42, ~5e-3 at 92-162; after 200 training steps 2e-2 to 7e-2; table "
                "in equibench/methods/architectures/ponita.py)")


@register_method("ponita")
class Ponita(ForcesOption, Method):
    """PONITA (Bekkers et al. 2024): separable convolutions on positions x a grid of orientations."""

    domains = ("graph3d",)
    exact = False
    group = "O3"
    smoke_options: ClassVar[dict[str, Any]] = {"width": 8, "depth": 2, "basis_dim": 8, "num_ori": 8}

    def __init__(self, *, width: int = 128, depth: int = 5, num_ori: int = 16, grid: str = "repulsion",
                 basis_dim: int = 256, degree: int = 3, widening: int = 4, layer_scale: float | None = 1e-6,
                 multiple_readouts: bool = True, augment: bool = True, params: int | None = None,
                 forces: str = "direct") -> None:
        if min(width, depth, basis_dim, degree, widening) < 1:
            raise ValueError("width, depth, basis_dim, degree and widening must be positive")
        if num_ori < 2:
            raise ValueError(f"num_ori must be at least 2, got {num_ori}")
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
        if grid == "icosahedron":
            icosahedral_grid(num_ori)  # raises for a count the construction does not give
        if grid == "antipodal" and num_ori % 2:
            raise ValueError(f"grid='antipodal' needs an even num_ori, got {num_ori}")
        super().__init__(width=width, depth=depth, num_ori=num_ori, grid=grid, basis_dim=basis_dim, degree=degree,
                         widening=widening, layer_scale=layer_scale, multiple_readouts=multiple_readouts,
                         augment=augment, params=params)
        self.width, self.depth, self.num_ori, self.grid_kind = width, depth, num_ori, grid
        self.basis_dim, self.degree, self.widening, self.layer_scale = basis_dim, degree, widening, layer_scale
        self.multiple_readouts, self.augment, self.params = multiple_readouts, augment, params
        self.set_forces(forces)

    def supports(self, spec: TaskSpec) -> str | None:
        reason = super().supports(spec)
        if reason:
            return reason
        spec = self.network_spec(spec)
        reason = point_cloud_reason("ponita", spec)
        if reason:
            return reason
        if spec.output == POINT:
            return None if spec.level == "node" else "ponita predicts points at node level only"
        if _output_parts(spec.output) is None:
            return (f"ponita predicts '0e' scalars and '1o' vectors (means over the grid of scalar fields, "
                    f"times o for vectors), not {spec.output!r}")
        return None

    def inexact_reason(self, spec: TaskSpec) -> str | None:
        return f"ponita (grid={self.grid_kind!r}, num_ori={self.num_ori}) is {INEXACT_NOTE}"

    def make(self, spec: TaskSpec, width: int) -> PonitaModel:
        basis = max(1, round(self.basis_dim * width / self.width))
        return PonitaModel(spec, orientation_grid(self.grid_kind, self.num_ori), width, self.depth, basis,
                           self.degree, self.widening, self.layer_scale, self.multiple_readouts)

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        reason = self.supports(spec)
        if reason:
            raise ValueError(reason)
        net_spec = self.network_spec(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_at_params(lambda w: self.make(net_spec, w), self.params, self.width)
        return self.with_forces(net, spec)

    def train_transform(self, batch: Batch, spec: TaskSpec, generator: torch.Generator) -> Batch:
        """With ``augment``: one random element of the task's group per graph (the reference rotates
        every training batch)."""
        if not self.augment or not spec.point_fields:
            return batch
        g = sample_element(batch, spec.group, generator, permute=False)
        return act_on_batch(batch, spec, g.to(batch[spec.point_fields[0]].dtype))
