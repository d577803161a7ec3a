"""``normals``: unoriented normal-vector regression on point clouds sampled from real meshes.

Meshes (the "catalogue", fixed order): the procedural meshes ``random_urdfs/*/*.obj`` shipped in
PyPI ``pybullet``'s ``pybullet_data`` (1 000 files; ``168.obj`` is empty, and any mesh that
fails to load or has no area is skipped), ``bunny.obj``, ``duck.obj``, the teddy bear
``teddy2_VHACD_CHs.obj`` (a convex decomposition), and six ``trimesh.creation`` primitives
(box, icosphere, capsule, cylinder, cone, torus). A fixed permutation (``PROTOCOL_SEED``)
splits the catalogue *by mesh* 70/10/20 into train/val/test pools.

A cloud: ``n_points`` points drawn area-uniformly with ``trimesh.sample.sample_surface``; the
label of a point is the unit normal of the face it lies on, ``y = mesh.face_normals[face]``
(perpendicular to the face's edges; its sign is arbitrary, hence an *unoriented* target).
Each cloud is centred on its centroid and scaled to unit RMS radius (centre and radius are kept
in the cache, see ``NormalsTask.raw``); optional Gaussian noise of std ``noise`` (in units of
the RMS radius) is then added to the positions, not to the labels. Graph: the ``k`` nearest
neighbours j of every point i within its cloud, edges j -> i.

Sample ``i`` of a split uses mesh ``order[i % M]`` of that split's pool of ``M`` meshes
(``order`` a permutation seeded by ``(PROTOCOL_SEED, seed, split)``), with its own sampling seed
``(PROTOCOL_SEED, seed, split, i)``: a split larger than its pool reuses meshes with fresh
samples. A smaller split is a prefix of a larger one.

Symmetry: for R in O(3), rotating the surface by R maps points x -> R x and normals n -> R n,
so the target is O(3)-equivariant with output type "1o". ``rotation = "TRAIN/TEST"`` with each
of ``none``, ``SO3``, ``O3`` is the frame-averaging protocol (none/none, none/SO3, O3/O3 — and
SO3/SO3): every cloud of a rotated split gets its own Haar-random element R (seeded by
``(PROTOCOL_SEED, seed, split, i)``; ``O3`` adds the reflection -R with probability 1/2),
applied to positions and normals together. The validation split follows the *training*
setting (it is held-out training distribution, used for model selection).

Loss ``1 - <n_hat, n>^2`` with ``n_hat = pred / |pred|`` (``|pred| = 0`` gives loss 1); metrics
the per-cloud means of ``1 - cos^2`` and of the unoriented angle ``arccos |<n_hat, n>|`` in
degrees.

Cache (``cache_dir()/normals/<hash>/``, hash of n_points, the catalogue, split fractions and the
pybullet/trimesh/numpy versions): files of ``CHUNK`` clouds per (split, seed, chunk) holding the
normalised clouds, normals, face and mesh indices, centres and radii; the kNN lists are cached
beside them per (k, noise). Noise and rotations are applied at load time from their seeds.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
from collections.abc import Callable
from importlib.metadata import version
from typing import Any, cast

import numpy as np
import pybullet_data
import torch
import trimesh
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter
from tqdm.auto import tqdm

from ..core.errors import UserError
from ..core.registry import register_task
from ..core.spec import TaskSpec
from ..metrics.catalogue import task_metric
from .base import SPLITS, Task, atomic_save, cache_dir
from .graphs import knn_indices
from .symmetric import Geometry, knn_graph_closed, point_clouds

PROTOCOL_SEED = 20220127
CHUNK = 16
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1}  # test gets the rest
NAMED_MESHES = ("bunny.obj", "duck.obj", "teddy2_VHACD_CHs.obj")
PRIMITIVES = {
    "box": lambda: trimesh.creation.box(extents=(1.0, 0.6, 0.3)),
    "icosphere": lambda: trimesh.creation.icosphere(subdivisions=3),
    "capsule": lambda: trimesh.creation.capsule(height=1.0, radius=0.3),
    "cylinder": lambda: trimesh.creation.cylinder(radius=0.4, height=1.2, sections=32),
    "cone": lambda: trimesh.creation.cone(radius=0.5, height=1.0, sections=32),
    "torus": lambda: trimesh.creation.torus(major_radius=1.0, minor_radius=0.3),
}
ROTATION_KINDS = ("none", "SO3", "O3")


def _versions() -> dict[str, str]:
    return {"pybullet": version("pybullet"), "trimesh": version("trimesh"), "numpy": np.__version__}


def candidate_meshes() -> list[str]:
    """Names of all candidate meshes (before skipping broken ones), in catalogue order."""
    root = pybullet_data.getDataPath()
    urdfs = sorted(os.path.relpath(f, root) for f in glob.glob(os.path.join(root, "random_urdfs", "*", "*.obj")))
    return urdfs + list(NAMED_MESHES) + [f"primitive:{p}" for p in PRIMITIVES]


@functools.lru_cache(maxsize=128)
def load_mesh(name: str) -> trimesh.Trimesh:
    """A catalogue mesh by name (``random_urdfs/000/000.obj``, ``bunny.obj``, ``primitive:box``)."""
    if name.startswith("primitive:"):
        return PRIMITIVES[name.split(":", 1)[1]]()
    # force="mesh" makes trimesh.load (typed as returning any Geometry) return a Trimesh
    return cast(trimesh.Trimesh, trimesh.load(os.path.join(pybullet_data.getDataPath(), name), force="mesh"))


def _usable(name: str) -> bool:
    try:
        m = load_mesh(name)
    except Exception:  # noqa: BLE001 - any unreadable file is skipped, as documented
        return False
    return isinstance(m, trimesh.Trimesh) and len(m.faces) > 0 and float(m.area) > 0


def mesh_catalogue() -> list[str]:
    """The usable meshes (cached as JSON per pybullet/trimesh version; the first call loads all)."""
    names = candidate_meshes()
    key = hashlib.sha256(json.dumps([_versions(), names]).encode()).hexdigest()[:10]
    path = cache_dir() / "normals" / f"catalogue-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    good = [n for n in tqdm(names, desc="normals: checking meshes", leave=False) if _usable(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(good))
    os.replace(tmp, path)
    return good


def pca_normals(batch: Batch) -> torch.Tensor:
    """Unit normals by local PCA: per node i, the eigenvector of the smallest eigenvalue of the
    covariance of ``x_i`` and its in-neighbours (``edge_index`` j -> i), float64, returned in the
    batch's dtype (sign arbitrary)."""
    pos = batch.pos.double()
    n = pos.shape[0]
    src, dst = batch.edge_index
    src = torch.cat([src, torch.arange(n, device=pos.device)])
    dst = torch.cat([dst, torch.arange(n, device=pos.device)])
    mean = scatter(pos[src], dst, dim=0, dim_size=n, reduce="mean")
    d = pos[src] - mean[dst]
    cov = scatter(d[:, :, None] * d[:, None, :], dst, dim=0, dim_size=n, reduce="mean")
    return torch.linalg.eigh(cov)[1][:, :, 0].to(batch.pos.dtype)


def mesh_split(catalogue: list[str]) -> dict[str, np.ndarray]:
    """Catalogue indices of each split's mesh pool (fixed permutation, 70/10/20 by mesh)."""
    perm = np.random.default_rng(PROTOCOL_SEED).permutation(len(catalogue))
    n_train = int(round(SPLIT_FRACTIONS["train"] * len(catalogue)))
    n_val = int(round(SPLIT_FRACTIONS["val"] * len(catalogue)))
    return {"train": np.sort(perm[:n_train]), "val": np.sort(perm[n_train:n_train + n_val]),
            "test": np.sort(perm[n_train + n_val:])}


def sample_cloud(mesh: trimesh.Trimesh, n_points: int, seed: int) -> dict[str, np.ndarray]:
    """``n_points`` area-uniform surface points, their faces and unit face normals, normalised.

    Returns ``pos`` (centred, unit RMS radius), ``normal``, ``face``, ``centre``, ``scale`` with
    ``pos = (raw - centre) / scale``.
    """
    raw, face = trimesh.sample.sample_surface(mesh, n_points, seed=seed)
    normal = np.asarray(mesh.face_normals, dtype=np.float64)[face]
    centre = raw.mean(axis=0)
    scale = float(np.sqrt(((raw - centre) ** 2).sum(axis=1).mean()))
    return {"pos": (raw - centre) / scale, "normal": normal, "face": face.astype(np.int32),
            "centre": centre, "scale": np.float64(scale)}


def haar_element(rng: np.random.Generator, kind: str) -> np.ndarray:
    """A Haar-random element of SO(3) (``kind="SO3"``) or O(3) (``"O3"``); identity for ``"none"``."""
    if kind == "none":
        return np.eye(3)
    Q, R = np.linalg.qr(rng.standard_normal((3, 3)))
    Q = Q * np.sign(np.diag(R))[None, :]
    if np.linalg.det(Q) < 0:
        Q = -Q
    if kind == "O3" and rng.random() < 0.5:
        Q = -Q
    return Q


@register_task("normals")
class NormalsTask(Task):
    """Unoriented surface normals of point clouds sampled from real meshes.

    Fields: ``pos [n_points, 3]`` ``"point"`` (centred, unit RMS radius); ``edge_index`` the ``k``
    nearest neighbours; target ``y [n_points, 3]`` ``"1o"`` (unit normal, sign arbitrary),
    metrics ``1-cos2`` and ``angle_deg``. Symmetry: O(3); ``rotation="TRAIN/TEST"`` rotates splits.
    """

    smoke_options = {"n_points": 64, "k": 8, "train_size": 32, "val_size": 8, "test_size": 16}

    def __init__(self, *, n_points: int = 512, k: int = 16, noise: float = 0.0,
                 rotation: str = "none/none", train_size: int = 512, val_size: int = 64,
                 test_size: int = 128) -> None:
        if n_points < 2:
            raise UserError("normals: n_points must be at least 2")
        if k < 1:
            raise UserError("normals: k must be positive")
        if noise < 0:
            raise UserError("normals: noise must be non-negative")
        parts = rotation.split("/")
        if len(parts) != 2 or any(p not in ROTATION_KINDS for p in parts):
            raise UserError(f"normals: rotation must be 'TRAIN/TEST' with each of {', '.join(ROTATION_KINDS)}"
                            f" (e.g. 'none/SO3'), got {rotation!r}")
        for name, v in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if v < 1:
                raise UserError(f"normals: {name} must be positive")
        super().__init__(n_points=n_points, k=k, noise=float(noise), rotation=rotation, train_size=train_size,
                         val_size=val_size, test_size=test_size)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.rotation_of = {"train": parts[0], "val": parts[0], "test": parts[1]}

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(name="normals", domain="graph3d", group="O3", inputs={"pos": "point"},
                        output="1o", level="node", loss="1-cos2", metrics=("1-cos2", "angle_deg"))

    # ---------------------------------------------------------------- data
    @functools.cached_property
    def _pools(self) -> tuple[list[str], dict[str, np.ndarray]]:
        catalogue = mesh_catalogue()
        return catalogue, mesh_split(catalogue)

    @functools.cached_property
    def _cache_key(self) -> str:
        catalogue, _ = self._pools
        params = {"n_points": self.options["n_points"], "catalogue": catalogue, "protocol": PROTOCOL_SEED,
                  "fractions": SPLIT_FRACTIONS, **_versions()}
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]

    def _chunk_path(self, split: str, seed: int, c: int):
        return cache_dir() / "normals" / self._cache_key / f"{split}-seed{seed}-chunk{c}.pt"

    def _build_chunk(self, split: str, seed: int, c: int, bar: tqdm) -> dict[str, np.ndarray]:
        catalogue, pools = self._pools
        pool = pools[split]
        s = SPLITS.index(split)
        order = pool[np.random.default_rng([PROTOCOL_SEED, seed, s]).permutation(len(pool))]
        clouds, meshes = [], []
        for i in range(c * CHUNK, (c + 1) * CHUNK):
            m = int(order[i % len(order)])
            sample_seed = int(np.random.default_rng([PROTOCOL_SEED, seed, s, i, 0]).integers(2**31))
            clouds.append(sample_cloud(load_mesh(catalogue[m]), self.options["n_points"], sample_seed))
            meshes.append(m)
            bar.update(1)
        arrays = {k: np.stack([cl[k] for cl in clouds]) for k in clouds[0]}
        arrays["mesh"] = np.asarray(meshes, dtype=np.int32)
        return arrays

    def _size(self, split: str, size: int | None) -> int:
        self.check_split(split)
        size = self.sizes[split] if size is None else size
        if size < 1:
            raise UserError(f"normals: size must be positive, got {size}")
        return size

    def _chunks(self, split: str, size: int, seed: int) -> list[dict[str, np.ndarray]]:
        """The cached chunks covering the first ``size`` clouds (built, with a progress bar, if absent)."""
        n_chunks = -(-size // CHUNK)
        chunks: dict[int, dict[str, np.ndarray]] = {}
        missing = []
        for c in range(n_chunks):
            path = self._chunk_path(split, seed, c)
            if path.exists():
                chunks[c] = torch.load(path, weights_only=False)
            else:
                missing.append(c)
        if missing:
            with tqdm(total=len(missing) * CHUNK, desc=f"normals: sampling {split} clouds", leave=False) as bar:
                for c in missing:
                    chunks[c] = self._build_chunk(split, seed, c, bar)
                    atomic_save(chunks[c], self._chunk_path(split, seed, c))
        return [chunks[c] for c in range(n_chunks)]

    def raw(self, split: str, size: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """The cached, un-noised, un-rotated clouds of a split: ``pos [S, n, 3]`` (normalised),
        ``normal [S, n, 3]``, ``face [S, n]`` (face index in the mesh), ``mesh [S]`` (index into
        ``mesh_catalogue()``), ``centre [S, 3]`` and ``scale [S]`` (the RMS radius)."""
        size = self._size(split, size)
        chunks = self._chunks(split, size, seed)
        return {k: np.concatenate([ch[k] for ch in chunks])[:size] for k in chunks[0]}

    def rotations(self, split: str, size: int | None = None, seed: int = 0) -> np.ndarray:
        """The element R ``[S, 3, 3]`` applied to each cloud of ``split`` (identity if not rotated)."""
        size = self._size(split, size)
        kind, s = self.rotation_of[split], SPLITS.index(split)
        return np.stack([haar_element(np.random.default_rng([PROTOCOL_SEED, seed, s, i, 1]), kind)
                         for i in range(size)])

    def _noisy(self, pos: np.ndarray, split: str, seed: int, i: int) -> np.ndarray:
        noise = self.options["noise"]
        if noise == 0:
            return pos
        rng = np.random.default_rng([PROTOCOL_SEED, seed, SPLITS.index(split), i, 2])
        return pos + noise * rng.standard_normal(pos.shape)

    def _neighbours(self, split: str, seed: int, c: int, chunk: dict[str, np.ndarray]) -> np.ndarray:
        """kNN lists ``[CHUNK, n, k]`` of a chunk's (noisy, unrotated) clouds, cached beside it."""
        k, noise = self.options["k"], self.options["noise"]
        path = self._chunk_path(split, seed, c).with_name(f"{split}-seed{seed}-chunk{c}-knn{k}-noise{noise!r}.pt")
        if path.exists():
            return torch.load(path, weights_only=False)
        nbr = np.stack([knn_indices(self._noisy(p, split, seed, c * CHUNK + j), k)
                        for j, p in enumerate(chunk["pos"])])
        nbr = nbr.astype(np.int16 if nbr.max(initial=0) < 2**15 else np.int64)
        atomic_save(nbr, path)
        return nbr

    def load(self, split: str, size: int | None = None, seed: int = 0) -> list[Data]:
        size = self._size(split, size)
        chunks = self._chunks(split, size, seed)
        Rs = self.rotations(split, size, seed)
        dt = torch.get_default_dtype()
        out = []
        for c, chunk in enumerate(chunks):
            # graph on the unrotated cloud: the same graph in every rotation setting
            nbr = self._neighbours(split, seed, c, chunk)
            for j in range(min(CHUNK, size - c * CHUNK)):
                i = c * CHUNK + j
                pos = self._noisy(chunk["pos"][j], split, seed, i)
                src = torch.from_numpy(nbr[j].astype(np.int64))
                dst = torch.arange(src.shape[0]).repeat_interleave(src.shape[1])
                R = Rs[i]
                out.append(Data(pos=torch.as_tensor(pos @ R.T, dtype=dt),
                                y=torch.as_tensor(chunk["normal"][j] @ R.T, dtype=dt),
                                edge_index=torch.stack([src.reshape(-1), dst])))
        return out

    # ---------------------------------------------------------------- exactly symmetric inputs
    def symmetric_geometries(self) -> list[Geometry]:
        """Symmetric clouds (``datasets.symmetric.point_clouds``): a symmetric sample of the sphere
        (I_h), a grid on a cube's faces (O_h), rings on a cylinder (D_16h), centred and scaled to
        unit RMS radius like the task's clouds."""
        return list(point_clouds())

    def symmetric_data(self, geometry: Geometry) -> Data:
        """The cloud with the task's ``k``-nearest-neighbour graph, ties at the k-th distance
        closed (``knn_graph_closed``: a symmetric cloud has many equal distances, and an arbitrary
        cut would make the graph break the symmetry). No noise, no rotation."""
        return Data(pos=torch.as_tensor(geometry.pos, dtype=torch.get_default_dtype()),
                    edge_index=knn_graph_closed(geometry.pos, self.options["k"]))

    # ---------------------------------------------------------------- floors
    FLOORS = {"pca": "classical PCA normal estimation: the direction of least variance of each point's k nearest "
                     "neighbours and itself (unsigned, like the metric)"}
    SEED_DRAWS = "the training and validation clouds sampled (meshes from the fixed training pool, points, noise)"

    def floors(self, train: list[Data]) -> dict[str, Callable[[Batch], torch.Tensor]]:
        """``pca``: per point i, the eigenvector of the smallest eigenvalue of the covariance of
        ``{x_i} ∪ {x_j : j -> i}`` (its kNN graph), computed in float64; nothing is fitted (the
        training split is not used), so it is the same for every seed."""
        return {"pca": pca_normals}

    # ---------------------------------------------------------------- loss and metrics
    METRICS = (task_metric("1-cos2", direction="lower", description="1 − cos² between predicted and true normals"),
               task_metric("angle_deg", direction="lower", unit="deg",
                           description="mean unoriented angle between predicted and true normals"))

    @staticmethod
    def _cos(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n_hat = pred / pred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (n_hat * y).sum(-1)

    def loss(self, pred: torch.Tensor, batch: Batch) -> torch.Tensor:
        return torch.mean(1.0 - self._cos(pred, batch.y) ** 2)

    def trivial_prediction(self, train: list[Data]) -> Callable[[Batch], torch.Tensor]:
        """One fixed axis for every point: the top eigenvector of the training normals' second
        moment E[n n^T], the constant that minimises the mean 1 - cos^2 (a zero vector, the
        equivariant constant, has no direction to score)."""
        n = torch.cat([d.y for d in train]).double()
        axis = torch.linalg.eigh(n.T @ n)[1][:, -1]
        return lambda b: axis.to(device=b.y.device, dtype=b.y.dtype).expand(int(b.num_nodes), -1)

    def metric_values(self, pred: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        cos = self._cos(pred, batch.y)
        angle = torch.rad2deg(torch.arccos(cos.abs().clamp(max=1.0)))
        B = int(batch.num_graphs)
        return {"1-cos2": scatter(1.0 - cos**2, batch.batch, dim=0, dim_size=B, reduce="mean"),
                "angle_deg": scatter(angle, batch.batch, dim=0, dim_size=B, reduce="mean")}

    def provenance(self) -> dict[str, Any]:
        catalogue, pools = self._pools
        return {"task": "normals", "source": "pybullet_data meshes + trimesh primitives",
                "protocol_seed": PROTOCOL_SEED, **_versions(), **self.options,
                "n_meshes": {k: int(len(v)) for k, v in pools.items()}, "n_catalogue": len(catalogue)}
