"""``geodite md`` and ``geodite relax`` on CIF and POSCAR inputs, and their errors on bad input."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from ase.build import bulk
from ase.io import read, write
from conftest import sane_potential

import geodite_jax as gd
from geodite_jax.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny potential (perturbed weights, universal ZBL kept) trained on Na and Cl only."""
    sane = sane_potential()
    pot = gd.Potential(sane.config, sane.params, sane.element_energies, sane.energy_scale, {"elements": [11, 17]})
    return pot.save(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def nacl_cif(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "nacl.cif"
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    write(path, atoms, format="cif")
    return path


def test_md_cli_on_cif_writes_readable_trajectory(model_dir, nacl_cif, tmp_path, capsys):
    """NVE from a CIF (2x2x2 supercell via --repeat): ASE reads the frames back with energy, momenta and cell,
    and E_pot + E_kin from the file is conserved."""
    out, log = tmp_path / "traj.extxyz", tmp_path / "md.csv"
    code = main([
        "md", str(nacl_cif), "--model", str(model_dir), "--ensemble", "nve", "--temperature", "300",
        "--timestep-fs", "1", "--steps", "40", "--traj-every", "20", "--output", str(out), "--log", str(log),
        "--repeat", "2", "2", "2", "--dtype", "float64", "--skin", "0.3", "--quiet"])
    assert code == 0, capsys.readouterr().err
    frames = read(out, index=":")
    assert len(frames) == 3 and all(len(f) == 64 for f in frames)
    totals = [f.get_potential_energy() + f.get_kinetic_energy() for f in frames]
    assert np.ptp(totals) < 1e-3
    assert frames[-1].info["step"] == 40
    assert np.abs(frames[-1].get_momenta()).max() > 0 and frames[-1].cell.volume == pytest.approx(8 * 5.64**3)
    rows = list(csv.DictReader(log.open()))
    assert [int(r["step"]) for r in rows] == [0, 20, 40]
    assert float(rows[-1]["total_eV"]) == pytest.approx(totals[-1], abs=1e-6)


def test_relax_cli_on_poscar(model_dir, tmp_path, capsys):
    atoms = bulk("NaCl", "rocksalt", a=5.8)
    atoms.rattle(0.05, seed=1)
    poscar = tmp_path / "POSCAR"
    write(poscar, atoms, format="vasp")
    out = tmp_path / "relaxed.extxyz"
    code = main(["relax", str(poscar), "--model", str(model_dir), "--cell", "--fmax", "0.02", "--output", str(out)])
    assert code == 0, capsys.readouterr()
    relaxed = read(out)
    assert np.abs(relaxed.get_forces()).max() <= 0.02
    assert "converged" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "unreadable", "element", "model"])
def test_cli_bad_input_gives_clear_errors(model_dir, nacl_cif, tmp_path, capsys, case):
    args = ["--model", str(model_dir), "--output", str(tmp_path / "o.extxyz")]
    if case == "missing":
        argv, expected = ["relax", str(tmp_path / "nope.cif"), *args], "structure file not found"
    elif case == "unreadable":
        bad = tmp_path / "garbage.xyzz"
        bad.write_text("this is not a structure\n")
        argv, expected = ["md", str(bad), "--steps", "1", *args], "cannot read a structure"
    elif case == "element":
        cu = tmp_path / "cu.cif"
        write(cu, bulk("Cu", "fcc", a=3.61), format="cif")
        argv, expected = ["relax", str(cu), *args], "Cu (Z=29): not an element this potential was trained on"
    else:
        argv = ["relax", str(nacl_cif), "--model", str(tmp_path / "no_model"), "--output", str(tmp_path / "o")]
        expected = "model directory not found"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"geodite {argv[0]}: error:") and expected in err
