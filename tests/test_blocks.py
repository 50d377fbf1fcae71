"""Building blocks: spherical harmonics, envelope, radial basis, distance weighting, ZBL, config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import geodite_jax as gd
from geodite_jax.priors import ZBL_UNIVERSAL, zbl_pair_energy
from geodite_jax.radial import bessel_basis, distance_weighting, polynomial_envelope
from geodite_jax.spherical import spherical_harmonics


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_spherical_harmonics_norm_parity_and_rotation():
    u = unit_vectors(200)
    y = np.asarray(spherical_harmonics(jnp.asarray(u)))
    np.testing.assert_allclose(np.linalg.norm(y[:, :3], axis=1), 1, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(y[:, 3:], axis=1), 1, atol=1e-12)
    y_neg = np.asarray(spherical_harmonics(jnp.asarray(-u)))
    np.testing.assert_allclose(y_neg[:, :3], -y[:, :3], atol=1e-12)  # odd
    np.testing.assert_allclose(y_neg[:, 3:], y[:, 3:], atol=1e-12)  # even
    for reflect in (False, True):
        q = Rotation.random(random_state=3).as_matrix() @ (np.diag([1, 1, -1]) if reflect else np.eye(3))
        y_rot = np.asarray(spherical_harmonics(jnp.asarray(u @ q.T)))
        for rows in (slice(0, 3), slice(3, 8)):
            # Y(Qu) = D(Q) Y(u) with D orthogonal: fit D and check it is exact and orthogonal.
            d, *_ = np.linalg.lstsq(y[:, rows], y_rot[:, rows], rcond=None)
            np.testing.assert_allclose(y[:, rows] @ d, y_rot[:, rows], atol=1e-10)
            np.testing.assert_allclose(d.T @ d, np.eye(d.shape[0]), atol=1e-10)


def test_envelope_is_c2_at_the_cutoff_and_zero_beyond():
    p = 6
    f = lambda x: polynomial_envelope(x, p)  # noqa: E731
    one = jnp.asarray(1.0)
    assert float(f(one)) == 0.0 and float(f(jnp.asarray(0.0))) == 1.0
    assert float(jax.grad(f)(one - 1e-9)) == pytest.approx(0, abs=1e-12)
    for delta in (1e-3, 1e-5, 1e-7):  # u'' -> 0 linearly: C2, not C3
        assert abs(float(jax.grad(jax.grad(f))(one - delta))) < 400 * delta
    x = jnp.linspace(1.0, 3.0, 50)
    assert np.all(np.asarray(f(x)) == 0) and np.all(np.asarray(jax.vmap(jax.grad(f))(x)) == 0)
    xs = jnp.linspace(0, 1, 200)
    assert np.all(np.diff(np.asarray(f(xs))) <= 0)


def test_radial_basis_vanishes_at_cutoff():
    r = jnp.asarray([6.0, 6.5])
    assert np.all(np.abs(np.asarray(bessel_basis(r[:1], 6.0, 12))) < 1e-6)


def test_distance_weighting_initial_shape():
    t = jnp.asarray([0.5, 1.0, 2.0, 3.0, 30.0])
    s = np.asarray(distance_weighting(t, jnp.asarray(-15.2013), jnp.asarray(3.2139)))
    np.testing.assert_allclose(s[:4], [0.010, 0.115, 0.325, 0.434], atol=2e-3)  # design note §3.3
    assert np.all(np.diff(s) > 0) and s[-1] > 0.85  # s -> A t / (A t + 1) for large t


def test_zbl_universal_matches_textbook_value():
    """Si-Si at 1 Å with universal parameters: k Z²/r Φ(r/a) ~ 51 eV (design note §4.3), switched off at ρ0."""
    z = jnp.asarray([14.0])
    u = ZBL_UNIVERSAL
    v = zbl_pair_energy(jnp.asarray([1.0]), z, z, jnp.asarray([1e9]), u["alpha"], u["beta"],
                        jnp.asarray(u["coefs"]), jnp.asarray(u["exps"]))
    assert float(v[0]) == pytest.approx(51.0, rel=0.03)
    off = zbl_pair_energy(jnp.asarray([2.3]), z, z, jnp.asarray([2.22]), u["alpha"], u["beta"],
                          jnp.asarray(u["coefs"]), jnp.asarray(u["exps"]))
    assert float(off[0]) == 0.0


def test_presets_and_parameter_counts():
    mp = gd.GeoditeConfig.preset("mp")
    assert mp.cutoff == 6.0 and mp.lmax == 2
    assert gd.count_params(gd.init_params(mp)) == 3_623_112
    assert gd.count_params(gd.init_params(gd.GeoditeConfig.preset("tiny"))) == 55_396


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=5), "must divide"), (dict(cutoff=-1.0), "cutoff"), (dict(lmax=3), "lmax must be 2"),
    (dict(num_layers=0), "num_layers"), (dict(num_elements=200), "num_elements"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gd.GeoditeConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown GeoditeConfig preset"):
        gd.GeoditeConfig.preset("huge")


@pytest.mark.slow  # default-suite time (CI 15 min on the slowest 2-vCPU hosts)
def test_initial_weights_do_not_depend_on_x64_mode():
    """x64 is on in the test session; a float32 process must draw the same weights from the same seed."""
    import subprocess
    import sys

    code = ("import jax, numpy as np, geodite_jax as gd; p = gd.init_params(gd.GeoditeConfig.preset('tiny'), 7); "
            "print(sum(float(np.asarray(x, np.float64).sum()) for x in jax.tree_util.tree_leaves(p)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = sum(float(np.asarray(x, np.float64).sum())
               for x in jax.tree_util.tree_leaves(gd.init_params(gd.GeoditeConfig.preset("tiny"), 7)))
    assert float(out.strip().splitlines()[-1]) == here


def test_remat_gives_the_same_numbers(tiny):
    import dataclasses

    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=1)
    results = []
    for remat in (False, True):
        pot = gd.Potential(dataclasses.replace(tiny.config, remat=remat), tiny.params, tiny.element_energies)
        atoms.calc = gd.GeoditeCalculator(pot, dtype="float64")
        results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12)
    np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-10)
    np.testing.assert_allclose(results[0][2], results[1][2], atol=1e-12)
