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

Everything comes out in Å, eV, eV/Å and eV/Å³ with ASE's stress sign (positive = tensile). The parsers live
in :mod:`.pymatgen_json` (the two JSON formats) and :mod:`.ase_formats` (extxyz, ase-db); this module detects
the format and turns a malformed frame into an error or a skip.
"""


from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from .ase_formats import extxyz_chunks, parse_extxyz_chunk, read_ase_db, read_extxyz, row_atoms
from .frames import Frame
from .pymatgen_json import read_mlearn_json, read_mptrj_json
from .source import open_source

logger = logging.getLogger("geodite_jax.data")

#: Names of the data file formats :func:`read_frames` reads.
FILE_FORMATS = ("mptrj-json", "mlearn-json", "extxyz", "ase-db")


def detect_format(path: str | Path) -> str:
    """Format name from the extension (``.extxyz``/``.xyz``, ``.db``, ``.json[.gz]``: ``{`` MPtrj, ``[`` mlearn)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".extxyz", ".xyz", ".extxyz.gz", ".xyz.gz")):
        return "extxyz"
    if name.endswith(".db"):
        return "ase-db"
    if name.endswith((".json", ".json.gz")):
        with open_source(path) as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"{"):
            return "mptrj-json"
        if head.startswith(b"["):
            return "mlearn-json"
        raise ValueError(f"{path}: JSON that is neither an MPtrj object ({{...}}) nor an mlearn list ([...])")
    raise ValueError(f"{path}: cannot detect the format from the name; pass format= one of {FILE_FORMATS}")


def read_frames(path: str | Path, format: str | None = None, *, energy_key: str = "energy",  # noqa: A002
                forces_key: str = "forces", stress_key: str = "stress", energy: str = "uncorrected",
                group_key: str | None = None, on_error: str = "raise") -> Iterator[Frame]:
    """Stream the frames of ``path`` (see the module docstring for the formats).

    Args:
        format: one of :data:`FILE_FORMATS`, or None to detect it.
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
    readers = {"mptrj-json": read_mptrj_json, "mlearn-json": read_mlearn_json, "extxyz": read_extxyz,
               "ase-db": read_ase_db}
    if format not in readers:
        raise ValueError(f"unknown format {format!r}; known formats: {FILE_FORMATS}")
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


def describe_label_keys(path: str | Path, format: str | None = None) -> str:  # noqa: A002
    """The label-like keys of the first frame of an extxyz / ASE-db file, for error messages
    (``"info: REF_energy, config_type; per-atom arrays: REF_forces; calculator: (none)"``); "" otherwise."""
    path = Path(path)
    try:
        format = format or detect_format(path)  # noqa: A001
        if format == "extxyz":
            first = next(iter(extxyz_chunks(path)), None)
            if first is None or first[2] is not None:
                return ""
            atoms = parse_extxyz_chunk(first[1], None)
        elif format == "ase-db":
            import ase.db

            row = next(iter(ase.db.connect(path, create_indices=False).select(limit=1)), None)
            if row is None:
                return ""
            atoms = row_atoms(row)
        else:
            return ""
    except Exception:  # noqa: BLE001 - only a hint for an error message
        return ""
    results = sorted(atoms.calc.results) if atoms.calc is not None and hasattr(atoms.calc, "results") else []
    arrays = sorted(k for k in atoms.arrays if k not in ("numbers", "positions"))
    return (f"info: {', '.join(sorted(atoms.info)) or '(none)'}; per-atom arrays: {', '.join(arrays) or '(none)'}; "
            f"calculator results: {', '.join(results) or '(none)'}")
