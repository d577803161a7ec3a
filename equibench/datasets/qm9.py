"""``qm9``: invariant regression of molecular properties on the real QM9 molecules.

Source: the 130 831 molecules (QM9 minus the 3 054 that failed its consistency check) shipped
as CSV files ``qm9_part{1,2,3}.csv`` in PyPI ``qm9pack`` 1.0.3's ``data/`` folder; nothing is
downloaded. ``qm9pack.get_data()`` needs ``pkg_resources`` and fails on current setuptools, so
the CSVs are read directly (pyarrow) and parsed once, vectorised, into a compact cached tensor
file (positions float32 in Å, atom types uint8, per-molecule properties float64 in CSV units).

Inputs: positions ``pos`` (Å, type "point") and one-hot atom types over (H, C, N, O, F) as
``x`` ("5x0e"). Graph: all pairs within ``cutoff`` Å (default 5.0) in each molecule, edges
j -> i. Target ``y [1, 1]`` per molecule (type "0e": invariant under E(3)), chosen by
``target`` from the clean invariant columns of the CSV:

====================  ==============================  =============
target                CSV column                      unit reported
====================  ==============================  =============
gap (default)         HOMO_LUMO_gap_au                eV (from Hartree)
homo, lumo            HOMO_au, LUMO_au                eV (from Hartree)
mu                    Dipole_debye (norm of dipole)   Debye
alpha                 Polarizability_bohr3 (isotropic) bohr^3
r2                    R2_bohr2 (electronic spatial extent) bohr^2
zpve                  ZPVE_au                         eV (from Hartree)
u0, u298, h298, g298  InternalEnergy_0K_au, ...       eV (from Hartree)
cv                    Heatcapacity_Cv_cal_mol_K       cal/(mol K)
u0_atom               U0 / number of atoms            eV per atom
u0_atomization        U0 - sum of free-atom U0        eV
====================  ==============================  =============

Hartree -> eV uses CODATA 2018 (27.211386245988). ``u0_atomization`` subtracts the QM9
free-atom reference energies (B3LYP/6-31G(2df,p), Hartree: H -0.500273, C -37.846772,
N -54.583861, O -75.064579, F -99.718730); note PyG calls this quantity ``U0_atom``. Not offered:
the rotational constants (A reaches 6e5 GHz for near-linear molecules), Mulliken charges and
frequencies (per-atom / per-mode lists), and the polarizability tensor (not in the XYZ frame).

Splits: a fixed permutation of all molecules (seeded by ``(PROTOCOL_SEED, 0)``); its first tenth
is the test pool, the second tenth the val pool, the rest the train pool, the same for every seed
(no molecule is in two pools). A split of size n with seed 0 is the first n molecules of its pool
(so sizes never change each other's molecules); another seed draws n molecules of the pool without
replacement (seeded by ``(PROTOCOL_SEED, seed, split)``). The runs draw train and val with their
seed and the test split with seed 0 (``benches.taskrun.load_split``).

Floors (``floors``): beside the training mean (the trivial predictor), a least-squares linear
regression of the target on the per-molecule counts of H, C, N, O, F plus an intercept, fitted on
the training split: the standard strong QM9 baseline for extensive targets (it is exact for a sum
of per-atom energies) and a weak one for intensive ones such as the gap.

Loss and metric: the model predicts the *standardised* target ``(y - mean) / std``; ``loss`` is
the MSE against it, ``metric_values`` undoes the standardisation and reports the per-molecule
absolute error in the target's unit (``"mae"``). ``mean`` and ``std`` are those of the training
split as configured (``train_size``) for the seed of the latest ``load("train")`` (seed 0 before
any).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Batch, Data
from tqdm.auto import tqdm

from ..core.errors import UserError
from ..core.registry import register_task
from ..core.spec import TaskSpec
from ..metrics.catalogue import task_metric
from .base import Task, atomic_save, cache_dir
from .graphs import radius_graph
from .symmetric import Geometry
from .symmetric import molecules as symmetric_molecules

if importlib.util.find_spec("qm9pack") is None:  # do not import it: its __init__ needs pkg_resources
    raise ModuleNotFoundError("No module named 'qm9pack'", name="qm9pack")

PROTOCOL_SEED = 1309
HARTREE_TO_EV = 27.211386245988
ELEMENTS = ("H", "C", "N", "O", "F")
ATOMREF_U0_HARTREE = np.array([-0.500273, -37.846772, -54.583861, -75.064579, -99.718730])
COLUMNS = ("HOMO_LUMO_gap_au", "HOMO_au", "LUMO_au", "Dipole_debye", "Polarizability_bohr3", "R2_bohr2",
           "ZPVE_au", "InternalEnergy_0K_au", "InternalEnergy_298K_au", "Enthalphy_298K_au",
           "GibbsFreeEnergy_298K_au", "Heatcapacity_Cv_cal_mol_K")
# target -> (CSV column, factor to the reported unit, unit)
TARGETS: dict[str, tuple[str, float, str]] = {
    "gap": ("HOMO_LUMO_gap_au", HARTREE_TO_EV, "eV"), "homo": ("HOMO_au", HARTREE_TO_EV, "eV"),
    "lumo": ("LUMO_au", HARTREE_TO_EV, "eV"), "mu": ("Dipole_debye", 1.0, "D"),
    "alpha": ("Polarizability_bohr3", 1.0, "bohr^3"), "r2": ("R2_bohr2", 1.0, "bohr^2"),
    "zpve": ("ZPVE_au", HARTREE_TO_EV, "eV"), "u0": ("InternalEnergy_0K_au", HARTREE_TO_EV, "eV"),
    "u298": ("InternalEnergy_298K_au", HARTREE_TO_EV, "eV"), "h298": ("Enthalphy_298K_au", HARTREE_TO_EV, "eV"),
    "g298": ("GibbsFreeEnergy_298K_au", HARTREE_TO_EV, "eV"),
    "cv": ("Heatcapacity_Cv_cal_mol_K", 1.0, "cal/(mol K)"),
    "u0_atom": ("InternalEnergy_0K_au", HARTREE_TO_EV, "eV/atom"),
    "u0_atomization": ("InternalEnergy_0K_au", HARTREE_TO_EV, "eV"),
}
N_MOLECULES = 130_831


def data_files() -> list[Path]:
    """The three QM9 CSV files inside the installed ``qm9pack`` package."""
    spec = importlib.util.find_spec("qm9pack")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return [folder / f"qm9_part{i}.csv" for i in (1, 2, 3)]


def parse_csvs(files: list[Path]) -> dict[str, np.ndarray]:
    """Parse the CSVs (vectorised with pyarrow) into flat arrays.

    Returns ``index [M]`` (QM9 id), ``ptr [M + 1]`` (atoms of molecule m are
    ``ptr[m]:ptr[m+1]``), ``pos [A, 3]`` float32 (Å), ``z [A]`` uint8 (index into ``ELEMENTS``)
    and ``props [M, len(COLUMNS)]`` float64 in CSV units.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    wanted = ["Index", "N_atoms", "Elements", "XYZ_Ang", *COLUMNS]
    tables = [pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(include_columns=wanted))
              for f in tqdm(files, desc="qm9: reading CSVs", leave=False)]
    table = pa.concat_tables(tables)
    n_atoms = table["N_atoms"].to_numpy().astype(np.int64)
    xyz = pc.replace_substring_regex(table["XYZ_Ang"], r"[\[\]\s]", "")
    coords = pc.cast(pc.list_flatten(pc.split_pattern(xyz, ",")), pa.float64()).to_numpy()
    symbols = pc.replace_substring_regex(table["Elements"], r"[\[\]',\s]", "")
    symbols = np.frombuffer("".join(symbols.to_pylist()).encode("ascii"), dtype=np.uint8)
    lookup = np.full(256, 255, dtype=np.uint8)
    for k, e in enumerate(ELEMENTS):
        lookup[ord(e)] = k
    z = lookup[symbols]
    if coords.size != 3 * n_atoms.sum() or z.size != n_atoms.sum() or (z == 255).any():
        raise RuntimeError("qm9: CSV atom lists do not match N_atoms (corrupt or unexpected file)")
    return {"index": table["Index"].to_numpy().astype(np.int32),
            "ptr": np.concatenate([[0], np.cumsum(n_atoms)]),
            "pos": coords.reshape(-1, 3).astype(np.float32), "z": z,
            "props": np.stack([table[c].to_numpy().astype(np.float64) for c in COLUMNS], axis=1)}


def cache_path() -> Path:
    files = data_files()
    key = {"qm9pack": version("qm9pack"), "files": [(f.name, f.stat().st_size) for f in files],
           "columns": COLUMNS, "format": 1}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / "qm9" / digest / "molecules.pt"


@functools.lru_cache(maxsize=2)
def _molecules_at(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        arrays = parse_csvs(data_files())
        atomic_save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    return torch.load(path, weights_only=True)


def molecules() -> dict[str, torch.Tensor]:
    """All molecules (parsed once, then read from the cache); see ``parse_csvs`` for fields."""
    return _molecules_at(cache_path())


def target_values(target: str, mols: dict[str, torch.Tensor]) -> np.ndarray:
    """Target ``target`` for every molecule, in its reported unit (float64 ``[M]``)."""
    column, factor, _ = TARGETS[target]
    values = mols["props"][:, COLUMNS.index(column)].numpy()
    if target in ("u0_atom", "u0_atomization"):
        counts = np.diff(mols["ptr"].numpy())
        if target == "u0_atom":
            return values * factor / counts
        mol_of_atom = np.repeat(np.arange(len(counts)), counts)
        ref = np.bincount(mol_of_atom, weights=ATOMREF_U0_HARTREE[mols["z"].numpy()], minlength=len(counts))
        return (values - ref) * factor
    return values * factor


def count_features(batch: Batch) -> torch.Tensor:
    """``[1, n_H, n_C, n_N, n_O, n_F]`` per molecule of ``batch`` (float64), from the one-hot ``x``."""
    from torch_geometric.utils import scatter
    counts = scatter(batch.x.double(), batch.batch, dim=0, dim_size=int(batch.num_graphs), reduce="sum")
    return torch.cat([torch.ones(len(counts), 1, dtype=torch.float64, device=counts.device), counts], dim=1)


def fit_count_regression(train: list[Data]) -> torch.Tensor:
    """Least-squares weights ``w`` of ``y ≈ count_features · w`` on the molecules ``train``."""
    batch = Batch.from_data_list(train)
    return torch.linalg.lstsq(count_features(batch), batch.y.double().reshape(-1, 1), driver="gelsd").solution


@register_task("qm9")
class QM9Task(Task):
    """QM9 molecules: predict one invariant property per molecule (default the HOMO-LUMO gap, eV).

    Fields of every ``Data`` (types as in ``TaskSpec``):

    * ``pos [n_atoms, 3]``, type ``"point"``: atom positions in Å (rotate and translate);
    * ``x [n_atoms, 5]``, type ``"5x0e"``: one-hot element, columns in the order
      **H, C, N, O, F** (``ELEMENTS``; column 0 = hydrogen, 4 = fluorine), invariant;
    * ``edge_index [2, E]``: every pair of atoms closer than ``cutoff`` Å (default 5), edges j -> i,
      no self-loops; no edge features;
    * ``y [1, 1]``, type ``"0e"`` at graph level: the *standardised* target (y - mean) / std of the
      training split; ``metric_values`` reports the MAE in the target's unit (``"mae"``).

    Symmetry: E(3) (rotations, reflections, translations) and atom permutations. Options:
    ``target`` (module docstring's table), ``cutoff``, ``train_size`` / ``val_size`` / ``test_size``.
    """

    smoke_options = {"train_size": 64, "val_size": 16, "test_size": 32}

    def __init__(self, *, target: str = "gap", cutoff: float = 5.0, train_size: int = 2000,
                 val_size: int = 500, test_size: int = 1000) -> None:
        if target not in TARGETS:
            raise UserError(f"qm9: unknown target {target!r} (known: {', '.join(TARGETS)})")
        if cutoff <= 0:
            raise UserError("qm9: cutoff must be positive")
        for name, v in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if v < 1:
                raise UserError(f"qm9: {name} must be positive")
        super().__init__(target=target, cutoff=float(cutoff), train_size=train_size, val_size=val_size,
                         test_size=test_size)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self._stats_seed: int | None = None
        self._stats = (0.0, 1.0)

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(name="qm9", domain="graph3d", group="E3", inputs={"pos": "point", "x": "5x0e"},
                        output="0e", level="graph", loss="mse", metrics=("mae",))

    @property
    def unit(self) -> str:
        return TARGETS[self.options["target"]][2]

    # ---------------------------------------------------------------- splits
    def molecule_ids(self, split: str, size: int | None = None, seed: int = 0) -> np.ndarray:
        """Row numbers (0-based, into ``molecules()``) of the molecules of a split."""
        self.check_split(split)
        size = self.sizes[split] if size is None else size
        n = int(molecules()["index"].numel())
        perm = np.random.default_rng([PROTOCOL_SEED, 0]).permutation(n)
        tenth = n // 10
        pool = {"test": perm[:tenth], "val": perm[tenth:2 * tenth], "train": perm[2 * tenth:]}[split]
        if not 1 <= size <= len(pool):
            raise UserError(f"qm9: {split} size must be in 1..{len(pool)}, got {size}")
        if seed == 0:
            return pool[:size]
        rng = np.random.default_rng([PROTOCOL_SEED, seed, ("train", "val", "test").index(split)])
        return pool[rng.choice(len(pool), size, replace=False)]

    def target_stats(self, seed: int = 0) -> tuple[float, float]:
        """(mean, std) of the target over the configured training split of ``seed``."""
        if self._stats_seed != seed:
            y = target_values(self.options["target"], molecules())[self.molecule_ids("train", None, seed)]
            self._stats = (float(y.mean()), float(y.std()) if len(y) > 1 and y.std() > 0 else 1.0)
            self._stats_seed = seed
        return self._stats

    def load(self, split: str, size: int | None = None, seed: int = 0) -> list[Data]:
        ids = self.molecule_ids(split, size, seed)
        if split == "train" or self._stats_seed is None:
            self.target_stats(seed if split == "train" else 0)
        mols = molecules()
        ptr, pos_all, z_all = mols["ptr"], mols["pos"], mols["z"].long()
        y_all = target_values(self.options["target"], mols)
        atom_rows = [torch.arange(int(ptr[m]), int(ptr[m + 1])) for m in ids]
        counts = torch.tensor([len(r) for r in atom_rows])
        rows = torch.cat(atom_rows)
        batch = torch.repeat_interleave(torch.arange(len(ids)), counts)
        edges = radius_graph(pos_all[rows].double(), self.options["cutoff"], batch=batch)
        # split the global edge list back per molecule (edges are grouped by target, targets by molecule)
        edge_counts = torch.bincount(batch[edges[1]], minlength=len(ids)).tolist()
        starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]])
        dt = torch.get_default_dtype()
        out = []
        for k, (e, m) in enumerate(zip(edges.split(edge_counts, dim=1), ids)):
            r = atom_rows[k]
            out.append(Data(pos=pos_all[r].to(dt), x=torch.nn.functional.one_hot(z_all[r], len(ELEMENTS)).to(dt),
                            edge_index=e - starts[k], y=torch.tensor([[y_all[m]]], dtype=dt)))
        return out

    # ---------------------------------------------------------------- exactly symmetric inputs
    def symmetric_geometries(self) -> list[Geometry]:
        """Benzene (D6h), methane (Td), CO2 and acetylene (linear), water (C2v), ethylene (D2h),
        idealised (``datasets.symmetric``)."""
        return list(symmetric_molecules())

    def symmetric_data(self, geometry: Geometry) -> Data:
        """The molecule as a QM9 graph: ``pos`` (Å), one-hot ``x`` over (H, C, N, O, F), edges
        of every pair within ``cutoff`` (the task's radius graph)."""
        dt = torch.get_default_dtype()
        z = torch.tensor([ELEMENTS.index(e) for e in geometry.labels])
        pos = torch.as_tensor(geometry.pos, dtype=torch.float64)
        return Data(pos=pos.to(dt), x=torch.nn.functional.one_hot(z, len(ELEMENTS)).to(dt),
                    edge_index=radius_graph(pos, self.options["cutoff"]))

    # ---------------------------------------------------------------- loss and metrics
    METRICS = (task_metric("mae", direction="lower", unit="target units",
                           description="mean absolute error of the QM9 target, in its units"),)

    def loss(self, pred: torch.Tensor, batch: Batch) -> torch.Tensor:
        mean, std = self._stats if self._stats_seed is not None else self.target_stats(0)
        return torch.mean((pred.reshape(-1) - (batch.y.reshape(-1) - mean) / std) ** 2)

    def trivial_prediction(self, train: list[Data]) -> Callable[[Batch], torch.Tensor]:
        """The training mean: 0 in the standardised target the model predicts."""
        return lambda b: torch.zeros(int(b.num_graphs), 1, dtype=b.y.dtype, device=b.y.device)

    FLOORS = {"atom_counts": "least-squares linear regression of the target on the numbers of H, C, N, O and F "
                             "atoms plus an intercept, fitted on the training split"}
    SEED_DRAWS = "the molecules drawn from the fixed training and validation pools"

    def floors(self, train: list[Data]) -> dict[str, Callable[[Batch], torch.Tensor]]:
        """``atom_counts``: ``y ≈ w_0 + sum_e w_e n_e`` (``n_e`` the molecule's count of element
        e, from the one-hot ``x``), ``w`` the least-squares solution on ``train`` (float64,
        ``lstsq``: minimum norm where an element is absent); predicted in the standardised target
        with the statistics in force when it is called."""
        weights = fit_count_regression(train)

        def predict(b: Batch) -> torch.Tensor:
            mean, std = self._stats if self._stats_seed is not None else self.target_stats(0)
            y = count_features(b) @ weights.to(b.x.device)
            return ((y - mean) / std).to(b.y.dtype).reshape(-1, 1)
        return {"atom_counts": predict}

    def metric_values(self, pred: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        mean, std = self._stats if self._stats_seed is not None else self.target_stats(0)
        return {"mae": (pred.reshape(-1) * std + mean - batch.y.reshape(-1)).abs()}

    def provenance(self) -> dict[str, Any]:
        mean, std = self._stats if self._stats_seed is not None else self.target_stats(0)
        return {"task": "qm9", "source": "qm9pack CSVs (QM9, 130 831 molecules)", "qm9pack": version("qm9pack"),
                "protocol_seed": PROTOCOL_SEED, **self.options, "unit": self.unit,
                "target_mean": mean, "target_std": std, "stats_seed": self._stats_seed}
