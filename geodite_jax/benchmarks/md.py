"""Analysis of MD trajectories against a reference (AIMD): RDFs, RDF overlap, MSD, diffusivity, stability.

Pure NumPy (plus vesin for periodic pair search, so any triclinic cell works); no JAX. Conventions:
positions in Å, cells as ASE row vectors ``[3, 3]``, times in ps, energies in eV.

RDF error and overlap follow ``../shared/docs/data_and_benchmarks.md`` §2.5 (the Matbench MD protocol)::

    rdf_error   = 100 · min(1, ∫|g_ref − g_pred| dr / ∫|g_ref − 1| dr)      (500 bins up to r_max)
    rdf_overlap = 1 − rdf_error / 100                                       (1 = identical, 0 = no better than g ≡ 1)

``r_max`` defaults to half the shortest perpendicular width of the cell (for a cubic cell, half the
shortest cell vector as in the protocol), the largest radius at which no pair is seen twice.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms

#: Å²/ps -> cm²/s.
A2_PER_PS_TO_CM2_PER_S = 1e-4


# ------------------------------------------------------------------------------------------- reading
def read_xdatcar(path: str | os.PathLike, index: int | slice | str = ":") -> list[Atoms] | Atoms:
    """Frames of a VASP XDATCAR, plain or gzipped (``.gz``), via ASE's ``vasp-xdatcar`` reader.

    Returns a list of ASE ``Atoms`` (positions wrapped as written by VASP, fully periodic), or one ``Atoms``
    for an integer ``index`` (as ``ase.io.read``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable XDATCAR or holds no frames.
    """
    from ase.io import read

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"XDATCAR not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the suffix
        raw = gzip.decompress(raw)
    try:
        frames = read(io.StringIO(raw.decode()), index=index, format="vasp-xdatcar")
    except Exception as err:  # ASE raises many types on malformed input
        raise ValueError(f"cannot read {path} as a VASP XDATCAR: {type(err).__name__}: {err}") from None
    if isinstance(frames, list) and not frames:
        raise ValueError(f"{path} holds no frames")
    return frames


# ---------------------------------------------------------------------------------------- geometry
def perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of a cell ``[3, 3]`` (rows = vectors) -> ``[3]`` Å."""
    cell = np.asarray(cell, np.float64)
    volume = abs(np.linalg.det(cell))
    if not volume > 0:
        raise ValueError("the cell has zero volume")
    return np.array([volume / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)])


def default_r_max(cell: np.ndarray) -> float:
    """Half the shortest perpendicular width of ``cell [3, 3]``: the protocol's RDF range."""
    return 0.5 * float(perpendicular_widths(cell).min())


def _check_frames(frames: Sequence[Atoms]) -> None:
    if len(frames) == 0:
        raise ValueError("no frames given")
    n = len(frames[0])
    for k, atoms in enumerate(frames):
        if len(atoms) != n or not np.array_equal(atoms.numbers, frames[0].numbers):
            raise ValueError(f"frame {k} has different atoms from frame 0 (a trajectory keeps its atoms)")
        if not all(atoms.pbc):
            raise ValueError(f"frame {k} is not fully periodic (pbc={atoms.pbc.tolist()}); RDFs here need a cell")


def _pairs(positions: np.ndarray, cell: np.ndarray, cutoff: float, pbc: bool = True
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half list of pairs within ``cutoff`` (all periodic images): ``i [P]``, ``j [P]``, ``d [P]`` Å."""
    import vesin

    nl = vesin.NeighborList(cutoff=float(cutoff), full_list=False)
    box = np.asarray(cell, np.float64) if pbc else np.zeros((3, 3))
    i, j, d = nl.compute(np.asarray(positions, np.float64), box, bool(pbc), quantities="ijd")
    return np.asarray(i, np.int64), np.asarray(j, np.int64), np.asarray(d, np.float64)


# --------------------------------------------------------------------------------------------- RDFs
@dataclasses.dataclass
class RDF:
    """Radial distribution functions on one radial grid, averaged over frames.

    Attributes:
        edges: bin edges ``[n_bins + 1]`` Å; ``r`` the bin centres ``[n_bins]``.
        total: g(r) of all atoms ``[n_bins]``.
        partial: ``{"A-B": g_AB [n_bins]}`` (symmetric: g_AB = g_BA).
        n_frames: frames averaged.
    """

    edges: np.ndarray
    total: np.ndarray
    partial: dict[str, np.ndarray]
    n_frames: int

    @property
    def r(self) -> np.ndarray:
        return 0.5 * (self.edges[1:] + self.edges[:-1])

    def get(self, pair: str) -> np.ndarray:
        """``"total"``, ``"A-B"`` or ``"B-A"``; KeyError naming the pairs available."""
        if pair == "total":
            return self.total
        if pair in self.partial:
            return self.partial[pair]
        a, _, b = pair.partition("-")
        if f"{b}-{a}" in self.partial:
            return self.partial[f"{b}-{a}"]
        raise KeyError(f"no RDF for pair {pair!r}; available: total, {', '.join(self.partial)}")


def rdf(frames: Sequence[Atoms], pairs: Sequence[tuple[str, str]] | None = None, r_max: float | None = None,
        n_bins: int = 500) -> RDF:
    """Total and partial RDFs of periodic frames (any triclinic cell), averaged over ``frames``.

    g_AB(r) = V / (N_A (N_B − δ_AB)) · ⟨n_AB(r)⟩ / (4π/3 (r₂³ − r₁³)), with n_AB the ordered A→B pairs in the
    shell; the ``N_A (N_A − 1)`` count makes an ideal gas give exactly 1 on average.

    Args:
        frames: ASE ``Atoms`` of one trajectory (same atoms in every frame).
        pairs: element pairs, e.g. ``[("Li", "S")]``; default all unordered pairs of the elements present.
        r_max: range in Å; default :func:`default_r_max` of the first frame's cell.
        n_bins: number of bins (the protocol uses 500).
    """
    _check_frames(frames)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    symbols = np.asarray(frames[0].get_chemical_symbols())
    present = list(dict.fromkeys(symbols.tolist()))
    if pairs is None:
        pairs = [(a, b) for k, a in enumerate(present) for b in present[k:]]
    for a, b in pairs:
        for el in (a, b):
            if el not in present:
                raise ValueError(f"element {el!r} of pair {a}-{b} is not in the frames (present: {present})")
    r_max = default_r_max(frames[0].cell.array) if r_max is None else float(r_max)
    if not r_max > 0:
        raise ValueError(f"r_max must be positive, got {r_max}")
    edges = np.linspace(0.0, r_max, n_bins + 1)
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    counts = {el: int(np.sum(symbols == el)) for el in present}
    n = len(symbols)
    total = np.zeros(n_bins)
    partial = {f"{a}-{b}": np.zeros(n_bins) for a, b in pairs}
    for atoms in frames:
        volume = atoms.get_volume()
        i, j, d = _pairs(atoms.positions, atoms.cell.array, r_max)
        keep = d < r_max
        i, j, d = i[keep], j[keep], d[keep]
        hist = np.histogram(d, bins=edges)[0]
        total += 2.0 * hist * volume / (n * (n - 1) * shell)  # half list: each unordered pair twice
        si, sj = symbols[i], symbols[j]
        for a, b in pairs:
            both = (si == a) & (sj == b) | (si == b) & (sj == a)
            h = np.histogram(d[both], bins=edges)[0]
            # A-A: unordered pairs x 2 = ordered; A-B: each unordered pair is one A->B ordered pair.
            ordered = 2.0 * h if a == b else h
            norm = counts[a] * (counts[b] - (a == b))
            partial[f"{a}-{b}"] += ordered * volume / (norm * shell) if norm > 0 else 0.0
    n_frames = len(frames)
    return RDF(edges=edges, total=total / n_frames, partial={k: v / n_frames for k, v in partial.items()},
               n_frames=n_frames)


def rdf_error(g_ref: np.ndarray, g_pred: np.ndarray, edges: np.ndarray | None = None) -> float:
    """The protocol's RDF error in percent: ``100 · min(1, ∫|g_ref − g_pred| dr / ∫|g_ref − 1| dr)``.

    Args:
        g_ref, g_pred: RDFs on the same bins ``[n_bins]``.
        edges: bin edges ``[n_bins + 1]`` (the integrals weight by bin width); default equal bins.

    Raises:
        ValueError: shape mismatch, non-finite values, or g_ref ≡ 1 (the ratio is undefined).
    """
    g_ref, g_pred = np.asarray(g_ref, np.float64), np.asarray(g_pred, np.float64)
    if g_ref.shape != g_pred.shape or g_ref.ndim != 1:
        raise ValueError(f"RDFs must be 1-D on the same bins, got shapes {g_ref.shape} and {g_pred.shape}")
    if not (np.isfinite(g_ref).all() and np.isfinite(g_pred).all()):
        raise ValueError("the RDFs hold non-finite values")
    width = np.ones_like(g_ref) if edges is None else np.diff(np.asarray(edges, np.float64))
    if width.shape != g_ref.shape:
        raise ValueError(f"edges must have {g_ref.size + 1} entries, got {width.size + 1}")
    denominator = float(np.sum(np.abs(g_ref - 1.0) * width))
    if denominator == 0.0:
        raise ValueError("the reference RDF is identically 1 (ideal gas): the RDF error is undefined")
    return 100.0 * min(1.0, float(np.sum(np.abs(g_ref - g_pred) * width)) / denominator)


def rdf_overlap(g_ref: np.ndarray, g_pred: np.ndarray, edges: np.ndarray | None = None) -> float:
    """RDF overlap = 1 − :func:`rdf_error` / 100, in [0, 1]; 1 for identical RDFs (the target is >= 0.95)."""
    return 1.0 - rdf_error(g_ref, g_pred, edges) / 100.0


def coordination_number(g: np.ndarray, edges: np.ndarray, density: float, r_cut: float) -> float:
    """Running coordination ``4π ρ ∫₀^r_cut g(r) r² dr`` over whole bins up to ``r_cut``.

    ρ is the partner density in Å⁻³ matching :func:`rdf`'s normalisation: ``N_B / V`` for an A-B partial,
    ``(N_A − 1) / V`` for A-A and ``(N − 1) / V`` for the total RDF.
    """
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    return float(density * np.sum((np.asarray(g) * shell)[edges[1:] <= r_cut + 1e-12]))


# ---------------------------------------------------------------------------------------------- MSD
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
    _check_frames(frames)
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


# ---------------------------------------------------------------------------------------- stability
@dataclasses.dataclass
class StabilityReport:
    """Health of a trajectory. Distances in Å, energies per atom, times in ps.

    ``stable`` is True when everything is finite, no pair came closer than ``too_close_A``, no atom moved
    more than ``jump_A`` between consecutive frames and no atom was left without a neighbour within
    ``isolated_A`` (flying off).
    """

    n_frames: int
    duration_ps: float
    energy_drift_meV_atom_ps: float  # slope of a linear fit of E_total / N
    conserved_drift_meV_atom_ps: float | None  # same for the integrator's conserved quantity, if given
    temperature_mean_K: float
    temperature_std_K: float
    max_force_eV_A: float
    min_distance_A: float
    min_distance_frame: int
    max_step_A: float  # largest (minimum-image) displacement of an atom between consecutive frames
    too_close_frames: list[int]
    jumping_atoms: list[int]
    isolated_atoms: list[int]
    finite: bool
    stable: bool

    def summary(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _drift(t_ps: np.ndarray, energy: np.ndarray, n_atoms: int) -> float:
    if len(t_ps) < 2 or not np.isfinite(energy).all():
        return float("nan")
    return float(np.polyfit(t_ps, np.asarray(energy, np.float64) / n_atoms, 1)[0]) * 1000.0


def nearest_neighbour_distances(positions: np.ndarray, cell: np.ndarray, radius: float, pbc: bool = True
                                ) -> np.ndarray:
    """Distance of each atom to its nearest other atom (periodic images included) ``[n_atoms]`` Å;
    ``inf`` for atoms with nobody within ``radius``."""
    n = len(positions)
    i, j, d = _pairs(positions, cell, radius, pbc)
    nearest = np.full(n, np.inf)
    np.minimum.at(nearest, i, d)
    np.minimum.at(nearest, j, d)
    return nearest


def stability_report(frames: Sequence[Atoms], t_ps: np.ndarray, total_energy: np.ndarray | None = None,
                     temperature_K: np.ndarray | None = None, forces: np.ndarray | None = None,
                     conserved_energy: np.ndarray | None = None, too_close_A: float = 1.0, jump_A: float = 3.0,
                     isolated_A: float = 4.0) -> StabilityReport:
    """Stability of an MD trajectory sampled as ``frames`` (wrapped positions; periodic or free).

    Args:
        frames: ``n_frames`` ASE ``Atoms``.
        t_ps: ``[n_frames]`` times; total_energy: ``[n_frames]`` E_pot + E_kin (eV);
            temperature_K: ``[n_frames]`` (both optional, e.g. for a positions-only AIMD: NaN in the report).
        forces: ``[n_frames, n_atoms, 3]`` eV/Å (default: the frames' calculator forces if attached).
        conserved_energy: ``[n_frames]`` the thermostat's conserved quantity (eV), e.g. Nose-Hoover's.
        too_close_A: pairs closer than this are unphysical; jump_A: largest plausible (minimum-image)
            displacement between consecutive frames; isolated_A: an atom with no neighbour within this
            distance has flown off.
    """
    if len(frames) == 0:
        raise ValueError("no frames given")
    t = np.asarray(t_ps, np.float64)
    nan = np.full(len(frames), np.nan)
    energy = nan if total_energy is None else np.asarray(total_energy, np.float64)
    temps = nan if temperature_K is None else np.asarray(temperature_K, np.float64)
    if not (t.shape == energy.shape == temps.shape == (len(frames),)):
        raise ValueError(f"t_ps, total_energy, temperature_K must all be [{len(frames)}], got "
                         f"{t.shape}, {energy.shape}, {temps.shape}")
    n = len(frames[0])
    pbc = bool(all(frames[0].pbc))
    if forces is None and frames[0].calc is not None and "forces" in frames[0].calc.results:
        forces = np.stack([a.calc.results["forces"] for a in frames])
    positions = np.stack([a.positions for a in frames])
    finite = bool(np.isfinite(positions).all() and (total_energy is None or np.isfinite(energy).all())
                  and (temperature_K is None or np.isfinite(temps).all())
                  and (forces is None or np.isfinite(forces).all()))
    min_d, min_frame, too_close, isolated = np.inf, -1, [], set()
    if finite:
        for k, atoms in enumerate(frames):
            nearest = nearest_neighbour_distances(atoms.positions, atoms.cell.array, isolated_A, pbc)
            if nearest.min() < min_d:
                min_d, min_frame = float(nearest.min()), k
            if nearest.min() < too_close_A:
                too_close.append(k)
            isolated.update(np.flatnonzero(~np.isfinite(nearest)).tolist())
    jumping: list[int] = []
    max_step = float("nan")
    if finite and len(frames) > 1:
        cells = np.stack([a.cell.array for a in frames]) if pbc else None
        if pbc:
            steps = np.diff(unwrap(positions, cells), axis=0)
        else:
            steps = np.diff(positions, axis=0)
        per_atom = np.linalg.norm(steps, axis=-1).max(axis=0)
        max_step = float(per_atom.max())
        jumping = np.flatnonzero(per_atom > jump_A).tolist()
    conserved = None if conserved_energy is None else _drift(t, np.asarray(conserved_energy), n)
    max_force = float(np.abs(np.linalg.norm(forces, axis=-1)).max()) if forces is not None else float("nan")
    stable = finite and not too_close and not jumping and not isolated
    return StabilityReport(
        n_frames=len(frames), duration_ps=float(t[-1] - t[0]), energy_drift_meV_atom_ps=_drift(t, energy, n),
        conserved_drift_meV_atom_ps=conserved, temperature_mean_K=float(np.mean(temps)),
        temperature_std_K=float(np.std(temps)), max_force_eV_A=max_force, min_distance_A=float(min_d),
        min_distance_frame=int(min_frame), max_step_A=max_step, too_close_frames=too_close, jumping_atoms=jumping,
        isolated_atoms=sorted(isolated), finite=finite, stable=stable)
