"""Simulation: jax-md energy vs the calculator, NVE conservation, NPT response, neighbour-list overflow,
MD resume, FIRE, replicas, differentiable trajectories, the ASE path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import units
from ase.build import bulk, molecule
from conftest import sane_potential

import geodite_jax as gd
from geodite_jax.simulation import (
    MDRunner,
    MDSettings,
    MDState,
    ReplicaRunner,
    jaxmd_system,
    make_nve_observable,
    relax_ase,
    relax_jaxmd,
    replica_positions,
)


@pytest.fixture(scope="module")
def pot() -> gd.Potential:
    return sane_potential()


@pytest.fixture(scope="module")
def si64(pot):
    """Si diamond 2x2x2 (64 atoms, 10.86 Å wide: just above 2 x (5 Å cutoff + 0.3 Å skin))."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    atoms.rattle(0.03, seed=3)
    return atoms, jaxmd_system(pot, atoms, dtype="float64", skin=0.3)


def _to_input_frame(system, forces, stress):
    rot = system.rotation
    return np.asarray(forces) @ rot, rot.T @ np.asarray(stress) @ rot


# dense: -m slow (default-suite time); the sparse format and the front-door test run by default.
@pytest.mark.parametrize("fmt", [pytest.param("dense", marks=pytest.mark.slow), "sparse"])
def test_jaxmd_matches_calculator_triclinic(pot, fmt):
    """Energy, forces and stress of the jax-md path equal GeoditeCalculator's on a skewed, rotated cell."""
    atoms = bulk("NaCl", "rocksalt", a=5.64).repeat(4)  # primitive fcc cell: triclinic, 128 atoms
    atoms.cell = atoms.cell.array + np.array([[0.3, 0.1, 0.0], [0.0, 0.2, 0.3], [0.1, -0.2, 0.1]])
    atoms.rattle(0.05, seed=4)
    system = jaxmd_system(pot, atoms, dtype="float64", neighbor_format=fmt)
    assert not np.allclose(system.rotation, np.eye(3))  # the standard-form rotation is exercised
    nbr = system.allocate(system.positions)
    energy, forces, stress = system.energy_forces_stress(system.positions, nbr)
    forces, stress = _to_input_frame(system, forces, stress)
    atoms.calc = gd.GeoditeCalculator(pot, dtype="float64")
    assert float(energy) == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
    np.testing.assert_allclose(forces, atoms.get_forces(), atol=1e-9)
    np.testing.assert_allclose(stress, atoms.get_stress(voigt=False), atol=1e-10)
    assert abs(atoms.get_stress()).max() > 1e-4  # a non-trivial stress was compared


@pytest.mark.slow  # free space is also checked by test_jaxmd_front_door; 18 s
def test_jaxmd_free_space_matches_calculator(pot):
    atoms = molecule("CH3CH2OH")
    system = jaxmd_system(pot, atoms, dtype="float64")
    nbr = system.allocate(system.positions)
    energy, forces, stress = system.energy_forces_stress(system.positions, nbr)
    atoms.calc = gd.GeoditeCalculator(pot, dtype="float64")
    assert float(energy) == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(np.asarray(forces), atoms.get_forces(), atol=1e-10)
    assert np.isnan(np.asarray(stress)).all()


def test_mixed_pbc_is_refused(pot):
    """(Cells narrower than 2 x (cutoff + skin) are no longer refused: tests/test_simulation_small_cell.py.)"""
    slab = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))
    slab.pbc = [True, True, False]
    with pytest.raises(ValueError, match="fully periodic or a fully free"):
        jaxmd_system(pot, slab)


def test_nve_energy_conservation_1000_steps(si64):
    """Velocity Verlet, dt = 1 fs, 300 K, float64: the total energy stays within 2e-5 eV/atom of its start
    over 1000 steps and does not drift (|slope| < 2e-5 eV/atom/ps); the run really moved (T > 100 K)."""
    _, system = si64
    runner = MDRunner(system, MDSettings("nve", temperature_K=300.0, timestep_fs=1.0, seed=1))
    records: list[dict] = []
    runner.run(runner.init(), 1000, block=100, callback=records.append, progress=False)
    total = np.array([r["total_eV"] for r in records]) / system.n_atoms
    time_ps = np.array([r["time_fs"] for r in records]) / 1000.0
    assert len(records) == 11 and records[-1]["step"] == 1000
    assert np.abs(total - total[0]).max() < 2e-5
    assert abs(np.polyfit(time_ps, total, 1)[0]) < 2e-5
    assert min(r["temperature_K"] for r in records[1:]) > 100.0


@pytest.mark.slow  # the bitwise float32 resume test (test_simulation_resume) runs by default
def test_resume_equals_uninterrupted_run(si64, tmp_path):
    """NVT Langevin (its RNG key in the state): 2 x 30 steps through a checkpoint equal 60 steps at once."""
    _, system = si64
    runner = MDRunner(system, MDSettings("nvt", temperature_K=500.0, thermostat="langevin", friction_per_fs=0.02,
                                         seed=7))
    full = runner.run(runner.init(), 60, block=30, progress=False)
    ckpt = tmp_path / "md.npz"
    first = runner.run(runner.init(), 30, block=30, checkpoint=ckpt, progress=False)
    resumed = runner.resume(ckpt)
    assert resumed.step == 30
    np.testing.assert_array_equal(np.asarray(resumed.state.position), np.asarray(first.state.position))
    np.testing.assert_array_equal(np.asarray(resumed.state.rng), np.asarray(first.state.rng))
    second = runner.run(resumed, 60, block=30, progress=False, append=True)
    assert second.step == 60
    np.testing.assert_allclose(np.asarray(second.state.position), np.asarray(full.state.position), atol=1e-10)
    np.testing.assert_allclose(np.asarray(second.state.momentum), np.asarray(full.state.momentum), atol=1e-9)
    other = MDRunner(system, MDSettings("nvt", temperature_K=400.0, seed=7))
    with pytest.raises(ValueError, match="other MD settings"):
        other.resume(ckpt)


@pytest.mark.slow  # several compilations of the model gradient: 50-95 s measured on the shared 2-core machine
def test_neighbour_overflow_is_reallocated_when_the_cell_is_compressed(pot):
    """NPT at 3 GPa compresses an expanded NaCl cell by ~30 % in volume: the skin and tight lists overflow, the
    driver reallocates and redoes the blocks, and the trajectory equals one with a generous list from the start.
    A too-small tight list gives NaN energy, never a silently wrong one."""
    atoms = bulk("NaCl", "rocksalt", a=6.2, cubic=True).repeat(2)
    atoms.rattle(0.02, seed=3)
    system = jaxmd_system(pot, atoms, dtype="float64", skin=0.3)
    runner = MDRunner(system, MDSettings("npt", temperature_K=300.0, pressure_GPa=3.0, barostat_tau_fs=100.0,
                                         tau_fs=50.0))
    start = runner.init()
    generous = MDState(start.state, system.allocate(system.positions, system.box, capacity=60, extra_capacity=40))
    md, ref = start, generous
    for _ in range(4):
        md, ref = runner.advance(md, 25), runner.advance(ref, 25)
    volume0, volume = (abs(np.linalg.det(np.asarray(runner.box_of(s.state)))) for s in (start, md))
    assert volume < 0.8 * volume0
    assert md.neighbors.capacity > start.neighbors.capacity
    assert md.neighbors.skin.max_occupancy > start.neighbors.skin.max_occupancy
    assert ref.neighbors.capacity == 60  # never needed to grow
    np.testing.assert_allclose(np.asarray(md.state.position), np.asarray(ref.state.position), atol=1e-9)

    small = system.allocate(system.positions, system.box)
    small = small.set(capacity=int(small.tight_count) - 1)
    assert np.isnan(float(system.energy_fn(system.positions, neighbor=small)))


@pytest.mark.slow  # several compilations of the model gradient: 50-95 s measured on the shared 2-core machine
def test_npt_volume_follows_applied_pressure(pot):
    """From the same state, a target pressure 3 GPa above the internal one shrinks the cell and 1 GPa below
    expands it (isotropic Nose-Hoover barostat driven by the model's stress; the untrained model has little
    cohesion, so a larger tension would tear the crystal apart)."""
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(2)
    atoms.rattle(0.02, seed=5)
    system = jaxmd_system(pot, atoms, dtype="float64", skin=0.3)
    nbr = system.allocate(system.positions)
    _, _, stress = system.energy_forces_stress(system.positions, nbr)
    p0 = float(-np.trace(np.asarray(stress)) / 3) / units.GPa
    volumes = {}
    for shift in (-1.0, 3.0):
        runner = MDRunner(system, MDSettings("npt", temperature_K=100.0, pressure_GPa=p0 + shift,
                                             barostat_tau_fs=100.0, seed=2))
        md = runner.advance(runner.init(), 60)
        volumes[shift] = abs(np.linalg.det(np.asarray(runner.box_of(md.state))))
    v0 = atoms.get_volume()
    assert volumes[3.0] < v0 < volumes[-1.0]


@pytest.mark.slow  # several compilations of the model gradient: 50-95 s measured on the shared 2-core machine
def test_fire_jaxmd_and_ase_cell_relaxation(pot, si64):
    atoms, system = si64
    result = relax_jaxmd(system, fmax=0.01, max_steps=600)
    assert result.converged and result.fmax <= 0.01
    assert result.atoms.get_potential_energy() < float(
        system.energy_forces_stress(system.positions, system.allocate(system.positions))[0])
    small = bulk("Si", "diamond", a=5.5, cubic=True)
    small.rattle(0.05, seed=2)
    cell_result = relax_ase(small, gd.GeoditeCalculator(pot, dtype="float64"), fmax=0.02, cell=True, max_steps=400)
    assert cell_result.converged
    assert np.abs(cell_result.atoms.get_forces()).max() <= 0.02
    assert cell_result.smax <= 0.02 / 40
    assert abs(cell_result.atoms.get_volume() - small.get_volume()) > 0.1  # the cell did move


@pytest.mark.slow  # jax-md and the calculator agree in the default tests; 22 s
def test_ase_md_matches_jaxmd_nve(pot, si64):
    """ASE's VelocityVerlet with GeoditeCalculator and jax-md's NVE give the same 20-step trajectory."""
    from ase.md.verlet import VelocityVerlet

    atoms, system = si64
    runner = MDRunner(system, MDSettings("nve", temperature_K=300.0, timestep_fs=1.0, seed=3))
    md = runner.init()
    ase_atoms = system.to_atoms(md.position, momenta=md.state.momentum)
    ase_atoms.calc = gd.GeoditeCalculator(pot, dtype="float64")
    VelocityVerlet(ase_atoms, timestep=1.0 * units.fs).run(20)
    md = runner.advance(md, 20)
    final = system.to_atoms(md.position, momenta=md.state.momentum)
    delta = final.positions - ase_atoms.positions
    delta -= np.round(delta @ np.linalg.inv(final.cell.array)) @ final.cell.array  # ASE does not wrap
    # Forces agree to ~1e-10 eV/Å (summation order); 20 steps amplify that to ~1e-9 Å.
    assert np.abs(delta).max() < 1e-7
    np.testing.assert_allclose(final.get_momenta(), ase_atoms.get_momenta(), atol=1e-6)


@pytest.mark.slow  # several compilations of the model gradient: 50-95 s measured on the shared 2-core machine
def test_replicas_equal_independent_runs(si64):
    """Four replicas (other positions and temperatures) advanced in one vmapped block match the same
    replicas advanced one at a time."""
    _, system = si64
    runner = ReplicaRunner(system, ensemble="nve")
    positions = replica_positions(system, 4, rattle=0.02, seed=1)
    temps = np.array([100.0, 200.0, 300.0, 400.0])
    state, nbr = runner.init(positions, temps, seed=3)
    momenta0 = np.asarray(state.momentum)
    out = runner.run(state, nbr, temps, steps=20, block=10)
    assert out.steps == 20 and out.atom_steps_per_s > 0
    assert len({round(float(x), 6) for x in np.asarray(out.state.position).sum(axis=(1, 2))}) == 4
    for k in (0, 3):
        one_state, one_nbr = runner.init(positions[k:k + 1], temps[k:k + 1], momenta=momenta0[k:k + 1])
        one = runner.run(one_state, one_nbr, temps[k:k + 1], steps=20, block=10)
        np.testing.assert_allclose(np.asarray(one.state.position[0]), np.asarray(out.state.position[k]), atol=1e-9)


@pytest.mark.slow  # several compilations of the model gradient: 50-95 s measured on the shared 2-core machine
def test_gradient_of_md_observable_matches_finite_differences(pot, si64):
    """d<E_pot>/dθ over a 10-step NVE run, for a readout weight θ and for a Cartesian displacement of the
    initial positions, equals central finite differences."""
    _, system = si64
    observable = make_nve_observable(system, steps=10, timestep_fs=2.0)
    state = pot.state(jnp.float64)
    momenta = jnp.asarray(np.random.default_rng(0).normal(scale=0.3, size=(system.n_atoms, 3)))
    (value, overflow), (g_state, g_pos) = jax.jit(jax.value_and_grad(observable, argnums=(0, 1), has_aux=True))(
        state, system.positions, momenta)
    assert not bool(overflow) and np.isfinite(float(value))
    fn = jax.jit(lambda s, r: observable(s, r, momenta)[0])

    def with_readout(delta):
        params = dict(state.params["params"])
        params["readout"] = params["readout"].at[0, 3].add(delta)
        return state.replace(params={**state.params, "params": params})

    eps = 1e-4
    fd = (fn(with_readout(eps), system.positions) - fn(with_readout(-eps), system.positions)) / (2 * eps)
    assert float(g_state.params["params"]["readout"][0, 3]) == pytest.approx(float(fd), rel=1e-6)
    direction = np.random.default_rng(1).normal(size=(system.n_atoms, 3))
    to_frac = direction @ np.linalg.inv(np.asarray(system.box)).T
    fd = (fn(state, system.positions + eps * to_frac) - fn(state, system.positions - eps * to_frac)) / (2 * eps)
    assert float(jnp.sum(g_pos * direction)) == pytest.approx(float(fd), rel=1e-5)
