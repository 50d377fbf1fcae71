"""Diffusion: unwrapped positions, mean squared displacement (per species) and the diffusivity of a linear fit.
Times in ps, distances in Å, diffusivities in cm²/s."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from ase import Atoms

from .frames import check_frames

#: Å²/ps -> cm²/s.
A2_PER_PS_TO_CM2_PER_S = 1e-4


def unwrap(positions: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Continuous trajectory from wrapped positions: the minimum image of each consecutive-frame step.

    Args:
        positions: wrapped Cartesian positions ``[n_frames, n_atoms, 3]`` Å.
        cells: ``[3, 3]`` or per frame ``[n_frames, 3, 3]`` (rows = vectors).

    Returns:
        ``[n_frames, n_atoms, 3]`` Å, equal to ``positions[0]`` at frame 0. Exact while every atom moves less
        than half a perpendicular cell width between frames (rounding in fractional coordinates).
    """
    positions = np.asarray(positions, np.float64)
    if positions.ndim != 3 or positions.shape[2] != 3:
        raise ValueError(f"positions must be [n_frames, n_atoms, 3], got {positions.shape}")
    n_frames = positions.shape[0]
    cells = np.asarray(cells, np.float64)
    cells = np.broadcast_to(cells, (n_frames, 3, 3)) if cells.shape == (3, 3) else cells
    if cells.shape != (n_frames, 3, 3):
        raise ValueError(f"cells must be [3, 3] or [{n_frames}, 3, 3], got {cells.shape}")
    frac = np.einsum("tnj,tji->tni", positions, np.linalg.inv(cells))
    step = np.diff(frac, axis=0)
    step -= np.round(step)
    cart_steps = np.einsum("tni,tij->tnj", step, cells[1:])
    return np.concatenate([positions[:1], positions[:1] + np.cumsum(cart_steps, axis=0)], axis=0)


def msd(unwrapped: np.ndarray, max_lag: int | None = None) -> np.ndarray:
    """Mean-squared displacement averaged over atoms and all time origins.

    Args:
        unwrapped: ``[n_frames, n_atoms, 3]`` Å (see :func:`unwrap`).
        max_lag: largest lag in frames (default ``n_frames // 2``, beyond which few origins remain).

    Returns:
        ``[max_lag + 1]`` Å², MSD(lag) = ⟨|x(t₀ + lag) − x(t₀)|²⟩ over atoms and origins t₀.
    """
    x = np.asarray(unwrapped, np.float64)
    if x.ndim != 3 or x.shape[0] < 2:
        raise ValueError(f"unwrapped must be [n_frames >= 2, n_atoms, 3], got {x.shape}")
    max_lag = x.shape[0] // 2 if max_lag is None else int(max_lag)
    if not 1 <= max_lag < x.shape[0]:
        raise ValueError(f"max_lag must be in [1, {x.shape[0] - 1}], got {max_lag}")
    out = np.zeros(max_lag + 1)
    for lag in range(1, max_lag + 1):
        out[lag] = np.mean(np.sum((x[lag:] - x[:-lag]) ** 2, axis=-1))
    return out


@dataclasses.dataclass
class MSD:
    """MSD per element: ``t_ps [n_lags]`` and ``{element: msd [n_lags] Å²}``."""

    t_ps: np.ndarray
    per_species: dict[str, np.ndarray]


def msd_by_species(frames: Sequence[Atoms], frame_interval_ps: float, max_lag: int | None = None,
                   remove_drift: bool = True) -> MSD:
    """MSD of each element of a wrapped trajectory (frames every ``frame_interval_ps``).

    ``remove_drift`` subtracts the mass-weighted mean displacement of all atoms per frame (centre-of-mass
    drift, e.g. from thermostat noise), which would otherwise add a spurious ballistic term.
    """
    if not frame_interval_ps > 0:
        raise ValueError(f"frame_interval_ps must be positive, got {frame_interval_ps}")
    check_frames(frames)
    positions = np.stack([a.positions for a in frames])
    cells = np.stack([a.cell.array for a in frames])
    x = unwrap(positions, cells)
    if remove_drift:
        masses = frames[0].get_masses()
        com = np.einsum("n,tni->ti", masses, x) / masses.sum()
        x = x - (com - com[0])[:, None, :]
    symbols = np.asarray(frames[0].get_chemical_symbols())
    per = {el: msd(x[:, symbols == el], max_lag) for el in dict.fromkeys(symbols.tolist())}
    n_lags = len(next(iter(per.values())))
    return MSD(t_ps=np.arange(n_lags) * frame_interval_ps, per_species=per)


@dataclasses.dataclass
class Diffusivity:
    """Tracer diffusivity from a linear fit MSD = slope · t + intercept over ``window_ps``."""

    D_cm2_s: float
    slope_A2_ps: float
    intercept_A2: float
    window_ps: tuple[float, float]
    n_points: int


def diffusivity(t_ps: np.ndarray, msd_A2: np.ndarray, window_ps: tuple[float, float], dim: int = 3) -> Diffusivity:
    """D = slope / (2 · dim) of a least-squares line through MSD(t) for ``window_ps[0] <= t <= window_ps[1]``.

    Args:
        t_ps, msd_A2: ``[n_lags]`` lag times (ps) and MSD (Å²).
        window_ps: fit window (ps); start it after the ballistic/caging regime.

    Returns:
        :class:`Diffusivity` with D in cm²/s (1 Å²/ps = 1e-4 cm²/s).
    """
    t, y = np.asarray(t_ps, np.float64), np.asarray(msd_A2, np.float64)
    if t.shape != y.shape or t.ndim != 1:
        raise ValueError(f"t_ps and msd_A2 must be 1-D of equal length, got {t.shape} and {y.shape}")
    lo, hi = map(float, window_ps)
    sel = (t >= lo - 1e-9) & (t <= hi + 1e-9)
    if sel.sum() < 2:
        raise ValueError(f"the fit window {window_ps} ps holds {int(sel.sum())} points (need >= 2); "
                         f"lags span {t.min():.3g}..{t.max():.3g} ps")
    slope, intercept = np.polyfit(t[sel], y[sel], 1)
    return Diffusivity(D_cm2_s=float(slope) / (2 * dim) * A2_PER_PS_TO_CM2_PER_S, slope_A2_ps=float(slope),
                       intercept_A2=float(intercept), window_ps=(lo, hi), n_points=int(sel.sum()))
