"""Reading structures and writing trajectories (extxyz frames ASE reads back) and CSV logs."""

from __future__ import annotations

import csv
import io
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

    ``append=False`` starts a new file; ``True`` (a resumed run) adds to an existing one. Each frame is
    formatted in memory and written with one ``write`` and a flush, so a killed process leaves at most one
    partial frame at the end of the file; :attr:`size` (bytes of complete frames) is what a checkpoint
    records, and :func:`truncate_outputs` cuts the file back to it.
    """

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab" if append else "wb")  # noqa: SIM115 (closed in close())
        self.size = self._fh.seek(0, os.SEEK_END)

    def write(self, atoms: Atoms) -> None:
        from ase.io import write

        buffer = io.StringIO()
        write(buffer, atoms, format="extxyz")
        data = buffer.getvalue().encode()
        self._fh.write(data)
        self._fh.flush()
        self.size += len(data)

    def close(self) -> None:
        self._fh.close()


class CSVLog:
    """One row per logged step: :data:`LOG_FIELDS`; each row is one ``write`` and a flush (see
    :class:`TrajectoryWriter`), :attr:`size` the bytes of complete rows."""

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not (append and self.path.exists())
        self._fh = open(self.path, "wb" if new else "ab")  # noqa: SIM115 (closed in close())
        self.size = self._fh.seek(0, os.SEEK_END)
        if new:
            self._write_row(list(LOG_FIELDS))

    def _write_row(self, values: list[Any]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer).writerow(values)
        data = buffer.getvalue().encode()
        self._fh.write(data)
        self._fh.flush()
        self.size += len(data)

    def write(self, record: dict[str, float]) -> None:
        self._write_row([record[k] for k in LOG_FIELDS])

    def close(self) -> None:
        self._fh.close()


def output_record(path: str | os.PathLike, size: int) -> dict[str, Any]:
    """What a checkpoint records of an output file: its resolved path and the bytes written so far."""
    return {"path": str(Path(path).resolve()), "bytes": int(size)}


def truncate_outputs(records: dict[str, dict[str, Any]], paths: dict[str, str | os.PathLike | None]) -> None:
    """Cut each output file back to the size a checkpoint recorded (dropping frames and rows written after it,
    and any partial one left by a killed process).

    ``records``: ``{"trajectory": output_record(...), "log": ...}`` from the checkpoint; ``paths``: the files
    this run appends to. A file other than the recorded one is left alone; the recorded one shorter than
    recorded (it was edited or replaced) is a ``ValueError``.
    """
    for name, path in paths.items():
        record = records.get(name)
        if path is None or record is None:
            continue
        path = Path(path)
        if str(path.resolve()) != record["path"] or not path.exists():
            continue
        size = path.stat().st_size
        if size < record["bytes"]:
            raise ValueError(f"{path} has {size} bytes, fewer than the {record['bytes']} the checkpoint recorded: "
                             "it was changed after the checkpoint; resume into a new file")
        if size > record["bytes"]:
            with open(path, "r+b") as fh:
                fh.truncate(record["bytes"])
