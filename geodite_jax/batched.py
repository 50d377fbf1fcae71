"""Geodite on many tiny structures in one compiled call: dimer curves for the diatomics benchmark.

:mod:`geodite_jax.benchmarks.diatomics` scores curves of any model; this is the Geodite path that computes
them fast, every point of a curve a graph of one padded batch (the calculator would compile and call once per
point). Also the elements a potential knows, the default set of dimers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from .config import GeoditeConfig
from .energy import make_predict_fn
from .graph import atoms_to_graph, batch_graphs
from .precision import resolve_dtype


def known_elements(potential: Any) -> list[str]:
    """Symbols of the elements a potential was trained on: ``metadata["elements"]`` if recorded (atomic
    numbers, as the trainer writes them, or symbols), else those with a non-zero isolated-atom energy E0."""
    meta = getattr(potential, "metadata", {}) or {}
    if meta.get("elements"):
        return [s if isinstance(s, str) and not s.isdigit() else chemical_symbols[int(s)] for s in meta["elements"]]
    e0 = np.asarray(potential.element_energies)
    limit = min(len(e0), potential.config.num_elements)
    return [chemical_symbols[z] for z in range(1, limit) if e0[z] != 0.0]


@functools.lru_cache(maxsize=8)
def _jitted_predict(config: GeoditeConfig) -> Any:
    """One jitted predictor per model configuration, so repeated calls reuse the compiled dimer batch."""
    return jax.jit(make_predict_fn(config, sorted_receivers=True))


def dimer_curves(potential: Any, pairs: Sequence[tuple[str, str]], distances: np.ndarray, box: float = 50.0,
                 dtype: str = "float64") -> dict[str, dict[str, np.ndarray]]:
    """``{"A-B": {"distances" [n], "energies" [n], "forces" [n, 2, 3]}}`` (Å, eV, eV/Å) of each dimer of
    ``pairs``: two atoms along x at ``distances [n]`` in a periodic cubic ``box`` (Å), one batched call per pair.

    Points closer than the graph builder's overlap limit get NaN (outside every evaluation window).
    """
    jdtype = resolve_dtype(dtype)
    npdtype = np.float64 if dtype == "float64" else np.float32
    cfg = potential.config
    state = potential.state(jdtype)
    vacuum = potential.vacuum_energies(jdtype) if cfg.vacuum else None
    predict = _jitted_predict(cfg)
    n = len(distances)
    out = {}
    for a, b in pairs:
        graphs, ok = [], []
        for r in distances:
            atoms = Atoms([a, b], positions=[[0, 0, 0], [r, 0, 0]], cell=np.eye(3) * box, pbc=True)
            try:
                graphs.append(atoms_to_graph(atoms, cfg.cutoff, cfg.num_elements, npdtype))
                ok.append(True)
            except ValueError:
                ok.append(False)
        # Fixed padding (2 nodes and ≤ 2 edges per dimer) so all pairs share one compiled shape.
        batch = batch_graphs(graphs, 2 * n + 2, 2 * n + 2, n + 1)
        res = predict(state, jax.tree_util.tree_map(jnp.asarray, batch), vacuum)
        energies, forces = np.full(n, np.nan), np.full((n, 2, 3), np.nan)
        idx = np.flatnonzero(ok)
        energies[idx] = np.asarray(res["energy"][: len(idx)], np.float64)
        forces[idx] = np.asarray(res["forces"][: 2 * len(idx)], np.float64).reshape(-1, 2, 3)
        out[f"{a}-{b}"] = {"distances": np.asarray(distances, np.float64), "energies": energies, "forces": forces}
    return out
