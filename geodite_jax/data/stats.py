"""Dataset statistics: least-squares element reference energies E0 and the size and label statistics a store
keeps in its ``dataset.json`` (:class:`DatasetStats`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from ase.data import chemical_symbols

from ..elements import MAX_Z

if TYPE_CHECKING:
    from .store import GraphDataset


@dataclasses.dataclass
class DatasetStats:
    """Size and label statistics of a dataset (JSON-able via :meth:`to_dict`).

    ``energy_per_atom_mean/std`` are of ``(E − Σ_i E0(Z_i)) / n_atoms`` with the least-squares
    ``element_energies`` of the same data; ``force_rms`` is over all force components (eV/Å), the usual
    energy scale of a potential; ``mean_neighbours`` = directed edges per atom at ``cutoff``.
    """

    n_frames: int
    n_atoms: int
    n_edges: int
    cutoff: float
    max_atoms: int
    max_edges: int
    frames_with_energy: int
    frames_with_forces: int
    frames_with_stress: int
    elements: list[int]
    element_counts: dict[str, int]
    element_energies: dict[str, float]
    force_rms: float
    mean_neighbours: float
    energy_per_atom_mean: float
    energy_per_atom_std: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetStats:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def element_energy_array(self) -> np.ndarray:
        """The fitted ``element_energies`` as an array indexed by atomic number, ``[119]`` (0 where absent)."""
        e0 = np.zeros(MAX_Z + 1)
        for symbol, value in self.element_energies.items():
            e0[chemical_symbols.index(symbol)] = value
        return e0


def fit_element_energies(data: GraphDataset | tuple[np.ndarray, np.ndarray], ridge: float = 1e-8,
                         defaults: np.ndarray | None = None, fixed: Mapping[int, float] | None = None) -> np.ndarray:
    """Per-element reference energies E0 ``[119]`` (eV) by least squares of total energies on element counts.

    Minimises ``Σ_f (E_f − Σ_Z n_fZ E0_Z)² + ridge · |E0|²`` over the elements present; rank-deficient
    systems (elements that only ever appear in a fixed ratio) get the minimum-norm solution. Elements
    absent from the data get ``defaults[Z]`` (or 0).

    Args:
        data: a :class:`GraphDataset` (frames with an energy label) or ``(counts [F, 119], energies [F])``.
        fixed: ``{Z: E0}`` kept as given; the other elements are fitted to what these leave unexplained
            (fine-tuning a model on data with new elements).
    """
    gram = np.zeros((MAX_Z + 1, MAX_Z + 1))
    rhs = np.zeros(MAX_Z + 1)
    if not isinstance(data, tuple):  # a GraphDataset
        for block in data.blocks():
            has = np.asarray(block.shard["has_energy"])[block.local]
            counts = block.counts[has].astype(np.float64)
            gram += counts.T @ counts
            rhs += counts.T @ np.asarray(block.shard["energy"])[block.local][has]
    else:
        counts, energies = (np.asarray(x, dtype=np.float64) for x in data)
        if counts.ndim != 2 or counts.shape[1] != MAX_Z + 1 or energies.shape != (counts.shape[0],):
            raise ValueError(f"expected counts [F, {MAX_Z + 1}] and energies [F], got {counts.shape} and "
                             f"{energies.shape}")
        gram, rhs = counts.T @ counts, counts.T @ energies
    e0 = np.zeros(MAX_Z + 1) if defaults is None else np.array(defaults, dtype=np.float64)
    if e0.shape != (MAX_Z + 1,):
        raise ValueError(f"defaults must have shape [{MAX_Z + 1}], got {list(e0.shape)}")
    pinned = np.zeros(MAX_Z + 1, bool)
    for z, value in (fixed or {}).items():
        if not 1 <= int(z) <= MAX_Z:
            raise ValueError(f"fixed element energies: atomic number {z} out of range 1..{MAX_Z}")
        e0[int(z)], pinned[int(z)] = float(value), True
    rhs = rhs - gram[:, pinned] @ e0[pinned]  # energy the fixed references leave unexplained
    free = np.flatnonzero((np.diag(gram) > 0) & ~pinned)
    if free.size == 0:
        return e0
    a = gram[np.ix_(free, free)] + ridge * np.eye(free.size)
    w, v = np.linalg.eigh(a)
    # Pseudo-inverse: directions the data do not determine (data eigenvalue ~ 0, only the ridge) get no weight;
    # dividing by the ridge alone would amplify round-off into eV-size errors along them.
    keep = w - ridge > w.max() * 1e-10
    e0[free] = v[:, keep] @ ((v[:, keep].T @ rhs[free]) / w[keep])
    return e0


def compute_stats(ds: GraphDataset) -> DatasetStats:
    """:class:`DatasetStats` of ``ds`` (one pass over its shards)."""
    e0 = fit_element_energies(ds)
    element_counts = np.zeros(MAX_Z + 1, np.int64)
    force_sq, force_n, residuals = 0.0, 0, []
    n_energy = n_forces = n_stress = 0
    for block in ds.blocks():
        shard, loc = block.shard, block.local
        element_counts += block.counts.sum(0)
        has_e = np.asarray(shard["has_energy"])[loc]
        has_f = np.asarray(shard["has_forces"])[loc]
        n_energy, n_forces = n_energy + int(has_e.sum()), n_forces + int(has_f.sum())
        n_stress += int(np.asarray(shard["has_stress"])[loc].sum())
        labelled = block.atoms[has_f[block.frame_of_atom]]
        forces = np.asarray(shard["forces"][labelled])
        force_sq, force_n = force_sq + float(np.sum(forces ** 2)), force_n + forces.size
        n = block.counts.sum(1)
        residuals.append(((np.asarray(shard["energy"])[loc] - block.counts @ e0) / np.maximum(n, 1))[has_e])
    residuals = np.concatenate(residuals) if residuals else np.zeros(0)
    present = np.flatnonzero(element_counts)
    n_atoms, n_edges = int(ds.n_atoms.sum()), int(ds.n_edges.sum())
    return DatasetStats(
        n_frames=len(ds), n_atoms=n_atoms, n_edges=n_edges, cutoff=ds.cutoff,
        max_atoms=int(ds.n_atoms.max()) if len(ds) else 0, max_edges=int(ds.n_edges.max()) if len(ds) else 0,
        frames_with_energy=n_energy, frames_with_forces=n_forces, frames_with_stress=n_stress,
        elements=[int(z) for z in present],
        element_counts={chemical_symbols[z]: int(element_counts[z]) for z in present},
        element_energies={chemical_symbols[z]: float(e0[z]) for z in present},
        force_rms=float(np.sqrt(force_sq / force_n)) if force_n else 0.0,
        mean_neighbours=n_edges / n_atoms if n_atoms else 0.0,
        energy_per_atom_mean=float(residuals.mean()) if residuals.size else 0.0,
        energy_per_atom_std=float(residuals.std()) if residuals.size else 0.0)
