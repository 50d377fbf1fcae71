"""Energies and hulls of the protocol: MP elemental reference entries, formation energies, MP2020-corrected
energies (MP's VASP parameters where a structure carries none) and hull distances (eV/atom)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from ase import Atoms

from .. import read_reference_json

#: WBM summary columns used by the protocol's fixed-hull formula (§2.1 step 4).
E_FORM_DFT_KEY = "e_form_per_atom_mp2020_corrected"
E_HULL_DFT_KEY = "e_above_hull_mp2020_corrected_ppd_mp"
ELEMENTAL_REFS_FILE = ("matbench-discovery", "2023-02-07-mp-elemental-reference-entries.json.gz")


def load_reference_entries(path: str | os.PathLike | None = None) -> list[Any]:
    """MP elemental reference ``ComputedEntry`` list (default: the copied matbench-discovery file).

    Accepts a (gzipped) JSON dict or list of pymatgen entry dicts, so any competing phases can be given.
    """
    from pymatgen.entries.computed_entries import ComputedEntry, ComputedStructureEntry

    path, data = read_reference_json(path, ELEMENTAL_REFS_FILE, "reference entries file")
    items = list(data.values()) if isinstance(data, dict) else list(data)
    if not items or not all(isinstance(d, dict) and "energy" in d for d in items):
        raise ValueError(f"{path} does not hold pymatgen ComputedEntry dicts")
    return [(ComputedStructureEntry if "structure" in d else ComputedEntry).from_dict(d) for d in items]


def elemental_reference_energies(entries: Iterable[Any]) -> dict[str, float]:
    """``{symbol: energy_per_atom}`` of the lowest-energy single-element entry of each element (eV/atom)."""
    refs: dict[str, float] = {}
    for e in entries:
        if len(e.composition.elements) == 1:
            sym = e.composition.elements[0].symbol
            refs[sym] = min(refs.get(sym, math.inf), float(e.energy_per_atom))
    return refs


def formation_energy_per_atom(energy: float, counts: dict[str, float], refs: dict[str, float]) -> float:
    """``(E − Σ_el n_el μ_el) / N`` in eV/atom for a total energy (eV) and element counts ``{symbol: n}``."""
    missing = sorted(set(counts) - set(refs))
    if missing:
        raise KeyError(f"no elemental reference energy for {', '.join(missing)}")
    n = sum(counts.values())
    return (energy - sum(c * refs[el] for el, c in counts.items())) / n


def mp_parameters(symbols: Iterable[str]) -> dict[str, Any]:
    """MP-style VASP parameters for an entry of these elements (GGA, or GGA+U for oxides/fluorides of U metals).

    Used where no WBM ``ComputedStructureEntry`` exists: MP's U values and POTCARs (``MPRelaxSet``), so
    MP2020 applies the same anion and GGA/GGA+U mixing corrections that MP itself would.
    """
    from pymatgen.io.vasp.sets import MPRelaxSet

    cfg = MPRelaxSet.CONFIG
    els = sorted(set(symbols))
    anion = "O" if "O" in els else "F" if "F" in els else None
    hubbards = {el: float(cfg["INCAR"]["LDAUU"][anion].get(el, 0.0)) for el in els} if anion else {}
    is_u = any(u > 0 for u in hubbards.values())
    missing = [el for el in els if el not in cfg["POTCAR"]]
    if missing:
        raise ValueError(f"no MP POTCAR for {', '.join(missing)}: MP2020 corrections are undefined")
    return {"run_type": "GGA+U" if is_u else "GGA", "is_hubbard": is_u, "hubbards": hubbards if is_u else {},
            "potcar_spec": [{"titel": f"PAW_PBE {cfg['POTCAR'][el]}", "hash": None} for el in els]}


def mp2020_corrected_energy(energy: float, atoms: Atoms, parameters: dict[str, Any] | None = None) -> float:
    """Raw total energy (eV) -> MP2020-corrected total energy (eV) via ``process_entry(entry, clean=True)``.

    ``parameters`` are the entry's VASP parameters (WBM's when available, else :func:`mp_parameters`).
    Raises ``ValueError`` when the compatibility scheme rejects the entry.
    """
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility
    from pymatgen.entries.computed_entries import ComputedStructureEntry
    from pymatgen.io.ase import AseAtomsAdaptor

    structure = AseAtomsAdaptor.get_structure(atoms)
    params = parameters or mp_parameters(atoms.get_chemical_symbols())
    entry = ComputedStructureEntry(structure, float(energy), parameters=params)
    processed = MaterialsProject2020Compatibility(check_potcar=False).process_entry(entry, clean=True)
    if processed is None:
        raise ValueError(f"MP2020 compatibility rejected the entry of {atoms.get_chemical_formula()}")
    return float(processed.energy)


def hull_distance(energy_corrected: float, atoms: Atoms, reference_entries: Sequence[Any]) -> float:
    """Signed distance to the convex hull of ``reference_entries`` (eV/atom; < 0 below the hull).

    The hull is pymatgen's ``PhaseDiagram`` of the references restricted to the structure's elements.
    """
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    comp = Composition(atoms.get_chemical_formula())
    chemsys = {el.symbol for el in comp.elements}
    entries = [e for e in reference_entries if {el.symbol for el in e.composition.elements} <= chemsys]
    missing = chemsys - {e.composition.elements[0].symbol for e in entries if len(e.composition.elements) == 1}
    if missing:
        raise KeyError(f"no elemental reference entry for {', '.join(sorted(missing))}")
    pd = PhaseDiagram(entries)
    _, e_hull = pd.get_decomp_and_e_above_hull(PDEntry(comp, float(energy_corrected)), allow_negative=True,
                                               check_stable=False)
    return float(e_hull)
