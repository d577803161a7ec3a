"""Exactly symmetric inputs: idealised geometries whose own symmetry group is known.

A frame or canonicalisation method builds its frame from the input; when the input has a
symmetry of its own (a stabiliser H = {g in O(3): g.X = X up to a permutation of identical
nodes} larger than the identity) the frame is undefined, and such a method is exact only on
inputs *without* a symmetry of their own. Real molecules and particle systems often are
symmetric, so every task offers a standard set of them (``Task.symmetric_inputs()``), built here
as ``Geometry`` objects and turned into the task's own fields by the task
(``Task.symmetric_data``). Each geometry is given in its canonical (symmetry-adapted)
orientation, with every symmetry element fixing the origin, and carries generators of its
stabiliser (3 x 3 orthogonal matrices) so that tests can check the symmetry: for every
generator R there is a permutation P with R x_i = x_P(i), R v_i = v_P(i) and equal labels.

Molecules (Å; idealised bond lengths and angles from the NIST CCCBDB experimental geometries,
rounded): benzene (D6h; C-C 1.397, C-H 1.087), methane (Td; C-H 1.087), CO2 (D_inf_h;
C=O 1.160), acetylene (D_inf_h; C#C 1.203, C-H 1.062), water (C2v; O-H 0.9572, H-O-H
104.52 deg), ethylene (D2h; C=C 1.339, C-H 1.087, H-C-H 117.4 deg).

Particle systems (n-body): a regular n-gon of equal charges at rest (D_nh) and spinning in its
plane (C_nh), n collinear equal charges at rest (D_inf_h), a regular (n-1)-gon with an opposite
charge at its centre (D_(n-1)h); rings lie in the xy-plane and the line is the z axis, so the
symmetry axis is e_z (the field axis of ``nbody_field``).

Point clouds (normals): a symmetric sample of the sphere (the 62 vertices of an icosahedron,
a dodecahedron and an icosidodecahedron, I_h), a grid on the faces of a cube (O_h) and rings on
a cylinder (D_16h). ``knn_graph_closed`` builds their k-nearest-neighbour graph with ties closed
(every node at the k-th distance is kept): a symmetric cloud has many equal distances, and
cutting a tie arbitrarily would make the graph itself break the symmetry.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

TIE_RTOL = 1e-9  # distances equal to this relative tolerance are one shell (knn_graph_closed)


@dataclass(frozen=True)
class Geometry:
    """One exactly symmetric input in its canonical orientation.

    ``pos [n, 3]`` float64 (Å for molecules); ``labels``: one per node, what a symmetry must
    preserve (element symbol, charge); ``vel [n, 3]`` or None; ``point_group``: Schoenflies
    symbol of the stabiliser in O(3); ``generators``: orthogonal matrices generating it (a
    continuous group is represented by a generic element of it).
    """
    name: str
    point_group: str
    pos: np.ndarray
    labels: tuple = ()
    vel: np.ndarray | None = None
    generators: tuple[np.ndarray, ...] = field(default=(), repr=False)
    description: str = ""

    @property
    def n(self) -> int:
        return len(self.pos)


# ---- elementary symmetry elements ---------------------------------------------------------------
def rot_z(angle: float) -> np.ndarray:
    """Rotation by ``angle`` about e_z."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rot_axis(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation by ``angle`` about ``axis`` (Rodrigues)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    K = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def diag(a: float, b: float, c: float) -> np.ndarray:
    return np.diag([float(a), float(b), float(c)])


CYCLE_XYZ = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # x -> y -> z -> x: C3 about (1,1,1)
SWAP_XY = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])    # mirror in the plane x = y
LINEAR_GENERATORS = (rot_z(0.7), diag(-1, 1, 1), diag(1, 1, -1))  # D_inf_h about e_z (0.7 rad: generic)
DNH = lambda n: (rot_z(2 * math.pi / n), diag(1, -1, 1), diag(1, 1, -1))  # noqa: E731  D_nh, a vertex on +x


def _polygon(n: int, radius: float, z: float = 0.0, phase: float = 0.0) -> np.ndarray:
    ang = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(ang), radius * np.sin(ang), np.full(n, z)], axis=1)


# ---- molecules ------------------------------------------------------------------------------------
def _benzene() -> Geometry:
    cc, ch = 1.397, 1.087
    pos = np.concatenate([_polygon(6, cc), _polygon(6, cc + ch)])
    return Geometry("benzene", "D6h", pos, ("C",) * 6 + ("H",) * 6, generators=DNH(6),
                    description="C6H6, planar hexagon")


def _methane() -> Geometry:
    d = 1.087 / math.sqrt(3)
    pos = np.array([[0, 0, 0], [d, d, d], [d, -d, -d], [-d, d, -d], [-d, -d, d]], dtype=np.float64)
    s4 = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # S4 about z
    return Geometry("methane", "Td", pos, ("C", "H", "H", "H", "H"), generators=(CYCLE_XYZ, s4, SWAP_XY),
                    description="CH4, tetrahedral")


def _co2() -> Geometry:
    pos = np.array([[0, 0, -1.160], [0, 0, 0], [0, 0, 1.160]], dtype=np.float64)
    return Geometry("co2", "D_inf_h", pos, ("O", "C", "O"), generators=LINEAR_GENERATORS,
                    description="CO2, linear")


def _acetylene() -> Geometry:
    c = 1.203 / 2
    h = c + 1.062
    pos = np.array([[0, 0, -h], [0, 0, -c], [0, 0, c], [0, 0, h]], dtype=np.float64)
    return Geometry("acetylene", "D_inf_h", pos, ("H", "C", "C", "H"), generators=LINEAR_GENERATORS,
                    description="C2H2, linear")


def _water() -> Geometry:
    half = math.radians(104.52) / 2
    x, z = 0.9572 * math.sin(half), 0.9572 * math.cos(half)
    pos = np.array([[0, 0, 0], [x, 0, -z], [-x, 0, -z]], dtype=np.float64)
    return Geometry("water", "C2v", pos, ("O", "H", "H"), generators=(diag(-1, -1, 1), diag(1, -1, 1)),
                    description="H2O, bent (C2 axis e_z, molecular plane xz)")


def _ethylene() -> Geometry:
    c = 1.339 / 2
    a = math.radians(180 - 117.4 / 2)  # angle between C=C (towards the other C) and C-H
    hx, hy = c + 1.087 * math.cos(math.pi - a), 1.087 * math.sin(math.pi - a)
    pos = np.array([[c, 0, 0], [-c, 0, 0], [hx, hy, 0], [hx, -hy, 0], [-hx, hy, 0], [-hx, -hy, 0]],
                   dtype=np.float64)
    return Geometry("ethylene", "D2h", pos, ("C", "C", "H", "H", "H", "H"),
                    generators=(diag(-1, 1, 1), diag(1, -1, 1), diag(1, 1, -1)),
                    description="C2H4, planar (C=C along e_x)")


@functools.cache
def molecules() -> tuple[Geometry, ...]:
    """The standard symmetric molecules: benzene, methane, CO2, acetylene, water, ethylene."""
    return (_benzene(), _methane(), _co2(), _acetylene(), _water(), _ethylene())


# ---- particle systems -----------------------------------------------------------------------------
POLYGON_NAMES = {3: "triangle", 4: "square", 5: "pentagon", 6: "hexagon", 7: "heptagon", 8: "octagon"}


def polygon_name(n: int) -> str:
    return POLYGON_NAMES.get(n, f"{n}gon")


def particle_systems(n: int, speed: float = 0.5) -> tuple[Geometry, ...]:
    """Symmetric n-body states of ``n`` particles (labels: charges): a regular n-gon of unit
    radius and charges +1 at rest and spinning in its plane (speed ``speed``, counter-clockwise
    about e_z), n collinear charges +1 at rest on the z axis spaced 2 / (n - 1), and (n >= 4) a
    regular (n-1)-gon of charges +1 around a charge -1 at its centre."""
    if n < 2:
        raise ValueError("need at least 2 particles")
    out = []
    if n >= 3:
        ring = _polygon(n, 1.0)
        name = polygon_name(n)
        zero = np.zeros_like(ring)
        spin = speed * np.stack([-ring[:, 1], ring[:, 0], np.zeros(n)], axis=1)
        out.append(Geometry(f"{name}_at_rest", f"D{n}h", ring, (1.0,) * n, zero, DNH(n),
                            f"regular {name} of equal charges at rest"))
        out.append(Geometry(f"{name}_spinning", f"C{n}h", ring, (1.0,) * n, spin,
                            (rot_z(2 * math.pi / n), diag(1, 1, -1)),
                            f"regular {name} of equal charges spinning in its plane"))
    line = np.zeros((n, 3))
    line[:, 2] = np.linspace(-1.0, 1.0, n)
    out.append(Geometry("collinear", "D_inf_h", line, (1.0,) * n, np.zeros((n, 3)), LINEAR_GENERATORS,
                        f"{n} equally spaced equal charges on a line, at rest"))
    if n >= 4:
        m = n - 1
        pos = np.concatenate([_polygon(m, 1.0), np.zeros((1, 3))])
        out.append(Geometry(f"{polygon_name(m)}_and_centre", f"D{m}h", pos, (1.0,) * m + (-1.0,), np.zeros((n, 3)),
                            DNH(m), f"regular {polygon_name(m)} of charges +1 around a charge -1, at rest"))
    return tuple(out)


# ---- point clouds ---------------------------------------------------------------------------------
PHI = (1 + math.sqrt(5)) / 2


def _unit(p: np.ndarray) -> np.ndarray:
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def _even_perms(p: np.ndarray) -> np.ndarray:
    return np.concatenate([p, p[:, [1, 2, 0]], p[:, [2, 0, 1]]])


def _signs(v: tuple[float, float, float]) -> np.ndarray:
    """Every sign combination of the nonzero entries of ``v`` (duplicates removed)."""
    pts = {tuple(s * x for s, x in zip(signs, v)) for signs in itertools.product((1, -1), repeat=3)}
    return np.array(sorted(pts), dtype=np.float64)


def icosahedral_sphere() -> np.ndarray:
    """62 points on the unit sphere: the 12 vertices of an icosahedron in the standard orientation
    (cyclic permutations of (0, +-1, +-phi); the coordinate axes are C2 axes), the centres of its
    20 faces (a dodecahedron) and the midpoints of its 30 edges (an icosidodecahedron)."""
    ico = _even_perms(_signs((0.0, 1.0, PHI)))
    d = np.linalg.norm(ico[:, None] - ico[None], axis=-1)
    adjacent = np.isclose(d, 2.0)  # edge length 2 for these coordinates
    edges = [(i, j) for i, j in itertools.combinations(range(12), 2) if adjacent[i, j]]
    faces = [(i, j, k) for i, j, k in itertools.combinations(range(12), 3)
             if adjacent[i, j] and adjacent[j, k] and adjacent[i, k]]
    assert len(edges) == 30 and len(faces) == 20
    mids = np.array([ico[i] + ico[j] for i, j in edges])
    centres = np.array([ico[i] + ico[j] + ico[k] for i, j, k in faces])
    return np.concatenate([_unit(ico), _unit(centres), _unit(mids)])


def cube_faces(m: int = 4) -> np.ndarray:
    """An ``m x m`` grid on each face of the cube [-1, 1]^3 (cell centres): 6 m^2 points."""
    g = (np.arange(m) + 0.5) / m * 2 - 1
    u, v = (a.reshape(-1) for a in np.meshgrid(g, g, indexing="ij"))
    faces = []
    for axis in range(3):
        for sign in (1.0, -1.0):
            p = np.zeros((m * m, 3))
            p[:, axis] = sign
            p[:, (axis + 1) % 3], p[:, (axis + 2) % 3] = u, v
            faces.append(p)
    return np.concatenate(faces)


def cylinder_rings(per_ring: int = 16, rings: int = 6, height: float = 2.0) -> np.ndarray:
    """``rings`` rings of ``per_ring`` points on the unit cylinder about e_z, at heights spread
    evenly over ``height`` and symmetric about z = 0."""
    zs = (np.arange(rings) + 0.5) / rings * height - height / 2
    return np.concatenate([_polygon(per_ring, 1.0, z) for z in zs])


ICOSAHEDRAL_GENERATORS = (CYCLE_XYZ, diag(-1, -1, 1), rot_axis(np.array([0.0, 1.0, PHI]), 2 * math.pi / 5),
                          -np.eye(3))
OCTAHEDRAL_GENERATORS = (CYCLE_XYZ, SWAP_XY, diag(-1, 1, 1))


def _normalised(p: np.ndarray) -> np.ndarray:
    """Centred on the centroid and scaled to unit RMS radius (as the normals task does)."""
    p = p - p.mean(axis=0)
    return p / math.sqrt((p**2).sum(axis=1).mean())


@functools.cache
def point_clouds() -> tuple[Geometry, ...]:
    """The standard symmetric clouds (normalised like the normals task's clouds)."""
    return (Geometry("icosahedral_sphere", "Ih", _normalised(icosahedral_sphere()), generators=ICOSAHEDRAL_GENERATORS,
                     description="62 points on a sphere: icosahedron + dodecahedron + icosidodecahedron vertices"),
            Geometry("cube_grid", "Oh", _normalised(cube_faces(4)), generators=OCTAHEDRAL_GENERATORS,
                     description="a 4 x 4 grid on every face of a cube (96 points)"),
            Geometry("cylinder_rings", "D16h", _normalised(cylinder_rings()), generators=DNH(16),
                     description="6 rings of 16 points on a cylinder (96 points)"))


# ---- graphs ---------------------------------------------------------------------------------------
def knn_graph_closed(pos: np.ndarray | torch.Tensor, k: int) -> torch.Tensor:
    """Edges j -> i from each node i's ``k`` nearest other nodes *and every node tied with the
    k-th* (distance within ``TIE_RTOL``), sorted by target, then distance, then source: the
    k-nearest-neighbour graph of the task, made invariant under the cloud's own symmetry."""
    p = np.asarray(pos.detach().cpu().numpy() if torch.is_tensor(pos) else pos, dtype=np.float64)
    n = len(p)
    d = np.linalg.norm(p[:, None, :] - p[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    kk = min(k, n - 1)
    src, dst = [], []
    for i in range(n):
        order = np.lexsort((np.arange(n), d[i]))
        kth = d[i, order[kk - 1]]
        keep = order[d[i, order] <= kth * (1 + TIE_RTOL)]
        src.append(keep)
        dst.append(np.full(len(keep), i))
    return torch.from_numpy(np.stack([np.concatenate(src), np.concatenate(dst)]).astype(np.int64))


def complete_graph(n: int) -> torch.Tensor:
    """Every ordered pair j -> i, i != j (row-major by source, as the n-body task builds it)."""
    src, dst = np.where(~np.eye(n, dtype=bool))
    return torch.as_tensor(np.stack([src, dst]), dtype=torch.long)


def check_symmetric(geometry: Geometry, tol: float = 1e-12) -> None:
    """Raise ``AssertionError`` unless every generator maps the geometry onto itself up to a
    label-preserving permutation (positions and velocities to ``tol``)."""
    for R in geometry.generators:
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-14), f"{geometry.name}: a generator is not orthogonal"
        moved = geometry.pos @ R.T
        d = np.linalg.norm(moved[:, None, :] - geometry.pos[None, :, :], axis=-1)
        perm = d.argmin(axis=1)
        assert (d[np.arange(geometry.n), perm] <= tol).all(), f"{geometry.name}: positions not mapped onto themselves"
        assert len(set(perm.tolist())) == geometry.n, f"{geometry.name}: not a permutation"
        if geometry.labels:
            assert all(geometry.labels[i] == geometry.labels[j] for i, j in enumerate(perm)), geometry.name
        if geometry.vel is not None:
            assert np.abs(geometry.vel @ R.T - geometry.vel[perm]).max() <= tol, f"{geometry.name}: velocities"
