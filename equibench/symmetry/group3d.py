"""Sampling group elements of E(3) and acting with them on batches and predictions.

An element g = (R, t, P) holds one rotation/reflection ``R_b`` in O(3) (or SO(3), or the
subgroups fixing the z axis: O(2)_z = C_inf_v and SO(2)_z) and one
translation ``t_b`` per graph b, plus a node permutation P that reorders nodes *within* each
graph. It acts on every typed field of a batch (DESIGN.md's type vocabulary), on typed edge
fields, on the target and on a model's prediction, the same way for every method and metric.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from e3nn import o3
from torch_geometric.data import Batch

from ..core.errors import UserError
from ..core.spec import TaskSpec
from .fieldtypes import POINT, irreps, is_invariant, representation
from .precision import default_dtype

# groups acting on 3-D graphs: name -> (reflections included, translations included, axial)
# "axial" groups keep the z axis fixed (the symmetry of a system in a constant field along e_z):
# "O2z" = rotations about z and reflections through planes containing z (C_inf_v), with all 3-D
# translations (a uniform field is translation invariant); "SO2z" = rotations about z only.
GROUPS_3D_AXIAL = {
    "E3": (True, True, False), "O3": (True, False, False), "SE3": (False, True, False),
    "SO3": (False, False, False), "O2z": (True, True, True), "SO2z": (False, True, True),
}
GROUPS_3D = {name: flags[:2] for name, flags in GROUPS_3D_AXIAL.items()}


def group_flags(group: str) -> tuple[bool, bool]:
    """(reflections, translations) for a 3-D group name."""
    return group_flags_axial(group)[:2]


def group_flags_axial(group: str) -> tuple[bool, bool, bool]:
    """(reflections, translations, axial) for a 3-D group name (axial: fixes the z axis)."""
    if group not in GROUPS_3D_AXIAL:
        raise UserError(f"unknown 3-D group {group!r} (known: {', '.join(GROUPS_3D_AXIAL)})")
    return GROUPS_3D_AXIAL[group]


def common_group(task_group: str, method_group: str | None) -> str:
    """The largest group both the task's target and the method respect (for measurement).

    Reflections only if both have them; translations as the task has them (methods that handle
    point inputs always handle translations: they centre or use differences); axial (only the
    rotations about z) if either is: an O(3)-exact method on an "O2z" task is measured on "O2z",
    an SO(3)-exact one on "SO2z"."""
    if method_group is None:
        return task_group
    refl_t, trans_t, axial_t = group_flags_axial(task_group)
    refl_m, _, axial_m = group_flags_axial(method_group)
    flags = (refl_t and refl_m, trans_t, axial_t or axial_m)
    for name, f in GROUPS_3D_AXIAL.items():
        if f == flags:
            return name
    raise UserError(f"no 3-D group is common to {task_group!r} and {method_group!r} "
                    f"(known: {', '.join(GROUPS_3D_AXIAL)})")


def lie_generators(group: str) -> tuple[int, ...]:
    """Indices of the so(3) generators (x, y, z) inside the group's Lie algebra: all three for
    O(3)/SO(3)/E(3)/SE(3), only the z rotation for the axial groups."""
    return (2,) if group_flags_axial(group)[2] else (0, 1, 2)


@dataclass
class GroupElement:
    R: torch.Tensor  # [B, 3, 3] in O(3)
    t: torch.Tensor  # [B, 3]
    perm: torch.Tensor | None = None  # [N]: new node k is old node perm[k]

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> GroupElement:
        perm = None if self.perm is None else self.perm.to(device or self.perm.device)
        return GroupElement(self.R.to(device=device, dtype=dtype), self.t.to(device=device, dtype=dtype), perm)

    def rep(self, t: str, dtype: torch.dtype) -> torch.Tensor:
        """``rho_t(R_b)`` for every graph b: ``[B, d, d]``."""
        return representation(t, self.R.to(dtype))


def stack_elements(elements: list[GroupElement], n_nodes: int) -> GroupElement:
    """K elements sampled for one batch of B graphs and N nodes as one element of the batch of K
    copies of it (``repeat_batch``): copy k's graphs get element k's R and t, and its nodes element
    k's permutation offset by k N, so one forward measures all K samples."""
    perms = [g.perm for g in elements if g.perm is not None]
    if perms and len(perms) != len(elements):
        raise ValueError("stack_elements: either every element permutes nodes or none does")
    perm = torch.cat([p + k * n_nodes for k, p in enumerate(perms)]) if perms else None
    return GroupElement(torch.cat([g.R for g in elements]), torch.cat([g.t for g in elements]), perm)


def repeat_batch(batch: Batch, k: int) -> Batch:
    """The batch of ``k`` copies of ``batch`` (graphs in the order copy 0's, copy 1's, ...)."""
    return batch if k == 1 else Batch.from_data_list(batch.to_data_list() * k)


def so3_generator_rep(t: str, k: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """d rho_t(A_k): the k-th so(3) generator (e3nn basis; x, y, z for l = 1) acting on type ``t``."""
    with default_dtype(dtype):
        blocks = [_so3_generator(ir.l, k) for mul, ir in irreps(t) for _ in range(mul)]
        return torch.block_diag(*blocks).to(dtype)


def _so3_generator(l: int, k: int) -> torch.Tensor:
    """e3nn's ``so3_generators(l)[k]``; e3nn < 0.5 (mace-torch's 0.4.4) has none: there it is
    d/ds D_l(exp(s A_k) R0) at s = 0 times D_l(R0)^T (autograd; R0 a fixed generic rotation, away
    from the Euler-angle singularity at the identity), equal to e3nn 0.6's to ~5e-15 for l <= 4."""
    if hasattr(o3, "so3_generators"):
        return o3.so3_generators(l)[k]
    A = torch.zeros(3, 3)
    i, j = [(1, 2), (2, 0), (0, 1)][k]
    A[j, i], A[i, j] = 1.0, -1.0  # the rotation generator about axis k
    R0 = torch.linalg.matrix_exp(torch.tensor([[0.0, -0.4, 0.9], [0.4, 0.0, -1.3], [-0.9, 1.3, 0.0]]))
    ir = o3.Irrep(l, 1)
    dD = torch.autograd.functional.jacobian(lambda s: ir.D_from_matrix(torch.linalg.matrix_exp(s * A) @ R0),
                                            torch.zeros(()))
    return dD @ ir.D_from_matrix(R0).T


@dataclass
class OneParameterElement(GroupElement):
    """exp(s A_k) for all graphs, with ``rho_t = matrix_exp(s d rho_t(A_k))`` computed exactly
    (no Euler angles, so it is accurate near the identity; used for the Lie derivative)."""

    k: int = 0
    s: float = 0.0

    def rep(self, t: str, dtype: torch.dtype) -> torch.Tensor:
        D = torch.matrix_exp(self.s * so3_generator_rep(t, self.k, dtype))
        return D.to(self.R.device).expand(self.R.shape[0], -1, -1)


def sample_rotations(n: int, reflections: bool, generator: torch.Generator,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` Haar-random rotations (QR of a Gaussian matrix); with ``reflections`` half get det -1."""
    A = torch.randn(n, 3, 3, generator=generator, dtype=torch.float64)
    Q, Rr = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(Rr, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar measure
    det = torch.linalg.det(Q)
    Q = Q * det.sign()[:, None, None]  # now in SO(3) (det of -Q is -det Q in 3-D)
    if reflections:
        flip = torch.rand(n, generator=generator) < 0.5
        Q = torch.where(flip[:, None, None], -Q, Q)
    return Q.to(dtype)


def sample_axial(n: int, reflections: bool, generator: torch.Generator,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` uniform elements of SO(2) about the z axis, ``R_z(a)`` with a ~ U[0, 2 pi); with
    ``reflections`` half are composed with the mirror y -> -y, giving uniform O(2) about z (every
    reflection through a plane containing z is R_z(a) diag(1, -1, 1) for some a)."""
    a = torch.rand(n, generator=generator, dtype=torch.float64) * (2 * torch.pi)
    c, s = torch.cos(a), torch.sin(a)
    R = torch.zeros(n, 3, 3, dtype=torch.float64)
    R[:, 0, 0], R[:, 0, 1], R[:, 1, 0], R[:, 1, 1], R[:, 2, 2] = c, -s, s, c, 1.0
    if reflections:
        flip = torch.rand(n, generator=generator) < 0.5
        R[:, :, 1] = torch.where(flip[:, None], -R[:, :, 1], R[:, :, 1])
    return R.to(dtype)


def _within_graph_permutation(batch_vec: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    keys = torch.rand(batch_vec.numel(), generator=generator, dtype=torch.float64)
    # sort by (graph, random key): stays sorted by graph, random order inside each graph
    order = torch.argsort(batch_vec.double().cpu() * 2.0 + keys)
    return order.to(batch_vec.device)


def sample_element(batch: Batch, group: str, generator: torch.Generator,
                   permute: bool = True, translation_scale: float = 1.0) -> GroupElement:
    """One random element per graph of ``batch`` for the 3-D group named ``group``."""
    reflections, translations, axial = group_flags_axial(group)
    B = int(batch.num_graphs)
    R = (sample_axial if axial else sample_rotations)(B, reflections, generator)
    t = torch.randn(B, 3, generator=generator, dtype=torch.float64) * translation_scale
    if not translations:
        t = torch.zeros_like(t)
    perm = _within_graph_permutation(batch.batch, generator) if permute else None
    return GroupElement(R, t, perm)


def _act(value: torch.Tensor, t: str, g: GroupElement, rows: torch.Tensor) -> torch.Tensor:
    if is_invariant(t):
        return value
    D = g.rep(t, value.dtype).to(value.device)[rows]
    out = torch.einsum("nij,nj->ni", D, value)
    if t == POINT:
        out = out + g.t.to(value.dtype)[rows]
    return out


def act_on_output(out: torch.Tensor, spec: TaskSpec, g: GroupElement, batch: Batch) -> torch.Tensor:
    """rho_out(g) applied to a prediction or target of type ``spec.output`` (node or graph level)."""
    if spec.level == "graph":
        return _act(out, spec.output, g, torch.arange(out.shape[0], device=out.device))
    res = _act(out, spec.output, g, batch.batch)
    return res if g.perm is None else res[g.perm]


def act_on_batch(batch: Batch, spec: TaskSpec, g: GroupElement, target: bool = True) -> Batch:
    """g applied to every typed node/edge field (and the target ``y`` if ``target``).

    Returns a new batch; the input batch is not modified. Node permutation relabels nodes and
    ``edge_index`` consistently.
    """
    new = batch.clone()
    rows = batch.batch
    for name, t in spec.inputs.items():
        new[name] = _act(batch[name], t, g, rows)
    if spec.edge_inputs:
        erows = batch.batch[batch.edge_index[0]]
        for name, t in spec.edge_inputs.items():
            new[name] = _act(batch[name], t, g, erows)
    if target and "y" in batch:
        new.y = act_on_output(batch.y, spec, g, batch)  # already in permuted node order
    if g.perm is not None:
        perm = g.perm
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        for key in list(new.keys()):
            if key in ("y", "edge_index") or not torch.is_tensor(new[key]):
                continue
            if batch.is_node_attr(key):
                new[key] = new[key][perm]
        new.edge_index = inv[batch.edge_index]
    return new
