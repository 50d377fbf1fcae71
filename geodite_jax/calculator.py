"""ASE calculator: a Geodite potential as any ASE calculator (energy, forces, stress, per-atom energies)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from .graph import atoms_to_graph, batch_graphs, bucket
from .potential import Potential, make_predict_fn

_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def enable_float64() -> None:
    """Switch JAX to 64-bit mode (a process-wide setting; float32 arrays stay float32)."""
    jax.config.update("jax_enable_x64", True)


class GeoditeCalculator(Calculator):
    """ASE calculator for a :class:`Potential`.

    Structures are padded to grow-only size buckets, so an MD run or a relaxation compiles a few times
    at most. ``dtype="float64"`` switches JAX to 64-bit mode for the whole process.
    Stress (ASE convention, eV/Å³, Voigt order) is defined only for periodic structures.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, potential: Potential, dtype: str = "float32", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if dtype == "float64":
            enable_float64()
        self.potential = potential
        self.dtype = dtype
        jdtype = _DTYPES[dtype]
        self._state = potential.state(jdtype)
        self._vacuum = potential.vacuum_energies(jdtype) if potential.config.vacuum else None
        self._predict = jax.jit(make_predict_fn(potential.config))
        self._node_budget = 0
        self._edge_budget = 0

    def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                  system_changes: list[str] = all_changes) -> None:
        properties = properties or ["energy"]
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if "stress" in properties and not atoms.pbc.any():
            raise PropertyNotImplementedError("stress is undefined for a non-periodic structure (atoms.pbc all False)")
        graph = atoms_to_graph(atoms, self.potential.config.cutoff, self.potential.config.num_elements,
                               np.float32 if self.dtype == "float32" else np.float64)
        # Grow-only buckets: shrinking systems reuse the compiled larger shape.
        self._node_budget = max(self._node_budget, bucket(len(atoms) + 1, 8, 8))
        self._edge_budget = max(self._edge_budget, bucket(int(graph.n_edge[0]), 256, 64))
        batch = batch_graphs([graph], self._node_budget, self._edge_budget, 2)
        out = self._predict(self._state, jax.tree_util.tree_map(jnp.asarray, batch), self._vacuum)
        n = len(atoms)
        energy = float(out["energy"][0])
        self.results = {"energy": energy, "free_energy": energy,
                        "energies": np.asarray(out["node_energies"][:n], np.float64),
                        "forces": np.asarray(out["forces"][:n], np.float64)}
        if atoms.pbc.any():
            self.results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(out["stress"][0], np.float64))
