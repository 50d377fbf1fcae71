"""The equal-budget accuracy benchmark (experiments/accuracy): split, prediction files, scoring, table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from geodite_jax.data import Frame

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "experiments" / "accuracy"
SHARED = ROOT.parent / "shared"


def _load(name: str):  # the benchmark scripts are not a package: import them by path
    spec = importlib.util.spec_from_file_location(f"accuracy_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec.loader.exec_module(module)
    return module


run = _load("run")
common = _load("common")


def _frames(n: int, periodic: bool = True, seed: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        k = 2 + i % 3
        stress = rng.normal(0, 1e-3, (3, 3)) if periodic else None
        frames.append(Frame(numbers=np.full(k, 14), positions=rng.uniform(0, 4, (k, 3)),
                            cell=np.eye(3) * (5.0 if periodic else 0.0), pbc=np.full(3, periodic),
                            energy=-5.0 * k + rng.normal(0, 0.1), forces=rng.normal(0, 0.5, (k, 3)),
                            stress=None if stress is None else (stress + stress.T) / 2, group="g", id=f"f{i}"))
    return frames


# ----------------------------------------------------------------------------------------------- split
def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, valid = run.split_indices(214)
    again_train, again_valid = run.split_indices(214)
    assert np.array_equal(train, again_train) and np.array_equal(valid, again_valid)
    assert len(valid) == 21 and len(train) == 193  # 10 % of mlearn Si's 214 training frames
    assert not set(train) & set(valid)
    assert sorted(np.concatenate([train, valid])) == list(range(214))
    other_train, _ = run.split_indices(214, seed=1)
    assert not np.array_equal(train, other_train)  # the seed matters


def test_split_sizes_at_the_edges() -> None:
    train, valid = run.split_indices(2)
    assert len(train) == 1 and len(valid) == 1
    train, valid = run.split_indices(500)
    assert len(valid) == 50 and len(train) == 450  # acac train_300K
    with pytest.raises(ValueError, match="at least 2 frames"):
        run.split_indices(1)
    with pytest.raises(ValueError, match="valid_fraction"):
        run.split_indices(10, valid_fraction=1.0)


def test_split_file_round_trip_keeps_labels_in_ase_units(tmp_path: Path) -> None:
    frames = _frames(4) + _frames(2, periodic=False, seed=1)
    path = run.write_split_file(frames, tmp_path / "s.extxyz")
    atoms = common.read_split(path)
    for frame, a in zip(frames, atoms, strict=True):
        energy, forces, stress = common.labels(a)
        assert energy == pytest.approx(frame.energy, abs=1e-9)
        np.testing.assert_allclose(forces, frame.forces, atol=1e-9)
        if frame.stress is None:
            assert stress is None
        else:
            np.testing.assert_allclose(stress, frame.stress, atol=1e-12)
    ds = run.test_dataset(path)  # what the scores read: the same labels
    assert len(ds) == 6
    np.testing.assert_allclose(ds.labels(1)["stress"], frames[1].stress, atol=1e-12)
    assert not ds.labels(5)["has_stress"]


def test_make_split_on_mlearn_is_written_once(tmp_path: Path) -> None:
    if not SHARED.is_dir():
        pytest.skip("../shared (the mlearn data) is absent")
    spec = run.DATASETS["Si"]
    meta = run.make_split(spec, tmp_path, SHARED / "data", quick=True)
    assert meta["counts"] == {"train": 13, "valid": 2, "test_test": 5}
    stamp = Path(meta["train"]).stat().st_mtime_ns
    assert run.make_split(spec, tmp_path, SHARED / "data", quick=True) == meta
    assert Path(meta["train"]).stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not set(meta["train_indices"]) & set(meta["valid_indices"])


# ----------------------------------------------------------------------------------------------- scoring
def test_score_and_table_on_hand_numbers(tmp_path: Path) -> None:
    frames = _frames(2)  # 2 and 3 atoms
    path = run.write_split_file(frames, tmp_path / "t.extxyz")
    ds = run.test_dataset(path)
    # Energy off by +0.01 eV/atom and -0.02 eV/atom; every force component by +0.003 eV/Å; stress by 1 GPa.
    from ase.units import GPa

    energy = [frames[0].energy + 0.02, frames[1].energy - 0.06]
    forces = [f.forces + 0.003 for f in frames]
    stress = [f.stress + 1.0 * GPa for f in frames]
    pred_path = common.write_predictions(tmp_path / "pred.npz", energy, forces, stress)
    pred = run.load_predictions(pred_path, ds.n_atoms)
    metrics = run.score(pred, ds)
    assert metrics["energy_mae"] == pytest.approx(15.0)  # meV/atom: (10 + 20) / 2
    assert metrics["energy_rmse"] == pytest.approx(np.sqrt((10**2 + 20**2) / 2))
    assert metrics["forces_mae"] == pytest.approx(3.0) and metrics["forces_rmse"] == pytest.approx(3.0)
    assert metrics["stress_mae"] == pytest.approx(1.0)
    row = run.table_row("Si", "test", "geodite", {"n_params": 10, "epochs": 3, "train_wall_s": 120.0,
                                                  "train_cpu_s": 60.0}, metrics)
    assert row["E MAE"] == pytest.approx(15.0) and row["train wall (min)"] == 2.0 and row["train CPU (min)"] == 1.0
    assert set(row) == set(run.TABLE_COLUMNS)


def test_predictions_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    frames = _frames(2)
    ds = run.test_dataset(run.write_split_file(frames, tmp_path / "t.extxyz"))
    bad = common.write_predictions(tmp_path / "bad.npz", [0.0, 0.0], [f.forces[:1] for f in frames],
                                   [None, None])
    with pytest.raises(ValueError, match="forces has shape"):
        run.load_predictions(bad, ds.n_atoms)


def test_molecules_get_no_stress_score(tmp_path: Path) -> None:
    frames = _frames(3, periodic=False)
    ds = run.test_dataset(run.write_split_file(frames, tmp_path / "m.extxyz"))
    pred = run.load_predictions(common.write_predictions(tmp_path / "p.npz", [f.energy for f in frames],
                                                         [f.forces for f in frames], [None] * 3), ds.n_atoms)
    metrics = run.score(pred, ds)
    # (the store keeps forces in float32: zero to ~1e-5 meV/Å)
    assert metrics["energy_mae"] < 1e-6 and metrics["forces_mae"] < 1e-4 and "stress_mae" not in metrics


def test_unknown_model_and_missing_venv_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        run.driver_command("allegro", tmp_path)
    with pytest.raises(FileNotFoundError, match="virtualenv"):
        run.driver_command("mace", tmp_path)


# ----------------------------------------------------------------------------------------------- smoke
@pytest.mark.slow
def test_quick_run_of_geodite_writes_table_and_plot(tmp_path: Path) -> None:
    """``run.py --quick --models geodite`` end to end (1 epoch on 13 frames: ~1-2 min on 2 cores)."""
    if not SHARED.is_dir():
        pytest.skip("../shared (the mlearn data) is absent")
    cmd = [sys.executable, str(BENCH / "run.py"), "--quick", "--models", "geodite", "--datasets", "Si",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = json.loads((tmp_path / "accuracy.json").read_text())
    (row,) = table["rows"]
    assert row["model"] == "geodite" and row["frames"] == 5 and row["params"] == 55396
    assert np.isfinite(row["E MAE"]) and np.isfinite(row["F MAE"]) and np.isfinite(row["S MAE"])
    assert (tmp_path / "parity_Si_test.png").stat().st_size > 10_000
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # resumable: nothing retrained
    assert again.returncode == 0 and "done before, skipped" in again.stdout
