"""jax-md MD on cells narrower than 2 x (cutoff + skin) (issue 14, item 10): the multi-image neighbour list.

A 16-atom Si cell (5.43 Å wide, skewed and rotated) with the 5 Å tiny model and a 0.3 Å skin: before, jax-md
refused it and asked for a supercell. Energy, forces and stress equal GeoditeCalculator's (float64), also
after an NVE run in which atoms crossed the cell boundary, and NVE conserves energy.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from conftest import sane_potential

import geodite_jax as gd
from geodite_jax.simulation import MDRunner, MDSettings, jaxmd_system, perpendicular_widths


@pytest.fixture(scope="module")
def small():
    pot = sane_potential()
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 1, 1))  # 16 atoms
    atoms.set_cell(atoms.cell.array + np.array([[0.0, 0.2, 0.1], [0.3, 0.0, -0.2], [0.1, 0.2, 0.0]]),
                   scale_atoms=True)
    atoms.rattle(0.05, seed=2)
    assert perpendicular_widths(atoms.cell.array).min() < 2 * (pot.config.cutoff + 0.3)
    system = jaxmd_system(pot, atoms, dtype="float64", skin=0.3)
    assert system.multi_image
    return pot, atoms, system


def _compare(pot, system, R, nbr, box=None):
    energy, forces, stress = system.energy_forces_stress(R, nbr, box)
    atoms = system.to_atoms(R, box)
    atoms.calc = gd.GeoditeCalculator(pot, dtype="float64")
    rot = system.rotation
    assert float(energy) == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
    np.testing.assert_allclose(np.asarray(forces) @ rot, atoms.get_forces(), atol=1e-9)
    np.testing.assert_allclose(rot.T @ np.asarray(stress) @ rot, atoms.get_stress(voigt=False), atol=1e-9)
    assert np.abs(atoms.get_forces()).max() > 1e-2 and np.abs(atoms.get_stress()).max() > 1e-4


def test_small_cell_energy_forces_stress_match_calculator(small):
    pot, _, system = small
    nbr = system.allocate(system.positions)
    assert nbr.shifts is not None and np.abs(np.asarray(nbr.shifts)).max() >= 1  # several images per pair
    _compare(pot, system, system.positions, nbr)


@pytest.mark.slow  # the MD block and observables compile: ~40 s on a quiet 2-core machine
def test_small_cell_nve_conserves_energy_and_matches_calculator_after_wrapping(small):
    """NVE at 600 K, dt 1 fs, 300 steps: the total energy stays within 1e-4 eV/atom of its start without a
    drift, atoms crossed the cell boundary (wrapped fractional positions), and at the end the jax-md energy,
    forces and stress still equal the calculator's."""
    pot, _, system = small
    runner = MDRunner(system, MDSettings("nve", temperature_K=600.0, timestep_fs=1.0, seed=3))
    records: list[dict] = []
    md = runner.init()
    start = np.asarray(md.position)
    md = runner.run(md, 300, block=50, callback=records.append, progress=False)
    total = np.array([r["total_eV"] for r in records]) / system.n_atoms
    assert len(records) == 7 and min(r["temperature_K"] for r in records[1:]) > 100.0
    assert np.abs(total - total[0]).max() < 1e-4
    assert abs(np.polyfit(np.arange(len(total)) * 0.05, total, 1)[0]) < 1e-4  # eV/atom/ps
    end = np.asarray(md.position)
    assert np.abs(end - start).max() > 0.5  # some atom wrapped around the cell
    _compare(pot, system, md.position, md.neighbors)


def test_sparse_format_small_cell_is_a_clear_error():
    pot = sane_potential()
    with pytest.raises(ValueError, match="multi-image.*dense only"):
        jaxmd_system(pot, bulk("Si", "diamond", a=5.43, cubic=True), neighbor_format="sparse")
