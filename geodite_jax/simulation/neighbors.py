"""Two-level neighbour lists for Geodite in jax-md: jax-md's skin list, compacted at each evaluation to a tight
list of the pairs within the cutoff (static capacity), and the one loop that reallocates and redoes a block
when either overflows.

A cell with a perpendicular width below ``2 x (cutoff + skin)`` is beyond the minimum-image convention of
``space.periodic_general``; there the skin list is jax-md's multi-image list
(``custom_partition.neighbor_list_multi_image``, dense format), which stores every periodic image within
``cutoff + skin`` with its integer lattice shift, and the pair vectors are built from those shifts (see
:func:`make_vector_fn`). Larger cells keep the cell-list based list. Free space (``box=None``) uses the O(N²)
candidate list (no cell list).

Index layouts (jax-md's): dense ``idx [n_atoms, M]`` (row i: the neighbours of i, padding index n_atoms) is the
model's block layout; sparse ``idx [2, C]`` (row 1 the centre, row 0 the neighbour).
"""

from __future__ import annotations

import dataclasses as pydc
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import custom_partition, partition, space
from jax_md import dataclasses as jdc

#: jax-md index formats by name.
NEIGHBOR_FORMATS = {"dense": partition.Dense, "sparse": partition.Sparse}
#: Reallocate-and-redo attempts of one block before giving up.
MAX_REDO = 8


def perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of the cell (rows = lattice vectors), ``[3]`` Å."""
    cell = np.asarray(cell, np.float64)
    volume = abs(np.linalg.det(cell))
    return np.array([volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)])


def minimum_image_repeat(cell: np.ndarray, radius: float) -> tuple[int, int, int]:
    """Smallest ``(n1, n2, n3)`` supercell of ``cell [3, 3]`` (rows = lattice vectors) whose perpendicular widths
    all exceed ``2 · radius``."""
    widths = perpendicular_widths(cell)
    return tuple(int(np.floor(2.0 * radius / w)) + 1 for w in widths)  # type: ignore[return-value]



def box_perpendicular_widths(box: jnp.ndarray) -> np.ndarray:
    """Perpendicular widths of a jax-md box (columns are lattice vectors), ``[3]`` Å."""
    return perpendicular_widths(np.asarray(box, np.float64).T)




# ----------------------------------------------------------------------------------------- neighbour lists
@jdc.dataclass
class GeoditeNeighborList:
    """jax-md's skin list plus the bookkeeping of the per-evaluation tight list.

    ``skin``: a ``partition.NeighborList`` (pairs within cutoff + skin). ``tight_count``: the largest tight
    occupancy seen since allocation (per atom for the dense format, in total for sparse); ``capacity``: the
    tight capacity (static; enlarging it recompiles). Pass it as ``neighbor=`` to any jax-md integrator.
    ``count_fn(R, idx, **kw) -> []`` counts the tight occupancy of an index array.
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
        """Update the skin list at ``position [n_atoms, 3]`` (``box=`` for a changed box) and record the tight
        occupancy."""
        skin = self.skin.update(position, **kwargs)
        extra = {} if getattr(skin, "shifts", None) is None else {"shifts": skin.shifts,
                                                                   "reference": skin.reference_position}
        count = self.count_fn(position, skin.idx, **extra, **kwargs)
        return self.set(skin=skin, tight_count=jnp.maximum(self.tight_count, count.astype(self.tight_count.dtype)))

    @property
    def skin_overflow(self) -> jnp.ndarray:
        """The skin list lost pairs (or its cell list is stale)."""
        # (not malformed_box: jax-md 0.2.29 sets that bit for *valid* boxes, partition.py allocate path)
        over = jnp.asarray(self.skin.did_buffer_overflow)
        if hasattr(self.skin, "cell_size_too_small"):
            over = over | self.skin.cell_size_too_small
        return over != 0

    @property
    def did_buffer_overflow(self) -> jnp.ndarray:
        """jax-md's flag: the skin list or the tight list overflowed; reallocate and redo the steps (the
        energy of an overflowing tight list is NaN, never a number missing pairs)."""
        return self.skin_overflow | self.tight_overflow

    @property
    def tight_overflow(self) -> jnp.ndarray:
        """An update saw more pairs within the cutoff than ``capacity``: reallocate and redo the steps."""
        return self.tight_count > self.capacity



def pair_vectors(displacement_fn: Callable, R: jnp.ndarray, receivers: jnp.ndarray, senders: jnp.ndarray,
                  **kwargs: Any) -> jnp.ndarray:
    """``r_sender − r_receiver`` (minimum image) for every pair, ``[E, 3]``."""
    return jax.vmap(lambda a, b: displacement_fn(a, b, **kwargs))(R[senders], R[receivers])


def make_vector_fn(displacement_fn: Callable, box: jnp.ndarray | None, multi_image: bool
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
            return pair_vectors(displacement_fn, R, receivers, senders, **kwargs)

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


def pairs(idx: jnp.ndarray, n: int, dense: bool) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
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


def compact_pairs(idx: jnp.ndarray, within: jnp.ndarray, capacity: int, n: int, dense: bool,
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



def make_count_fn(displacement_fn: Callable, cutoff: float, n: int, dense: bool, box: jnp.ndarray | None = None,
                   multi_image: bool = False) -> Callable[..., jnp.ndarray]:
    """``count(R, idx, shifts=None, reference=None, **kw) -> []``: the tight occupancy of a skin list's index
    array, per atom (largest row) for the dense format, in total for sparse."""
    cutoff_sq = cutoff**2
    vector_fn = make_vector_fn(displacement_fn, box, multi_image)

    def count(R: jnp.ndarray, idx: jnp.ndarray, shifts: jnp.ndarray | None = None,
              reference: jnp.ndarray | None = None, **kwargs: Any) -> jnp.ndarray:
        receivers, senders, valid = pairs(idx, n, dense)
        flat = None if shifts is None else shifts.reshape(-1, 3)
        d = vector_fn(R, receivers, senders, flat, reference, **kwargs)
        within = valid & (jnp.sum(d**2, axis=-1) < cutoff_sq)
        return within.reshape(idx.shape).sum(1).max() if dense else within.sum()

    return count



# ------------------------------------------------------------------------------------ neighbour functions
@pydc.dataclass(frozen=True)
class GeoditeNeighborFns:
    """jax-md's ``NeighborListFns`` for Geodite: ``allocate`` and ``update`` give :class:`GeoditeNeighborList`.

    Unpacks like jax-md's (``allocate, update = neighbor_fn``). ``grow`` and ``refit`` serve the drivers'
    reallocate-and-redo loop (:func:`run_with_regrowth`). The skin list's own functions (``skin_fns``) are an
    implementation detail: they do not track the tight occupancy.
    """

    skin_fns: Any
    count_fn: Callable[..., jnp.ndarray]
    n_atoms: int
    dense: bool
    compact: bool
    tight_multiplier: float
    multi_image: bool

    def __iter__(self) -> Iterator[Callable[..., GeoditeNeighborList]]:
        return iter((self.allocate, self.update))

    def pair_extra(self, skin: Any) -> dict[str, Any]:
        """``shifts=``/``reference=`` of a multi-image skin list for the count and vector functions."""
        return {"shifts": skin.shifts, "reference": skin.reference_position} if self.multi_image else {}

    def allocate(self, R: jnp.ndarray, box: jnp.ndarray | None = None, capacity: int | None = None,
                 extra_capacity: int = 0) -> GeoditeNeighborList:
        """A fresh neighbour list at ``R [n_atoms, 3]`` (and ``box [3, 3]`` if it changed), tight capacity from its
        occupancy.

        Applies the jax-md workaround of stack_notes §1.2 #3: ``cell_size`` made a Python float, otherwise a
        second structure or box in the same process fails inside ``canonicalize_force``.
        """
        kwargs = {} if box is None else {"box": box}
        skin = self.skin_fns.allocate(R, extra_capacity=extra_capacity, **kwargs)
        if getattr(skin, "cell_size", None) is not None:
            skin = skin.set(cell_size=float(skin.cell_size))
        dense = self.dense
        count = int(self.count_fn(R, skin.idx, **self.pair_extra(skin), **kwargs))
        if capacity is None:
            if not self.compact:
                capacity = int(skin.idx.shape[1])
            elif dense:
                capacity = min(int(np.ceil(count * self.tight_multiplier)) + 1, int(skin.idx.shape[1]))
            else:
                capacity = min(int(np.ceil(count * self.tight_multiplier)) + 8, int(skin.idx.shape[1]))
        return GeoditeNeighborList(skin, jnp.asarray(count, jnp.int32), int(capacity), self.count_fn)

    def grow(self, nbr: GeoditeNeighborList, R: jnp.ndarray, box: jnp.ndarray | None = None, tight: bool = False
             ) -> GeoditeNeighborList:
        """A larger list after an overflow of ``nbr``: skin capacity from the occupancy at ``R [n_atoms, 3]``
        (at least a quarter more if the skin list overflowed), tight capacity a quarter more if ``tight`` or
        the tight list overflowed."""
        new = self.allocate(R, box)
        old = int(nbr.skin.max_occupancy)
        if bool(nbr.skin_overflow) and int(new.skin.max_occupancy) <= old:
            extra = max(1, old // 4) if self.dense else max(1, old // (4 * self.n_atoms) + 1)
            new = self.allocate(R, box, extra_capacity=extra)
        capacity = new.capacity
        if self.compact and (tight or bool(nbr.tight_overflow)):
            capacity = max(capacity, int(np.ceil(max(int(nbr.tight_count), nbr.capacity) * 1.25)) + 1)
        return new.set(capacity=min(capacity, int(new.skin.idx.shape[1])))


    def update(self, R: jnp.ndarray, neighbor: GeoditeNeighborList, **kwargs: Any) -> GeoditeNeighborList:
        """jax-md's ``update``: the list at ``R [n_atoms, 3]`` (``box=`` for a changed box), tight occupancy
        recorded."""
        return neighbor.update(R, **kwargs)

    def refit(self, like: GeoditeNeighborList, R: jnp.ndarray, **kwargs: Any) -> GeoditeNeighborList:
        """A list with the capacities of ``like``, rebuilt at ``R [n_atoms, 3]`` (``box=``): the start of a redone
        block."""
        return like.set(skin=self.skin_fns.update(R, like.skin, **kwargs))


def make_skin_list(displacement_fn: Callable, box: jnp.ndarray | None, cutoff: float, skin: float,
                   capacity_multiplier: float, neighbor_format: str, multi_image: bool) -> Any:
    """jax-md's skin-list functions (pairs within ``cutoff + skin``) for a periodic ``box [3, 3]`` in fractional
    coordinates (cell list, or the multi-image list) or for free space (``box=None``)."""
    fmt = NEIGHBOR_FORMATS[neighbor_format]
    if box is None:
        # Free space: no cell list (jax-md's needs a box); O(N^2) candidates are fine for molecules.
        return partition.neighbor_list(displacement_fn, 1.0, cutoff, dr_threshold=skin,
                                       capacity_multiplier=capacity_multiplier, disable_cell_list=True, format=fmt)
    if multi_image:
        return custom_partition.neighbor_list_multi_image(
            None, box, cutoff, dr_threshold=skin, capacity_multiplier=capacity_multiplier,
            fractional_coordinates=True, format=partition.Dense)
    return partition.neighbor_list(displacement_fn, box, cutoff, dr_threshold=skin,
                                   capacity_multiplier=capacity_multiplier, fractional_coordinates=True, format=fmt)


# ------------------------------------------------------------------------------------ reallocate and redo
def overflowed(neighbor: GeoditeNeighborList) -> bool:
    """Any list of ``neighbor`` (one, or a batch of replicas) overflowed its skin or tight capacity."""
    return bool(np.asarray(neighbor.did_buffer_overflow).any())


def run_with_regrowth(block: Callable[[GeoditeNeighborList], tuple[Any, GeoditeNeighborList]],
                      neighbor: GeoditeNeighborList,
                      regrow: Callable[[Any, GeoditeNeighborList, bool], GeoditeNeighborList | None],
                      what: str) -> tuple[Any, GeoditeNeighborList]:
    """Advance one block, ``block(neighbor) -> (state, neighbor_after)``; if a list overflowed or a position
    is not finite, ``regrow(state, neighbor_after, finite)`` gives larger lists for the block's start (None:
    nothing left to grow) and the block is redone from its start, so no result ever depends on a dropped pair.

    Raises:
        RuntimeError: naming ``what`` when :data:`MAX_REDO` attempts did not finish the block.
    """
    for _ in range(MAX_REDO):
        state, after = block(neighbor)
        finite = bool(np.all(np.isfinite(np.asarray(state.position))))
        if finite and not overflowed(after):
            return state, after
        neighbor = regrow(state, after, finite)
        if neighbor is None:
            break
    raise RuntimeError(f"{what} did not finish: the neighbour list kept overflowing or the state became non-finite "
                       "(time step too large or an unstable structure?)")
