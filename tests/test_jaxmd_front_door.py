"""jax-md's own idiom: ``neighbor_fn, energy_fn = geodite_neighbor_list(displacement_fn, box, potential, species)``
drives ``jax_md.simulate.nve`` unchanged and equals the ASE calculator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk, molecule
from conftest import sane_potential
from jax_md import simulate, space

import geodite_jax as gd
from geodite_jax.simulation import geodite_neighbor_list


@pytest.fixture(scope="module")
def pot() -> gd.Potential:
    return sane_potential()


def _crystal():
    """Rattled fcc Cu 3x3x3 (108 atoms) in ASE's standard form, so jax-md's box is ``cell.T``."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)
    atoms.rattle(0.05, seed=7)
    return atoms


def test_front_door_drives_nve_and_equals_calculator(pot):
    atoms = _crystal()
    box = jnp.asarray(atoms.cell.array.T)
    displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=True)
    neighbor_fn, energy_fn = geodite_neighbor_list(displacement_fn, box, pot, atoms.numbers, dtype="float64")
    R = jnp.asarray(atoms.get_scaled_positions())
    nbr = neighbor_fn.allocate(R)

    calc = gd.GeoditeCalculator(pot, dtype="float64")
    atoms.calc = calc
    assert float(energy_fn(R, neighbor=nbr)) == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
    forces = -jax.grad(energy_fn)(R, neighbor=nbr)  # periodic_general: fractional R, Cartesian gradient
    np.testing.assert_allclose(forces, atoms.get_forces(), atol=1e-9)

    # simulate.nve exactly as jax-md's examples write it (no Geodite-specific driver).
    init_fn, apply_fn = simulate.nve(energy_fn, shift_fn, 1.0 * 0.0982269)  # 1 fs in ASE time units
    state = init_fn(jax.random.PRNGKey(0), R, 300 * 8.617e-5, mass=jnp.asarray(atoms.get_masses()), neighbor=nbr)

    @jax.jit
    def steps(state, nbr):
        def body(_, carry):
            state, nbr = carry
            state = apply_fn(state, neighbor=nbr)
            return state, neighbor_fn.update(state.position, nbr)

        return jax.lax.fori_loop(0, 20, body, (state, nbr))

    state, nbr = steps(state, nbr)
    assert not bool(nbr.did_buffer_overflow)
    moved = atoms.copy()
    moved.set_scaled_positions(np.asarray(state.position) % 1.0)
    moved.calc = calc
    assert np.abs(moved.positions - atoms.positions).max() > 1e-3  # the atoms did move
    np.testing.assert_allclose(state.force, moved.get_forces(), atol=1e-9)
    assert float(energy_fn(state.position, neighbor=nbr)) == pytest.approx(moved.get_potential_energy(), abs=1e-9)


def test_front_door_free_space_and_overflow(pot):
    atoms = molecule("CH3CH2OH")
    displacement_fn, _ = space.free()
    neighbor_fn, energy_fn = geodite_neighbor_list(displacement_fn, None, pot, atoms.numbers, dtype="float64",
                                                   neighbor_format="sparse")
    R = jnp.asarray(atoms.positions)
    nbr = neighbor_fn.allocate(R)
    atoms.calc = gd.GeoditeCalculator(pot, dtype="float64")
    assert float(energy_fn(R, neighbor=nbr)) == pytest.approx(atoms.get_potential_energy(), abs=1e-9)

    # A tight list too small for the pairs within the cutoff is flagged, and its energy is NaN, never a number
    # missing pairs: the jax-md idiom (reallocate on did_buffer_overflow) then recovers.
    small = nbr.set(capacity=4).update(R)
    assert bool(small.did_buffer_overflow)
    assert np.isnan(float(energy_fn(R, neighbor=small)))
    assert not bool(neighbor_fn.allocate(R).did_buffer_overflow)


def test_front_door_names_bad_input(pot):
    atoms = _crystal()
    box = jnp.asarray(atoms.cell.array.T)
    displacement_fn, _ = space.periodic_general(box, fractional_coordinates=True)
    with pytest.raises(ValueError, match="unknown element"):
        geodite_neighbor_list(displacement_fn, box, pot, np.full(len(atoms), 200))
    with pytest.raises(ValueError, match="neighbor_format"):
        geodite_neighbor_list(displacement_fn, box, pot, atoms.numbers, neighbor_format="csr")
    with pytest.raises(ValueError, match="dtype"):
        geodite_neighbor_list(displacement_fn, box, pot, atoms.numbers, dtype="float16")
