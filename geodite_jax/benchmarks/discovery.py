"""Matbench Discovery: classification/regression metrics, CPS, MP2020-corrected hull distances, relax driver.

Definitions follow ``data_and_benchmarks.md`` §2.1 (matbench-discovery ``metrics/discovery.py`` at commit
2c7f9fc): a material is stable when its hull distance is ≤ ``STABILITY_THRESHOLD`` = 0 eV/atom; a missing
(NaN) prediction counts as predicted *unstable*; MAE, RMSE and R² use the rows where both values exist.
Energies are total energies in eV, hull distances and formation energies in eV/atom.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from . import shared_file, to_jsonable

STABILITY_THRESHOLD = 0.0  # eV/atom
#: ``RelaxationSettings`` of the protocol: FIRE on FrechetCellFilter.
DEFAULT_FMAX = 0.05  # eV/Å
DEFAULT_MAX_STEPS = 500
#: CPS weights (matbench-discovery ``DEFAULT_CPS_CONFIG``) and the RMSD scale of its geometry term.
CPS_WEIGHTS = {"F1": 0.5, "kappa_SRME": 0.4, "RMSD": 0.1}
CPS_RMSD_SCALE = 0.15
#: ``atoms.info`` keys read as a structure's id, in order of preference.
ID_KEYS = ("material_id", "mat_id", "wbm_id", "mp_id", "id", "name")
#: WBM summary columns used by the protocol's fixed-hull formula (§2.1 step 4).
E_FORM_DFT_KEY = "e_form_per_atom_mp2020_corrected"
E_HULL_DFT_KEY = "e_above_hull_mp2020_corrected_ppd_mp"
ELEMENTAL_REFS_FILE = ("matbench-discovery", "2023-02-07-mp-elemental-reference-entries.json.gz")


# ----------------------------------------------------------------------------------------------- metrics
def r2_score(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """Coefficient of determination ``1 − Σ(y−ŷ)² / Σ(y−ȳ)²`` (sklearn's ``r2_score``), [n] -> float.

    NaN when fewer than two points or when ``y_true`` is constant (sklearn's degenerate cases differ; we
    refuse to invent a number).
    """
    y, p = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {y.shape} vs {p.shape}")
    ss_tot = float(np.sum((y - y.mean()) ** 2)) if y.size else 0.0
    if y.size < 2 or ss_tot == 0.0:
        return math.nan
    return 1.0 - float(np.sum((y - p) ** 2)) / ss_tot


def classify_stable(e_hull_true: Sequence[float], e_hull_pred: Sequence[float],
                    threshold: float = STABILITY_THRESHOLD) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks ``(TP, FN, FP, TN)`` [n] from true and predicted hull distances (eV/atom).

    Stable means ``e_hull ≤ threshold``; a NaN prediction is predicted unstable. A NaN true value is an
    error (the reference must be complete).
    """
    true, pred = np.asarray(e_hull_true, np.float64), np.asarray(e_hull_pred, np.float64)
    if true.shape != pred.shape or true.ndim != 1:
        raise ValueError(f"e_hull_true and e_hull_pred must be 1-d of equal length, got {true.shape} and {pred.shape}")
    if np.isnan(true).any():
        raise ValueError(f"e_hull_true contains {int(np.isnan(true).sum())} NaN values (reference must be complete)")
    actual = true <= threshold
    predicted = np.where(np.isnan(pred), False, pred <= threshold)
    return actual & predicted, actual & ~predicted, ~actual & predicted, ~actual & ~predicted


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def stable_metrics(e_hull_true: Sequence[float], e_hull_pred: Sequence[float],
                   threshold: float = STABILITY_THRESHOLD, prevalence: float | None = None) -> dict[str, float]:
    """Discovery metrics of predicted against true hull distances, [n], [n] -> dict.

    Keys: ``TP FN FP TN`` (counts), ``Precision Recall F1 Accuracy TPR FPR TNR FNR DAF`` and ``MAE RMSE R2``
    (eV/atom, over rows where the prediction is finite). ``DAF = Precision / prevalence``; ``prevalence``
    defaults to the stable fraction of ``e_hull_true`` (pass the unique-prototype prevalence for subsets).
    Undefined ratios (zero denominators) are NaN.
    """
    tp, fn, fp, tn = (int(m.sum()) for m in classify_stable(e_hull_true, e_hull_pred, threshold))
    n = tp + fn + fp + tn
    if n == 0:
        raise ValueError("stable_metrics needs at least one structure")
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall) if not math.isnan(precision + recall) else math.nan
    prevalence = _ratio(tp + fn, n) if prevalence is None else float(prevalence)
    true, pred = np.asarray(e_hull_true, np.float64), np.asarray(e_hull_pred, np.float64)
    ok = np.isfinite(pred)
    err = pred[ok] - true[ok]
    return {"TP": tp, "FN": fn, "FP": fp, "TN": tn, "Precision": precision, "Recall": recall, "F1": f1,
            "Accuracy": (tp + tn) / n, "TPR": recall, "FPR": _ratio(fp, fp + tn), "TNR": _ratio(tn, tn + fp),
            "FNR": _ratio(fn, fn + tp), "DAF": _ratio(precision, prevalence),
            "MAE": float(np.mean(np.abs(err))) if err.size else math.nan,
            "RMSE": float(np.sqrt(np.mean(err ** 2))) if err.size else math.nan,
            "R2": r2_score(true[ok], pred[ok]), "n": n, "n_missing": int((~ok).sum())}


def combined_performance_score(f1: float | None, kappa_srme: float | None, rmsd: float | None) -> float:
    """CPS = [0.5·F1 + 0.4·(1 − κ_SRME/2) + 0.1·clip(1 − RMSD/0.15, 0, 1)] / 1.0; NaN if any part is missing."""
    parts = (f1, kappa_srme, rmsd)
    if any(p is None or not math.isfinite(p) for p in parts):
        return math.nan
    scores = {"F1": float(f1), "kappa_SRME": 1.0 - float(kappa_srme) / 2.0,
              "RMSD": min(max(1.0 - float(rmsd) / CPS_RMSD_SCALE, 0.0), 1.0)}
    return sum(CPS_WEIGHTS[k] * v for k, v in scores.items()) / sum(CPS_WEIGHTS.values())


def predicted_hull_distance(e_form_pred: float | np.ndarray, e_form_dft: float | np.ndarray,
                            e_hull_dft: float | np.ndarray) -> float | np.ndarray:
    """Protocol step 4: ``Ê_hull = E_hull,DFT + e_form_pred − e_form_DFT`` on the fixed DFT hull (eV/atom)."""
    return np.asarray(e_hull_dft) + np.asarray(e_form_pred) - np.asarray(e_form_dft)


def structure_rmsd(relaxed: Atoms, reference: Atoms) -> float:
    """Normalised RMS displacement of pymatgen's ``StructureMatcher(stol=1.0, scale=False)``; 1.0 if unmatched."""
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.io.ase import AseAtomsAdaptor

    rms = StructureMatcher(stol=1.0, scale=False).get_rms_dist(
        AseAtomsAdaptor.get_structure(relaxed), AseAtomsAdaptor.get_structure(reference))
    return 1.0 if rms is None else float(rms[0])


# ----------------------------------------------------------------------------------- energies and hulls
def load_reference_entries(path: str | os.PathLike | None = None) -> list[Any]:
    """MP elemental reference ``ComputedEntry`` list (default: the copied matbench-discovery file).

    Accepts a (gzipped) JSON dict or list of pymatgen entry dicts, so any competing phases can be given.
    """
    from pymatgen.entries.computed_entries import ComputedEntry, ComputedStructureEntry

    path = Path(path) if path is not None else shared_file(*ELEMENTAL_REFS_FILE)
    if not path.exists():
        raise FileNotFoundError(f"reference entries file {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
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


# ------------------------------------------------------------------------------------- structure input
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


# -------------------------------------------------------------------------------------- relax driver
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


def summarize(records: Sequence[dict[str, Any]], prevalence: float | None = None) -> dict[str, Any]:
    """Metrics over records that carry ``e_hull_true``; failures keep their (possibly missing) prediction."""
    scored = [r for r in records if r.get("e_hull_true") is not None]
    summary: dict[str, Any] = {"n_structures": len(records), "n_scored": len(scored),
                               "n_failed": sum(r.get("failure") is not None for r in records),
                               "n_not_converged": sum(not r.get("converged", False) for r in records),
                               "mean_steps": float(np.mean([r.get("steps", 0) for r in records])) if records else 0.0}
    if scored:
        pred = [math.nan if r.get("e_hull_pred") is None else r["e_hull_pred"] for r in scored]
        summary.update(stable_metrics([r["e_hull_true"] for r in scored], pred, prevalence=prevalence))
    return summary


def iter_chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``size`` (for sharding a large set over processes)."""
    if size < 1:
        raise ValueError(f"chunk size must be ≥ 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]
