"""Diatomic curves: dimer energies and forces on the protocol grid, smoothness metrics, PBE comparison, plots.

Protocol (``data_and_benchmarks.md`` §2.4): two atoms along x in a 50 Å periodic cubic box at distances
``geomspace(0.1, 6.0, 119)`` Å, float64. Metrics are evaluated on ``[0.9·r_cov, 6 Å]`` (r_cov: ASE's covalent
radius of the first element). Curves: ``distances [n]`` (Å), ``energies [n]`` (eV), ``forces [n, 2, 3]`` (eV/Å),
from any model; Geodite's are computed in one batched call by :func:`geodite_jax.batched.dimer_curves`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase.data import atomic_masses, atomic_numbers, covalent_radii

from ..files import save_figure
from . import read_reference_json

BOX = 50.0  # Å
DISTANCES = np.geomspace(0.1, 6.0, 119)  # Å
R_MAX = 6.0  # Å
ENERGY_FLAT = 1e-3  # eV: smaller energy steps are ignored by the flip counters
FORCE_FLAT = 1e-2  # eV/Å: smaller forces count as zero for force flips
WALL_THRESHOLDS = (1.0, 5.0, 10.0, 20.0, 50.0, 100.0)  # eV above the minimum
MIN_WELL_DEPTH = 0.05  # eV: bond length / depth / frequency errors only for wells at least this deep
REFERENCE_FILE = ("matbench-discovery", "diatomics-dft.json.gz")


# -------------------------------------------------------------------------------------- curve checking
def _sorted_curve(distances: Sequence[float], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by distance (ascending); ``ValueError`` for too few, duplicate or non-finite points."""
    r, v = np.asarray(distances, np.float64), np.asarray(values, np.float64)
    if r.ndim != 1 or len(r) != len(v):
        raise ValueError(f"distances [n] and values [n, ...] must match, got {r.shape} and {v.shape}")
    if len(r) < 2:
        raise ValueError(f"a curve needs at least 2 points, got {len(r)}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(v))):
        raise ValueError("curve contains NaN or infinite values")
    if len(np.unique(r)) != len(r):
        raise ValueError("curve has duplicate distances")
    order = np.argsort(r)
    return r[order], v[order]


def evaluation_window(symbol: str, r_max: float = R_MAX, factor: float = 0.9) -> tuple[float, float]:
    """``(factor·r_cov, r_max)`` in Å for an element symbol or an ``"A-B"`` pair (first element's radius)."""
    z = atomic_numbers[symbol.split("-")[0]]
    return factor * float(covalent_radii[z]), r_max


# ------------------------------------------------------------------------------------- smoothness metrics
def _nonflat_steps(steps: np.ndarray, flat: float) -> np.ndarray:
    """Steps whose magnitude reaches ``flat`` (plateaus carry no sign)."""
    return steps[np.abs(steps) >= flat]


def energy_diff_flips(distances: Sequence[float], energies: Sequence[float]) -> int:
    """Sign changes of ΔE between neighbouring points (steps below 1 meV ignored); 1 for a single well."""
    _, e = _sorted_curve(distances, np.asarray(energies))
    steps = _nonflat_steps(np.diff(e), ENERGY_FLAT)
    return int(np.sum(np.diff(np.sign(steps)) != 0))


def energy_jump(distances: Sequence[float], energies: Sequence[float]) -> float:
    """Σ |ΔE| of the two steps on either side of every ΔE sign change (eV); small for a smooth single well."""
    _, e = _sorted_curve(distances, np.asarray(energies))
    steps = _nonflat_steps(np.diff(e), ENERGY_FLAT)
    flip = np.diff(np.sign(steps)) != 0
    return float(np.abs(steps[:-1][flip]).sum() + np.abs(steps[1:][flip]).sum())


def tortuosity(distances: Sequence[float], energies: Sequence[float]) -> float:
    """Σ|ΔE| / (|E_first − E_min| + |E_last − E_min|); 1 for any curve with one minimum and monotone branches."""
    _, e = _sorted_curve(distances, np.asarray(energies))
    direct = abs(e[0] - e.min()) + abs(e[-1] - e.min())
    return float(np.sum(np.abs(np.diff(e))) / direct) if direct > 0 else math.nan


def count_minima(distances: Sequence[float], energies: Sequence[float]) -> int:
    """Local minima of the curve, interior and at the ends, counting plateaus (|ΔE| < 1 meV) as one point."""
    _, e = _sorted_curve(distances, np.asarray(energies))
    signs = np.sign(_nonflat_steps(np.diff(e), ENERGY_FLAT))
    if signs.size == 0:
        return 0
    interior = int(np.sum((signs[:-1] < 0) & (signs[1:] > 0)))
    return interior + int(signs[0] > 0) + int(signs[-1] < 0)


def force_flips(distances: Sequence[float], forces_x: Sequence[float]) -> int:
    """Sign changes of the force on atom 0 along the bond (|F| < 10 meV/Å counts as 0); 1 for a single well."""
    _, f = _sorted_curve(distances, np.asarray(forces_x))
    f = np.where(np.abs(f) < FORCE_FLAT, 0.0, f)
    signs = np.sign(f[f != 0])
    return int(np.sum(np.diff(signs) != 0))


def force_total_variation(distances: Sequence[float], forces_x: Sequence[float]) -> float:
    """Σ |ΔF| along the curve (eV/Å)."""
    _, f = _sorted_curve(distances, np.asarray(forces_x))
    return float(np.sum(np.abs(np.diff(f))))


def force_jump(distances: Sequence[float], forces_x: Sequence[float]) -> float:
    """Σ |ΔF| of the two steps either side of every ΔF sign change (eV/Å)."""
    _, f = _sorted_curve(distances, np.asarray(forces_x))
    steps = np.diff(f)
    steps = steps[steps != 0]
    flip = np.diff(np.sign(steps)) != 0
    return float(np.abs(steps[:-1][flip]).sum() + np.abs(steps[1:][flip]).sum())


def short_range_repulsion(distances: Sequence[float], energies: Sequence[float]) -> dict[str, float]:
    """Inner wall: ``wall_energy`` = E(r_first) − E_min (eV, > 0 when repulsive) and ``wall_monotone`` = 1.0
    when E rises monotonically (within 1 meV) from the minimum inwards, else 0.0."""
    _, e = _sorted_curve(distances, np.asarray(energies))
    i = int(np.argmin(e))
    inward = np.diff(e[: i + 1][::-1])  # steps from the minimum towards shorter distances
    return {"wall_energy": float(e[0] - e[i]), "wall_monotone": float(np.all(inward > -ENERGY_FLAT))}


def smoothness_metrics(distances: Sequence[float], energies: Sequence[float],
                       forces_x: Sequence[float]) -> dict[str, float]:
    """All reference-free metrics of one curve (call on the evaluation window)."""
    return {"n_minima": count_minima(distances, energies), "energy_diff_flips": energy_diff_flips(distances, energies),
            "energy_jump": energy_jump(distances, energies), "tortuosity": tortuosity(distances, energies),
            "force_flips": force_flips(distances, forces_x),
            "force_total_variation": force_total_variation(distances, forces_x),
            "force_jump": force_jump(distances, forces_x), **short_range_repulsion(distances, energies)}


# --------------------------------------------------------------------------------- reference comparison
def energy_mae(r_ref: Sequence[float], e_ref: Sequence[float], r_pred: Sequence[float], e_pred: Sequence[float],
               n_grid: int = 200) -> float:
    """Mean |ΔE| (eV) on a shared ``n_grid``-point grid over the overlap, both curves shifted to 0 at its far end."""
    r1, e1 = _sorted_curve(r_ref, np.asarray(e_ref))
    r2, e2 = _sorted_curve(r_pred, np.asarray(e_pred))
    lo, hi = max(r1[0], r2[0]), min(r1[-1], r2[-1])
    if lo >= hi:
        raise ValueError(f"curves do not overlap: [{r1[0]}, {r1[-1]}] vs [{r2[0]}, {r2[-1]}]")
    grid = np.linspace(lo, hi, n_grid)
    a, b = np.interp(grid, r1, e1), np.interp(grid, r2, e2)
    return float(np.mean(np.abs((b - b[-1]) - (a - a[-1]))))


def force_mae(r_ref: Sequence[float], f_ref: np.ndarray, r_pred: Sequence[float], f_pred: np.ndarray) -> float:
    """Mean |ΔF| (eV/Å) over points, atoms and components; ``f [n, 2, 3]`` on the same distances."""
    r1, a = _sorted_curve(r_ref, np.asarray(f_ref))
    r2, b = _sorted_curve(r_pred, np.asarray(f_pred))
    if not np.allclose(r1, r2):
        raise ValueError("force MAE needs both curves on the same distances")
    return float(np.mean(np.abs(a - b)))


def wall_radius(distances: Sequence[float], energies: Sequence[float], threshold: float) -> float:
    """Distance (Å) where the repulsive branch first reaches ``threshold`` eV above the minimum; NaN if never.

    Walks inwards from the minimum on the running maximum of the energy (so a dip on the wall cannot move
    the crossing outwards) and interpolates linearly.
    """
    r, e = _sorted_curve(distances, np.asarray(energies))
    i = int(np.argmin(e))
    if i == 0:
        return math.nan
    rise = np.maximum.accumulate(e[i::-1] - e[i])
    radii = r[i::-1]
    k = int(np.searchsorted(rise, threshold))
    if k >= len(rise):
        return math.nan
    if k == 0 or rise[k] == rise[k - 1]:
        return float(radii[k])
    t = (threshold - rise[k - 1]) / (rise[k] - rise[k - 1])
    return float(radii[k - 1] + t * (radii[k] - radii[k - 1]))


def wall_distance_mae(r_ref: Sequence[float], e_ref: Sequence[float], r_pred: Sequence[float],
                      e_pred: Sequence[float], thresholds: Sequence[float] = WALL_THRESHOLDS) -> float:
    """Mean |r_pred − r_ref| (Å) of wall radii at thresholds the reference reaches; a missed crossing costs r_ref."""
    errors = []
    for t in thresholds:
        ref = wall_radius(r_ref, e_ref, t)
        if math.isnan(ref):
            continue
        pred = wall_radius(r_pred, e_pred, t)
        errors.append(ref if math.isnan(pred) else abs(pred - ref))
    return float(np.mean(errors)) if errors else math.nan


def well_fit(distances: Sequence[float], energies: Sequence[float], n_points: int = 5) -> tuple[float, float]:
    """``(r_eq, curvature)`` from a quadratic fit to ``n_points`` around the minimum (Å, eV/Å²)."""
    r, e = _sorted_curve(distances, np.asarray(energies))
    i = int(np.argmin(e))
    start = min(max(0, i - n_points // 2), max(0, len(r) - n_points))
    rr, ee = r[start:start + n_points], e[start:start + n_points]
    if len(rr) < 3:
        return float(r[i]), math.nan
    a, b, _ = np.polyfit(rr, ee, 2)
    if a <= 0:
        return float(r[i]), math.nan
    r_eq = -b / (2 * a)
    return (float(r_eq) if rr[0] <= r_eq <= rr[-1] else float(r[i])), float(2 * a)


def vibrational_wavenumber(symbol: str, curvature: float) -> float:
    """Harmonic wavenumber (cm⁻¹) of a homonuclear dimer from the well curvature k (eV/Å²): ω = √(k/μ)."""
    if not math.isfinite(curvature) or curvature <= 0:
        return math.nan
    mu = atomic_masses[atomic_numbers[symbol.split("-")[0]]] * 1.66053906660e-27 / 2  # kg
    omega = math.sqrt(curvature * 16.02176634 / mu)  # eV/Å² -> N/m
    return omega / (2 * math.pi * 2.99792458e10)


def reference_metrics(symbol: str, r_ref: Sequence[float], e_ref: Sequence[float], f_ref: np.ndarray | None,
                      r_pred: Sequence[float], e_pred: Sequence[float], f_pred: np.ndarray) -> dict[str, float]:
    """PBE-relative metrics of one element (both curves already restricted to the evaluation window)."""
    out = {"pbe_energy_mae": energy_mae(r_ref, e_ref, r_pred, e_pred),
           "pbe_wall_dist_mae": wall_distance_mae(r_ref, e_ref, r_pred, e_pred)}
    if f_ref is not None and len(f_ref):
        # The reference has its own 50-point grid: compare forces interpolated onto it.
        rp, fp = _sorted_curve(r_pred, np.asarray(f_pred).reshape(len(f_pred), -1))
        rr, fr = _sorted_curve(r_ref, np.asarray(f_ref).reshape(len(f_ref), -1))
        inside = (rr >= rp[0]) & (rr <= rp[-1])
        if inside.sum() >= 2:
            fi = np.stack([np.interp(rr[inside], rp, fp[:, c]) for c in range(fp.shape[1])], axis=1)
            out["pbe_force_mae"] = float(np.mean(np.abs(fi - fr[inside])))
    _, e_sorted = _sorted_curve(r_ref, np.asarray(e_ref))
    depth_ref = float(e_sorted[-1] - e_sorted.min())
    if depth_ref >= MIN_WELL_DEPTH:
        _, ep = _sorted_curve(r_pred, np.asarray(e_pred))
        (r_eq_ref, k_ref), (r_eq_pred, k_pred) = well_fit(r_ref, e_ref), well_fit(r_pred, e_pred)
        out["pbe_bond_length_error"] = abs(r_eq_pred - r_eq_ref)
        out["pbe_well_depth_error"] = abs(float(ep[-1] - ep.min()) - depth_ref)
        out["pbe_vib_freq_error"] = abs(vibrational_wavenumber(symbol, k_pred) - vibrational_wavenumber(symbol, k_ref))
    return out


def load_reference_curves(path: str | os.PathLike | None = None, functional: str = "PBE") -> dict[str, dict]:
    """``{"X": {"distances" [n], "energies" [n], "forces" [n, 2, 3]}}`` from ``diatomics-dft.json.gz``."""
    path, data = read_reference_json(path, REFERENCE_FILE, "diatomic reference file")
    if functional not in data:
        raise KeyError(f"functional {functional!r} not in {path}; available: {sorted(data)}")
    out = {}
    for formula, c in data[functional].items():
        a, _, b = formula.partition("-")
        key = a if a == b else formula
        e = np.asarray(c["energies"], np.float64)
        if e.size and np.all(np.isfinite(e)):
            out[key] = {"distances": np.asarray(c["distances"], np.float64), "energies": e,
                        "forces": np.asarray(c.get("forces", []), np.float64)}
    return out


# ------------------------------------------------------------------------------------------ evaluation
def curve_metrics(pair: str, curve: dict[str, np.ndarray], reference: dict[str, dict] | None = None) -> dict[str, Any]:
    """Smoothness (and PBE metrics for a homonuclear pair with a reference) on the evaluation window."""
    lo, hi = evaluation_window(pair)
    r, e, f = curve["distances"], curve["energies"], curve["forces"]
    mask = (r >= lo) & (r <= hi) & np.isfinite(e) & np.all(np.isfinite(f), axis=(1, 2))
    row: dict[str, Any] = {"pair": pair, "n_points": int(mask.sum())}
    if mask.sum() < 5:
        row["failure"] = "fewer than 5 finite points in the evaluation window"
        return row
    row.update(smoothness_metrics(r[mask], e[mask], f[mask, 0, 0]))
    a, _, b = pair.partition("-")
    ref = (reference or {}).get(a) if a == b else None
    if ref is not None:
        rm = (ref["distances"] >= lo) & (ref["distances"] <= hi)
        if rm.sum() >= 2:
            fr = ref["forces"][rm] if len(ref["forces"]) == len(ref["distances"]) else None
            row.update(reference_metrics(a, ref["distances"][rm], ref["energies"][rm], fr, r[mask], e[mask], f[mask]))
    return row


def plot_curve(pair: str, curve: dict[str, np.ndarray], path: str | os.PathLike,
               reference: dict[str, np.ndarray] | None = None) -> Path | None:
    """Energy (shifted to 0 at the far end) and bond force of one dimer, with the PBE curve; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lo, hi = evaluation_window(pair)
    r, e, f = curve["distances"], curve["energies"], curve["forces"][:, 0, 0]
    ok = np.isfinite(e) & (r >= 0.5 * lo)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    if ok.any():
        ax1.plot(r[ok], e[ok] - e[ok][-1], label="model")
        ax2.plot(r[ok], f[ok], label="model")
    if reference is not None:
        ax1.plot(reference["distances"], reference["energies"] - reference["energies"][-1], "k--", label="PBE")
        if len(reference["forces"]):
            ax2.plot(reference["distances"], reference["forces"][:, 0, 0], "k--", label="PBE")
    for ax, label in ((ax1, "E − E(6 Å) (eV)"), (ax2, "F_x on atom 0 (eV/Å)")):
        ax.axvspan(lo, hi, color="0.93", zorder=0)
        ax.axhline(0, color="0.6", lw=0.5)
        ax.set_xlabel("distance (Å)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    ylim = np.nanmax(np.abs(e[ok] - e[ok][-1])) if ok.any() else 1.0
    ax1.set_ylim(-min(ylim, 20), min(max(ylim, 1.0), 20))
    return save_figure(fig, path, dpi=90, title=pair)
