"""Stability of an MD trajectory: finite values, energy drift, closest approach, jumps and atoms flown off."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from ase import Atoms

from .diffusion import unwrap
from .frames import pairs_within


@dataclasses.dataclass
class StabilityReport:
    """Health of a trajectory. Distances in Å, energies per atom, times in ps.

    ``stable`` is True when everything is finite, no pair came closer than ``too_close_A``, no atom moved
    more than ``jump_A`` between consecutive frames and no atom was left without a neighbour within
    ``isolated_A`` (flying off).
    """

    n_frames: int
    duration_ps: float
    energy_drift_meV_atom_ps: float  # slope of a linear fit of E_total / N
    conserved_drift_meV_atom_ps: float | None  # same for the integrator's conserved quantity, if given
    temperature_mean_K: float
    temperature_std_K: float
    max_force_eV_A: float
    min_distance_A: float
    min_distance_frame: int
    max_step_A: float  # largest (minimum-image) displacement of an atom between consecutive frames
    too_close_frames: list[int]
    jumping_atoms: list[int]
    isolated_atoms: list[int]
    finite: bool
    stable: bool

    def summary(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _drift(t_ps: np.ndarray, energy: np.ndarray, n_atoms: int) -> float:
    if len(t_ps) < 2 or not np.isfinite(energy).all():
        return float("nan")
    return float(np.polyfit(t_ps, np.asarray(energy, np.float64) / n_atoms, 1)[0]) * 1000.0


def nearest_neighbour_distances(positions: np.ndarray, cell: np.ndarray, radius: float, pbc: bool = True
                                ) -> np.ndarray:
    """Distance of each atom to its nearest other atom (periodic images included) ``[n_atoms]`` Å;
    ``inf`` for atoms with nobody within ``radius``."""
    n = len(positions)
    i, j, d = pairs_within(positions, cell, radius, pbc)
    nearest = np.full(n, np.inf)
    np.minimum.at(nearest, i, d)
    np.minimum.at(nearest, j, d)
    return nearest


def stability_report(frames: Sequence[Atoms], t_ps: np.ndarray, total_energy: np.ndarray | None = None,
                     temperature_K: np.ndarray | None = None, forces: np.ndarray | None = None,
                     conserved_energy: np.ndarray | None = None, too_close_A: float = 1.0, jump_A: float = 3.0,
                     isolated_A: float = 4.0) -> StabilityReport:
    """Stability of an MD trajectory sampled as ``frames`` (wrapped positions; periodic or free).

    Args:
        frames: ``n_frames`` ASE ``Atoms``.
        t_ps: ``[n_frames]`` times; total_energy: ``[n_frames]`` E_pot + E_kin (eV);
            temperature_K: ``[n_frames]`` (both optional, e.g. for a positions-only AIMD: NaN in the report).
        forces: ``[n_frames, n_atoms, 3]`` eV/Å (default: the frames' calculator forces if attached).
        conserved_energy: ``[n_frames]`` the thermostat's conserved quantity (eV), e.g. Nose-Hoover's.
        too_close_A: pairs closer than this are unphysical; jump_A: largest plausible (minimum-image)
            displacement between consecutive frames; isolated_A: an atom with no neighbour within this
            distance has flown off.
    """
    if len(frames) == 0:
        raise ValueError("no frames given")
    t = np.asarray(t_ps, np.float64)
    nan = np.full(len(frames), np.nan)
    energy = nan if total_energy is None else np.asarray(total_energy, np.float64)
    temps = nan if temperature_K is None else np.asarray(temperature_K, np.float64)
    if not (t.shape == energy.shape == temps.shape == (len(frames),)):
        raise ValueError(f"t_ps, total_energy, temperature_K must all be [{len(frames)}], got "
                         f"{t.shape}, {energy.shape}, {temps.shape}")
    n = len(frames[0])
    pbc = bool(all(frames[0].pbc))
    if forces is None and frames[0].calc is not None and "forces" in frames[0].calc.results:
        forces = np.stack([a.calc.results["forces"] for a in frames])
    positions = np.stack([a.positions for a in frames])
    finite = bool(np.isfinite(positions).all() and (total_energy is None or np.isfinite(energy).all())
                  and (temperature_K is None or np.isfinite(temps).all())
                  and (forces is None or np.isfinite(forces).all()))
    min_d, min_frame, too_close, isolated = np.inf, -1, [], set()
    if finite:
        for k, atoms in enumerate(frames):
            nearest = nearest_neighbour_distances(atoms.positions, atoms.cell.array, isolated_A, pbc)
            if nearest.min() < min_d:
                min_d, min_frame = float(nearest.min()), k
            if nearest.min() < too_close_A:
                too_close.append(k)
            isolated.update(np.flatnonzero(~np.isfinite(nearest)).tolist())
    jumping: list[int] = []
    max_step = float("nan")
    if finite and len(frames) > 1:
        cells = np.stack([a.cell.array for a in frames]) if pbc else None
        if pbc:
            steps = np.diff(unwrap(positions, cells), axis=0)
        else:
            steps = np.diff(positions, axis=0)
        per_atom = np.linalg.norm(steps, axis=-1).max(axis=0)
        max_step = float(per_atom.max())
        jumping = np.flatnonzero(per_atom > jump_A).tolist()
    conserved = None if conserved_energy is None else _drift(t, np.asarray(conserved_energy), n)
    max_force = float(np.abs(np.linalg.norm(forces, axis=-1)).max()) if forces is not None else float("nan")
    stable = finite and not too_close and not jumping and not isolated
    return StabilityReport(
        n_frames=len(frames), duration_ps=float(t[-1] - t[0]), energy_drift_meV_atom_ps=_drift(t, energy, n),
        conserved_drift_meV_atom_ps=conserved, temperature_mean_K=float(np.mean(temps)),
        temperature_std_K=float(np.std(temps)), max_force_eV_A=max_force, min_distance_A=float(min_d),
        min_distance_frame=int(min_frame), max_step_A=max_step, too_close_frames=too_close, jumping_atoms=jumping,
        isolated_atoms=sorted(isolated), finite=finite, stable=stable)
