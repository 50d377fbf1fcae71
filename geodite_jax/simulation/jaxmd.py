"""Geodite as a jax-md energy function: periodic (triclinic, fractional coordinates) or free space.

jax-md conventions used throughout: a ``box`` is a ``[3, 3]`` matrix whose *columns* are the lattice vectors
(the transpose of ASE's ``cell``) and must be upper triangular for jax-md's cell lists, so a periodic
structure is first rotated into ASE's standard (lower-triangular cell) frame; periodic positions ``R`` are
fractional ``[n_atoms, 3]``; units are eV, Å, amu, so one time unit is ``1 / ase.units.fs`` ≈ 10.18 fs and
momenta are in ASE's units.

Two doors: :func:`geodite_neighbor_list` is jax-md's own idiom (``neighbor_fn, energy_fn = ...``, for any
jax-md integrator); :func:`jaxmd_system` prepares an ASE structure (rotation into jax-md's frame, masses,
conversion back) for the runners of :mod:`.md`, :mod:`.relax` and :mod:`.replicas`.

Neighbour lists are two-level (:mod:`.neighbors`): jax-md's skin list keeps every pair within
``cutoff + skin``; at each evaluation the energy compacts it to the pairs within ``cutoff`` (a "tight" list of
static capacity) so the model pays only for real edges. Never a silently dropped pair: over the tight capacity
the energy and forces are NaN and ``did_buffer_overflow`` is set, as it is for a skin-list overflow; either way
the driver reallocates with a larger capacity and redoes the block.
"""

from __future__ import annotations

import dataclasses as pydc
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from jax_md import space

from ..config import GeoditeConfig
from ..energy import PotentialState, atom_energies, strain_derivatives, stress_from_virial, symmetric_deformation
from ..graph import MIN_DISTANCE
from ..model import Geodite
from ..potential import Potential
from ..precision import resolve_dtype
from .neighbors import (
    NEIGHBOR_FORMATS,
    GeoditeNeighborFns,
    GeoditeNeighborList,
    compact_pairs,
    make_count_fn,
    make_skin_list,
    make_vector_fn,
    minimum_image_repeat,
    pairs,
    perpendicular_widths,
)


def make_geodite_energy(config: GeoditeConfig, displacement_fn: Callable, species: jnp.ndarray,
                        neighbor_format: str = "dense", compact: bool = True, box: jnp.ndarray | None = None,
                        multi_image: bool = False) -> Callable[..., jnp.ndarray]:
    """Low-level jax-md energy ``fn(state, R, neighbor, vacuum=None, **kwargs) -> E`` (eV), ``R [n_atoms, 3]``.

    ``state`` is :meth:`Potential.state` (differentiable: gradients w.r.t. parameters work);
    ``neighbor`` a :class:`GeoditeNeighborList`; ``kwargs`` (``box=``, ``perturbation=``) go to the
    displacement function, which is what makes stress and NPT work. ``vacuum=None`` recomputes the
    isolated-atom table from the parameters (use it when differentiating w.r.t. them).
    ``multi_image``: the list is a dense multi-image list (small cells) and ``box`` the default box.
    """
    if neighbor_format not in NEIGHBOR_FORMATS:
        raise ValueError(f"neighbor_format must be one of {sorted(NEIGHBOR_FORMATS)}, got {neighbor_format!r}")
    if multi_image and neighbor_format != "dense":
        raise ValueError("the multi-image neighbour list (cells narrower than 2 x (cutoff + skin)) is dense only")
    vector_fn = make_vector_fn(displacement_fn, box, multi_image)
    model = Geodite(config)
    dense = neighbor_format == "dense"
    cutoff_sq = config.cutoff**2
    species = jnp.asarray(species, jnp.int32)
    n = species.shape[0]

    def model_energy(state: PotentialState, R: jnp.ndarray, idx: jnp.ndarray, shifts: jnp.ndarray | None,
                     reference: jnp.ndarray | None, vacuum: jnp.ndarray | None, **kwargs: Any) -> jnp.ndarray:
        receivers, senders, valid = pairs(idx, n, dense)
        flat = None if shifts is None else shifts.reshape(-1, 3)
        vectors = vector_fn(R, receivers, senders, flat, reference, **kwargs)
        node_energies, _ = atom_energies(model, state, vectors, species, senders, receivers, edge_mask=valid,
                                         vacuum=vacuum, sorted_receivers=not dense,
                                         neighbours_per_node=idx.shape[1] if dense else None)
        return jnp.sum(node_energies)

    def energy(state: PotentialState, R: jnp.ndarray, neighbor: GeoditeNeighborList, vacuum: jnp.ndarray | None = None,
               **kwargs: Any) -> jnp.ndarray:
        idx, shifts = neighbor.idx, (neighbor.shifts if multi_image else None)
        reference = neighbor.reference if multi_image else None
        if not compact:
            return model_energy(state, R, idx, shifts, reference, vacuum, **kwargs)
        receivers, senders, valid = pairs(idx, n, dense)
        flat = None if shifts is None else shifts.reshape(-1, 3)
        d = jax.lax.stop_gradient(vector_fn(R, receivers, senders, flat, reference, **kwargs))
        within = valid & (jnp.sum(d**2, axis=-1) < cutoff_sq)
        count = within.reshape(idx.shape).sum(1).max() if dense else within.sum()
        if multi_image:
            tight, tight_shifts = compact_pairs(idx, within, neighbor.capacity, n, dense, shifts)
        else:
            tight, tight_shifts = compact_pairs(idx, within, neighbor.capacity, n, dense), None
        # Over capacity, pairs would be missing: poison energy and forces with NaN (the driver redoes the
        # block with a larger capacity) rather than return a silently wrong number.
        poison = jnp.where(count > neighbor.capacity, jnp.nan, 1.0).astype(R.dtype)
        return model_energy(state, R, tight, tight_shifts, reference, vacuum, **kwargs) * poison

    return energy


def geodite_neighbor_list(displacement_fn: Callable, box: jnp.ndarray | None, potential: Potential,
                          species: Any, *, dtype: str = "float32", skin: float = 0.5,
                          neighbor_format: str = "dense", capacity_multiplier: float = 1.25,
                          tight_multiplier: float = 1.25) -> tuple[GeoditeNeighborFns, Callable[..., jnp.ndarray]]:
    """jax-md's idiom: ``neighbor_fn, energy_fn = geodite_neighbor_list(displacement_fn, box, potential, species)``.

    Drops into any jax-md integrator::

        displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=True)
        neighbor_fn, energy_fn = geodite_neighbor_list(displacement_fn, box, potential, species)
        nbr = neighbor_fn.allocate(R)
        init_fn, apply_fn = simulate.nve(energy_fn, shift_fn, dt)
        state = init_fn(key, R, kT, mass=masses, neighbor=nbr)
        state = apply_fn(state, neighbor=nbr); nbr = nbr.update(state.position)
        # if nbr.did_buffer_overflow: nbr = neighbor_fn.allocate(state.position) and redo the steps

    Args:
        displacement_fn: ``space.periodic_general(box, fractional_coordinates=True)``'s (periodic: positions
            ``R [n_atoms, 3]`` fractional, ``box [3, 3]`` upper triangular, columns are lattice vectors) or
            ``space.free()``'s with ``box=None`` (Cartesian positions in Å).
        species: ``[n_atoms]`` atomic numbers.
        dtype: the precision of the energy (``"float64"`` switches JAX to 64-bit mode).
        skin, capacity_multiplier: jax-md's ``dr_threshold`` and head-room of the skin list.
        tight_multiplier: head-room of the per-evaluation tight list (pairs within the cutoff).

    Returns:
        ``neighbor_fn`` (``allocate(R, box=None)``, ``update(R, nbr)``; the list is a
        :class:`GeoditeNeighborList` whose ``did_buffer_overflow`` covers both levels) and
        ``energy_fn(R, neighbor, **kwargs) -> E`` (eV; ``box=`` and ``perturbation=`` as jax-md passes them).
        A cell narrower than ``2 (cutoff + skin)`` gets the dense multi-image list.
    """
    jdtype = resolve_dtype(dtype)
    if neighbor_format not in NEIGHBOR_FORMATS:
        raise ValueError(f"neighbor_format must be one of {sorted(NEIGHBOR_FORMATS)}, got {neighbor_format!r}")
    species = np.asarray(species, np.int32).reshape(-1)
    potential.check_elements(species)
    box = None if box is None else jnp.asarray(box, jdtype)
    neighbor_fn = _neighbor_fns(potential.config, displacement_fn, box, species.shape[0], skin, neighbor_format,
                                capacity_multiplier, tight_multiplier, compact=True)
    raw = make_geodite_energy(potential.config, displacement_fn, species, neighbor_format, True, box,
                              neighbor_fn.multi_image)
    state = potential.state(jdtype)
    vacuum = potential.vacuum_energies(jdtype) if potential.config.vacuum else None

    def energy_fn(R: jnp.ndarray, neighbor: GeoditeNeighborList | None = None, **kwargs: Any) -> jnp.ndarray:
        if neighbor is None:
            raise ValueError("the Geodite jax-md energy needs neighbor=<a list from neighbor_fn.allocate>")
        return raw(state, R, neighbor, vacuum, **kwargs)

    return neighbor_fn, energy_fn


def _neighbor_fns(config: GeoditeConfig, displacement_fn: Callable, box: jnp.ndarray | None, n_atoms: int,
                  skin: float, neighbor_format: str, capacity_multiplier: float, tight_multiplier: float,
                  compact: bool) -> GeoditeNeighborFns:
    """The two-level list for a box (multi-image when narrower than ``2 (cutoff + skin)``) or free space."""
    if not skin >= 0:
        raise ValueError(f"skin must be a non-negative length in Å, got {skin}")
    radius = config.cutoff + skin
    multi_image = box is not None and bool(perpendicular_widths(np.asarray(box, np.float64).T).min() <= 2 * radius)
    if multi_image and neighbor_format != "dense":
        cell = np.asarray(box, np.float64).T
        raise ValueError(f"cells narrower than 2 x (cutoff {config.cutoff} + skin {skin}) = {2 * radius:.2f} Å use "
                         f"the multi-image neighbour list, which is dense only (got {neighbor_format!r}); use "
                         f"neighbor_format='dense' or a supercell, e.g. atoms.repeat("
                         f"{minimum_image_repeat(cell, radius)})")
    dense = neighbor_format == "dense"
    skin_fns = make_skin_list(displacement_fn, box, config.cutoff, skin, capacity_multiplier, neighbor_format,
                              multi_image)
    count_fn = make_count_fn(displacement_fn, config.cutoff, n_atoms, dense, box, multi_image)
    return GeoditeNeighborFns(skin_fns, count_fn, n_atoms, dense, compact, float(tight_multiplier), multi_image)


# --------------------------------------------------------------------------------------------- the system
@pydc.dataclass(frozen=True)
class JaxMDSystem:
    """A structure prepared for jax-md with a Geodite potential bound to it (what the runners need).

    Attributes:
        energy_fn: ``energy_fn(R, neighbor=nbr, box=None, perturbation=None) -> E`` (eV), the function to hand
            to ``jax_md.simulate.*`` / ``jax_md.minimize.*``; ``raw_energy_fn(state, R, neighbor, vacuum,
            **kwargs)`` the same with the :class:`PotentialState` explicit (differentiable w.r.t. it).
        displacement_fn, shift_fn: from ``space.periodic_general(box, fractional_coordinates=True)`` or
            ``space.free()``.
        neighbor_fn: :class:`GeoditeNeighborFns` (allocate, update, grow, refit).
        positions: initial ``R [n_atoms, 3]`` (fractional when periodic).
        box: ``[3, 3]`` upper-triangular jax-md box (columns are lattice vectors), None in free space.
        species: ``[n_atoms]`` atomic numbers; masses: ``[n_atoms]`` amu.
        rotation: ``Q [3, 3]``: Cartesian positions in this frame are ``original @ Q.T``.
        skin: the Verlet skin (Å); state, vacuum: the potential's state and isolated-atom table in ``dtype``.
    """

    potential: Potential
    energy_fn: Callable[..., jnp.ndarray]
    raw_energy_fn: Callable[..., jnp.ndarray]
    displacement_fn: Callable
    shift_fn: Callable
    neighbor_fn: GeoditeNeighborFns
    positions: jnp.ndarray
    box: jnp.ndarray | None
    species: np.ndarray
    masses: np.ndarray
    rotation: np.ndarray
    skin: float
    dtype: Any
    state: PotentialState
    vacuum: jnp.ndarray | None
    info: dict = pydc.field(default_factory=dict)  # per-system cache of jitted observables

    @property
    def n_atoms(self) -> int:
        return int(self.species.shape[0])

    @property
    def pbc(self) -> bool:
        return self.box is not None

    @property
    def cutoff(self) -> float:
        return self.potential.config.cutoff

    @property
    def multi_image(self) -> bool:
        return self.neighbor_fn.multi_image

    @property
    def neighbor_format(self) -> str:
        return "dense" if self.neighbor_fn.dense else "sparse"

    def allocate(self, R: jnp.ndarray, box: jnp.ndarray | None = None, capacity: int | None = None,
                 extra_capacity: int = 0) -> GeoditeNeighborList:
        """A fresh neighbour list at ``R [n_atoms, 3]`` (see :meth:`GeoditeNeighborFns.allocate`)."""
        return self.neighbor_fn.allocate(R, box, capacity, extra_capacity)

    # ------------------------------------------------------------------------------------ observables
    def energy_forces_stress(self, R: jnp.ndarray, nbr: GeoditeNeighborList, box: jnp.ndarray | None = None
                             ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """``(E, forces [n_atoms, 3] eV/Å, stress [3, 3])``; stress in ASE's sign (eV/Å³), NaN in free space.

        Forces and stress are in this system's (rotated) Cartesian frame; not jitted.
        """
        return _efs(self, R, nbr, box)

    def cartesian(self, R: jnp.ndarray, box: jnp.ndarray | None = None) -> np.ndarray:
        """Cartesian positions ``[n_atoms, 3]`` in the *original* frame of the input structure."""
        R = np.asarray(R, np.float64)
        if self.pbc:
            box = np.asarray(self.box if box is None else box, np.float64)
            R = R @ box.T
        return R @ self.rotation

    def to_atoms(self, R: jnp.ndarray, box: jnp.ndarray | None = None, momenta: jnp.ndarray | None = None
                 ) -> Atoms:
        """An ASE ``Atoms`` in the input's frame from ``R [n_atoms, 3]``, ``box [3, 3]`` and
        ``momenta [n_atoms, 3]``."""
        atoms = Atoms(numbers=self.species, positions=self.cartesian(R, box), pbc=self.pbc)
        if self.pbc:
            box = np.asarray(self.box if box is None else box, np.float64)
            atoms.cell = box.T @ self.rotation
        atoms.set_masses(self.masses)
        if momenta is not None:
            atoms.set_momenta(np.asarray(momenta, np.float64) @ self.rotation)
        return atoms

    def rotate_in(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors ``[..., 3]`` from the input's frame into this system's frame."""
        return np.asarray(vectors) @ self.rotation.T


def _efs(system: JaxMDSystem, R: jnp.ndarray, nbr: GeoditeNeighborList, box: jnp.ndarray | None
         ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    fn = system.info.get("_efs")
    if fn is None:
        fn = jax.jit(make_energy_forces_stress(system.energy_fn, system.pbc))
        system.info["_efs"] = fn
    box = system.box if box is None else box
    return fn(R, nbr, box)


def make_energy_forces_stress(energy_fn: Callable[..., jnp.ndarray], periodic: bool
                              ) -> Callable[..., tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]]:
    """``fn(R, nbr, box) -> (E, F [n_atoms, 3], σ [3, 3])`` in one autodiff pass (σ = (1/V) ∂E/∂ε, ASE sign).

    An adapter of :func:`~geodite_jax.energy.strain_derivatives` (the derivation every stress uses): the
    strain enters as jax-md's ``perturbation``, the deformation applied to every pair vector.
    """

    def fn(R: jnp.ndarray, nbr: GeoditeNeighborList, box: jnp.ndarray | None
           ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        kwargs = {} if box is None or not periodic else {"box": box}

        def strained(R: jnp.ndarray, strain: jnp.ndarray) -> tuple[jnp.ndarray, None]:
            return energy_fn(R, neighbor=nbr, perturbation=symmetric_deformation(strain), **kwargs), None

        e, _, forces, virial = strain_derivatives(strained, R)
        volume = jnp.abs(jnp.linalg.det(box)) if periodic else jnp.zeros((), R.dtype)
        return e, forces, stress_from_virial(virial, volume)

    return fn



def jaxmd_system(potential: Potential, atoms: Atoms, dtype: str = "float64", skin: float = 0.5,
                 neighbor_format: str = "dense", capacity_multiplier: float = 1.25,
                 tight_multiplier: float = 1.05, compact: bool = True) -> JaxMDSystem:
    """Prepare ``atoms`` (fully periodic or fully free) for jax-md with ``potential``.

    Args:
        dtype: ``"float64"`` (switches JAX to 64-bit mode for the process) or ``"float32"``.
        skin: Verlet skin in Å: the skin list holds pairs within ``cutoff + skin`` and is rebuilt once an
            atom has moved ``skin / 2``.
        neighbor_format: ``"dense"`` (per-atom rows, the model's fast block layout) or ``"sparse"``.
        capacity_multiplier: head-room of the skin list (jax-md's argument).
        tight_multiplier: head-room of the per-evaluation tight list.
        compact: evaluate the model on the tight list (False: on the skin list; use under ``vmap``).

    Raises:
        ValueError: mixed periodicity, a cell narrower than 2 x (cutoff + skin) with the sparse format (the
            multi-image list such cells get is dense only), overlapping atoms, or an element the model does
            not know.
    """
    jdtype = resolve_dtype(dtype)
    config = potential.config
    potential.check_atoms(atoms)
    pbc = np.asarray(atoms.pbc, bool)
    if pbc.any() and not pbc.all():
        raise ValueError(f"the jax-md path needs a fully periodic or a fully free structure, got pbc={pbc.tolist()}; "
                         "use the ASE path (GeoditeCalculator) for slabs and wires")
    if bool(pbc.all()):
        rcell, rotation = atoms.cell.standard_form()
        box_np = np.asarray(rcell, np.float64).T
        box_np[np.abs(box_np) < 1e-12] = 0.0  # exactly upper triangular (jax-md checks triu(box) == box)
        frac = np.asarray(atoms.cell.scaled_positions(atoms.positions), np.float64) % 1.0
        box = jnp.asarray(box_np, jdtype)
        R0 = jnp.asarray(frac, jdtype)
        displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=True)
    else:
        rotation, box = np.eye(3), None
        R0 = jnp.asarray(atoms.positions, jdtype)
        displacement_fn, shift_fn = space.free()
    species = np.asarray(atoms.numbers, np.int32)
    neighbor_fn = _neighbor_fns(config, displacement_fn, box, len(atoms), skin, neighbor_format,
                                capacity_multiplier, tight_multiplier, compact)
    state = potential.state(jdtype)
    vacuum = potential.vacuum_energies(jdtype) if config.vacuum else None
    raw = make_geodite_energy(config, displacement_fn, species, neighbor_format, compact, box, neighbor_fn.multi_image)

    def energy_fn(R: jnp.ndarray, neighbor: GeoditeNeighborList | None = None, **kwargs: Any) -> jnp.ndarray:
        if neighbor is None:
            raise ValueError("the Geodite jax-md energy needs neighbor=<GeoditeNeighborList from system.allocate>")
        return raw(state, R, neighbor, vacuum, **kwargs)

    system = JaxMDSystem(potential=potential, energy_fn=energy_fn, raw_energy_fn=raw, displacement_fn=displacement_fn,
                         shift_fn=shift_fn, neighbor_fn=neighbor_fn, positions=R0, box=box, species=species,
                         masses=np.asarray(atoms.get_masses(), np.float64), rotation=np.asarray(rotation),
                         skin=float(skin), dtype=jdtype, state=state, vacuum=vacuum)
    _check_overlaps(system)
    return system


def _check_overlaps(system: JaxMDSystem) -> None:
    nbr = system.allocate(system.positions, system.box) if system.n_atoms > 1 else None
    if nbr is None:
        return
    receivers, senders, valid = pairs(nbr.idx, system.n_atoms, system.neighbor_fn.dense)
    kwargs = {} if system.box is None else {"box": system.box}
    vector_fn = make_vector_fn(system.displacement_fn, system.box, system.multi_image)
    shifts = None if nbr.shifts is None else nbr.shifts.reshape(-1, 3)
    d = np.linalg.norm(np.asarray(vector_fn(system.positions, receivers, senders, shifts, nbr.reference, **kwargs)),
                       axis=-1)
    d = np.where(np.asarray(valid), d, np.inf)
    if d.size and d.min() < MIN_DISTANCE:
        k = int(np.argmin(d))
        raise ValueError(f"overlapping atoms: atoms {int(receivers[k])} and {int(senders[k])} are {d[k]:.4f} Å apart, "
                         f"closer than {MIN_DISTANCE} Å")

