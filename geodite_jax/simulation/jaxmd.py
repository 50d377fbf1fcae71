"""Geodite as a jax-md energy function: periodic (triclinic, fractional coordinates) or free space.

jax-md conventions used throughout: a ``box`` is a ``[3, 3]`` matrix whose *columns* are the lattice vectors
(the transpose of ASE's ``cell``) and must be upper triangular for jax-md's cell lists, so a periodic
structure is first rotated into ASE's standard (lower-triangular cell) frame; periodic positions ``R`` are
fractional ``[n_atoms, 3]``; units are eV, Å, amu, so one time unit is ``1 / ase.units.fs`` ≈ 10.18 fs and
momenta are in ASE's units.

Neighbour lists are two-level. jax-md's ``partition.neighbor_list`` keeps every pair within
``cutoff + skin`` (rebuilt only when an atom has moved more than ``skin / 2``); at each evaluation the
energy compacts it to the pairs within ``cutoff`` (a "tight" list of static capacity) so the model pays
only for real edges. Never a silently dropped pair: if the tight capacity is exceeded the energy and
forces are NaN (and :class:`GeoditeNeighborList` records the occupancy seen at each update), and a
skin-list overflow is jax-md's own ``did_buffer_overflow``; either way the driver reallocates with a
larger capacity and redoes the block.

A cell with a perpendicular width below ``2 x (cutoff + skin)`` is beyond the minimum-image convention of
``space.periodic_general``; there the skin list is jax-md's multi-image list
(``custom_partition.neighbor_list_multi_image``, dense format), which stores every periodic image within
``cutoff + skin`` with its integer lattice shift, and the pair vectors are built from those shifts (see
:func:`_make_vector_fn`). Larger cells keep the cell-list based list.
"""

from __future__ import annotations

import dataclasses as pydc
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms, units
from jax_md import custom_partition, partition, space
from jax_md import dataclasses as jdc

from ..config import GeoditeConfig
from ..energy import PotentialState, atom_energies, strain_derivatives, stress_from_virial, symmetric_deformation
from ..graph import MIN_DISTANCE, validate_atoms
from ..model import Geodite
from ..potential import Potential
from ..precision import check_dtype_name, resolve_dtype

FORMATS = {"dense": partition.Dense, "sparse": partition.Sparse}


def check_elements(atoms: Atoms, potential: Potential) -> None:
    """``ValueError`` naming the first element the model cannot evaluate.

    The allowed set is ``potential.metadata["elements"]`` (atomic numbers the model was trained on) when the
    trainer recorded it, otherwise every Z below ``config.num_elements``.
    """
    validate_atoms(atoms, potential.config.num_elements)
    potential.check_elements(atoms.numbers)


def perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of the cell (rows = lattice vectors), ``[3]`` Å."""
    cell = np.asarray(cell, np.float64)
    volume = abs(np.linalg.det(cell))
    return np.array([volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)])


def minimum_image_repeat(cell: np.ndarray, radius: float) -> tuple[int, int, int]:
    """Smallest ``(n1, n2, n3)`` supercell whose perpendicular widths all exceed ``2 · radius``."""
    widths = perpendicular_widths(cell)
    return tuple(int(np.floor(2.0 * radius / w)) + 1 for w in widths)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- neighbour lists
@jdc.dataclass
class GeoditeNeighborList:
    """jax-md's skin list plus the bookkeeping of the per-evaluation tight list.

    ``skin``: a ``partition.NeighborList`` (pairs within cutoff + skin). ``tight_count``: the largest tight
    occupancy seen since allocation (per atom for the dense format, in total for sparse); ``capacity``: the
    tight capacity (static; enlarging it recompiles). Pass it as ``neighbor=`` to any jax-md integrator.
    """

    skin: partition.NeighborList
    tight_count: jnp.ndarray
    capacity: int = jdc.static_field()
    count_fn: Callable[..., jnp.ndarray] = jdc.static_field()

    @property
    def idx(self) -> jnp.ndarray:
        return self.skin.idx

    @property
    def shifts(self) -> jnp.ndarray | None:
        """Integer lattice shifts of the pairs (multi-image list, ``[n, M, 3]``), None for a minimum-image list."""
        return getattr(self.skin, "shifts", None)

    @property
    def reference(self) -> jnp.ndarray:
        """Positions at which the skin list was built."""
        return self.skin.reference_position

    def update(self, position: jnp.ndarray, **kwargs: Any) -> GeoditeNeighborList:
        """Update the skin list at ``position`` (``box=`` for a changed box) and record the tight occupancy."""
        skin = self.skin.update(position, **kwargs)
        extra = {} if getattr(skin, "shifts", None) is None else {"shifts": skin.shifts,
                                                                   "reference": skin.reference_position}
        count = self.count_fn(position, skin.idx, **extra, **kwargs)
        return self.set(skin=skin, tight_count=jnp.maximum(self.tight_count, count.astype(self.tight_count.dtype)))

    @property
    def did_buffer_overflow(self) -> jnp.ndarray:
        """The skin list lost pairs (or its cell list is stale): reallocate and redo the steps."""
        # (not malformed_box: jax-md 0.2.29 sets that bit for *valid* boxes, partition.py allocate path)
        over = jnp.asarray(self.skin.did_buffer_overflow)
        if hasattr(self.skin, "cell_size_too_small"):
            over = over | self.skin.cell_size_too_small
        return over != 0

    @property
    def tight_overflow(self) -> jnp.ndarray:
        """An update saw more pairs within the cutoff than ``capacity``: reallocate and redo the steps."""
        return self.tight_count > self.capacity


def _pair_vectors(displacement_fn: Callable, R: jnp.ndarray, receivers: jnp.ndarray, senders: jnp.ndarray,
                  **kwargs: Any) -> jnp.ndarray:
    """``r_sender − r_receiver`` (minimum image) for every pair, ``[E, 3]``."""
    return jax.vmap(lambda a, b: displacement_fn(a, b, **kwargs))(R[senders], R[receivers])


def _make_vector_fn(displacement_fn: Callable, box: jnp.ndarray | None, multi_image: bool
                    ) -> Callable[..., jnp.ndarray]:
    """``fn(R, receivers, senders, shifts, reference, **kwargs) -> [E, 3]``: ``r_sender − r_receiver``.

    Minimum-image lists: ``displacement_fn`` (``shifts``/``reference`` unused). Multi-image lists: the sender's
    image ``shifts`` (integer, fractional units) counted from the positions at which the list was built: each
    atom is first unwrapped to the image nearest its ``reference`` position (the integrator wraps positions into
    the cell, which would otherwise invalidate the stored shifts between rebuilds), then ``box`` maps the
    fractional difference to Cartesian with jax-md's ``space.transform`` (gradients w.r.t. fractional positions
    come out Cartesian, as for ``periodic_general``), and ``perturbation=`` applies a strain (stress, NPT).
    """
    if not multi_image:
        def minimum_image(R: jnp.ndarray, receivers: jnp.ndarray, senders: jnp.ndarray, shifts: Any, reference: Any,
                          **kwargs: Any) -> jnp.ndarray:
            return _pair_vectors(displacement_fn, R, receivers, senders, **kwargs)

        return minimum_image

    def images(R: jnp.ndarray, receivers: jnp.ndarray, senders: jnp.ndarray, shifts: jnp.ndarray,
               reference: jnp.ndarray, perturbation: jnp.ndarray | None = None, **kwargs: Any) -> jnp.ndarray:
        box_now = kwargs.get("box", box)
        unwrapped = R - jax.lax.stop_gradient(jnp.round(R - reference))
        frac = unwrapped[senders] - unwrapped[receivers] + shifts.astype(R.dtype)
        vectors = space.transform(box_now, frac)
        if perturbation is not None:
            vectors = space.raw_transform(perturbation, vectors)
        return vectors

    return images


def _pairs(idx: jnp.ndarray, n: int, dense: bool) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """``(receivers, senders, valid)`` of a jax-md index array; padding slots (index n) become self-pairs.

    Dense ``[n, M]``: row i lists the neighbours of i (edge e has receiver e // M, the block layout).
    Sparse ``[2, C]``: row 1 is the centre (non-decreasing over the valid prefix), row 0 the neighbour.
    """
    if dense:
        receivers = jnp.repeat(jnp.arange(n, dtype=idx.dtype), idx.shape[1])
        senders = idx.reshape(-1)
        valid = senders < n
        return receivers, jnp.where(valid, senders, receivers), valid
    valid = (idx[0] < n) & (idx[1] < n)
    last = jnp.asarray(n - 1, idx.dtype)  # padding sits at the end: receiver n-1 keeps the receivers sorted
    return jnp.where(valid, idx[1], last), jnp.where(valid, idx[0], last), valid


def _compact(idx: jnp.ndarray, within: jnp.ndarray, capacity: int, n: int, dense: bool,
             shifts: jnp.ndarray | None = None) -> Any:
    """Keep the pairs flagged ``within`` (order preserved) in an index array of the given capacity; with the
    ``shifts [n, M, 3]`` of a (dense) multi-image list, return ``(idx, shifts)`` compacted alike."""
    if shifts is not None:
        within = within.reshape(idx.shape)
        slot = jnp.where(within, jnp.cumsum(within, axis=1) - 1, capacity)
        rows = jnp.arange(n)[:, None]
        tight = jnp.full((n, capacity), n, idx.dtype).at[rows, slot].set(idx, mode="drop")
        tight_shifts = jnp.zeros((n, capacity, 3), shifts.dtype).at[rows, slot].set(shifts, mode="drop")
        return tight, tight_shifts
    if dense:
        within = within.reshape(idx.shape)
        slot = jnp.where(within, jnp.cumsum(within, axis=1) - 1, capacity)  # out of range: dropped
        rows = jnp.arange(n)[:, None]
        return jnp.full((n, capacity), n, idx.dtype).at[rows, slot].set(idx, mode="drop")
    slot = jnp.where(within, jnp.cumsum(within) - 1, capacity)
    return jnp.full((2, capacity), n, idx.dtype).at[:, slot].set(idx, mode="drop")


def make_geodite_energy(config: GeoditeConfig, displacement_fn: Callable, species: jnp.ndarray,
                        neighbour_format: str = "dense", compact: bool = True, box: jnp.ndarray | None = None,
                        multi_image: bool = False) -> Callable[..., jnp.ndarray]:
    """Low-level jax-md energy ``fn(state, R, neighbor, vacuum=None, **kwargs) -> E`` (eV), ``R [n_atoms, 3]``.

    ``state`` is :meth:`Potential.state` (differentiable: gradients w.r.t. parameters work);
    ``neighbor`` a :class:`GeoditeNeighborList`; ``kwargs`` (``box=``, ``perturbation=``) go to the
    displacement function, which is what makes stress and NPT work. ``vacuum=None`` recomputes the
    isolated-atom table from the parameters (use it when differentiating w.r.t. them).
    ``multi_image``: the list is a dense multi-image list (small cells) and ``box`` the default box.
    """
    if neighbour_format not in FORMATS:
        raise ValueError(f"neighbour_format must be one of {sorted(FORMATS)}, got {neighbour_format!r}")
    if multi_image and neighbour_format != "dense":
        raise ValueError("the multi-image neighbour list (cells narrower than 2 x (cutoff + skin)) is dense only")
    vector_fn = _make_vector_fn(displacement_fn, box, multi_image)
    model = Geodite(config)
    dense = neighbour_format == "dense"
    cutoff_sq = config.cutoff**2
    species = jnp.asarray(species, jnp.int32)
    n = species.shape[0]

    def model_energy(state: PotentialState, R: jnp.ndarray, idx: jnp.ndarray, shifts: jnp.ndarray | None,
                     reference: jnp.ndarray | None, vacuum: jnp.ndarray | None, **kwargs: Any) -> jnp.ndarray:
        receivers, senders, valid = _pairs(idx, n, dense)
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
        receivers, senders, valid = _pairs(idx, n, dense)
        flat = None if shifts is None else shifts.reshape(-1, 3)
        d = jax.lax.stop_gradient(vector_fn(R, receivers, senders, flat, reference, **kwargs))
        within = valid & (jnp.sum(d**2, axis=-1) < cutoff_sq)
        count = within.reshape(idx.shape).sum(1).max() if dense else within.sum()
        if multi_image:
            tight, tight_shifts = _compact(idx, within, neighbor.capacity, n, dense, shifts)
        else:
            tight, tight_shifts = _compact(idx, within, neighbor.capacity, n, dense), None
        # Over capacity, pairs would be missing: poison energy and forces with NaN (the driver redoes the
        # block with a larger capacity) rather than return a silently wrong number.
        poison = jnp.where(count > neighbor.capacity, jnp.nan, 1.0).astype(R.dtype)
        return model_energy(state, R, tight, tight_shifts, reference, vacuum, **kwargs) * poison

    return energy


def _make_count_fn(displacement_fn: Callable, cutoff: float, n: int, dense: bool, box: jnp.ndarray | None = None,
                   multi_image: bool = False) -> Callable[..., jnp.ndarray]:
    cutoff_sq = cutoff**2
    vector_fn = _make_vector_fn(displacement_fn, box, multi_image)

    def count(R: jnp.ndarray, idx: jnp.ndarray, shifts: jnp.ndarray | None = None,
              reference: jnp.ndarray | None = None, **kwargs: Any) -> jnp.ndarray:
        receivers, senders, valid = _pairs(idx, n, dense)
        flat = None if shifts is None else shifts.reshape(-1, 3)
        d = vector_fn(R, receivers, senders, flat, reference, **kwargs)
        within = valid & (jnp.sum(d**2, axis=-1) < cutoff_sq)
        return within.reshape(idx.shape).sum(1).max() if dense else within.sum()

    return count


# --------------------------------------------------------------------------------------------- the system
@pydc.dataclass(frozen=True)
class JaxMDSystem:
    """A structure prepared for jax-md with a Geodite potential bound to it.

    Attributes:
        energy_fn: ``energy_fn(R, neighbor=nbr, box=None, perturbation=None) -> E`` (eV), the function to hand
            to ``jax_md.simulate.*`` / ``jax_md.minimize.*``.
        displacement_fn, shift_fn: from ``space.periodic_general(box, fractional_coordinates=True)`` or
            ``space.free()``.
        neighbor_fn: jax-md ``NeighborListFns`` of the skin list (use :meth:`allocate`, not its ``allocate``).
        positions: initial ``R [n_atoms, 3]`` (fractional when periodic).
        box: ``[3, 3]`` upper-triangular jax-md box (columns are lattice vectors), None in free space.
        species: ``[n_atoms]`` atomic numbers; masses: ``[n_atoms]`` amu.
        rotation: ``Q [3, 3]``: Cartesian positions in this frame are ``original @ Q.T``.
    """

    potential: Potential
    energy_fn: Callable[..., jnp.ndarray]
    raw_energy_fn: Callable[..., jnp.ndarray]
    displacement_fn: Callable
    shift_fn: Callable
    neighbor_fn: Any
    positions: jnp.ndarray
    box: jnp.ndarray | None
    species: np.ndarray
    masses: np.ndarray
    rotation: np.ndarray
    pbc: bool
    cutoff: float
    skin: float
    neighbour_format: str
    compact: bool
    tight_multiplier: float
    dtype: Any
    state: dict
    vacuum: jnp.ndarray | None
    info: dict = pydc.field(default_factory=dict)
    multi_image: bool = False

    def pair_extra(self, skin: Any) -> dict[str, Any]:
        """``shifts=``/``reference=`` of a multi-image skin list for the count and vector functions."""
        return {"shifts": skin.shifts, "reference": skin.reference_position} if self.multi_image else {}

    @property
    def n_atoms(self) -> int:
        return int(self.species.shape[0])

    # -------------------------------------------------------------------------------- neighbour lists
    def allocate(self, R: jnp.ndarray, box: jnp.ndarray | None = None, capacity: int | None = None,
                 extra_capacity: int = 0) -> GeoditeNeighborList:
        """A fresh neighbour list at ``R`` (and ``box`` if it changed), tight capacity from its occupancy.

        Applies the jax-md workaround of stack_notes §1.2 #3: ``cell_size`` made a Python float, otherwise a
        second structure or box in the same process fails inside ``canonicalize_force``.
        """
        kwargs = {} if box is None else {"box": box}
        skin = self.neighbor_fn.allocate(R, extra_capacity=extra_capacity, **kwargs)
        if getattr(skin, "cell_size", None) is not None:
            skin = skin.set(cell_size=float(skin.cell_size))
        dense = self.neighbour_format == "dense"
        count_fn = _make_count_fn(self.displacement_fn, self.cutoff, self.n_atoms, dense, self.box, self.multi_image)
        count = int(count_fn(R, skin.idx, **self.pair_extra(skin), **kwargs))
        if capacity is None:
            if not self.compact:
                capacity = int(skin.idx.shape[1])
            elif dense:
                capacity = min(int(np.ceil(count * self.tight_multiplier)) + 1, int(skin.idx.shape[1]))
            else:
                capacity = min(int(np.ceil(count * self.tight_multiplier)) + 8, int(skin.idx.shape[1]))
        return GeoditeNeighborList(skin, jnp.asarray(count, jnp.int32), int(capacity), count_fn)

    def grow(self, nbr: GeoditeNeighborList, R: jnp.ndarray, box: jnp.ndarray | None = None, tight: bool = False
             ) -> GeoditeNeighborList:
        """A larger list after an overflow of ``nbr``: skin capacity from the occupancy at ``R`` (at least a
        quarter more if the skin list overflowed), tight capacity a quarter more if ``tight`` or the tight
        list overflowed."""
        new = self.allocate(R, box)
        old = int(nbr.skin.max_occupancy)
        if bool(nbr.skin.did_buffer_overflow) and int(new.skin.max_occupancy) <= old:
            extra = max(1, old // 4) if self.neighbour_format == "dense" else max(1, old // (4 * self.n_atoms) + 1)
            new = self.allocate(R, box, extra_capacity=extra)
        capacity = new.capacity
        if self.compact and (tight or bool(nbr.tight_overflow)):
            capacity = max(capacity, int(np.ceil(max(int(nbr.tight_count), nbr.capacity) * 1.25)) + 1)
        return new.set(capacity=min(capacity, int(new.skin.idx.shape[1])))

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
        """An ASE ``Atoms`` in the input's frame (positions, cell, momenta)."""
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
                 neighbour_format: str = "dense", capacity_multiplier: float = 1.25,
                 tight_multiplier: float = 1.05, compact: bool = True) -> JaxMDSystem:
    """Prepare ``atoms`` (fully periodic or fully free) for jax-md with ``potential``.

    Args:
        dtype: ``"float64"`` (switches JAX to 64-bit mode for the process) or ``"float32"``.
        skin: Verlet skin in Å: the skin list holds pairs within ``cutoff + skin`` and is rebuilt once an
            atom has moved ``skin / 2``.
        neighbour_format: ``"dense"`` (per-atom rows, the model's fast block layout) or ``"sparse"``.
        capacity_multiplier: head-room of the skin list (jax-md's argument).
        tight_multiplier: head-room of the per-evaluation tight list.
        compact: evaluate the model on the tight list (False: on the skin list; use under ``vmap``).

    Raises:
        ValueError: mixed periodicity, a cell narrower than 2 x (cutoff + skin) with the sparse format (the
            multi-image list such cells get is dense only), overlapping atoms, or an element the model does
            not know.
    """
    check_dtype_name(dtype)
    if neighbour_format not in FORMATS:
        raise ValueError(f"neighbour_format must be one of {sorted(FORMATS)}, got {neighbour_format!r}")
    if not skin >= 0:
        raise ValueError(f"skin must be a non-negative length in Å, got {skin}")
    jdtype = resolve_dtype(dtype)
    config = potential.config
    check_elements(atoms, potential)
    pbc = np.asarray(atoms.pbc, bool)
    if pbc.any() and not pbc.all():
        raise ValueError(f"the jax-md path needs a fully periodic or a fully free structure, got pbc={pbc.tolist()}; "
                         "use the ASE path (GeoditeCalculator) for slabs and wires")
    periodic = bool(pbc.all())
    radius = config.cutoff + skin
    multi_image = False
    if periodic:
        # Narrower than 2 x (cutoff + skin): beyond the minimum-image convention, so the multi-image list.
        multi_image = bool(perpendicular_widths(atoms.cell.array).min() <= 2.0 * radius)
        if multi_image and neighbour_format != "dense":
            raise ValueError(f"cells narrower than 2 x (cutoff {config.cutoff} + skin {skin}) = {2 * radius:.2f} Å use "
                             f"the multi-image neighbour list, which is dense only (got {neighbour_format!r}); use "
                             f"neighbour_format='dense' or a supercell, e.g. atoms.repeat("
                             f"{minimum_image_repeat(atoms.cell.array, radius)})")
        rcell, rotation = atoms.cell.standard_form()
        box_np = np.asarray(rcell, np.float64).T
        box_np[np.abs(box_np) < 1e-12] = 0.0  # exactly upper triangular (jax-md checks triu(box) == box)
        frac = np.asarray(atoms.cell.scaled_positions(atoms.positions), np.float64) % 1.0
        box = jnp.asarray(box_np, jdtype)
        R0 = jnp.asarray(frac, jdtype)
        displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=True)
        if multi_image:
            neighbor_fn = custom_partition.neighbor_list_multi_image(
                None, box, config.cutoff, dr_threshold=skin, capacity_multiplier=capacity_multiplier,
                fractional_coordinates=True, format=partition.Dense)
        else:
            neighbor_fn = partition.neighbor_list(displacement_fn, box, config.cutoff, dr_threshold=skin,
                                                  capacity_multiplier=capacity_multiplier,
                                                  fractional_coordinates=True, format=FORMATS[neighbour_format])
    else:
        rotation = np.eye(3)
        box = None
        R0 = jnp.asarray(atoms.positions, jdtype)
        displacement_fn, shift_fn = space.free()
        # Free space: no cell list (jax-md's needs a box); O(N^2) candidates are fine for molecules.
        neighbor_fn = partition.neighbor_list(displacement_fn, 1.0, config.cutoff, dr_threshold=skin,
                                              capacity_multiplier=capacity_multiplier, disable_cell_list=True,
                                              format=FORMATS[neighbour_format])
    species = np.asarray(atoms.numbers, np.int32)
    state = potential.state(jdtype)
    vacuum = potential.vacuum_energies(jdtype) if config.vacuum else None
    raw = make_geodite_energy(config, displacement_fn, species, neighbour_format, compact, box, multi_image)

    def energy_fn(R: jnp.ndarray, neighbor: GeoditeNeighborList | None = None, **kwargs: Any) -> jnp.ndarray:
        if neighbor is None:
            raise ValueError("the Geodite jax-md energy needs neighbor=<GeoditeNeighborList from system.allocate>")
        return raw(state, R, neighbor, vacuum, **kwargs)

    system = JaxMDSystem(potential=potential, energy_fn=energy_fn, raw_energy_fn=raw, displacement_fn=displacement_fn,
                         shift_fn=shift_fn, neighbor_fn=neighbor_fn, positions=R0, box=box, species=species,
                         masses=np.asarray(atoms.get_masses(), np.float64), rotation=np.asarray(rotation),
                         pbc=periodic, cutoff=config.cutoff, skin=float(skin), neighbour_format=neighbour_format,
                         compact=compact, tight_multiplier=float(tight_multiplier), dtype=jdtype, state=state,
                         vacuum=vacuum, multi_image=multi_image)
    _check_overlaps(system)
    return system


def _check_overlaps(system: JaxMDSystem) -> None:
    nbr = system.allocate(system.positions, system.box) if system.n_atoms > 1 else None
    if nbr is None:
        return
    receivers, senders, valid = _pairs(nbr.idx, system.n_atoms, system.neighbour_format == "dense")
    kwargs = {} if system.box is None else {"box": system.box}
    vector_fn = _make_vector_fn(system.displacement_fn, system.box, system.multi_image)
    shifts = None if nbr.shifts is None else nbr.shifts.reshape(-1, 3)
    d = np.linalg.norm(np.asarray(vector_fn(system.positions, receivers, senders, shifts, nbr.reference, **kwargs)),
                       axis=-1)
    d = np.where(np.asarray(valid), d, np.inf)
    if d.size and d.min() < MIN_DISTANCE:
        k = int(np.argmin(d))
        raise ValueError(f"overlapping atoms: atoms {int(receivers[k])} and {int(senders[k])} are {d[k]:.4f} Å apart, "
                         f"closer than {MIN_DISTANCE} Å")


def box_perpendicular_widths(box: jnp.ndarray) -> np.ndarray:
    """Perpendicular widths of a jax-md box (columns are lattice vectors), ``[3]`` Å."""
    return perpendicular_widths(np.asarray(box, np.float64).T)


def kT_from_kelvin(temperature_K: float) -> float:
    """k_B T in eV."""
    return float(temperature_K) * units.kB
