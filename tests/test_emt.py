"""EMT training set: determinism, labels equal a fresh EMT evaluation, stress sign, groups and compositions."""

from __future__ import annotations

import collections
import time

import numpy as np
import pytest
from ase.calculators.emt import EMT

from geodite_jax.data import generate_emt_frames
from geodite_jax.data.emt import EMT_LATTICE


@pytest.fixture(scope="module")
def frames():
    return generate_emt_frames(120, seed=11)


def test_deterministic(frames):
    again = generate_emt_frames(120, seed=11)
    assert all(a.equals(b) and a.info == b.info for a, b in zip(frames, again, strict=True))
    other = generate_emt_frames(20, seed=12)
    assert not any(a.equals(b, atol=1e-6) for a, b in zip(frames, other, strict=False))
    assert len({f.id for f in frames}) == len(frames)


@pytest.mark.parametrize("group", ["rattle", "strain", "vacancy", "md-300K", "md-1500K"])
def test_labels_equal_fresh_emt(frames, group):
    for frame in [f for f in frames if f.group == group][:2]:
        atoms = frame.to_atoms()
        atoms.calc = EMT()
        assert frame.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(frame.forces, atoms.get_forces(), atol=1e-9)
        np.testing.assert_allclose(frame.stress, atoms.get_stress(voigt=False), atol=1e-11)
        assert frame.pbc.all() and frame.info["labels"] == "EMT"


def test_groups_and_compositions(frames):
    counts = collections.Counter(f.group for f in frames)
    # Shares 0.25 / 0.2 / 0.1 / 0.15 x 3 of 120 frames, exactly.
    assert counts == {"rattle": 30, "strain": 24, "vacancy": 12, "md-300K": 18, "md-800K": 18, "md-1500K": 18}
    assert {f.info["structure"] for f in frames} == {"pure", "random", "L1_2"}
    assert set(np.concatenate([f.numbers for f in frames])) == {13, 28, 29}
    sizes = [len(f) for f in frames]
    assert min(sizes) >= 3 and max(sizes) <= 32 and len(set(sizes)) >= 5
    assert any(abs(f.cell[0] @ f.cell[1]) > 1.0 for f in frames)  # non-orthogonal (primitive) cells too
    for f in frames:
        if f.info["structure"] == "L1_2" and f.group != "vacancy":
            assert sorted(np.unique(f.numbers, return_counts=True)[1].tolist()) == [len(f) // 4, 3 * len(f) // 4]
    pure_cu = generate_emt_frames(10, seed=0, elements=("Cu",))
    assert all(set(f.numbers) == {29} for f in pure_cu)


def test_compressed_cells_have_negative_ase_stress():
    frames = generate_emt_frames(80, seed=5, groups={"strain": 1.0})
    checked = 0
    for f in frames:
        if f.info["structure"] != "pure":
            continue
        v0 = EMT_LATTICE[f.to_atoms().get_chemical_symbols()[0]] ** 3 / 4
        ratio = f.volume / len(f) / v0
        if ratio < 0.95:  # compressed: VASP would say positive pressure, ASE sign is negative
            assert np.trace(f.stress) < 0, (f.id, ratio)
            checked += 1
        elif ratio > 1.05:
            assert np.trace(f.stress) > 0, (f.id, ratio)
            checked += 1
    assert checked >= 5


def test_hotter_md_has_larger_forces(frames):
    rms = {g: np.sqrt(np.mean(np.concatenate([f.forces for f in frames if f.group == g]) ** 2))
           for g in ("md-300K", "md-800K", "md-1500K")}
    assert rms["md-300K"] < rms["md-800K"] < rms["md-1500K"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="EMT elements must be among"):
        generate_emt_frames(5, elements=("Fe",))
    with pytest.raises(ValueError, match="groups must map"):
        generate_emt_frames(5, groups={"melt": 1.0})
    assert generate_emt_frames(0) == []


@pytest.mark.slow
def test_1500_frames_under_a_minute():
    t0 = time.perf_counter()
    frames = generate_emt_frames(1500, seed=0)
    assert len(frames) == 1500 and time.perf_counter() - t0 < 60
