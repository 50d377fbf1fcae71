"""One labelled structure (:class:`Frame`): the common currency of readers, the on-disk store and batching.

Units: Å, eV, eV/Å, eV/Å³. Stress uses ASE's sign convention, σ = (1/V) ∂E/∂ε: positive = tensile, a
compressed cell has a negative diagonal (VASP/pymatgen kBar values have the opposite sign; convert them with
:func:`geodite_jax.data.pymatgen_json.kbar_to_ase_stress`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

from ..elements import MAX_Z

#: |σ| above this (eV/Å³ = 160 GPa) is taken as a unit error (kBar or GPa stored as eV/Å³), not physics.
MAX_STRESS = 1.0

# Keys of atoms.info / atoms.arrays that are structure or label data rather than extras.
_STRUCTURAL_ARRAYS = ("numbers", "positions")


@dataclasses.dataclass(eq=False)
class Frame:
    """One labelled structure (Å, eV). Arrays are converted and checked on construction (:meth:`validate`).

    Attributes:
        numbers: ``[n_atoms]`` int atomic numbers (1..118).
        positions: ``[n_atoms, 3]`` float64 Cartesian positions, Å.
        cell: ``[3, 3]`` float64 lattice vectors as rows, Å (zeros along free directions).
        pbc: ``[3]`` bool periodicity.
        energy: total energy, eV, or None if unlabelled.
        forces: ``[n_atoms, 3]`` eV/Å, or None.
        stress: ``[3, 3]`` eV/Å³, ASE sign (positive = tensile), or None.
        group: configuration group (mlearn "AIMD-NVT", MPtrj mp-id, EMT "md-800K", ...).
        id: stable identifier, e.g. ``"test.json:12"`` or the MPtrj frame id ``"mp-1028232-0-3"``.
        info: extras that travel with the frame (corrected_total_energy, magmoms, ...); not kept by the store.
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    group: str = ""
    id: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Copies: a frame must not change when the Atoms or arrays it came from do.
        self.numbers = np.array(self.numbers).astype(np.int64, copy=False)
        self.positions = np.array(self.positions, dtype=np.float64)
        self.cell = np.array(self.cell, dtype=np.float64)
        pbc = np.asarray(self.pbc, dtype=bool)
        self.pbc = np.repeat(pbc, 3) if pbc.ndim == 0 else pbc
        if self.energy is not None:
            self.energy = float(self.energy)
        if self.forces is not None:
            self.forces = np.array(self.forces, dtype=np.float64)
        if self.stress is not None:
            stress = np.array(self.stress, dtype=np.float64)
            self.stress = voigt_6_to_full_3x3_stress(stress) if stress.shape == (6,) else stress
        self.group, self.id = str(self.group), str(self.id)
        self.validate()

    def __len__(self) -> int:
        return len(self.numbers)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the frame and the problem: shapes, unknown elements, NaN/inf, kBar stress."""
        where = f"frame {self.id!r}" if self.id else "frame"
        n = self.numbers.shape[0] if self.numbers.ndim == 1 else -1
        if self.numbers.ndim != 1:
            raise ValueError(f"{where}: numbers must be [n_atoms], got shape {self.numbers.shape}")
        if n == 0:
            raise ValueError(f"{where}: empty structure (no atoms)")
        bad = np.flatnonzero((self.numbers < 1) | (self.numbers > MAX_Z))
        if bad.size:
            raise ValueError(f"{where}: unknown element, atomic number {int(self.numbers[bad[0]])} at atom "
                             f"{int(bad[0])} (valid: 1..{MAX_Z})")
        checks = [("positions", self.positions, (n, 3)), ("cell", self.cell, (3, 3)), ("pbc", self.pbc, (3,)),
                  ("forces", self.forces, (n, 3)), ("stress", self.stress, (3, 3))]
        for name, value, shape in checks:
            if value is None:
                continue
            if value.shape != shape:
                raise ValueError(f"{where}: {name} must have shape {list(shape)} for {n} atoms, got "
                                 f"{list(value.shape)}")
            if value.dtype != bool and not np.all(np.isfinite(value)):
                raise ValueError(f"{where}: {name} contains NaN or inf")
        if self.energy is not None and not np.isfinite(self.energy):
            raise ValueError(f"{where}: energy is {self.energy}")
        if self.stress is not None:
            if not self.pbc.any():
                raise ValueError(f"{where}: a stress label on a non-periodic structure is meaningless")
            peak = float(np.abs(self.stress).max())
            if peak > MAX_STRESS:
                raise ValueError(f"{where}: |stress| reaches {peak:.4g} eV/Å³ (> {MAX_STRESS} eV/Å³ = 160 GPa); "
                                 "this looks like unconverted kBar or GPa. Stress must be eV/Å³ in ASE sign "
                                 "(kBar -> eV/Å³: multiply by -0.1 * ase.units.GPa for VASP-sign kBar)")

    @property
    def volume(self) -> float:
        """|det(cell)| in Å³ (0 for a molecule)."""
        return float(abs(np.linalg.det(self.cell)))

    def to_atoms(self) -> Atoms:
        """An ``ase.Atoms`` with a ``SinglePointCalculator`` holding the labels; ``info`` gets group, id, extras."""
        atoms = Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        results: dict[str, Any] = {}
        if self.energy is not None:
            results["energy"] = self.energy
        if self.forces is not None:
            results["forces"] = self.forces.copy()
        if self.stress is not None:
            results["stress"] = full_3x3_to_voigt_6_stress(self.stress)
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.info.update(self.info)
        if self.group:
            atoms.info["group"] = self.group
        if self.id:
            atoms.info["frame_id"] = self.id
        return atoms

    @classmethod
    def from_atoms(cls, atoms: Atoms, *, energy_key: str = "energy", forces_key: str = "forces",
                   stress_key: str = "stress", group_key: str | None = None, id_key: str | None = "frame_id",
                   id: str = "") -> Frame:  # noqa: A002 - mirrors the field name
        """Frame from ``atoms``; labels are looked up in ``atoms.info`` / ``atoms.arrays``, then ``atoms.calc``.

        ``group_key=None`` takes ``info["group"]`` or ``info["config_type"]`` when present. The id is
        ``info[id_key]`` when present, else ``id``. Stress may be ``[3, 3]``, Voigt ``[6]`` (ASE order) or
        flat ``[9]`` and must already be eV/Å³ in ASE sign; it is dropped on non-periodic structures.
        Remaining ``info`` entries and extra per-atom arrays go to ``Frame.info``.
        """
        info = dict(atoms.info)
        results = dict(atoms.calc.results) if atoms.calc is not None and hasattr(atoms.calc, "results") else {}

        def lookup(key: str, per_atom: bool) -> Any:
            if per_atom and key in atoms.arrays:
                return atoms.arrays[key]
            if not per_atom and key in info:
                return info.pop(key)
            return results.get(key)

        stress = lookup(stress_key, False)
        if stress is not None and not np.any(atoms.pbc):
            stress = None  # some molecular files carry a zero placeholder stress; it is not a label
        if stress is not None:
            stress = np.asarray(stress, dtype=np.float64)
            stress = stress.reshape(3, 3) if stress.size == 9 else stress
        if group_key is None:
            group = next((info.pop(k) for k in ("group", "config_type") if k in info), "")
        else:
            group = info.pop(group_key, "")
        if id_key is not None and id_key in info:
            id = str(info.pop(id_key))  # noqa: A001
        extras = {k: v for k, v in atoms.arrays.items() if k not in _STRUCTURAL_ARRAYS and k != forces_key}
        extras.update({k: v for k, v in results.items() if k not in ("energy", "forces", "stress", "free_energy")
                       and k not in extras})
        info.update(extras)
        return cls(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell.array, pbc=atoms.pbc,
                   energy=lookup(energy_key, False), forces=lookup(forces_key, True), stress=stress,
                   group=str(group), id=id, info=info)

    def equals(self, other: Frame, atol: float = 0.0) -> bool:
        """Same structure, labels (within ``atol``), group and id; ``info`` is not compared."""

        def close(a: Any, b: Any) -> bool:
            if a is None or b is None:
                return a is None and b is None
            return bool(np.shape(a) == np.shape(b) and np.allclose(a, b, rtol=0.0, atol=atol))

        return (np.array_equal(self.numbers, other.numbers) and np.array_equal(self.pbc, other.pbc)
                and close(self.positions, other.positions) and close(self.cell, other.cell)
                and close(self.energy, other.energy) and close(self.forces, other.forces)
                and close(self.stress, other.stress) and self.group == other.group and self.id == other.id)
