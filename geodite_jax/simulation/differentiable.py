"""Differentiable simulation: MD observables as functions of the model's parameters and the initial state.

The whole trajectory is one ``lax.fori_loop`` of jax-md velocity-Verlet steps with a fixed-capacity neighbour
list, so ``jax.grad`` runs back through it. Example (gradient of the mean potential energy of a 50-step NVE
run with respect to every parameter and to the initial positions)::

    system = jaxmd_system(potential, atoms)
    observable = make_nve_observable(system, steps=50)
    state = potential.state(jnp.float64)
    (value, overflow), (g_state, g_R0) = jax.value_and_grad(observable, argnums=(0, 1), has_aux=True)(
        state, system.positions, momenta)

Gradients with respect to periodic (fractional) positions come out in Cartesian units (jax-md's
``space.transform`` JVP): ``g_R0 · v`` is the derivative along a Cartesian displacement ``v [n_atoms, 3]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from ase import units
from jax_md import simulate

from .jaxmd import JaxMDSystem
from .neighbors import GeoditeNeighborList


def make_nve_observable(system: JaxMDSystem, steps: int, timestep_fs: float = 1.0,
                        neighbors: GeoditeNeighborList | None = None
                        ) -> Callable[[dict, jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]:
    """``observable(state, R0, P0) -> (mean potential energy over the steps (eV), overflow flag)``.

    ``state``: :meth:`Potential.state` (differentiable, the isolated-atom table is recomputed from it);
    ``R0 [n_atoms, 3]`` positions in the system's coordinates; ``P0 [n_atoms, 3]`` momenta (ASE units, system
    frame). ``neighbors`` defaults to a list allocated at the system's positions with the skin capacity as
    tight capacity (no re-compaction overflow). The flag is True if the list overflowed: the value is then
    not to be trusted (allocate a larger list).
    """
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if neighbors is None:
        neighbors = system.allocate(system.positions, system.box)
        neighbors = neighbors.set(capacity=int(neighbors.skin.idx.shape[1]))
    masses = jnp.asarray(system.masses, system.dtype)
    dt = timestep_fs * units.fs

    def observable(state: dict, R0: jnp.ndarray, P0: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        def energy(R: jnp.ndarray, neighbor: GeoditeNeighborList, **kwargs: Any) -> jnp.ndarray:
            return system.raw_energy_fn(state, R, neighbor, None, **kwargs)

        init_fn, apply_fn = simulate.nve(energy, system.shift_fn, dt)
        md = init_fn(jax.random.PRNGKey(0), R0, 0.0, mass=masses, momenta=P0, neighbor=neighbors)

        def body(_: int, carry: tuple[Any, GeoditeNeighborList, jnp.ndarray]) -> tuple[Any, Any, jnp.ndarray]:
            md, nbr, total = carry
            md = apply_fn(md, neighbor=nbr)
            nbr = nbr.update(md.position)
            return md, nbr, total + energy(md.position, neighbor=nbr)

        zero = jnp.zeros((), R0.dtype)
        md, nbr, total = jax.lax.fori_loop(0, steps, body, (md, neighbors, zero))
        return total / steps, nbr.did_buffer_overflow

    return observable
