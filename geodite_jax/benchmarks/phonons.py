"""Phonons from any ASE calculator: force constants (phonopy), mesh frequencies, thermal properties, κ_SRME.

Harmonic part (phonopy, always available): finite displacements of a supercell, forces from the calculator,
``produce_force_constants``, frequencies on a q-mesh (THz), free energy (kJ/mol), entropy and heat capacity
(J/K/mol) per unit cell. Thermal conductivity (optional extra ``phono3py``) follows the κ_SRME protocol of
``data_and_benchmarks.md`` §2.2: symmetry-constrained relaxation, FC2 + FC3, Wigner transport (particle-like
RTA + coherences, "SMM19"), mode κ per (q, band), and the SRME/SRD metrics of ``metrics/phonons.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from . import read_reference_json, shared_file

KAPPA_DIR = "kappa-phononDB-PBE-103"
KAPPA_STRUCTURES = "phononDB-PBE-structures.extxyz"
KAPPA_REFERENCE = "kappas_phononDB_PBE_noNAC.json.gz"
SRME_FAILED = 2.0  # the metric's maximum, given to failed or unphysical predictions
#: Protocol settings (``KappaSettings``): symmetry precision, displacement (Å), relaxation, temperature (K).
KAPPA_SYMPREC = 1e-5
KAPPA_DISPLACEMENT = 0.01
KAPPA_FMAX = 1e-4
KAPPA_MAX_STEPS = 300
KAPPA_TEMPERATURE = 300.0
#: An acoustic Γ mode below this frequency (THz) counts as imaginary.
ACOUSTIC_TOLERANCE = 0.01


# ----------------------------------------------------------------------------------------------- metrics
def kappa_srd(kappa_pred: float, kappa_true: float) -> float:
    """Symmetric relative difference ``2 (κ_pred − κ_DFT) / (κ_pred + κ_DFT)``; −2 for a missing prediction."""
    if kappa_pred is None or not math.isfinite(kappa_pred):
        return -2.0
    den = kappa_pred + kappa_true
    return 2.0 * (kappa_pred - kappa_true) / den if den else 0.0


def kappa_srme(mode_kappa_pred: np.ndarray | None, mode_kappa_true: np.ndarray, weights: np.ndarray,
               kappa_pred: float | None, kappa_true: float) -> float:
    """Symmetric relative mean error of direction-averaged mode conductivities (W/mK).

    ``SRME = 2 Σ_{q,ν} |κ_pred,qν − κ_DFT,qν| / Σ_q w_q / (κ_pred + κ_DFT)``, with mode κ ``[n_q, n_bands]``
    on the reference's irreducible q-points (phono3py's mode κ already carries the q weights, so the
    sum divided by Σ w is a conductivity). Returns 2 (the maximum) for a missing or non-finite prediction.
    """
    if mode_kappa_pred is None or kappa_pred is None or not math.isfinite(kappa_pred):
        return SRME_FAILED
    pred, true = np.asarray(mode_kappa_pred, np.float64), np.asarray(mode_kappa_true, np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"mode κ shapes differ: predicted {pred.shape} vs reference {true.shape} "
                         "(the q-mesh must be the reference's to compare modes)")
    if not np.all(np.isfinite(pred)):
        return SRME_FAILED
    w = float(np.sum(weights))
    if w <= 0:
        raise ValueError("q-point weights must sum to a positive number")
    den = kappa_pred + kappa_true
    return 2.0 * float(np.sum(np.abs(pred - true))) / w / den if den else 0.0


def mode_kappa_total(mode_kappa_p: np.ndarray, mode_kappa_c: np.ndarray, heat_capacity: np.ndarray) -> np.ndarray:
    """Wigner mode conductivity per (q, band): particle part plus the coherence part shared between bands.

    ``mode_kappa_p [T, q, ν, 6]``, ``mode_kappa_c [T, q, ν, ν', 6]``, ``heat_capacity [T, q, ν]`` ->
    ``[T, q, ν, 6]``. The coherence term of a pair (ν, ν') is split in proportion to the modes' heat
    capacities, ``2 C_ν / (C_ν + C_ν')``, so that the sum over modes is unchanged; 0/0 pairs give 0.
    """
    cv = np.asarray(heat_capacity, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = 2.0 * cv[:, :, :, None] / (cv[:, :, :, None] + cv[:, :, None, :])
    share = np.nan_to_num(share, nan=0.0, posinf=0.0, neginf=0.0)
    coherent = np.einsum("tqab,tqabx->tqax", share, np.asarray(mode_kappa_c, np.float64))
    return np.asarray(mode_kappa_p, np.float64) + coherent


def direction_average(kappa: np.ndarray) -> np.ndarray:
    """Mean of the first three Voigt components (xx, yy, zz) of a ``[..., 6]`` conductivity."""
    return np.asarray(kappa)[..., :3].mean(axis=-1)


def has_imaginary_modes(frequencies: np.ndarray, qpoints: np.ndarray, n_acoustic: int = 3,
                        acoustic_tolerance: float = ACOUSTIC_TOLERANCE) -> bool:
    """Protocol check on mesh frequencies ``[n_q, n_bands]`` (THz, sorted per q) at ``qpoints [n_q, 3]``.

    Imaginary (negative) if any frequency < 0 at q ≠ Γ, an optical mode < 0 at Γ, or one of the three
    acoustic Γ modes < −``acoustic_tolerance``.
    """
    freqs, q = np.asarray(frequencies), np.asarray(qpoints)
    gamma = np.all(np.abs(q) < 1e-8, axis=1)
    if np.any(freqs[~gamma] < 0):
        return True
    at_gamma = freqs[gamma]
    return bool(np.any(at_gamma[:, n_acoustic:] < 0) or np.any(at_gamma[:, :n_acoustic] < -acoustic_tolerance))


# -------------------------------------------------------------------------------------------- harmonic
def _to_phonopy_atoms(atoms: Atoms) -> Any:
    from phonopy.structure.atoms import PhonopyAtoms

    return PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell.array,
                        scaled_positions=atoms.get_scaled_positions())


def supercell_forces(supercells: Sequence[Any], calc: Any, progress: bool = False) -> np.ndarray:
    """Forces (eV/Å) on each displaced phonopy supercell, ``[n_displacements, n_atoms, 3]``."""
    iterator: Any = supercells
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(supercells, desc="displacements", leave=False)
    forces = []
    for sc in iterator:
        atoms = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
        atoms.calc = calc
        forces.append(np.asarray(atoms.get_forces(), np.float64))
    return np.stack(forces)


def harmonic_phonons(atoms: Atoms, calc: Any, supercell_matrix: Any, primitive_matrix: Any = "auto",
                     distance: float = KAPPA_DISPLACEMENT, symprec: float = KAPPA_SYMPREC,
                     progress: bool = False) -> Any:
    """A ``phonopy.Phonopy`` with force constants from ``calc`` forces (finite displacements, ± where needed).

    Force constants are symmetrised (translational invariance), so acoustic Γ frequencies vanish.
    """
    from phonopy import Phonopy

    phonon = Phonopy(_to_phonopy_atoms(atoms), supercell_matrix=np.asarray(supercell_matrix),
                     primitive_matrix=primitive_matrix, symprec=symprec)
    phonon.generate_displacements(distance=distance, is_plusminus="auto")
    phonon.forces = supercell_forces(phonon.supercells_with_displacements, calc, progress)
    phonon.produce_force_constants()
    phonon.symmetrize_force_constants()
    return phonon


def phonon_properties(phonon: Any, mesh: Sequence[int] | float = (8, 8, 8),
                      temperatures: Sequence[float] = (300.0,)) -> dict[str, Any]:
    """Mesh frequencies and thermal properties of a phonopy object with force constants.

    Returns ``qpoints [n_q, 3]``, ``weights [n_q]``, ``frequencies [n_q, n_bands]`` (THz), ``max_frequency``
    (THz), ``imaginary`` (protocol check), and per temperature ``temperatures [n_T]`` (K), ``free_energy``
    (kJ/mol), ``entropy`` and ``heat_capacity`` (J/K/mol), per mole of primitive cells.
    """
    phonon.run_mesh(mesh, with_eigenvectors=False, is_gamma_center=True)
    m = phonon.get_mesh_dict()
    phonon.run_thermal_properties(temperatures=np.asarray(temperatures, np.float64))
    t = phonon.get_thermal_properties_dict()
    freqs = np.asarray(m["frequencies"])
    return {"qpoints": np.asarray(m["qpoints"]), "weights": np.asarray(m["weights"]), "frequencies": freqs,
            "max_frequency": float(freqs.max()), "imaginary": has_imaginary_modes(freqs, m["qpoints"]),
            "temperatures": np.asarray(t["temperatures"]), "free_energy": np.asarray(t["free_energy"]),
            "entropy": np.asarray(t["entropy"]), "heat_capacity": np.asarray(t["heat_capacity"])}


# ------------------------------------------------------------------------------------------ relaxation
def space_group_number(atoms: Atoms, symprec: float = KAPPA_SYMPREC) -> int:
    """International space-group number (spglib)."""
    import spglib

    data = spglib.get_symmetry_dataset((atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers),
                                       symprec=symprec)
    if data is None:
        raise ValueError(f"spglib found no symmetry for {atoms.get_chemical_formula()} at symprec {symprec}")
    return int(data.number)


def relax_symmetric(atoms: Atoms, calc: Any, fmax: float = KAPPA_FMAX, max_steps: int = KAPPA_MAX_STEPS,
                    symprec: float = 0.01) -> tuple[Atoms, dict[str, Any]]:
    """Protocol relaxation: ``FixSymmetry`` + ``FrechetCellFilter(mask=[1,1,1,0,0,0])`` + FIRE.

    Returns the relaxed copy and ``{"steps", "converged", "initial_space_group", "space_group",
    "broken_symmetry"}`` (space groups at :data:`KAPPA_SYMPREC`).
    """
    from ase.constraints import FixSymmetry
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    relaxed = atoms.copy()
    initial = space_group_number(relaxed)
    relaxed.calc = calc
    relaxed.set_constraint(FixSymmetry(relaxed, symprec=symprec))
    opt = FIRE(FrechetCellFilter(relaxed, mask=[True] * 3 + [False] * 3), logfile=None)
    converged = bool(opt.run(fmax=fmax, steps=max_steps)) if max_steps > 0 else False
    relaxed.set_constraint()
    relaxed.calc = None
    final = space_group_number(relaxed)
    return relaxed, {"steps": int(opt.nsteps), "converged": converged, "initial_space_group": initial,
                     "space_group": final, "broken_symmetry": final != initial}


# --------------------------------------------------------------------------------------------- κ (opt.)
def phono3py_available() -> bool:
    """True when the optional ``phono3py`` extra is importable."""
    try:
        import phono3py  # noqa: F401
    except ImportError:
        return False
    return True


def wigner_kappa(atoms: Atoms, calc: Any, fc2_supercell: Any, fc3_supercell: Any, q_mesh: Sequence[int],
                 temperature: float = KAPPA_TEMPERATURE, distance: float = KAPPA_DISPLACEMENT,
                 symprec: float = KAPPA_SYMPREC, fc3_pair_cutoff: float | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Wigner thermal conductivity at one temperature with phono3py (needs the ``phono3py`` extra).

    Returns ``kappa_tot_avg`` (W/mK, direction-averaged κ_P + κ_C), ``kappa_p_avg``, ``kappa_c_avg``,
    ``mode_kappa_tot_avg [n_q, n_bands]``, ``weights [n_q]``, ``qpoints [n_q, 3]``, ``frequencies
    [n_q, n_bands]`` (THz) and ``imaginary``. If the harmonic check finds imaginary modes, κ is not
    computed and the κ entries are ``None`` (the metric then scores SRME = 2). ``fc3_pair_cutoff`` (Å)
    skips FC3 displacement pairs farther apart (phono3py's ``cutoff_pair_distance``): cheaper, less exact;
    the protocol uses none.
    """
    if not phono3py_available():
        raise ImportError("phono3py is not installed: `pip install phono3py` for thermal conductivity")
    from phono3py import Phono3py

    ph3 = Phono3py(_to_phonopy_atoms(atoms), supercell_matrix=np.asarray(fc3_supercell),
                   phonon_supercell_matrix=np.asarray(fc2_supercell), primitive_matrix="auto", symprec=symprec,
                   log_level=0)
    # ``mode_kappa_matrix`` is the per-mode Wigner output checked below; older phono3py lacks it.
    ph3.mesh_numbers = np.asarray(q_mesh, int)
    ph3.generate_displacements(distance=distance, is_plusminus="auto", cutoff_pair_distance=fc3_pair_cutoff)
    ph3.phonon_forces = supercell_forces(ph3.phonon_supercells_with_displacements, calc, progress)
    ph3.produce_fc2(symmetrize_fc2=True)
    ph3.init_phph_interaction(symmetrize_fc3q=False)
    ph3.run_phonon_solver()
    freqs, _, addresses = ph3.get_phonon_data()
    # All mesh points (Γ is the zero grid address); κ would be computed on these.
    result: dict[str, Any] = {"imaginary": has_imaginary_modes(freqs, addresses), "kappa_tot_avg": None,
                              "mode_kappa_tot_avg": None}
    if result["imaginary"]:
        return result
    ph3.forces = supercell_forces(ph3.supercells_with_displacements, calc, progress)
    ph3.produce_fc3(symmetrize_fc3r=True)
    ph3.init_phph_interaction(symmetrize_fc3q=False)
    ph3.run_thermal_conductivity(temperatures=[temperature], is_isotope=True, transport_type="SMM19",
                                 boundary_mfp=1e6)
    tc = ph3.thermal_conductivity
    # phono3py ≥ 4 returns the Wigner mode conductivity as one band×band matrix [σ, T, q, ν, ν', 6]: its
    # diagonal is the particle-like (Peierls) term, the off-diagonal the coherences (κ_P and κ_C of 3.x).
    matrix = np.asarray(tc.mode_kappa_matrix)[0]
    diag = np.einsum("tqaax->tqax", matrix)
    coherent = matrix.copy()
    idx = np.arange(matrix.shape[2])
    coherent[:, :, idx, idx, :] = 0.0
    mode_tot = mode_kappa_total(diag, coherent, np.asarray(tc.mode_heat_capacities))
    n_mesh = float(np.prod(ph3.mesh_numbers))
    kappa_p = diag[0].sum(axis=(0, 1)) / n_mesh
    kappa_tot = np.asarray(tc.kappa)[0, 0]
    result.update(kappa_tot_avg=float(direction_average(kappa_tot)), kappa_p_avg=float(direction_average(kappa_p)),
                  kappa_c_avg=float(direction_average(kappa_tot - kappa_p)),
                  mode_kappa_tot_avg=direction_average(mode_tot[0]), weights=np.asarray(tc.grid_weights),
                  qpoints=np.asarray(tc.qpoints), frequencies=np.asarray(tc.frequencies))
    return result


# ------------------------------------------------------------------------------------------ reference set
def load_kappa_structures(path: str | os.PathLike | None = None) -> list[Atoms]:
    """The 103 PhononDB-PBE primitive cells with ``info`` ``mp_id, name, fc2_supercell, fc3_supercell, q_mesh``."""
    import ase.io

    path = Path(path) if path is not None else shared_file(KAPPA_DIR, KAPPA_STRUCTURES)
    if not path.exists():
        raise FileNotFoundError(f"κ reference structures {path} not found")
    frames = ase.io.read(path, index=":")
    for a in frames:
        for key in ("fc2_supercell", "fc3_supercell", "q_mesh"):
            if key not in a.info:
                raise ValueError(f"{path}: structure {a.info.get('mp_id', '?')} lacks info[{key!r}]")
            a.info[key] = np.asarray(a.info[key]).tolist()
    return frames


def load_kappa_reference(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """DFT κ by mp-id: ``kappa_tot_avg`` (W/mK, 300 K), ``mode_kappa_tot_avg [n_q, n_bands]``, ``weights``,
    ``qpoints``, ``frequencies``, ``q_mesh``, ``name``."""
    _, cols = read_reference_json(path, (KAPPA_DIR, KAPPA_REFERENCE), "κ reference file")
    out = {}
    for idx, mp_id in cols["mp_id"].items():
        out[mp_id] = {"name": cols["name"][idx], "kappa_tot_avg": float(np.ravel(cols["kappa_TOT_ave"][idx])[0]),
                      "mode_kappa_tot_avg": np.asarray(cols["mode_kappa_TOT_ave"][idx], np.float64)[0],
                      "weights": np.asarray(cols["weights"][idx]), "qpoints": np.asarray(cols["qpoints"][idx]),
                      "frequencies": np.asarray(cols["frequencies"][idx]), "q_mesh": list(cols["q_mesh"][idx])}
    return out


def kappa_for_material(atoms: Atoms, calc: Any, reference: dict[str, Any] | None = None,
                       q_mesh: Sequence[int] | None = None, fmax: float = KAPPA_FMAX,
                       max_steps: int = KAPPA_MAX_STEPS, fc3_pair_cutoff: float | None = None,
                       progress: bool = False) -> dict[str, Any]:
    """The protocol for one material: relax, check symmetry and imaginary modes, κ, SRD/SRE/SRME.

    ``q_mesh`` overrides the reference mesh (cheaper runs); SRME needs the reference mesh and is NaN
    otherwise, while SRD still compares the totals. Failures (broken symmetry, imaginary modes, errors)
    get SRME = 2 and SRD = −2 as in the protocol, with the reason in ``failure``.
    """
    mesh = list(q_mesh) if q_mesh is not None else list(atoms.info["q_mesh"])
    row: dict[str, Any] = {"mp_id": atoms.info.get("mp_id"), "name": atoms.info.get("name"),
                           "n_atoms": len(atoms), "q_mesh": mesh, "failure": None}
    try:
        relaxed, rinfo = relax_symmetric(atoms, calc, fmax, max_steps)
        row.update(rinfo)
        if rinfo["broken_symmetry"]:
            row["failure"] = f"symmetry broken: {rinfo['initial_space_group']} -> {rinfo['space_group']}"
        else:
            k = wigner_kappa(relaxed, calc, atoms.info["fc2_supercell"], atoms.info["fc3_supercell"], mesh,
                             fc3_pair_cutoff=fc3_pair_cutoff, progress=progress)
            row.update({key: k.get(key) for key in ("imaginary", "kappa_tot_avg", "kappa_p_avg", "kappa_c_avg")})
            if k["imaginary"]:
                row["failure"] = "imaginary modes"
            row["_mode_kappa"] = k.get("mode_kappa_tot_avg")
    except Exception as err:  # noqa: BLE001 - a failing material scores SRME 2, the run goes on
        row["failure"] = f"{type(err).__name__}: {err}"
    if reference is not None:
        kp = row.get("kappa_tot_avg") if row["failure"] is None else None
        row["kappa_dft"] = reference["kappa_tot_avg"]
        row["SRD"] = kappa_srd(kp, reference["kappa_tot_avg"])
        row["SRE"] = abs(row["SRD"])
        if kp is None:
            row["SRME"] = SRME_FAILED
        elif list(mesh) == list(reference["q_mesh"]) and row["_mode_kappa"].shape == reference[
                "mode_kappa_tot_avg"].shape:
            row["SRME"] = kappa_srme(row["_mode_kappa"], reference["mode_kappa_tot_avg"], reference["weights"],
                                     kp, reference["kappa_tot_avg"])
        else:
            row["SRME"] = math.nan  # modes on another mesh cannot be compared one to one
    row.pop("_mode_kappa", None)
    return row
