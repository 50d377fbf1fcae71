"""Readers of labelled structure files into :class:`Frame` streams, with unit and sign normalisation.

Formats (``read_frames(path, format=...)``; detected from the extension and, for JSON, the first character):

* ``"mptrj-json"``: the official ``MPtrj_2022.9_full.json`` (``{mp_id: {frame_id: {structure, force, stress,
  uncorrected_total_energy, corrected_total_energy, magmom, ...}}}``), streamed with ijson one material at a
  time so that the 11 GB file never sits in memory. Stress is kBar in VASP sign and is converted.
* ``"mlearn-json"``: the mlearn sets (Zuo et al. 2020): a list of ``{structure, outputs: {energy, forces,
  virial_stress [xx, yy, zz, xy, yz, xz] kBar VASP sign}, group, ...}``, streamed likewise.
* ``"extxyz"``: ASE extended XYZ with configurable keys; stress must already be eV/Å³ in ASE sign (as in the
  MACE/Yuan MPtrj conversion, whose ``task_id``/``calc_id``/``ionic_step`` give the MPtrj frame id).
* ``"ase-db"``: an ``ase.db`` database (SQLite/JSON).

Everything comes out in Å, eV, eV/Å and eV/Å³ with ASE's stress sign (positive = tensile).
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from ase import units
from ase.data import atomic_numbers

from .frames import Frame

logger = logging.getLogger("geodite_jax.data")

FORMATS = ("mptrj-json", "mlearn-json", "extxyz", "ase-db")

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


def detect_format(path: str | Path) -> str:
    """Format name from the extension (``.extxyz``/``.xyz``, ``.db``, ``.json[.gz]``: ``{`` MPtrj, ``[`` mlearn)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".extxyz", ".xyz", ".extxyz.gz", ".xyz.gz")):
        return "extxyz"
    if name.endswith(".db"):
        return "ase-db"
    if name.endswith((".json", ".json.gz")):
        with _open(path) as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"{"):
            return "mptrj-json"
        if head.startswith(b"["):
            return "mlearn-json"
        raise ValueError(f"{path}: JSON that is neither an MPtrj object ({{...}}) nor an mlearn list ([...])")
    raise ValueError(f"{path}: cannot detect the format from the name; pass format= one of {FORMATS}")


def read_frames(path: str | Path, format: str | None = None, *, energy_key: str = "energy",  # noqa: A002
                forces_key: str = "forces", stress_key: str = "stress", energy: str = "uncorrected",
                group_key: str | None = None, on_error: str = "raise") -> Iterator[Frame]:
    """Stream the frames of ``path`` (see the module docstring for the formats).

    Args:
        format: one of :data:`FORMATS`, or None to detect it.
        energy_key, forces_key, stress_key: label keys of extxyz / ase-db files.
        energy: ``"uncorrected"`` (raw DFT total energy, the default label of MACE-MP/Nequix/SevenNet) or
            ``"corrected"`` (MP2020-corrected total energy, CHGNet's convention; MPtrj only).
        group_key: extxyz/ase-db info key of the configuration group (default: ``group``, ``config_type``,
            else the MPtrj ``mp_id``).
        on_error: ``"raise"``: a malformed frame raises ``ValueError`` naming the file, the frame and the
            problem; ``"skip"``: log a warning and continue. Unparseable file syntax always raises.

    Yields:
        :class:`Frame` objects in file order, each with a stable ``id``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such data file: {path}")
    if energy not in ("uncorrected", "corrected"):
        raise ValueError(f"energy must be 'uncorrected' or 'corrected', got {energy!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    format = format or detect_format(path)  # noqa: A001
    readers = {"mptrj-json": _read_mptrj_json, "mlearn-json": _read_mlearn_json, "extxyz": _read_extxyz,
               "ase-db": _read_ase_db}
    if format not in readers:
        raise ValueError(f"unknown format {format!r}; known formats: {FORMATS}")
    options = {"energy_key": energy_key, "forces_key": forces_key, "stress_key": stress_key, "energy": energy,
               "group_key": group_key}
    for key, make in readers[format](path, options):
        try:
            yield make()
        except (ValueError, KeyError, TypeError, IndexError) as err:
            detail = f"missing key {err}" if isinstance(err, KeyError) else str(err)
            message = f"{path}: frame {key}: {detail}"
            if on_error == "raise":
                raise ValueError(message) from err
            logger.warning("skipping malformed frame: %s", message)


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _short_name(path: Path) -> str:
    """``parent/name``: the file part of frame ids (``Si/test.json:12``)."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _json_stream(path: Path, items: Iterator[Any]) -> Iterator[Any]:
    """Re-raise ijson syntax errors (e.g. a truncated file) as ValueError naming the file."""
    import ijson

    try:
        yield from items
    except ijson.JSONError as err:
        raise ValueError(f"{path}: invalid or truncated JSON: {err}") from err


def _read_mptrj_json(path: Path, options: dict) -> Iterator[tuple[str, Any]]:
    import ijson

    energy_field = f"{options['energy']}_total_energy"
    with _open(path) as f:
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


def _read_mlearn_json(path: Path, options: dict) -> Iterator[tuple[str, Any]]:
    import ijson

    if options["energy"] == "corrected":
        raise ValueError(f"{path}: mlearn data have no corrected energies; use energy='uncorrected'")
    name = _short_name(path)
    with _open(path) as f:
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


def _read_extxyz(path: Path, options: dict) -> Iterator[tuple[str, Any]]:
    """Frame ``k`` of the file is parsed on its own (from its own lines), so that a broken frame (truncated,
    bad line) is reported as frame ``k`` of the file and, with ``on_error="skip"``, skipped."""
    name = _short_name(path)
    for k, (start, lines, problem) in enumerate(_extxyz_chunks(path)):
        yield f"{k} (line {start})", (lambda c=lines, p=problem, i=k: _atoms_frame(_parse_extxyz_chunk(c, p),
                                                                                 f"{name}:{i}", options))


def _is_count_line(line: str) -> bool:
    parts = line.split()
    return len(parts) == 1 and parts[0].isdigit()


def _extxyz_chunks(path: Path) -> Iterator[tuple[int, list[str], str | None]]:
    """``(first line number, lines, problem)`` per frame of an (ext)xyz file; ``problem`` says why a frame is
    broken (None if it looks whole). A frame with fewer atom lines than its count line says (a truncated
    file, or a cut frame followed by the next frame's count line) ends where the atom lines end; reading
    goes on from the next count line."""
    with _open(path) as raw:
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


def _parse_extxyz_chunk(lines: list[str], problem: str | None) -> Any:
    import io

    import ase.io
    from ase.io.extxyz import XYZError

    if problem is not None:
        raise ValueError(problem)
    try:
        return ase.io.read(io.StringIO("".join(lines)), index=0, format="extxyz")
    except (XYZError, ValueError, IndexError, KeyError, TypeError) as err:
        raise ValueError(f"cannot parse the frame: {type(err).__name__}: {err}") from None


def _read_ase_db(path: Path, options: dict) -> Iterator[tuple[str, Any]]:
    import ase.db

    name = _short_name(path)
    db = ase.db.connect(path, create_indices=False)  # existence was checked: connect would create the file
    for row in db.select():
        atoms = row.toatoms()
        atoms.info.update(row.key_value_pairs)
        atoms.info.update(getattr(row, "data", {}) or {})
        yield f"row {row.id}", (lambda a=atoms, i=row.id: _atoms_frame(a, f"{name}:{i}", options))


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


def describe_label_keys(path: str | Path, format: str | None = None) -> str:  # noqa: A002
    """The label-like keys of the first frame of an extxyz / ASE-db file, for error messages
    (``"info: REF_energy, config_type; per-atom arrays: REF_forces; calculator: (none)"``); "" otherwise."""
    path = Path(path)
    try:
        format = format or detect_format(path)  # noqa: A001
        if format == "extxyz":
            first = next(iter(_extxyz_chunks(path)), None)
            if first is None or first[2] is not None:
                return ""
            atoms = _parse_extxyz_chunk(first[1], None)
        elif format == "ase-db":
            import ase.db

            row = next(iter(ase.db.connect(path, create_indices=False).select(limit=1)), None)
            if row is None:
                return ""
            atoms = row.toatoms()
            atoms.info.update(row.key_value_pairs)
            atoms.info.update(getattr(row, "data", {}) or {})
        else:
            return ""
    except Exception:  # noqa: BLE001 - only a hint for an error message
        return ""
    results = sorted(atoms.calc.results) if atoms.calc is not None and hasattr(atoms.calc, "results") else []
    arrays = sorted(k for k in atoms.arrays if k not in ("numbers", "positions"))
    return (f"info: {', '.join(sorted(atoms.info)) or '(none)'}; per-atom arrays: {', '.join(arrays) or '(none)'}; "
            f"calculator results: {', '.join(results) or '(none)'}")


def split_indices(n: int, fractions: Sequence[float], seed: int = 0,
                  groups: Sequence[str] | None = None) -> list[np.ndarray]:
    """Random split of ``range(n)`` into ``len(fractions)`` sorted index arrays of those sizes.

    With ``groups`` (``[n]`` labels, e.g. MPtrj mp-ids), whole groups go to one split so that frames of one
    material never land in both training and test sets; sizes are then approximate.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or fractions.size == 0 or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions.tolist()}")
    rng = np.random.default_rng(seed)
    bounds = np.cumsum(fractions) * n
    if groups is None:
        order = rng.permutation(n)
        cuts = np.round(bounds).astype(np.int64)
        cuts[-1] = n
        return [np.sort(part) for part in np.split(order, cuts[:-1])]
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} items")
    names, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    sizes = np.bincount(codes, minlength=len(names))
    perm = rng.permutation(len(names))
    ends = np.cumsum(sizes[perm])
    middles = ends - sizes[perm] / 2.0  # a group goes to the split its middle falls into
    split_of_group = np.empty(len(names), np.int64)
    split_of_group[perm] = np.minimum(np.searchsorted(bounds, middles, side="right"), len(fractions) - 1)
    assignment = split_of_group[codes]
    return [np.flatnonzero(assignment == k) for k in range(len(fractions))]


def split_frames(frames: Iterable[Frame], fractions: Sequence[float], seed: int = 0, *,
                 by_group: bool = False) -> list[list[Frame]]:
    """Split frames at random into lists of the given fractions (whole groups together if ``by_group``)."""
    frames = list(frames)
    parts = split_indices(len(frames), fractions, seed, [f.group for f in frames] if by_group else None)
    return [[frames[i] for i in part] for part in parts]
