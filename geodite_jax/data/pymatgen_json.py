"""The JSON data sets in pymatgen's conventions: the official MPtrj JSON (``{mp_id: {frame_id: record}}``) and
the mlearn lists, streamed with ijson one record at a time; pymatgen ``Structure`` dicts parsed without pymatgen,
VASP kBar stresses converted to eV/Å³ in ASE's sign."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import units
from ase.data import atomic_numbers

from .frames import Frame
from .source import open_source, short_name

#: kBar -> eV/Å³ and VASP sign (positive = compressive) -> ASE sign (positive = tensile).
KBAR_TO_ASE = -0.1 * units.GPa


def kbar_to_ase_stress(kbar: np.ndarray | Sequence) -> np.ndarray:
    """VASP/pymatgen stress in kBar (positive = compressive) -> eV/Å³ in ASE sign (positive = tensile).

    The only place where this conversion happens (MPtrj JSON and mlearn both use it). Same shape as the input.
    """
    return KBAR_TO_ASE * np.asarray(kbar, dtype=np.float64)


def mlearn_voigt_to_3x3(voigt: Sequence[float]) -> np.ndarray:
    """mlearn's 6-vector ``[xx, yy, zz, xy, yz, xz]`` (note: not ASE's Voigt order) -> symmetric ``[3, 3]``."""
    v = np.asarray(voigt, dtype=np.float64)
    if v.shape != (6,):
        raise ValueError(f"virial_stress must have 6 components [xx, yy, zz, xy, yz, xz], got shape {list(v.shape)}")
    xx, yy, zz, xy, yz, xz = v
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def structure_from_pymatgen(d: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A pymatgen ``Structure.as_dict()`` -> ``(numbers [n], positions [n, 3] Å, cell [3, 3] Å, pbc [3])``.

    Parsed directly (no pymatgen import): ``lattice.matrix``, ``sites[].xyz`` (or ``abc`` @ matrix),
    ``sites[].species[0].element``. Disordered sites (several species or occupancy < 1) are rejected.
    """
    if not isinstance(d, dict) or "lattice" not in d or "sites" not in d:
        raise ValueError("structure is not a pymatgen Structure dict (needs 'lattice' and 'sites')")
    cell = np.asarray(d["lattice"]["matrix"], dtype=np.float64)
    if cell.shape != (3, 3):
        raise ValueError(f"lattice.matrix must be 3x3, got shape {list(cell.shape)}")
    pbc = np.asarray(d["lattice"].get("pbc", (True, True, True)), dtype=bool)
    numbers, positions = [], []
    for k, site in enumerate(d["sites"]):
        species = site.get("species") or []
        if len(species) != 1 or abs(float(species[0].get("occu", 1.0)) - 1.0) > 1e-6:
            raise ValueError(f"site {k} is disordered ({species}); only ordered structures are supported")
        symbol = str(species[0].get("element", ""))
        z = atomic_numbers.get(symbol, 0)
        if z < 1:
            raise ValueError(f"site {k}: unknown element symbol {symbol!r}")
        numbers.append(z)
        if "xyz" in site:
            positions.append(site["xyz"])
        elif "abc" in site:
            positions.append(np.asarray(site["abc"], dtype=np.float64) @ cell)
        else:
            raise ValueError(f"site {k} has neither 'xyz' nor 'abc' coordinates")
    return (np.asarray(numbers, dtype=np.int64), np.asarray(positions, dtype=np.float64).reshape(-1, 3), cell,
            pbc)


def _json_stream(path: Path, items: Iterator[Any]) -> Iterator[Any]:
    """Re-raise ijson syntax errors (e.g. a truncated file) as ValueError naming the file."""
    import ijson

    try:
        yield from items
    except ijson.JSONError as err:
        raise ValueError(f"{path}: invalid or truncated JSON: {err}") from err


def read_mptrj_json(path: Path, options: dict) -> Iterator[tuple[str, Any]]:
    import ijson

    energy_field = f"{options['energy']}_total_energy"
    with open_source(path) as f:
        for mp_id, material in _json_stream(path, ijson.kvitems(f, "", use_float=True)):
            if not isinstance(material, dict):
                yield f"(material {mp_id!r})", _raiser(f"material {mp_id!r} is not an object of frames")
                continue
            for frame_id, record in material.items():
                yield repr(frame_id), (lambda r=record, i=frame_id, m=mp_id: _mptrj_frame(r, i, m, energy_field))


def _raiser(message: str) -> Any:
    def fail() -> Frame:
        raise ValueError(message)

    return fail


def _mptrj_frame(record: dict, frame_id: str, mp_id: str, energy_field: str) -> Frame:
    if not isinstance(record, dict):
        raise ValueError("the frame record is not an object")
    numbers, positions, cell, pbc = structure_from_pymatgen(record["structure"])
    stress = record.get("stress")
    info = {k: record[k] for k in ("uncorrected_total_energy", "corrected_total_energy", "bandgap", "mp_id")
            if record.get(k) is not None}
    if record.get("magmom") is not None:
        info["magmoms"] = np.asarray(record["magmom"], dtype=np.float64)
    energy = record[energy_field]
    if energy is None:
        raise ValueError(f"{energy_field} is null")
    return Frame(numbers, positions, cell, pbc, energy=energy, forces=record.get("force"),
                 stress=None if stress is None else kbar_to_ase_stress(stress), group=str(record.get("mp_id", mp_id)),
                 id=str(frame_id), info=info)


def read_mlearn_json(path: Path, options: dict) -> Iterator[tuple[str, Any]]:
    import ijson

    if options["energy"] == "corrected":
        raise ValueError(f"{path}: mlearn data have no corrected energies; use energy='uncorrected'")
    name = short_name(path)
    with open_source(path) as f:
        for k, record in enumerate(_json_stream(path, ijson.items(f, "item", use_float=True))):
            yield f"{k}", (lambda r=record, i=f"{name}:{k}": _mlearn_frame(r, i))


def _mlearn_frame(record: dict, frame_id: str) -> Frame:
    if not isinstance(record, dict):
        raise ValueError("the frame record is not an object")
    numbers, positions, cell, pbc = structure_from_pymatgen(record["structure"])
    outputs = record["outputs"]
    virial = outputs.get("virial_stress")
    stress = None if virial is None else kbar_to_ase_stress(mlearn_voigt_to_3x3(virial))
    info = {k: record[k] for k in ("tag", "description") if k in record}
    return Frame(numbers, positions, cell, pbc, energy=outputs["energy"], forces=outputs.get("forces"),
                 stress=stress, group=str(record.get("group", "")), id=frame_id, info=info)
