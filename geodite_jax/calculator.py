"""ASE calculator: a Geodite potential as any ASE calculator (energy, forces, stress, per-atom energies)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from .energy import make_predict_fn
from .graph import atoms_to_graph, batch_graphs, bucket, max_degree
from .potential import Potential
from .precision import resolve_dtype


class GeoditeCalculator(Calculator):
    """ASE calculator for a :class:`Potential`.

    Structures are padded to grow-only size buckets, so an MD run or a relaxation compiles a few times
    at most. ``dtype="float64"`` switches JAX to 64-bit mode for the whole process.
    Stress (ASE convention, eV/Å³, Voigt order) is defined only for periodic structures.

    ``chunk_edges``: edge slots per chunk of receiver nodes (``None``: the model's default, ``0``: no
    chunks). Chunks bound the memory of an evaluation by the node state and one ``[E, F]`` edge state per
    layer; the numbers do not depend on it. ``fused``: the fused CPU kernels of :mod:`geodite_jax.fused`
    (``None``: within their memory budget; ``True``: at any size, for speed at ~3 KB more per edge;
    ``False``: never); the numbers do not depend on it either.
    """

    #: Graphs with at least this many edges always use the neighbour-block layout (chunked, bounded
    #: memory), even where uneven degrees waste slots; smaller irregular graphs use the sparse layout.
    BLOCK_LAYOUT_EDGES = 20_000

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, potential: Potential, dtype: str = "float32", chunk_edges: int | None = None,
                 fused: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        jdtype = resolve_dtype(dtype)
        self.potential = potential
        self.dtype = dtype
        self.chunk_edges = chunk_edges
        self.fused = fused
        self._state = potential.state(jdtype)
        self._vacuum = potential.vacuum_energies(jdtype) if potential.config.vacuum else None
        self._predictors: dict[int | None, Any] = {}  # one jitted function per edge layout
        self._node_budget = 0
        self._edge_budget = 0
        self._block_budget = 0

    @property
    def compile_count(self) -> int:
        """Number of compiled shapes so far (a handful per MD run; one per bucket)."""
        return sum(fn._cache_size() for fn in self._predictors.values())

    def _predictor(self, neighbours_per_node: int | None) -> Any:
        if neighbours_per_node not in self._predictors:
            self._predictors[neighbours_per_node] = jax.jit(
                make_predict_fn(self.potential.config, neighbours_per_node=neighbours_per_node,
                                chunk_edges=self.chunk_edges, fused=self.fused))
        return self._predictors[neighbours_per_node]

    def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                  system_changes: list[str] = all_changes) -> None:
        properties = properties or ["energy"]
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if "stress" in properties and not atoms.pbc.any():
            raise PropertyNotImplementedError("stress is undefined for a non-periodic structure (atoms.pbc all False)")
        self.potential.check_elements(atoms.numbers)
        graph = atoms_to_graph(atoms, self.potential.config.cutoff, self.potential.config.num_elements,
                               np.float32 if self.dtype == "float32" else np.float64)
        # Grow-only buckets: shrinking or fluctuating systems reuse the compiled larger shape. Atom counts
        # rarely change within a run, so their ladder is fine (2 %, multiples of 8: every padding node costs
        # a block of edge slots); degrees and edge counts fluctuate in MD, so theirs is coarser (5 %, 10 %).
        n_edges = int(graph.n_edge[0])
        self._node_budget = max(self._node_budget, bucket(len(atoms) + 1, 8, 8, growth=1.02))
        block = max(self._block_budget, bucket(max(max_degree([graph]), 1), 8, 2, growth=1.05))
        if self._node_budget * block <= 1.25 * max(n_edges, 1) or n_edges >= self.BLOCK_LAYOUT_EDGES:
            # Uniform degrees (crystals, liquids) or a large graph: neighbour blocks, sums by reshaping,
            # evaluated in chunks of receivers (faster, memory bounded).
            self._block_budget = block
            batch = batch_graphs([graph], self._node_budget, None, 2, neighbours_per_node=block)
        else:
            block = None
            self._edge_budget = max(self._edge_budget, bucket(n_edges, 256, 64, growth=1.1))
            batch = batch_graphs([graph], self._node_budget, self._edge_budget, 2)
        out = self._predictor(block)(self._state, jax.tree_util.tree_map(jnp.asarray, batch), self._vacuum)
        n = len(atoms)
        energy = float(out["energy"][0])
        self.results = {"energy": energy, "free_energy": energy,
                        "energies": np.asarray(out["node_energies"][:n], np.float64),
                        "forces": np.asarray(out["forces"][:n], np.float64)}
        if atoms.pbc.any():
            self.results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(out["stress"][0], np.float64))
