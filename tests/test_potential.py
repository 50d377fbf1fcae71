"""The potential bundle: save/load round trip, clear errors, precision switch, the README example."""

from __future__ import annotations

import json
import shutil

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
    with pytest.raises(FileNotFoundError, match="no such directory: .*nowhere"):
        gd.Potential.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a geodite_jax potential"):
        gd.Potential.load(tmp_path / "empty")
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


@pytest.mark.slow  # default-suite time; the parity tests run both precisions against the reference
def test_float32_default_and_float64_agree(tiny):
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=2)
    calc32 = gd.GeoditeCalculator(tiny)
    calc64 = gd.GeoditeCalculator(tiny, dtype="float64")
    calc32.calculate(atoms, ["energy", "forces", "stress"])
    calc64.calculate(atoms, ["energy", "forces", "stress"])
    assert calc32._state.params["params"]["readout"].dtype == np.float32
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


# --------------------------------------------------------------------------------------- integrity
def _largest_chunk(path):
    return max((f for f in (path / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def test_checksum_catches_parameters_changed_behind_the_metadata(tiny, tmp_path):
    """Parameters that orbax reads without complaint but that are not the ones saved: one float
    differs by one ulp (a bit flip in a chunk, or a params folder copied from another run)."""
    import jax

    path = tiny.save(tmp_path / "model")
    meta = json.loads((path / "geodite.json").read_text())
    assert meta["checksum"] == tiny.checksum() and meta["checksum"].startswith("sha256:")
    leaves, treedef = jax.tree_util.tree_flatten(tiny.params)
    first = np.array(leaves[0])
    first.flat[0] = np.nextafter(first.flat[0], np.inf)
    edited = gd.Potential(tiny.config, jax.tree_util.tree_unflatten(treedef, [first, *leaves[1:]]),
                          tiny.element_energies, tiny.energy_scale, tiny.metadata)
    other = edited.save(tmp_path / "other")
    shutil.rmtree(path / "params")
    shutil.copytree(other / "params", path / "params")
    with pytest.raises(ValueError, match=f"{path}: the parameters.*do not match the checksum"):
        gd.Potential.load(path)


def test_flipped_byte_in_a_parameter_chunk_is_a_clear_error(tiny, tmp_path):
    """A flipped bit in a compressed chunk either breaks decompression or silently changes a float,
    depending on where it lands; both must be a ValueError that names the checkpoint."""
    path = tiny.save(tmp_path / "model")
    chunk = _largest_chunk(path)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path}(: the parameters.*do not match the checksum|: \w+Error)"):
        gd.Potential.load(path)


def test_checksum_covers_element_energies_and_scale(tiny, tmp_path):
    path = tiny.save(tmp_path / "model")
    meta = json.loads((path / "geodite.json").read_text())
    for key, change in (("energy_scale", lambda m: m["energy_scale"] * (1 + 1e-12)),
                        ("element_energies", lambda m: [e + (1e-6 if z == 29 else 0.0)
                                                        for z, e in enumerate(m["element_energies"])])):
        edited = {**meta, key: change(meta)}
        (path / "geodite.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match="do not match the checksum"):
            gd.Potential.load(path)
    # Format version 1 written before checksums were stored: loads, unchecked (documented in load()).
    legacy = {k: v for k, v in meta.items() if k != "checksum"}
    (path / "geodite.json").write_text(json.dumps(legacy))
    assert gd.Potential.load(path).checksum() == tiny.checksum()


def test_invalid_atomic_numbers_are_named(tiny):
    trained = gd.Potential(tiny.config, tiny.params, tiny.element_energies, tiny.energy_scale,
                           {"elements": [11, 17]})
    for pot in (tiny, trained):  # with and without a recorded element set
        for z in (119, -1, 0):
            with pytest.raises(ValueError, match=rf"unknown element: atomic number {z} at atom 1 "
                                                 r"\(valid atomic numbers are 1\.\.118\)") as err:
                pot.check_elements([11, z])
            assert "Og" not in str(err.value)
    atoms = bulk("NaCl", "rocksalt", a=5.64)  # and through the calculator (was an IndexError for Z=119)
    atoms.numbers[1] = 119
    atoms.calc = gd.GeoditeCalculator(trained, dtype="float64")
    with pytest.raises(ValueError, match="unknown element: atomic number 119"):
        atoms.get_potential_energy()
