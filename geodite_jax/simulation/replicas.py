"""Batched replicas: many copies (or variants: other positions, momenta, temperatures) of one small system
advanced together in one jit-compiled, ``vmap``-ed block, for throughput.

Replicas share the box, species and neighbour-list capacities (static shapes); each has its own positions,
momenta, neighbour list and RNG key. An overflow in any replica reallocates all lists and redoes the block.
"""

from __future__ import annotations

import dataclasses as pydc
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ase import units
from jax_md import simulate

from .jaxmd import JaxMDSystem
from .neighbors import GeoditeNeighborList, run_with_regrowth


@pydc.dataclass
class ReplicaRun:
    """States after a replica run. ``state`` and ``neighbors`` are batched pytrees (leading axis = replica);
    ``atom_steps_per_s`` counts replicas × atoms × steps per wall second of the timed blocks (compilation
    excluded)."""

    state: Any
    neighbors: GeoditeNeighborList
    steps: int
    wall_s: float
    atom_steps_per_s: float


def _stack(trees: list[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def replica_positions(system: JaxMDSystem, n_replicas: int, rattle: float = 0.02, seed: int = 0) -> jnp.ndarray:
    """``[n_replicas, n_atoms, 3]`` copies of the system's positions, each rattled by ``rattle`` Å (Gaussian)."""
    rng = np.random.default_rng(seed)
    R = np.asarray(system.positions, np.float64)
    out = []
    for _ in range(n_replicas):
        d = rng.normal(scale=rattle, size=R.shape)
        if system.pbc:
            d = d @ np.linalg.inv(np.asarray(system.box, np.float64)).T  # Cartesian -> fractional
            out.append((R + d) % 1.0)
        else:
            out.append(R + d)
    return jnp.asarray(np.stack(out), system.dtype)


class ReplicaRunner:
    """NVE or Langevin NVT for a batch of replicas of ``system``.

    ``temperatures_K``: one per replica (Langevin target and initial Maxwell-Boltzmann draw).
    """

    def __init__(self, system: JaxMDSystem, ensemble: str = "nvt", timestep_fs: float = 1.0,
                 friction_per_fs: float = 0.01) -> None:
        if ensemble not in ("nve", "nvt"):
            raise ValueError(f"replicas run 'nve' or 'nvt' (Langevin), got {ensemble!r}")
        self.system, self.ensemble = system, ensemble
        dt = timestep_fs * units.fs
        if ensemble == "nve":
            init_fn, apply_fn = simulate.nve(system.energy_fn, system.shift_fn, dt)
        else:
            init_fn, apply_fn = simulate.nvt_langevin(system.energy_fn, system.shift_fn, dt, 0.0,
                                                      gamma=friction_per_fs / units.fs)
        masses = jnp.asarray(system.masses, system.dtype)

        def init_one(key: jax.Array, R: jnp.ndarray, kT: jnp.ndarray, nbr: GeoditeNeighborList,
                     momenta: jnp.ndarray | None) -> Any:
            if ensemble == "nve":
                return init_fn(key, R, kT, mass=masses, neighbor=nbr, momenta=momenta)
            return init_fn(key, R, mass=masses, kT=kT, neighbor=nbr, momenta=momenta)

        def block_one(state: Any, nbr: GeoditeNeighborList, kT: jnp.ndarray, n: jnp.ndarray) -> tuple[Any, Any]:
            def body(_: int, carry: tuple[Any, Any]) -> tuple[Any, Any]:
                state, nbr = carry
                kwargs = {} if ensemble == "nve" else {"kT": kT}
                state = apply_fn(state, neighbor=nbr, **kwargs)
                return state, nbr.update(state.position)

            return jax.lax.fori_loop(0, n, body, (state, nbr))

        self._init = jax.jit(jax.vmap(init_one))
        self._block = jax.jit(jax.vmap(block_one, in_axes=(0, 0, 0, None)))

    def neighbors(self, positions: jnp.ndarray, like: GeoditeNeighborList | None = None) -> GeoditeNeighborList:
        """Batched lists for ``positions [B, n_atoms, 3]`` with common capacities: the largest any replica needs
        (or those of ``like``)."""
        system = self.system
        lists = [system.allocate(R, system.box) for R in positions] if like is None else []
        if like is None:
            like = max(lists, key=lambda nb: (int(nb.skin.max_occupancy), nb.capacity))
            like = like.set(capacity=max(nb.capacity for nb in lists))
        fns = system.neighbor_fn
        refits = [fns.refit(like, R) for R in positions]
        counts = [like.count_fn(R, nb.idx, **fns.pair_extra(nb.skin)).astype(like.tight_count.dtype)
                  for R, nb in zip(positions, refits, strict=True)]
        return _stack([nb.set(tight_count=c) for nb, c in zip(refits, counts, strict=True)])

    def init(self, positions: jnp.ndarray, temperatures_K: np.ndarray | float, seed: int = 0,
             momenta: np.ndarray | None = None) -> tuple[Any, Any]:
        """Batched integrator states and neighbour lists for ``positions [B, n_atoms, 3]``; momenta
        ``[B, n_atoms, 3]`` (system frame) or Maxwell-Boltzmann draws at ``temperatures_K`` (one per replica)."""
        n = positions.shape[0]
        kT = jnp.broadcast_to(jnp.asarray(temperatures_K, self.system.dtype) * units.kB, (n,))
        keys = jax.random.split(jax.random.PRNGKey(seed), n)
        nbr = self.neighbors(positions)
        momenta = None if momenta is None else jnp.asarray(momenta, self.system.dtype)
        return self._init(keys, positions, kT, nbr, momenta), nbr

    def run(self, state: Any, nbr: GeoditeNeighborList, temperatures_K: np.ndarray | float, steps: int,
            block: int = 50) -> ReplicaRun:
        """Advance every replica (batched ``state``, ``nbr`` of :meth:`init`; ``temperatures_K`` a number or
        ``[B]``) by ``steps``; the first block is run (and compiled) before timing starts."""
        n_rep = jax.tree_util.tree_leaves(state)[0].shape[0]
        kT = jnp.broadcast_to(jnp.asarray(temperatures_K, self.system.dtype) * units.kB, (n_rep,))
        done, wall, timed_steps = 0, 0.0, 0
        while done < steps:
            n = min(block, steps - done)
            t0 = time.perf_counter()

            def block_fn(nbr: GeoditeNeighborList, start: Any = state, n: int = n) -> tuple[Any, Any]:
                return jax.block_until_ready(self._block(start, nbr, kT, jnp.asarray(n, jnp.int32)))

            def regrow(_: Any, failed: GeoditeNeighborList, finite: bool, start: Any = state) -> GeoditeNeighborList:
                return self._regrow(start, failed)

            new_state, new_nbr = run_with_regrowth(block_fn, nbr, regrow, "replica block")
            if done > 0:  # the first block includes compilation
                wall += time.perf_counter() - t0
                timed_steps += n
            state, nbr = new_state, new_nbr
            done += n
        rate = n_rep * self.system.n_atoms * timed_steps / wall if wall > 0 else float("nan")
        return ReplicaRun(state, nbr, done, wall, rate)

    def _regrow(self, state: Any, failed: GeoditeNeighborList) -> GeoditeNeighborList:
        system = self.system
        positions = state.position
        worst = int(np.argmax(np.asarray(failed.skin.error.code)))
        one = jax.tree_util.tree_map(lambda x: x[worst], failed)
        grown = system.neighbor_fn.grow(one, positions[worst], tight=True)
        grown = grown.set(capacity=max(grown.capacity, int(np.asarray(failed.tight_count).max()) + 1))
        return self.neighbors(positions, like=grown)
