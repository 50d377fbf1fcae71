"""Physics of the full potential: symmetries, conservative forces and stress, smoothness, limits (float64)."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from scipy.spatial.transform import Rotation

import geodite_jax as gd
from geodite_jax.elements import mptrj_element_energies


def lips_triclinic() -> Atoms:
    """Small triclinic cell (one width below the cutoff: several images of each neighbour), 4 elements."""
    cell = Atoms(cell=[5.2, 6.3, 7.4, 75, 85, 100], pbc=True).cell
    rng = np.random.default_rng(4)
    frac = rng.random((8, 3))
    atoms = Atoms("Li3PS3O", scaled_positions=frac, cell=cell, pbc=True)
    while True:  # push apart overlapping random atoms
        d = atoms.get_all_distances(mic=True) + np.eye(len(atoms)) * 10
        if d.min() > 1.6:
            return atoms
        atoms.rattle(0.3, seed=int(rng.integers(1000)))


def rattled_nacl() -> Atoms:
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms = atoms.repeat((2, 1, 1))
    atoms.rattle(0.1, seed=3)
    return atoms


def random_orthogonal(seed: int, reflect: bool) -> np.ndarray:
    rot = Rotation.random(random_state=seed).as_matrix()
    return rot @ np.diag([1, 1, -1]) if reflect else rot


@pytest.mark.parametrize("reflect", [False, True])
def test_o3_invariance_and_equivariance(evaluate, reflect):
    atoms = lips_triclinic()
    ref = evaluate(atoms)
    q = random_orthogonal(7, reflect)
    moved = atoms.copy()
    moved.set_cell(atoms.cell.array @ q.T, scale_atoms=False)
    moved.positions = atoms.positions @ q.T
    out = evaluate(moved)
    assert abs(np.linalg.det(q) - (-1 if reflect else 1)) < 1e-12
    np.testing.assert_allclose(out["energy"], ref["energy"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(out["energies"], ref["energies"], atol=1e-10)
    np.testing.assert_allclose(out["forces"], ref["forces"] @ q.T, atol=1e-9)
    np.testing.assert_allclose(out["stress"], q @ ref["stress"] @ q.T, atol=1e-10)
    assert np.abs(ref["forces"]).max() > 1e-3  # not trivially zero


def test_molecule_rotation_and_reflection(evaluate):
    atoms = molecule("CH3CH2OH")
    ref = evaluate(atoms)
    for seed, reflect in [(1, False), (2, True)]:
        q = random_orthogonal(seed, reflect)
        moved = atoms.copy()
        moved.positions = atoms.positions @ q.T
        out = evaluate(moved)
        np.testing.assert_allclose(out["energy"], ref["energy"], atol=1e-10)
        np.testing.assert_allclose(out["forces"], ref["forces"] @ q.T, atol=1e-9)


def test_translation_and_wrapping_invariance(evaluate):
    atoms = lips_triclinic()
    ref = evaluate(atoms)
    moved = atoms.copy()
    moved.positions += np.array([0.37, -1.3, 2.9])
    out = evaluate(moved)
    np.testing.assert_allclose(out["energy"], ref["energy"], atol=1e-10)
    np.testing.assert_allclose(out["forces"], ref["forces"], atol=1e-9)
    moved.wrap()  # atoms that crossed the boundary now sit in another image
    out = evaluate(moved)
    np.testing.assert_allclose(out["energy"], ref["energy"], atol=1e-10)
    np.testing.assert_allclose(out["forces"], ref["forces"], atol=1e-9)
    np.testing.assert_allclose(out["stress"], ref["stress"], atol=1e-10)


def test_permutation_invariance(evaluate):
    atoms = lips_triclinic()
    ref = evaluate(atoms)
    perm = np.random.default_rng(0).permutation(len(atoms))
    out = evaluate(atoms[perm])
    np.testing.assert_allclose(out["energy"], ref["energy"], atol=1e-10)
    np.testing.assert_allclose(out["forces"], ref["forces"][perm], atol=1e-9)
    np.testing.assert_allclose(out["energies"], ref["energies"][perm], atol=1e-10)


def test_supercell_extensivity(evaluate):
    atoms = rattled_nacl()
    ref = evaluate(atoms)
    sc = atoms.repeat((2, 2, 1))
    out = evaluate(sc)
    np.testing.assert_allclose(out["energy"], 4 * ref["energy"], rtol=1e-11, atol=1e-9)
    np.testing.assert_allclose(out["forces"], np.tile(ref["forces"], (4, 1)), atol=1e-9)
    np.testing.assert_allclose(out["stress"], ref["stress"], atol=1e-10)


def test_forces_match_finite_differences(evaluate):
    atoms = lips_triclinic()
    out = evaluate(atoms)
    eps = 1e-5
    for atom, axis in [(0, 0), (3, 1), (5, 2), (7, 0)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += eps
        minus.positions[atom, axis] -= eps
        fd = -(evaluate(plus)["energy"] - evaluate(minus)["energy"]) / (2 * eps)
        assert abs(fd - out["forces"][atom, axis]) < 1e-6 * max(1.0, abs(fd)), (atom, axis, fd)


def test_stress_matches_strain_finite_differences(evaluate):
    atoms = lips_triclinic()
    out = evaluate(atoms)
    volume = atoms.get_volume()
    eps = 1e-5
    for i, j in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]:
        energies = []
        for sign in (1, -1):
            strain = np.zeros((3, 3))
            strain[i, j] += 0.5 * sign * eps
            strain[j, i] += 0.5 * sign * eps
            deformed = atoms.copy()
            deformed.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
            energies.append(evaluate(deformed)["energy"])
        fd = (energies[0] - energies[1]) / (2 * eps) / volume
        assert abs(fd - out["stress"][i, j]) < 1e-7 * max(1.0, abs(fd)), (i, j, fd, out["stress"][i, j])
    np.testing.assert_allclose(out["stress"], out["stress"].T, atol=1e-12)


def test_stress_sign_follows_ase_convention(tiny):
    """Compressed far below equilibrium the repulsion pushes outwards: ASE stress is negative."""
    atoms = bulk("Cu", "fcc", a=2.6)
    atoms.calc = gd.GeoditeCalculator(tiny, dtype="float64")
    assert np.all(atoms.get_stress()[:3] < 0)


def test_ase_calculator_matches_numerical_forces_and_stress(tiny):
    atoms = rattled_nacl()
    atoms.calc = gd.GeoditeCalculator(tiny, dtype="float64")
    # Random weights give forces of O(10^3) eV/Å here; tolerances allow the O(d^2) truncation of ASE's FD.
    forces = atoms.get_forces()
    np.testing.assert_allclose(forces, atoms.calc.calculate_numerical_forces(atoms, d=1e-5),
                               atol=1e-8 * np.abs(forces).max() + 1e-6)
    stress = atoms.get_stress()
    np.testing.assert_allclose(stress, atoms.calc.calculate_numerical_stress(atoms, d=1e-5),
                               atol=1e-8 * np.abs(stress).max() + 1e-7)
    np.testing.assert_allclose(atoms.get_potential_energies().sum(), atoms.get_potential_energy(), atol=1e-10)


def dimer(symbols: str, r: float) -> Atoms:
    return Atoms(symbols, positions=[[0, 0, 0], [0, 0, r]])


def test_isolated_atom_limit(tiny):
    """An atom with no neighbour inside r_c returns exactly E0(Z), whatever the weights."""
    e0 = mptrj_element_energies()
    for seed in (0, 5):
        from conftest import Evaluator, perturbed

        ev = Evaluator(perturbed(tiny, seed=seed, scale=1.0))
        for symbol, z in [("Fe", 26), ("O", 8), ("H", 1)]:
            out = ev(Atoms(symbol, positions=[[0, 0, 0]], cell=[20, 20, 20], pbc=True))
            assert out["energy"] == pytest.approx(e0[z], abs=1e-12)
            assert np.all(out["forces"] == 0) and np.all(out["stress"] == 0)
        far = ev(dimer("NaCl", tiny.config.cutoff + 0.01))
        assert far["energy"] == pytest.approx(e0[11] + e0[17], abs=1e-12)


def test_energy_and_forces_continuous_through_cutoff(evaluate, tiny):
    rc = tiny.config.cutoff
    isolated = evaluate(dimer("SiO", rc + 1.0))["energy"]
    previous = None
    for delta in (1e-2, 1e-3, 1e-4):
        inside = evaluate(dimer("SiO", rc - delta))
        de = abs(inside["energy"] - isolated)
        force = np.abs(inside["forces"]).max()
        assert de < 50 * delta**3 and force < 50 * delta**2, (delta, de, force)  # C2 envelope
        if previous is not None:
            assert de < previous
        previous = de
    assert evaluate(dimer("SiO", rc))["energy"] == pytest.approx(isolated, abs=1e-14)


def test_energy_smooth_when_a_neighbour_crosses_the_cutoff_in_a_crystal(evaluate, tiny):
    """Scan a lattice through the cutoff shell: energy and forces change smoothly (no jumps)."""
    atoms = rattled_nacl()
    scales = np.linspace(0.98, 1.02, 41)
    energies = []
    for s in scales:
        a = atoms.copy()
        a.set_cell(atoms.cell.array * s, scale_atoms=True)
        energies.append(evaluate(a)["energy"])
    second = np.diff(energies, 2)
    assert np.abs(np.diff(second)).max() < 10 * np.abs(second).max() + 1e-9
    assert np.all(np.isfinite(energies))


@pytest.fixture(scope="module")
def initial_evaluate():
    from conftest import Evaluator

    return Evaluator(gd.Potential.init(gd.GeoditeConfig.preset("tiny"), seed=3, element_energies="mptrj"))


@pytest.mark.parametrize("pair", ["HH", "OO", "SiO", "CuCu", "NaCl", "FeFe"])
def test_short_range_repulsion_is_steep_and_monotonic(initial_evaluate, pair):
    """Below ~60% of the covalent-radius sum the ZBL prior dominates an untrained network.

    (The learned part is suppressed there by s(t) ~ t^λ; ZBL is switched off at the radius sum.)
    """
    from geodite_jax.elements import COVALENT_RADII

    numbers = Atoms(pair).numbers
    rho0 = COVALENT_RADII[numbers].sum()
    distances = np.linspace(0.1, 0.6 * rho0, 25)
    out = [initial_evaluate(dimer(pair, r)) for r in distances]
    energies = np.array([o["energy"] for o in out])
    assert np.all(np.diff(energies) < 0), energies
    assert energies[0] - energies[-1] > 20.0  # eV: steep
    assert all(o["forces"][1, 2] > 0 for o in out)  # pushes the second atom away


def test_forces_sum_to_zero(evaluate):
    out = evaluate(lips_triclinic())
    np.testing.assert_allclose(out["forces"].sum(0), 0, atol=1e-10)
