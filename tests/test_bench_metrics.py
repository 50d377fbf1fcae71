"""Benchmark metrics on hand-computed cases: discovery classification/regression, CPS, MP2020 and hulls,
κ SRME/SRD, Wigner mode splitting, harmonic phonons (EMT), diatomic smoothness and PBE comparison."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from geodite_jax.benchmarks import diatomics as di
from geodite_jax.benchmarks import discovery as disc
from geodite_jax.benchmarks import phonons as ph

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"shared data folder {SHARED} absent")


# ------------------------------------------------------------------------------------------- discovery
def test_stable_metrics_hand_confusion_matrix():
    true = [-0.10, -0.05, 0.02, 0.30, -0.20, 0.10]
    pred = [-0.02, 0.05, -0.01, 0.40, math.nan, 0.20]  # the NaN counts as predicted unstable
    m = disc.stable_metrics(true, pred)
    assert (m["TP"], m["FN"], m["FP"], m["TN"]) == (1, 2, 1, 2)
    assert m["Precision"] == pytest.approx(1 / 2)
    assert m["Recall"] == m["TPR"] == pytest.approx(1 / 3)
    assert m["F1"] == pytest.approx(0.4)
    assert m["Accuracy"] == pytest.approx(0.5)
    assert m["FPR"] == pytest.approx(1 / 3) and m["TNR"] == pytest.approx(2 / 3) and m["FNR"] == pytest.approx(2 / 3)
    assert m["DAF"] == pytest.approx(0.5 / 0.5)  # prevalence 3/6
    # Regression over the 5 finite rows: errors 0.08, 0.10, −0.03, 0.10, 0.10.
    assert m["MAE"] == pytest.approx(0.41 / 5)
    assert m["RMSE"] == pytest.approx(math.sqrt(0.0373 / 5))
    assert m["R2"] == pytest.approx(1 - 0.0373 / 0.09832)
    assert m["n_missing"] == 1


def test_stable_metrics_threshold_is_inclusive_and_prevalence_override():
    m = disc.stable_metrics([0.0, 0.1, -0.1, 0.2], [0.0, -0.05, 0.3, 0.1], prevalence=0.25)
    assert (m["TP"], m["FN"], m["FP"], m["TN"]) == (1, 1, 1, 1)  # 0.0 is stable on both sides
    assert m["DAF"] == pytest.approx(0.5 / 0.25)
    with pytest.raises(ValueError, match="NaN"):
        disc.stable_metrics([math.nan], [0.0])
    with pytest.raises(ValueError, match="equal length"):
        disc.stable_metrics([0.0, 1.0], [0.0])


def test_r2_matches_definition():
    y, p = [1.0, 2.0, 3.0, 4.0], [1.1, 1.9, 3.2, 3.8]
    assert disc.r2_score(y, p) == pytest.approx(1 - (0.01 + 0.01 + 0.04 + 0.04) / 5.0)
    assert disc.r2_score(y, y) == 1.0
    assert math.isnan(disc.r2_score([1.0, 1.0], [1.0, 2.0]))


def test_cps_formula_and_published_check():
    # The doc's check: Nequix-MP-1 (F1 0.751, κ_SRME 0.4461, RMSD 0.0853) -> CPS 0.729.
    assert disc.combined_performance_score(0.751, 0.4461, 0.0853) == pytest.approx(0.729, abs=5e-4)
    assert disc.combined_performance_score(1.0, 0.0, 0.0) == pytest.approx(1.0)
    assert disc.combined_performance_score(0.5, 2.0, 0.3) == pytest.approx(0.25)  # geometry term clipped to 0
    assert math.isnan(disc.combined_performance_score(0.7, None, 0.08))


def test_fixed_hull_formula():
    assert disc.predicted_hull_distance(-1.0, -1.2, 0.05) == pytest.approx(0.25)


def test_mp2020_corrections_by_hand():
    nacl = bulk("NaCl", "rocksalt", a=5.6)
    assert disc.mp2020_corrected_energy(-7.0, nacl) == pytest.approx(-7.0 - 0.614)  # Cl anion
    si = bulk("Si", "diamond", a=5.43)
    assert disc.mp2020_corrected_energy(-10.0, si) == pytest.approx(-10.0)
    feo = bulk("FeO", "rocksalt", a=4.3)  # GGA+U oxide: oxide −0.687 and Fe U −2.256 per atom
    assert disc.mp2020_corrected_energy(-10.0, feo) == pytest.approx(-10.0 - 0.687 - 2.256)
    assert disc.mp_parameters(["Fe", "O"])["run_type"] == "GGA+U"


def _entries():
    from pymatgen.entries.computed_entries import ComputedEntry

    return [ComputedEntry("Na", -1.0), ComputedEntry("Cl", -2.0), ComputedEntry("NaCl", -5.0)]


def test_formation_energy_and_hull_distance_by_hand():
    refs = disc.elemental_reference_energies(_entries())
    assert refs == {"Na": -1.0, "Cl": -2.0}
    assert disc.formation_energy_per_atom(-5.0, {"Na": 1, "Cl": 1}, refs) == pytest.approx(-1.0)
    nacl = bulk("NaCl", "rocksalt", a=5.6)  # hull at NaCl: −2.5 eV/atom
    assert disc.hull_distance(-4.8, nacl, _entries()) == pytest.approx(0.1)
    assert disc.hull_distance(-5.2, nacl, _entries()) == pytest.approx(-0.1)
    with pytest.raises(KeyError, match="Si"):
        disc.hull_distance(-1.0, bulk("Si", "diamond", a=5.43), _entries())


@needs_shared
def test_mp_elemental_references_load():
    entries = disc.load_reference_entries()
    refs = disc.elemental_reference_energies(entries)
    assert len(refs) == 89 and -6 < refs["Si"] < -5 and -1.9 < refs["Cl"] < -1.7


def test_relax_driver_resumes_and_flags_failures(tmp_path):
    cu = bulk("Cu", "fcc", a=3.7)
    al = bulk("Al", "fcc", a=4.2)
    si = bulk("Si", "diamond", a=5.43)  # EMT has no Si: the error goes to the failure column
    out = tmp_path / "pred.jsonl"
    first = disc.relax_and_predict([("cu", cu), ("si", si)], EMT(), out, progress=False, apply_mp2020=False)
    assert [r["id"] for r in first] == ["cu", "si"]
    assert first[0]["converged"] and first[0]["failure"] is None and first[0]["energy"] < 0.1
    assert first[1]["failure"] and first[1]["energy"] is None
    out.write_text(out.read_text() + '{"id": "trunc')  # a crash mid-line must not break resuming
    second = disc.relax_and_predict([("cu", cu), ("si", si), ("al", al)], EMT(), out, progress=False,
                                    max_steps=1, apply_mp2020=False)
    assert [r["id"] for r in second] == ["cu", "si", "al"]  # cu and si were not recomputed
    assert second[0] == first[0]
    assert not second[2]["converged"] and "not converged" in second[2]["failure"]
    summary = disc.summarize(second)
    assert summary["n_failed"] == 2 and summary["n_not_converged"] == 2 and summary["n_scored"] == 0


def test_read_structures_ids_and_duplicates(tmp_path):
    import ase.io

    a, b = bulk("Cu", "fcc", a=3.6), bulk("Al", "fcc", a=4.0)
    a.info["material_id"] = "wbm-1"
    ase.io.write(tmp_path / "s.extxyz", [a, b])
    assert [i for i, _ in disc.read_structures([tmp_path / "s.extxyz"])] == ["wbm-1", "s-1"]
    with pytest.raises(ValueError, match="duplicate"):
        disc.read_structures([tmp_path / "s.extxyz", tmp_path / "s.extxyz"])
    with pytest.raises(FileNotFoundError):
        disc.read_structures([tmp_path / "missing.xyz"])


# --------------------------------------------------------------------------------------------- phonons
def test_srd_and_srme_hand_cases():
    modes, w = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1, 1])  # Σ modes / Σ w = 5 = κ
    assert ph.kappa_srme(modes, modes, w, 5.0, 5.0) == 0.0
    assert ph.kappa_srd(5.0, 5.0) == 0.0
    assert ph.kappa_srd(10.0, 5.0) == pytest.approx(2 / 3)  # factor 2 -> SRD 0.667
    assert ph.kappa_srme(2 * modes, modes, w, 10.0, 5.0) == pytest.approx(2 / 3)
    # Right total, wrong modes: SRD 0 but SRME sees the error (no cancellation between modes).
    swapped = np.array([[4.0, 3.0], [2.0, 1.0]])
    assert ph.kappa_srme(swapped, modes, w, 5.0, 5.0) == pytest.approx(2 * (3 + 1 + 1 + 3) / 2 / 10)
    assert ph.kappa_srme(None, modes, w, None, 5.0) == 2.0 and ph.kappa_srd(math.nan, 5.0) == -2.0
    with pytest.raises(ValueError, match="q-mesh"):
        ph.kappa_srme(modes[:1], modes, w, 5.0, 5.0)


@needs_shared
def test_srme_zero_for_perfect_prediction_on_reference():
    ref = ph.load_kappa_reference()
    assert len(ref) == 103
    for r in list(ref.values())[:10]:
        mk = r["mode_kappa_tot_avg"]
        # The stored mode κ sums (over modes, divided by Σw) to the stored total within rounding.
        assert mk.sum() / r["weights"].sum() == pytest.approx(r["kappa_tot_avg"], rel=1e-3)
        assert ph.kappa_srme(mk, mk, r["weights"], r["kappa_tot_avg"], r["kappa_tot_avg"]) == 0.0
        assert ph.kappa_srme(2 * mk, mk, r["weights"], 2 * r["kappa_tot_avg"], r["kappa_tot_avg"]) == pytest.approx(
            2 / 3, rel=1e-3)
    frames = ph.load_kappa_structures()
    assert len(frames) == 103 and all(len(a.info["q_mesh"]) == 3 for a in frames)


def test_wigner_coherence_split_preserves_total():
    cp = np.zeros((1, 1, 2, 6))
    cp[..., 0] = [1.0, 2.0]
    cc = np.zeros((1, 1, 2, 2, 6))
    cc[0, 0, 0, 1, 0] = cc[0, 0, 1, 0, 0] = 1.0
    cv = np.array([[[1.0, 3.0]]])
    tot = ph.mode_kappa_total(cp, cc, cv)
    assert tot[0, 0, :, 0] == pytest.approx([1.0 + 0.5, 2.0 + 1.5])  # shares 2C_a/(C_a+C_b)
    assert tot[..., 0].sum() == pytest.approx(cp[..., 0].sum() + cc[..., 0].sum())
    zero = ph.mode_kappa_total(cp, cc, np.zeros((1, 1, 2)))  # 0/0 pairs contribute nothing
    assert np.all(np.isfinite(zero)) and zero[0, 0, :, 0] == pytest.approx([1.0, 2.0])


def test_imaginary_mode_rules():
    q = np.array([[0, 0, 0], [0.5, 0, 0]])
    ok = np.array([[-0.005, 0.0, 0.001, 5.0], [1.0, 1.0, 2.0, 6.0]])
    assert not ph.has_imaginary_modes(ok, q)
    assert ph.has_imaginary_modes(np.array([[-0.02, 0, 0, 5.0], [1, 1, 2, 6.0]]), q)  # acoustic Γ < −0.01
    assert ph.has_imaginary_modes(np.array([[0, 0, 0, -1e-4], [1, 1, 2, 6.0]]), q)  # optical Γ < 0
    assert ph.has_imaginary_modes(np.array([[0, 0, 0, 5.0], [-1e-4, 1, 2, 6.0]]), q)  # q ≠ Γ


def test_harmonic_phonons_emt_copper_dulong_petit():
    cu = bulk("Cu", "fcc", a=3.6)
    cu, info = ph.relax_symmetric(cu, EMT(), fmax=1e-4)
    assert info["converged"] and not info["broken_symmetry"] and info["space_group"] == 225
    phonon = ph.harmonic_phonons(cu, EMT(), np.eye(3) * 3)
    props = ph.phonon_properties(phonon, (6, 6, 6), (50.0, 300.0, 3000.0))
    assert not props["imaginary"]
    gamma = np.all(np.abs(props["qpoints"]) < 1e-8, axis=1)
    assert np.abs(props["frequencies"][gamma]).max() < 1e-3  # acoustic sum rule
    assert 5.0 < props["max_frequency"] < 12.0  # EMT Cu; experiment ≈ 7.3 THz
    cv = props["heat_capacity"]
    assert cv[0] < cv[1] < cv[2] and cv[2] == pytest.approx(3 * 8.314462618, rel=0.01)  # Dulong–Petit
    assert props["free_energy"][2] < props["free_energy"][1] < props["free_energy"][0]


@pytest.mark.skipif(not ph.phono3py_available(), reason="phono3py (optional extra) not installed")
def test_wigner_kappa_pipeline_emt_copper():
    cu = bulk("Cu", "fcc", a=3.6)
    cu.info.update(mp_id="cu-emt", name="Cu", fc2_supercell=(np.eye(3, dtype=int) * 3).tolist(),
                   fc3_supercell=(np.eye(3, dtype=int) * 2).tolist(), q_mesh=[5, 5, 5])
    k = ph.wigner_kappa(cu, EMT(), cu.info["fc2_supercell"], cu.info["fc3_supercell"], cu.info["q_mesh"])
    assert not k["imaginary"] and k["kappa_tot_avg"] > 0 and k["kappa_p_avg"] > 0
    assert k["mode_kappa_tot_avg"].sum() / k["weights"].sum() == pytest.approx(k["kappa_tot_avg"], rel=1e-8)
    assert k["kappa_p_avg"] + k["kappa_c_avg"] == pytest.approx(k["kappa_tot_avg"])
    # The same calculator as "reference": the whole protocol path gives SRME 0 and SRD 0.
    reference = {"kappa_tot_avg": k["kappa_tot_avg"], "mode_kappa_tot_avg": k["mode_kappa_tot_avg"],
                 "weights": k["weights"], "q_mesh": [5, 5, 5]}
    row = ph.kappa_for_material(cu, EMT(), reference, fmax=1e-3, max_steps=0)
    assert row["failure"] is None
    # FixSymmetry re-symmetrises the cell to ~1e-8 Å, hence not bit-identical force constants.
    assert row["SRME"] == pytest.approx(0.0, abs=1e-4) and row["SRD"] == pytest.approx(0.0, abs=1e-4)
    coarse = ph.kappa_for_material(cu, EMT(), reference, q_mesh=[3, 3, 3], max_steps=0)
    assert math.isnan(coarse["SRME"]) and math.isfinite(coarse["SRD"])  # modes on another mesh: no SRME


# ------------------------------------------------------------------------------------------- diatomics
def _morse(r: np.ndarray, depth: float = 2.0, a: float = 1.5, r0: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    x = np.exp(-a * (r - r0))
    return depth * (1 - x) ** 2 - depth, 2 * depth * a * x * (1 - x)  # E, dE/dr (= F_x on atom 0)


def test_morse_curve_is_ideal():
    r = np.geomspace(1.0, 6.0, 119)
    e, f = _morse(r)
    m = di.smoothness_metrics(r, e, f)
    assert m["n_minima"] == 1 and m["energy_diff_flips"] == 1 and m["force_flips"] == 1
    assert m["tortuosity"] == pytest.approx(1.0, abs=1e-12)
    assert m["energy_jump"] < 0.02  # only the two small steps astride the minimum
    assert m["wall_monotone"] == 1.0 and m["wall_energy"] == pytest.approx(e[0] - e.min())
    # A spurious 0.3 eV dip on the attractive branch: two more minima' worth of flips and a big jump.
    bumpy = e - 0.3 * ((r > 3.5) & (r < 3.6))
    mb = di.smoothness_metrics(r, bumpy, f)
    assert mb["n_minima"] == 2 and mb["energy_diff_flips"] == 3 and mb["energy_jump"] > 0.6
    direct = (e[0] - e.min()) + (e[-1] - e.min())
    i = int(np.argmax((r > 3.5) & (r < 3.6)))  # first point of the dip; the curve rises by e[i] − e[i−1] there
    extra = 2 * (0.3 - (e[i] - e[i - 1]))  # the down step and the matching extra rise back out
    assert mb["tortuosity"] == pytest.approx((direct + extra) / direct)


def test_energy_metrics_hand_case():
    r, e = np.arange(1.0, 7.0), np.array([3.0, 1.0, 0.0, 1.0, 0.5, 2.0])
    # ΔE = [−2, −1, 1, −0.5, 1.5]: flips after −1, after 1, after −0.5.
    assert di.energy_diff_flips(r, e) == 3
    assert di.energy_jump(r, e) == pytest.approx((1 + 1) + (1 + 0.5) + (0.5 + 1.5))
    assert di.tortuosity(r, e) == pytest.approx(6.0 / 5.0)
    assert di.count_minima(r, e) == 2
    assert di.energy_jump(r[::-1], e[::-1]) == di.energy_jump(r, e)  # order of input does not matter


def test_force_metrics_hand_case():
    r = np.arange(1.0, 6.0)
    assert di.force_flips(r, [-5.0, -0.005, 0.5, -0.2, 0.3]) == 3  # |F| < 0.01 counts as zero
    assert di.force_jump(r, [0.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((2 + 1) + (1 + 2))
    assert di.force_total_variation(r, [0.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx(6.0)


def test_wall_radius_and_reference_metrics():
    r = np.round(np.arange(0.5, 4.001, 0.1), 10)
    e = np.maximum(0.0, 10 * (2.0 - r))  # minimum (first zero) at 2 Å, wall slope 10 eV/Å
    assert di.wall_radius(r, e, 5.0) == pytest.approx(1.5)
    assert di.wall_radius(r, e, 5.5) == pytest.approx(1.45)
    assert math.isnan(di.wall_radius(r, e, 20.0))
    assert di.wall_distance_mae(r, e, r + 0.1, e) == pytest.approx(0.1)  # thresholds 1, 5, 10 reachable
    assert di.wall_distance_mae(r, e, r, np.minimum(e, 8.0)) == pytest.approx(1.0 / 3)  # missed 10 eV costs r_ref
    assert di.energy_mae(r, e, r, e + 3.0) == pytest.approx(0.0, abs=1e-12)  # far-end shift removes offsets
    assert di.energy_mae(r, e, r, e + 0.2 * (r - 4.0)) == pytest.approx(0.2 * 3.5 / 2)


def test_well_fit_and_h2_wavenumber():
    r = np.linspace(0.5, 1.0, 11)
    r_eq, k = di.well_fit(r, 17.96 * (r - 0.741) ** 2)
    assert r_eq == pytest.approx(0.741) and k == pytest.approx(35.92)
    assert di.vibrational_wavenumber("H", 35.92) == pytest.approx(4401, rel=0.02)  # H2: ω_e = 4401 cm⁻¹


@needs_shared
def test_pbe_reference_self_comparison():
    ref = di.load_reference_curves()
    assert {"H", "Si", "O", "U"} <= set(ref)
    h = ref["H"]
    row = di.curve_metrics("H-H", {"distances": h["distances"], "energies": h["energies"], "forces": h["forces"]},
                           ref)
    assert row["pbe_energy_mae"] == pytest.approx(0.0, abs=1e-12) and row["pbe_force_mae"] == pytest.approx(0.0)
    assert row["pbe_wall_dist_mae"] == 0.0 and row["pbe_bond_length_error"] == 0.0
    assert row["n_minima"] == 1 and 0.7 < di.well_fit(h["distances"], h["energies"])[0] < 0.8
    # Force sign: at short range the reference pushes atom 0 (at the origin) towards −x.
    assert h["forces"][0, 0, 0] < 0 < h["forces"][0, 1, 0]


def test_bad_curves_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        di.tortuosity([1.0, 2.0, 3.0], [1.0, math.nan, 0.0])
    with pytest.raises(ValueError, match="duplicate"):
        di.tortuosity([1.0, 1.0, 3.0], [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        di.force_flips([1.0], [0.0])


def test_evaluation_window():
    # 0.9·r_cov(Si) to 6 Å; heteronuclear pairs use the first element's radius.
    lo, hi = di.evaluation_window("Si-H")
    assert lo == pytest.approx(0.9 * 1.11) and hi == 6.0
