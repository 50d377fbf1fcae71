"""The potential bundle: save/load round trip, clear errors, precision switch, the README example."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk

import geodite_jax as gd


def test_save_load_round_trip(tiny, tmp_path):
    path = tiny.save(tmp_path / "model")
    loaded = gd.Potential.load(path)
    assert loaded.config == tiny.config and loaded.energy_scale == tiny.energy_scale
    np.testing.assert_array_equal(loaded.element_energies, tiny.element_energies)
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.rattle(0.05, seed=0)
    e = []
    for pot in (tiny, loaded):
        atoms.calc = gd.GeoditeCalculator(pot, dtype="float64")
        e.append(atoms.get_potential_energy())
    assert e[0] == e[1]
    tiny.save(path)  # overwriting an existing bundle works
    assert gd.Potential.load(path).num_params == tiny.num_params
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_load_errors_are_clear(tiny, tmp_path):
    path = tiny.save(tmp_path / "model")
    with pytest.raises(ValueError, match="does not fit the checkpoint"):
        gd.Potential.load(path, config=gd.GeoditeConfig.preset("tiny", num_features=16, edge_features=16,
                                                               edge_mlp_features=16))
    with pytest.raises(ValueError, match="not a geodite_jax potential"):
        gd.Potential.load(tmp_path / "nowhere")
    meta = json.loads((path / "geodite.json").read_text())
    meta["format_version"] = 99
    (path / "geodite.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 99"):
        gd.Potential.load(path)
    meta["format_version"] = 1
    meta["config"]["num_features"] = 64  # config no longer fits the stored arrays
    (path / "geodite.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="cannot read the parameters|shape"):
        gd.Potential.load(path)
    (path / "geodite.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        gd.Potential.load(path)


def test_corrupt_parameter_directory(tiny, tmp_path):
    path = tiny.save(tmp_path / "model")
    for f in (path / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read the parameters"):
        gd.Potential.load(path)


def test_params_that_do_not_fit_the_config_are_refused(tiny):
    with pytest.raises(ValueError, match="do not fit the config|needs"):
        gd.Potential(gd.GeoditeConfig.preset("mp"), tiny.params)


def test_float32_default_and_float64_agree(tiny):
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=2)
    calc32 = gd.GeoditeCalculator(tiny)
    calc64 = gd.GeoditeCalculator(tiny, dtype="float64")
    calc32.calculate(atoms, ["energy", "forces", "stress"])
    calc64.calculate(atoms, ["energy", "forces", "stress"])
    assert calc32._state["params"]["params"]["readout"].dtype == np.float32
    f64 = calc64.results["forces"]
    np.testing.assert_allclose(calc32.results["energy"], calc64.results["energy"], rtol=1e-5)
    np.testing.assert_allclose(calc32.results["forces"], f64, atol=1e-4 * max(1.0, np.abs(f64).max()))


def test_readme_example(tmp_path):
    """The README's quick start, at the Geodite-MP size."""
    pot = gd.Potential.init(gd.GeoditeConfig.preset("mp"), seed=0)
    atoms = bulk("NaCl", "rocksalt", a=5.64).repeat(3)
    atoms.calc = gd.GeoditeCalculator(pot)
    e = atoms.get_potential_energy()
    f = atoms.get_forces()
    s = atoms.get_stress()
    assert np.isfinite(e) and f.shape == (54, 3) and s.shape == (6,)
    np.testing.assert_allclose(f.sum(0), 0, atol=1e-3)
    pot.save(tmp_path / "my_model")
    pot2 = gd.Potential.load(tmp_path / "my_model")
    assert pot2.num_params == 3_623_112


def test_calculator_refuses_elements_the_potential_was_not_trained_on(tiny):
    trained = gd.Potential(tiny.config, tiny.params, tiny.element_energies, tiny.energy_scale,
                           {"elements": [11, 17]})
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.calc = gd.GeoditeCalculator(trained, dtype="float64")
    atoms.get_potential_energy()  # Na, Cl: fine
    atoms.symbols[0] = "K"
    with pytest.raises(ValueError, match=r"K \(Z=19\): not an element this potential was trained on \(Na, Cl\)"):
        atoms.get_potential_energy()
