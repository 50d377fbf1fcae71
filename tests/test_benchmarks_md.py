"""MD analysis (geodite_jax.benchmarks.trajectory) on hand-checkable cases, and a smoke test of the argyrodite
pipeline's MD + analysis stages on the real AIMD start frame."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from geodite_jax.benchmarks import trajectory as mda

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AIMD = SHARED / "data" / "argyrodite-Li6PS5Cl-aimd"
needs_aimd = pytest.mark.skipif(not AIMD.exists(), reason=f"argyrodite AIMD data {AIMD} absent (../shared)")


def cubic(positions: np.ndarray, length: float, symbols: str | list[str] = "Ar") -> Atoms:
    n = len(positions)
    symbols = [symbols] * n if isinstance(symbols, str) else symbols
    return Atoms(symbols, positions=positions, cell=np.eye(3) * length, pbc=True)


# ---------------------------------------------------------------------------------------------- RDF
def test_ideal_gas_rdf_is_one() -> None:
    rng = np.random.default_rng(0)
    length, n = 12.0, 400
    frames = [cubic(rng.uniform(0, length, (n, 3)), length) for _ in range(20)]
    g = mda.rdf(frames, n_bins=30)
    assert g.edges[-1] == pytest.approx(6.0)  # half the box
    # Beyond the first bins (few counts), every bin is 1 within Poisson noise (~2-6 %).
    shell = 4 / 3 * np.pi * (g.edges[1:] ** 3 - g.edges[:-1] ** 3)
    expected_counts = 20 * n * (n - 1) / length**3 * shell / 2
    sigma = 1 / np.sqrt(expected_counts)
    ok = expected_counts > 50
    assert np.all(np.abs(g.total[ok] - 1) < 5 * sigma[ok])
    assert np.mean(g.total[ok]) == pytest.approx(1.0, abs=0.01)


def test_two_species_partials_of_random_gas() -> None:
    rng = np.random.default_rng(1)
    length = 11.0
    symbols = ["Li"] * 150 + ["S"] * 50
    frames = [cubic(rng.uniform(0, length, (200, 3)), length, symbols) for _ in range(20)]
    g = mda.rdf(frames, n_bins=10)
    assert set(g.partial) == {"Li-Li", "Li-S", "S-S"}
    assert np.allclose(g.get("S-Li"), g.partial["Li-S"])
    for key in ("Li-Li", "Li-S", "S-S", "total"):
        assert np.mean(g.get(key)[3:]) == pytest.approx(1.0, abs=0.04), key
    with pytest.raises(KeyError, match="available"):
        g.get("P-S")
    with pytest.raises(ValueError, match="not in the frames"):
        mda.rdf(frames[:1], pairs=[("Li", "P")])


def test_simple_cubic_first_peak_and_coordination() -> None:
    a, k = 2.5, 6
    grid = np.stack(np.meshgrid(*[np.arange(k)] * 3, indexing="ij"), -1).reshape(-1, 3) * a
    atoms = cubic(grid, a * k)
    g = mda.rdf([atoms], n_bins=300)
    dr = g.edges[1] - g.edges[0]
    first = int(np.argmax(g.total > 0))
    assert g.r[first] == pytest.approx(a, abs=dr)  # nothing closer than a, the first peak at a
    density = (len(atoms) - 1) / atoms.get_volume()  # partners of one atom (rdf's N(N - 1) normalisation)
    # Coordination integrals of a simple-cubic lattice: 6 at a, 6 + 12 at √2 a, + 8 at √3 a.
    assert mda.coordination_number(g.total, g.edges, density, 1.2 * a) == pytest.approx(6.0)
    assert mda.coordination_number(g.total, g.edges, density, 1.5 * a) == pytest.approx(18.0)
    assert mda.coordination_number(g.total, g.edges, density, 1.8 * a) == pytest.approx(26.0)


def test_triclinic_cell_rdf_matches_its_cubic_equivalent() -> None:
    # The same simple-cubic lattice described by a sheared (triclinic) cell gives the same RDF.
    a, k = 2.5, 6
    grid = np.stack(np.meshgrid(*[np.arange(k)] * 3, indexing="ij"), -1).reshape(-1, 3) * a
    cell = np.array([[k * a, 0, 0], [k * a, k * a, 0], [0, k * a, k * a]])  # b' = a + b, c' = b + c
    sheared = Atoms("Ar" * len(grid), positions=grid, cell=cell, pbc=True)
    sheared.wrap()
    r_max = mda.default_r_max(sheared.cell.array)
    assert r_max == pytest.approx(0.5 * np.min(mda.perpendicular_widths(cell)))
    # r_max = √3 a here exactly (a shell on the last edge): stop a little short so rounding cannot decide.
    g_tri = mda.rdf([sheared], n_bins=100, r_max=0.95 * r_max)
    g_cub = mda.rdf([cubic(grid, k * a)], n_bins=100, r_max=0.95 * r_max)
    assert g_tri.total.sum() > 0
    assert np.allclose(g_tri.total, g_cub.total)


# ----------------------------------------------------------------------------------- error / overlap
def test_identical_rdfs_overlap_one_and_shift_error_hand_computed() -> None:
    edges = np.linspace(0, 10, 101)
    g_ref = np.ones(100)
    g_ref[10:20] = 2.0  # a unit-height box of 10 bins over g = 1
    assert mda.rdf_error(g_ref, g_ref) == 0.0
    assert mda.rdf_overlap(g_ref, g_ref, edges) == 1.0
    shifted = np.roll(g_ref, 2)  # the box moved by 2 bins: 4 bins differ by 1, against 10 bins of |g - 1| = 1
    assert mda.rdf_error(g_ref, shifted, edges) == pytest.approx(40.0)
    assert mda.rdf_overlap(g_ref, shifted) == pytest.approx(0.6)
    # Beyond 100 % the error saturates at 100 (overlap 0).
    assert mda.rdf_error(g_ref, g_ref + 3.0) == 100.0
    with pytest.raises(ValueError, match="identically 1"):
        mda.rdf_error(np.ones(5), np.ones(5))
    with pytest.raises(ValueError, match="same bins"):
        mda.rdf_error(np.ones(5), np.ones(6))


# ---------------------------------------------------------------------------------------------- MSD
def test_constant_velocity_across_boundaries_msd_is_ballistic() -> None:
    length, dt_ps = 10.0, 0.1
    v = np.array([13.0, -7.0, 4.0])  # Å/ps: 1.3 Å per frame along x, many boundary crossings
    t = np.arange(60) * dt_ps
    start = np.array([[9.0, 1.0, 5.0], [2.0, 2.0, 2.0]])
    positions = (start[None] + t[:, None, None] * v) % length  # wrapped
    frames = [cubic(p, length) for p in positions]
    x = mda.unwrap(positions, np.eye(3) * length)
    assert np.allclose(x - x[0], t[:, None, None] * v)
    m = mda.msd_by_species(frames, dt_ps, max_lag=40, remove_drift=False)
    assert np.allclose(m.per_species["Ar"], (np.linalg.norm(v) * m.t_ps) ** 2)
    # With the drift removed, two atoms moving together have no displacement left.
    assert np.allclose(mda.msd_by_species(frames, dt_ps, remove_drift=True).per_species["Ar"], 0.0, atol=1e-18)


def test_random_walk_diffusivity() -> None:
    rng = np.random.default_rng(2)
    n_atoms, n_frames, step, dt_ps, length = 1000, 201, 0.3, 0.05, 15.0
    # ±step along each axis per frame: MSD = 3 step² n, so D = 3 step² / (6 dt) = step² / (2 dt).
    jumps = rng.choice([-step, step], size=(n_frames - 1, n_atoms, 3))
    x = np.concatenate([np.zeros((1, n_atoms, 3)), np.cumsum(jumps, axis=0)]) + rng.uniform(0, length, (n_atoms, 3))
    wrapped = x % length
    assert np.allclose(mda.unwrap(wrapped, np.eye(3) * length) - wrapped[0], x - x[0])
    m = mda.msd(mda.unwrap(wrapped, np.eye(3) * length), max_lag=50)
    t = np.arange(51) * dt_ps
    d = mda.diffusivity(t, m, (0.5, 2.5))
    expected = step**2 / (2 * dt_ps) * mda.A2_PER_PS_TO_CM2_PER_S
    assert d.D_cm2_s == pytest.approx(expected, rel=0.05)
    assert d.n_points == 41 and d.window_ps == (0.5, 2.5)
    with pytest.raises(ValueError, match="fit window"):
        mda.diffusivity(t, m, (10.0, 20.0))


# ---------------------------------------------------------------------------------------- stability
def _gas_frames(n_frames: int = 6, seed: int = 3) -> tuple[list[Atoms], np.ndarray]:
    rng = np.random.default_rng(seed)
    a, k = 3.0, 4
    grid = np.stack(np.meshgrid(*[np.arange(k)] * 3, indexing="ij"), -1).reshape(-1, 3) * a
    base = [cubic(grid + rng.normal(0, 0.05, grid.shape), a * k) for _ in range(n_frames)]
    return base, np.arange(n_frames) * 0.1


def test_stability_report_of_a_healthy_run() -> None:
    frames, t = _gas_frames()
    n = len(frames[0])
    energy = -3.0 * n + 0.002 * n * t  # drifts 2 meV/atom/ps
    temps = np.array([490.0, 510.0, 500.0, 495.0, 505.0, 500.0])
    forces = np.zeros((len(frames), n, 3))
    forces[2, 5] = [0.0, 3.0, 4.0]
    rep = mda.stability_report(frames, t, energy, temps, forces=forces, conserved_energy=energy * 0 + 1.0)
    assert rep.stable and rep.finite
    assert rep.energy_drift_meV_atom_ps == pytest.approx(2.0)
    assert rep.conserved_drift_meV_atom_ps == pytest.approx(0.0, abs=1e-9)
    assert rep.temperature_mean_K == pytest.approx(500.0) and rep.temperature_std_K == pytest.approx(np.std(temps))
    assert rep.max_force_eV_A == pytest.approx(5.0)
    assert 2.5 < rep.min_distance_A < 3.0 and rep.max_step_A < 0.5


def test_stability_report_flags_close_pair_and_flying_atom() -> None:
    frames, t = _gas_frames()
    frames[3].positions[1] = frames[3].positions[0] + [0.5, 0.0, 0.0]  # a pair 0.5 Å apart
    rep = mda.stability_report(frames, t, jump_A=2.5)
    assert not rep.stable
    assert rep.too_close_frames == [3] and rep.min_distance_frame == 3
    assert rep.min_distance_A == pytest.approx(0.5, abs=1e-9)
    assert 1 in rep.jumping_atoms  # it got there (and back) by a ~3 Å jump

    frames, t = _gas_frames()
    # Atom 7 flies off: isolated in a mostly empty bigger box, moving 4 Å per frame.
    big = []
    for k, atoms in enumerate(frames):
        big_atoms = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions.copy(), cell=np.eye(3) * 40,
                          pbc=True)
        big_atoms.positions[7] = [20.0 + 4.0 * k, 20.0, 20.0]
        big.append(big_atoms)
    rep = mda.stability_report(big, t)
    assert not rep.stable and rep.isolated_atoms == [7] and rep.jumping_atoms == [7]
    assert rep.max_step_A == pytest.approx(4.0)
    with pytest.raises(ValueError, match="must all be"):
        mda.stability_report(frames, t[:3])


def test_read_xdatcar_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="XDATCAR not found"):
        mda.read_xdatcar(tmp_path / "missing.gz")
    bad = tmp_path / "XDATCAR"
    bad.write_text("not an xdatcar\n")
    with pytest.raises(ValueError, match="cannot read|no frames"):
        mda.read_xdatcar(bad)


# ------------------------------------------------------------------------------------- real data
@needs_aimd
def test_aimd_reader_and_rdf_of_the_start_run() -> None:
    frames = mda.read_xdatcar(AIMD / "0p" / "run1" / "actual_XDATCAR.gz", index="::20")
    assert len(frames) == 7 and len(frames[0]) == 416
    assert frames[0].get_chemical_formula() == "Cl32Li192P32S160"
    g = mda.rdf(frames, pairs=[("P", "S")])
    # PS4 tetrahedra: every P has 4 S at ~2.05 Å and nothing else below 3 Å.
    density_s = 160 / frames[0].get_volume()
    assert mda.coordination_number(g.get("P-S"), g.edges, density_s, 2.6) == pytest.approx(4.0, abs=0.01)
    assert 1.9 < g.r[np.argmax(g.get("P-S"))] < 2.2


def _load_pipeline():
    path = Path(__file__).resolve().parents[1] / "experiments" / "argyrodite" / "run.py"
    spec = importlib.util.spec_from_file_location("argyrodite_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_aimd
def test_pipeline_analysis_stage_on_aimd_frames(tmp_path: Path) -> None:
    """The analysis stage with AIMD run 2 standing in for "ours": overlaps near 1, D of the same order, tables."""
    run = _load_pipeline()
    ours = mda.read_xdatcar(AIMD / "0p" / "run2" / "actual_XDATCAR.gz", index=":40")
    thermo = [{"time_ps": 0.1 * k, "total_eV": -1700.0, "conserved_eV": -1700.0, "temperature_K": 500.0,
               "potential_eV": -1727.0, "max_force_eV_A": 2.0} for k in range(len(ours))]
    refs = {r: mda.read_xdatcar(AIMD / r / "actual_XDATCAR.gz", index=":40") for r in ("0p/run1", "0p/run3")}
    summary = run.analyse(ours, thermo, refs, tmp_path, plots=False)
    assert summary["rdf_overlap_total_vs_pooled"] > 0.9  # two AIMD runs of the same system
    assert summary["rdf_overlap_P-S_vs_0p/run1"] > 0.8
    assert summary["stable"] and summary["energy_drift_meV_atom_ps"] == pytest.approx(0.0, abs=1e-9)
    assert 1e-7 < summary["D_Li_ours_cm2_s"] < 1e-3
    assert (tmp_path / "argyrodite_rdf.md").exists() and (tmp_path / "argyrodite_stability.json").exists()


@needs_aimd
@pytest.mark.slow
def test_pipeline_md_and_analysis_smoke(tmp_path: Path) -> None:
    """MD (jax-md NVT, random-weight tiny potential, a few blocks) from the real AIMD start frame, then the
    analysis stage against two AIMD runs: every artefact is written and the numbers are finite."""
    import geodite_jax as gd

    run = _load_pipeline()
    # Unperturbed initial weights: small, smooth forces (the perturbed `tiny` fixture explodes at 2 fs).
    pot = gd.Potential.init(gd.GeoditeConfig.preset("tiny"), seed=0)
    atoms = mda.read_xdatcar(AIMD / "0p" / "run1" / "actual_XDATCAR.gz", index=0)
    plan = run.run_md(pot, atoms, tmp_path / "md", steps=150, budget_s=600.0)
    assert plan["steps"] == 150 and plan["ms_per_step"] > 0
    import csv

    from ase.io import read

    thermo = list(csv.DictReader((tmp_path / "md" / "thermo.csv").open()))
    ours = read(tmp_path / "md" / "traj.extxyz", index=":")
    assert [int(r["step"]) for r in thermo] == [0, 50, 100, 150] and len(ours) == 4
    # A resumed run that is already finished changes nothing.
    run.run_md(pot, atoms, tmp_path / "md", steps=150, budget_s=600.0)
    assert len(read(tmp_path / "md" / "traj.extxyz", index=":")) == 4
    refs = {r: mda.read_xdatcar(AIMD / r / "actual_XDATCAR.gz", index=":30") for r in ("0p/run1", "0p/run2")}
    summary = run.analyse(ours, thermo, refs, tmp_path / "out", equilibration_ps=0.0)
    for name in ("argyrodite_rdf.md", "argyrodite_rdf.json", "argyrodite_stability.json", "argyrodite_rdf.png",
                 "argyrodite_msd.png", "argyrodite_thermo.png", "argyrodite_curves.npz"):
        assert (tmp_path / "out" / name).exists(), name
    assert 0.0 <= summary["rdf_overlap_total_vs_pooled"] <= 1.0
    assert np.isfinite(summary["D_Li_ours_cm2_s"]) and np.isfinite(summary["energy_drift_meV_atom_ps"])
    assert summary["min_distance_A"] > 1.0
