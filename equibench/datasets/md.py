"""``md``: energies and forces of a small molecule from Langevin MD with GFN2-xTB.

Generator. The molecule's geometry (ase's g2 set, or the built-in aspirin table) is relaxed with
xTB (BFGS to fmax 0.01 eV/A); its energy ``E_ref`` is the energy zero. Each (split, seed) is
an *independent* trajectory seeded by ``(PROTOCOL_SEED, seed, split)``: Maxwell-Boltzmann
momenta at ``temperature``, ``equilibration`` Langevin steps (ase ``Langevin``, centre of mass
fixed with ``FixCom``), then one configuration every ``stride`` steps. Recorded per
configuration: positions (A), total energy (eV) and forces F = -dE/dx (eV/A) from tblite.
Splits are therefore disjoint and statistically independent samples of the same canonical
ensemble; a smaller size is a prefix of a larger one (the trajectory is deterministic, so a
request longer than the cached one regenerates it from the start and extends it). The molecule
tumbles freely (no angular-momentum constraint), so orientations vary across configurations.

Task. Group E(3) (the xTB energy is invariant under rotations, reflections, translations and
permutations of identical atoms). Inputs ``pos: point``, ``x: kx0e`` (one-hot element over the
molecule's k elements, ordered by atomic number); complete graph unless ``cutoff`` is set.
``target="forces"``: node-level ``y = F`` of type ``"1o"``, metric ``force_mae`` (eV/A);
``target="energy"``: graph-level ``y = E - E_ref`` of type ``"0e"`` (eV), metric
``energy_mae`` (eV). Every Data also holds ``energy = E - E_ref`` ([1], eV) and ``z`` (atomic
numbers). Targets are not rescaled: only the constant ``E_ref`` is subtracted (an MAE does not
see it), so losses and metrics are in eV and eV/A.

xTB settings: SCF ``accuracy`` 0.1 (forces within ~2e-5 eV/A of a tightly converged single
point; tblite's default 1.0 gives ~2e-4 eV/A), electronic temperature 300 K. tblite runs on one
OpenMP thread here: with two threads on two cores it was ~15x slower.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from ase import Atoms, units
from ase.build import molecule as ase_molecule
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.optimize import BFGS
from tblite.ase import TBLite
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter
from tqdm.auto import tqdm

from ..core.errors import UserError
from ..core.registry import register_task
from ..core.spec import TaskSpec
from ..metrics.catalogue import task_metric
from .base import SPLITS, Task, atomic_save, cache_dir
from .symmetric import Geometry
from .symmetric import molecules as symmetric_molecules

PROTOCOL_SEED = 17
GENERATOR_VERSION = 1  # bump when the generator changes, to invalidate caches
RELAX_FMAX = 0.01  # eV/A
ELECTRONIC_TEMPERATURE = 300.0  # K, tblite's default
ACCURACY = 0.1  # SCF accuracy (tblite default 1.0 leaves force errors ~2e-4 eV/A; 0.1: ~2e-5)

# friendly names -> ase.build.molecule names (any other g2/extra name is passed through)
ALIASES = {"ethanol": "CH3CH2OH", "methanol": "CH3OH", "benzene": "C6H6", "water": "H2O",
           "acetone": "CH3COCH3", "acetic_acid": "CH3COOH"}

# Aspirin (C9H8O4) is not in ase's g2 set. Coordinates (A) were built by hand from ideal bond
# lengths (benzene ring, ortho COOH and acetoxy groups) and relaxed once with GFN2-xTB; the
# generator relaxes them again, so small errors here do not matter.
ASPIRIN = [
    ("C", 0.7870, -0.0701, -0.4730), ("C", -0.3389, -0.8697, -0.2491),
    ("C", -0.2505, -2.2491, -0.3718), ("C", 0.9519, -2.8392, -0.7151),
    ("C", 2.0780, -2.0571, -0.9181), ("C", 1.9947, -0.6840, -0.7962),
    ("H", -1.1343, -2.8419, -0.1947), ("H", 1.0110, -3.9126, -0.8143),
    ("H", 3.0199, -2.5179, -1.1729), ("H", 2.8625, -0.0646, -0.9586),
    ("C", 0.6962, 1.4092, -0.4118), ("O", -0.2996, 2.0554, -0.6271),
    ("O", 1.8688, 1.9837, -0.1248), ("H", 1.7581, 2.9462, -0.0757),
    ("O", -1.5655, -0.3313, 0.0776), ("C", -1.6609, 0.5235, 1.1220),
    ("O", -0.7718, 0.7199, 1.9023), ("C", -3.0239, 1.1452, 1.1576),
    ("H", -3.2477, 1.4934, 2.1610), ("H", -3.0057, 1.9960, 0.4782),
    ("H", -3.7723, 0.4397, 0.8106),
]


def initial_geometry(name: str) -> Atoms:
    """Unrelaxed geometry of ``name``: ``"aspirin"``, an alias in ``ALIASES`` or any name
    ``ase.build.molecule`` knows (g2 set)."""
    if name == "aspirin":
        return Atoms([s for s, *_ in ASPIRIN], positions=[p for _, *p in ASPIRIN])
    try:
        return ase_molecule(ALIASES.get(name, name))
    except KeyError:
        known = ", ".join(sorted([*ALIASES, "aspirin"]))
        raise ValueError(f"unknown molecule {name!r} (known: {known}, or any ase g2 name)") from None


@contextlib.contextmanager
def single_openmp_thread() -> Iterator[None]:
    """Run tblite on one OpenMP thread (it links the system ``libgomp``; torch has its own)."""
    try:
        gomp = ctypes.CDLL("libgomp.so.1")
        old = gomp.omp_get_max_threads()
    except (OSError, AttributeError):
        yield
        return
    gomp.omp_set_num_threads(1)
    try:
        yield
    finally:
        gomp.omp_set_num_threads(old)


def xtb_calculator(method: str) -> TBLite:
    return TBLite(method=method, accuracy=ACCURACY, electronic_temperature=ELECTRONIC_TEMPERATURE,
                  verbosity=0)


def xtb_energy_forces(numbers: np.ndarray, positions: np.ndarray,
                      method: str = "GFN2-xTB") -> tuple[float, np.ndarray]:
    """A fresh single point: total energy (eV) and forces (eV/A) of one configuration."""
    atoms = Atoms(numbers=numbers, positions=positions)
    atoms.calc = xtb_calculator(method)
    with single_openmp_thread():
        return float(atoms.get_potential_energy()), atoms.get_forces().copy()


def relax(atoms: Atoms, method: str) -> tuple[np.ndarray, float]:
    """xTB-relaxed positions (centre of mass at the origin) and their energy (eV)."""
    atoms = atoms.copy()
    atoms.calc = xtb_calculator(method)
    with single_openmp_thread():
        BFGS(atoms, logfile=None).run(fmax=RELAX_FMAX, steps=1000)
        energy = float(atoms.get_potential_energy())
    return atoms.positions - atoms.get_center_of_mass(), energy


def simulate(numbers: np.ndarray, positions: np.ndarray, n_configs: int, rng: np.random.Generator,
             *, temperature: float, timestep: float, friction: float, stride: int,
             equilibration: int, method: str, desc: str = "md") -> dict[str, np.ndarray]:
    """Langevin MD (``temperature`` K, ``timestep`` fs, ``friction`` 1/fs) from ``positions``.

    Returns ``pos, forces: [n_configs, n_atoms, 3]`` and ``energy: [n_configs]`` (eV, eV/A),
    one configuration every ``stride`` steps after ``equilibration`` steps.
    """
    atoms = Atoms(numbers=numbers, positions=positions)
    atoms.calc = xtb_calculator(method)
    atoms.set_constraint(FixCom())
    momenta = np.sqrt(atoms.get_masses() * units.kB * temperature)[:, None] * rng.standard_normal((len(atoms), 3))
    atoms.set_momenta(momenta, apply_constraint=True)  # FixCom removes the centre-of-mass momentum
    dyn = Langevin(atoms, timestep * units.fs, temperature_K=temperature, friction=friction / units.fs,
                   fixcm=False, rng=rng)
    out = {"pos": np.empty((n_configs, len(atoms), 3)), "forces": np.empty((n_configs, len(atoms), 3)),
           "energy": np.empty(n_configs)}
    with single_openmp_thread(), tqdm(total=equilibration + n_configs * stride, desc=desc, unit="step",
                                      leave=False, mininterval=1.0) as bar:
        done = 0
        while done < equilibration:
            n = min(stride, equilibration - done)
            dyn.run(n)
            done += n
            bar.update(n)
        for k in range(n_configs):
            dyn.run(stride)
            bar.update(stride)
            out["pos"][k] = atoms.positions
            out["energy"][k] = atoms.get_potential_energy()
            out["forces"][k] = atoms.get_forces(apply_constraint=False)
    return out


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@register_task("md")
class MD(Task):
    """Forces (or energy) of one small molecule along a GFN2-xTB Langevin MD trajectory.

    Fields of every ``Data`` (types as in ``TaskSpec``):

    * ``pos [n_atoms, 3]``, type ``"point"``: atom positions in Å;
    * ``x [n_atoms, k]``, type ``"kx0e"``: one-hot element over the molecule's k distinct
      elements, columns **ordered by atomic number** (``self.elements``; ethanol, the default:
      H, C, O, so ``"3x0e"``), invariant;
    * ``z [n_atoms]``: atomic numbers; ``energy [1]``: E - E_ref in eV;
    * ``edge_index``: the complete graph (every ordered pair, no self-loops), or pairs within
      ``cutoff`` Å when set;
    * ``y``: ``target="forces"``: node-level forces ``[n_atoms, 3]``, type ``"1o"`` (eV/Å), metric
      ``force_mae``; ``target="energy"``: graph-level ``[1, 1]``, type ``"0e"`` (eV), metric
      ``energy_mae``.

    Symmetry: E(3) and permutations of identical atoms.
    """

    smoke_options = {"train_size": 64, "val_size": 16, "test_size": 32}
    # no floors beyond the trivial predictor (mean energy / zero forces): one molecule has one
    # composition, so a per-element linear energy is the mean again
    SEED_DRAWS = "the training and validation Langevin trajectories simulated (xTB)"

    def __init__(self, *, molecule: str = "ethanol", target: str = "forces", temperature: float = 500.0,
                 timestep: float = 0.5, friction: float = 0.02, stride: int = 20,
                 equilibration: int = 400, xtb_method: str = "GFN2-xTB", cutoff: float | None = None,
                 train_size: int = 300, val_size: int = 50, test_size: int = 100) -> None:
        if target not in ("forces", "energy"):
            raise ValueError(f"target must be 'forces' or 'energy', got {target!r}")
        if xtb_method not in ("GFN2-xTB", "GFN1-xTB", "IPEA1-xTB"):
            raise ValueError(f"xtb_method must be GFN2-xTB, GFN1-xTB or IPEA1-xTB, got {xtb_method!r}")
        if temperature <= 0 or timestep <= 0 or friction <= 0:
            raise ValueError("temperature, timestep and friction must be positive")
        if stride < 1 or equilibration < 0:
            raise ValueError("need stride >= 1 and equilibration >= 0")
        if cutoff is not None and cutoff <= 0:
            raise ValueError("cutoff must be positive (or None for the complete graph)")
        for name, v in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if v < 1:
                raise ValueError(f"{name} must be positive")
        self.atoms0 = initial_geometry(molecule)
        super().__init__(molecule=molecule, target=target, temperature=float(temperature),
                         timestep=float(timestep), friction=float(friction), stride=stride,
                         equilibration=equilibration, xtb_method=xtb_method, cutoff=cutoff,
                         train_size=train_size, val_size=val_size, test_size=test_size)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.elements = sorted(set(int(z) for z in self.atoms0.numbers))

    @property
    def spec(self) -> TaskSpec:
        forces = self.options["target"] == "forces"
        return TaskSpec(name="md", domain="graph3d", group="E3",
                        inputs={"pos": "point", "x": f"{len(self.elements)}x0e"},
                        output="1o" if forces else "0e", level="node" if forces else "graph",
                        loss="mse", metrics=("force_mae",) if forces else ("energy_mae",))

    # -- generation and cache ---------------------------------------------------------------
    def _reference_params(self) -> dict[str, Any]:
        return {"version": GENERATOR_VERSION, "tblite": _version("tblite"),
                "molecule": self.options["molecule"], "method": self.options["xtb_method"],
                "accuracy": ACCURACY,
                "electronic_temperature": ELECTRONIC_TEMPERATURE, "relax_fmax": RELAX_FMAX}

    def _generator_params(self) -> dict[str, Any]:
        o = self.options
        return {**self._reference_params(), "temperature": o["temperature"], "timestep": o["timestep"],
                "friction": o["friction"], "stride": o["stride"], "equilibration": o["equilibration"],
                "protocol_seed": PROTOCOL_SEED}

    @staticmethod
    def _key(params: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]

    def reference(self) -> dict[str, Any]:
        """The relaxed geometry (``numbers``, ``pos``) and its energy ``energy`` (eV): the start
        of every trajectory and the energy zero. Cached."""
        path = cache_dir() / "md" / self._key(self._reference_params()) / "reference.pt"
        if path.exists():
            return torch.load(path, weights_only=False)
        pos, energy = relax(self.atoms0, self.options["xtb_method"])
        ref = {"numbers": self.atoms0.numbers.copy(), "pos": pos, "energy": energy}
        atomic_save(ref, path)
        return ref

    def _trajectory(self, split: str, seed: int, size: int) -> dict[str, np.ndarray]:
        path = cache_dir() / "md" / self._key(self._generator_params()) / f"{split}-seed{seed}.pt"
        if path.exists():
            cached = torch.load(path, weights_only=False)
            if len(cached["energy"]) >= size:
                return cached
        ref = self.reference()
        o = self.options
        rng = np.random.default_rng([PROTOCOL_SEED, seed, SPLITS.index(split)])
        traj = simulate(ref["numbers"], ref["pos"], size, rng, temperature=o["temperature"],
                        timestep=o["timestep"], friction=o["friction"], stride=o["stride"],
                        equilibration=o["equilibration"], method=o["xtb_method"],
                        desc=f"md {o['molecule']} {split} seed {seed}")
        traj["numbers"] = ref["numbers"]
        atomic_save(traj, path)
        return traj

    # -- Task interface ---------------------------------------------------------------------
    def load(self, split: str, size: int | None = None, seed: int = 0) -> list[Data]:
        self.check_split(split)
        size = self.sizes[split] if size is None else size
        if size < 1:
            raise UserError(f"md: size must be positive, got {size}")
        traj = self._trajectory(split, seed, size)
        e_ref = self.reference()["energy"]
        dt = torch.get_default_dtype()
        z = torch.as_tensor(traj["numbers"], dtype=torch.long)
        onehot = (z[:, None] == torch.tensor(self.elements)[None, :]).to(dt)
        n = len(z)
        full = ~torch.eye(n, dtype=torch.bool)
        cutoff = self.options["cutoff"]
        forces_target = self.options["target"] == "forces"
        out = []
        for i in range(size):
            pos = torch.as_tensor(traj["pos"][i], dtype=dt)
            adj = full if cutoff is None else full & (torch.cdist(pos, pos) < cutoff)
            src, dst = torch.nonzero(adj, as_tuple=True)
            energy = torch.tensor([traj["energy"][i] - e_ref], dtype=dt)
            y = torch.as_tensor(traj["forces"][i], dtype=dt) if forces_target else energy[:, None]
            out.append(Data(pos=pos, x=onehot, z=z, edge_index=torch.stack([src, dst]),
                            y=y, energy=energy))
        return out

    # -- exactly symmetric inputs -----------------------------------------------------------
    def symmetric_geometries(self) -> list[Geometry]:
        """The standard symmetric molecules (``datasets.symmetric``) made only of the task
        molecule's elements (all six for ethanol and aspirin: H, C, O)."""
        known = {int(z) for z in self.elements}
        return [g for g in symmetric_molecules()
                if {int(n) for n in Atoms(list(g.labels)).numbers} <= known]

    def symmetric_data(self, geometry: Geometry) -> Data:
        """The molecule in md's fields: ``pos`` (Å), one-hot ``x`` over the task molecule's
        elements, atomic numbers ``z``, the complete graph (or pairs within ``cutoff``)."""
        dt = torch.get_default_dtype()
        z = torch.as_tensor(Atoms(list(geometry.labels)).numbers, dtype=torch.long)
        pos = torch.as_tensor(geometry.pos, dtype=torch.float64)
        n = len(z)
        adj = ~torch.eye(n, dtype=torch.bool)
        if self.options["cutoff"] is not None:
            adj &= torch.cdist(pos, pos) < self.options["cutoff"]
        src, dst = torch.nonzero(adj, as_tuple=True)
        return Data(pos=pos.to(dt), x=(z[:, None] == torch.tensor(self.elements)[None, :]).to(dt), z=z,
                    edge_index=torch.stack([src, dst]))

    # loss: the default, mean squared error of the energy or the forces (option ``target``)
    METRICS = (task_metric("energy_mae", direction="lower", unit="eV", description="mean absolute energy error (md)"),
               task_metric("force_mae", direction="lower", unit="eV/Å", description="mean absolute force error (md)"))

    def metric_values(self, pred: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        err = (pred - batch.y).abs()
        if self.options["target"] == "energy":
            return {"energy_mae": err.reshape(-1)}
        per_node = err.mean(-1)
        return {"force_mae": scatter(per_node, batch.batch, dim=0, dim_size=int(batch.num_graphs),
                                     reduce="mean")}

    def provenance(self) -> dict[str, Any]:
        o = self.options
        return {"task": "md", "source": "generated (ase Langevin MD, tblite xTB)",
                "tblite": _version("tblite"), "ase": _version("ase"), "numpy": np.__version__,
                "molecule": o["molecule"], "formula": self.atoms0.get_chemical_formula(),
                "n_atoms": len(self.atoms0), "xtb_method": o["xtb_method"],
                "temperature_K": o["temperature"], "timestep_fs": o["timestep"],
                "friction_per_fs": o["friction"], "stride": o["stride"],
                "equilibration_steps": o["equilibration"], "accuracy": ACCURACY,
                "electronic_temperature_K": ELECTRONIC_TEMPERATURE, "protocol_seed": PROTOCOL_SEED,
                "generator_version": GENERATOR_VERSION, "target": o["target"], "cutoff": o["cutoff"],
                "energy_reference_eV": self.reference()["energy"],
                "train_size": o["train_size"], "val_size": o["val_size"], "test_size": o["test_size"]}
