"""ASE's formats: extended XYZ, parsed frame by frame from its own lines (so a truncated or cut frame is named
and can be skipped), and ``ase.db`` databases; both with configurable label keys."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .frames import Frame
from .source import open_source, short_name


def read_extxyz(path: Path, options: dict) -> Iterator[tuple[str, Any]]:
    """Frame ``k`` of the file is parsed on its own (from its own lines), so that a broken frame (truncated,
    bad line) is reported as frame ``k`` of the file and, with ``on_error="skip"``, skipped."""
    name = short_name(path)
    for k, (start, lines, problem) in enumerate(extxyz_chunks(path)):
        yield f"{k} (line {start})", (lambda c=lines, p=problem, i=k: _atoms_frame(parse_extxyz_chunk(c, p),
                                                                                 f"{name}:{i}", options))


def _is_count_line(line: str) -> bool:
    parts = line.split()
    return len(parts) == 1 and parts[0].isdigit()


def extxyz_chunks(path: Path) -> Iterator[tuple[int, list[str], str | None]]:
    """``(first line number, lines, problem)`` per frame of an (ext)xyz file; ``problem`` says why a frame is
    broken (None if it looks whole). A frame with fewer atom lines than its count line says (a truncated
    file, or a cut frame followed by the next frame's count line) ends where the atom lines end; reading
    goes on from the next count line."""
    with open_source(path) as raw:
        lines = (line.decode("utf-8", errors="replace") for line in raw)
        number = 0
        pending: str | None = None
        while True:
            if pending is None:
                line = next(lines, None)
                number += 1
            else:
                line, pending = pending, None
            if line is None:
                return
            if not line.strip():
                continue  # blank lines between frames or at the end
            start = number
            if not _is_count_line(line):
                yield start, [line], (f"expected an xyz header (the atom count) at line {start}, "
                                      f"got {line.strip()[:60]!r}")
                # skip to the next count line
                while True:
                    line = next(lines, None)
                    number += 1
                    if line is None:
                        return
                    if _is_count_line(line):
                        pending, number = line, number - 1
                        break
                continue
            count = int(line.split()[0])
            chunk = [line]
            comment = next(lines, None)
            number += 1
            if comment is None:
                yield start, chunk, f"the file ends after the atom count line ({count} atoms expected)"
                return
            chunk.append(comment)
            problem = None
            for got in range(count):
                atom = next(lines, None)
                number += 1
                if atom is None:
                    problem = f"the file ends after {got} of its {count} atom lines (truncated)"
                    break
                if _is_count_line(atom):
                    problem = f"has {got} atom lines, expected {count} (line {number} starts the next frame)"
                    pending, number = atom, number - 1
                    break
                chunk.append(atom)
            yield start, chunk, problem
            if problem is not None and pending is None:
                return


def parse_extxyz_chunk(lines: list[str], problem: str | None) -> Any:
    """ASE ``Atoms`` of one frame's lines; ``ValueError`` with ``problem`` (from :func:`extxyz_chunks`) or the
    parser's complaint."""
    import ase.io
    from ase.io.extxyz import XYZError

    if problem is not None:
        raise ValueError(problem)
    try:
        return ase.io.read(io.StringIO("".join(lines)), index=0, format="extxyz")
    except (XYZError, ValueError, IndexError, KeyError, TypeError) as err:
        raise ValueError(f"cannot parse the frame: {type(err).__name__}: {err}") from None


def read_ase_db(path: Path, options: dict) -> Iterator[tuple[str, Any]]:
    import ase.db

    name = short_name(path)
    db = ase.db.connect(path, create_indices=False)  # existence was checked: connect would create the file
    for row in db.select():
        atoms = row_atoms(row)
        yield f"row {row.id}", (lambda a=atoms, i=row.id: _atoms_frame(a, f"{name}:{i}", options))


def row_atoms(row: Any) -> Any:
    """ASE ``Atoms`` of an ``ase.db`` row, its key-value pairs and data in ``atoms.info``."""
    atoms = row.toatoms()
    atoms.info.update(row.key_value_pairs)
    atoms.info.update(getattr(row, "data", {}) or {})
    return atoms


# Keys of the corrected total energy in the two public MPtrj extxyz conversions (Yuan 2023, matbench 2024).
_CORRECTED_KEYS = ("corrected_total_energy", "mp2020_corrected_energy")


def _atoms_frame(atoms: Any, default_id: str, options: dict) -> Frame:
    info = atoms.info
    if {"task_id", "calc_id", "ionic_step"} <= info.keys():  # MPtrj extxyz: rebuild the MPtrj frame id
        default_id = f"{info['task_id']}-{info['calc_id']}-{info['ionic_step']}"
    group_key = options["group_key"]
    if group_key is None and not {"group", "config_type"} & info.keys():
        group_key = next((k for k in ("mp_id", "material_id") if k in info), None)
    energy_key = options["energy_key"]
    if options["energy"] == "corrected":
        energy_key = next((k for k in _CORRECTED_KEYS if k in info), None)
        if energy_key is None:
            raise ValueError(f"energy='corrected' needs one of {_CORRECTED_KEYS} in the frame's info")
    return Frame.from_atoms(atoms, energy_key=energy_key, forces_key=options["forces_key"],
                            stress_key=options["stress_key"], group_key=group_key, id=default_id)
