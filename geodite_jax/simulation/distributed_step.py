"""What each device runs in MD across devices (:mod:`.distributed`): its state (:class:`Local`) and the compiled
programs, a neighbour rebuild (migration, ghost plan, edge list, all ``lammps_jax.dist``), the energy of its
owned atoms through the one energy head with the ghost-row exchange as the model's ``exchange`` hook, and
velocity Verlet, each under ``shard_map`` over the device axis :data:`AXIS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P
from jax_md import space

from ..energy import atom_energies

AXIS = "domains"
#: Columns of the float rows each device owns: fractional position (unwrapped between rebuilds), momentum
#: (Cartesian, ASE units), mass (amu). The integer rows are (atomic number, global index).
POS, MOM, MASS = slice(0, 3), slice(3, 6), 6
N_COLS = 7


def _dist() -> Any:
    """lammps_jax.dist's ghost-exchange module, or an ImportError that says how to get it."""
    try:
        from lammps_jax.dist.parallel import ghost_exchange
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("MD across devices needs lammps-jax (pip install 'lammps-jax>=0.2.1', or "
                          "pip install -e '.[lammps]')") from err
    return ghost_exchange


class Local(NamedTuple):
    """What one device holds (stacked over devices, leading axis D, outside ``shard_map``)."""

    rows: jnp.ndarray  # [max_owned, 7] float: POS, MOM, MASS; live rows first
    ints: jnp.ndarray  # [max_owned, 2] int32: atomic number, global index
    n_owned: jnp.ndarray  # [] int32
    plan: tuple  # lammps_jax ExchangeStage per ppermute stage
    senders: jnp.ndarray  # [max_edges] node indices (node order of exchange_apply)
    receivers: jnp.ndarray  # [max_edges]
    edge_mask: jnp.ndarray  # [max_edges] pairs within cutoff + skin
    species: jnp.ndarray  # [nodes] atomic numbers in node order (ghosts included, 0 on padding)
    reference: jnp.ndarray  # [max_owned, 3] positions at the last rebuild
    force: jnp.ndarray  # [max_owned, 3] eV/Å
    energy: jnp.ndarray  # [] potential energy of the owned atoms (eV)
    migrated: jnp.ndarray  # [] atoms this device sent to another tile (cumulative)
    rebuilds: jnp.ndarray  # [] rebuilds (cumulative)
    overflow: jnp.ndarray  # [] bool: a capacity was exceeded (results invalid)
    misplaced: jnp.ndarray  # [] bool: an atom moved more than one tile between rebuilds


class Programs(NamedTuple):
    """The jitted ``shard_map`` programs: ``start(rows, ints, n_owned) -> Local`` (packed atoms, rebuilt once),
    ``block(local, n_steps, dt) -> Local`` (velocity-Verlet steps; ``dt = 0`` only evaluates forces),
    ``evaluate(local) -> Local`` (forces and energy at the current rows), and the subgraph capacities."""

    start: Callable[..., Any]
    block: Callable[..., Any]
    evaluate: Callable[..., Any]
    subgraph: dict[str, Any]


def build_programs(md: Any) -> Programs:
    """The compiled per-device programs of a :class:`~geodite_jax.simulation.distributed.DistributedMD` for its
    current exchange ``config`` and capacities (the subgraph's are derived here)."""
    ghost_exchange = _dist()
    config, box = md.config, jnp.asarray(md.box_np, md.dtype)
    cells, cell_capacity, max_neighbors, max_edges = ghost_exchange.subgraph_params(
        config, md.box_np, md.n_atoms, capacity_mult=md.capacities.subgraph)
    inv_box = jnp.asarray(np.linalg.inv(md.box_np), md.dtype)
    model, vacuum = md.model, md.vacuum
    grid = np.asarray(config.grid)

    def rebuild(rows: jnp.ndarray, ints: jnp.ndarray, n_owned: jnp.ndarray) -> tuple:
        """Migrate, record the ghost plan, exchange the integer columns and build the edge list."""
        coords = jnp.stack(ghost_exchange.rank_coords(config, AXIS))
        wrapped = rows[:, POS] % 1.0
        tile = jnp.clip(jnp.floor(wrapped * grid).astype(jnp.int32), 0, grid - 1)
        live = jnp.arange(rows.shape[0]) < n_owned
        leaving = jnp.sum(live & jnp.any((tile != coords) & (grid > 1), axis=1)).astype(jnp.int32)
        rows, ints, n_owned, moved = ghost_exchange.redistribute(rows, n_owned, config, AXIS, owned_ints=ints)
        pos = rows[:, POS]
        ghost_pos, n_ghost, flags, plan = ghost_exchange.ghost_exchange(pos, n_owned, config, AXIS)
        node_ints = ghost_exchange.exchange_apply(plan, ints, config, AXIS)
        ghost_ints = lax.dynamic_slice_in_dim(node_ints, n_owned, config.max_ghost, axis=0)
        _, senders, receivers, species, edge_mask, full = ghost_exchange.ghost_exchange_subgraph(
            pos, ghost_pos, ints[:, 0], ghost_ints[:, 0], ints[:, 1], ghost_ints[:, 1], n_owned, n_ghost, box,
            cells, cell_capacity, max_neighbors, max_edges, config, AXIS)
        overflow = moved[1] | moved[2] | flags[1] | full
        misplaced = moved[0] | flags[0]
        return rows, ints, n_owned, plan, senders, receivers, edge_mask, species, leaving, overflow, misplaced

    tight = md.tight_edges
    wrap = jnp.asarray([1.0 if n == 1 else 0.0 for n in config.grid], md.dtype)  # minimum image where undivided
    cutoff_sq = md.cutoff**2

    def energy(pos: jnp.ndarray, n_owned: jnp.ndarray, node_species: jnp.ndarray, plan: tuple,
               senders: jnp.ndarray, receivers: jnp.ndarray, edge_mask: jnp.ndarray
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(potential energy of this device's owned atoms, pairs within the cutoff); ``pos`` fractional, the
        gradient Cartesian (``space.transform``), the ghosts' share returned by the ppermutes' transpose."""
        n_rows = pos.shape[0]
        nodes = ghost_exchange.exchange_apply(plan, pos, config, AXIS, unwrap=True)  # owned + ghost positions
        frac = nodes[senders] - nodes[receivers]
        vectors = space.transform(box, frac - jnp.round(frac) * wrap)  # Geodite's r_sender - r_receiver
        within = edge_mask & (jnp.sum(lax.stop_gradient(vectors) ** 2, axis=-1) < cutoff_sq)
        # The edge list holds the pairs within cutoff + skin; the model gets those within the cutoff,
        # compacted in order (receivers stay sorted) into a static capacity; an overflow is reported.
        count = jnp.sum(within, dtype=jnp.int32)
        slot = jnp.where(within, jnp.cumsum(within, dtype=jnp.int32) - 1, tight)
        pick = jnp.zeros(tight, jnp.int32).at[slot].set(jnp.arange(within.shape[0], dtype=jnp.int32), mode="drop")
        valid = jnp.arange(tight) < count
        pad = nodes.shape[0] - 1  # exchange_apply's last row: the pad node, no atom's
        s, r = jnp.where(valid, senders[pick], pad), jnp.where(valid, receivers[pick], pad)

        def exchange(x: jnp.ndarray) -> jnp.ndarray:  # node rows [nodes, ...]: ghosts <- owners
            return ghost_exchange.exchange_apply(plan, x[:n_rows].reshape(n_rows, -1), config,
                                                 AXIS).reshape(x.shape)

        e, _ = atom_energies(model, md.state, vectors[pick], node_species, s, r, edge_mask=valid,
                             vacuum=vacuum, sorted_receivers=True, exchange=exchange)
        return jnp.sum(jnp.where(jnp.arange(n_rows) < n_owned, e[:n_rows], 0.0)), count

    def forces(local: Local) -> Local:
        (e, count), grad = jax.value_and_grad(energy, has_aux=True)(
            local.rows[:, POS], local.n_owned, local.species, local.plan, local.senders, local.receivers,
            local.edge_mask)
        return local._replace(force=-grad, energy=e, overflow=local.overflow | (count > tight))

    def do_rebuild(local: Local) -> Local:
        rows, ints, n_owned, plan, s, r, mask, species, leaving, overflow, misplaced = rebuild(
            local.rows, local.ints, local.n_owned)
        return local._replace(rows=rows, ints=ints, n_owned=n_owned, plan=plan, senders=s, receivers=r,
                              edge_mask=mask, species=species, reference=rows[:, POS],
                              migrated=local.migrated + leaving, rebuilds=local.rebuilds + 1,
                              overflow=local.overflow | overflow, misplaced=local.misplaced | misplaced)

    def start(rows: jnp.ndarray, ints: jnp.ndarray, n_owned: jnp.ndarray) -> Local:
        """The state after packing: rebuilt once, forces zero (a zero-length step then evaluates them)."""
        rows, ints, n_owned = rows[0], ints[0], n_owned[0]
        out = rebuild(rows, ints, n_owned)
        rows, ints, n_owned, plan, s, r, mask, species, _, overflow, misplaced = out
        zero = jnp.zeros((), jnp.int32)
        local = Local(rows, ints, n_owned, plan, s, r, mask, species, rows[:, POS],
                      jnp.zeros_like(rows[:, POS]), jnp.zeros((), rows.dtype), zero, zero, overflow, misplaced)
        return jax.tree_util.tree_map(lambda a: a[None], local)

    def step(local: Local, dt: jnp.ndarray) -> Local:
        """One velocity-Verlet step (jax_md.simulate.nve's order: p half, r full, F, p half); ``dt = 0``
        only evaluates the forces (how :meth:`init` gets them without compiling the model twice)."""
        live = (jnp.arange(local.rows.shape[0]) < local.n_owned)[:, None]
        mass = jnp.where(local.rows[:, MASS] > 0, local.rows[:, MASS], 1.0)[:, None]
        p = local.rows[:, MOM] + (dt / 2) * local.force
        pos = local.rows[:, POS] + space.transform(inv_box, dt * p / mass)
        rows = local.rows.at[:, MOM].set(jnp.where(live, p, 0.0)).at[:, POS].set(pos)
        local = local._replace(rows=rows)
        stale = ghost_exchange.needs_rebuild(pos, local.reference, local.n_owned, box, config, AXIS)
        local = lax.cond(stale, do_rebuild, lambda x: x, local)
        local = forces(local)
        live = (jnp.arange(local.rows.shape[0]) < local.n_owned)[:, None]
        p = local.rows[:, MOM] + (dt / 2) * local.force
        return local._replace(rows=local.rows.at[:, MOM].set(jnp.where(live, p, 0.0)))

    def block(local: Local, n_steps: jnp.ndarray, dt: jnp.ndarray) -> Local:
        local = jax.tree_util.tree_map(lambda a: a[0], local)
        local = lax.fori_loop(0, n_steps, lambda _, x: step(x, dt.astype(x.rows.dtype)), local)
        return jax.tree_util.tree_map(lambda a: a[None], local)

    spec = P(AXIS)
    start_fn = jax.jit(jax.shard_map(start, mesh=md.mesh, in_specs=(spec, spec, spec), out_specs=spec,
                                     check_vma=False))
    block_fn = jax.jit(jax.shard_map(block, mesh=md.mesh, in_specs=(spec, P(), P()), out_specs=spec,
                                     check_vma=False))

    def evaluate(local: Local) -> Local:
        return jax.tree_util.tree_map(lambda a: a[None], forces(jax.tree_util.tree_map(lambda a: a[0], local)))

    evaluate_fn = jax.jit(jax.shard_map(evaluate, mesh=md.mesh, in_specs=(spec,), out_specs=spec,
                                        check_vma=False))
    subgraph = {"cells_per_side": np.asarray(cells).tolist(), "cell_capacity": int(cell_capacity),
                "max_neighbors": int(max_neighbors), "max_edges": int(max_edges)}
    return Programs(start_fn, block_fn, evaluate_fn, subgraph)
