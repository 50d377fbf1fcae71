"""Trajectory frames: reading VASP XDATCARs, cell geometry (perpendicular widths, the RDF range) and the
periodic pair search the analyses share. Positions in Å, cells as ASE row vectors ``[3, 3]``."""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms


def read_xdatcar(path: str | os.PathLike, index: int | slice | str = ":") -> list[Atoms] | Atoms:
    """Frames of a VASP XDATCAR, plain or gzipped (``.gz``), via ASE's ``vasp-xdatcar`` reader.

    Returns a list of ASE ``Atoms`` (positions wrapped as written by VASP, fully periodic), or one ``Atoms``
    for an integer ``index`` (as ``ase.io.read``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable XDATCAR or holds no frames.
    """
    from ase.io import read

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"XDATCAR not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the suffix
        raw = gzip.decompress(raw)
    try:
        frames = read(io.StringIO(raw.decode()), index=index, format="vasp-xdatcar")
    except Exception as err:  # ASE raises many types on malformed input
        raise ValueError(f"cannot read {path} as a VASP XDATCAR: {type(err).__name__}: {err}") from None
    if isinstance(frames, list) and not frames:
        raise ValueError(f"{path} holds no frames")
    return frames


def perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of a cell ``[3, 3]`` (rows = vectors) -> ``[3]`` Å."""
    cell = np.asarray(cell, np.float64)
    volume = abs(np.linalg.det(cell))
    if not volume > 0:
        raise ValueError("the cell has zero volume")
    return np.array([volume / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)])


def default_r_max(cell: np.ndarray) -> float:
    """Half the shortest perpendicular width of ``cell [3, 3]``: the protocol's RDF range."""
    return 0.5 * float(perpendicular_widths(cell).min())


def check_frames(frames: Sequence[Atoms]) -> None:
    """``ValueError`` unless ``frames`` is a non-empty, fully periodic trajectory of the same atoms."""
    if len(frames) == 0:
        raise ValueError("no frames given")
    n = len(frames[0])
    for k, atoms in enumerate(frames):
        if len(atoms) != n or not np.array_equal(atoms.numbers, frames[0].numbers):
            raise ValueError(f"frame {k} has different atoms from frame 0 (a trajectory keeps its atoms)")
        if not all(atoms.pbc):
            raise ValueError(f"frame {k} is not fully periodic (pbc={atoms.pbc.tolist()}); RDFs here need a cell")


def pairs_within(positions: np.ndarray, cell: np.ndarray, cutoff: float, pbc: bool = True
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half list of pairs within ``cutoff`` (all periodic images): ``i [P]``, ``j [P]``, ``d [P]`` Å."""
    import vesin

    nl = vesin.NeighborList(cutoff=float(cutoff), full_list=False)
    box = np.asarray(cell, np.float64) if pbc else np.zeros((3, 3))
    i, j, d = nl.compute(np.asarray(positions, np.float64), box, bool(pbc), quantities="ijd")
    return np.asarray(i, np.int64), np.asarray(j, np.int64), np.asarray(d, np.float64)
