"""Radial distribution functions of a trajectory and the protocol's RDF error / overlap against a reference."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from ase import Atoms

from .frames import check_frames, default_r_max, pairs_within


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
    check_frames(frames)
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
        i, j, d = pairs_within(atoms.positions, atoms.cell.array, r_max)
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
