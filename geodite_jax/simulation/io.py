"""Reading structures and writing trajectories (extxyz frames ASE reads back) and CSV logs."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

LOG_FIELDS = ("step", "time_fs", "temperature_K", "pressure_GPa", "potential_eV", "kinetic_eV", "total_eV",
              "volume_A3")


def read_structure(path: str | os.PathLike, index: int | str = -1) -> Atoms:
    """One structure from any file ASE reads (CIF, POSCAR, extxyz, ...), the last frame by default.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ASE cannot read it (unknown or malformed format) or it holds no atoms.
    """
    from ase.io import read

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure file not found: {path}")
    try:
        atoms = read(str(path), index=index)
    except Exception as err:  # ASE raises many types (UnknownFileTypeError, StopIteration, IndexError, ...)
        raise ValueError(f"cannot read a structure from {path}: {type(err).__name__}: {err}".rstrip(": ")) from None
    if isinstance(atoms, list):
        atoms = atoms[-1]
    if not isinstance(atoms, Atoms) or len(atoms) == 0:
        raise ValueError(f"{path} holds no atoms")
    return atoms


def frame(atoms: Atoms, energy: float, forces: np.ndarray | None = None, stress: np.ndarray | None = None,
          **info: Any) -> Atoms:
    """A copy of ``atoms`` carrying its potential energy (and forces, stress [3, 3]) and ``info`` entries."""
    out = atoms.copy()
    results: dict[str, Any] = {"energy": float(energy)}
    if forces is not None:
        results["forces"] = np.asarray(forces, np.float64)
    if stress is not None and np.all(np.isfinite(stress)):
        results["stress"] = np.asarray(stress, np.float64)
    out.calc = SinglePointCalculator(out, **results)
    out.info.update(info)
    return out


class TrajectoryWriter:
    """Appends frames to an extxyz file (positions, cell, momenta, energy, forces, stress, info).

    ``append=False`` starts a new file; ``True`` (a resumed run) adds to an existing one.
    """

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append and self.path.exists():
            self.path.unlink()

    def write(self, atoms: Atoms) -> None:
        from ase.io import write

        write(str(self.path), atoms, format="extxyz", append=True)


class CSVLog:
    """One row per logged step: :data:`LOG_FIELDS`."""

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not (append and self.path.exists())
        self._fh = open(self.path, "w" if new else "a", newline="")  # noqa: SIM115 (closed in close())
        self._writer = csv.DictWriter(self._fh, fieldnames=LOG_FIELDS)
        if new:
            self._writer.writeheader()

    def write(self, record: dict[str, float]) -> None:
        self._writer.writerow({k: record[k] for k in LOG_FIELDS})
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
