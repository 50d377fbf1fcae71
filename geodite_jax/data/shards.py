"""One shard of a store built from frames: each frame's neighbour list at the cutoff (the calculator's own
:func:`~geodite_jax.graph.atoms_to_graph`) and the concatenated per-frame, per-atom and per-edge arrays."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import jraph
import numpy as np
from ase import Atoms

from ..graph import atoms_to_graph
from .frames import Frame


def with_graphs(frames: Iterable[Frame], cutoff: float, num_elements: int,
                 on_error: str) -> Iterator[tuple[Frame, jraph.GraphsTuple]]:
    """Pairs (frame, graph) with the package's own neighbour search; bad structures raise or are skipped."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    for k, frame in enumerate(frames):
        atoms = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
        try:
            graph = atoms_to_graph(atoms, cutoff, num_elements, np.float64)
        except ValueError as err:
            message = f"frame {frame.id or k!r}: {err}"
            if on_error == "raise":
                raise ValueError(message) from err
            logging.getLogger("geodite_jax.data").warning("skipping frame: %s", message)
            continue
        yield frame, graph


def smallest_int(values: np.ndarray) -> np.ndarray:
    """Same integers in the smallest signed dtype that holds them (int8/int16/int32/int64)."""
    values = np.asarray(values)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return values.astype(dtype)
    raise ValueError("integers out of int64 range")


def build_shard(items: Sequence[tuple[Frame, jraph.GraphsTuple]]) -> dict[str, np.ndarray]:
    """Arrays of one shard from (frame, graph) pairs (the layout in :mod:`geodite_jax.data.store`)."""
    frames = [f for f, _ in items]
    graphs = [g for _, g in items]
    n_atoms = np.array([len(f) for f in frames], np.int64)
    n_edges = np.array([len(g.senders) for g in graphs], np.int64)
    return {
        "numbers": np.concatenate([f.numbers for f in frames]).astype(np.uint8),
        "positions": np.concatenate([f.positions for f in frames]),
        "forces": np.concatenate([f.forces if f.forces is not None else np.zeros((len(f), 3)) for f in frames]),
        "atom_offsets": np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64),
        "edge_offsets": np.concatenate([[0], np.cumsum(n_edges)]).astype(np.int64),
        "cell": np.stack([f.cell for f in frames]),
        "pbc": np.stack([f.pbc for f in frames]),
        "energy": np.array([f.energy if f.energy is not None else 0.0 for f in frames]),
        "stress": np.stack([f.stress if f.stress is not None else np.zeros((3, 3)) for f in frames]),
        "has_energy": np.array([f.energy is not None for f in frames]),
        "has_forces": np.array([f.forces is not None for f in frames]),
        "has_stress": np.array([f.stress is not None for f in frames]),
        "senders": smallest_int(np.concatenate([g.senders for g in graphs])),
        "receivers": smallest_int(np.concatenate([g.receivers for g in graphs])),
        "shifts": smallest_int(np.rint(np.concatenate([g.edges["shifts"] for g in graphs])).reshape(-1, 3)),
    }
