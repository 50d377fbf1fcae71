"""Readers: the exact MPtrj/mlearn/extxyz/ase-db layouts, unit and sign conversions, errors, streaming, splits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from geodite_jax.data import (
    Frame,
    detect_format,
    kbar_to_ase_stress,
    mlearn_voigt_to_3x3,
    read_frames,
    split_frames,
    split_indices,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EV_PER_A3_PER_GPA = 1 / 160.21766208  # 1 GPa in eV/Å³, by hand from e = 1.602176634e-19 C


def _site(symbol, xyz=None, abc=None):
    site = {"species": [{"element": symbol, "occu": 1}], "label": symbol, "properties": {}}
    if xyz is not None:
        site["xyz"] = xyz
    if abc is not None:
        site["abc"] = abc
    return site


def _structure(matrix, sites):
    return {"@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0,
            "lattice": {"matrix": matrix, "pbc": [True, True, True], "a": 1, "b": 1, "c": 1, "alpha": 90,
                        "beta": 90, "gamma": 90, "volume": 1},
            "sites": sites}


def _mptrj_record(mp_id, structure, e_raw, e_corr, force, stress_kbar, magmom=None):
    n = len(structure["sites"])
    return {"structure": structure, "uncorrected_total_energy": e_raw, "corrected_total_energy": e_corr,
            "energy_per_atom": e_corr / n, "ef_per_atom": -0.1, "e_per_atom_relaxed": e_corr / n,
            "ef_per_atom_relaxed": -0.1, "force": force, "stress": stress_kbar, "magmom": magmom, "bandgap": 0.5,
            "mp_id": mp_id}


def _mptrj_data():
    """Two materials in the MPtrj_2022.9_full.json layout, hand-written numbers."""
    cu = _structure([[3.6, 0, 0], [0, 3.6, 0], [0, 0, 3.6]],
                    [_site("Cu", xyz=[0, 0, 0]), _site("Cu", abc=[0.5, 0.5, 0.0])])  # second site: abc only
    nacl = _structure([[0, 2.8, 2.8], [2.8, 0, 2.8], [2.8, 2.8, 0]],
                      [_site("Na", xyz=[0, 0, 0]), _site("Cl", xyz=[2.8, 2.8, 2.8])])
    return {
        "mp-30": {
            "mp-30-0-0": _mptrj_record("mp-30", cu, -7.5, -7.6, [[0.1, 0.0, -0.2], [-0.1, 0.0, 0.2]],
                                       [[10.0, 0, 0], [0, 0, 0], [0, 0, 0]], magmom=[0.01, -0.02]),
            "mp-30-1-4": _mptrj_record("mp-30", cu, -7.4, -7.5, [[0, 0, 0], [0, 0, 0]],
                                       [[-1.0, 2.0, 0], [2.0, -1.0, 0], [0, 0, -1.0]]),
        },
        "mp-22862": {
            "mp-22862-0-1": _mptrj_record("mp-22862", nacl, -6.8, -7.414, [[0.3, 0, 0], [-0.3, 0, 0]],
                                          [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]),
        },
    }


@pytest.fixture
def mptrj_file(tmp_path):
    path = tmp_path / "MPtrj_2022.9_full.json"
    path.write_text(json.dumps(_mptrj_data()))
    return path


def test_kbar_conversion_by_hand():
    # 10 kBar = 1 GPa = 6.2415e-3 eV/Å³; VASP's positive (compressive) -> ASE negative.
    assert kbar_to_ase_stress(10.0) == pytest.approx(-EV_PER_A3_PER_GPA, rel=1e-8)
    assert kbar_to_ase_stress(1.0) == pytest.approx(-6.2415e-4, rel=1e-4)
    np.testing.assert_array_equal(mlearn_voigt_to_3x3([1, 2, 3, 4, 5, 6]), [[1, 4, 6], [4, 2, 5], [6, 5, 3]])


def test_mptrj_json(mptrj_file):
    assert detect_format(mptrj_file) == "mptrj-json"
    frames = list(read_frames(mptrj_file))
    assert [f.id for f in frames] == ["mp-30-0-0", "mp-30-1-4", "mp-22862-0-1"]
    assert [f.group for f in frames] == ["mp-30", "mp-30", "mp-22862"]
    cu, cu2, nacl = frames
    np.testing.assert_array_equal(cu.numbers, [29, 29])
    np.testing.assert_allclose(cu.positions, [[0, 0, 0], [1.8, 1.8, 0]])  # abc [0.5, 0.5, 0] @ cell
    assert cu.pbc.all() and cu.energy == -7.5
    np.testing.assert_allclose(cu.forces, [[0.1, 0.0, -0.2], [-0.1, 0.0, 0.2]])
    np.testing.assert_allclose(cu.stress, np.diag([-EV_PER_A3_PER_GPA, 0, 0]), rtol=1e-8)
    assert cu.stress[0, 0] == pytest.approx(-6.2415e-3, rel=1e-4)
    np.testing.assert_allclose(cu2.stress[0, 1], -2.0 * EV_PER_A3_PER_GPA / 10, rtol=1e-8)
    assert cu2.stress[0, 0] > 0  # -1 kBar (VASP: tensile) -> positive in ASE sign
    np.testing.assert_allclose(cu.info["magmoms"], [0.01, -0.02])
    assert "magmoms" not in cu2.info  # magmom null
    np.testing.assert_array_equal(nacl.numbers, [11, 17])
    assert cu.info["corrected_total_energy"] == -7.6 and nacl.info["uncorrected_total_energy"] == -6.8
    corrected = list(read_frames(mptrj_file, energy="corrected"))
    assert [f.energy for f in corrected] == [-7.6, -7.5, -7.414]
    np.testing.assert_array_equal(corrected[0].forces, cu.forces)  # corrections never touch forces


def test_mptrj_streams_before_the_end(tmp_path):
    text = json.dumps(_mptrj_data())
    path = tmp_path / "truncated.json"
    path.write_text(text[: text.index('"mp-22862"') + 40])  # the second material is cut off mid-way
    frames = read_frames(path, format="mptrj-json")
    assert next(frames).id == "mp-30-0-0"  # yielded although the file is broken further on
    assert next(frames).id == "mp-30-1-4"
    with pytest.raises(ValueError, match="truncated"):
        next(frames)


def test_malformed_frames_raise_or_skip(tmp_path, caplog):
    data = _mptrj_data()
    data["mp-30"]["mp-30-1-4"]["force"] = [[0.0, 0.0, 0.0]]  # 1 force for 2 atoms
    data["mp-22862"]["mp-22862-0-1"]["structure"]["sites"][1]["species"][0]["element"] = "Xx"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad\.json: frame 'mp-30-1-4'.*forces must have shape \[2, 3\]"):
        list(read_frames(path))
    with caplog.at_level(logging.WARNING, logger="geodite_jax.data"):
        frames = list(read_frames(path, on_error="skip"))
    assert [f.id for f in frames] == ["mp-30-0-0"]
    assert "mp-30-1-4" in caplog.text and "unknown element symbol 'Xx'" in caplog.text


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        list(read_frames(tmp_path / "absent.json"))
    (tmp_path / "x.cif").write_text("data_x")
    with pytest.raises(ValueError, match="cannot detect the format"):
        list(read_frames(tmp_path / "x.cif"))
    with pytest.raises(ValueError, match="energy must be"):
        list(read_frames(tmp_path / "x.cif", energy="raw"))


def test_mlearn_json(tmp_path):
    structure = _structure([[5.43, 0, 0], [0, 5.43, 0], [0, 0, 5.43]],
                           [_site("Si", xyz=[0, 0, 0]), _site("Si", xyz=[1.3575, 1.3575, 1.3575])])
    records = [{"structure": structure, "outputs": {"energy": -10.8, "forces": [[0.5, 0, 0], [-0.5, 0, 0]],
                                                    "virial_stress": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]},
                "num_atoms": 2, "element": "Si", "group": "Elastic", "tag": "train", "description": "x"}] * 2
    path = tmp_path / "Si" / "training.json"
    path.parent.mkdir()
    path.write_text(json.dumps(records))
    assert detect_format(path) == "mlearn-json"
    frames = list(read_frames(path))
    assert [f.id for f in frames] == ["Si/training.json:0", "Si/training.json:1"]
    f = frames[0]
    assert f.group == "Elastic" and f.energy == -10.8
    k = -EV_PER_A3_PER_GPA / 10  # eV/Å³ per VASP kBar
    np.testing.assert_allclose(f.stress, k * np.array([[1, 4, 6], [4, 2, 5], [6, 5, 3]]), rtol=1e-8)
    with pytest.raises(ValueError, match="no corrected energies"):
        list(read_frames(path, energy="corrected"))


def _labelled_atoms(seed):
    rng = np.random.default_rng(seed)
    atoms = Atoms("Cu3Au", positions=rng.uniform(0, 3.8, (4, 3)), cell=np.diag([3.8, 3.9, 4.0]), pbc=True)
    labels = {"energy": float(rng.normal()), "forces": rng.normal(size=(4, 3)),
              "stress": rng.normal(size=6) * 1e-3}
    return atoms, labels


def test_extxyz_default_and_custom_keys(tmp_path):
    path, custom = tmp_path / "a.extxyz", tmp_path / "b.extxyz"
    plain, tagged, expected = [], [], []
    for seed in range(3):
        atoms, lab = _labelled_atoms(seed)
        a = atoms.copy()
        a.calc = SinglePointCalculator(a, **lab)
        a.info["config_type"] = f"cfg{seed}"
        plain.append(a)
        b = atoms.copy()
        b.info["REF_energy"] = lab["energy"]
        b.arrays["REF_forces"] = lab["forces"]
        b.info["REF_stress"] = lab["stress"]
        tagged.append(b)
        expected.append(lab)
    ase.io.write(path, plain, format="extxyz")
    ase.io.write(custom, tagged, format="extxyz")
    for frames in (list(read_frames(path)),
                   list(read_frames(custom, energy_key="REF_energy", forces_key="REF_forces",
                                    stress_key="REF_stress"))):
        assert len(frames) == 3
        for f, lab in zip(frames, expected, strict=True):
            assert f.energy == pytest.approx(lab["energy"], abs=1e-10)
            np.testing.assert_allclose(f.forces, lab["forces"], atol=1e-10)
            s = lab["stress"]  # ASE Voigt xx yy zz yz xz xy
            np.testing.assert_allclose(f.stress, [[s[0], s[5], s[4]], [s[5], s[1], s[3]], [s[4], s[3], s[2]]],
                                       atol=1e-12)
    assert [f.group for f in read_frames(path)] == ["cfg0", "cfg1", "cfg2"]
    assert next(read_frames(path)).id == f"{tmp_path.name}/a.extxyz:0"


def test_extxyz_stress_in_kbar_is_refused(tmp_path):
    atoms, lab = _labelled_atoms(0)
    atoms.calc = SinglePointCalculator(atoms, energy=lab["energy"], forces=lab["forces"],
                                       stress=np.array([50.0, 50.0, 50.0, 0, 0, 0]))
    path = tmp_path / "kbar.extxyz"
    ase.io.write(path, atoms, format="extxyz")
    with pytest.raises(ValueError, match=r"kBar.*kbar\.extxyz|kbar\.extxyz.*kBar"):
        list(read_frames(path))


def test_ase_db(tmp_path):
    path = tmp_path / "set.db"
    db = ase.db.connect(path)
    expected = []
    for seed in range(2):
        atoms, lab = _labelled_atoms(seed)
        atoms.calc = SinglePointCalculator(atoms, **lab)
        db.write(atoms, group=f"g{seed}")
        expected.append(lab)
    assert detect_format(path) == "ase-db"
    frames = list(read_frames(path))
    assert [f.group for f in frames] == ["g0", "g1"]
    assert [f.id for f in frames] == [f"{tmp_path.name}/set.db:1", f"{tmp_path.name}/set.db:2"]
    for f, lab in zip(frames, expected, strict=True):
        assert f.energy == pytest.approx(lab["energy"])
        np.testing.assert_allclose(f.forces, lab["forces"])
        assert f.stress[1, 2] == pytest.approx(lab["stress"][3])
    with pytest.raises(FileNotFoundError):
        list(read_frames(tmp_path / "absent.db"))
    assert not (tmp_path / "absent.db").exists()  # ase.db.connect would have created it


def test_frame_validation_and_round_trip():
    atoms, lab = _labelled_atoms(3)
    frame = Frame(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, energy=lab["energy"],
                  forces=lab["forces"], stress=lab["stress"], group="g", id="x:1", info={"k": 1})
    back = Frame.from_atoms(frame.to_atoms())
    assert back.equals(frame, atol=1e-12) and back.info["k"] == 1
    with pytest.raises(ValueError, match="frame 'bad': empty structure"):
        Frame(np.zeros(0, int), np.zeros((0, 3)), np.eye(3), [True] * 3, id="bad")
    with pytest.raises(ValueError, match="energy is nan"):
        Frame(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, energy=float("nan"))
    with pytest.raises(ValueError, match="forces contains NaN"):
        Frame(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, forces=np.full((4, 3), np.inf))
    with pytest.raises(ValueError, match="positions must have shape"):
        Frame(atoms.numbers, atoms.positions[:3], atoms.cell.array, atoms.pbc)


def test_split_indices():
    parts = split_indices(103, [0.8, 0.1, 0.1], seed=4)
    assert [len(p) for p in parts] == [82, 11, 10]  # cumulative cuts round(82.4), round(92.7)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(103))
    assert all(np.array_equal(a, b) for a, b in zip(parts, split_indices(103, [0.8, 0.1, 0.1], seed=4),
                                                    strict=True))
    assert not np.array_equal(parts[1], split_indices(103, [0.8, 0.1, 0.1], seed=5)[1])
    groups = [f"mp-{k // 7}" for k in range(140)]  # 20 materials of 7 frames
    by_group = split_indices(140, [0.75, 0.25], seed=0, groups=groups)
    seen = [{groups[i] for i in part} for part in by_group]
    assert not seen[0] & seen[1] and len(seen[0]) + len(seen[1]) == 20
    assert 90 <= len(by_group[0]) <= 120
    with pytest.raises(ValueError, match="sum to 1"):
        split_indices(10, [0.5, 0.4])
    frames = [Frame([1], [[0, 0, 0]], np.zeros((3, 3)), [False] * 3, id=str(k), group=groups[k]) for k in range(140)]
    train, test = split_frames(frames, [0.75, 0.25], seed=0, by_group=True)
    assert {f.id for f in test} == {str(i) for i in by_group[1]}


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="needs ../shared/data (real DFT files), absent here")
def test_real_mptrj_sample_extxyz():
    path = SHARED / "data" / "mptrj-sample" / "mptrj_8frames_mp-1028232.extxyz"
    frames = list(read_frames(path))
    assert len(frames) == 8 and all(len(f) == 16 and f.group == "mp-1028232" for f in frames)
    assert frames[0].id == "mp-1028232-0-3" and frames[0].energy == pytest.approx(-30.69383528)
    # Already eV/Å³ in ASE sign: the first frame's σ_zz is 1.27e-3 eV/Å³ (0.2 GPa), unconverted.
    assert frames[0].stress[2, 2] == pytest.approx(0.0012725152293022403)
    assert max(np.abs(f.stress).max() for f in frames) < 0.05
    corrected = list(read_frames(path, energy="corrected"))
    # MP2020: one Sb anion correction of -0.192 eV on every frame (SOURCE.md).
    np.testing.assert_allclose([c.energy - f.energy for c, f in zip(corrected, frames, strict=True)], -0.192,
                               atol=1e-6)


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="needs ../shared/data (real DFT files), absent here")
def test_real_mlearn_si_sign():
    folder = SHARED / "data" / "mlearn-zuo2020" / "Si"
    test = list(read_frames(folder / "test.json"))
    assert len(test) == 25 and test[0].id == "Si/test.json:0"
    assert {f.group for f in test} == {"AIMD-NVT", "Elastic", "Surface", "Vacancy"}
    frames = test + list(read_frames(folder / "training.json"))
    volume = np.array([f.volume / len(f) for f in frames])
    pressure_gpa = np.array([-np.trace(f.stress) / 3 for f in frames]) / EV_PER_A3_PER_GPA
    # SOURCE.md: cells compressed to 18.3 Å³/atom give +118 kBar, expanded to 22.4 Å³/atom -67 kBar (VASP sign),
    # i.e. a negative ASE stress when compressed.
    elastic = np.array([f.group == "Elastic" for f in frames])
    volume, pressure_gpa = volume[elastic], pressure_gpa[elastic]
    assert volume.min() == pytest.approx(18.3, abs=0.05) and volume.max() == pytest.approx(22.4, abs=0.05)
    assert pressure_gpa[np.argmin(volume)] == pytest.approx(11.8, abs=0.1)
    assert pressure_gpa[np.argmax(volume)] == pytest.approx(-6.7, abs=0.1)
    assert np.corrcoef(volume, pressure_gpa)[0, 1] < -0.5


# --------------------------------------------------------------------------------------- broken extxyz
def _extxyz_lines(n_frames, tmp_path):
    frames = []
    for seed in range(n_frames):
        atoms, lab = _labelled_atoms(seed)
        atoms.calc = SinglePointCalculator(atoms, **lab)
        frames.append(atoms)
    ase.io.write(tmp_path / "whole.extxyz", frames, format="extxyz")
    return (tmp_path / "whole.extxyz").read_text().splitlines(keepends=True)


def test_truncated_extxyz_names_file_frame_and_reason_and_skips(tmp_path, caplog):
    lines = _extxyz_lines(3, tmp_path)
    n = int(lines[0])
    path = tmp_path / "truncated.extxyz"
    path.write_text("".join(lines[:2 * (n + 2) + 2 + 1]))  # frame 2 keeps 1 of its n atom lines
    with pytest.raises(ValueError, match=rf"truncated\.extxyz: frame 2 \(line {2 * (n + 2) + 1}\): the file ends "
                                         rf"after 1 of its {n} atom lines \(truncated\)"):
        list(read_frames(path))
    with caplog.at_level(logging.WARNING, logger="geodite_jax.data"):
        frames = list(read_frames(path, on_error="skip"))
    assert [f.id.split(":")[-1] for f in frames] == ["0", "1"] and "frame 2" in caplog.text
    # A frame cut in the middle of the file (the next frame follows at once): that frame alone is lost.
    cut = tmp_path / "cut.extxyz"
    cut.write_text("".join(lines[:n + 2 + 2 + 1] + lines[2 * (n + 2):]))
    with pytest.raises(ValueError, match=rf"cut\.extxyz: frame 1 .*has 1 atom lines, expected {n}"):
        list(read_frames(cut))
    frames = list(read_frames(cut, on_error="skip"))
    assert [f.id.split(":")[-1] for f in frames] == ["0", "2"]
    assert frames[1].energy == pytest.approx(_labelled_atoms(2)[1]["energy"])
    bad = tmp_path / "bad_line.extxyz"
    broken = list(lines)
    broken[3] = "Cu 0.0 zero 0.0\n"  # an unparsable coordinate in frame 0
    bad.write_text("".join(broken))
    with pytest.raises(ValueError, match=r"bad_line\.extxyz: frame 0 \(line 1\): cannot parse the frame"):
        list(read_frames(bad))
    assert len(list(read_frames(bad, on_error="skip"))) == 2
