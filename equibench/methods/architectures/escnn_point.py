"""``escnn``: escnn steerable networks (point convolutions on graphs, R2Conv CNNs on images).

Reference setting: Cesa, Lang and Weiler, "A Program to Build E(N)-Equivariant Steerable CNNs",
ICLR 2022 (escnn; steerable point convolutions on R^3, Gaussian-shell radial profiles times
spherical harmonics) and Weiler and Cesa, NeurIPS 2019 (E(2)-steerable CNNs on images, the C_N
regular-representation networks used for ``digits``).

graph3d (escnn's ``R3PointConv``). Group G = O(3) (``gspaces.flipRot3dOnR3``, default) or SO(3)
(``gspaces.rot3dOnR3``); with relative positions only, the network is E(3)- (or SE(3)-)
equivariant. One hidden layer is

    h_i <- sigma( mean_{j -> i} K(x_j - x_i) [h_j ; e_ij]  +  W h_i )

with K a G-steerable kernel, K(gx) = rho_out(g) K(x) rho_in(g)^-1 (Gaussian shells in |x| times
spherical harmonics up to ``lmax``; escnn solves the constraint), e_ij the task's typed edge
fields, W an equivariant self-interaction (``escnn.nn.Linear``) and sigma a gated nonlinearity
(SiLU on scalars, sigmoid(gate) * field on l > 0 and pseudo-scalar fields) or escnn's
``NormNonLinearity``. The last layer has no nonlinearity; graph-level outputs are summed over
nodes, ``"point"`` outputs are a 1o displacement plus the first point input.

Basis convention. The suite's fields use e3nn's irreps basis (``"1o"``: D(R) = R in x, y, z);
escnn's irrep (l, parity) lives in its own basis. For each irrep the fixed orthogonal Q with
``rho_escnn(g) = Q D_e3nn(R_g) Q^T`` (R_g = escnn's action of g on R^3) is solved numerically
(null space of the intertwiner equation over a few group elements); inputs are mapped
``x -> Q x`` and outputs ``y -> Q^T y``. (For l = 1, escnn's order is y, z, x.)

Precision. escnn computes its constants (Clebsch-Gordan coefficients, changes of basis) in
numpy float64 but stores them as float32 torch buffers, which caps float64 equivariance near
1e-7 (a float32 build cast to float64: ~6e-8). Under a float64 default dtype, ``build``
constructs every escnn module while escnn's modules see float32 as float64 (~1e-15). Each model
gets its own G-space and kernel-basis modules (escnn caches them process-wide, and an in-place
``.to(dtype)`` of one model would change every model sharing them); the state dict holds
parameters only, so float32 weights load into a float64 build without touching its constants.
escnn's ``GatedNonLinearity1`` allocates its output in float32 inside ``forward``, so the gate is
implemented here (same math).

image2d (``blocks.steerable2d.SteerableCNN``). Group: the task's planar group. escnn ``R2Conv``
layers on the regular representation of C_N (``width`` channels = width // N regular fields), or
for SO(2) on band-limited Fourier fields (irreps 0..L, L = ``IMAGE_MAX_FREQUENCY``) with the
nonlinearity applied on ``IMAGE_N_SAMPLES`` points of the circle; BatchNorm per field (statistics
pooled over the group axis), ReLU, 2x2 average pool (linear, so equivariant for any
representation). Invariant head: group pooling (max over the N group channels for C_N;
frequency-0 value and norms |c_k| for SO(2)), global mean, linear. Exact over every grid symmetry
of the group (C4 and C8's quarter turns). Without ``width`` and ``params`` it is
parameter-matched to the default baseline CNN. Built under float32 with escnn's kernel bases
re-sampled in float64, then cast to the default dtype (``blocks.steerable2d``, ``blocks.image``).
"""
from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator

import numpy as np
import torch
from escnn import gspaces
from escnn import nn as enn
from escnn.group.groups import o3group, so3group
from escnn.kernels.wignereckart_solver import RestrictedWignerEckartBasis, WignerEckartBasis
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import global_add_pool

from ...core.registry import register_method
from ...core.spec import TaskSpec
from ...symmetry.fieldtypes import POINT, field_dim, irreps, representation
from ..base import Method, build_at_params, count_parameters
from ..blocks.cnn import resolve_group
from ..blocks.image import build_image_model, image_size_options
from ..blocks.steerable2d import SteerableCNN, field_size

GROUPS = ("O3", "SO3")
NONLINEARITIES = ("gate", "norm")

Irrep = tuple[int, int]  # (l, parity) in e3nn's convention: parity +1 "e", -1 "o"

IMAGE_MAX_FREQUENCY = 3  # image2d, SO(2) tasks: Fourier fields with irreps 0..3
IMAGE_N_SAMPLES = 16  # image2d, SO(2) tasks: circle points the nonlinearity is applied on


# ---- precision and build-time caching -----------------------------------------------------------
class _TorchAsFloat64:
    """Stand-in for ``torch`` inside escnn's modules while a float64 model is built: every
    ``torch.float`` / ``torch.float32`` escnn asks for becomes float64."""

    float = torch.float64
    float32 = torch.float64

    def __getattr__(self, name: str):
        return getattr(torch, name)


_ORIGINAL_CG = so3group._clebsh_gordan_tensor_so3


@functools.cache
def _clebsch_gordan(m: int, n: int, j: int) -> np.ndarray:
    return _ORIGINAL_CG(m, n, j)


def _cached_cg(m: int, n: int, j: int) -> np.ndarray:
    return _clebsch_gordan(int(m), int(n), int(j)).copy()


@contextlib.contextmanager
def escnn_build_context(dtype: torch.dtype) -> Iterator[None]:
    """While active: SO(3) Clebsch-Gordan tensors are memoised in-process (escnn recomputes them
    for every layer); escnn's process-wide caches of kernel-basis modules are replaced by fresh
    ones, so a model never shares buffers with models built earlier (which may have another dtype,
    and whose in-place ``.to(dtype)`` would otherwise change this one); and for
    ``dtype=float64`` escnn stores its constants in float64."""
    patched: list[tuple[object, str, object]] = []

    def patch(module: object, name: str, value: object) -> None:
        patched.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    try:
        patch(so3group, "_clebsh_gordan_tensor_so3", _cached_cg)
        patch(o3group, "_clebsh_gordan_tensor_so3", _cached_cg)
        patch(WignerEckartBasis, "_cached_instances", {})
        patch(RestrictedWignerEckartBasis, "_cached_instances", {})
        if dtype == torch.float64:
            proxy = _TorchAsFloat64()
            for name, module in list(sys.modules.items()):
                if (name == "escnn" or name.startswith("escnn.")) and getattr(module, "torch", None) is torch:
                    patch(module, "torch", proxy)
        yield
    finally:
        for obj, attr, value in reversed(patched):
            setattr(obj, attr, value)


# ---- types: e3nn irreps <-> escnn representations ----------------------------------------------
def make_gspace(group: str, max_l: int):
    """A fresh G-space (its kernel-basis memory is private to the model being built)."""
    if group == "O3":
        return gspaces.flipRot3dOnR3(maximum_frequency=max_l)
    if group == "SO3":
        return gspaces.rot3dOnR3(maximum_frequency=max_l)
    raise ValueError(f"group must be one of {GROUPS}, got {group!r}")


def escnn_irrep(gspace, group: str, l: int, p: int):
    """escnn's irrep for e3nn's (l, p): O(3) irrep (j, l) with inversion sign (-1)^j = p;
    SO(3) irrep l (parity is invisible without reflections)."""
    G = gspace.fibergroup
    return G.irrep(0 if p == 1 else 1, l) if group == "O3" else G.irrep(l)


def type_irreps(t: str) -> list[Irrep]:
    """The irreps of a field type, one entry per copy, in e3nn's (multiplicity-major) layout;
    ``"point"`` counts as one 1o vector."""
    if t == POINT:
        return [(1, -1)]
    return [(ir.l, ir.p) for mul, ir in irreps(t) for _ in range(mul)]


def _irrep_str(l: int, p: int) -> str:
    return f"{l}{'e' if p == 1 else 'o'}"


@functools.cache
def change_of_basis(group: str, l: int, p: int) -> np.ndarray:
    """Orthogonal Q with ``rho_escnn(g) = Q D_e3nn(R_g) Q^T`` for all g in G, where R_g is escnn's
    action of g on R^3 (``gspace.basespace_action``). Solved as the 1-dimensional null space of
    ``X D_e3nn(R_g) - rho_escnn(g) X = 0`` stacked over 6 fixed random elements."""
    gspace = make_gspace(group, max(l, 1))
    G = gspace.fibergroup
    rho = escnn_irrep(gspace, group, l, p)
    d = 2 * l + 1
    rng = np.random.default_rng(12345)
    rows = []
    for k in range(6):
        q = rng.standard_normal(4)
        q /= np.linalg.norm(q)
        g = G.element((k % 2, q), "Q") if group == "O3" else G.element(q, "Q")
        R = np.asarray(gspace.basespace_action(g), dtype=np.float64)
        D_e = representation(_irrep_str(l, p), torch.tensor(R, dtype=torch.float64)).numpy()
        D_s = np.asarray(rho(g), dtype=np.float64)
        # row-major vec: vec(X D_e) = (I kron D_e^T) vec X ; vec(D_s X) = (D_s kron I) vec X
        rows.append(np.kron(np.eye(d), D_e.T) - np.kron(D_s, np.eye(d)))
    _, s, vt = np.linalg.svd(np.concatenate(rows))
    # the stacked blocks are differences of orthogonal matrices: absolute thresholds
    if s[-1] > 1e-8 or (d > 1 and s[-2] < 1e-4):
        raise RuntimeError(f"no unique intertwiner between e3nn {_irrep_str(l, p)} and escnn {rho}")
    X = vt[-1].reshape(d, d)
    X /= np.sqrt(np.trace(X @ X.T) / d)
    X *= np.sign(X.flat[np.argmax(np.abs(X))])
    return X


def basis_matrix(group: str, blocks: list[Irrep]) -> np.ndarray:
    """Block-diagonal change of basis e3nn -> escnn for a list of irreps."""
    mats = [change_of_basis(group, l, p) for l, p in blocks]
    return _block_diag(mats)


def _block_diag(mats: list[np.ndarray]) -> np.ndarray:
    n = sum(m.shape[0] for m in mats)
    out = np.zeros((n, n))
    i = 0
    for m in mats:
        out[i:i + m.shape[0], i:i + m.shape[0]] = m
        i += m.shape[0]
    return out


# ---- network pieces ----------------------------------------------------------------------------
class EdgePointConv(enn.R3PointConv):
    """``R3PointConv`` whose message also sees typed edge fields e_ij (escnn basis):
    m_ij = K(x_j - x_i) [h_j ; e_ij], mean-aggregated at i (escnn's aggregation)."""

    def __init__(self, node_type, edge_type, out_type, **kwargs) -> None:
        in_type = node_type if edge_type is None else node_type + edge_type
        super().__init__(in_type, out_type, **kwargs)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_delta: torch.Tensor,
                edge_feat: torch.Tensor) -> torch.Tensor:
        """``h: [N, in]`` node features, ``edge_delta: [E, 3]`` = x_j - x_i, ``edge_feat: [E, e]``
        (``e`` may be 0); returns ``[N, out]``."""
        if edge_index.shape[1] == 0:  # escnn's sampler rejects empty edge sets; mean over none = 0
            out = h.new_zeros(h.shape[0], self.out_type.size)
        else:
            out = self.propagate(edge_index, x=h, edge_delta=edge_delta, edge_feat=edge_feat)
        bias = self.expand_bias() if self.training else self.expanded_bias
        return out if bias is None else out + bias

    def message(self, x_j: torch.Tensor, edge_delta: torch.Tensor, edge_feat: torch.Tensor) -> torch.Tensor:
        inp = torch.cat([x_j, edge_feat], dim=-1) if edge_feat.shape[-1] else x_j
        return self.basissampler.compute_messages(self.weights, inp, edge_delta, conv_first=True)


class Gate(nn.Module):
    """Gated nonlinearity on the layout [scalars | gates | gated fields]: SiLU(scalars) and
    sigmoid(gate_k) * field_k (invariant gates keep every field's transformation law)."""

    expand: torch.Tensor  # buffer

    def __init__(self, n_scalars: int, field_sizes: list[int]) -> None:
        super().__init__()
        self.n_scalars, self.n_gates = n_scalars, len(field_sizes)
        self.register_buffer("expand", torch.repeat_interleave(
            torch.arange(len(field_sizes)), torch.tensor(field_sizes, dtype=torch.long)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, g = self.n_scalars, self.n_gates
        gates = torch.sigmoid(x[:, s:s + g])[:, self.expand]
        return torch.cat([nn.functional.silu(x[:, :s]), x[:, s + g:] * gates], dim=-1)


class NormAct(nn.Module):
    """SiLU on the leading scalars, escnn ``NormNonLinearity`` (n_sigmoid of the shifted norm)
    on the remaining fields."""

    def __init__(self, n_scalars: int, field_type) -> None:
        super().__init__()
        self.n_scalars = n_scalars
        self.norm = enn.NormNonLinearity(field_type, function="n_sigmoid")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.n_scalars
        rest = self.norm(enn.GeometricTensor(x[:, s:], self.norm.in_type)).tensor
        return torch.cat([nn.functional.silu(x[:, :s]), rest], dim=-1)


class SelfInteraction(nn.Module):
    """Equivariant per-node linear map (``escnn.nn.Linear`` on the G-space without base space)."""

    def __init__(self, in_type, out_type) -> None:
        super().__init__()
        self.linear = enn.Linear(in_type, out_type, recompute=True, initialize=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(enn.GeometricTensor(x, self.linear.in_type)).tensor


def hidden_irrep_types(group: str, lmax: int) -> list[Irrep]:
    """Hidden irrep types, scalars first: 0e, then every (l, p) up to lmax (both parities for O3)."""
    parities = (1, -1) if group == "O3" else (1,)
    return [(0, 1)] + [(l, p) for l in range(lmax + 1) for p in parities if (l, p) != (0, 1)]


class EscnnPointNet(nn.Module):
    """The steerable point-convolution network on a task's batch (see module docstring)."""

    # buffers
    in_basis: torch.Tensor
    edge_basis: torch.Tensor | None  # None without edge inputs
    out_basis: torch.Tensor

    def __init__(self, spec: TaskSpec, group: str, n_fields: int, depth: int, lmax: int, n_rings: int,
                 kernel_width: float, kernel_sigma: float | None, nonlinearity: str,
                 initialize: bool = True) -> None:
        super().__init__()
        self.spec, self.n_fields = spec, n_fields
        self.point = spec.point_fields[0]
        self.extra_points = spec.point_fields[1:]
        self.node_fields = [k for k, t in spec.inputs.items() if t != POINT]
        dtype = torch.get_default_dtype()

        node_blocks: list[Irrep] = [(0, 1)]  # a constant 1: lets the first layer see pure geometry
        for _ in self.extra_points:
            node_blocks += [(1, -1)]  # other point fields enter as x_k - x (translation invariant)
        for k in self.node_fields:
            node_blocks += type_irreps(spec.inputs[k])
        edge_blocks = [b for t in spec.edge_inputs.values() for b in type_irreps(t)]
        out_blocks = type_irreps(spec.output)
        max_l = max(l for l, _ in node_blocks + edge_blocks + out_blocks + [(lmax, 1)])

        gs = make_gspace(group, max_l)
        gs0 = gspaces.no_base_space(gs.fibergroup)
        rep = functools.partial(escnn_irrep, gs, group)

        def ftype(space, blocks: list[Irrep]):
            return enn.FieldType(space, [rep(l, p) for l, p in blocks])

        self.register_buffer("in_basis", self._tensor(basis_matrix(group, node_blocks).T, dtype))
        self.register_buffer("edge_basis", self._tensor(basis_matrix(group, edge_blocks).T, dtype)
                             if edge_blocks else None)
        self.register_buffer("out_basis", self._tensor(basis_matrix(group, out_blocks), dtype))

        # hidden irreps: n_fields fields spread evenly over 0e (SiLU) and the gated types
        types = hidden_irrep_types(group, lmax)
        counts = [n_fields // len(types) + (i < n_fields % len(types)) for i in range(len(types))]
        hidden: list[Irrep] = [ir for ir, c in zip(types, counts) for _ in range(c)]
        n_scalars = counts[0]
        n_gated = len(hidden) - n_scalars
        if nonlinearity == "gate":
            pre: list[Irrep] = [(0, 1)] * (n_scalars + n_gated) + hidden[n_scalars:]
        else:
            pre = hidden

        rings = np.linspace(0.0, kernel_width, n_rings).tolist()
        spacing = kernel_width / max(n_rings - 1, 1)
        sigma = float(kernel_sigma) if kernel_sigma is not None else 0.6 * spacing
        conv_kwargs = dict(rings=rings, sigma=[sigma] * n_rings, recompute=True, initialize=False,
                           # only isotropic kernels on the shell at r = 0 (harmonics are undefined there)
                           frequencies_cutoff=lambda r, L=lmax: L if r > 1e-9 else 0)
        edge_type = ftype(gs, edge_blocks) if edge_blocks else None

        self.convs, self.selfs, self.acts = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        layer_in = node_blocks
        for _ in range(depth):
            self.convs.append(EdgePointConv(ftype(gs, layer_in), edge_type, ftype(gs, pre), **conv_kwargs))
            self.selfs.append(SelfInteraction(ftype(gs0, layer_in), ftype(gs0, pre)))
            if nonlinearity == "gate":
                self.acts.append(Gate(n_scalars, [2 * l + 1 for l, _ in hidden[n_scalars:]]))
            else:
                self.acts.append(NormAct(n_scalars, ftype(gs0, hidden[n_scalars:])))
            layer_in = hidden
        self.out_conv = EdgePointConv(ftype(gs, layer_in), edge_type, ftype(gs, out_blocks), **conv_kwargs)
        self.out_self = SelfInteraction(ftype(gs0, layer_in), ftype(gs0, out_blocks))
        if initialize:
            self.reset_parameters()
        self._buffers_out_of_state_dict()

    def reset_parameters(self) -> None:
        """escnn's generalised He initialisation of every kernel and self-interaction."""
        for conv in [*self.convs, self.out_conv]:
            enn.init.generalized_he_init(conv.weights.data, conv.basissampler)
        for lin in [*self.selfs, self.out_self]:
            enn.init.generalized_he_init(lin.linear.weights.data, lin.linear.basisexpansion)

    def _buffers_out_of_state_dict(self) -> None:
        """The state dict holds parameters only: escnn's buffers are constants rebuilt (in the
        build dtype) by the constructor, or eval-mode caches. Loading an fp32 model's weights into
        a float64 build must not overwrite its float64 constants with float32-rounded ones."""
        # escnn's kernel bases define structural __eq__/__hash__, so modules() / named_buffers()
        # would skip "equal" ones: visit everything
        for _, module in self.named_modules(remove_duplicate=False):
            for name, buf in list(module.named_buffers(recurse=False, remove_duplicate=False)):
                module.register_buffer(name, buf, persistent=False)

    def train(self, mode: bool = True) -> EscnnPointNet:
        """escnn layers cache their expanded bias / matrix when switched to eval mode; build those
        caches without autograd history so an eval-mode model can be deep-copied (and cast)."""
        with torch.no_grad():
            super().train(mode)
        self._buffers_out_of_state_dict()
        return self

    @staticmethod
    def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(np.ascontiguousarray(a), dtype=dtype)

    def node_input(self, batch: Batch) -> torch.Tensor:
        """[1, x_k - x (other point fields), typed node fields] in escnn's basis."""
        pos = batch[self.point]
        parts = [torch.ones(pos.shape[0], 1, dtype=pos.dtype, device=pos.device)]
        parts += [batch[k] - pos for k in self.extra_points]
        parts += [batch[k].reshape(pos.shape[0], field_dim(self.spec.inputs[k])).to(pos.dtype)
                  for k in self.node_fields]
        return torch.cat(parts, dim=-1) @ self.in_basis

    def forward(self, batch: Batch) -> torch.Tensor:
        pos = batch[self.point]
        edge_index = batch.edge_index
        delta = pos[edge_index[0]] - pos[edge_index[1]]  # x_j - x_i for edge j -> i
        edge = delta.new_zeros(delta.shape[0], 0)
        if self.edge_basis is not None:
            edge = torch.cat([batch[k].reshape(delta.shape[0], field_dim(t)).to(pos.dtype)
                              for k, t in self.spec.edge_inputs.items()], dim=-1) @ self.edge_basis
        h = self.node_input(batch)
        for conv, lin, act in zip(self.convs, self.selfs, self.acts):
            h = act(conv(h, edge_index, delta, edge) + lin(h))
        out = (self.out_conv(h, edge_index, delta, edge) + self.out_self(h)) @ self.out_basis
        if self.spec.level == "graph":
            out = global_add_pool(out, batch.batch, size=int(batch.num_graphs))
        if self.spec.output == POINT:
            out = out + pos
        return out


# ---- the method --------------------------------------------------------------------------------
@register_method("escnn")
class EscnnPoint(Method):
    """Steerable point convolutions (escnn), exactly O(3)- (or SO(3)-) equivariant; on image2d
    tasks a steerable R2Conv CNN over the task's planar group (``blocks.steerable2d``)."""

    domains = ("graph3d", "image2d")
    exact = True
    group = "O3"
    #: image2d: exact over the grid symmetries of the task's group (C4 and C8's quarter turns)
    exact_by_domain = {"graph3d": True, "image2d": True}
    smoke_options = {"width": 4, "depth": 2}

    def __init__(self, *, width: int = 8, depth: int = 3, params: int | None = None, lmax: int = 2,
                 n_rings: int = 4, kernel_width: float = 6.0, kernel_sigma: float | None = None,
                 group: str = "O3", nonlinearity: str = "gate") -> None:
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
        for name, value, least in (("width", width, 1), ("depth", depth, 0), ("lmax", lmax, 1),
                                   ("n_rings", n_rings, 2)):
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        if kernel_width <= 0 or (kernel_sigma is not None and kernel_sigma <= 0):
            raise ValueError("kernel_width and kernel_sigma must be positive")
        super().__init__(width=width, depth=depth, params=params, lmax=lmax, n_rings=n_rings,
                         kernel_width=kernel_width, kernel_sigma=kernel_sigma, group=group,
                         nonlinearity=nonlinearity)
        self.width, self.depth, self.params, self.lmax = width, depth, params, lmax
        self.n_rings, self.kernel_width, self.kernel_sigma = n_rings, float(kernel_width), kernel_sigma
        self.group, self.nonlinearity = group, nonlinearity
        #: the number of hidden fields the parameter search chose, per task spec (the search builds
        #: escnn modules, seconds each: a second build of the same spec reuses its answer)
        self._fields: dict[str, int] = {}

    def supports(self, spec: TaskSpec) -> str | None:
        reason = super().supports(spec)
        if reason is None and spec.domain == "image2d":
            return None
        if reason is None and not spec.point_fields:
            reason = "escnn point convolutions need a 'point' input field (node positions)"
        if reason is None and max(l for l, _ in type_irreps(spec.output)) > 2 * self.lmax:
            reason = f"output {spec.output!r} has l > 2 * lmax = {2 * self.lmax} (no kernel reaches it)"
        return reason

    def _net(self, spec: TaskSpec, n_fields: int, initialize: bool = True) -> EscnnPointNet:
        return EscnnPointNet(spec, self.group, n_fields, self.depth, self.lmax, self.n_rings,
                             self.kernel_width, self.kernel_sigma, self.nonlinearity, initialize)

    def build(self, spec: TaskSpec, seed: int = 0) -> nn.Module:
        reason = self.supports(spec)
        if reason is not None:
            raise ValueError(reason)
        if spec.domain == "image2d":
            return self.build_image(spec)
        dtype = torch.get_default_dtype()
        with escnn_build_context(dtype), torch.random.fork_rng(devices=[]):
            # the size searched is the number of hidden fields (width x number of irrep types, but
            # any integer: finer steps than width). No escnn weight initialisation while searching;
            # parameters grow ~ size^2, so bracket by doubling instead of building size 1024 first
            n_types = len(hidden_irrep_types(self.group, self.lmax))
            key = repr(spec)
            if key in self._fields:  # searched already (the float64 copy of a point): build that size
                model = self._net(spec, self._fields[key], initialize=False)
            else:
                hi = 2 * n_types
                if self.params is not None:
                    while hi < 4096 and count_parameters(self._net(spec, hi, initialize=False)) < self.params:
                        hi *= 2
                model = build_at_params(lambda n: self._net(spec, n, initialize=False), self.params,
                                        self.width * n_types, lo=n_types, hi=hi)
                self._fields[key] = model.n_fields
            torch.manual_seed(seed)
            model.reset_parameters()
        return model.to(dtype)

    def build_image(self, spec: TaskSpec) -> nn.Module:
        """The steerable CNN over the task's planar group, sized in fields (``width // |field|``)
        and parameter-matched to the default baseline CNN unless ``width`` or ``params`` is set."""
        sizes = image_size_options(self)
        g = resolve_group(sizes.pop("group"), spec, discrete=False)
        dim = field_size(g, IMAGE_MAX_FREQUENCY)

        def factory(fields: int, depth: int, fast: bool) -> SteerableCNN:
            return SteerableCNN(spec, fields, depth, g, IMAGE_MAX_FREQUENCY, IMAGE_N_SAMPLES,
                                initialize=not fast, recompute=not fast)
        return build_image_model(factory, spec, **sizes, field_size=dim, max_size=max(4, 512 // dim),
                                 match_baseline=True)
