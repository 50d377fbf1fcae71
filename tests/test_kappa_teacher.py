"""experiments/kappa_teacher/run.py: material selection rule, training configurations, smoke run; and
``batched.known_elements`` (the diatomics benchmark's default elements) on trainer metadata (atomic numbers)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from ase.build import bulk, make_supercell

import geodite_jax as gd
from geodite_jax import batched as di  # known_elements, formerly in benchmarks.diatomics

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="module")
def kt():
    path = ROOT / "experiments" / "kappa_teacher" / "run.py"
    spec = importlib.util.spec_from_file_location("kappa_teacher_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _frame(atoms, mp_id):
    atoms.info.update(mp_id=mp_id, name=atoms.get_chemical_formula(mode="reduce"))
    return atoms


def test_select_materials_rule(kt):
    frames = [
        _frame(bulk("NaCl", "rocksalt", a=5.64, cubic=True), "mp-3"),    # 8 atoms, primitive 2: in
        _frame(bulk("LiF", "rocksalt", a=4.03), "mp-2"),                  # primitive already: in
        _frame(bulk("KCl", "rocksalt", a=6.29, cubic=True), "mp-1"),      # in
        _frame(bulk("NaBr", "rocksalt", a=5.97, cubic=True), "mp-4"),     # Br not allowed: out
        _frame(bulk("LiF", "wurtzite", a=3.2, c=5.2), "mp-5"),            # primitive 4 atoms: out
    ]
    chosen = kt.select_materials(frames, ["Li", "Na", "K", "F", "Cl"])
    # Ordered by the atomic numbers of the elements (Li-F, Na-Cl, K-Cl), not by input or mp-id order.
    assert [a.info["mp_id"] for a in chosen] == ["mp-2", "mp-3", "mp-1"]
    assert kt.select_materials(frames, ["Li", "F"], max_primitive_atoms=4)[1].info["mp_id"] == "mp-5"
    with pytest.raises(ValueError, match="no κ material"):
        kt.select_materials(frames, ["Mg", "O"])
    with pytest.raises(ValueError, match="unknown element"):
        kt.select_materials(frames, ["Xx"])


def test_truncated_rattle_statistics_and_bound(kt):
    rng = np.random.default_rng(0)
    u = kt.truncated_rattle(20000, 0.05, rng)
    assert u.shape == (20000, 3)
    assert np.abs(u).max() <= 3 * 0.05 + 1e-12
    assert abs(u.std() - 0.05) < 0.002  # clipping at 3σ removes only 0.3 % of the mass
    with pytest.raises(ValueError, match="amplitude"):
        kt.truncated_rattle(4, -0.1, rng)


def test_training_configurations(kt):
    nacl = _frame(bulk("NaCl", "rocksalt", a=5.64, cubic=True), "mp-22862")
    sc = np.diag([2, 2, 2])
    cells = kt.training_configurations(nacl, sc, seed=0)
    n_expected = (len(kt.RATTLE_AMPLITUDES) * kt.RATTLE_COPIES + len(kt.ISOTROPIC_STRAINS)
                  + len(kt.SHEAR_STRAINS) + len(kt.HOT_AMPLITUDES))
    assert len(cells) == n_expected
    assert {len(c) for c in cells} == {64}
    assert all(c.info["mp_id"] == "mp-22862" for c in cells)
    base = make_supercell(nacl, sc)
    for c in cells:
        sigma = c.info["amplitude"]
        if c.info["config_type"] in ("rattle", "hot"):
            assert np.allclose(c.cell.array, base.cell.array)
            # displacements bounded by the truncation and of the requested size
            u = c.positions - base.positions
            assert np.abs(u).max() <= kt.TRUNCATE_SIGMA * sigma + 1e-9
            assert 0.5 * sigma < np.sqrt(np.mean(u ** 2)) < 1.5 * sigma
        else:
            eps = c.info["strain"]
            assert 0 < eps <= 0.03 + 1e-12
            assert not np.allclose(c.cell.array, base.cell.array)
            # the cell changes by the strain: volumes differ by at most (1 + ε)³
            ratio = c.get_volume() / base.get_volume()
            assert (1 - eps) ** 3 - 1e-9 <= ratio <= (1 + eps) ** 3 + 1e-9
    again = kt.training_configurations(nacl, sc, seed=0)
    assert all(np.array_equal(a.positions, b.positions) and np.array_equal(a.cell.array, b.cell.array)
               for a, b in zip(cells, again, strict=True))
    other = kt.training_configurations(nacl, sc, seed=1)
    assert not np.allclose(cells[0].positions, other[0].positions)
    with pytest.raises(ValueError, match="non-singular"):
        kt.training_configurations(nacl, np.zeros((3, 3)))


def test_known_elements_from_trainer_metadata():
    # The trainer records atomic numbers; the diatomics benchmark needs symbols (bug: it returned "3", "9").
    config = gd.GeoditeConfig.preset("tiny")
    e0 = np.zeros(119)
    assert di.known_elements(SimpleNamespace(metadata={"elements": [3, 9]}, element_energies=e0,
                                             config=config)) == ["Li", "F"]
    assert di.known_elements(SimpleNamespace(metadata={"elements": ["Na"]}, element_energies=e0,
                                             config=config)) == ["Na"]
    e0[[1, 14]] = -1.0  # no metadata: the elements with an isolated-atom energy
    assert di.known_elements(SimpleNamespace(metadata={}, element_energies=e0, config=config)) == ["H", "Si"]


@pytest.mark.slow
def test_quick_run_end_to_end(kt, tmp_path):
    if not SHARED.exists():
        pytest.skip(f"needs the κ reference data under {SHARED} (absent)")
    assert kt.main(["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kappa"]["n_materials"] == 1
    kappa = json.loads((tmp_path / "kappa.json").read_text())
    row = kappa["rows"][0]
    assert row["name"] == "LiF" and row["q_mesh"] == [2, 2, 2]
    # random weights: imaginary modes score the maximum 2; a stable one has no SRME off the reference mesh
    assert row["SRME"] == 2.0 if row["failure"] else row["SRME"] is None
    # LiF: Li-Li, F-F and Li-F; the homonuclear ones scored against PBE
    diatomics = json.loads((tmp_path / "diatomics" / "diatomics.json").read_text())
    assert sorted(r["pair"] for r in diatomics["rows"]) == ["F-F", "Li-F", "Li-Li"]
    assert diatomics["summary"]["n_with_reference"] == 2
    assert (tmp_path / "diatomics_overview.png").stat().st_size > 1000
    assert (tmp_path / "report.md").read_text().count("##") >= 3
