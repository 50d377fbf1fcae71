"""The relax-and-predict driver: structures read with their ids, relaxed with any ASE calculator (FIRE on
``FrechetCellFilter``), their energies turned into hull distances, one JSON line per structure (resumable)."""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from .. import to_jsonable
from .hull import (
    E_FORM_DFT_KEY,
    E_HULL_DFT_KEY,
    elemental_reference_energies,
    formation_energy_per_atom,
    hull_distance,
    mp2020_corrected_energy,
)
from .metrics import predicted_hull_distance

#: ``RelaxationSettings`` of the protocol: FIRE on FrechetCellFilter.
DEFAULT_FMAX = 0.05  # eV/Å
DEFAULT_MAX_STEPS = 500
#: ``atoms.info`` keys read as a structure's id, in order of preference.
ID_KEYS = ("material_id", "mat_id", "wbm_id", "mp_id", "id", "name")


def structure_id(atoms: Atoms, fallback: str) -> str:
    """The first of :data:`ID_KEYS` present in ``atoms.info``, else ``fallback``."""
    for key in ID_KEYS:
        if key in atoms.info and str(atoms.info[key]):
            return str(atoms.info[key])
    return fallback


def read_structures(paths: Sequence[str | os.PathLike]) -> list[tuple[str, Atoms]]:
    """``[(id, atoms)]`` from ASE-readable files (all frames), ids from ``atoms.info`` or ``<stem>-<index>``."""
    import ase.io

    out: list[tuple[str, Atoms]] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"structure file {path} not found")
        try:
            frames = ase.io.read(path, index=":")
        except Exception as err:  # ASE raises many types for unreadable files
            raise ValueError(f"cannot read structures from {path}: {err}") from err
        out += [(structure_id(a, f"{path.stem}-{i}"), a) for i, a in enumerate(frames)]
    ids = [i for i, _ in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"duplicate structure ids: {', '.join(dupes[:5])}; ids must be unique to resume")
    return out


def _reference_energy(atoms: Atoms) -> float | None:
    """A DFT reference total energy (eV) carried by the structure: ``info['dft_energy']`` or a stored calc."""
    if "dft_energy" in atoms.info:
        return float(atoms.info["dft_energy"])
    if atoms.calc is not None and "energy" in getattr(atoms.calc, "results", {}):
        return float(atoms.calc.results["energy"])
    return None


def relax(atoms: Atoms, calc: Any, fmax: float = DEFAULT_FMAX, max_steps: int = DEFAULT_MAX_STEPS,
          cell_filter: bool = True) -> tuple[Atoms, dict[str, Any]]:
    """FIRE on ``FrechetCellFilter`` (positions and cell) to ``fmax`` (eV/Å); returns a relaxed copy and info.

    ``info = {"converged", "steps", "energy" (eV, raw), "max_force" (eV/Å)}``.
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    atoms = atoms.copy()
    atoms.calc = calc
    target = FrechetCellFilter(atoms) if cell_filter and atoms.pbc.all() else atoms
    opt = FIRE(target, logfile=None)
    converged = bool(opt.run(fmax=fmax, steps=max_steps))
    energy = float(atoms.get_potential_energy())
    max_force = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    return atoms, {"converged": converged, "steps": int(opt.nsteps), "energy": energy, "max_force": max_force}


def _done_ids(path: Path) -> set[str]:
    """Ids already written to a JSON-lines file (a truncated last line from a crash is ignored)."""
    done: set[str] = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                done.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError):
                continue
    return done


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a JSON-lines file."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def predict_record(sid: str, atoms: Atoms, calc: Any, reference_entries: Sequence[Any] | None,
                   fmax: float = DEFAULT_FMAX, max_steps: int = DEFAULT_MAX_STEPS,
                   apply_mp2020: bool = True) -> dict[str, Any]:
    """Relax one structure and derive its energies; never raises (errors go to the ``failure`` column).

    Record keys: ``id, formula, n_atoms, converged, steps, energy (raw eV), energy_per_atom, e_corrected,
    e_form_per_atom, e_hull_pred, e_hull_true, failure, wall_s`` and the relaxed ``cell``/``positions``/
    ``numbers``. ``e_hull_pred`` uses the protocol's fixed-hull formula when the structure carries the WBM
    columns, else the hull of ``reference_entries``; ``e_hull_true`` comes from the WBM column or from a
    DFT energy carried by the structure (``info['dft_energy']`` or an attached single-point calculator).
    """
    t0 = time.perf_counter()
    record: dict[str, Any] = {"id": sid, "formula": atoms.get_chemical_formula(), "n_atoms": len(atoms),
                              "converged": False, "steps": 0, "energy": None, "failure": None}
    info = dict(atoms.info)
    dft_energy = _reference_energy(atoms)
    try:
        relaxed, rinfo = relax(atoms, calc, fmax, max_steps)
        record.update(rinfo)
        record["energy_per_atom"] = rinfo["energy"] / len(atoms)
        record.update(cell=relaxed.cell.array.tolist(), positions=relaxed.positions.tolist(),
                      numbers=relaxed.numbers.tolist())
        if not math.isfinite(rinfo["energy"]):
            raise ValueError("non-finite energy")
        if not rinfo["converged"]:
            record["failure"] = f"not converged in {max_steps} steps (max force {rinfo['max_force']:.3g} eV/Å)"
        params = info.get("parameters") if isinstance(info.get("parameters"), dict) else None

        def correct(e: float, at: Atoms) -> float:
            return mp2020_corrected_energy(e, at, params) if apply_mp2020 else e

        record["e_corrected"] = correct(rinfo["energy"], relaxed)
        if reference_entries is not None:
            refs = elemental_reference_energies(reference_entries)
            counts: dict[str, float] = {}
            for s in relaxed.get_chemical_symbols():
                counts[s] = counts.get(s, 0) + 1
            record["e_form_per_atom"] = formation_energy_per_atom(record["e_corrected"], counts, refs)
            if E_FORM_DFT_KEY in info and E_HULL_DFT_KEY in info:
                record["e_hull_pred"] = float(predicted_hull_distance(
                    record["e_form_per_atom"], float(info[E_FORM_DFT_KEY]), float(info[E_HULL_DFT_KEY])))
            else:
                record["e_hull_pred"] = hull_distance(record["e_corrected"], relaxed, reference_entries)
            if E_HULL_DFT_KEY in info:
                record["e_hull_true"] = float(info[E_HULL_DFT_KEY])
            elif dft_energy is not None:
                record["e_hull_true"] = hull_distance(correct(dft_energy, atoms), atoms, reference_entries)
    except Exception as err:  # noqa: BLE001 - one bad structure must not stop a 257k-structure run
        record["failure"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc(limit=3)
    record["wall_s"] = time.perf_counter() - t0
    return record


def relax_and_predict(structures: Sequence[tuple[str, Atoms]], calc: Any, out_path: str | os.PathLike,
                      reference_entries: Sequence[Any] | None = None, fmax: float = DEFAULT_FMAX,
                      max_steps: int = DEFAULT_MAX_STEPS, apply_mp2020: bool = True,
                      progress: bool = True) -> list[dict[str, Any]]:
    """Relax-then-predict every ``(id, atoms)`` and append one JSON line per structure to ``out_path``.

    Resumable: ids already in ``out_path`` are skipped, so an interrupted run continues where it stopped.
    Returns all records in the file (old and new).
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        text = out.read_text()
        if text and not text.endswith("\n"):  # a run killed mid-write: drop the partial line
            out.write_text(text[: text.rfind("\n") + 1])
    done = _done_ids(out)
    todo = [(i, a) for i, a in structures if i not in done]
    iterator: Iterable[tuple[str, Atoms]] = todo
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(todo, desc="relax", unit="struct", initial=len(structures) - len(todo),
                        total=len(structures))
    with out.open("a") as f:
        for sid, atoms in iterator:
            f.write(json.dumps(to_jsonable(predict_record(sid, atoms, calc, reference_entries, fmax, max_steps,
                                                          apply_mp2020))) + "\n")
            f.flush()
    return read_jsonl(out)
