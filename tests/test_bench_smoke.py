"""``geodite bench ...`` end to end with an untrained tiny Potential saved to disk (tiny budgets).

The commands run in-process through ``geodite_jax.cli.main``. One calculator per model file is shared
between commands (its compiled shapes are grow-only), which keeps this file to a few compilations.
"""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk

import geodite_jax as gd
from geodite_jax.batched import dimer_curves
from geodite_jax.benchmarks import diatomics as di
from geodite_jax.benchmarks import phonons as ph
from geodite_jax.cli import bench as bench_cli
from geodite_jax.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "tiny-model"
    tiny.save(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def shared_calculator():
    """Memoise ``bench._load`` per (model, dtype) so the commands reuse one compiled calculator."""
    cache: dict = {}
    original = bench_cli._load

    def load(args):
        key = (str(args.model), args.dtype)
        if key not in cache:
            cache[key] = original(args)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_cli, "_load", load)
        yield


def test_bench_phonons_si_primitive(model_dir, tmp_path):
    ase.io.write(tmp_path / "si.extxyz", bulk("Si", "diamond", a=5.43))
    out = tmp_path / "out"
    assert main(["bench", "phonons", "--model", str(model_dir), str(tmp_path / "si.extxyz"), "--supercell", "2", "2",
                 "2", "--mesh", "3", "3", "3", "--out", str(out)]) == 0
    rows = json.loads((out / "phonons.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["failure"] is None
    assert rows[0]["heat_capacity_J_K_mol"] is not None and "| si-0 |" in (out / "phonons.md").read_text()


def test_bench_discovery_two_structures_resumes(model_dir, tmp_path):
    si, nacl = bulk("Si", "diamond", a=5.43), bulk("NaCl", "rocksalt", a=5.6)
    si.info["material_id"], nacl.info["material_id"] = "si", "nacl"
    nacl.info["dft_energy"] = -6.8  # a stand-in "DFT" energy, so the row is scored
    ase.io.write(tmp_path / "s.extxyz", [si, nacl])
    from pymatgen.entries.computed_entries import ComputedEntry

    refs = [ComputedEntry(el, e).as_dict() for el, e in (("Si", -5.4), ("Na", -1.3), ("Cl", -1.8))]
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    out = tmp_path / "out"
    args = ["bench", "discovery", "--model", str(model_dir), str(tmp_path / "s.extxyz"), "--references",
            str(tmp_path / "refs.json"), "--max-steps", "10", "--out", str(out)]
    assert main(args) == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["si", "nacl"]
    data = json.loads((out / "discovery.json").read_text())
    assert data["summary"]["n_structures"] == 2 and data["summary"]["n_scored"] == 1
    nacl_row = next(r for r in data["rows"] if r["id"] == "nacl")
    # True hull distance by hand: (−6.8 − 0.614 (MP2020 Cl) − (−1.3 − 1.8)) / 2 below the elemental hull.
    assert nacl_row["e_hull_true"] == pytest.approx((-6.8 - 0.614 + 3.1) / 2)
    assert main(args) == 0  # resumed: nothing recomputed, nothing duplicated
    assert (out / "predictions.jsonl").read_text().splitlines() == lines


def test_bench_diatomics_two_elements(model_dir, tmp_path, tiny):
    out = tmp_path / "out"
    args = ["bench", "diatomics", "--model", str(model_dir), "--elements", "Si", "H", "--hetero", "--out", str(out)]
    assert main(args) == 0
    data = json.loads((out / "diatomics.json").read_text())
    assert [r["pair"] for r in data["rows"]] == ["Si-Si", "H-H", "Si-H"]
    assert all("tortuosity" in r for r in data["rows"])
    if SHARED.exists():
        assert data["summary"]["n_with_reference"] == 2
    pytest.importorskip("matplotlib")
    assert (out / "plots" / "Si-Si.png").stat().st_size > 0


def test_dimer_curves_physics(tiny):
    """Forces are the distance derivative, equal and opposite; beyond the cutoff E = E0(A) + E0(B), F = 0."""
    curves = dimer_curves(tiny, [("Si", "H")], di.DISTANCES, di.BOX)["Si-H"]
    r, e, f = curves["distances"], curves["energies"], curves["forces"]
    np.testing.assert_allclose(f[:, 1], -f[:, 0], atol=1e-10)
    assert np.abs(f[:, :, 1:]).max() < 1e-10  # no force off the bond axis
    i = np.arange(40, 100)
    numeric = (e[i + 1] - e[i - 1]) / (r[i + 1] - r[i - 1])
    central = f[i, 0, 0]
    assert np.abs(numeric - central).max() < 0.02 * np.abs(central).max() + 1e-3  # F_x(atom 0) = +dE/dr
    far = r > tiny.config.cutoff
    e0 = tiny.element_energies[14] + tiny.element_energies[1]
    np.testing.assert_allclose(e[far], e0, atol=1e-8)
    assert np.abs(f[far]).max() < 1e-10


@pytest.mark.skipif(not ph.phono3py_available(), reason="phono3py (optional extra) not installed")
@pytest.mark.skipif(not SHARED.exists(), reason=f"shared data folder {SHARED} absent (κ reference materials)")
@pytest.mark.slow
def test_bench_kappa_one_material(model_dir, tmp_path):
    """One reference material, reduced mesh and relaxation: 512- and 64-atom supercells (two compilations)."""
    out = tmp_path / "out"
    assert main(["bench", "kappa", "--model", str(model_dir), "--materials", "1", "--q-mesh", "3", "3", "3",
                 "--max-steps", "5", "--fc3-pair-cutoff", "3.0", "--out", str(out)]) == 0
    data = json.loads((out / "kappa.json").read_text())
    row = data["rows"][0]
    assert row["mp_id"] == "mp-19717" and row["kappa_dft"] == pytest.approx(0.984, rel=1e-3)
    # An untrained model: either κ on the coarse mesh (SRME undefined) or a recorded failure with SRME 2.
    assert (row["failure"] is None and row["SRME"] is None) or row["SRME"] == 2.0


def test_bench_errors_are_clear(model_dir, tmp_path, capsys):
    assert main(["bench", "diatomics", "--model", str(tmp_path / "nope")]) == 2
    assert "model directory" in capsys.readouterr().err
    assert main(["bench", "diatomics", "--model", str(model_dir), "--elements", "Xx"]) == 2
    assert "unknown element" in capsys.readouterr().err
    assert isinstance(gd.Potential.load(model_dir), gd.Potential)
