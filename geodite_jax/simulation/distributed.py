"""One MD run spread over several JAX devices with lammps-jax's grid spatial decomposition.

The decomposition is ``lammps_jax.dist`` (``lammps_jax.dist.parallel.ghost_exchange``: ``pack_tiles``,
``redistribute``, ``ghost_exchange``, ``exchange_apply``, ``ghost_exchange_subgraph``, ``needs_rebuild``): the
periodic cell is cut into a ``(px, py, pz)`` grid of tiles in fractional space, one per device; each device
owns the atoms in its tile and receives, by ``lax.ppermute`` rings, a one-cutoff (+ skin) shell of ghost atoms
from its neighbours. What this module adds is only the Geodite side:

* the energy is the project's one head, :func:`geodite_jax.energy.atom_energies`, on each device's subgraph
  (edges into owned atoms, from owned and ghost atoms). ``lammps_jax``'s recorded exchange plan, replayed on
  node features (``exchange_apply``), is the model's ``exchange`` hook, so the ghost rows carry their owners'
  features after node init, before every later layer and before every edge update: with a one-cutoff shell
  the owned atoms' energies equal those of the whole system. The model gets the pairs within the cutoff,
  compacted each step from the edge list (which holds those within cutoff + skin). Energies are summed on
  owned atoms only; the forces on ghosts return to their owners through the transpose of the ppermutes
  (autodiff), as in lammps-jax's own ``feature_exchange.ghost_energy``.
* velocity Verlet (the update of ``jax_md.simulate.nve``) on the owned rows, whose momenta and masses travel
  with their positions when ``redistribute`` migrates atoms to the device whose tile now holds them. The ghost
  plan and the edge list are rebuilt (migration, ghost exchange, cell-list subgraph) once an atom has moved
  half the skin (``needs_rebuild``), as jax-md rebuilds its Verlet list; in between the plan is replayed.

Every capacity is static (XLA shapes). An overflow anywhere (owned rows, ghosts, sends, cell list, edges) is
detected on the device; the driver then enlarges the capacities and redoes the block from its start, so no
atom or pair is ever silently dropped. An atom that moved more than one tile in a step is an error.
"""

from __future__ import annotations

import dataclasses as pydc
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms, units
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..graph import MIN_DISTANCE, validate_atoms
from ..model import Geodite
from ..potential import Potential
from ..precision import check_dtype_name, resolve_dtype
from .distributed_step import AXIS, MASS, MOM, N_COLS, POS, Local, _dist, build_programs
from .neighbors import minimum_image_repeat, perpendicular_widths

MAX_REGROW = 6


@pydc.dataclass(frozen=True)
class Capacities:
    """Safety factors on lammps-jax's mean-density estimates: ``exchange`` for owned, ghost and send rows
    (``create_config``), ``subgraph`` for the cell list and edges (``subgraph_params``)."""

    exchange: float = 1.5
    subgraph: float = 1.5

    def grown(self) -> Capacities:
        return Capacities(self.exchange * 1.4, self.subgraph * 1.4)


@pydc.dataclass
class DistributedState:
    """A run's state on the devices and its step count."""

    local: Local
    step: int = 0


def _check_devices(devices: int) -> None:
    present = jax.device_count()
    if not isinstance(devices, (int, np.integer)) or devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices!r}")
    if devices > present:
        hint = ""
        if jax.default_backend() == "cpu":
            hint = (f" (on a CPU, start the process with XLA_FLAGS=--xla_force_host_platform_device_count={devices}"
                    " to split it into host devices)")
        raise ValueError(f"--devices {devices} is more than the {present} JAX device(s) present{hint}")


class DistributedMD:
    """NVE molecular dynamics of one periodic structure over ``devices`` JAX devices.

    >>> md = DistributedMD(potential, atoms, devices=4, dtype="float32", timestep_fs=1.0)
    >>> state = md.init(temperature_K=300, seed=0)
    >>> state = md.advance(state, 100)
    >>> atoms_out = md.to_atoms(state)

    Positions are handled in fractional coordinates of the input cell (no rotation: ``lammps_jax`` takes any
    triclinic box); momenta, forces and energies are in ASE's units and the input's Cartesian frame.

    Raises:
        ValueError (before any compilation): more devices than present, a structure that is not fully
        periodic, an element the model lacks, overlapping atoms, or a cell too small for the grid (its
        width must exceed 2 x (cutoff + skin) along every axis: lammps-jax's minimum-image condition).
    """

    def __init__(self, potential: Potential, atoms: Atoms, devices: int, dtype: str = "float64",
                 timestep_fs: float = 1.0, skin: float = 0.5, grid: tuple[int, int, int] | None = None,
                 capacities: Capacities | None = None) -> None:
        _check_devices(devices)
        check_dtype_name(dtype)
        if not (np.isfinite(timestep_fs) and 0 < timestep_fs <= 20):
            raise ValueError(f"timestep_fs must be in (0, 20] fs, got {timestep_fs}")
        if not (np.isfinite(skin) and skin > 0):
            raise ValueError(f"skin must be a positive length in Å, got {skin}")
        if not np.all(atoms.pbc):
            raise ValueError(f"MD across devices needs a fully periodic structure, got pbc={atoms.pbc.tolist()}")
        if grid is not None and (len(grid) != 3 or int(np.prod(grid)) != devices or min(grid) < 1):
            raise ValueError(f"grid must be three positive integers whose product is devices={devices}, got {grid}")
        validate_atoms(atoms, potential.config.num_elements)
        potential.check_elements(atoms.numbers)
        ghost_exchange = _dist()
        self.potential, self.devices, self.skin = potential, int(devices), float(skin)
        self.dtype = resolve_dtype(dtype)
        self.cutoff = float(potential.config.cutoff)
        self.n_atoms = len(atoms)
        self.numbers = np.asarray(atoms.numbers, np.int32)
        self.masses = np.asarray(atoms.get_masses(), np.float64)
        self.cell = np.asarray(atoms.cell.array, np.float64)
        self.box_np = self.cell.T.copy()  # columns are lattice vectors (jax-md / lammps-jax convention)
        # jax_md.simulate.velocity_verlet rounds the step to float32 (``f32(dt)``) whatever the positions' dtype;
        # the same rounding here keeps a run step for step equal to the single-device jax-md one.
        self.dt = float(np.float32(float(timestep_fs) * units.fs))
        self.timestep_fs = float(timestep_fs)
        self.frac0 = np.asarray(atoms.get_scaled_positions(wrap=True), np.float64)
        self.capacities = capacities or Capacities()
        try:
            self.config = ghost_exchange.create_config(self.devices, self.n_atoms, self.box_np, self.cutoff,
                                                       capacity_mult=self.capacities.exchange, grid=grid,
                                                       skin=self.skin)
        except ValueError as err:
            widths = perpendicular_widths(self.cell)
            repeat = minimum_image_repeat(self.cell, self.cutoff + self.skin)
            raise ValueError(
                f"cell too small for MD across {devices} devices: its widths {np.round(widths, 2).tolist()} Å must "
                f"all exceed 2 x (cutoff {self.cutoff} + skin {self.skin}) = {2 * (self.cutoff + self.skin):.2f} Å "
                f"(lammps-jax: {err}); use a supercell, e.g. atoms.repeat({repeat})") from None
        d, receivers = _pairs(self.cell, self.frac0, self.cutoff)
        if d < MIN_DISTANCE:
            raise ValueError(f"overlapping atoms: two atoms are {d:.4f} Å apart, closer than {MIN_DISTANCE} Å")
        # Pairs within the cutoff, per device at the start: the capacity of the compacted edge list (the edge
        # list itself holds the pairs within cutoff + skin); it grows with the others on an overflow.
        rank_of = ghost_exchange.pack_tiles(self.frac0.astype(self.dtype), self.config)[3]
        per_rank = np.bincount(rank_of[receivers], minlength=self.devices) if receivers.size else np.zeros(1)
        self.tight_edges = int(np.ceil(per_rank.max() * self.capacities.subgraph)) + 16
        self.model = Geodite(potential.config)
        self.state = potential.state(self.dtype)
        self.vacuum = potential.vacuum_energies(self.dtype) if potential.config.vacuum else None
        self.mesh = Mesh(np.asarray(jax.devices()[:self.devices]), (AXIS,))
        self.sharding = NamedSharding(self.mesh, P(AXIS))
        self._build()

    # ------------------------------------------------------------------------------------------ set-up
    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(self.config.grid)

    def _build(self) -> None:
        """Compile the per-device programs for the current exchange config and capacities."""
        programs = build_programs(self)
        self._start, self._block, self.subgraph = programs.start, programs.block, programs.subgraph
        #: ``local -> local`` with ``force`` and ``energy`` evaluated at the current rows (no step, no rebuild).
        self.evaluate = programs.evaluate

    # ------------------------------------------------------------------------------------------ packing
    def _pack(self, frac: np.ndarray, momenta: np.ndarray) -> Local:
        """Global arrays (fractional positions, Cartesian momenta, input order) -> the started device state."""
        ghost_exchange = _dist()
        ids = np.arange(self.n_atoms)
        frac = np.asarray(frac, np.float64) % 1.0
        frac = np.where(frac >= 1.0, 0.0, frac)
        owned, ints, counts, _ = ghost_exchange.pack_tiles(frac.astype(self.dtype), self.config,
                                                           ints=np.stack([self.numbers, ids], 1))
        rows = np.zeros((self.devices, self.config.max_owned, N_COLS), np.float64)
        rows[:, :, POS] = owned
        for d in range(self.devices):
            idx = ints[d, :counts[d], 1]
            rows[d, :counts[d], MOM] = momenta[idx]
            rows[d, :counts[d], MASS] = self.masses[idx]
        put = lambda a: jax.device_put(jnp.asarray(a), self.sharding)  # noqa: E731
        local = self._start(put(rows.astype(self.dtype)), put(ints.astype(np.int32)), put(counts.astype(np.int32)))
        return self._run(local, 1, 0.0)  # one zero-length step: the forces

    def _run(self, local: Local, n_steps: int, dt: float) -> Local:
        return self._block(local, jnp.asarray(n_steps, jnp.int32), jnp.asarray(dt, self.dtype))

    def gather(self, state: DistributedState) -> dict[str, np.ndarray]:
        """Global arrays in the input's atom order: ``frac`` (wrapped into [0, 1)), ``momenta``, ``forces``,
        and ``rank`` (the device owning each atom)."""
        local = state.local
        rows, ints, counts = np.asarray(local.rows), np.asarray(local.ints), np.asarray(local.n_owned)
        force = np.asarray(local.force)
        out = {k: np.full((self.n_atoms, 3), np.nan) for k in ("frac", "momenta", "forces")}
        rank = np.full(self.n_atoms, -1)
        for d in range(self.devices):
            idx = ints[d, :counts[d], 1]
            out["frac"][idx] = rows[d, :counts[d], POS] % 1.0
            out["momenta"][idx] = rows[d, :counts[d], MOM]
            out["forces"][idx] = force[d, :counts[d]]
            rank[idx] = d
        if int(counts.sum()) != self.n_atoms or np.any(rank < 0):
            raise RuntimeError(f"the devices own {int(counts.sum())} atoms, not {self.n_atoms}: atoms were lost")
        out["rank"] = rank
        return out

    # ------------------------------------------------------------------------------------------ driving
    def initial_momenta(self, temperature_K: float, seed: int = 0) -> np.ndarray:
        """Maxwell-Boltzmann momenta at ``temperature_K`` with zero total momentum (ASE units, input frame)."""
        return self.initial_momenta_for(self.masses, temperature_K, seed)

    @staticmethod
    def initial_momenta_for(atoms_or_masses: Atoms | np.ndarray, temperature_K: float, seed: int = 0) -> np.ndarray:
        """:meth:`initial_momenta` of a structure (or of its masses) without building a run."""
        masses = atoms_or_masses.get_masses() if isinstance(atoms_or_masses, Atoms) else atoms_or_masses
        masses = np.asarray(masses, np.float64)
        rng = np.random.default_rng(seed)
        p = np.sqrt(masses * units.kB * temperature_K)[:, None] * rng.standard_normal((len(masses), 3))
        return p - p.mean(0) if len(masses) > 1 else p

    def init(self, momenta: np.ndarray | None = None, temperature_K: float = 300.0, seed: int = 0
             ) -> DistributedState:
        """The state at the input positions with ``momenta [n, 3]`` (ASE units, input frame) or, if None,
        :meth:`initial_momenta`; forces evaluated."""
        if momenta is None:
            momenta = self.initial_momenta(temperature_K, seed)
        momenta = np.asarray(momenta, np.float64)
        if momenta.shape != (self.n_atoms, 3):
            raise ValueError(f"momenta must have shape ({self.n_atoms}, 3), got {momenta.shape}")
        for _ in range(MAX_REGROW):
            local = self._pack(self.frac0, momenta)
            if not bool(np.any(np.asarray(local.overflow))):
                break
            self._grow()
        else:
            raise RuntimeError("lammps-jax capacities kept overflowing at the start")
        self._check(local, 0)
        return DistributedState(local, 0)

    def _grow(self) -> None:
        """Larger capacities (a new exchange config and subgraph; recompiles)."""
        ghost_exchange = _dist()
        self.capacities = self.capacities.grown()
        self.tight_edges = int(np.ceil(self.tight_edges * 1.4))
        self.config = ghost_exchange.create_config(self.devices, self.n_atoms, self.box_np, self.cutoff,
                                                   capacity_mult=self.capacities.exchange, grid=self.grid,
                                                   skin=self.skin)
        self._build()

    def _check(self, local: Local, step: int) -> None:
        if bool(np.any(np.asarray(local.misplaced))):
            raise RuntimeError(f"MD block ending at step {step}: an atom moved more than one tile between neighbour "
                               "rebuilds (time step too large or an exploding structure?)")
        if not bool(np.all(np.isfinite(np.asarray(local.rows)))):
            raise RuntimeError(f"MD block ending at step {step}: the state became non-finite")

    def advance(self, state: DistributedState, n_steps: int) -> DistributedState:
        """``n_steps`` velocity-Verlet steps in one compiled block; on a capacity overflow the capacities grow
        and the block is redone from its start."""
        local = state.local
        for _ in range(MAX_REGROW):
            out = self._run(local, n_steps, self.dt)
            if not bool(np.any(np.asarray(out.overflow))):
                self._check(out, state.step + n_steps)
                return DistributedState(out, state.step + n_steps)
            start = self.gather(state)
            self._grow()
            local = self._pack(start["frac"], start["momenta"])
            local = local._replace(migrated=jnp.asarray(state.local.migrated),
                                   rebuilds=jnp.asarray(state.local.rebuilds))
        raise RuntimeError(f"MD block at step {state.step}: lammps-jax capacities kept overflowing")

    def observe(self, state: DistributedState) -> dict[str, float]:
        """Energies (eV), temperature (K), migrations and rebuilds so far."""
        g = self.gather(state)
        kinetic = float(0.5 * np.sum(g["momenta"] ** 2 / self.masses[:, None]))
        potential = float(np.sum(np.asarray(state.local.energy)))
        return {"step": state.step, "time_fs": state.step * self.timestep_fs,
                "temperature_K": 2.0 * kinetic / (3 * self.n_atoms * units.kB), "pressure_GPa": float("nan"),
                "potential_eV": potential, "kinetic_eV": kinetic, "total_eV": potential + kinetic,
                "volume_A3": float(abs(np.linalg.det(self.cell))),
                "migrated": int(np.sum(np.asarray(state.local.migrated))),
                "rebuilds": int(np.asarray(state.local.rebuilds)[0])}

    def to_atoms(self, state: DistributedState) -> Atoms:
        """An ASE ``Atoms`` (input frame) with the current positions (wrapped), momenta and forces."""
        from .io import frame

        g = self.gather(state)
        atoms = Atoms(numbers=self.numbers, scaled_positions=g["frac"], cell=self.cell, pbc=True)
        atoms.set_masses(self.masses)
        atoms.set_momenta(g["momenta"])
        return frame(atoms, float(np.sum(np.asarray(state.local.energy))), g["forces"])


def _pairs(cell: np.ndarray, frac: np.ndarray, cutoff: float) -> tuple[float, np.ndarray]:
    """(smallest interatomic distance in Å, receiver index of every pair within ``cutoff``)."""
    from ase.neighborlist import neighbor_list

    atoms = Atoms(numbers=np.ones(len(frac), int), scaled_positions=frac, cell=cell, pbc=True)
    i, d = neighbor_list("id", atoms, cutoff)
    return (float(d.min()) if d.size else float("inf")), i


def run_distributed_nve(potential: Potential, atoms: Atoms, steps: int, dt_fs: float = 1.0, devices: int = 2,
                        dtype: str = "float64", momenta: np.ndarray | None = None, temperature_K: float = 300.0,
                        seed: int = 0, skin: float = 0.5, block: int | None = None,
                        callback: Callable[[dict[str, float]], None] | None = None) -> tuple[Atoms, dict[str, Any]]:
    """NVE MD of ``atoms`` over ``devices`` JAX devices; returns the final structure and a summary.

    ``momenta`` (ASE units, input frame) or a Maxwell-Boltzmann draw at ``temperature_K``; ``block`` steps per
    compiled block (default: all), ``callback(record)`` after each block. The summary holds the last
    :meth:`DistributedMD.observe` record plus the grid, the wall time and the capacities used.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    md = DistributedMD(potential, atoms, devices, dtype=dtype, timestep_fs=dt_fs, skin=skin)
    state = md.init(momenta, temperature_K, seed)
    t0 = time.perf_counter()
    block = steps if not block else int(block)
    done = 0
    while done < steps:
        n = min(block, steps - done)
        state = md.advance(state, n)
        done += n
        if callback is not None:
            callback(md.observe(state))
    record = md.observe(state)
    record.update(grid=md.grid, wall_s=time.perf_counter() - t0, capacities=pydc.asdict(md.capacities),
                  devices=md.devices)
    return md.to_atoms(state), record


def run_md_cli(args: Any, load: Callable[[Any], tuple[Potential, Atoms]]) -> int:
    """``geodite md --devices N``: NVE over N devices, with ``geodite md``'s trajectory, log and report.

    The device count, the ensemble and the options this path lacks are checked before the model is loaded;
    ``load(args)`` gives (potential, atoms) as the single-device path does.
    """
    _check_devices(args.devices)
    if args.ensemble != "nve":
        raise ValueError(f"--devices runs NVE only (velocity Verlet over lammps-jax's spatial decomposition); "
                         f"got --ensemble {args.ensemble}: add --ensemble nve, or drop --devices")
    for flag, value in (("--pressure", args.pressure), ("--checkpoint", args.checkpoint)):
        if value is not None:
            raise ValueError(f"{flag} is not available with --devices")
    if args.resume:
        raise ValueError("--resume is not available with --devices")
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    if args.traj_every < 1:
        raise ValueError(f"--traj-every must be >= 1, got {args.traj_every}")
    from .io import CSVLog, TrajectoryWriter

    potential, atoms = load(args)
    md = DistributedMD(potential, atoms, args.devices, dtype=args.dtype, timestep_fs=args.timestep_fs,
                       skin=args.skin)
    print(f"NVE MD of {len(atoms)} atoms ({atoms.get_chemical_formula()}) over {md.devices} devices "
          f"(lammps-jax grid {'x'.join(map(str, md.grid))}), {args.steps} steps of {args.timestep_fs} fs from "
          f"{args.temperature} K, {md.dtype.__name__}, skin {md.skin} Å")
    state = md.init(temperature_K=args.temperature, seed=args.seed)
    traj = TrajectoryWriter(args.output)
    log = CSVLog(args.log) if args.log else None
    try:
        while True:
            rec = md.observe(state)
            atoms_now = md.to_atoms(state)
            atoms_now.info.update(step=rec["step"], time_fs=rec["time_fs"], temperature_K=rec["temperature_K"])
            traj.write(atoms_now)
            if log is not None:
                log.write(rec)
            if not args.quiet:
                print(f"step {rec['step']:>8d}  T {rec['temperature_K']:8.1f} K  Epot {rec['potential_eV']:14.6f}  "
                      f"Etot {rec['total_eV']:14.6f} eV  migrated {rec['migrated']}  rebuilds {rec['rebuilds']}")
            if state.step >= args.steps:
                break
            state = md.advance(state, min(args.traj_every, args.steps - state.step))
    finally:
        traj.close()
        if log is not None:
            log.close()
    print(f"wrote {args.output}" + (f" and {args.log}" if args.log else "") + " (pressure is not computed with "
          "--devices: NaN in the log)")
    return 0


__all__ = ["Capacities", "DistributedMD", "DistributedState", "run_distributed_nve", "run_md_cli"]
